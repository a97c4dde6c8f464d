//! [`ManualSource`]: a notifier source driven by hand, for tests and examples.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use umm::{InvalidationSink, NotifierSource, Range, Uncovered};

/// A source whose events are [`fire`](ManualSource::fire)d by hand. Like the kernel
/// module it records events and bumps a generation, delivering them at the next
/// [`drain`](NotifierSource::drain); it refuses ranges overlapping one given to
/// [`refuse`](ManualSource::refuse) with [`Uncovered`], as strict userfaultfd refuses
/// shared memory.
#[derive(Debug, Default)]
pub struct ManualSource {
    generation: AtomicU64,
    pending: Mutex<Vec<Option<Range>>>,
    watches: Mutex<HashMap<u64, Range>>,
    refused: Mutex<Vec<Range>>,
}

impl ManualSource {
    /// A source with nothing watched, pending or refused.
    pub fn new() -> ManualSource {
        ManualSource::default()
    }

    /// Records an invalidation of `range` (delivered at the next drain).
    pub fn fire(&self, range: Range) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Some(range));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Records a lost-events overflow (an `invalidate_all` at the next drain).
    pub fn overflow(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(None);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Refuse to watch ranges overlapping `range` from now on.
    pub fn refuse(&self, range: Range) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(range);
    }

    /// Watches held now (cookie -> range).
    pub fn watches(&self) -> HashMap<u64, Range> {
        self.watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl NotifierSource for ManualSource {
    fn name(&self) -> &str {
        "manual"
    }

    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|r| r.overlaps(&range))
        {
            return Err(Box::new(Uncovered {
                range,
                mapping: "a range the test refused",
                operation: "anything",
            }));
        }
        self.watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cookie, range);
        Ok(())
    }

    fn unwatch(&self, cookie: u64, _range: Range) {
        self.watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie);
    }

    fn generation(&self) -> Option<&AtomicU64> {
        Some(&self.generation)
    }

    fn drain(&self, sink: &dyn InvalidationSink) {
        let events = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for e in events {
            match e {
                Some(r) => sink.invalidate(r),
                None => sink.invalidate_all(),
            }
        }
    }
}
