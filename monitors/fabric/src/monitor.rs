//! [`Monitor`]: the libfabric-independent part: subscriptions, invalidations, `valid`, and
//! the thread that delivers `notify` without holding any lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use umm::{InvalidationSink, NotifierSource, Range};
use umm_kmod::KmodSource;
use umm_uffd::UffdSource;

use crate::error::FabricError;

/// Invalidations the sink holds between two collections; more set the overflow flag (which
/// invalidates every subscription: never dropped silently).
const QUEUE_CAPACITY: usize = 4096;

/// Where `notify` goes: libfabric's `import_ops->notify` in the library, a recorder in tests.
/// Called from the monitor's own thread with no lock of the monitor held, so it may call
/// back into [`Monitor::unsubscribe`] (libfabric does).
pub type NotifyFn = Arc<dyn Fn(Range) + Send + Sync>;

/// The notifier source behind a [`Monitor`].
#[derive(Clone)]
pub enum Source {
    /// The kernel module (`/dev/umm_notify`): sees every change of a page table.
    Kmod(Arc<KmodSource>),
    /// userfaultfd, strict: refuses memory whose pages can change without an event.
    Uffd(Arc<UffdSource>),
    /// Any other source (tests). The monitor thread polls it every interval.
    Other(Arc<dyn NotifierSource>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Source {
    /// The source as umm sees it.
    pub fn as_dyn(&self) -> &dyn NotifierSource {
        match self {
            Source::Kmod(s) => s.as_ref(),
            Source::Uffd(s) => s.as_ref(),
            Source::Other(s) => s.as_ref(),
        }
    }

    /// The source's short name (`kmod-notifier`, `userfaultfd`, ...).
    pub fn name(&self) -> &str {
        self.as_dyn().name()
    }

    /// Sleeps until the source may have something to report, or `timeout`.
    fn wait(&self, timeout: Duration) {
        match self {
            Source::Kmod(s) => {
                if let Err(e) = s.device().wait_readable(timeout) {
                    tracing::warn!(error = %e, "umm-fabric: waiting for the kernel module failed");
                    std::thread::park_timeout(timeout);
                }
            }
            // The uffd reader unparks the monitor thread through the eager sink.
            Source::Uffd(_) | Source::Other(_) => std::thread::park_timeout(timeout),
        }
    }
}

/// What the sources' threads push into: lock-free and allocation-free, so a reader thread
/// that blocks an unmapping thread never waits for anything here.
struct Sink {
    queue: ArrayQueue<Range>,
    overflow: AtomicBool,
    waker: OnceLock<Thread>,
}

impl InvalidationSink for Sink {
    fn invalidate(&self, range: Range) {
        if self.queue.push(range).is_err() {
            self.overflow.store(true, Ordering::Release);
        }
        if let Some(t) = self.waker.get() {
            t.unpark();
        }
    }

    fn invalidate_all(&self) {
        self.overflow.store(true, Ordering::Release);
        if let Some(t) = self.waker.get() {
            t.unpark();
        }
    }
}

/// Invalidated ranges not yet delivered by `notify`: `valid` answers `false` for them until
/// the monitor thread's `notify` for them has returned.
#[derive(Default)]
struct Dirty {
    /// (sequence number, range), in sequence order.
    ranges: Vec<(u64, Range)>,
    next_seq: u64,
    /// Overflows not yet delivered (each means: every subscription is invalid).
    all: u64,
}

struct Inner {
    source: Source,
    release_after_notify: bool,
    notify: NotifyFn,
    next_cookie: AtomicU64,
    /// (addr, len) as libfabric subscribed it -> cookies of the watches (libfabric may
    /// subscribe one range more than once).
    subs: Mutex<HashMap<(usize, usize), Vec<u64>>>,
    sink: Arc<Sink>,
    dirty: Mutex<Dirty>,
    /// The source's generation at the last drain.
    seen: AtomicU64,
    stop: AtomicBool,
    interval: Duration,
    notified: AtomicU64,
}

/// Counters of a [`Monitor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorStats {
    /// Subscriptions held now.
    pub subscriptions: usize,
    /// Ranges delivered to `notify` so far.
    pub notified: u64,
    /// Invalidated ranges not delivered yet.
    pub pending: usize,
}

/// A memory monitor on one umm notifier source.
///
/// libfabric calls [`subscribe`](Monitor::subscribe) for each registration it caches,
/// [`valid`](Monitor::valid) on every cache hit and [`unsubscribe`](Monitor::unsubscribe)
/// when it drops an entry. Invalidations reach libfabric twice:
///
/// * synchronously through `valid`: it drains the source when its generation moved (the
///   kernel module bumps it before the unmapping syscall returns; the userfaultfd reader
///   before it releases the unmapping thread), so a hit after the change never returns the
///   stale registration;
/// * asynchronously through `notify`, called from the monitor's own thread with none of the
///   monitor's locks held (libfabric's notify takes its `mm_lock`, which libfabric holds
///   around `subscribe`/`valid`, and calls back into `unsubscribe`), so unused stale
///   registrations are released without waiting for the next hit.
///
/// A range stays "invalid" for `valid` until its `notify` has returned.
///
/// libfabric before 2.1 never calls `unsubscribe` (its cache keeps no subscription context:
/// "we remain subscribed"); with [`MonitorOptions::release_after_notify`] the monitor drops
/// the subscriptions that overlapped a range once `notify` for it returned (libfabric
/// uncached every such entry), so watches do not pile up. libfabric 2.1 and later
/// unsubscribe every entry they uncache, and the option must be off there (the library sets
/// it from `fi_version()`).
pub struct Monitor {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("source", &self.inner.source)
            .field("stats", &self.stats())
            .finish()
    }
}

/// How a [`Monitor`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorOptions {
    /// The longest the monitor thread sleeps between looks at the source.
    pub interval: Duration,
    /// Drop the subscriptions overlapping a range after its `notify` returned (for
    /// libfabric before 2.1, which never unsubscribes).
    pub release_after_notify: bool,
}

impl Default for MonitorOptions {
    fn default() -> MonitorOptions {
        MonitorOptions {
            interval: Duration::from_millis(100),
            release_after_notify: false,
        }
    }
}

impl Monitor {
    /// Starts a monitor on `source` whose thread delivers invalidations to `notify`.
    pub fn new(
        source: Source,
        notify: NotifyFn,
        options: MonitorOptions,
    ) -> Result<Monitor, FabricError> {
        let sink = Arc::new(Sink {
            queue: ArrayQueue::new(QUEUE_CAPACITY),
            overflow: AtomicBool::new(false),
            waker: OnceLock::new(),
        });
        if let Source::Uffd(u) = &source {
            let weak: Weak<dyn InvalidationSink> = Arc::downgrade(&sink) as _;
            u.set_eager_sink(weak);
        }
        let seen = source
            .as_dyn()
            .generation()
            .map(|g| g.load(Ordering::Acquire))
            .unwrap_or(0);
        let inner = Arc::new(Inner {
            source,
            release_after_notify: options.release_after_notify,
            notify,
            next_cookie: AtomicU64::new(1),
            subs: Mutex::new(HashMap::new()),
            sink,
            dirty: Mutex::new(Dirty::default()),
            seen: AtomicU64::new(seen),
            stop: AtomicBool::new(false),
            interval: options.interval,
            notified: AtomicU64::new(0),
        });
        let worker = inner.clone();
        let thread = std::thread::Builder::new()
            .name("umm-fabric".into())
            .spawn(move || worker.run())
            .map_err(FabricError::Thread)?;
        let _ = inner.sink.waker.set(thread.thread().clone());
        tracing::debug!(source = inner.source.name(), "umm-fabric monitor started");
        Ok(Monitor {
            inner,
            thread: Some(thread),
        })
    }

    /// The source in use.
    pub fn source(&self) -> &Source {
        &self.inner.source
    }

    /// Starts watching `[addr, addr + len)`. A range the source cannot protect is refused
    /// ([`FabricError::Uncovered`]); libfabric then leaves that registration out of its
    /// cache (registers it for each use).
    pub fn subscribe(&self, addr: usize, len: usize) -> Result<(), FabricError> {
        let range = Range::new(addr, len).map_err(|_| FabricError::BadRange { addr, len })?;
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        self.inner
            .source
            .as_dyn()
            .watch(cookie, range)
            .map_err(|source| match source.downcast::<umm::Uncovered>() {
                Ok(u) => FabricError::Uncovered(*u),
                Err(source) => FabricError::Watch { range, source },
            })?;
        lock(&self.inner.subs)
            .entry((addr, len))
            .or_default()
            .push(cookie);
        Ok(())
    }

    /// Stops watching a range [`subscribe`](Monitor::subscribe)d before (one subscription
    /// of it, when there are several).
    pub fn unsubscribe(&self, addr: usize, len: usize) {
        let cookie = {
            let mut subs = lock(&self.inner.subs);
            let Some(cookies) = subs.get_mut(&(addr, len)) else {
                tracing::debug!(addr, len, "umm-fabric: unsubscribe of an unknown range");
                return;
            };
            let c = cookies.pop();
            if cookies.is_empty() {
                subs.remove(&(addr, len));
            }
            c
        };
        if let (Some(cookie), Ok(range)) = (cookie, Range::new(addr, len)) {
            self.inner.source.as_dyn().unwatch(cookie, range);
        }
    }

    /// Whether a cached registration of `[addr, addr + len)` still maps the same pages:
    /// `false` when an invalidation overlapping it was recorded and not yet delivered.
    pub fn valid(&self, addr: usize, len: usize) -> bool {
        let Ok(range) = Range::new(addr, len) else {
            return false;
        };
        let d = self.inner.collect();
        d.all == 0 && !d.ranges.iter().any(|(_, r)| r.overlaps(&range))
    }

    /// Counters now.
    pub fn stats(&self) -> MonitorStats {
        MonitorStats {
            subscriptions: lock(&self.inner.subs).values().map(Vec::len).sum(),
            notified: self.inner.notified.load(Ordering::Relaxed),
            pending: lock(&self.inner.dirty).ranges.len(),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            if t.join().is_err() {
                tracing::error!("umm-fabric: the monitor thread panicked");
            }
        }
    }
}

impl Inner {
    /// Drains the source if its generation moved and moves everything the sink holds into
    /// the dirty list; returns the list locked.
    fn collect(&self) -> MutexGuard<'_, Dirty> {
        let src = self.source.as_dyn();
        if let Some(g) = src.generation() {
            let now = g.load(Ordering::Acquire);
            if now != self.seen.load(Ordering::Acquire) {
                src.drain(self.sink.as_ref());
                self.seen.fetch_max(now, Ordering::AcqRel);
            }
        }
        let mut d = lock(&self.dirty);
        if self.sink.overflow.swap(false, Ordering::AcqRel) {
            d.all += 1;
        }
        while let Some(r) = self.sink.queue.pop() {
            let seq = d.next_seq;
            d.next_seq += 1;
            d.ranges.push((seq, r));
        }
        d
    }

    fn run(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let (batch, all) = {
                let d = self.collect();
                (d.ranges.clone(), d.all)
            };
            if batch.is_empty() && all == 0 {
                self.source.wait(self.interval);
                continue;
            }
            // The subscriptions made before the notify calls: libfabric uncaches every
            // entry overlapping a notified range, so their watches may go afterwards.
            // (One made after this snapshot is kept: it may belong to a live entry.)
            let held: Vec<((usize, usize), u64)> = if self.release_after_notify {
                let subs = lock(&self.subs);
                subs.iter()
                    .filter(|(&(a, l), _)| {
                        all > 0
                            || Range::new(a, l)
                                .is_ok_and(|s| batch.iter().any(|(_, r)| r.overlaps(&s)))
                    })
                    .flat_map(|(&k, cookies)| cookies.iter().map(move |&c| (k, c)))
                    .collect()
            } else {
                Vec::new()
            };
            if all > 0 {
                // Events were lost: every subscribed range may have changed.
                let ranges: Vec<Range> = lock(&self.subs)
                    .keys()
                    .filter_map(|&(a, l)| Range::new(a, l).ok())
                    .collect();
                tracing::debug!(
                    ranges = ranges.len(),
                    "umm-fabric: overflow, invalidating every subscription"
                );
                for r in ranges {
                    (self.notify)(r);
                }
            }
            for (_, r) in &batch {
                (self.notify)(*r);
            }
            self.release(held);
            self.notified
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let mut d = lock(&self.dirty);
            if let Some(&(last, _)) = batch.last() {
                d.ranges.retain(|&(seq, _)| seq > last);
            }
            d.all -= all;
        }
    }
}

impl Inner {
    /// Drops the given subscriptions (those still held) and their watches.
    fn release(&self, held: Vec<((usize, usize), u64)>) {
        if held.is_empty() {
            return;
        }
        let mut gone = Vec::with_capacity(held.len());
        {
            let mut subs = lock(&self.subs);
            for (key, cookie) in held {
                if let Some(cookies) = subs.get_mut(&key) {
                    if let Some(i) = cookies.iter().position(|&c| c == cookie) {
                        cookies.remove(i);
                        gone.push((key, cookie));
                    }
                    if cookies.is_empty() {
                        subs.remove(&key);
                    }
                }
            }
        }
        for ((addr, len), cookie) in gone {
            if let Ok(range) = Range::new(addr, len) {
                self.source.as_dyn().unwatch(cookie, range);
            }
        }
    }
}

/// Locks a mutex, taking the data of a poisoned one (every critical section here leaves the
/// data consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
