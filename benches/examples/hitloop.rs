//! A bare hit loop for profilers (`perf record`): `cargo run -p umm-benches --release
//! --example hitloop -- N_ENTRIES OPS [thread]`.
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n, ops) = (
        args.first().copied().unwrap_or(1000),
        args.get(1).copied().unwrap_or(50_000_000),
    );
    let in_thread = std::env::args().any(|a| a == "thread");
    let run = move || {
        let w = umm_benches::Workload::new(n);
        let (m, dev) = w.umm_manager();
        let t = Instant::now();
        for k in 0..ops {
            black_box(m.pin(w.range(w.pick(k)), &[dev.id()]).unwrap());
        }
        println!(
            "{n} entries: {:.1} ns/hit",
            t.elapsed().as_nanos() as f64 / ops as f64
        );
    };
    if in_thread {
        std::thread::spawn(run).join().unwrap();
    } else {
        run();
    }
}
