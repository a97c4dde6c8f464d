//! An `InterposeSource` through a manager: its whole life while other threads unmap.
//! This test binary exports the hooks itself; every blocking step runs under a watchdog.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use umm::Manager;
use umm_interpose::InterposeSource;

umm_interpose::export_hooks!();

static SERIAL: Mutex<()> = Mutex::new(());

fn within<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {secs} s (hang)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

fn map(len: usize) -> *mut libc::c_void {
    umm::testing::map_anonymous(len).start() as *mut libc::c_void
}

/// Issue 11 item 4: the application drops the last `Arc<Manager>` while another thread
/// is inside a munmap hook. Before the fix the hook upgraded its `Weak`, so the last
/// strong reference could be the hook's: `Manager::drop` then ran on the hook's stack and
/// its uninstall waited for the hook it was running in (a hang within ~100 iterations).
#[test]
fn dropping_the_last_manager_while_another_thread_unmaps_never_hangs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const ITERATIONS: usize = 3000;
    let stop = Arc::new(AtomicBool::new(false));
    let unmappers: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                let len = umm::page_size();
                while !stop.load(Ordering::Relaxed) {
                    let p = map(len);
                    // SAFETY: our own mapping.
                    unsafe { libc::munmap(p, len) };
                    n += 1;
                }
                n
            })
        })
        .collect();
    let done = within(
        "3000 manager lifetimes against munmapping threads",
        120,
        || {
            let mut lingering = 0usize;
            for _ in 0..ITERATIONS {
                let manager = Arc::new(Manager::default());
                // Before the fix a hook could still own the previous manager (and its
                // installation) after the application dropped it: retry, and count it.
                let source = loop {
                    match InterposeSource::install(&manager) {
                        Err(umm_interpose::InstallError::AlreadyInstalled) => {
                            lingering += 1;
                            std::thread::yield_now();
                        }
                        other => break other.unwrap(),
                    }
                };
                manager.add_source(source).unwrap();
                // Wait until a hook has reached this manager, so that the drop below
                // races hooks in flight (bounded: the unmappers never stop).
                std::thread::yield_now();
                drop(manager);
            }
            (ITERATIONS, lingering)
        },
    );
    stop.store(true, Ordering::Relaxed);
    for u in unmappers {
        assert!(u.join().unwrap() > 0);
    }
    assert_eq!(
        done,
        (ITERATIONS, 0),
        "a dropped manager outlived the application's last Arc (owned by a hook)"
    );
}

/// Issue 11 item 3: the hooks have one sink, so a second manager must be refused with a
/// typed error (before the fix `attach` accepted any manager: the source delivered to
/// the one it was installed for only, silently).
#[test]
fn a_second_manager_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let first = Arc::new(Manager::default());
    let second = Arc::new(Manager::default());
    let source = InterposeSource::install(&first).unwrap();
    assert!(matches!(
        InterposeSource::install(&second),
        Err(umm_interpose::InstallError::AlreadyInstalled)
    ));
    let refused = |e: umm::Error| match e {
        umm::Error::Source { source, .. } => *source
            .downcast::<umm_interpose::AttachError>()
            .expect("an AttachError"),
        other => panic!("expected Error::Source, got {other:?}"),
    };
    let e = refused(second.add_source(source.clone()).unwrap_err());
    assert!(
        matches!(e, umm_interpose::AttachError::OtherManager { installed_for, attaching }
            if installed_for == first.id() && attaching == second.id()),
        "{e:?}"
    );
    first.add_source(source.clone()).unwrap();
    let e = refused(first.add_source(source.clone()).unwrap_err());
    assert!(
        matches!(e, umm_interpose::AttachError::AlreadyAttached { .. }),
        "{e:?}"
    );
    drop(first);
    // The first manager's drop uninstalled the hooks: the second may install now.
    let source2 = InterposeSource::install(&second).unwrap();
    second.add_source(source2).unwrap();
}

/// A manager with one recording device and an interposition source installed with
/// `options` (the caller holds `SERIAL`).
fn manager_with(
    options: umm_interpose::Options,
) -> (Arc<Manager>, umm::Device<umm::testing::RecordingBackend>) {
    let manager = Arc::new(Manager::default());
    let dev = manager
        .attach(umm::testing::RecordingBackend::new("rec"))
        .unwrap();
    let source = InterposeSource::install_with(&manager, options).unwrap();
    manager.add_source(source).unwrap();
    (manager, dev)
}

fn memfd_mapping(len: usize) -> (i32, *mut libc::c_void) {
    // SAFETY: a memfd of `len` bytes, mapped shared; the caller unmaps and closes.
    unsafe {
        let fd = libc::memfd_create(c"strict".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        (fd, p)
    }
}

/// Issue 11 item 6: the hooks cannot see `fallocate(PUNCH_HOLE)` or `ftruncate` of a
/// mapped file; in strict mode (the default) a pin of such memory is refused with
/// `Error::Uncovered` naming the operation (before the fix it was accepted silently).
#[test]
fn strict_mode_refuses_file_mappings_and_non_strict_accepts_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let len = 4 * umm::page_size();
    let (fd, p) = memfd_mapping(len);
    let range = umm::Range::new(p as usize, len).unwrap();
    let anon = map(len);
    let anon_range = umm::Range::new(anon as usize, len).unwrap();
    for options in [
        umm_interpose::Options::libc_only(),
        umm_interpose::Options::strict(false),
    ] {
        let strict = options.strict;
        let (manager, dev) = manager_with(options);
        drop(
            manager
                .pin(anon_range, &[dev.id()])
                .expect("anonymous memory is covered"),
        );
        let outcome = manager.pin(range, &[dev.id()]).map(drop);
        match outcome {
            Err(umm::Error::Uncovered {
                range: r,
                mapping,
                operation,
                ..
            }) => {
                assert!(strict, "non-strict mode refused {r}");
                assert_eq!(r, range);
                assert_eq!(mapping, "a MAP_SHARED file or shmem mapping");
                assert!(operation.contains("fallocate(PUNCH_HOLE)"), "{operation}");
            }
            Ok(()) => assert!(!strict, "strict mode accepted a memfd MAP_SHARED pin"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    // SAFETY: our mappings and descriptor.
    unsafe {
        libc::munmap(p, len);
        libc::munmap(anon, len);
        libc::close(fd);
    }
}

/// A raw `syscall(SYS_munmap)` bypasses every hook and can make any registration stale:
/// strict mode refuses every pin, naming the raw system call, until the application
/// declares `libc_only` (issue 11: before, anonymous memory was accepted and a raw
/// munmap left the registration stale silently).
#[test]
fn strict_mode_refuses_everything_until_libc_only_is_declared() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let len = 4 * umm::page_size();
    let anon = map(len);
    let range = umm::Range::new(anon as usize, len).unwrap();
    for (options, refused) in [
        (umm_interpose::Options::default(), true),
        (umm_interpose::Options::libc_only(), false),
    ] {
        let (manager, dev) = manager_with(options);
        match manager.pin(range, &[dev.id()]).map(drop) {
            Err(umm::Error::Uncovered {
                range: r,
                operation,
                ..
            }) => {
                assert!(refused, "libc_only refused {r}");
                assert_eq!(r, range);
                assert_eq!(operation, umm_interpose::RAW_SYSCALLS);
            }
            Ok(()) => assert!(!refused, "strict mode without libc_only accepted a pin"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    // SAFETY: our mapping.
    unsafe { libc::munmap(anon, len) };
}

/// After a fork the parent's private pages are copy-on-write; its next write moves them
/// to new frames with no call a hook sees. A registration cached before the fork must
/// not be served after it (issue 11: it was a cache hit).
#[test]
fn a_parent_write_after_fork_is_never_served_from_the_cache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let len = 4 * umm::page_size();
    let anon = map(len);
    let range = umm::Range::new(anon as usize, len).unwrap();
    let (manager, dev) = manager_with(umm_interpose::Options::libc_only());
    let id = |m: &Manager| m.pin(range, &[dev.id()]).unwrap().registration_id(dev.id());
    let before = id(&manager);
    assert_eq!(id(&manager), before, "no hit before the fork");
    // SAFETY: the child only `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    // The copy-on-write break: the parent's addresses get new frames.
    // SAFETY: our own mapping, `len` bytes.
    unsafe { std::ptr::write_bytes(anon.cast::<u8>(), 2, len) };
    assert_ne!(
        id(&manager),
        before,
        "the registration made before the fork was served after the parent's write"
    );
    drop(manager);
    // SAFETY: our mapping.
    unsafe { libc::munmap(anon, len) };
}
