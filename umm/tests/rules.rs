//! One test per documented rule of the manager, with the recording backend.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Arena, PAGE};
use parking_lot::Mutex;
use umm::testing::{Call, RecordingBackend};
use umm::{
    BackendErrorKind, Capabilities, Config, Error, InvalidationSink, Manager, NotifierSource, Range,
};

#[test]
fn hit_calls_no_backend_and_covers_sub_ranges() {
    let arena = Arena::new(64);
    let m = Manager::default();
    let nic = RecordingBackend::new("nic");
    let ledger = nic.ledger();
    let nic = m.attach(nic).unwrap();
    let big = arena.pages(4, 8);
    let p1 = m.pin(big, &[nic.id()]).unwrap();
    assert_eq!(ledger.registrations(), 1);
    let t1 = *p1.translation(nic).unwrap();
    assert_eq!(t1.range, big);
    // Whole range, an unaligned sub-range and the last byte: all hits on the same registration.
    for r in [
        big,
        arena.bytes(5 * PAGE + 17, 3000),
        arena.bytes(12 * PAGE - 1, 1),
    ] {
        let p = m.pin(r, &[nic.id()]).unwrap();
        assert_eq!(p.translation(nic).unwrap().id, t1.id);
        assert_eq!(p.offset(nic).unwrap(), r.start() - big.start());
        assert_eq!(p.registered_range(nic), Some(big));
        assert!(p.is_valid());
    }
    assert_eq!(ledger.registrations(), 1);
    let s = m.stats();
    assert_eq!((s.hits(), s.misses()), (3, 1));
    drop(p1);
    // Unreferenced entries stay cached.
    let p = m.pin(arena.pages(6, 1), &[nic.id()]).unwrap();
    assert_eq!(p.translation(nic).unwrap().id, t1.id);
    assert_eq!(ledger.deregistrations(), 0);
}

#[test]
fn hit_counts_are_exact_past_the_wrap_of_a_stripe_word() {
    let arena = Arena::new(2);
    let m = Manager::default();
    let nic = m.attach(RecordingBackend::new("nic")).unwrap();
    // Each stripe word counts 256 hits before carrying into its chunk; a second thread
    // counts on another stripe.
    drop(m.pin(arena.pages(0, 1), &[nic.id()]).unwrap());
    for _ in 0..1000 {
        drop(m.pin(arena.pages(0, 1), &[nic.id()]).unwrap());
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..700 {
                drop(m.pin(arena.pages(0, 1), &[nic.id()]).unwrap());
            }
        });
    });
    let stats = m.stats();
    assert_eq!((stats.hits(), stats.misses()), (1700, 1));
}

#[test]
fn unaligned_request_is_rounded_out_to_pages() {
    let arena = Arena::new(8);
    let m = Manager::default();
    let d = m.attach(RecordingBackend::new("d")).unwrap();
    let p = m.pin(arena.bytes(PAGE + 100, PAGE), &[d.id()]).unwrap();
    assert_eq!(p.registered_range(d), Some(arena.pages(1, 2)));
    assert_eq!(p.range(), arena.bytes(PAGE + 100, PAGE));
    assert_eq!(p.offset(d), Some(100));
}

#[test]
fn partial_hit_registers_only_the_missing_device() {
    let arena = Arena::new(16);
    let m = Manager::default();
    let (a, b) = (RecordingBackend::new("a"), RecordingBackend::new("b"));
    let (la, lb) = (a.ledger(), b.ledger());
    let (a, b) = (m.attach(a).unwrap(), m.attach(b).unwrap());
    let r = arena.pages(2, 2);
    drop(m.pin(r, &[a.id()]).unwrap());
    let p = m.pin(r, &[a.id(), b.id()]).unwrap();
    assert_eq!((la.registrations(), lb.registrations()), (1, 1));
    assert!(p.translation(a).is_some() && p.translation(b).is_some());
    let s = m.stats();
    assert_eq!(s.partial_hits, 1);
    assert_eq!(s.device(a).unwrap().hits, 1);
    assert_eq!(s.device(b).unwrap().misses, 1);
}

#[test]
fn overlapping_misses_stay_separate_where_the_device_allows_overlap() {
    let arena = Arena::new(16);
    let m = Manager::default();
    let d = RecordingBackend::new("verbs");
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    let _p1 = m.pin(arena.pages(0, 4), &[d.id()]).unwrap();
    let p2 = m.pin(arena.pages(2, 4), &[d.id()]).unwrap();
    assert_eq!(p2.registered_range(d), Some(arena.pages(2, 4)));
    assert_eq!(l.registrations(), 2);
    assert_eq!(l.deregistrations(), 0);
    // Both stay findable: the older one through the locked path.
    let p3 = m.pin(arena.pages(0, 2), &[d.id()]).unwrap();
    assert_eq!(p3.registered_range(d), Some(arena.pages(0, 4)));
    assert_eq!(l.registrations(), 2);
}

#[test]
fn overlapping_misses_merge_and_adjacent_ones_stay_apart_where_the_device_refuses_overlap() {
    let arena = Arena::new(32);
    let m = Manager::default();
    let gpu = RecordingBackend::new("cuda").refusing_overlap();
    let l = gpu.ledger();
    let gpu = m.attach(gpu).unwrap();
    drop(m.pin(arena.pages(0, 4), &[gpu.id()]).unwrap());
    // Overlapping: [0,4) and [2,6) become one registration of [0,6).
    let p = m.pin(arena.pages(2, 4), &[gpu.id()]).unwrap();
    assert_eq!(p.registered_range(gpu), Some(arena.pages(0, 6)));
    drop(p);
    // Adjacent: [6,8) is registered on its own (CUDA accepts adjacent registrations).
    let p = m.pin(arena.pages(6, 2), &[gpu.id()]).unwrap();
    assert_eq!(p.registered_range(gpu), Some(arena.pages(6, 2)));
    assert_eq!(l.registrations(), 3);
    assert_eq!(l.deregistrations(), 1);
    assert!(l.calls().iter().all(|c| !matches!(c, Call::Refused(..))));
    assert_eq!(l.live().len(), 2);
    assert_eq!(m.stats().device(gpu).unwrap().merges, 1);
}

#[test]
fn an_unmapped_neighbour_is_dropped_not_merged() {
    let arena = Arena::new(16);
    let m = Manager::default();
    let gpu = RecordingBackend::new("cuda").refusing_overlap();
    let l = gpu.ledger();
    let gpu = m.attach(gpu).unwrap();
    drop(m.pin(arena.pages(0, 4), &[gpu.id()]).unwrap());
    // Half of it goes away and no source reports it.
    // SAFETY: unmaps two pages of our own arena.
    unsafe { libc::munmap(arena.base as *mut libc::c_void, 2 * PAGE) };
    // [2,6) overlaps the cached [0,4), whose first half is gone: it is dropped, not merged.
    let p = m.pin(arena.pages(2, 4), &[gpu.id()]).unwrap();
    assert_eq!(p.registered_range(gpu), Some(arena.pages(2, 4)));
    assert_eq!((l.registrations(), l.deregistrations()), (2, 1));
    let s = m.stats();
    assert_eq!(
        (s.devices[0].merges, s.devices[0].invalidated_entries),
        (0, 1)
    );
}

#[test]
fn pinned_overlap_on_no_overlap_device_waits_then_fails_typed() {
    let arena = Arena::new(16);
    let m = Manager::new(Config {
        busy_timeout: Duration::from_millis(30),
        ..Config::default()
    });
    let gpu = RecordingBackend::new("cuda").refusing_overlap();
    let l = gpu.ledger();
    let gpu = m.attach(gpu).unwrap();
    let held = m.pin(arena.pages(0, 4), &[gpu.id()]).unwrap();
    // A live pinned entry overlapping the request.
    match m.pin(arena.pages(2, 4), &[gpu.id()]) {
        Err(Error::DeviceRangeBusy {
            device,
            range,
            holder,
            waited,
        }) => {
            assert_eq!(device, gpu.id());
            assert_eq!(range, arena.pages(2, 4));
            assert_eq!(holder, arena.pages(0, 4));
            assert!(waited >= Duration::from_millis(30));
        }
        other => panic!("expected DeviceRangeBusy, got {other:?}"),
    }
    // Now the stale case: invalidated but still pinned.
    m.invalidate(arena.pages(0, 1));
    assert!(!held.is_valid());
    let err = m.pin(arena.pages(0, 4), &[gpu.id()]).unwrap_err();
    assert!(matches!(err, Error::DeviceRangeBusy { .. }), "{err}");
    assert!(err.to_string().contains("still pinned"));
    // The holder is released by another thread while we wait: the pin then succeeds with a
    // fresh registration, after the stale one was deregistered.
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(5));
            drop(held);
        });
        let p = loop {
            match m.pin(arena.pages(0, 4), &[gpu.id()]) {
                Ok(p) => break p,
                Err(Error::DeviceRangeBusy { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        };
        let t = *p.translation(gpu).unwrap();
        assert_eq!(t.id, 2);
        let calls = l.calls();
        let dereg = calls
            .iter()
            .position(|c| matches!(c, Call::Deregister(t) if t.id == 1))
            .expect("stale registration deregistered");
        let reg = calls
            .iter()
            .position(|c| matches!(c, Call::Register(t) if t.id == 2))
            .unwrap();
        assert!(dereg < reg, "deregister stale before registering fresh");
    });
    assert_eq!(l.bad_deregistrations(), 0);
}

#[test]
fn invalidation_fans_out_to_every_device_exactly_once() {
    let arena = Arena::new(16);
    let m = Manager::default();
    let backends: Vec<_> = (0..3)
        .map(|i| RecordingBackend::new(&format!("d{i}")))
        .collect();
    let ledgers: Vec<_> = backends.iter().map(|b| b.ledger()).collect();
    let ids: Vec<_> = backends
        .into_iter()
        .map(|b| m.attach(b).unwrap().id())
        .collect();
    let r = arena.pages(1, 3);
    drop(m.pin(r, &ids).unwrap());
    // The same event reported by several sources, and an overlapping one.
    m.invalidate(r);
    m.invalidate(r);
    m.invalidate(arena.pages(2, 1));
    m.invalidate_deferred(r);
    m.flush();
    for l in &ledgers {
        assert_eq!((l.registrations(), l.deregistrations()), (1, 1));
        assert_eq!(l.bad_deregistrations(), 0);
    }
    let s = m.stats();
    assert_eq!(s.invalidations, 1, "only the first report found entries");
    for d in &s.devices {
        assert_eq!((d.invalidated_entries, d.registered_entries), (1, 0));
    }
    // Re-pin: a miss on every device with fresh registrations.
    let p = m.pin(r, &ids).unwrap();
    assert_eq!(m.stats().misses(), 6);
    drop(p);
    for l in &ledgers {
        assert_eq!(l.registrations(), 2);
    }
}

#[test]
fn deferred_invalidation_is_seen_by_the_next_pin() {
    let arena = Arena::new(8);
    let m = Manager::default();
    let d = RecordingBackend::new("d");
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    let r = arena.pages(0, 2);
    let first = m.pin(r, &[d.id()]).unwrap().translation(d).unwrap().id;
    m.invalidate_deferred(arena.pages(1, 1));
    let p = m.pin(r, &[d.id()]).unwrap();
    assert_ne!(p.translation(d).unwrap().id, first);
    assert_eq!((l.registrations(), l.deregistrations()), (2, 1));
}

#[test]
fn pinned_stale_entry_is_deregistered_when_the_last_pin_drops() {
    let arena = Arena::new(8);
    let m = Manager::default();
    let d = RecordingBackend::new("d");
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    let r = arena.pages(0, 2);
    let p1 = m.pin(r, &[d.id()]).unwrap();
    let p2 = m.pin(r, &[d.id()]).unwrap();
    m.invalidate(arena.bytes(PAGE + 5, 1));
    assert!(!p1.is_valid() && !p2.is_valid());
    // The translation stays usable (memory-safe) while held.
    assert_eq!(p1.translation(d).unwrap().range, r);
    m.flush();
    assert_eq!(l.deregistrations(), 0, "still pinned");
    // A new pin of the same range registers afresh.
    let p3 = m.pin(r, &[d.id()]).unwrap();
    assert_ne!(p3.translation(d).unwrap().id, p1.translation(d).unwrap().id);
    drop(p1);
    assert_eq!(l.deregistrations(), 0);
    drop(p2);
    assert_eq!(l.deregistrations(), 1, "last pin drop deregisters");
    assert!(p3.is_valid());
}

#[test]
fn invalidating_unrelated_memory_keeps_hits_fast_path() {
    let arena = Arena::new(64);
    let m = Manager::default();
    let d = m.attach(RecordingBackend::new("d")).unwrap();
    drop(m.pin(arena.pages(0, 2), &[d.id()]).unwrap());
    m.invalidate(arena.pages(32, 8));
    assert_eq!(m.stats().invalidations, 0, "nothing registered there");
    let p = m.pin(arena.pages(0, 2), &[d.id()]).unwrap();
    assert!(p.is_valid());
    assert_eq!(m.stats().hits(), 1);
}

#[test]
fn lru_evicts_least_recently_used_unreferenced_entries() {
    let arena = Arena::new(64);
    let m = Manager::new(Config {
        max_cached_entries: 3,
        ..Config::default()
    });
    let d = RecordingBackend::new("d");
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    let r = |i: usize| arena.pages(i * 2, 1);
    for i in 0..3 {
        drop(m.pin(r(i), &[d.id()]).unwrap());
    }
    // Touch 0 so that 1 is the least recently used.
    drop(m.pin(r(0), &[d.id()]).unwrap());
    drop(m.pin(r(3), &[d.id()]).unwrap());
    let live: Vec<Range> = l.live().values().copied().collect();
    assert_eq!(live.len(), 3);
    assert!(!live.contains(&r(1)), "entry 1 evicted: {live:?}");
    assert!(live.contains(&r(0)) && live.contains(&r(2)) && live.contains(&r(3)));
    assert_eq!(m.stats().device(d).unwrap().evictions, 1);
    // Pinned entries are never evicted: hold 4 pins, limit 3.
    let held: Vec<_> = (4..8).map(|i| m.pin(r(i), &[d.id()]).unwrap()).collect();
    assert!(held.iter().all(|p| p.is_valid()));
    assert_eq!(l.live().len(), 4);
}

#[test]
fn lru_respects_the_byte_limit() {
    let arena = Arena::new(64);
    let m = Manager::new(Config {
        max_cached_bytes: (8 * PAGE) as u64,
        ..Config::default()
    });
    let d = RecordingBackend::new("d");
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    for i in 0..6 {
        drop(m.pin(arena.pages(i * 4, 4), &[d.id()]).unwrap());
        assert!(l.live_bytes() <= (8 * PAGE) as u64);
    }
    assert_eq!(
        m.stats().device(d).unwrap().registered_bytes,
        l.live_bytes()
    );
}

#[test]
fn out_of_memory_evicts_and_retries_once_then_names_the_limit() {
    let arena = Arena::new(64);
    let m = Manager::default();
    let d = RecordingBackend::new("verbs").with_byte_limit((4 * PAGE) as u64);
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    drop(m.pin(arena.pages(0, 2), &[d.id()]).unwrap());
    drop(m.pin(arena.pages(4, 2), &[d.id()]).unwrap());
    // Full: the next one succeeds after evicting the unreferenced entries.
    let p = m.pin(arena.pages(8, 3), &[d.id()]).unwrap();
    assert!(p.is_valid());
    assert_eq!(m.stats().device(d).unwrap().evictions, 2);
    // Pinned memory cannot be evicted: a typed error naming RLIMIT_MEMLOCK and sizes.
    let err = m.pin(arena.pages(16, 2), &[d.id()]).unwrap_err();
    match &err {
        Error::MemlockLimit {
            device,
            range,
            registered_bytes,
            source,
            ..
        } => {
            assert_eq!(*device, d.id());
            assert_eq!(*range, arena.pages(16, 2));
            assert_eq!(*registered_bytes, (3 * PAGE) as u64);
            assert_eq!(source.kind, BackendErrorKind::OutOfMemory);
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("RLIMIT_MEMLOCK") && text.contains("12288 bytes registered"),
        "{text}"
    );
    assert_eq!(l.live_bytes(), (3 * PAGE) as u64, "no registration leaked");
}

#[test]
fn bad_input_gets_typed_errors() {
    let arena = Arena::new(8);
    let m = Manager::default();
    let other = Manager::default();
    let d = m.attach(RecordingBackend::new("d")).unwrap();
    let foreign = other.attach(RecordingBackend::new("x")).unwrap();
    assert!(matches!(
        Range::new(arena.base, 0),
        Err(Error::EmptyRange { .. })
    ));
    assert!(matches!(
        Range::new(usize::MAX, 2),
        Err(Error::RangeOverflow { .. })
    ));
    let top = Range::new(usize::MAX - 10, 5).unwrap();
    assert!(matches!(
        m.pin(top, &[d.id()]),
        Err(Error::RangeOverflow { .. })
    ));
    // The foreign manager's device 0 is a different device; its typed handle is refused.
    assert!(matches!(m.backend(foreign), Err(Error::UnknownDevice(_))));
    let p = m.pin(arena.pages(0, 1), &[d.id()]).unwrap();
    assert!(p.translation(foreign).is_none());
    drop(p);
    assert!(matches!(
        m.pin(arena.pages(0, 1), &[d.id(), d.id()]),
        Err(Error::BadDeviceList { .. })
    ));
    // Unmapped memory: a hole in the middle of the arena.
    // SAFETY: unmaps two pages of our own arena.
    unsafe { libc::munmap((arena.base + 4 * PAGE) as *mut libc::c_void, 2 * PAGE) };
    match m.pin(arena.pages(3, 2), &[d.id()]) {
        Err(Error::Unmapped { range }) => assert_eq!(range, arena.pages(3, 2)),
        other => panic!("{other:?}"),
    }
    // A device that fails on unmapped memory itself (as verbs does) is asked directly, no
    // msync first; its failure is still reported as the unmapped range.
    let verbs_like = RecordingBackend::new("v").rejecting_unmapped();
    let ledger = verbs_like.ledger();
    let v = m.attach(verbs_like).unwrap();
    match m.pin(arena.pages(3, 2), &[v.id()]) {
        Err(Error::Unmapped { range }) => assert_eq!(range, arena.pages(3, 2)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ledger.calls()[..],
        [Call::Refused(r, BackendErrorKind::BadAddress)] if r == arena.pages(3, 2)
    ));
    assert!(m.pin(arena.pages(0, 1), &[v.id()]).is_ok());
    let small = Manager::default();
    let capped = small
        .attach(RecordingBackend::new("c").with_capabilities(Capabilities {
            max_registration: PAGE,
            ..Capabilities::default()
        }))
        .unwrap();
    assert!(matches!(
        small.pin(arena.pages(0, 2), &[capped.id()]),
        Err(Error::TooLarge { max: PAGE, .. })
    ));
    assert_eq!(m.stats().registrations(), 2);
}

#[test]
fn unknown_device_id_is_refused() {
    let m = Manager::default();
    let other = Manager::default();
    let mine = m.attach(RecordingBackend::new("mine")).unwrap();
    let a = other.attach(RecordingBackend::new("a")).unwrap();
    let b = other.attach(RecordingBackend::new("b")).unwrap();
    let arena = Arena::new(2);
    // An index this manager does not have, and one it has (0) but from another manager.
    for foreign in [b.id(), a.id()] {
        assert!(matches!(
            m.pin(arena.pages(0, 1), &[mine.id(), foreign]),
            Err(Error::UnknownDevice(id)) if id == foreign
        ));
    }
    assert_eq!(a.id().index(), mine.id().index());
    assert_eq!(m.stats().registrations(), 0);
}

#[test]
fn backend_that_unmaps_while_registering_does_not_deadlock_and_is_not_stale() {
    // The backend invalidates (as a notifier thread would, while this thread holds the
    // device lock) the range being registered: the registration is thrown away and retried.
    let arena = Arena::new(8);
    let m = Arc::new(Manager::default());
    let weak = Arc::downgrade(&m);
    let fire = Arc::new(AtomicUsize::new(1));
    let fire2 = fire.clone();
    let d = RecordingBackend::new("d").with_register_hook(move |r| {
        if fire2.fetch_sub(1, Ordering::SeqCst) == 1 {
            let m = weak.upgrade().unwrap();
            // From another thread, with a timeout: it must not wait for our lock.
            let h = std::thread::spawn(move || m.invalidate(r));
            let t0 = std::time::Instant::now();
            while !h.is_finished() {
                assert!(t0.elapsed() < Duration::from_secs(10), "invalidate blocked");
                std::thread::sleep(Duration::from_millis(1));
            }
            h.join().unwrap();
        }
    });
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    let p = m.pin(arena.pages(0, 2), &[d.id()]).unwrap();
    assert!(p.is_valid());
    assert_eq!(l.registrations(), 2, "first registration discarded");
    assert_eq!(l.deregistrations(), 1);
    assert_eq!(p.translation(d).unwrap().id, 2);
}

/// A source with an asynchronous ring and a generation counter, like the kernel module.
#[derive(Default)]
struct RingSource {
    generation: AtomicU64,
    ring: Mutex<Vec<Option<Range>>>,
    watches: Mutex<Vec<(u64, Range)>>,
    unwatches: AtomicUsize,
    refuse: std::sync::atomic::AtomicBool,
}

impl RingSource {
    fn event(&self, r: Option<Range>) {
        self.ring.lock().push(r);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl NotifierSource for RingSource {
    fn name(&self) -> &str {
        "ring"
    }
    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err("refused".into());
        }
        self.watches.lock().push((cookie, range));
        Ok(())
    }
    fn unwatch(&self, cookie: u64, _range: Range) {
        self.watches.lock().retain(|(c, _)| *c != cookie);
        self.unwatches.fetch_add(1, Ordering::SeqCst);
    }
    fn generation(&self) -> Option<&AtomicU64> {
        Some(&self.generation)
    }
    fn drain(&self, sink: &dyn InvalidationSink) {
        for e in std::mem::take(&mut *self.ring.lock()) {
            match e {
                Some(r) => sink.invalidate(r),
                None => sink.invalidate_all(),
            }
        }
    }
}

#[test]
fn hit_checks_the_source_generation_and_drains_it() {
    let arena = Arena::new(8);
    let m = Manager::default();
    let src = Arc::new(RingSource::default());
    m.add_source(src.clone()).unwrap();
    let d = RecordingBackend::new("d");
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    let r = arena.pages(0, 2);
    drop(m.pin(r, &[d.id()]).unwrap());
    assert_eq!(src.watches.lock().len(), 1);
    // The "kernel" records an event; nobody drained it yet: the next pin must not hit.
    src.event(Some(arena.pages(1, 1)));
    let p = m.pin(r, &[d.id()]).unwrap();
    assert_eq!(l.registrations(), 2);
    assert_eq!(l.deregistrations(), 1);
    assert_eq!(src.unwatches.load(Ordering::SeqCst), 1);
    // A pin that is still held sees the event through is_valid.
    src.event(None);
    assert!(!p.is_valid());
    assert_eq!(m.stats().invalidate_all, 1);
    drop(p);
    m.flush();
    assert_eq!(l.live().len(), 0);
    assert!(src.watches.lock().is_empty(), "every watch undone");
}

#[test]
fn a_source_that_cannot_watch_fails_the_pin_without_leaking() {
    let arena = Arena::new(4);
    let m = Manager::default();
    let src = Arc::new(RingSource::default());
    src.refuse.store(true, Ordering::SeqCst);
    m.add_source(src.clone()).unwrap();
    let d = RecordingBackend::new("d");
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    let err = m.pin(arena.pages(0, 1), &[d.id()]).unwrap_err();
    assert!(matches!(err, Error::Watch { ref source_name, .. } if source_name == "ring"));
    assert_eq!(l.registrations(), 0);
}

#[test]
fn reaper_deregisters_stale_entries_without_flush() {
    let arena = Arena::new(4);
    let m = Arc::new(Manager::default());
    let reaper = m.start_reaper(Duration::from_millis(2));
    let d = RecordingBackend::new("d");
    let l = d.ledger();
    let d = m.attach(d).unwrap();
    drop(m.pin(arena.pages(0, 1), &[d.id()]).unwrap());
    m.invalidate_deferred(arena.pages(0, 1));
    let t0 = std::time::Instant::now();
    while l.deregistrations() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "reaper never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(reaper);
    assert_eq!(Arc::strong_count(&m), 1, "reaper holds no strong reference");
}

#[test]
fn dropping_the_manager_deregisters_everything() {
    let arena = Arena::new(16);
    let (a, b) = (
        RecordingBackend::new("a"),
        RecordingBackend::new("b").refusing_overlap(),
    );
    let (la, lb) = (a.ledger(), b.ledger());
    {
        let m = Manager::default();
        let (a, b) = (m.attach(a).unwrap(), m.attach(b).unwrap());
        for i in 0..4 {
            drop(m.pin(arena.pages(i * 3, 2), &[a.id(), b.id()]).unwrap());
        }
        let p = m.pin(arena.pages(0, 1), &[a.id()]).unwrap();
        m.invalidate(arena.pages(0, 1));
        drop(p);
    }
    for l in [la, lb] {
        assert_eq!(l.registrations(), l.deregistrations());
        assert!(l.live().is_empty());
        assert_eq!(l.bad_deregistrations(), 0);
    }
}

#[test]
fn seed_scenario_file_remapped_at_the_same_address() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir();
    let mk = |name: &str, byte: u8| {
        let path = dir.join(format!("umm-seed-{}-{name}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![byte; 4 * PAGE]).unwrap();
        drop(f);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    };
    let (f1, f2) = (mk("f1", b'1'), mk("f2", b'2'));
    let map = |f: &std::fs::File, at: usize| {
        // SAFETY: maps a file we own, at a fresh address or over our own mapping (MAP_FIXED).
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                4 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | if at != 0 { libc::MAP_FIXED } else { 0 },
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    };
    let m = Manager::default();
    let nic = RecordingBackend::new("nic");
    let l = nic.ledger();
    let nic = m.attach(nic).unwrap();
    let b = map(&f1, 0);
    let r = Range::new(b, 4 * PAGE).unwrap();
    let first = m
        .pin(r, &[nic.id()])
        .unwrap()
        .translation(nic)
        .copied()
        .unwrap();
    // SAFETY: unmapping our own mapping, then mapping F2 at the same address.
    unsafe { libc::munmap(b as *mut libc::c_void, 4 * PAGE) };
    m.invalidate(r); // the manual source: the application knows
    assert_eq!(map(&f2, b), b);
    let p = m.pin(r, &[nic.id()]).unwrap();
    let second = *p.translation(nic).unwrap();
    assert_ne!(
        second.id, first.id,
        "a miss with a fresh registration, never F1's"
    );
    assert_eq!(l.deregistrations(), 1);
    // SAFETY: reading our own mapping.
    assert_eq!(unsafe { *(b as *const u8) }, b'2');
    drop(p);
    // Without any invalidation the cache cannot know: the old translation would be
    // returned. That is the bug notifier sources exist for.
    let before = m
        .pin(r, &[nic.id()])
        .unwrap()
        .translation(nic)
        .copied()
        .unwrap();
    // SAFETY: as above.
    unsafe { libc::munmap(b as *mut libc::c_void, 4 * PAGE) };
    assert_eq!(map(&f1, b), b);
    let stale = m
        .pin(r, &[nic.id()])
        .unwrap()
        .translation(nic)
        .copied()
        .unwrap();
    assert_eq!(stale.id, before.id);
    // SAFETY: cleanup of our own mapping.
    unsafe { libc::munmap(b as *mut libc::c_void, 4 * PAGE) };
}
