//! The child side: one cell, the delay measurement, the seed scenario and the stress runs,
//! behind the command line of the scenario binaries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use umm::testing::RecordingBackend;
use umm::{Manager, Range};

use crate::probe::{now_ns, Probe};
use crate::scenario::{anon, Ctx, Scenario, Verdict, SCENARIOS};
use crate::{columns, ColumnSpec, CoverageError};

/// Runs one cell in this process.
pub fn run_cell(spec: &ColumnSpec, scenario: &Scenario) -> Result<Verdict, CoverageError> {
    let probe = Probe::new();
    let mut col = (spec.make)();
    // A raw system call bypasses every hook: that row shows what strict interposition
    // does without the application's `libc_only` declaration (refuses the pin).
    col.libc_only(scenario.id != crate::scenario::RAW_SYSCALL_MUNMAP);
    col.start(probe.clone())?;
    let cx = Ctx {
        col: col.as_ref(),
        probe: &probe,
    };
    (scenario.run)(&cx).map_err(|reason| CoverageError::Setup {
        scenario: scenario.id,
        reason,
    })
}

/// Event delays of `n` munmaps of 64 KiB through one column.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Delays {
    /// Samples.
    pub n: usize,
    /// Median delay from the munmap call to the first report, ns.
    pub p50_delay: u64,
    /// 99th percentile of the same, ns.
    pub p99_delay: u64,
    /// Median munmap duration with the source active, ns.
    pub p50_call: u64,
    /// 99th percentile of the same, ns.
    pub p99_call: u64,
    /// Samples where the source had recorded the event when munmap returned.
    pub by_return: usize,
    /// Samples not reported at all (must be 0).
    pub missed: usize,
}

fn pct(v: &mut [u64], p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(v.len() - 1) * p / 100]
}

impl Delays {
    /// The one-line form (`DELAYS ...`).
    pub fn to_line(&self) -> String {
        format!(
            "DELAYS {} {} {} {} {} {} {}",
            self.n,
            self.p50_delay,
            self.p99_delay,
            self.p50_call,
            self.p99_call,
            self.by_return,
            self.missed
        )
    }

    /// Parses [`Delays::to_line`].
    pub fn parse(line: &str) -> Option<Delays> {
        let v: Vec<u64> = line
            .strip_prefix("DELAYS ")?
            .split(' ')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        (v.len() == 7).then(|| Delays {
            n: v[0] as usize,
            p50_delay: v[1],
            p99_delay: v[2],
            p50_call: v[3],
            p99_call: v[4],
            by_return: v[5] as usize,
            missed: v[6] as usize,
        })
    }
}

/// Measures `n` munmaps of 64 KiB through `spec`'s column.
pub fn measure_delays(spec: &ColumnSpec, n: usize) -> Result<Delays, CoverageError> {
    let probe = Probe::new();
    let mut col = (spec.make)();
    col.start(probe.clone())?;
    let cx = Ctx {
        col: col.as_ref(),
        probe: &probe,
    };
    let len = 16 * umm::page_size();
    let (mut delays, mut calls) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut d = Delays {
        n,
        ..Delays::default()
    };
    for _ in 0..n {
        probe.clear();
        let p = anon(len).map_err(|reason| CoverageError::Setup {
            scenario: "delays",
            reason,
        })?;
        let r = Range::new(p as usize, len).expect("mapped");
        // SAFETY: unmaps our own mapping.
        match cx.measure(r, || unsafe {
            libc::munmap(p, len);
        }) {
            Verdict::Caught {
                delay_ns,
                call_ns,
                by_return,
            } => {
                delays.push(delay_ns);
                calls.push(call_ns);
                d.by_return += usize::from(by_return);
            }
            _ => d.missed += 1,
        }
    }
    d.p50_delay = pct(&mut delays, 50);
    d.p99_delay = pct(&mut delays, 99);
    d.p50_call = pct(&mut calls, 50);
    d.p99_call = pct(&mut calls, 99);
    Ok(d)
}

/// An anonymous mapping of `len` bytes filled with `byte`, at `at` (`MAP_FIXED`) or
/// anywhere.
fn anon_filled(at: *mut libc::c_void, len: usize, byte: u8) -> *mut libc::c_void {
    let fixed = if at.is_null() { 0 } else { libc::MAP_FIXED };
    // SAFETY: a fresh mapping; with MAP_FIXED only at an address we just unmapped.
    let p = unsafe {
        libc::mmap(
            at,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
            -1,
            0,
        )
    };
    if p != libc::MAP_FAILED {
        // SAFETY: our fresh read-write mapping of `len` bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), byte, len) };
    }
    p
}

/// The seed scenario through a manager with the recording backend: map M1 (bytes 1) at B,
/// pin B, unmap, map M2 (bytes 2) at B, pin B again: a miss with a fresh registration,
/// never M1's. Anonymous memory (the seed used files; strict sources refuse file
/// mappings, whose hole punches they cannot see).
pub fn seed(spec: &ColumnSpec) -> Result<String, String> {
    let manager = Arc::new(Manager::default());
    let backend = RecordingBackend::new("recording");
    let ledger = backend.ledger();
    let dev = manager.attach(backend).map_err(|e| e.to_string())?;
    let mut col = (spec.make)();
    col.attach(&manager).map_err(|e| e.to_string())?;
    let len = 16 * umm::page_size();
    let b = anon_filled(std::ptr::null_mut(), len, 1);
    if b == libc::MAP_FAILED {
        return Err("mmap M1 failed".into());
    }
    let range = Range::new(b as usize, len).map_err(|e| e.to_string())?;
    let first = {
        let pin = manager.pin(range, &[dev.id()]).map_err(|e| e.to_string())?;
        pin.translation(dev).ok_or("no translation")?.id
    };
    // SAFETY: unmaps M1; nothing uses it any more.
    unsafe { libc::munmap(b, len) };
    let b2 = anon_filled(b, len, 2);
    if b2 != b {
        return Err(format!(
            "M2 not mapped at B: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: B is M2 now.
    let byte = unsafe { *(b as *const u8) };
    let second = {
        let pin = manager.pin(range, &[dev.id()]).map_err(|e| e.to_string())?;
        pin.translation(dev).ok_or("no translation")?.id
    };
    manager.flush();
    let stats = manager.stats();
    if second == first || stats.misses() != 2 || stats.hits() != 0 || byte != 2 {
        return Err(format!(
            "stale: first registration {first}, second {second}, misses {}, hits {}, byte at B {byte}",
            stats.misses(),
            stats.hits()
        ));
    }
    if ledger.bad_deregistrations() != 0 || ledger.deregistrations() != 1 {
        return Err(format!(
            "ledger: {} deregistrations ({} bad), expected exactly M1's",
            ledger.deregistrations(),
            ledger.bad_deregistrations()
        ));
    }
    // SAFETY: our mapping.
    unsafe { libc::munmap(b, len) };
    Ok(format!("SEED ok first={first} second={second}"))
}

/// Deadlock checks through a manager: a backend whose `register` unmaps and madvises
/// unrelated and overlapping watched memory, then malloc/free storms on two threads during
/// pins of freshly allocated (and freed) buffers. Returns when all of it finished; the
/// parent's watchdog turns a hang into a failure.
pub fn stress(spec: &ColumnSpec) -> Result<String, String> {
    let manager = Arc::new(Manager::default());
    let len = 16 * umm::page_size();
    let victim = anon(len)? as usize;
    let fired = Arc::new(AtomicBool::new(false));
    let hook_fired = fired.clone();
    let backend = RecordingBackend::new("unmapping").with_register_hook(move |range: Range| {
        let page = umm::page_size();
        // SAFETY: an unrelated fresh mapping, unmapped at once.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            libc::munmap(p, page);
        }
        if !hook_fired.swap(true, Ordering::SeqCst) {
            // Once (every time would make each retry fail: the core gives up with a typed
            // error after repeated invalidations of a registration in flight):
            // SAFETY: empties the first page of the range being registered (test memory
            // the test owns; overlapping the registration in flight).
            unsafe { libc::madvise(range.start() as *mut _, page, libc::MADV_DONTNEED) };
            // SAFETY: the victim mapping belongs to the test; it is registered and
            // watched (pinned below before this fires on another range).
            unsafe { libc::munmap(victim as *mut _, len) };
        }
    });
    let ledger = backend.ledger();
    let dev = manager.attach(backend).map_err(|e| e.to_string())?;
    let mut col = (spec.make)();
    col.attach(&manager).map_err(|e| e.to_string())?;

    // 1. register unmaps memory (victim first registered without the hook firing on it).
    fired.store(true, Ordering::SeqCst);
    let vr = Range::new(victim, len).map_err(|e| e.to_string())?;
    drop(manager.pin(vr, &[dev.id()]).map_err(|e| e.to_string())?);
    fired.store(false, Ordering::SeqCst);
    let other = anon(len)?;
    let or = Range::new(other as usize, len).map_err(|e| e.to_string())?;
    drop(manager.pin(or, &[dev.id()]).map_err(|e| e.to_string())?);
    if !fired.load(Ordering::SeqCst) {
        return Err("register hook did not run".into());
    }
    // The victim is gone: pinning it must fail (unmapped) or miss, never hit.
    let hits = manager.stats().hits();
    if let Ok(p) = manager.pin(vr, &[dev.id()]) {
        drop(p);
        if manager.stats().hits() != hits {
            return Err("the unmapped victim was a cache hit".into());
        }
    }

    // 2. malloc/free storms on two threads while this one pins and frees buffers.
    let stop = Arc::new(AtomicBool::new(false));
    let storms: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut held: Vec<Vec<u8>> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let size = 16 + (x % (1 << 20)) as usize;
                    held.push(vec![1u8; size]);
                    if held.len() > 8 {
                        held.swap_remove((x % 8) as usize);
                    }
                }
            })
        })
        .collect();
    let mut x = 12345u64;
    let t0 = now_ns();
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = 4096 + (x % (256 << 10)) as usize;
        let buf = vec![2u8; size];
        let r = Range::of_slice(&buf).map_err(|e| e.to_string())?;
        match manager.pin(r, &[dev.id()]) {
            Ok(p) => drop(p),
            Err(e) => return Err(format!("pin {r} during storms: {e}")),
        }
        drop(buf); // free: glibc may munmap or trim registered memory

        // A fresh mapping (often at the address just unmapped) must never be a hit.
        let m = anon(len)?;
        let mr = Range::new(m as usize, len).map_err(|e| e.to_string())?;
        let hits = manager.stats().hits();
        let pinned = manager
            .pin(mr, &[dev.id()])
            .map_err(|e| format!("pin {mr}: {e}"))?;
        if manager.stats().hits() != hits {
            return Err(format!("stale hit on the fresh mapping {mr}"));
        }
        drop(pinned);
        // SAFETY: our own mapping, no longer pinned.
        unsafe { libc::munmap(m, len) };
    }
    let elapsed = now_ns() - t0;
    stop.store(true, Ordering::Relaxed);
    for s in storms {
        s.join().map_err(|_| "storm thread panicked")?;
    }
    manager.flush();
    manager.evict_unreferenced();
    manager.flush();
    let (reg, dereg, bad) = (
        ledger.registrations(),
        ledger.deregistrations(),
        ledger.bad_deregistrations(),
    );
    if bad != 0 || reg != dereg {
        return Err(format!(
            "ledger after storms: {reg} registrations, {dereg} deregistrations, {bad} bad"
        ));
    }
    Ok(format!(
        "STRESS ok registrations={reg} pins=2000 in {} ms",
        elapsed / 1_000_000
    ))
}

fn spec(id: &str) -> Result<&'static ColumnSpec, String> {
    columns()
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| format!("unknown column {id}"))
}

/// The scenario binaries' command line. Returns the process exit code.
///
/// ```text
/// cell <column> <scenario>   one cell: CELL caught|missed|unwatchable ... / SKIP reason
/// delays <column> <n>        n munmaps of 64 KiB: DELAYS n p50 p99 p50call p99call byreturn missed
/// seed <column>              the seed scenario through a manager: SEED ok ...
/// stress <column>            deadlock checks through a manager: STRESS ok ...
/// table [--guest FILE]       runs every cell in children, prints the markdown matrix
///                            (with FILE, a guest-matrix.sh result, appended)
/// check                      runs every available cell, compares with table::EXPECTED
/// ```
pub fn main_with(args: &[String]) -> i32 {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result: Result<String, String> = match a.as_slice() {
        ["cell", col, scen] => (|| {
            let spec = spec(col)?;
            let scen = SCENARIOS
                .iter()
                .find(|s| s.id == *scen)
                .ok_or_else(|| format!("unknown scenario {scen}"))?;
            match run_cell(spec, scen) {
                Ok(v) => Ok(v.to_line()),
                Err(CoverageError::Unavailable { reason, .. }) => Ok(format!("SKIP {reason}")),
                Err(e) => Err(e.to_string()),
            }
        })(),
        ["delays", col, n] => (|| {
            let n = n.parse().map_err(|_| "bad count")?;
            match measure_delays(spec(col)?, n) {
                Ok(d) => Ok(d.to_line()),
                Err(CoverageError::Unavailable { reason, .. }) => Ok(format!("SKIP {reason}")),
                Err(e) => Err(e.to_string()),
            }
        })(),
        ["seed", col] => spec(col).and_then(seed),
        ["stress", col] => spec(col).and_then(stress),
        ["table"] => crate::table::generate(&crate::harness::Bins::locate(), Duration::from_secs(120)),
        ["table", "--guest", file] => crate::table::generate(&crate::harness::Bins::locate(), Duration::from_secs(120))
            .and_then(|host| {
                let guest = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
                Ok(crate::table::with_guest(host, &guest))
            }),
        ["check"] => match crate::table::check(&crate::harness::Bins::locate(), Duration::from_secs(120)) {
            Ok((wrong, ran)) if wrong.is_empty() => Ok(format!("CHECK ok {ran} cells as expected")),
            Ok((wrong, _)) => Err(format!("coverage regressions:\n{}", wrong.join("\n"))),
            Err(e) => Err(e),
        },
        _ => Err("usage: cell <column> <scenario> | delays <column> <n> | seed <column> | stress <column> | table | check".into()),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
