//! The comparison harness: one run, every cache measured side by side on the same
//! workload, medians of 5 repetitions, ratios against umm. See the crate docs for the
//! method.
//!
//! `cargo run -p umm-benches --release --bin compare [-- --quick]`

use std::hint::black_box;
use std::time::{Duration, Instant};

use umm_benches::{LinearCache, LockedBTreeCache, Workload, HAS_UCX};

const REPS: usize = 5;

/// Median ns per op of `ops` calls of `f`, over REPS repetitions after one untimed
/// warm-up repetition.
fn measure(ops: usize, mut f: impl FnMut(usize)) -> f64 {
    (0..ops).for_each(&mut f);
    let mut v: Vec<f64> = (0..REPS)
        .map(|rep| {
            let t = Instant::now();
            for k in 0..ops {
                f(rep * ops + k);
            }
            t.elapsed().as_nanos() as f64 / ops as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[REPS / 2]
}

/// Median ns per op per thread with two threads running `f(thread, k)` concurrently, over
/// REPS repetitions after one untimed warm-up repetition (the first run of a second
/// thread measured ~40% slower here: the idle vCPU waking up).
fn measure2(ops: usize, f: impl Fn(usize, usize) + Sync) -> f64 {
    let mut v: Vec<f64> = (0..=REPS)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for th in 0..2 {
                    let f = &f;
                    s.spawn(move || {
                        for k in 0..ops {
                            f(th, k);
                        }
                    });
                }
            });
            t.elapsed().as_nanos() as f64 / ops as f64
        })
        .skip(1)
        .collect();
    v.sort_by(f64::total_cmp);
    v[REPS / 2]
}

fn row(name: &str, umm: f64, others: &[(&str, Option<f64>)]) {
    let mut line = format!("{name:<34} umm {umm:>8.1} ns");
    for (label, v) in others {
        match v {
            Some(v) => line += &format!(" | {label} {v:>9.1} ns ({:>6.1}x)", v / umm),
            None => line += &format!(" | {label} n/a"),
        }
    }
    println!("{line}");
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let ops = if quick { 200_000 } else { 2_000_000 };
    println!(
        "umm comparison harness: random get+put, entries one page long two pages apart, \
         median of {REPS} x {ops} ops; (Nx) = baseline / umm"
    );
    if !HAS_UCX {
        println!("UCX: not built (libucx-dev missing): its column is n/a");
    }
    for n in [1usize, 1_000, 100_000] {
        let w = Workload::new(n);
        let (m, dev) = w.umm_manager();
        let umm = measure(ops, |k| {
            black_box(m.pin(w.range(w.pick(k)), &[dev]).unwrap());
        });
        let lin = LinearCache::new(&w);
        // The linear list is O(n): fewer ops at 10^5 so the run stays short.
        let lin_ops = (ops / n.max(1)).clamp(2_000, ops);
        let linear = measure(lin_ops, |k| {
            let i = lin.get(w.range(w.pick(k))).unwrap();
            lin.put(black_box(i));
        });
        let bt = LockedBTreeCache::new(&w);
        let btree = measure(ops, |k| {
            let i = bt.get(w.range(w.pick(k))).unwrap();
            bt.put(black_box(i));
        });
        row(
            &format!("hit, {n} entries"),
            umm,
            &[
                ("linear list", Some(linear)),
                ("Mutex<BTreeMap>", Some(btree)),
                ("UCX rcache", ucx_hit(&w, ops)),
            ],
        );
    }
    let w = Workload::new(1_000);
    let (m, dev) = w.umm_manager();
    let same = measure(ops, |_| {
        black_box(m.pin(w.range(7), &[dev]).unwrap());
    });
    println!("{:<34} umm {same:>8.1} ns", "hit, same buffer repeatedly");
    for (label, pattern) in [
        ("2 threads, each its own buffer", 0),
        ("2 threads, random buffers", 1),
        ("2 threads, same buffer", 2),
    ] {
        let idx = |th: usize, k: usize| match pattern {
            0 => 100 + th * 17,
            1 => w.pick(2 * k + th),
            _ => 7,
        };
        let umm = measure2(ops / 2, |th, k| {
            black_box(m.pin(w.range(idx(th, k)), &[dev]).unwrap());
        });
        let bt = LockedBTreeCache::new(&w);
        let btree = measure2(ops / 2, |th, k| {
            let i = bt.get(w.range(idx(th, k))).unwrap();
            bt.put(black_box(i));
        });
        row(
            &format!("hit, {label}"),
            umm,
            &[
                ("Mutex<BTreeMap>", Some(btree)),
                ("UCX rcache", ucx_hit2(&w, ops / 2, &idx)),
            ],
        );
    }
    // Miss and invalidation at 10^5 entries: only the timed call is counted.
    let w = Workload::new(100_000);
    let (m, dev) = w.umm_manager();
    let n = if quick { 2_000 } else { 20_000 };
    let (mut miss, mut inval, mut reap) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for k in 0..n {
        let r = w.gap(w.pick(k));
        let t = Instant::now();
        let p = m.pin(r, &[dev]).unwrap();
        miss += t.elapsed();
        drop(p);
        let t = Instant::now();
        m.invalidate(r);
        inval += t.elapsed();
        let t = Instant::now();
        m.flush();
        reap += t.elapsed();
    }
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    println!(
        "{:<34} miss (register+publish) {:.0} ns, invalidate {:.0} ns, flush (deregister) {:.0} ns",
        "100000 entries",
        per(miss),
        per(inval),
        per(reap)
    );
}

#[cfg(umm_has_ucx)]
fn ucx_hit(w: &Workload, ops: usize) -> Option<f64> {
    let c = umm_benches::UcxCache::new(w)?;
    Some(measure(ops, |k| {
        let r = c.get(w.range(w.pick(k))).expect("ucx get");
        c.put(black_box(r));
    }))
}

#[cfg(umm_has_ucx)]
fn ucx_hit2(w: &Workload, ops: usize, idx: &(dyn Fn(usize, usize) -> usize + Sync)) -> Option<f64> {
    let c = umm_benches::UcxCache::new(w)?;
    Some(measure2(ops, |th, k| {
        let r = c.get(w.range(idx(th, k))).expect("ucx get");
        c.put(black_box(r));
    }))
}

#[cfg(not(umm_has_ucx))]
fn ucx_hit(_: &Workload, _: usize) -> Option<f64> {
    None
}

#[cfg(not(umm_has_ucx))]
fn ucx_hit2(_: &Workload, _: usize, _: &(dyn Fn(usize, usize) -> usize + Sync)) -> Option<f64> {
    None
}
