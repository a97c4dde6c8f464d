//! Measures the kernel module's event latency: from the start of a `munmap` of a watched
//! page to the moment another thread, spinning on the mmap'd generation, sees it move. Also
//! the `munmap` duration with and without a watch. Needs `/dev/umm_notify` (run in the
//! guest by `scripts/test-kmod.sh`); prints a skip line otherwise.
//!
//! `cargo run --release -p umm-kmod --example kmod_latency -- [ITERATIONS]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use umm_kmod::NotifyDevice;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, mut v: Vec<u64>) {
    v.sort_unstable();
    println!(
        "{what}: median {} ns, p99 {} ns, min {} ns, max {} ns (n={})",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v[0],
        v[v.len() - 1],
        v.len()
    );
}

/// Maps `pages` anonymous pages.
fn map(pages: usize) -> usize {
    let len = pages * umm::page_size();
    // SAFETY: a fresh anonymous mapping; checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as usize
}

/// Times `munmap` of each page of a fresh `n`-page mapping (optionally watched as one range).
fn munmap_durations(n: usize, dev: Option<&NotifyDevice>) -> Vec<u64> {
    let page = umm::page_size();
    let base = map(n);
    if let Some(d) = dev {
        d.watch(base as u64, (n * page) as u64).expect("watch");
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        // SAFETY: one page of our own mapping.
        unsafe { libc::munmap((base + i * page) as *mut _, page) };
        out.push(t.elapsed().as_nanos() as u64);
    }
    if let Some(d) = dev {
        d.unwatch(1).expect("unwatch");
        let _ = d.read_events();
    }
    out
}

/// ns per `pin` hit (pin + drop of one cached 64 KiB buffer), with or without the kernel
/// source attached (the source adds one load of the generation per hit).
fn pin_hit_ns(with_source: bool, iterations: u32) -> f64 {
    use umm::{testing::RecordingBackend, Manager, Range};
    let manager = Manager::default();
    let nic = manager
        .attach(RecordingBackend::new("nic"))
        .expect("attach");
    if with_source {
        let source = umm_kmod::KmodSource::open().expect("open");
        manager.add_source(Arc::new(source)).expect("add_source");
    }
    let buf = vec![0u8; 64 << 10];
    let range = Range::of_slice(&buf).expect("range");
    drop(manager.pin(range, &[nic.id()]).expect("pin")); // miss: registers
    let t = Instant::now();
    for _ in 0..iterations {
        drop(std::hint::black_box(
            manager.pin(range, &[nic.id()]).expect("pin"),
        ));
    }
    t.elapsed().as_nanos() as f64 / f64::from(iterations)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    if !NotifyDevice::is_available() {
        println!("SKIP kmod_latency: /dev/umm_notify absent (load kmod-notifier/umm_notify.ko)");
        return;
    }
    let page = umm::page_size();
    let dev = Arc::new(NotifyDevice::open().expect("open /dev/umm_notify"));

    // The miss path's extra cost: one WATCH before registering, one UNWATCH after.
    let base = map(n);
    let (mut w, mut u) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let id = dev
            .watch((base + i * page) as u64, page as u64)
            .expect("watch");
        w.push(t.elapsed().as_nanos() as u64);
        ids.push(id);
    }
    for id in ids {
        let t = Instant::now();
        dev.unwatch(id).expect("unwatch");
        u.push(t.elapsed().as_nanos() as u64);
    }
    // SAFETY: our own mapping.
    unsafe { libc::munmap(base as *mut _, n * page) };
    report("WATCH ioctl (n watches growing)", w);
    report("UNWATCH ioctl", u);

    report("munmap of one page, no watch", munmap_durations(n, None));
    report(
        "munmap of one watched page",
        munmap_durations(n, Some(&dev)),
    );

    // Event latency: an observer thread spins on the generation and stamps each change.
    let clock = Instant::now();
    let now = move || clock.elapsed().as_nanos() as u64;
    let base = map(n);
    dev.watch(base as u64, (n * page) as u64).expect("watch");
    let _ = dev.read_events();
    // The observer publishes the time it first saw each new generation value: time first,
    // then (release) the value, so a reader that sees the value also sees its time.
    let seen_gen = Arc::new(AtomicU64::new(dev.generation().load(Ordering::Acquire)));
    let seen_time = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let observer = {
        let (dev, seen_gen, seen_time, stop) = (
            dev.clone(),
            seen_gen.clone(),
            seen_time.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut last = seen_gen.load(Ordering::Relaxed);
            while stop.load(Ordering::Relaxed) == 0 {
                let g = dev.generation().load(Ordering::Acquire);
                if g != last {
                    seen_time.store(now(), Ordering::Relaxed);
                    seen_gen.store(g, Ordering::Release);
                    last = g;
                }
                std::hint::spin_loop();
            }
        })
    };
    let mut latency = Vec::with_capacity(n);
    let mut visible_at_return = 0;
    for i in 0..n {
        let before = dev.generation().load(Ordering::Acquire);
        let t0 = now();
        // SAFETY: one page of our own mapping.
        unsafe { libc::munmap((base + i * page) as *mut _, page) };
        if dev.generation().load(Ordering::Acquire) > before {
            visible_at_return += 1;
        }
        while seen_gen.load(Ordering::Acquire) <= before {
            std::hint::spin_loop();
        }
        latency.push(seen_time.load(Ordering::Relaxed).saturating_sub(t0));
    }
    stop.store(1, Ordering::Relaxed);
    observer.join().unwrap();
    for (label, with) in [
        ("without", false),
        ("with", true),
        ("without", false),
        ("with", true),
    ] {
        println!(
            "Manager::pin hit {label} the kernel source: {:.0} ns",
            pin_hit_ns(with, 200_000)
        );
    }
    report(
        "event latency (munmap start -> generation seen by another thread)",
        latency,
    );
    println!("generation already bumped when munmap returned: {visible_at_return}/{n}");
    let _ = dev.read_events();
}
