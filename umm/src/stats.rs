//! Counters, read as one snapshot by [`crate::Manager::stats`].

use crate::device::DeviceId;

/// Counters of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStats {
    /// The device.
    pub id: DeviceId,
    /// The backend's name.
    pub name: String,
    /// Pins of this device served from the cache (no backend call).
    pub hits: u64,
    /// Pins of this device that needed a registration.
    pub misses: u64,
    /// Successful backend registrations.
    pub registrations: u64,
    /// Backend deregistrations (successful or not).
    pub deregistrations: u64,
    /// Deregistrations the backend reported as failed (the registration is forgotten anyway).
    pub deregistration_errors: u64,
    /// Entries marked invalid by an invalidation.
    pub invalidated_entries: u64,
    /// Valid, unreferenced entries deregistered to respect the cache limits or to make room
    /// after an out-of-memory error.
    pub evictions: u64,
    /// Entries the evictor examined (LRU sweep steps): grows with evictions, not with
    /// the number of pinned entries.
    pub eviction_scans: u64,
    /// Entries merged into a larger registration (devices that refuse overlaps).
    pub merges: u64,
    /// Times the queue of pending invalidations overflowed, which invalidates every entry
    /// of the device at once (counted here and in [`Stats::invalidate_all`]'s effect, not
    /// silent).
    pub queue_overflows: u64,
    /// Bytes currently registered with the backend (valid and stale-but-pinned).
    pub registered_bytes: u64,
    /// Registrations currently held with the backend (valid and stale-but-pinned).
    pub registered_entries: u64,
    /// Valid entries in the cache (findable by a hit).
    pub cached_entries: u64,
    /// Memory held by the device's lookup index now (its nodes are given back as the
    /// cache shrinks).
    pub index_bytes: u64,
}

/// A snapshot of the manager's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `pin` calls where some devices hit and others had to register.
    pub partial_hits: u64,
    /// Calls of [`crate::Manager::invalidate`] (and its deferred form) whose range
    /// overlapped a page of a registered (or in-flight) range on at least one device; calls
    /// that overlapped nothing are not counted (and not queued).
    pub invalidations: u64,
    /// Calls that invalidated everything (ring overflow, [`crate::Manager::invalidate_all`]).
    pub invalidate_all: u64,
    /// Per device, in attach order.
    pub devices: Vec<DeviceStats>,
}

impl Stats {
    /// The counters of one device.
    pub fn device(&self, id: impl Into<DeviceId>) -> Option<&DeviceStats> {
        let id = id.into();
        self.devices.iter().find(|d| d.id == id)
    }

    /// Sum of hits over all devices.
    pub fn hits(&self) -> u64 {
        self.devices.iter().map(|d| d.hits).sum()
    }

    /// Sum of misses over all devices.
    pub fn misses(&self) -> u64 {
        self.devices.iter().map(|d| d.misses).sum()
    }

    /// Sum of registrations over all devices.
    pub fn registrations(&self) -> u64 {
        self.devices.iter().map(|d| d.registrations).sum()
    }

    /// Sum of deregistrations over all devices.
    pub fn deregistrations(&self) -> u64 {
        self.devices.iter().map(|d| d.deregistrations).sum()
    }
}

/// A table, one line per device:
///
/// ```text
/// umm stats: 3 invalidations, 0 invalidate-all, 1 partial hits
///   device          hits  misses    regs  deregs   inval   evict  cached  registered
///   nic (dev#0)        2       1       1       1       1       0       0         0 B
/// ```
impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "umm stats: {} invalidations, {} invalidate-all, {} partial hits",
            self.invalidations, self.invalidate_all, self.partial_hits
        )?;
        writeln!(
            f,
            "  {:<20} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>12}",
            "device", "hits", "misses", "regs", "deregs", "inval", "evict", "cached", "registered"
        )?;
        for d in &self.devices {
            writeln!(
                f,
                "  {:<20} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>10} B{}",
                d.id.to_string(),
                d.hits,
                d.misses,
                d.registrations,
                d.deregistrations,
                d.invalidated_entries,
                d.evictions,
                d.cached_entries,
                d.registered_bytes,
                if d.deregistration_errors > 0 || d.queue_overflows > 0 {
                    format!(
                        "  ({} failed deregistrations, {} queue overflows)",
                        d.deregistration_errors, d.queue_overflows
                    )
                } else {
                    String::new()
                }
            )?;
        }
        Ok(())
    }
}
