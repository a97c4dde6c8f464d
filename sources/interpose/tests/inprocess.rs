//! The in-process mode: this test binary exports the hooks itself, so every `libc::munmap`
//! & co. below goes through them. Tests share the process-global sink, so they take a
//! lock; every blocking step runs under a watchdog.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use umm::Range;
use umm_interpose::{install, HookSink, InstallError};

umm_interpose::export_hooks!();

static SERIAL: Mutex<()> = Mutex::new(());

fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what}: did not finish within 20 s (hang)"))
}

/// Records reports with the reporting thread (other threads unmap and free too: `std`
/// frees each exiting thread's signal stack with `munmap`, which the in-process hooks
/// see). The thread is named by `gettid`, which works in thread teardown (the `free`
/// hook runs there), unlike `std::thread::current`.
#[derive(Default)]
struct Log(Mutex<Vec<(libc::pid_t, Range)>>);

fn tid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

impl HookSink for Log {
    fn invalidate_from_hook(&self, range: Range) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((tid(), range));
    }
}

impl Log {
    /// This thread's reports since the last call that overlap `within` (the hooked
    /// `free` also reports the test's own heap blocks).
    fn take_in(&self, within: Range) -> Vec<Range> {
        let mut v = self.take();
        v.retain(|r| r.overlaps(&within));
        v
    }

    /// This thread's reports since the last call.
    fn take(&self) -> Vec<Range> {
        let me = tid();
        let mut all = self.0.lock().unwrap();
        let mine = all
            .iter()
            .filter(|(t, _)| *t == me)
            .map(|(_, r)| *r)
            .collect();
        all.retain(|(t, _)| *t != me);
        mine
    }
}

fn map(len: usize) -> *mut libc::c_void {
    umm::testing::map_anonymous(len).start() as *mut libc::c_void
}

fn r(p: *mut libc::c_void, len: usize) -> Range {
    Range::new(p as usize, len).unwrap()
}

#[test]
fn every_hooked_call_reports_before_the_real_call() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let log = Arc::new(Log::default());
    let _installed = install(log.clone()).unwrap();
    let page = umm::page_size();
    let len = 4 * page;

    let p = map(len);
    // SAFETY: our own mapping throughout.
    unsafe {
        libc::madvise(p, len, libc::MADV_DONTNEED);
        libc::madvise(p, len, libc::MADV_WILLNEED); // not reported
        assert_eq!(log.take_in(r(p, len)), vec![r(p, len)]);

        let q = libc::mmap(
            p,
            page,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
        assert_eq!(q, p);
        assert_eq!(log.take_in(r(p, page)), vec![r(p, page)]);

        let shrunk = libc::mremap(p, len, 2 * page, 0);
        assert_eq!(shrunk, p);
        assert_eq!(
            log.take_in(r(p.add(2 * page), 2 * page)),
            vec![r(p.add(2 * page), 2 * page)]
        );

        libc::munmap(p, 2 * page);
        log.take();
        let p = map(2 * page);
        let moved = libc::mremap(p, 2 * page, 64 * page, libc::MREMAP_MAYMOVE);
        assert_ne!(moved, libc::MAP_FAILED);
        assert_eq!(log.take_in(r(p, 2 * page)), vec![r(p, 2 * page)]);

        libc::munmap(moved.add(page), page);
        assert_eq!(
            log.take_in(r(moved.add(page), page)),
            vec![r(moved.add(page), page)]
        );
        libc::munmap(moved, 64 * page);
        assert_eq!(log.take_in(r(moved, 64 * page)), vec![r(moved, 64 * page)]);

        // Unaligned lengths are rounded out to pages.
        let p = map(len);
        libc::munmap(p, 10);
        assert_eq!(log.take_in(r(p, page)), vec![r(p, page)]);
        libc::munmap(p, len);
        log.take();

        // SysV shm: the extent comes from /proc/self/maps.
        let id = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
        assert!(id >= 0);
        let s = libc::shmat(id, std::ptr::null(), 0);
        assert_eq!(libc::shmdt(s), 0);
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        assert_eq!(log.take_in(r(s, len)), vec![r(s, len)]);

        // sbrk shrink reports the released top of the heap.
        let before = libc::sbrk(0) as usize;
        if libc::sbrk(len as isize) as usize == before {
            libc::sbrk(-(len as isize));
            let want = Range::new(
                before & !(page - 1),
                (before + len).div_ceil(page) * page - (before & !(page - 1)),
            )
            .unwrap();
            assert_eq!(log.take_in(want), vec![want]);
        } else {
            eprintln!("note: sbrk growth refused; brk shrink not checked");
        }
    }
}

/// Issue 11 item 6: glibc frees and trims heap memory through its internal
/// `__munmap`/`__madvise`/`__brk`, and `shmat(SHM_REMAP)` replaces a mapping: before the
/// `free`/`realloc`/`malloc_trim`/`shmat` hooks none of this was reported.
#[test]
fn heap_frees_trims_and_shm_remap_are_reported() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let log = Arc::new(Log::default());
    let installed = install(log.clone()).unwrap();
    let page = umm::page_size();
    let overlaps = |got: &[Range], want: Range| got.iter().any(|r| r.overlaps(&want));
    // SAFETY: our own heap blocks and SysV segments throughout.
    unsafe {
        // A block above the mmap threshold: glibc's free munmaps it internally.
        let len = 4 << 20;
        let m = libc::malloc(len);
        assert!(!m.is_null());
        let block = Range::new(m as usize, len).unwrap();
        log.take();
        libc::free(m);
        assert!(
            overlaps(&log.take(), block),
            "free of a 4 MiB block not reported"
        );

        // realloc may move (mremap internally) or free the old block.
        let m = libc::malloc(len);
        let block = Range::new(m as usize, len).unwrap();
        log.take();
        let m2 = libc::realloc(m, 2 * len);
        assert!(
            overlaps(&log.take(), block),
            "realloc of a 4 MiB block not reported"
        );
        libc::free(m2);
        log.take();

        // malloc_trim madvises free heap memory anywhere: everything is reported.
        let small = libc::malloc(100_000);
        let block = Range::new(small as usize, 100_000).unwrap();
        libc::free(small);
        log.take();
        libc::malloc_trim(0);
        assert!(overlaps(&log.take(), block), "malloc_trim not reported");

        // shmat(SHM_REMAP) over an attached segment replaces it.
        let len = 4 * page;
        let a = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
        let b = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
        assert!(a >= 0 && b >= 0);
        let p = libc::shmat(a, std::ptr::null(), 0);
        assert_ne!(p as isize, -1);
        log.take();
        let q = libc::shmat(b, p, libc::SHM_REMAP);
        assert_eq!(q, p);
        assert_eq!(log.take_in(r(p, len)), vec![r(p, len)]);
        libc::shmdt(q);
        libc::shmctl(a, libc::IPC_RMID, std::ptr::null_mut());
        libc::shmctl(b, libc::IPC_RMID, std::ptr::null_mut());
    }
    drop(installed);
}

#[test]
fn hooks_pass_through_before_install_and_after_uninstall() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let len = umm::page_size();
    let p = map(len);
    // SAFETY: our own mapping.
    assert_eq!(unsafe { libc::munmap(p, len) }, 0);
    let log = Arc::new(Log::default());
    let installed = install(log.clone()).unwrap();
    assert!(matches!(
        install(log.clone()),
        Err(InstallError::AlreadyInstalled)
    ));
    drop(installed);
    let p = map(len);
    // SAFETY: our own mapping.
    assert_eq!(unsafe { libc::munmap(p, len) }, 0);
    assert!(log.take().is_empty());
    assert_eq!(Arc::strong_count(&log), 1, "uninstall released the sink");
}

thread_local! {
    static IN_SINK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A sink that unmaps memory itself (the nested hook must pass through, not recurse).
/// Counts calls and re-entries.
struct Unmapper(AtomicUsize, AtomicUsize);

impl HookSink for Unmapper {
    fn invalidate_from_hook(&self, _range: Range) {
        self.0.fetch_add(1, Ordering::SeqCst);
        if IN_SINK.with(|f| f.replace(true)) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
        let len = umm::page_size();
        let p = map(len);
        // SAFETY: our own mapping; this re-enters the munmap hook on this thread.
        unsafe { libc::munmap(p, len) };
        IN_SINK.with(|f| f.set(false));
    }
}

#[test]
fn a_sink_that_unmaps_does_not_recurse() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let sink = Arc::new(Unmapper(AtomicUsize::new(0), AtomicUsize::new(0)));
    let installed = install(sink.clone()).unwrap();
    within("munmap with a re-entering sink", || {
        let len = umm::page_size();
        let p = map(len);
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p, len) }
    });
    assert!(sink.0.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        sink.1.load(Ordering::SeqCst),
        0,
        "the nested munmap re-entered the sink"
    );
    drop(installed);
}

#[derive(Default)]
struct Counter(AtomicUsize);

impl HookSink for Counter {
    fn invalidate_from_hook(&self, _range: Range) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn install_and_uninstall_race_with_unmapping_threads() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let stop = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            let running = running.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while stop.load(Ordering::Relaxed) == 0 {
                    if n == 1 {
                        running.fetch_add(1, Ordering::SeqCst);
                    }
                    let len = umm::page_size();
                    let p = map(len);
                    // SAFETY: our own mapping.
                    unsafe { libc::munmap(p, len) };
                    drop(vec![0u8; 300_000]); // malloc/free storm (mmap'd chunks: glibc internal)
                    n += 1;
                }
                n
            })
        })
        .collect();
    let r = running.clone();
    within("the unmapping threads to start", move || {
        while r.load(Ordering::SeqCst) < 3 {
            std::thread::yield_now();
        }
    });
    within("200 install/uninstall cycles under load", || {
        for _ in 0..200 {
            let c = Arc::new(Counter::default());
            let installed = install(c.clone()).unwrap();
            std::thread::yield_now();
            drop(installed);
            assert_eq!(Arc::strong_count(&c), 1);
        }
    });
    stop.store(1, Ordering::Relaxed);
    for w in workers {
        assert!(w.join().unwrap() > 1);
    }
}

/// A sink that blocks the hook until released (to have a hook in flight at a `fork`).
struct Gate {
    entered: std::sync::atomic::AtomicBool,
    release: std::sync::atomic::AtomicBool,
}

impl HookSink for Gate {
    fn invalidate_from_hook(&self, _range: Range) {
        if self.entered.swap(true, Ordering::SeqCst) {
            return; // only the first report blocks
        }
        while !self.release.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
    }
}

/// A fork child only has the forking thread: a hook that was in flight on another thread
/// of the parent never finishes there. Before the fix the child's uninstall (a fork child
/// dropping its copy of a manager detaches the source) waited for it forever.
#[test]
fn a_fork_child_uninstalls_although_a_parent_thread_was_in_a_hook() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let gate = Arc::new(Gate {
        entered: false.into(),
        release: false.into(),
    });
    let installed = install(gate.clone()).unwrap();
    let unmapper = std::thread::spawn(|| {
        let len = umm::page_size();
        let p = map(len);
        // SAFETY: our own mapping; the hook blocks in the gate until released.
        unsafe { libc::munmap(p, len) };
    });
    let g = gate.clone();
    within("a hook to enter the gate", move || {
        while !g.entered.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
    });
    // SAFETY: the child only uninstalls (atomics, a yield loop, a free) and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        drop(installed);
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exited = loop {
        // SAFETY: polls our child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            break true;
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: kills and reaps our own hung child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    gate.release.store(true, Ordering::SeqCst);
    unmapper.join().unwrap();
    drop(installed);
    assert!(
        exited,
        "the fork child's uninstall waited for a parent thread's hook (hung 20 s, killed)"
    );
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}
