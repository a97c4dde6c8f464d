//! Several threads pin overlapping ranges on two devices (one refusing overlaps) while
//! another invalidates; checks that no pin ever returns a registration that an already
//! completed invalidation reached, and that every registration is deregistered exactly
//! once at the end. A watchdog fails the test instead of letting it hang.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::Arena;
use parking_lot::RwLock;
use umm::testing::{now, RecordingBackend};
use umm::{Config, Error, Manager, Range};

const PAGES: usize = 256;
const PINNERS: usize = 3;
const PINS_PER_THREAD: usize = 4000;

/// xorshift: deterministic per thread, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn concurrent_pins_and_invalidations_keep_the_invariants() {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        run();
        tx.send(()).unwrap();
    });
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The worker panicked: surface its message.
            worker.join().unwrap();
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("stress test hung for 300 s (deadlock?)"),
    }
}

fn run() {
    let arena = Arena::new(PAGES);
    let (a, b) = (
        RecordingBackend::new("a"),
        RecordingBackend::new("b").refusing_overlap(),
    );
    let ledgers = [a.ledger(), b.ledger()];
    let m = Manager::new(Config {
        max_cached_entries: 32,
        busy_timeout: Duration::from_millis(2),
        ..Config::default()
    });
    let ids = [m.attach(a).unwrap(), m.attach(b).unwrap()];
    // Completed invalidations: (range, clock before the call, clock after it returned).
    let log: RwLock<Vec<(Range, u64, u64)>> = RwLock::new(Vec::new());
    let done = AtomicBool::new(false);
    let (pins, busy, unstable) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        let mut pinners = Vec::new();
        for t in 0..PINNERS {
            let (m, arena, log, ids) = (&m, &arena, &log, &ids);
            let (pins, busy, unstable) = (&pins, &busy, &unstable);
            pinners.push(s.spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
                let mut held = VecDeque::new();
                for _ in 0..PINS_PER_THREAD {
                    let range = arena.pages(rng.below(PAGES - 8), 1 + rng.below(7));
                    let devs = match rng.below(3) {
                        0 => vec![ids[0].id()],
                        1 => vec![ids[1].id()],
                        _ => vec![ids[0].id(), ids[1].id()],
                    };
                    let c0 = now();
                    match m.pin(range, &devs) {
                        Ok(pin) => {
                            pins.fetch_add(1, Ordering::Relaxed);
                            for (i, dev) in ids.iter().enumerate() {
                                let Some(t) = pin.translation(*dev) else { continue };
                                assert!(t.range.contains(&range), "device {i}: {t:?} vs {range}");
                                let log = log.read();
                                let stale = log.iter().find(|(r, start, end)| {
                                    *end < c0 && t.stamp < *start && r.overlaps(&t.range)
                                });
                                assert!(stale.is_none(), "device {i} returned {t:?}, invalidated by {stale:?} before pin at {c0}");
                            }
                            held.push_back(pin);
                            if held.len() > 4 {
                                held.pop_front();
                            }
                        }
                        Err(Error::DeviceRangeBusy { .. }) => {
                            busy.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Error::Unstable { .. }) => {
                            unstable.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("pin failed: {e}"),
                    }
                }
            }));
        }
        let (m, arena, log, done) = (&m, &arena, &log, &done);
        let inv = s.spawn(move || {
            let mut rng = Rng(42);
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                let r = arena.pages(rng.below(PAGES - 4), 1 + rng.below(3));
                let start = now();
                if rng.below(4) == 0 {
                    m.invalidate_deferred(r);
                } else {
                    m.invalidate(r);
                }
                let end = now();
                log.write().push((r, start, end));
                n += 1;
                if n.is_multiple_of(16) {
                    m.flush();
                }
                std::thread::yield_now();
            }
            n
        });
        let failed = pinners.into_iter().map(|h| h.join()).find(|r| r.is_err());
        done.store(true, Ordering::Relaxed);
        if let Some(Err(panic)) = failed {
            std::panic::resume_unwind(panic);
        }
        let invalidations = inv.join().unwrap();
        assert!(invalidations > 0);
    });
    m.flush();
    let stats = m.stats();
    for (d, l) in ledgers.iter().enumerate() {
        assert_eq!(stats.devices[d].registered_bytes, l.live_bytes());
        assert_eq!(stats.devices[d].registered_entries as usize, l.live().len());
    }
    assert!(stats.hits() > 0 && stats.misses() > 0);
    drop(m);
    for l in &ledgers {
        assert_eq!(l.bad_deregistrations(), 0);
        assert_eq!(l.registrations(), l.deregistrations());
        assert!(l.live().is_empty());
    }
    eprintln!(
        "stress: {} pins ({} busy, {} unstable), hits {}, misses {}, invalidations {}",
        pins.load(Ordering::Relaxed),
        busy.load(Ordering::Relaxed),
        unstable.load(Ordering::Relaxed),
        stats.hits(),
        stats.misses(),
        log.read().len()
    );
}

/// A held pin stays valid while another thread sweeps the cache with evictions (which probe
/// every entry, the held one included): eviction never invalidates what a pin holds.
#[test]
fn eviction_sweeps_never_make_a_held_pin_invalid() {
    // The holder checks while the sweeper works, until the sweeper has evicted SWEEPS
    // times (waiting for that, not for a number of checks: at release speed 200,000
    // checks used to finish before the sweeper's first eviction).
    const SWEEPS: u64 = 2_000;
    let arena = Arena::new(64);
    let m = Manager::default();
    let d = m.attach(RecordingBackend::new("d")).unwrap();
    let held = m.pin(arena.pages(0, 2), &[d.id()]).unwrap();
    let evicted = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut k = 0;
            while !done.load(Ordering::Relaxed) {
                drop(m.pin(arena.pages(4 + k % 32, 1), &[d.id()]).unwrap());
                evicted.fetch_add(m.evict_unreferenced() as u64, Ordering::Relaxed);
                k += 1;
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut checks = 0u64;
        let mut always_valid = true;
        while evicted.load(Ordering::Relaxed) < SWEEPS && std::time::Instant::now() < deadline {
            always_valid &= held.is_valid();
            checks += 1;
        }
        // Stop the sweeper before asserting, so a failure fails instead of hanging.
        done.store(true, Ordering::Relaxed);
        assert!(always_valid, "an eviction sweep made a held pin invalid");
        assert!(
            evicted.load(Ordering::Relaxed) >= SWEEPS,
            "the sweeper evicted only {} times in 120 s ({checks} checks)",
            evicted.load(Ordering::Relaxed)
        );
    });
}
