//! Measures the costs issue 10 named (release build): misses over many pinned entries,
//! index memory after address-space churn, and bulk work next to hits.
//!
//! `cargo run -p umm --release --example edge_costs`

use std::time::Instant;

use umm::testing::RecordingBackend;
use umm::{Config, Manager, Range};

const PAGE: usize = 4096;

fn fake(base: usize, i: usize) -> Range {
    Range::new(base + 2 * i * PAGE, PAGE).unwrap()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4
}

fn main() {
    let unchecked = Config {
        check_mapped: false,
        ..Config::default()
    };
    // Item 6: misses with the limit at 100 and N entries pinned.
    for pinned in [1_000usize, 10_000, 100_000] {
        let m = Manager::new(Config {
            max_cached_entries: 100,
            ..unchecked.clone()
        });
        let d = m.attach(RecordingBackend::new("d")).unwrap();
        let t = Instant::now();
        let held: Vec<_> = (0..pinned)
            .map(|i| m.pin(fake(0x7000_0000_0000, i), &[d.id()]).unwrap())
            .collect();
        let setup = t.elapsed();
        let n = 1000;
        let t = Instant::now();
        for i in 0..n {
            drop(m.pin(fake(0x7100_0000_0000, i), &[d.id()]).unwrap());
        }
        let per = t.elapsed() / n as u32;
        println!("item 6: limit 100, {pinned} pinned: setup {setup:?}, miss {per:?}");
        drop(held);
    }
    // Item 12: 10^5 map/pin/unmap cycles at fresh addresses 2 MiB apart.
    {
        let m = Manager::new(unchecked.clone());
        let d = m.attach(RecordingBackend::new("d")).unwrap();
        let before = rss_kib();
        for i in 0..100_000usize {
            let r = Range::new(0x7200_0000_0000 + i * (2 << 20), PAGE).unwrap();
            drop(m.pin(r, &[d.id()]).unwrap());
            m.invalidate(r);
        }
        m.flush();
        println!(
            "item 12: 10^5 churn cycles: RSS +{} KiB",
            rss_kib().saturating_sub(before)
        );
    }
    // Item 13: invalidate_all and stats() at 10^6 entries, and a hit on another device's
    // ... same device right after (it waits for the lock holder if the bulk work is inline).
    {
        let m = Manager::new(Config {
            max_cached_entries: 2 << 20,
            ..unchecked.clone()
        });
        let d = m.attach(RecordingBackend::new("d")).unwrap();
        for i in 0..1_000_000usize {
            drop(m.pin(fake(0x7300_0000_0000, i), &[d.id()]).unwrap());
        }
        let t = Instant::now();
        let s = m.stats();
        println!(
            "item 13: stats() at 10^6 entries: {:?} ({} cached)",
            t.elapsed(),
            s.devices[0].cached_entries
        );
        let t = Instant::now();
        m.invalidate_all();
        let inv = t.elapsed();
        let t = Instant::now();
        drop(m.pin(fake(0x7400_0000_0000, 0), &[d.id()]).unwrap());
        let next = t.elapsed();
        let t = Instant::now();
        m.flush();
        println!(
            "item 13: invalidate_all at 10^6: {inv:?}; the next pin: {next:?}; flush (deregisters 10^6): {:?}",
            t.elapsed()
        );
    }
}
