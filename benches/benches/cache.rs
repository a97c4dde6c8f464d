//! Criterion benchmarks: hit (pin + drop) at 1 / 10^3 / 10^5 cached entries against the
//! seed's linear list and a `Mutex<BTreeMap>`; two threads on distinct and on the same
//! buffer; a miss (register + publish) and an invalidation at 10^5 entries.
//! `cargo run -p umm-benches --release --bin compare` prints the same numbers side by
//! side with UCX's `ucs_rcache` and the ratios.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use umm_benches::{LinearCache, LockedBTreeCache, Workload};

const SIZES: [usize; 3] = [1, 1_000, 100_000];

fn hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit");
    for n in SIZES {
        let w = Workload::new(n);
        let (m, dev) = w.umm_manager();
        let mut k = 0;
        // What a user does: pin, read the translation, drop.
        g.bench_with_input(BenchmarkId::new("umm", n), &n, |b, _| {
            b.iter(|| {
                k += 1;
                let p = m.pin(w.range(w.pick(k)), &[dev.id()]).unwrap();
                black_box(*p.translation(dev).unwrap());
            })
        });
        let lin = LinearCache::new(&w);
        g.bench_with_input(BenchmarkId::new("linear-list", n), &n, |b, _| {
            b.iter(|| {
                k += 1;
                let i = lin.get(w.range(w.pick(k))).unwrap();
                lin.put(black_box(i));
            })
        });
        let bt = LockedBTreeCache::new(&w);
        g.bench_with_input(BenchmarkId::new("mutex-btreemap", n), &n, |b, _| {
            b.iter(|| {
                k += 1;
                let i = bt.get(w.range(w.pick(k))).unwrap();
                bt.put(black_box(i));
            })
        });
    }
    g.finish();
}

fn two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit-2-threads");
    let w = Workload::new(1_000);
    let (m, dev) = w.umm_manager();
    for same in [false, true] {
        let name = if same {
            "same-buffer"
        } else {
            "distinct-buffers"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..2 {
                        let (m, w) = (&m, &w);
                        s.spawn(move || {
                            for k in 0..iters as usize {
                                let i = if same { 7 } else { w.pick(k * 2 + t) };
                                black_box(m.pin(w.range(i), &[dev.id()]).unwrap());
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

fn miss_and_invalidate(c: &mut Criterion) {
    let mut g = c.benchmark_group("at-100000-entries");
    let w = Workload::new(100_000);
    let (m, dev) = w.umm_manager();
    // Miss: register a page in a gap, then invalidate it (outside the timing) so the next
    // iteration misses again; and the converse for the invalidation.
    g.bench_function("miss", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for k in 0..iters as usize {
                let r = w.gap(w.pick(k));
                let t = Instant::now();
                black_box(m.pin(r, &[dev.id()]).unwrap());
                total += t.elapsed();
                m.invalidate(r);
                m.flush();
            }
            total
        })
    });
    g.bench_function("invalidate", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for k in 0..iters as usize {
                let r = w.gap(w.pick(k));
                drop(m.pin(r, &[dev.id()]).unwrap());
                let t = Instant::now();
                m.invalidate(r);
                total += t.elapsed();
                m.flush();
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = hit, two_threads, miss_and_invalidate
}
criterion_main!(benches);
