//! The manager (API surface; implementation in progress).
#![allow(missing_docs, unused)]

use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::device::{Device, DeviceId};
use crate::error::Result;
use crate::range::Range;
use crate::source::{InvalidationSink, NotifierSource};
use crate::stats::Stats;

/// Most devices one pin may name.
pub const MAX_PIN_DEVICES: usize = 8;
/// Most devices one manager may attach.
pub const MAX_DEVICES: usize = 64;
/// Most notifier sources with a generation counter one manager may hold.
pub const MAX_SOURCES: usize = 8;

/// Manager configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub max_cached_bytes: u64,
    pub max_cached_entries: usize,
    pub busy_timeout: Duration,
    pub check_mapped: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_cached_bytes: 8 << 30,
            max_cached_entries: 1 << 17,
            busy_timeout: Duration::from_millis(200),
            check_mapped: true,
        }
    }
}

/// The manager.
#[derive(Default)]
pub struct Manager {}

impl Manager {
    pub fn new(config: Config) -> Manager {
        unimplemented!()
    }
    pub fn attach<B: Backend>(&self, backend: B) -> Result<Device<B>> {
        unimplemented!()
    }
    pub fn backend<B: Backend>(&self, device: Device<B>) -> Result<&B> {
        unimplemented!()
    }
    pub fn add_source(&self, source: Arc<dyn NotifierSource>) -> Result<()> {
        unimplemented!()
    }
    pub fn pin(&self, range: Range, devices: &[DeviceId]) -> Result<Pin<'_>> {
        unimplemented!()
    }
    pub fn invalidate(&self, range: Range) {
        unimplemented!()
    }
    pub fn invalidate_deferred(&self, range: Range) {
        unimplemented!()
    }
    pub fn invalidate_all(&self) {
        unimplemented!()
    }
    pub fn flush(&self) {
        unimplemented!()
    }
    pub fn evict_unreferenced(&self) -> usize {
        unimplemented!()
    }
    pub fn stats(&self) -> Stats {
        unimplemented!()
    }
    pub fn start_reaper(self: &Arc<Self>, interval: Duration) -> Reaper {
        unimplemented!()
    }
}

impl InvalidationSink for Manager {
    fn invalidate(&self, range: Range) {
        Manager::invalidate(self, range)
    }
    fn invalidate_all(&self) {
        Manager::invalidate_all(self)
    }
}

/// Background thread that applies deferred work.
pub struct Reaper {}

/// RAII pin.
pub struct Pin<'m> {
    manager: &'m Manager,
}

impl<'m> Pin<'m> {
    pub fn range(&self) -> Range {
        unimplemented!()
    }
    pub fn translation<B: Backend>(&self, device: Device<B>) -> Option<&B::Translation> {
        unimplemented!()
    }
    pub fn registered_range(&self, device: impl Into<DeviceId>) -> Option<Range> {
        unimplemented!()
    }
    pub fn offset(&self, device: impl Into<DeviceId>) -> Option<usize> {
        unimplemented!()
    }
    pub fn is_valid(&self) -> bool {
        unimplemented!()
    }
}
