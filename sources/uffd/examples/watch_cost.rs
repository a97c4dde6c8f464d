//! What a watch costs (the miss path): classifying the range with `PROCMAP_QUERY` or by
//! parsing `/proc/self/maps`, at a few and at many VMAs, and a whole `try_watch` +
//! `unwatch`. Run: `cargo run --release -p umm-uffd --example watch_cost`.

use std::time::Instant;

use umm::{NotifierSource, Range};
use umm_uffd::maps::Vmas;
use umm_uffd::{Options, UffdSource};

fn map(len: usize, prot: i32) -> usize {
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as usize
}

fn median_us(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i);
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    median_us(v)
}

fn maps() -> usize {
    umm_uffd::maps::map_count().unwrap()
}

fn main() {
    let page = umm::page_size();
    let query = Vmas::new(true);
    let parse = Vmas::new(false);
    let target = Range::new(map(4 * page, libc::PROT_READ | libc::PROT_WRITE), 4 * page).unwrap();
    let report = |label: &str| {
        let q = if query.uses_procmap_query() {
            format!(
                "{:.2} us",
                time(2000, |_| drop(query.covering(target).unwrap()))
            )
        } else {
            "n/a (kernel < 6.11)".into()
        };
        let p = time(200, |_| drop(parse.covering(target).unwrap()));
        println!(
            "{label} ({} VMAs): PROCMAP_QUERY {q}, /proc/self/maps parse {p:.1} us",
            maps()
        );
    };
    report("few VMAs");
    let s = UffdSource::new(Options::default()).expect("userfaultfd");
    let region = map(4096 * 4 * page, libc::PROT_READ | libc::PROT_WRITE);
    let w = time(4000, |i| {
        let r = Range::new(region + 4 * i * page, page).unwrap();
        s.try_watch(i as u64, r).unwrap();
    });
    let u = time(4000, |i| {
        s.unwatch(i as u64, Range::new(region, page).unwrap())
    });
    println!(
        "try_watch {w:.2} us, unwatch {u:.2} us (median, 2 MiB spans, {} VMAs)",
        maps()
    );
    // Many VMAs, the target mapped last (above most of them in the address space or not:
    // parsing stops at the target, so its position matters; PROCMAP_QUERY does not care).
    let mut hold = Vec::new();
    for i in 0..20000 {
        let prot = if i % 2 == 0 {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        hold.push(map(page, prot));
    }
    report("many VMAs");
}
