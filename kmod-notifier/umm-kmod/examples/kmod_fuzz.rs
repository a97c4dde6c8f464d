//! A seedable fuzzer of `/dev/umm_notify`'s system-call surface (run as root in the guest by
//! `scripts/test-kmod.sh`, after loading the module with small limits so the limit paths
//! are hit).
//!
//! ```text
//! kmod_fuzz [--calls N] [--seed S] [--threads T]
//! ```
//!
//! T threads share a few open files (in slots that any thread may close and reopen at any
//! time, so calls race with the last close) and make N calls on the device in all (churn of
//! the address space is not counted), each chosen at random:
//! ioctls with valid, random and unknown command numbers and argument pointers that are
//! valid, NULL, unmapped, read-only (the WATCH write-back of the id faults) or in the
//! kernel half; WATCH/UNWATCH of valid, bogus, wrapping, unaligned and out-of-range ranges
//! and ids; read() with good, short and bad buffers; poll(); mmap() with every size, offset
//! and protection; and address-space churn over watched memory (munmap, mmap(MAP_FIXED),
//! madvise(DONTNEED), mprotect) so invalidations run concurrently with all of it. About one
//! call in 10000 forks a child that tries each kind of call on the inherited files: each one must
//! fail with EPERM (poll: POLLERR), or the run fails.
//!
//! The seed (printed first; default: from the clock) fixes each thread's choices; thread
//! interleaving is not replayable, the mix of calls is. Exits non-zero when an invariant
//! fails (a fork child's call succeeded, an id outside 1..=max_watches, INFO's watch count
//! above the limit). The kernel side (no BUG/WARNING/Oops, module refcount 0, rmmod) is
//! checked by the caller after this process exits.

use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use umm_kmod::sys;

/// Open files shared by all threads.
const SLOTS: usize = 4;
/// Pages of the churned pool.
const POOL_PAGES: usize = 256;
/// `MADV_POPULATE_WRITE` (Linux 5.14; not in every libc crate version).
const MADV_POPULATE_WRITE: i32 = 23;

/// splitmix64: small, seedable, good enough to pick calls.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// What every thread shares.
struct Shared {
    slots: [AtomicI32; SLOTS],
    pool: usize,
    page: usize,
    /// A page mapped read-only (WATCH's id write-back faults there).
    ro_page: usize,
    /// A page mapped PROT_NONE for the whole run (the kernel's access faults there). Kept
    /// mapped, not unmapped: an unmapped hole could be reused by a thread stack, which the
    /// kernel would then happily write into.
    hole: usize,
    max_watches: u64,
    /// System calls made on the device so far (the fork children's included).
    calls: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
    forks: AtomicU64,
    events: AtomicU64,
    /// Nanoseconds spent per hundredth of the call mix (UMM_KMOD_FUZZ_PROFILE=1).
    profile: [AtomicU64; 100],
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn open_dev() -> RawFd {
    // SAFETY: NUL-terminated path; no memory effects.
    let fd = unsafe {
        libc::open(
            c"/dev/umm_notify".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    assert!(
        fd >= 0,
        "open /dev/umm_notify: {}",
        std::io::Error::last_os_error()
    );
    fd
}

impl Shared {
    fn fail(&self, what: String) {
        eprintln!("FAIL: {what}");
        self.failures.lock().unwrap().push(what);
        self.stop.store(true, Ordering::SeqCst);
    }

    /// A pointer for an ioctl argument: mostly `good`, sometimes invalid.
    fn arg_ptr(&self, rng: &mut Rng, good: usize) -> usize {
        match rng.below(16) {
            0 => 0,
            1 => 8,
            2 => self.hole,
            3 => self.ro_page,
            4 => 0xffff_8880_0000_0000,
            5 => rng.next() as usize,
            _ => good,
        }
    }

    /// A page-aligned address: mostly inside the pool.
    fn addr(&self, rng: &mut Rng) -> u64 {
        match rng.below(12) {
            0 => 0,
            1 => rng.next(),
            2 => rng.next() & !0xfff,
            3 => 0xffff_8000_0000_0000,
            4 => (1u64 << 47) - self.page as u64,
            5 => self.hole as u64,
            _ => (self.pool + rng.below(POOL_PAGES as u64) as usize * self.page) as u64,
        }
    }

    fn len(&self, rng: &mut Rng) -> u64 {
        let p = self.page as u64;
        match rng.below(10) {
            0 => 0,
            1 => rng.next(),
            2 => rng.below(3 * p),
            3 => !(p - 1),
            _ => (1 + rng.below(16)) * p,
        }
    }

    /// One call on the device (or churn of the address space); returns how many system
    /// calls it made on the device.
    fn one_call(&self, rng: &mut Rng, ids: &mut Vec<(usize, u64)>, k: u64) -> u64 {
        let slot = rng.below(SLOTS as u64) as usize;
        let fd = self.slots[slot].load(Ordering::Relaxed);
        let mut watch = sys::umm_notify_watch::default();
        let mut unwatch = sys::umm_notify_unwatch::default();
        let mut info = sys::umm_notify_info::default();
        let mut recs = [sys::umm_notify_record::default(); 8];
        match k {
            0..=3299 => {
                watch.start = self.addr(rng);
                watch.len = self.len(rng);
                watch.id = if rng.chance(8) { rng.next() } else { 0 };
                watch.flags = if rng.chance(16) {
                    1 << rng.below(64)
                } else {
                    0
                };
                let p = self.arg_ptr(rng, &mut watch as *mut _ as usize);
                // SAFETY: the kernel reads/writes at most one struct at `p`; a valid `p` is
                // `watch` on our stack, an invalid one makes the call fail with EFAULT.
                let rc = unsafe { libc::ioctl(fd, sys::UMM_NOTIFY_IOC_WATCH as _, p) };
                if rc == 0 && p == &mut watch as *mut _ as usize {
                    if watch.id == 0 || watch.id > self.max_watches {
                        self.fail(format!(
                            "WATCH returned id {} (max {})",
                            watch.id, self.max_watches
                        ));
                    }
                    ids.push((slot, watch.id));
                }
            }
            3300..=5399 => {
                unwatch.id = match rng.below(4) {
                    0 => rng.next(),
                    1 => rng.below(self.max_watches + 2),
                    _ if !ids.is_empty() => {
                        let i = rng.below(ids.len() as u64) as usize;
                        ids.swap_remove(i).1
                    }
                    _ => 1,
                };
                unwatch.flags = if rng.chance(16) { rng.next() } else { 0 };
                let p = self.arg_ptr(rng, &mut unwatch as *mut _ as usize);
                // SAFETY: the kernel reads at most one struct at `p` (or fails with EFAULT).
                unsafe { libc::ioctl(fd, sys::UMM_NOTIFY_IOC_UNWATCH as _, p) };
            }
            5400..=5999 => {
                let p = self.arg_ptr(rng, &mut info as *mut _ as usize);
                // SAFETY: the kernel writes at most one struct at `p` (or fails with EFAULT).
                let rc = unsafe { libc::ioctl(fd, sys::UMM_NOTIFY_IOC_INFO as _, p) };
                if rc == 0 && p == &mut info as *mut _ as usize && info.watches > self.max_watches {
                    self.fail(format!(
                        "INFO: {} watches, limit {}",
                        info.watches, self.max_watches
                    ));
                }
            }
            6000..=6599 => {
                // Unknown and mangled commands: random numbers, our magic with other numbers,
                // our numbers with other sizes or directions.
                let cmd: u64 = match rng.below(3) {
                    0 => rng.next() & 0xffff_ffff,
                    1 => sys::ioc(
                        rng.below(4) as u32,
                        sys::UMM_NOTIFY_IOC_MAGIC,
                        rng.below(256) as u32,
                        rng.below(64) as usize,
                    ) as u64,
                    _ => (sys::UMM_NOTIFY_IOC_WATCH ^ (1 << rng.below(32))) as u64,
                };
                let p = self.arg_ptr(rng, &mut watch as *mut _ as usize);
                // SAFETY: the module rejects unknown commands without touching `p`; a command
                // that some other layer handles (FIONBIO, FIOASYNC...) gets a valid or
                // faulting pointer to our stack-sized scratch struct.
                unsafe { libc::ioctl(fd, cmd as _, p) };
            }
            6600..=8799 => {
                let size = std::mem::size_of_val(&recs);
                let n = match rng.below(4) {
                    0 => rng.below(64) as usize,
                    _ => size,
                };
                let p = self.arg_ptr(rng, recs.as_mut_ptr() as usize);
                let n = if p == recs.as_mut_ptr() as usize {
                    n.min(size)
                } else {
                    n
                };
                // SAFETY: at most `n` bytes written at `p`: our buffer (n <= its size) or an
                // address the kernel refuses with EFAULT.
                let r = unsafe { libc::read(fd, p as *mut _, n) };
                if r > 0 {
                    self.events.fetch_add(r as u64 / 40, Ordering::Relaxed);
                }
            }
            8800..=9958 => {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, no waiting.
                unsafe { libc::poll(&mut pfd, 1, 0) };
            }
            9959..=9968 => {
                let len = match rng.below(4) {
                    0 => self.page * (1 + rng.below(3) as usize),
                    _ => self.page,
                };
                let prot = [
                    libc::PROT_READ,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::PROT_NONE,
                ][rng.below(4) as usize];
                let flags = if rng.chance(4) {
                    libc::MAP_PRIVATE
                } else {
                    libc::MAP_SHARED
                };
                let off = if rng.chance(8) { self.page as i64 } else { 0 };
                // SAFETY: a fresh mapping of the device chosen by the kernel, unmapped below.
                let p = unsafe { libc::mmap(ptr::null_mut(), len, prot, flags, fd, off) };
                if p != libc::MAP_FAILED {
                    if rng.chance(2) && prot & libc::PROT_READ != 0 {
                        // SAFETY: the generation page, mapped readable just now.
                        unsafe { ptr::read_volatile(p as *const u64) };
                    }
                    // SAFETY: the mapping made just now.
                    unsafe { libc::munmap(p, len) };
                }
            }
            9969..=9988 => {
                self.churn(rng);
                return 0;
            }
            9989..=9998 => {
                // Close and reopen a slot while other threads use it.
                let new = open_dev();
                let old = self.slots[slot].swap(new, Ordering::SeqCst);
                // SAFETY: `old` was ours; a thread still using its number gets EBADF or
                // another of our device files.
                unsafe { libc::close(old) };
                ids.retain(|&(s, _)| s != slot);
                return 2;
            }
            _ => {
                return self.fork_child(rng);
            }
        }
        1
    }

    /// Address-space churn over the pool (invalidations of watched ranges).
    fn churn(&self, rng: &mut Rng) {
        let first = rng.below(POOL_PAGES as u64) as usize;
        let pages = 1 + rng.below((POOL_PAGES - first).min(8) as u64) as usize;
        let a = (self.pool + first * self.page) as *mut libc::c_void;
        let len = pages * self.page;
        // SAFETY: every call stays inside the pool, which stays mapped (MAP_FIXED replaces
        // pages atomically; nothing is ever munmapped, so no other mapping, such as a new
        // thread's stack, can land in the pool); pages are populated by madvise, never
        // touched.
        unsafe {
            match rng.below(5) {
                0 => {
                    libc::madvise(a, len, libc::MADV_DONTNEED);
                }
                1 => {
                    libc::mprotect(a, len, libc::PROT_READ);
                    libc::mprotect(a, len, libc::PROT_READ | libc::PROT_WRITE);
                }
                2 => {
                    libc::mmap(
                        a,
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                }
                _ => {
                    let p = libc::mmap(
                        a,
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                    if p != libc::MAP_FAILED {
                        // Populate without touching: another thread may have made the
                        // pages read-only meanwhile (a store would then be SIGSEGV).
                        libc::madvise(p, len, MADV_POPULATE_WRITE);
                    }
                }
            }
        }
    }

    /// Forks a child that tries every kind of call on the inherited files; each must fail
    /// with EPERM (poll: POLLERR only). Returns the calls the child made.
    fn fork_child(&self, rng: &mut Rng) -> u64 {
        self.forks.fetch_add(1, Ordering::Relaxed);
        let fds: Vec<RawFd> = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .collect();
        let id = 1 + rng.below(8);
        let start = self.pool as u64;
        let page = self.page;
        // SAFETY: the child makes raw system calls on its own stack only and leaves with
        // _exit (this process is multi-threaded: nothing else is safe after fork).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above.
            unsafe {
                let mut bad = 0i32;
                for (i, &fd) in fds.iter().enumerate() {
                    let mut w = sys::umm_notify_watch {
                        start,
                        len: page as u64,
                        id: 0,
                        flags: 0,
                    };
                    let u = sys::umm_notify_unwatch { id, flags: 0 };
                    let mut info = sys::umm_notify_info::default();
                    let mut rec = [0u8; 40];
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // A closed-and-reused slot may hold a number that is no longer open.
                    let perm = |rc: isize| {
                        rc < 0
                            && (*libc::__errno_location() == libc::EPERM
                                || *libc::__errno_location() == libc::EBADF)
                    };
                    if !perm(libc::ioctl(fd, sys::UMM_NOTIFY_IOC_WATCH as _, &mut w) as isize) {
                        bad |= 1 << (i * 5);
                    }
                    if !perm(libc::ioctl(fd, sys::UMM_NOTIFY_IOC_UNWATCH as _, &u) as isize) {
                        bad |= 2 << (i * 5);
                    }
                    if !perm(libc::ioctl(fd, sys::UMM_NOTIFY_IOC_INFO as _, &mut info) as isize) {
                        bad |= 4 << (i * 5);
                    }
                    if !perm(libc::read(fd, rec.as_mut_ptr().cast(), 40)) {
                        bad |= 8 << (i * 5);
                    }
                    let n = libc::poll(&mut pfd, 1, 0);
                    if n == 1 && pfd.revents & libc::POLLIN != 0 {
                        bad |= 16 << (i * 5);
                    }
                    let p = libc::mmap(
                        ptr::null_mut(),
                        page,
                        libc::PROT_READ,
                        libc::MAP_SHARED,
                        fd,
                        0,
                    );
                    if p != libc::MAP_FAILED {
                        bad |= 1 << 30;
                    }
                }
                libc::_exit(if bad == 0 { 0 } else { 1 });
            }
        }
        if pid < 0 {
            self.fail(format!("fork failed: {}", std::io::Error::last_os_error()));
            return 0;
        }
        let mut status = 0;
        // SAFETY: reaps our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            self.fail(format!(
                "a fork child could use an inherited file (status {status:#x})"
            ));
        }
        6 * SLOTS as u64
    }
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad value for {name}: {v}"))
        })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !std::path::Path::new(sys::UMM_NOTIFY_DEVICE).exists() {
        println!(
            "SKIP: {} absent (load the module first)",
            sys::UMM_NOTIFY_DEVICE
        );
        return;
    }
    let target: u64 = arg(&args, "--calls").unwrap_or(1_000_000);
    let threads: u64 = arg(&args, "--threads").unwrap_or(2);
    let seed: u64 = arg(&args, "--seed").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    println!("kmod_fuzz: seed {seed} (replay the call mix with --seed {seed}), {target} calls, {threads} threads");

    let page = umm::page_size();
    let map = |len: usize, prot: i32| -> usize {
        // SAFETY: a fresh anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    };
    let pool = map(POOL_PAGES * page, libc::PROT_READ | libc::PROT_WRITE);
    let ro_page = map(page, libc::PROT_READ);
    let hole = map(page, libc::PROT_NONE);

    let first = open_dev();
    let mut info = sys::umm_notify_info::default();
    // SAFETY: INFO writes one struct.
    let rc = unsafe { libc::ioctl(first, sys::UMM_NOTIFY_IOC_INFO as _, &mut info) };
    assert_eq!(rc, 0, "INFO: {}", errno());
    println!(
        "kmod_fuzz: module max_watches {}, ring_entries {}",
        info.max_watches, info.ring_entries
    );

    let shared = Arc::new(Shared {
        slots: std::array::from_fn(|i| AtomicI32::new(if i == 0 { first } else { open_dev() })),
        pool,
        page,
        ro_page,
        hole,
        max_watches: info.max_watches as u64,
        calls: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        forks: AtomicU64::new(0),
        events: AtomicU64::new(0),
        profile: std::array::from_fn(|_| AtomicU64::new(0)),
    });
    let profiling = std::env::var_os("UMM_KMOD_FUZZ_PROFILE").is_some();
    let t0 = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let sh = shared.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0xd6e8_feb8_6659_fd93));
                let mut ids = Vec::new();
                while !sh.stop.load(Ordering::Relaxed) && sh.calls.load(Ordering::Relaxed) < target
                {
                    let k = rng.below(10_000);
                    let t = profiling.then(Instant::now);
                    let n = sh.one_call(&mut rng, &mut ids, k);
                    if let Some(t) = t {
                        sh.profile[(k / 100) as usize]
                            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    sh.calls.fetch_add(n, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        if w.join().is_err() {
            shared.fail("a fuzzer thread panicked".into());
        }
    }
    let elapsed = t0.elapsed();
    for s in &shared.slots {
        // SAFETY: our files; closing them releases every watch left.
        unsafe { libc::close(s.load(Ordering::SeqCst)) };
    }
    let calls = shared.calls.load(Ordering::SeqCst);
    println!(
        "kmod_fuzz: {calls} calls in {:.1}s ({:.0} calls/s), {} fork children, {} records read, seed {seed}",
        elapsed.as_secs_f64(),
        calls as f64 / elapsed.as_secs_f64(),
        shared.forks.load(Ordering::SeqCst),
        shared.events.load(Ordering::SeqCst),
    );
    if profiling {
        let total: u64 = shared
            .profile
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .sum();
        for (i, p) in shared.profile.iter().enumerate() {
            let ns = p.load(Ordering::SeqCst);
            println!(
                "  mix {:4}..{:4}: {:5.1}% of the time",
                i * 100,
                i * 100 + 99,
                100.0 * ns as f64 / total.max(1) as f64
            );
        }
    }
    let f = shared.failures.lock().unwrap();
    if !f.is_empty() {
        println!("kmod_fuzz: FAIL (seed {seed}): {}", f.join("; "));
        std::process::exit(1);
    }
    println!("kmod_fuzz: ok");
}
