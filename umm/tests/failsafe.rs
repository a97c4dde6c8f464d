//! Regression tests for the defects an adversarial review found in the core (issue 10):
//! each failed on the code before its fix (see the commit messages).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use common::{Arena, PAGE};
use umm::testing::{now, RecordingBackend};
use umm::{Capabilities, Config, Error, Manager, NotifierSource, Range};

/// Fake addresses (nothing is mapped there): the recording backend never touches memory.
fn unchecked() -> Config {
    Config {
        check_mapped: false,
        ..Config::default()
    }
}

fn fake(page: usize, pages: usize) -> Range {
    Range::new(0x7000_0000_0000 + page * PAGE, pages * PAGE).unwrap()
}

/// Runs `f` on a thread and fails (instead of hanging the suite) if it does not finish.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("{what}: did not finish in 120 s (deadlock?)"))
}

// 1. References never wrap.
#[test]
fn the_reference_count_saturates_instead_of_wrapping() {
    let m = Manager::new(unchecked());
    let d = RecordingBackend::new("d");
    let ledger = d.ledger();
    let d = m.attach(d).unwrap();
    let r = fake(0, 1);
    let held = m.pin(r, &[d.id()]).unwrap();
    let t = *held.translation(d).unwrap();
    let mut forgotten = 0u64;
    let refused = loop {
        match m.pin(r, &[d.id()]) {
            Ok(p) => {
                std::mem::forget(p);
                forgotten += 1;
                assert!(
                    forgotten < 1 << 24,
                    "2^24 references taken: the count wrapped"
                );
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, Error::TooManyPins { .. }), "{refused}");
    assert!(forgotten >= (1 << 22), "refused too early: {forgotten}");
    m.invalidate(r);
    m.flush();
    // The held pin's registration is still registered, its translation unchanged.
    assert_eq!(held.translation(d), Some(&t));
    assert!(ledger.live().contains_key(&t.id));
    assert_eq!(ledger.deregistrations(), 0);
}

// 2. An invalidation arriving while a no-overlap device absorbs its neighbours.
#[test]
fn an_invalidation_while_merging_is_not_lost() {
    let m: Arc<Manager> = Arc::new(Manager::default());
    let arena = Arena::new(8);
    let a = arena.pages(0, 2);
    let b = arena.pages(1, 2);
    let this: Arc<OnceLock<Weak<Manager>>> = Arc::new(OnceLock::new());
    let invalidated_at = Arc::new(AtomicUsize::new(0));
    let gpu = {
        let (this, at) = (this.clone(), invalidated_at.clone());
        RecordingBackend::new("cuda")
            .refusing_overlap()
            .with_deregister_hook(move |r| {
                // Another thread's invalidate(A) lands while A is being deregistered to make
                // room for B (here from inside the deregistration: the same window).
                if r == a {
                    if let Some(m) = this.get().and_then(Weak::upgrade) {
                        at.store(now() as usize, Ordering::SeqCst);
                        m.invalidate(a);
                    }
                }
            })
    };
    let gpu = m.attach(gpu).unwrap();
    this.set(Arc::downgrade(&m)).unwrap();
    drop(m.pin(a, &[gpu.id()]).unwrap());
    drop(m.pin(b, &[gpu.id()]).unwrap());
    assert!(invalidated_at.load(Ordering::SeqCst) > 0, "the hook ran");
    // The invalidating thread now unmaps and remaps A (hooks report before the unmap).
    let remapped_at = now();
    let p = m.pin(a, &[gpu.id()]).unwrap();
    let t = p.translation(gpu).unwrap();
    assert!(
        t.stamp > remapped_at,
        "pin(A) returned {t:?}, registered before A was remapped (at {remapped_at})"
    );
}

// 3. Ranges the index cannot express.
#[test]
fn invalidations_at_and_above_2_pow_48_are_not_dropped() {
    let m = Manager::new(unchecked());
    let d = RecordingBackend::new("d");
    let ledger = d.ledger();
    let d = m.attach(d).unwrap();
    let above = Range::new((1 << 48) + 0x10000, 2 * PAGE).unwrap();
    let straddling = Range::new((1 << 48) - PAGE, 2 * PAGE).unwrap();
    for r in [above, straddling] {
        let first = m
            .pin(r, &[d.id()])
            .unwrap()
            .translation(d)
            .copied()
            .unwrap();
        m.invalidate(r);
        let again = m.pin(r, &[d.id()]).unwrap();
        assert_ne!(again.translation(d).unwrap().id, first.id, "{r}: stale hit");
        assert!(!ledger.live().contains_key(&first.id) || again.is_valid());
    }
}

// 4. Unrelated deferred invalidations.
#[test]
fn unrelated_deferred_invalidations_do_not_wipe_the_cache() {
    let m = Manager::new(unchecked());
    let d = m.attach(RecordingBackend::new("d")).unwrap();
    for i in 0..100 {
        drop(m.pin(fake(2 * i, 1), &[d.id()]).unwrap());
    }
    m.invalidate_deferred(fake(0, 1));
    for i in 0..1100 {
        m.invalidate_deferred(fake(100_000 + 2 * i, 1)); // nothing registered there
    }
    m.flush();
    let s = m.stats();
    let dev = s.device(d).unwrap();
    assert_eq!(dev.cached_entries, 99, "{s:?}");
    assert_eq!(
        s.invalidations, 1,
        "only the call that overlapped something counts"
    );
    assert_eq!(dev.queue_overflows, 0);
    // A real overflow (more overlapping records than the queue holds) is counted.
    for i in 1..100 {
        for _ in 0..12 {
            m.invalidate_deferred(fake(2 * i, 1));
        }
    }
    m.flush();
    let dev = m.stats().device(d).unwrap().clone();
    assert!(dev.queue_overflows >= 1, "{dev:?}");
    assert_eq!(dev.cached_entries, 0);
}

// 5. Limits after release.
#[test]
fn limits_hold_once_pins_drop_without_another_miss() {
    let m = Manager::new(Config {
        max_cached_entries: 2,
        ..unchecked()
    });
    let d = RecordingBackend::new("d");
    let ledger = d.ledger();
    let d = m.attach(d).unwrap();
    let held: Vec<_> = (0..5)
        .map(|i| m.pin(fake(2 * i, 1), &[d.id()]).unwrap())
        .collect();
    assert_eq!(ledger.live().len(), 5, "pinned entries are never evicted");
    drop(held);
    assert_eq!(ledger.live().len(), 2, "evicted as the pins dropped");
    assert_eq!(m.stats().device(d).unwrap().registered_entries, 2);
}

// 6. Eviction work grows with evictions, not with pinned entries.
#[test]
fn misses_over_many_pinned_entries_stay_linear() {
    let m = Manager::new(Config {
        max_cached_entries: 100,
        ..unchecked()
    });
    let d = m.attach(RecordingBackend::new("d")).unwrap();
    let pinned = 2000;
    let held: Vec<_> = (0..pinned)
        .map(|i| m.pin(fake(2 * i, 1), &[d.id()]).unwrap())
        .collect();
    let misses = 2000;
    for i in 0..misses {
        drop(m.pin(fake(10_000 + 2 * i, 1), &[d.id()]).unwrap());
    }
    let s = m.stats().device(d).unwrap().clone();
    assert!(
        s.eviction_scans <= 4 * (pinned + misses) as u64,
        "{} entries examined for {misses} misses over {pinned} pinned: quadratic",
        s.eviction_scans
    );
    drop(held);
    assert!(m.stats().device(d).unwrap().registered_entries <= 100);
}

// 7a. Adjacent registrations are not merged.
#[test]
fn a_pin_overlapping_nothing_never_waits_for_an_adjacent_holder() {
    let arena = Arena::new(4);
    let m = Manager::new(Config {
        busy_timeout: Duration::from_millis(20),
        ..Config::default()
    });
    let gpu = m
        .attach(RecordingBackend::new("cuda").refusing_overlap())
        .unwrap();
    drop(m.pin(arena.pages(0, 1), &[gpu.id()]).unwrap());
    let held = m.pin(arena.pages(1, 1), &[gpu.id()]).unwrap();
    assert_eq!(held.registered_range(gpu), Some(arena.pages(1, 1)));
    m.invalidate(arena.pages(0, 2));
    let p = m
        .pin(arena.pages(0, 1), &[gpu.id()])
        .expect("adjacent to a held stale entry");
    assert_eq!(p.registered_range(gpu), Some(arena.pages(0, 1)));
}

// 7b. Merging respects the backend's maximum.
#[test]
fn merging_never_exceeds_the_maximum_registration() {
    let arena = Arena::new(8);
    let m = Manager::default();
    let gpu = RecordingBackend::new("cuda").with_capabilities(Capabilities {
        allows_overlap: false,
        max_registration: 2 * PAGE,
        ..Capabilities::default()
    });
    let ledger = gpu.ledger();
    let gpu = m.attach(gpu).unwrap();
    drop(m.pin(arena.pages(0, 2), &[gpu.id()]).unwrap());
    let p = m.pin(arena.pages(1, 2), &[gpu.id()]).unwrap();
    assert_eq!(p.registered_range(gpu), Some(arena.pages(1, 2)));
    assert!(
        ledger.live().values().all(|r| r.len() <= 2 * PAGE),
        "{:?}",
        ledger.live()
    );
}

// 8. Out of memory: LRU-first, only as much as needed.
#[test]
fn out_of_memory_evicts_least_recently_used_until_the_request_fits() {
    let m = Manager::new(unchecked());
    let d = RecordingBackend::new("d").with_byte_limit(10 * PAGE as u64);
    let ledger = d.ledger();
    let d = m.attach(d).unwrap();
    for i in 0..10 {
        drop(m.pin(fake(2 * i, 1), &[d.id()]).unwrap());
    }
    let p = m.pin(fake(100, 2), &[d.id()]).unwrap();
    assert!(p.is_valid());
    let s = m.stats().device(d).unwrap().clone();
    assert_eq!(s.evictions, 2, "{s:?}");
    let live: Vec<Range> = ledger.live().values().copied().collect();
    for i in 2..10 {
        assert!(live.contains(&fake(2 * i, 1)), "entry {i} kept: {live:?}");
    }
}

// 9. Dead registrations of other devices.
#[test]
fn a_miss_on_one_device_releases_the_dead_registrations_of_the_others() {
    let m = Manager::new(unchecked());
    let (nic, gpu) = (RecordingBackend::new("nic"), RecordingBackend::new("gpu"));
    let (ln, lg) = (nic.ledger(), gpu.ledger());
    let (nic, gpu) = (m.attach(nic).unwrap(), m.attach(gpu).unwrap());
    let r = fake(0, 4);
    drop(m.pin(r, &[nic.id(), gpu.id()]).unwrap());
    m.invalidate(r);
    drop(m.pin(fake(100, 1), &[nic.id()]).unwrap());
    assert_eq!(
        ln.live().len(),
        1,
        "the NIC keeps only the new registration"
    );
    assert!(
        lg.live().is_empty(),
        "the GPU's registration of the unmapped range: {:?}",
        lg.live()
    );
}

// 10a. A panicking deregistration leaks nothing.
#[test]
fn a_backend_panic_in_deregister_leaks_nothing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let m = Manager::new(unchecked());
    let d = {
        let calls = calls.clone();
        RecordingBackend::new("d").with_deregister_hook(move |_| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("backend bug (planted)");
            }
        })
    };
    let d = m.attach(d).unwrap();
    for i in 0..8 {
        drop(m.pin(fake(2 * i, 1), &[d.id()]).unwrap());
    }
    m.invalidate(fake(0, 16));
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.flush()));
    assert!(first.is_err(), "the planted panic propagates");
    m.flush();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        8,
        "each registration deregistered once"
    );
    assert_eq!(m.stats().device(d).unwrap().registered_entries, 0);
}

/// Counts watches and unwatches.
#[derive(Default)]
struct CountingSource {
    watches: AtomicUsize,
    unwatches: AtomicUsize,
}

impl NotifierSource for CountingSource {
    fn name(&self) -> &str {
        "counting"
    }
    fn watch(&self, _: u64, _: Range) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.watches.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn unwatch(&self, _: u64, _: Range) {
        self.unwatches.fetch_add(1, Ordering::SeqCst);
    }
}

// 10b. A panicking registration leaks nothing and leaves no registration "in flight".
#[test]
fn a_backend_panic_in_register_leaks_nothing() {
    let armed = Arc::new(AtomicBool::new(true));
    let m = Manager::new(unchecked());
    let source = Arc::new(CountingSource::default());
    m.add_source(source.clone()).unwrap();
    let d = {
        let armed = armed.clone();
        RecordingBackend::new("d").with_register_hook(move |_| {
            if armed.swap(false, Ordering::SeqCst) {
                panic!("backend bug (planted)");
            }
        })
    };
    let d = m.attach(d).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(m.pin(fake(0, 1), &[d.id()]));
    }));
    assert!(r.is_err());
    assert_eq!(
        source.watches.load(Ordering::SeqCst),
        source.unwatches.load(Ordering::SeqCst),
        "the watch made for the failed registration is undone"
    );
    m.invalidate(fake(1000, 1)); // overlaps nothing
    assert_eq!(
        m.stats().invalidations,
        0,
        "no registration is left in flight"
    );
    drop(m.pin(fake(0, 1), &[d.id()]).unwrap());
}

// 11. Re-entrancy from backend calls.
#[test]
fn pin_or_flush_from_inside_a_backend_call_does_not_deadlock() {
    let this: Arc<OnceLock<Weak<Manager>>> = Arc::new(OnceLock::new());
    let seen: Arc<parking_lot::Mutex<Vec<String>>> = Arc::default();
    let m = Arc::new(Manager::new(unchecked()));
    let d = {
        let (this, seen) = (this.clone(), seen.clone());
        let (this2, seen2) = (this.clone(), seen.clone());
        RecordingBackend::new("d")
            .with_deregister_hook(move |_| {
                let m = this.get().and_then(Weak::upgrade).unwrap();
                let dev = umm::DeviceId::clone(&m.stats().devices[0].id);
                let r = m.pin(fake(500, 1), &[dev]);
                seen.lock().push(format!("pin: {:?}", r.map(|_| ())));
            })
            .with_register_hook(move |r| {
                if r == fake(0, 1) {
                    let m = this2.get().and_then(Weak::upgrade).unwrap();
                    m.flush();
                    seen2.lock().push("flush returned".into());
                }
            })
    };
    let d = m.attach(d).unwrap();
    this.set(Arc::downgrade(&m)).unwrap();
    let m2 = m.clone();
    within("re-entrant calls", move || {
        drop(m2.pin(fake(0, 1), &[d.id()]).unwrap());
        m2.invalidate(fake(0, 1));
        m2.flush();
    });
    let seen = seen.lock().clone();
    assert!(seen.contains(&"flush returned".to_string()), "{seen:?}");
    assert!(
        seen.iter().any(|s| s.contains("Reentrant")),
        "pin inside deregister fails with Error::Reentrant: {seen:?}"
    );
}

// 12. The index gives nodes back.
#[test]
fn index_memory_follows_what_is_cached_not_what_ever_was() {
    let m = Manager::new(unchecked());
    let d = m.attach(RecordingBackend::new("d")).unwrap();
    let cycles = 20_000;
    for i in 0..cycles {
        // Fresh addresses 2 MiB apart: each needs its own leaf node.
        let r = Range::new(0x7100_0000_0000 + i * (2 << 20), PAGE).unwrap();
        drop(m.pin(r, &[d.id()]).unwrap());
        m.invalidate(r);
    }
    m.flush();
    let s = m.stats().device(d).unwrap().clone();
    assert_eq!(s.cached_entries, 0);
    assert!(
        s.index_bytes <= 64 * 4096,
        "index holds {} bytes after {cycles} cycles with nothing cached",
        s.index_bytes
    );
}

// 13. Invalidating everything is O(1) under the lock, and correct.
#[test]
fn invalidate_all_is_a_new_era_and_old_entries_are_still_released() {
    let m = Manager::new(unchecked());
    let d = RecordingBackend::new("d");
    let ledger = d.ledger();
    let d = m.attach(d).unwrap();
    for i in 0..10_000 {
        drop(m.pin(fake(2 * i, 1), &[d.id()]).unwrap());
    }
    let held = m.pin(fake(0, 1), &[d.id()]).unwrap();
    m.invalidate_all();
    assert!(!held.is_valid());
    let fresh = m.pin(fake(0, 1), &[d.id()]).unwrap();
    assert_ne!(fresh.translation(d), held.translation(d));
    drop(fresh);
    drop(held);
    m.flush();
    assert_eq!(
        ledger.live().len(),
        1,
        "only the fresh registration stays cached"
    );
    let s = m.stats();
    assert_eq!(s.device(d).unwrap().cached_entries, 1);
    assert_eq!(s.registrations(), s.deregistrations() + 1);
}

// The fork child's copy of a manager.
#[test]
fn a_fork_child_gets_nothing_from_the_parents_manager() {
    let m = Manager::new(unchecked());
    let d = RecordingBackend::new("d");
    let ledger = d.ledger();
    let d = m.attach(d).unwrap();
    drop(m.pin(fake(0, 1), &[d.id()]).unwrap());
    // SAFETY: the child only calls the manager (no locks are held at fork: single-threaded
    // here) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let refused = matches!(m.pin(fake(0, 1), &[d.id()]), Err(Error::ForkedChild { .. }));
        drop(m); // must not deregister the parent's registrations
        let kept = ledger.live().len() == 1 && ledger.deregistrations() == 0;
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(if refused && kept { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    assert!(m.pin(fake(0, 1), &[d.id()]).unwrap().is_valid());
}

// Issue 14: an owned pin, registration ids, names in errors, a readable Display.
#[test]
fn owned_pins_registration_ids_and_readable_errors() {
    let m = Arc::new(Manager::new(unchecked()));
    let nic = m.attach(RecordingBackend::new("rxe0")).unwrap();
    let r = fake(0, 2);
    let owned = std::thread::spawn({
        let m = m.clone();
        move || m.pin_owned(r, &[nic.id()]).unwrap()
    })
    .join()
    .unwrap();
    let hit = m.pin(r, &[nic.id()]).unwrap();
    let first = owned.registration_id(nic);
    assert!(first.is_some());
    assert_eq!(
        hit.registration_id(nic),
        first,
        "a hit shares the registration"
    );
    drop((hit, owned));
    m.invalidate(r);
    let fresh = m.pin(r, &[nic.id()]).unwrap();
    assert_ne!(fresh.registration_id(nic), first, "registered afresh");
    let other = Manager::default();
    let e = other.pin(r, &[nic.id()]).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("rxe0") && text.contains("not attached to this manager"),
        "{text}"
    );
    let table = m.stats().to_string();
    assert!(table.contains("rxe0 (dev#0)"), "{table}");
}

// The user documentation lists every variable Config::from_env reads.
#[test]
fn docs_configuration_lists_every_environment_variable() {
    let doc = include_str!("../../docs/configuration.md");
    for (name, _) in umm::manager::ENV_VARS {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/configuration.md lacks {name}"
        );
    }
}
