//! A recording backend for tests, examples and the conformance suite of real backends.
//!
//! [`RecordingBackend`] registers nothing anywhere: it hands out numbered translations and
//! keeps a ledger of what is registered, so tests can assert exactly-once deregistration,
//! refuse overlapping registrations like CUDA does, or fail with `ENOMEM` like verbs under
//! RLIMIT_MEMLOCK.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::{Backend, BackendError, BackendErrorKind, Capabilities};
use crate::range::Range;

/// The translation a [`RecordingBackend`] hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedTranslation {
    /// Unique per backend (1, 2, 3 ...).
    pub id: u64,
    /// The registered range.
    pub range: Range,
    /// When it was registered, on the process-wide logical clock of [`now`].
    pub stamp: u64,
}

static CLOCK: AtomicU64 = AtomicU64::new(1);

/// A fresh private anonymous read-write mapping of `len` bytes (zero-filled), for tests
/// and examples that need real memory to pin or to unmap. umm never unmaps it: the caller
/// does, or leaves it to process exit. Panics if the kernel refuses.
pub fn map_anonymous(len: usize) -> Range {
    let p = crate::range::map_anonymous(len).expect("mmap of a private anonymous mapping");
    Range::new(p.as_ptr() as usize, len).expect("a fresh mapping is a valid range")
}

/// Ticks and reads a process-wide logical clock shared with every [`RecordingBackend`]
/// registration, so concurrent tests can order "registered before that invalidation began".
pub fn now() -> u64 {
    CLOCK.fetch_add(1, Ordering::SeqCst)
}

/// One call the backend saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// A successful registration.
    Register(RecordedTranslation),
    /// A deregistration.
    Deregister(RecordedTranslation),
    /// A registration refused (overlap or memory limit).
    Refused(Range, BackendErrorKind),
    /// A deregistration of something not registered (twice, or with the wrong range): a
    /// manager bug that tests assert never happens.
    BadDeregister(RecordedTranslation, Range),
}

type RegisterHook = Box<dyn Fn(Range) + Send + Sync>;

/// The shared ledger of a [`RecordingBackend`]; clone the `Arc` before attaching the
/// backend to keep looking at it.
#[derive(Default)]
pub struct Ledger {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Range>>,
    calls: Mutex<Vec<Call>>,
    bytes: AtomicU64,
}

impl Ledger {
    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().clone()
    }

    /// Number of successful registrations so far.
    pub fn registrations(&self) -> usize {
        self.calls
            .lock()
            .iter()
            .filter(|c| matches!(c, Call::Register(_)))
            .count()
    }

    /// Number of deregistrations so far.
    pub fn deregistrations(&self) -> usize {
        self.calls
            .lock()
            .iter()
            .filter(|c| matches!(c, Call::Deregister(_)))
            .count()
    }

    /// Deregistrations of unknown registrations (double or mismatched); must stay 0.
    pub fn bad_deregistrations(&self) -> usize {
        self.calls
            .lock()
            .iter()
            .filter(|c| matches!(c, Call::BadDeregister(..)))
            .count()
    }

    /// Ranges registered now, by translation id.
    pub fn live(&self) -> BTreeMap<u64, Range> {
        self.live.lock().clone()
    }

    /// Bytes registered now.
    pub fn live_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A backend that only records; see the [module docs](self).
pub struct RecordingBackend {
    name: String,
    caps: Capabilities,
    byte_limit: Option<u64>,
    ledger: Arc<Ledger>,
    hook: Option<RegisterHook>,
    deregister_hook: Option<RegisterHook>,
}

impl RecordingBackend {
    /// A backend that allows overlaps and has no memory limit.
    pub fn new(name: &str) -> Self {
        RecordingBackend {
            name: name.to_string(),
            caps: Capabilities::default(),
            byte_limit: None,
            ledger: Arc::new(Ledger::default()),
            hook: None,
            deregister_hook: None,
        }
    }

    /// Refuses overlapping registrations with [`BackendErrorKind::AlreadyRegistered`], as
    /// CUDA does, and says so in its capabilities.
    pub fn refusing_overlap(mut self) -> Self {
        self.caps.allows_overlap = false;
        self
    }

    /// Fails registrations of memory that is not entirely mapped with `EFAULT`
    /// ([`BackendErrorKind::BadAddress`]), as verbs' `ibv_reg_mr` does, and says so in its
    /// capabilities ([`Capabilities::rejects_unmapped`]).
    pub fn rejecting_unmapped(mut self) -> Self {
        self.caps.rejects_unmapped = true;
        self
    }

    /// Fails registrations with `ENOMEM` once more than `bytes` would be registered.
    pub fn with_byte_limit(mut self, bytes: u64) -> Self {
        self.byte_limit = Some(bytes);
        self
    }

    /// Sets the capabilities reported to the manager.
    pub fn with_capabilities(mut self, caps: Capabilities) -> Self {
        self.caps = caps;
        self
    }

    /// Runs `hook` inside every `register`, before recording: a backend that allocates,
    /// unmaps or madvises while the manager is registering.
    pub fn with_register_hook(mut self, hook: impl Fn(Range) + Send + Sync + 'static) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    /// Runs `hook` inside every `deregister`, before recording: a backend that calls back
    /// into the manager, invalidates or panics while deregistering.
    pub fn with_deregister_hook(mut self, hook: impl Fn(Range) + Send + Sync + 'static) -> Self {
        self.deregister_hook = Some(Box::new(hook));
        self
    }

    /// The ledger, shared with the backend.
    pub fn ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }
}

impl Backend for RecordingBackend {
    type Translation = RecordedTranslation;

    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn register(&self, range: Range) -> Result<RecordedTranslation, BackendError> {
        if let Some(hook) = &self.hook {
            hook(range);
        }
        let mut live = self.ledger.live.lock();
        let refuse = |kind, source: &str| {
            self.ledger.calls.lock().push(Call::Refused(range, kind));
            Err(BackendError::new(kind, source.to_string()))
        };
        if !self.caps.allows_overlap && live.values().any(|r| r.overlaps(&range)) {
            return refuse(
                BackendErrorKind::AlreadyRegistered,
                "overlapping registration refused",
            );
        }
        if self.caps.rejects_unmapped && !crate::range::is_mapped(&range) {
            return refuse(BackendErrorKind::BadAddress, "EFAULT: not mapped");
        }
        let bytes = self.ledger.bytes.load(Ordering::Relaxed);
        if let Some(limit) = self.byte_limit {
            if bytes + range.len() as u64 > limit {
                return refuse(BackendErrorKind::OutOfMemory, "ENOMEM: byte limit reached");
            }
        }
        let t = RecordedTranslation {
            id: self.ledger.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            range,
            stamp: now(),
        };
        live.insert(t.id, range);
        self.ledger
            .bytes
            .fetch_add(range.len() as u64, Ordering::Relaxed);
        self.ledger.calls.lock().push(Call::Register(t));
        Ok(t)
    }

    fn deregister(&self, range: Range, t: RecordedTranslation) -> Result<(), BackendError> {
        if let Some(hook) = &self.deregister_hook {
            hook(range);
        }
        let mut live = self.ledger.live.lock();
        match live.get(&t.id) {
            Some(r) if *r == range => {
                live.remove(&t.id);
                self.ledger.calls.lock().push(Call::Deregister(t));
                self.ledger
                    .bytes
                    .fetch_sub(range.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            // A double or mismatched deregistration: a manager bug the tests must see.
            _ => {
                self.ledger.calls.lock().push(Call::BadDeregister(t, range));
                Err(BackendError::new(
                    BackendErrorKind::Other,
                    format!("deregister of unknown registration {t:?} ({range})"),
                ))
            }
        }
    }
}
