//! The comparison harness: every cache measured side by side on the same workload in one
//! run, repetitions interleaved (umm, then each baseline, then umm again ...), medians of
//! 5, ratios against umm. See the crate docs for the method.
//!
//! `cargo run -p umm-benches --release --bin compare [-- --quick] [--out DIR]`
//!
//! With `--out DIR` it also writes `DIR/compare.txt` (the table) and `DIR/compare.svg`
//! (hit latency against the number of cached entries, per cache), which the README shows.

use std::hint::black_box;
use std::time::{Duration, Instant};

use umm_benches::{
    miss_round, rss_bytes, LinearCache, LockedBTreeCache, MappingCheckedNullBackend, Workload,
    HAS_UCX,
};

const REPS: usize = 5;

/// One timed loop: `ops` calls of `f(k)`, ns per call.
fn time(ops: usize, base: usize, f: &mut dyn FnMut(usize)) -> f64 {
    let t = Instant::now();
    for k in 0..ops {
        f(base + k);
    }
    t.elapsed().as_nanos() as f64 / ops as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians of REPS repetitions of each loop, the loops interleaved repetition by
/// repetition (so a slow phase of the machine hits every cache alike), after one untimed
/// warm-up of each. `ops[i]` is loop i's call count.
fn interleaved(ops: &[usize], loops: &mut [&mut dyn FnMut(usize)]) -> Vec<f64> {
    for (f, &n) in loops.iter_mut().zip(ops) {
        time(n, 0, *f);
    }
    let mut samples = vec![Vec::new(); loops.len()];
    for rep in 0..REPS {
        for (i, f) in loops.iter_mut().enumerate() {
            samples[i].push(time(ops[i], (rep + 1) * ops[i], *f));
        }
    }
    samples.into_iter().map(median).collect()
}

/// ns per op per thread of two threads running `f(thread, k)` at once.
fn time2(ops: usize, f: &(dyn Fn(usize, usize) + Sync)) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..2 {
            s.spawn(move || {
                for k in 0..ops {
                    f(th, k);
                }
            });
        }
    });
    t.elapsed().as_nanos() as f64 / ops as f64
}

/// [`interleaved`] for two-thread loops (one untimed warm-up round: the idle vCPU wakes).
fn interleaved2(ops: usize, loops: &[&(dyn Fn(usize, usize) + Sync)]) -> Vec<f64> {
    for f in loops {
        time2(ops, *f);
    }
    let mut samples = vec![Vec::new(); loops.len()];
    for _ in 0..REPS {
        for (i, f) in loops.iter().enumerate() {
            samples[i].push(time2(ops, *f));
        }
    }
    samples.into_iter().map(median).collect()
}

struct Report {
    lines: Vec<String>,
    /// (cache, entries, ns) of the "hit + read" rows, for the plot.
    points: Vec<(&'static str, usize, f64)>,
}

impl Report {
    fn say(&mut self, line: String) {
        println!("{line}");
        self.lines.push(line);
    }

    fn row(&mut self, name: &str, umm: f64, unit: &str, others: &[(&str, Option<f64>)]) {
        let mut line = format!("{name:<40} umm {umm:>9.1} {unit}");
        for (label, v) in others {
            match v {
                Some(v) => line += &format!(" | {label} {v:>9.1} {unit} ({:>5.2}x)", v / umm),
                None => line += &format!(" | {label} n/a"),
            }
        }
        self.say(line);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rss") {
        let n = args
            .get(i + 2)
            .and_then(|v| v.parse().ok())
            .expect("--rss CACHE N");
        return rss_probe(&args[i + 1], n);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    let ops = if quick { 200_000 } else { 2_000_000 };
    let mut r = Report {
        lines: Vec::new(),
        points: Vec::new(),
    };
    r.say(format!(
        "umm comparison harness: random get+put, entries one page long two pages apart, \
         repetitions interleaved, median of {REPS} x {ops} ops; (Nx) = baseline / umm, \
         above 1 means umm is faster"
    ));
    if !HAS_UCX {
        r.say("UCX: not built (libucx-dev missing): its column is n/a".into());
    }
    let sizes: &[usize] = if quick {
        &[1, 1_000, 100_000]
    } else {
        &[1, 1_000, 100_000, 1_000_000]
    };
    for &n in sizes {
        hit_rows(&mut r, n, ops);
    }
    same_buffer(&mut r, ops);
    two_threads(&mut r, ops);
    for &n in &sizes[2..] {
        miss_and_invalidate(&mut r, n, if quick { 2_000 } else { 20_000 });
    }
    for &n in &sizes[2..] {
        memory(&mut r, n);
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir).expect("create the output directory");
        std::fs::write(dir.join("compare.txt"), r.lines.join("\n") + "\n")
            .expect("write the table");
        std::fs::write(dir.join("compare.svg"), plot(&r.points)).expect("write the plot");
        println!(
            "wrote {} and {}",
            dir.join("compare.txt").display(),
            dir.join("compare.svg").display()
        );
    }
}

/// A hit reading the translation (what a user does), and the bare hit (labelled).
fn hit_rows(r: &mut Report, n: usize, ops: usize) {
    let w = Workload::new(n);
    let (m, dev) = w.umm_manager();
    let id = dev.id();
    let ucx = ucx_cache(&w);
    let bt = LockedBTreeCache::new(&w);
    let lin = (n <= 100_000).then(|| LinearCache::new(&w));
    // The linear list is O(n): fewer ops for it so the run stays short.
    let lin_ops = (ops / n.max(1)).clamp(2_000, ops);
    let mut umm_read = |k: usize| {
        let p = m.pin(w.range(w.pick(k)), &[id]).unwrap();
        black_box(*p.translation(dev).unwrap());
    };
    let mut umm_bare = |k: usize| {
        black_box(m.pin(w.range(w.pick(k)), &[id]).unwrap());
    };
    let mut ucx_read = |k: usize| {
        if let Some(c) = &ucx {
            let region = c.get(w.range(w.pick(k))).expect("ucx get");
            black_box(c.key(&region));
            c.put(region);
        }
    };
    let mut btree = |k: usize| {
        let i = bt.get(w.range(w.pick(k))).unwrap();
        bt.put(black_box(i));
    };
    let mut linear = |k: usize| {
        if let Some(lin) = &lin {
            let i = lin.get(w.range(w.pick(k))).unwrap();
            lin.put(black_box(i));
        }
    };
    let t = interleaved(
        &[ops, ops, ops, ops, lin_ops],
        &mut [
            &mut umm_read,
            &mut umm_bare,
            &mut ucx_read,
            &mut btree,
            &mut linear,
        ],
    );
    let ucx_t = ucx.as_ref().map(|_| t[2]);
    r.row(
        &format!("hit + read translation, {n} entries"),
        t[0],
        "ns",
        &[("UCX rcache", ucx_t)],
    );
    r.row(
        &format!("hit, no read (pin + drop), {n} entries"),
        t[1],
        "ns",
        &[
            ("Mutex<BTreeMap>", Some(t[3])),
            ("linear list", lin.as_ref().map(|_| t[4])),
        ],
    );
    r.points.push(("umm", n, t[0]));
    if let Some(u) = ucx_t {
        r.points.push(("UCX rcache", n, u));
    }
    r.points.push(("Mutex<BTreeMap>", n, t[3]));
}

fn same_buffer(r: &mut Report, ops: usize) {
    let w = Workload::new(1_000);
    let (m, dev) = w.umm_manager();
    let ucx = ucx_cache(&w);
    let mut umm = |_: usize| {
        let p = m.pin(w.range(7), &[dev.id()]).unwrap();
        black_box(*p.translation(dev).unwrap());
    };
    let mut ucx_f = |_: usize| {
        if let Some(c) = &ucx {
            let region = c.get(w.range(7)).expect("ucx get");
            black_box(c.key(&region));
            c.put(region);
        }
    };
    let t = interleaved(&[ops, ops], &mut [&mut umm, &mut ucx_f]);
    r.row(
        "hit + read, same buffer repeatedly",
        t[0],
        "ns",
        &[("UCX rcache", ucx.as_ref().map(|_| t[1]))],
    );
}

fn two_threads(r: &mut Report, ops: usize) {
    let w = Workload::new(1_000);
    let (m, dev) = w.umm_manager();
    let ucx = ucx_cache(&w);
    let bt = LockedBTreeCache::new(&w);
    // Parallelism control, measured with every row (interleaved with its loops): the same
    // loop without a cache, 1 thread and 2 threads. If the two threads do not really run
    // at once (a loaded host), the per-op time doubles there too, and the row is suspect.
    let control = |_: usize, k: usize| {
        black_box(w.range(w.pick(black_box(k))));
    };
    let control_one = || {
        median(
            (0..REPS)
                .map(|_| time(ops / 2, 0, &mut |k| control(0, k)))
                .collect(),
        )
    };
    for (label, pattern) in [
        ("each its own buffer", 0),
        ("random buffers", 1),
        ("same buffer", 2),
    ] {
        let w = &w;
        let idx = move |th: usize, k: usize| match pattern {
            0 => 100 + th * 17,
            1 => w.pick(2 * k + th),
            _ => 7,
        };
        let umm = |th: usize, k: usize| {
            let p = m.pin(w.range(idx(th, k)), &[dev.id()]).unwrap();
            black_box(*p.translation(dev).unwrap());
        };
        let ucx_f = |th: usize, k: usize| {
            if let Some(c) = &ucx {
                let region = c.get(w.range(idx(th, k))).expect("ucx get");
                black_box(c.key(&region));
                c.put(region);
            }
        };
        let btree = |th: usize, k: usize| {
            let i = bt.get(w.range(idx(th, k))).unwrap();
            bt.put(black_box(i));
        };
        let t = interleaved2(ops / 2, &[&umm, &ucx_f, &btree, &control]);
        let one = control_one();
        r.row(
            &format!("hit + read, 2 threads, {label}"),
            t[0],
            "ns",
            &[
                ("UCX rcache", ucx.as_ref().map(|_| t[1])),
                ("Mutex<BTreeMap>", Some(t[2])),
            ],
        );
        r.say(format!(
            "{:<40} its parallelism control (no cache): 1 thread {one:.1} ns, 2 threads \
             {:.1} ns per op per thread ({:.2}: near 1 = the two threads ran in parallel)",
            "",
            t[3],
            t[3] / one
        ));
    }
}

/// A miss (register + publish with a no-op registration) and an invalidation of one entry
/// among `n` cached, each timed alone; umm and UCX interleaved in blocks.
fn miss_and_invalidate(r: &mut Report, n: usize, count: usize) {
    let w = Workload::new(n);
    let (m, dev) = w.umm_manager();
    let (checked, checked_dev) = w.umm_manager_with(MappingCheckedNullBackend);
    let ucx = ucx_cache(&w);
    let (mut um, mut ui, mut cm, mut ci) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut checked_miss = Vec::new();
    let block = count / REPS;
    for rep in 0..REPS {
        let ks = rep * block..(rep + 1) * block;
        let round = miss_round(&m, dev.id(), &w, ks.clone());
        um.push(round.miss);
        ui.push(round.invalidate);
        checked_miss.push(miss_round(&checked, checked_dev.id(), &w, ks).miss);
        if let Some(c) = &ucx {
            let (mut miss, mut inval) = (Duration::ZERO, Duration::ZERO);
            for k in rep * block..(rep + 1) * block {
                let range = w.gap(w.pick(k));
                let t = Instant::now();
                let region = c.get(range).expect("ucx miss");
                miss += t.elapsed();
                let t = Instant::now();
                c.invalidate(&region);
                inval += t.elapsed();
                c.put(region);
            }
            cm.push(miss.as_nanos() as f64 / block as f64);
            ci.push(inval.as_nanos() as f64 / block as f64);
        }
    }
    let ucx_of = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
    let ucx_miss = ucx_of(cm);
    r.row(
        &format!("miss (register + publish), {n} entries"),
        median(um),
        "ns",
        &[("UCX rcache", ucx_miss)],
    );
    r.row(
        &format!("miss, device that accepts unmapped memory (umm msyncs first), {n} entries"),
        median(checked_miss),
        "ns",
        &[("UCX rcache", ucx_miss)],
    );
    r.row(
        &format!("invalidate one entry, {n} entries"),
        median(ui),
        "ns",
        &[("UCX rcache", ucx_of(ci))],
    );
}

/// Resident memory per cached entry: RSS growth while `n` entries are cached. Each cache is
/// measured in a fresh process (this program re-run with `--rss CACHE N`): in this one,
/// memory freed by earlier rows would be reused and hide the growth.
fn memory(r: &mut Report, n: usize) {
    let probe = |cache: &str| -> Option<f64> {
        let out = std::process::Command::new(std::env::current_exe().ok()?)
            .args(["--rss", cache, &n.to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    let umm = probe("umm").expect("the umm memory probe ran");
    let ucx = if HAS_UCX { probe("ucx") } else { None };
    r.row(
        &format!("memory per cached entry, {n} entries"),
        umm,
        "B",
        &[("UCX rcache", ucx)],
    );
}

/// The child side of [`memory`]: prints bytes of RSS growth per entry.
fn rss_probe(cache: &str, n: usize) {
    let w = Workload::new(n);
    let before = rss_bytes();
    let per = |after: u64| after.saturating_sub(before) as f64 / n as f64;
    match cache {
        "umm" => {
            let (m, _dev) = w.umm_manager();
            println!("{}", per(rss_bytes()));
            drop(m);
        }
        _ => {
            let c = ucx_cache(&w);
            println!("{}", per(rss_bytes()));
            drop(c);
        }
    }
}

#[cfg(umm_has_ucx)]
fn ucx_cache(w: &Workload) -> Option<umm_benches::UcxCache> {
    umm_benches::UcxCache::new(w)
}

#[cfg(not(umm_has_ucx))]
fn ucx_cache(_: &Workload) -> Option<NoUcx> {
    None
}

/// Stands in for the UCX cache when it was not built (never constructed).
#[cfg(not(umm_has_ucx))]
struct NoUcx;

#[cfg(not(umm_has_ucx))]
impl NoUcx {
    fn get(&self, _: umm::Range) -> Option<()> {
        None
    }
    fn key(&self, _: &()) -> u64 {
        0
    }
    fn put(&self, _: ()) {}
    fn invalidate(&self, _: &()) {}
}

/// An SVG line plot: hit + read latency against cached entries (log scale), per cache.
fn plot(points: &[(&'static str, usize, f64)]) -> String {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 420)).into_drawing_area();
        root.fill(&WHITE).expect("draw");
        let max_ns = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.15;
        let max_n = points.iter().map(|p| p.1).max().unwrap_or(1) as f64 * 2.0;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "hit + read translation: ns per op vs cached entries",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d((0.5f64..max_n).log_scale(), 0f64..max_ns)
            .expect("chart");
        chart
            .configure_mesh()
            .x_desc("cached entries")
            .y_desc("ns per hit")
            .draw()
            .expect("mesh");
        let caches = ["umm", "UCX rcache", "Mutex<BTreeMap>"];
        for (i, cache) in caches.iter().enumerate() {
            let series: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.0 == *cache)
                .map(|p| (p.1 as f64, p.2))
                .collect();
            if series.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
                .expect("series")
                .label(*cache)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(
                    series
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .expect("points");
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .expect("legend");
        root.present().expect("svg");
    }
    svg
}
