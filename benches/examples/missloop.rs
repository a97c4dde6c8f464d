//! A profiling loop (for `perf record`): `n` cached entries, then `count` rounds of a miss
//! in a gap page, an invalidation of it and a flush, timed per step.
//!
//! `cargo run -p umm-benches --release --example missloop -- [N] [COUNT]`

use std::time::{Duration, Instant};

use umm_benches::Workload;

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let n = args.next().unwrap_or(100_000);
    let count = args.next().unwrap_or(200_000);
    let w = Workload::new(n);
    let (m, dev) = w.umm_manager();
    let (mut miss, mut inval, mut flush) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for k in 0..count {
        let range = w.gap(w.pick(k));
        let t = Instant::now();
        let p = m.pin(range, &[dev.id()]).unwrap();
        miss += t.elapsed();
        drop(p);
        let t = Instant::now();
        m.invalidate(range);
        inval += t.elapsed();
        let t = Instant::now();
        m.flush();
        flush += t.elapsed();
    }
    let per = |d: Duration| d.as_nanos() as f64 / count as f64;
    println!(
        "{n} entries: miss {:.0} ns, invalidate {:.0} ns, flush {:.0} ns",
        per(miss),
        per(inval),
        per(flush)
    );
}
