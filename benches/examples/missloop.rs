//! A profiling loop (for `perf record`): `n` cached entries, then `count` rounds of a miss
//! in a gap page, an invalidation of it and a flush, timed per step.
//!
//! `cargo run -p umm-benches --release --example missloop -- [N] [COUNT]`

use umm_benches::{miss_round, Workload};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let n = args.next().unwrap_or(100_000);
    let count = args.next().unwrap_or(200_000);
    let w = Workload::new(n);
    let (m, dev) = w.umm_manager();
    let round = miss_round(&m, dev.id(), &w, 0..count);
    println!(
        "{n} entries: miss {:.0} ns, invalidate {:.0} ns, flush {:.0} ns",
        round.miss, round.invalidate, round.flush
    );
}
