//! # stale-dma: the seed's scenario, with bytes on the wire
//!
//! Process P maps file F1 at address B, registers B and RDMA-WRITEs it to a peer; then it
//! unmaps F1, maps F2 at the **same** address B and sends B again. A registration cache
//! keyed by address finds its entry for B and hands out the old MR, whose pages are still
//! F1's: the peer receives F1's bytes although B now shows F2 (no error anywhere). umm
//! learns about the unmap from a notifier source, drops the entry and registers afresh, so
//! the peer receives F2's bytes.
//!
//! The scenario runs on Soft-RoCE: P registers on `rxe1`, the peer is `rxe0`, and the two
//! sit on the ends of a veth pair (scripts/rxe-setup.sh), so the bytes really travel as
//! RoCE packets. [`run`] runs one [`Mode`]; [`notifiers`] lists the umm notifier sources
//! this build can use, one entry each.
//!
//! ```
//! use stale_dma::{notifiers, run, Mode, Rig};
//!
//! match Rig::open() {
//!     Ok(rig) => {
//!         let naive = run(&rig, &Mode::Naive).unwrap();
//!         assert!(naive.stale());
//!         let umm = run(&rig, &Mode::Umm(&notifiers()[0])).unwrap();
//!         assert!(umm.correct());
//!     }
//!     Err(skip) => println!("skipped: {skip}"), // no Soft-RoCE here
//! }
//! ```

#![deny(missing_docs)]

use std::any::Any;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Arc;

use umm::{Manager, Range};
use umm_rdma::transport::{connect_pair, Local, RcQp, Remote};
use umm_rdma::{Access, DeviceSelector, MrTranslation, RdmaBackend, RdmaDevice, RdmaError};

/// Bytes per file and per RDMA WRITE (well above any inline threshold: the device reads
/// the registered pages).
pub const LEN: usize = 64 << 10;

/// What can stop the demo.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// rxe0/rxe1 are not there (not in the guest, or scripts/rxe-setup.sh did not run).
    #[error("needs Soft-RoCE devices rxe0 and rxe1 (run scripts/demo.sh): {0}")]
    NoDevices(#[source] RdmaError),
    /// A verbs operation failed.
    #[error(transparent)]
    Rdma(#[from] RdmaError),
    /// The manager refused.
    #[error(transparent)]
    Umm(#[from] umm::Error),
    /// A notifier source could not be set up.
    #[error("notifier source {name}: {reason}")]
    Source {
        /// The source.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// A file or mapping operation failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn os(what: impl Into<String>) -> DemoError {
    DemoError::Os {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// The two devices, a connected RC queue-pair pair (P on rxe1 → peer on rxe0) and the
/// peer's receive buffer.
pub struct Rig {
    // Field order is drop order: queue pairs, then the peer's MR, then its buffer.
    qp: std::sync::Mutex<RcQp>,
    _peer_qp: RcQp,
    peer_mr: MrTranslation,
    peer_buf: PeerBuf,
    p_dev: Arc<RdmaDevice>,
}

impl Rig {
    /// Opens rxe1 (P) and rxe0 (peer) and connects them over GID index 0.
    pub fn open() -> Result<Rig, DemoError> {
        let open = |n: &str| RdmaDevice::open(&DeviceSelector::Name(n.into()));
        let peer_dev = open("rxe0").map_err(DemoError::NoDevices)?;
        let p_dev = open("rxe1").map_err(DemoError::NoDevices)?;
        let (qp, peer_qp) = connect_pair(&p_dev, &peer_dev, 0)?;
        let peer_buf = PeerBuf::new()?;
        let peer_backend = RdmaBackend::new(peer_dev, Access::REMOTE_RW);
        let range = Range::new(peer_buf.addr, LEN)?;
        // SAFETY: `peer_buf` lives in the Rig next to the MR and is dropped after it
        // (field order).
        let peer_mr = unsafe { peer_backend.register_raw(range) }.map_err(|e| {
            DemoError::Rdma(RdmaError::Verbs {
                device: "rxe0".into(),
                op: "ibv_reg_mr",
                source: Box::new(e),
            })
        })?;
        Ok(Rig {
            p_dev,
            qp: std::sync::Mutex::new(qp),
            peer_buf,
            peer_mr,
            _peer_qp: peer_qp,
        })
    }

    /// RDMA-WRITEs `LEN` bytes at `addr` through `mr` and returns what the peer received.
    fn send(&self, mr: &MrTranslation, addr: usize) -> Result<Vec<u8>, DemoError> {
        let peer_addr = self.peer_buf.addr;
        // Clear the peer buffer first, so a WRITE that did nothing cannot pass as correct.
        // SAFETY: no reference to the peer's bytes is alive while we write them.
        unsafe { std::ptr::write_bytes(peer_addr as *mut u8, 0, LEN) };
        let mut qp = self.qp.lock().unwrap_or_else(|p| p.into_inner());
        qp.write(
            Local::new(mr, addr, LEN as u32),
            Remote::new(&self.peer_mr, peer_addr),
        )?;
        // SAFETY: the WRITE completed; read the bytes the device placed (volatile: they
        // were written behind the compiler's back).
        Ok((0..LEN)
            .map(|i| unsafe { std::ptr::read_volatile((peer_addr + i) as *const u8) })
            .collect())
    }
}

/// Bytes the veth end of the peer (`v0`, rxe0's netdev) has received so far: RDMA traffic
/// between rxe1 and rxe0 must show up here (loopback inside one device would prove nothing).
pub fn peer_veth_rx_bytes() -> Option<u64> {
    std::fs::read_to_string("/sys/class/net/v0/statistics/rx_bytes")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The peer's receive buffer: an anonymous mapping only the device writes (no Rust
/// reference to it ever exists), unmapped on drop.
struct PeerBuf {
    addr: usize,
}

impl PeerBuf {
    fn new() -> Result<PeerBuf, DemoError> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap of the peer buffer"));
        }
        Ok(PeerBuf { addr: p as usize })
    }
}

impl Drop for PeerBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; its MR was deregistered before (field
        // order of `Rig`).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, LEN) };
    }
}

/// How a [`Notifier`] connects its source to a manager: returns what must stay alive while
/// the source watches, or why the source is unavailable here.
pub type SetupFn = fn(&Arc<Manager>) -> Result<Box<dyn Any>, String>;

/// One umm notifier source as the demo uses it: one entry of [`notifiers`].
pub struct Notifier {
    /// Its name in the verdict table.
    pub name: &'static str,
    /// Connects the source to the manager; returns what must stay alive while it watches
    /// (dropped after the manager's last use). `Err(reason)` means the source is not usable
    /// here (the entry is skipped with the reason).
    pub setup: SetupFn,
    /// Whether the application itself reports the unmap ([`Manager::invalidate`]).
    pub manual: bool,
}

/// Adds `source` to `manager` and returns it as the setup's keep-alive value.
fn add_source<S: umm::NotifierSource + 'static>(
    manager: &Arc<Manager>,
    source: Arc<S>,
) -> Result<Box<dyn Any>, String> {
    manager
        .add_source(source.clone())
        .map_err(|e| e.to_string())?;
    Ok(Box::new(source))
}

/// Every notifier source this build knows, in table order: manual, userfaultfd (`umm-uffd`),
/// kernel module (`umm-kmod`, needs `umm_notify.ko` loaded), interposition
/// (`umm-interpose`, needs the hooks linked into the binary with
/// `umm_interpose::export_hooks!()`, as the `stale-dma` binary and test do).
pub fn notifiers() -> Vec<Notifier> {
    vec![
        Notifier {
            name: "manual",
            setup: |_| Ok(Box::new(())),
            manual: true,
        },
        Notifier {
            name: "userfaultfd",
            setup: |manager| {
                // Non-strict: the demo's buffers are tmpfs files mapped MAP_SHARED, which
                // strict mode refuses (userfaultfd cannot see a hole punched in them); the
                // demo's own operations (munmap + mmap over the range) it does see.
                let source = umm_uffd::UffdSource::new(umm_uffd::Options {
                    strict: false,
                    ..umm_uffd::Options::default()
                })
                .map_err(|e| e.to_string())?;
                add_source(manager, source)
            },
            manual: false,
        },
        Notifier {
            name: "kernel module",
            setup: |manager| {
                let source = umm_kmod::KmodSource::open()
                    .map_err(|e| format!("{e} (load it: insmod kmod-notifier/umm_notify.ko)"))?;
                add_source(manager, Arc::new(source))
            },
            manual: false,
        },
        Notifier {
            name: "interposition",
            setup: |manager| {
                // The demo pins MAP_SHARED file mappings, which strict mode refuses (the
                // hooks cannot see a hole punch or truncation of the file); the demo never
                // punches or truncates them, so it accepts that risk.
                let source = umm_interpose::InterposeSource::install_with(
                    manager,
                    umm_interpose::Options::strict(false),
                )
                .map_err(|e| e.to_string())?;
                add_source(manager, source)
            },
            manual: false,
        },
    ]
}

/// Which cache P uses.
pub enum Mode<'a> {
    /// An address-keyed cache without invalidation (what the seed's libraries did).
    Naive,
    /// umm with one notifier source.
    Umm(&'a Notifier),
}

impl Mode<'_> {
    /// Its label in the verdict table.
    pub fn label(&self) -> String {
        match self {
            Mode::Naive => "naive cache (no invalidation)".into(),
            Mode::Umm(n) => format!("umm + {} notifier", n.name),
        }
    }
}

/// What the peer received in one run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The mode's label.
    pub label: String,
    /// The peer's bytes after the first send (F1 mapped at B).
    pub first: Vec<u8>,
    /// The peer's bytes after the second send (F2 mapped at B).
    pub second: Vec<u8>,
    /// F1's contents.
    pub f1: Vec<u8>,
    /// F2's contents.
    pub f2: Vec<u8>,
    /// The address B.
    pub addr: usize,
    /// For umm: (invalidations, registrations, deregistrations) from its stats right after
    /// the second send: expected (1, 2, 1): the unmap invalidated the entry, whose MR was
    /// deregistered, and the second send registered afresh. The interposition source shows
    /// 2 invalidations: its munmap hook and its mmap(MAP_FIXED) hook both report the range.
    pub stats: Option<(u64, u64, u64)>,
}

impl Outcome {
    /// The bug: the second send delivered F1's bytes.
    pub fn stale(&self) -> bool {
        self.first == self.f1 && self.second == self.f1
    }

    /// Right: the first send delivered F1, the second F2.
    pub fn correct(&self) -> bool {
        self.first == self.f1 && self.second == self.f2
    }

    /// "F1", "F2", "zeros" or "other" for a received buffer.
    pub fn name_of(&self, bytes: &[u8]) -> &'static str {
        if bytes == self.f1.as_slice() {
            "F1"
        } else if bytes == self.f2.as_slice() {
            "F2"
        } else if bytes.iter().all(|b| *b == 0) {
            "zeros"
        } else {
            "other"
        }
    }
}

/// A file filled with a repeated label, deleted on drop.
struct TempFile {
    path: CString,
    fd: libc::c_int,
    bytes: Vec<u8>,
}

impl TempFile {
    fn new(tag: &str) -> Result<TempFile, DemoError> {
        let label = format!("{tag}: the bytes of file {tag} | ");
        let bytes: Vec<u8> = label.bytes().cycle().take(LEN).collect();
        // tmpfs (shmem) files: userfaultfd can watch shared mappings of those, not of
        // regular disk files.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("stale-dma-{}-{tag}", std::process::id()));
        std::fs::write(&path, &bytes).map_err(|e| DemoError::Os {
            what: format!("writing {}", path.display()),
            source: e,
        })?;
        let path = CString::new(path.to_string_lossy().into_owned()).expect("no NUL in path");
        // SAFETY: `path` is a NUL-terminated string we own.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(os(format!("opening {path:?}")));
        }
        Ok(TempFile { path, fd, bytes })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // SAFETY: closes the fd and unlinks the file this value created.
        unsafe {
            libc::close(self.fd);
            libc::unlink(self.path.as_ptr());
        }
    }
}

/// `mmap(addr, LEN, MAP_SHARED [| MAP_FIXED], fd)`.
fn map_file(fd: libc::c_int, at: Option<usize>) -> Result<usize, DemoError> {
    let (hint, flags) = match at {
        Some(a) => (a as *mut libc::c_void, libc::MAP_SHARED | libc::MAP_FIXED),
        None => (std::ptr::null_mut(), libc::MAP_SHARED),
    };
    // SAFETY: maps a file we own; with MAP_FIXED only at an address this demo mapped and
    // unmapped itself (nothing else of the process lives there).
    let p = unsafe {
        libc::mmap(
            hint,
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_POPULATE,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os("mmap"));
    }
    Ok(p as usize)
}

fn unmap(addr: usize) -> Result<(), DemoError> {
    // SAFETY: unmaps the demo's own mapping of LEN bytes at `addr`.
    if unsafe { libc::munmap(addr as *mut libc::c_void, LEN) } != 0 {
        return Err(os("munmap"));
    }
    Ok(())
}

/// The registration cache of the seed's libraries: keyed by (address, length), never told
/// about unmaps. Its MRs are deregistered when it drops.
struct NaiveCache<'a> {
    backend: &'a RdmaBackend,
    entries: HashMap<(usize, usize), MrTranslation>,
}

impl NaiveCache<'_> {
    fn get(&mut self, addr: usize) -> Result<&MrTranslation, DemoError> {
        let range = Range::new(addr, LEN)?;
        if let std::collections::hash_map::Entry::Vacant(v) = self.entries.entry((addr, LEN)) {
            // SAFETY: deliberately unsafe in the sense of the bug being demonstrated: the
            // cache keeps the MR after the range is unmapped. Memory safety holds: the MR
            // pins the old pages, so the device never touches memory the process reuses.
            let mr = unsafe { self.backend.register_raw(range) }.map_err(|e| {
                DemoError::Rdma(RdmaError::Verbs {
                    device: "rxe1".into(),
                    op: "ibv_reg_mr",
                    source: Box::new(e),
                })
            })?;
            v.insert(mr);
        }
        Ok(&self.entries[&(addr, LEN)])
    }
}

/// Runs the scenario once in `mode`.
pub fn run(rig: &Rig, mode: &Mode<'_>) -> Result<Outcome, DemoError> {
    let f1 = TempFile::new("F1")?;
    let f2 = TempFile::new("F2")?;
    let backend = RdmaBackend::new(rig.p_dev.clone(), Access::LOCAL_READ);
    match mode {
        Mode::Naive => {
            let mut cache = NaiveCache {
                backend: &backend,
                entries: HashMap::new(),
            };
            let b = map_file(f1.fd, None)?;
            let first = rig.send(cache.get(b)?, b)?;
            unmap(b)?;
            let b2 = map_file(f2.fd, Some(b))?;
            debug_assert_eq!(b, b2);
            let second = rig.send(cache.get(b2)?, b2)?;
            drop(cache);
            unmap(b2)?;
            Ok(Outcome {
                label: mode.label(),
                first,
                second,
                f1: f1.bytes.clone(),
                f2: f2.bytes.clone(),
                addr: b,
                stats: None,
            })
        }
        Mode::Umm(notifier) => {
            let manager = Arc::new(Manager::default());
            let keep = (notifier.setup)(&manager).map_err(|reason| DemoError::Source {
                name: notifier.name,
                reason,
            })?;
            let nic = manager.attach(backend)?;
            let b = map_file(f1.fd, None)?;
            let range = Range::new(b, LEN)?;
            // Pin B through umm, then send what is mapped at B now with that translation.
            let send_pinned = |at: usize| -> Result<_, DemoError> {
                let pin = manager.pin(range, &[nic.id()])?;
                rig.send(pin.translation(nic).expect("pinned on nic"), at)
            };
            let first = send_pinned(b)?;
            unmap(b)?;
            if notifier.manual {
                manager.invalidate(range);
            }
            let b2 = map_file(f2.fd, Some(b))?;
            let second = send_pinned(b2)?;
            manager.flush();
            let s = manager.stats();
            let d = s.device(nic).expect("attached");
            let stats = Some((s.invalidations, d.registrations, d.deregistrations));
            unmap(b2)?;
            if notifier.manual {
                manager.invalidate(range);
            }
            manager.flush();
            drop(keep);
            drop(manager);
            Ok(Outcome {
                label: mode.label(),
                first,
                second,
                f1: f1.bytes.clone(),
                f2: f2.bytes.clone(),
                addr: b,
                stats,
            })
        }
    }
}

/// The side-by-side verdict table of several outcomes, one line each.
pub fn verdict_table(outcomes: &[Outcome]) -> String {
    use std::fmt::Write;
    let preview = |b: &[u8]| -> String {
        b.iter()
            .take(20)
            .map(|c| {
                if c.is_ascii_graphic() || *c == b' ' {
                    *c as char
                } else {
                    '.'
                }
            })
            .collect()
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<32} | {:<28} | {:<28} | {:<27} | verdict",
        "cache",
        "peer got, 1st send (F1 at B)",
        "peer got, 2nd send (F2 at B)",
        "umm stats (inval/reg/dereg)",
    );
    let _ = writeln!(t, "{}", "-".repeat(150));
    for o in outcomes {
        let stats = match o.stats {
            Some((i, r, d)) => format!("{i} / {r} / {d}"),
            None => "no invalidation path".into(),
        };
        let verdict = if o.correct() {
            "CORRECT: peer got F2"
        } else if o.stale() {
            "STALE: peer got F1 again"
        } else {
            "UNEXPECTED"
        };
        let _ = writeln!(
            t,
            "{:<32} | {:<5} \"{}\" | {:<5} \"{}\" | {:<27} | {}",
            o.label,
            o.name_of(&o.first),
            preview(&o.first),
            o.name_of(&o.second),
            preview(&o.second),
            stats,
            verdict
        );
    }
    t
}
