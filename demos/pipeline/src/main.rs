//! # The GPU -> NIC pipeline demo
//!
//! A producer process with worker threads takes host buffers from a pool (most reused, some
//! freshly mmap'd, some unmapped and remapped at the same address, some malloc'd and freed;
//! 4 KiB to 8 MiB). For each buffer it calls **one** `Manager::pin(range, &[gpu, nic])`; a
//! Vulkan compute kernel writes a tagged pattern (word `i` = `pattern_word(seq, i)`: the
//! sequence number and the offset) through the GPU's import, and the RDMA backend
//! RDMA-WRITEs the buffer through the NIC's MR, rxe1 -> rxe0, into a consumer process that
//! verifies every byte and the sequence number.
//!
//! Three modes, side by side in the final table:
//! * `umm`: the cache with a notifier source (`umm-auto`: kernel module, else userfaultfd,
//!   else interposition; `--source` or `UMM_SOURCE`);
//! * `no-cache`: register every time (`Config { cache: false, .. }`);
//! * `no-invalidation`: the cache without a source (unsafe on purpose): a buffer remapped
//!   at the same address hits a stale MR, and the consumer sees the old bytes.
//!
//! `pipeline [--mode umm|no-cache|no-invalidation|all] [--buffers N] [--workers W]
//! [--source kmod|uffd|interpose|auto] [--short]`. Exit status 1 on any mismatch in umm mode.
//! `RUST_LOG=umm=debug` shows every invalidation and deregistration.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use umm::{Config, Manager, Range};
use umm_auto::{Preference, SourceKind};
use umm_rdma::transport::{Endpoint, Local, RcQp, Remote};
use umm_rdma::{Access, DeviceSelector, RdmaBackend, RdmaDevice};
use umm_vulkan::{pattern_word, VulkanBackend};

// The interposition source needs hooks in the binary (pass-through without a sink).
umm_interpose::export_hooks!();

const MAX_SIZE: usize = 8 << 20;
const PAGE: usize = 4096;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Umm,
    NoCache,
    NoInvalidation,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Umm => "umm",
            Mode::NoCache => "no-cache",
            Mode::NoInvalidation => "no-invalidation",
        }
    }
}

struct Args {
    modes: Vec<Mode>,
    buffers: u64,
    workers: usize,
    source: Preference,
    plain: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        modes: vec![Mode::Umm, Mode::NoCache, Mode::NoInvalidation],
        buffers: 400,
        workers: 2,
        source: Preference::from_env().map_err(|e| e.to_string())?,
        plain: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--mode" => {
                a.modes = match val()?.as_str() {
                    "all" => a.modes.clone(),
                    "umm" => vec![Mode::Umm],
                    "no-cache" => vec![Mode::NoCache],
                    "no-invalidation" => vec![Mode::NoInvalidation],
                    m => return Err(format!("unknown mode {m}")),
                }
            }
            "--no-invalidation" => a.modes = vec![Mode::NoInvalidation],
            "--buffers" => a.buffers = val()?.parse().map_err(|e| format!("--buffers: {e}"))?,
            "--workers" => a.workers = val()?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--source" => {
                a.source = val()?
                    .parse()
                    .map_err(|e: umm_auto::AutoError| e.to_string())?
            }
            "--short" => a.buffers = 48,
            "--plain" => a.plain = true,
            "-h" | "--help" => {
                println!("usage: pipeline [--mode umm|no-cache|no-invalidation|all] [--no-invalidation] [--buffers N] [--workers W] [--source auto|kmod|uffd|interpose] [--short] [--plain]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if std::env::args().nth(1).as_deref() == Some("--consumer") {
        let w: usize = std::env::args()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        return match consumer(w) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("consumer: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pipeline: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = warm_up() {
        eprintln!("pipeline: the Vulkan device does not work: {e}");
        return ExitCode::FAILURE;
    }
    let mut results = Vec::new();
    for &mode in &args.modes {
        match run_mode(mode, &args) {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("pipeline: {} mode failed: {e}", mode.name());
                return ExitCode::FAILURE;
            }
        }
    }
    print_table(&results);
    let umm_bad = results
        .iter()
        .any(|r| r.mode == Mode::Umm && (r.mismatches > 0 || r.pin_errors > 0));
    if umm_bad {
        println!("FAIL: mismatches or failed pins in umm mode");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs the fill kernel once outside any measurement: the first kernel of a process pays
/// for the device's shader compilation (seconds under TCG), which would otherwise be
/// charged to whichever mode runs first.
fn warm_up() -> Result<(), Error> {
    let vk = VulkanBackend::new(umm_vulkan::DeviceSelector::First)?;
    let map = Mapping::new(PAGE)?;
    let import = vk.import(map.range())?;
    // SAFETY: the page is mapped and no Rust reference to it is alive during the call.
    let filled = unsafe { vk.fill_pattern(&import, 0, PAGE as u64, 1) };
    vk.release(import)?;
    filled?;
    Ok(())
}

// ---- the consumer process --------------------------------------------------------------------

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<[u8; Endpoint::WIRE_SIZE], Error> {
    let mut out = [0u8; Endpoint::WIRE_SIZE];
    if s.len() != 2 * out.len() {
        return Err(format!("bad endpoint {s:?}").into());
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

/// rxe0: one slot of MAX_SIZE per worker, one QP per worker; verifies on request.
fn consumer(workers: usize) -> Result<(), Error> {
    let dev = RdmaDevice::open(&DeviceSelector::Name("rxe0".into()))?;
    let m = Manager::default();
    let nic = m.attach(RdmaBackend::new(dev.clone(), Access::REMOTE_RW))?;
    let region = Mapping::new(workers * MAX_SIZE)?;
    let pin = m.pin(region.range(), &[nic.id()])?;
    let mr = pin.translation(nic).ok_or("no MR")?;
    let mut qps = (0..workers)
        .map(|_| RcQp::new(&dev, 1, 1))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "HELLO {} {} {}",
        mr.rkey, region.ptr as usize, MAX_SIZE
    )?;
    for qp in &qps {
        writeln!(out, "EP {}", hex(&qp.endpoint()?.to_bytes()))?;
    }
    out.flush()?;
    let mut lines = std::io::stdin().lock().lines();
    for qp in &mut qps {
        let l = lines.next().ok_or("producer closed")??;
        let ep = Endpoint::from_bytes(&unhex(l.strip_prefix("EP ").ok_or("expected EP")?)?);
        qp.connect(&ep)?;
    }
    writeln!(out, "READY")?;
    out.flush()?;
    let (mut verified, mut mismatches) = (0u64, 0u64);
    for l in lines {
        let l = l?;
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["CHECK", w, seq, len] => {
                let (w, seq, len): (usize, u32, usize) = (w.parse()?, seq.parse()?, len.parse()?);
                // SAFETY: slot w lies inside our mapping; the producer writes it only before
                // this CHECK and waits for the ACK before writing it again.
                let slot = unsafe {
                    std::slice::from_raw_parts_mut(
                        region.ptr.add(w * MAX_SIZE) as *mut u32,
                        len / 4,
                    )
                };
                let bad = slot
                    .iter()
                    .enumerate()
                    .filter(|&(i, &v)| v != pattern_word(seq, i as u32))
                    .count() as u64;
                // Word 0 is the sequence number itself (pattern_word(seq, 0) == seq).
                let got_seq = slot.first().copied().unwrap_or(0);
                slot.fill(0);
                verified += len as u64 - 4 * bad;
                if bad > 0 {
                    mismatches += 1;
                }
                writeln!(out, "ACK {w} {seq} {bad} {got_seq}")?;
                out.flush()?;
            }
            ["END"] => {
                writeln!(out, "BYE {verified} {mismatches}")?;
                out.flush()?;
                break;
            }
            _ => return Err(format!("bad request {l:?}").into()),
        }
    }
    drop(pin);
    Ok(())
}

// ---- memory ----------------------------------------------------------------------------------

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain anonymous mapping; threads synchronise through the pipeline's messages.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(len: usize) -> Result<Mapping, Error> {
        Self::at(std::ptr::null_mut(), len, 0)
    }

    fn at(addr: *mut u8, len: usize, extra: i32) -> Result<Mapping, Error> {
        // SAFETY: anonymous mapping; with MAP_FIXED_NOREPLACE the kernel refuses to clobber.
        let p = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    fn range(&self) -> Range {
        Range::new(self.ptr as usize, self.len).expect("non-empty mapping")
    }

    /// munmap, then mmap again at the same address (elsewhere if another thread took it).
    fn remap(&mut self) -> Result<bool, Error> {
        let addr = self.ptr;
        // SAFETY: our own mapping; no reference to its bytes is alive.
        unsafe { libc::munmap(addr.cast(), self.len) };
        match Mapping::at(addr, self.len, libc::MAP_FIXED_NOREPLACE) {
            Ok(m) if m.ptr == addr => {
                std::mem::forget(m);
                Ok(true)
            }
            Ok(m) => {
                // Old kernels treat NOREPLACE as a hint.
                self.ptr = m.ptr;
                std::mem::forget(m);
                Ok(false)
            }
            Err(_) => {
                let m = Mapping::new(self.len)?;
                self.ptr = m.ptr;
                std::mem::forget(m);
                Ok(false)
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A malloc'd (aligned_alloc) buffer, freed on drop.
struct Malloced {
    ptr: *mut u8,
    len: usize,
}

impl Malloced {
    fn new(len: usize) -> Result<Malloced, Error> {
        // SAFETY: aligned_alloc with a power-of-two alignment and a multiple of it.
        let p = unsafe { libc::aligned_alloc(PAGE, len) };
        if p.is_null() {
            return Err("aligned_alloc failed".into());
        }
        Ok(Malloced { ptr: p.cast(), len })
    }
}

impl Drop for Malloced {
    fn drop(&mut self) {
        // SAFETY: allocated by aligned_alloc above.
        unsafe { libc::free(self.ptr.cast()) };
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn size(&mut self) -> usize {
        // 4 KiB .. 8 MiB, skewed to small sizes (each doubling half as likely).
        let mut shift = 0;
        while shift < 11 && !self.next().is_multiple_of(3) {
            shift += 1;
        }
        PAGE << shift
    }
}

// ---- the producer ----------------------------------------------------------------------------

#[derive(Default)]
struct Counts {
    buffers: AtomicU64,
    bytes: AtomicU64,
    reused: AtomicU64,
    fresh: AtomicU64,
    remapped: AtomicU64,
    malloced: AtomicU64,
    bad_buffers: AtomicU64,
    pin_errors: AtomicU64,
}

struct ModeResult {
    mode: Mode,
    source: String,
    buffers: u64,
    bytes: u64,
    secs: f64,
    kinds: [u64; 4],
    stats: umm::Stats,
    gpu: umm::DeviceId,
    nic: umm::DeviceId,
    verified: u64,
    mismatches: u64,
    pin_errors: u64,
}

struct Link {
    stdin: Mutex<ChildStdin>,
    acks: Vec<Mutex<mpsc::Receiver<(u32, u64, u32)>>>,
}

/// The consumer process, its control link, its slots' rkey and base address, its QPs'
/// endpoints, and the lines that are not ACKs.
type Spawned = (
    Child,
    Link,
    u32,
    usize,
    Vec<Endpoint>,
    mpsc::Receiver<String>,
);

fn spawn_consumer(workers: usize) -> Result<Spawned, Error> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--consumer", &workers.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let hello = lines
        .next()
        .ok_or("consumer exited before HELLO (is rxe0 set up?)")??;
    let f: Vec<&str> = hello.split_whitespace().collect();
    let ["HELLO", rkey, base, _] = f.as_slice() else {
        return Err(format!("bad hello {hello:?}").into());
    };
    let (rkey, base): (u32, usize) = (rkey.parse()?, base.parse()?);
    let mut eps = Vec::new();
    for _ in 0..workers {
        let l = lines.next().ok_or("consumer closed")??;
        eps.push(Endpoint::from_bytes(&unhex(
            l.strip_prefix("EP ").ok_or("expected EP")?,
        )?));
    }
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..workers {
        let (t, r) = mpsc::channel();
        txs.push(t);
        rxs.push(Mutex::new(r));
    }
    let (other_tx, other_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if let ["ACK", w, seq, bad, got] = f.as_slice() {
                let w: usize = w.parse().unwrap_or(0);
                let v = (
                    seq.parse().unwrap_or(0),
                    bad.parse().unwrap_or(0),
                    got.parse().unwrap_or(0),
                );
                let _ = txs[w].send(v);
            } else if other_tx.send(l).is_err() {
                break;
            }
        }
    });
    Ok((
        child,
        Link {
            stdin: Mutex::new(stdin),
            acks: rxs,
        },
        rkey,
        base,
        eps,
        other_rx,
    ))
}

fn run_mode(mode: Mode, args: &Args) -> Result<ModeResult, Error> {
    let config = Config {
        cache: mode != Mode::NoCache,
        ..Config::default()
    };
    let m = Arc::new(Manager::new(config));
    let pref = if mode == Mode::NoInvalidation {
        Preference::None
    } else {
        args.source
    };
    let choice = umm_auto::add_source_with(&m, pref)?;
    let source = choice
        .picked
        .map_or("none".to_string(), |k: SourceKind| k.name().to_string());
    tracing::info!(mode = mode.name(), %source, "mode starts");
    let gpu = m.attach(VulkanBackend::new(umm_vulkan::DeviceSelector::First)?)?;
    let dev = RdmaDevice::open(&DeviceSelector::Name("rxe1".into()))?;
    let nic = m.attach(RdmaBackend::new(dev.clone(), Access::LOCAL_READ))?;

    let workers = args.workers.max(1);
    let (mut child, link, rkey, base, eps, other) = spawn_consumer(workers)?;
    let mut qps = Vec::new();
    {
        let mut stdin = link.stdin.lock().unwrap();
        for ep in &eps {
            let mut qp = RcQp::new(&dev, 1, 1)?;
            writeln!(stdin, "EP {}", hex(&qp.endpoint()?.to_bytes()))?;
            qp.connect(ep)?;
            qps.push(qp);
        }
        stdin.flush()?;
    }
    let ready = other.recv().map_err(|_| "consumer exited before READY")?;
    if ready != "READY" {
        return Err(format!("expected READY, got {ready:?}").into());
    }

    let counts = Counts::default();
    let next_seq = AtomicU64::new(1);
    let bar = progress(args.buffers, mode, args.plain);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<(), Error> {
        let handles: Vec<_> = qps
            .into_iter()
            .enumerate()
            .map(|(w, mut qp)| {
                let (m, counts, next_seq, link, bar) = (&m, &counts, &next_seq, &link, &bar);
                s.spawn(move || -> Result<(), Error> {
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((w as u64 + 1) * 0x1234_5678_9abc));
                    let mut pool: Vec<Mapping> = (0..6)
                        .map(|_| Mapping::new(rng.size()))
                        .collect::<Result<_, _>>()?;
                    let remote = Remote {
                        addr: (base + w * MAX_SIZE) as u64,
                        rkey,
                    };
                    loop {
                        let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                        if seq > args.buffers {
                            return Ok(());
                        }
                        let roll = rng.next() % 10;
                        let mut fresh = None;
                        let mut malloced = None;
                        let (ptr, len) = match roll {
                            0 => {
                                let mp = Mapping::new(rng.size())?;
                                counts.fresh.fetch_add(1, Ordering::Relaxed);
                                let v = (mp.ptr, mp.len);
                                fresh = Some(mp);
                                v
                            }
                            1 => {
                                let b = Malloced::new(rng.size())?;
                                counts.malloced.fetch_add(1, Ordering::Relaxed);
                                let v = (b.ptr, b.len);
                                malloced = Some(b);
                                v
                            }
                            2 => {
                                let i = (rng.next() % pool.len() as u64) as usize;
                                let same = pool[i].remap()?;
                                tracing::debug!(seq, addr = ?pool[i].ptr, same, "buffer remapped");
                                counts.remapped.fetch_add(1, Ordering::Relaxed);
                                (pool[i].ptr, pool[i].len)
                            }
                            _ => {
                                let i = (rng.next() % pool.len() as u64) as usize;
                                counts.reused.fetch_add(1, Ordering::Relaxed);
                                (pool[i].ptr, pool[i].len)
                            }
                        };
                        let range = Range::new(ptr as usize, len)?;
                        {
                            let pin = match m.pin(range, &[gpu.id(), nic.id()]) {
                                Ok(p) => p,
                                Err(e) => {
                                    // Counted, not fatal: without invalidation a stale entry can
                                    // make a registration fail; umm mode must have none.
                                    tracing::warn!(seq, len, error = %e, "pin failed");
                                    counts.pin_errors.fetch_add(1, Ordering::Relaxed);
                                    bar.inc(1);
                                    continue;
                                }
                            };
                            let import = pin.translation(gpu).ok_or("no GPU translation")?;
                            let off = pin.offset(gpu).ok_or("no GPU offset")? as u64;
                            // SAFETY: the buffer is mapped and no Rust reference to it is
                            // alive while the kernel writes.
                            unsafe {
                                m.backend(gpu)?
                                    .fill_pattern(import, off, len as u64, seq as u32)
                            }?;
                            let mr = pin.translation(nic).ok_or("no NIC translation")?;
                            qp.write(Local::new(mr, ptr as usize, len as u32), remote)?;
                        }
                        {
                            let mut stdin = link.stdin.lock().unwrap();
                            writeln!(stdin, "CHECK {w} {seq} {len}")?;
                            stdin.flush()?;
                        }
                        let (aseq, bad, got) = link.acks[w]
                            .lock()
                            .unwrap()
                            .recv()
                            .map_err(|_| "the consumer exited")?;
                        debug_assert_eq!(aseq, seq as u32);
                        if bad > 0 {
                            counts.bad_buffers.fetch_add(1, Ordering::Relaxed);
                            let kind = ["fresh mmap", "malloc", "remapped"]
                                .get(roll as usize)
                                .unwrap_or(&"reused");
                            tracing::warn!(
                                seq,
                                len,
                                bad_words = bad,
                                carried_seq = got,
                                kind,
                                "MISMATCH"
                            );
                        }
                        drop(fresh);
                        drop(malloced);
                        counts.buffers.fetch_add(1, Ordering::Relaxed);
                        counts.bytes.fetch_add(len as u64, Ordering::Relaxed);
                        bar.inc(1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a worker panicked")??;
        }
        Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    {
        let mut stdin = link.stdin.lock().unwrap();
        writeln!(stdin, "END")?;
        stdin.flush()?;
    }
    let bye = other.recv().map_err(|_| "consumer exited before BYE")?;
    let f: Vec<&str> = bye.split_whitespace().collect();
    let ["BYE", verified, mismatches] = f.as_slice() else {
        return Err(format!("bad bye {bye:?}").into());
    };
    let (verified, mismatches) = (verified.parse()?, mismatches.parse()?);
    drop(link);
    child.wait()?;
    m.flush();
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok(ModeResult {
        mode,
        source,
        buffers: ld(&counts.buffers),
        bytes: ld(&counts.bytes),
        secs,
        kinds: [
            ld(&counts.reused),
            ld(&counts.fresh),
            ld(&counts.remapped),
            ld(&counts.malloced),
        ],
        stats: m.stats(),
        gpu: gpu.id(),
        nic: nic.id(),
        verified,
        mismatches,
        pin_errors: ld(&counts.pin_errors),
    })
}

/// A progress bar on a terminal; plain lines (every 10%) otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: AtomicU64,
    mode: Mode,
}

impl Progress {
    fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        match &self.bar {
            Some(b) => b.inc(n),
            None => {
                let step = (self.total / 10).max(1);
                if done.is_multiple_of(step) || done == self.total {
                    println!("[{}] {done}/{} buffers", self.mode.name(), self.total);
                }
            }
        }
    }

    fn finish_and_clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn progress(total: u64, mode: Mode, plain: bool) -> Progress {
    use std::io::IsTerminal;
    let bar = (!plain && std::io::stdout().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>16} [{bar:40}] {pos}/{len} buffers {per_sec}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b.set_prefix(mode.name());
        b
    });
    Progress {
        bar,
        total,
        done: AtomicU64::new(0),
        mode,
    }
}

fn print_table(results: &[ModeResult]) {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&ModeResult) -> String| {
        rows.push((name.to_string(), results.iter().map(f).collect()));
    };
    let rate = |h: u64, m: u64| {
        if h + m == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", 100.0 * h as f64 / (h + m) as f64)
        }
    };
    let dev = |r: &ModeResult, id: umm::DeviceId| r.stats.device(id).cloned();
    row("notifier source", &|r| r.source.clone());
    row("buffers", &|r| r.buffers.to_string());
    row("  reused/fresh/remapped/malloc", &|r| {
        format!(
            "{}/{}/{}/{}",
            r.kinds[0], r.kinds[1], r.kinds[2], r.kinds[3]
        )
    });
    row("bytes", &|r| {
        format!("{:.1} MiB", r.bytes as f64 / (1 << 20) as f64)
    });
    row("throughput", &|r| {
        format!("{:.1} MiB/s", r.bytes as f64 / (1 << 20) as f64 / r.secs)
    });
    row("hit rate GPU", &|r| {
        dev(r, r.gpu).map_or("-".into(), |d| rate(d.hits, d.misses))
    });
    row("hit rate NIC", &|r| {
        dev(r, r.nic).map_or("-".into(), |d| rate(d.hits, d.misses))
    });
    row("registrations", &|r| r.stats.registrations().to_string());
    row("registrations avoided", &|r| r.stats.hits().to_string());
    row("invalidations received", &|r| {
        format!("{} ({})", r.stats.invalidations, r.source)
    });
    row("  fanned out to GPU", &|r| {
        dev(r, r.gpu).map_or("-".into(), |d| d.invalidated_entries.to_string())
    });
    row("  fanned out to NIC", &|r| {
        dev(r, r.nic).map_or("-".into(), |d| d.invalidated_entries.to_string())
    });
    row("verified bytes", &|r| {
        format!("{:.1} MiB", r.verified as f64 / (1 << 20) as f64)
    });
    row("mismatched buffers", &|r| r.mismatches.to_string());
    row("failed pins", &|r| r.pin_errors.to_string());
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..results.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.1[i].len())
                .chain([results[i].mode.name().len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut header = format!("{:<w0$}", "");
    for (r, w) in results.iter().zip(&widths) {
        header += &format!(" | {:>w$}", r.mode.name());
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for (name, cells) in &rows {
        let mut line = format!("{name:<w0$}");
        for (c, w) in cells.iter().zip(&widths) {
            line += &format!(" | {c:>w$}");
        }
        println!("{line}");
    }
}
