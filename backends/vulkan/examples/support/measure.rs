//! Registration cost vs cache-hit cost for any backend, shared by the GPU backends'
//! measurement examples (`umm-vulkan/examples/import_cost.rs`,
//! `umm-cuda/examples/register_cost.rs`). A measurement program, not a test: it asserts
//! nothing about speed and prints a table.

use std::time::{Duration, Instant};

use umm::{Backend, Manager, Range};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Prints one row per size: direct register / deregister (median), a manager miss
/// (median; register plus cache work), a manager hit (pin+drop, median of 7 batches of 100k), and how
/// many times cheaper a hit is than registering and deregistering on every use.
pub fn run<B: Backend>(label: &str, make: impl Fn() -> B, sizes: &[usize]) {
    let direct = make();
    let manager = Manager::default();
    let dev = manager.attach(make()).expect("attach");
    println!("## {label}: {}", direct.name());
    println!();
    println!("| size | register (us) | deregister (us) | manager miss (us) | manager hit (ns) | (reg+dereg)/hit |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &size in sizes {
        // An anonymous private mapping, populated so every page is present.
        let buf = memmap2::MmapOptions::new()
            .len(size)
            .populate()
            .map_anon()
            .expect("anonymous mapping");
        let range = Range::of_slice(&buf[..]).unwrap();
        let reps = if size >= 16 << 20 { 9 } else { 51 };
        let (mut reg, mut dereg, mut miss) = (vec![], vec![], vec![]);
        for _ in 0..reps {
            // Drop the manager's previous registration first: CUDA refuses a second,
            // overlapping one (the direct registration below).
            manager.invalidate(range);
            manager.flush();
            let t0 = Instant::now();
            let t = direct.register(range).expect("register");
            let t1 = Instant::now();
            direct.deregister(range, t).expect("deregister");
            let t2 = Instant::now();
            reg.push(t1 - t0);
            dereg.push(t2 - t1);

            let t0 = Instant::now();
            let pin = manager.pin(range, &[dev.id()]).expect("pin (miss)");
            miss.push(t0.elapsed());
            drop(pin);
        }
        // Hits: 7 batches of 100k pin+drop, median batch (the machine may be shared).
        let batch = 100_000u32;
        let hit = median(
            (0..7)
                .map(|_| {
                    let t0 = Instant::now();
                    for _ in 0..batch {
                        let pin = manager.pin(range, &[dev.id()]).expect("pin (hit)");
                        std::hint::black_box(&pin);
                    }
                    t0.elapsed() / batch
                })
                .collect(),
        );
        let (reg, dereg, miss) = (median(reg), median(dereg), median(miss));
        println!(
            "| {} KiB | {:.2} | {:.2} | {:.2} | {:.1} | {:.0}x |",
            size >> 10,
            us(reg),
            us(dereg),
            us(miss),
            hit.as_secs_f64() * 1e9,
            (reg + dereg).as_secs_f64() / hit.as_secs_f64().max(1e-12),
        );
    }
    let stats = manager.stats();
    let ds = stats.device(dev).unwrap();
    println!();
    println!(
        "manager counters: {} hits, {} misses, {} registrations, {} deregistrations",
        ds.hits, ds.misses, ds.registrations, ds.deregistrations
    );
}
