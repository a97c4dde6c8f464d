//! Planted bugs: invalidations lost between a source and the manager.

use super::*;

/// Counts invalidations and drops every Nth (the planted bug).
pub(crate) struct Dropper {
    pub(crate) every: Option<u64>,
    pub(crate) seen: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

impl Dropper {
    /// True when this invalidation must be dropped.
    pub(crate) fn drop_this(&self) -> bool {
        let Some(every) = self.every else {
            return false;
        };
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(every) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// A source wrapper whose drain loses every Nth range.
pub(crate) struct PlantedSource {
    pub(crate) inner: Arc<dyn NotifierSource>,
    pub(crate) dropper: Arc<Dropper>,
}

pub(crate) struct DroppingSink<'a> {
    pub(crate) sink: &'a dyn InvalidationSink,
    pub(crate) dropper: &'a Dropper,
}

impl InvalidationSink for DroppingSink<'_> {
    fn invalidate(&self, range: Range) {
        if !self.dropper.drop_this() {
            self.sink.invalidate(range);
        }
    }
    fn invalidate_all(&self) {
        self.sink.invalidate_all();
    }
}

impl NotifierSource for PlantedSource {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn attach(&self, m: ManagerId) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.inner.attach(m)
    }
    fn detach(&self, m: ManagerId) {
        self.inner.detach(m)
    }
    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.inner.watch(cookie, range)
    }
    fn unwatch(&self, cookie: u64, range: Range) {
        self.inner.unwatch(cookie, range)
    }
    fn generation(&self) -> Option<&AtomicU64> {
        self.inner.generation()
    }
    fn drain(&self, sink: &dyn InvalidationSink) {
        self.inner.drain(&DroppingSink {
            sink,
            dropper: &self.dropper,
        })
    }
}

/// The interposition hooks' sink with the planted bug: the manager, reached weakly.
pub(crate) struct DroppingHook {
    pub(crate) manager: std::sync::Weak<Manager>,
    pub(crate) dropper: Arc<Dropper>,
}

impl umm_interpose::HookSink for DroppingHook {
    fn invalidate_from_hook(&self, range: Range) {
        if self.dropper.drop_this() {
            return;
        }
        if let Some(m) = self.manager.upgrade() {
            m.invalidate_deferred(range);
        }
    }
}
