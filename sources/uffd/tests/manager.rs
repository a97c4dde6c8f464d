//! The userfaultfd source through a `Manager` with the recording backend: the seed
//! scenario on anonymous memory, and a backend whose `register` unmaps watched memory.
//! Every blocking step runs under a watchdog that fails the test instead of hanging.

mod common;

use common::{source, within_limit};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use umm::testing::RecordingBackend;
use umm::{Manager, Range};
use umm_uffd::Options;

fn map_at(at: usize, len: usize, byte: u8) -> usize {
    let fixed = if at == 0 { 0 } else { libc::MAP_FIXED };
    // SAFETY: a private anonymous mapping; with MAP_FIXED only over memory of this test.
    let p = unsafe {
        libc::mmap(
            at as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the fresh mapping is `len` bytes long.
    unsafe { std::ptr::write_bytes(p as *mut u8, byte, len) };
    p as usize
}

#[test]
fn seed_scenario_second_pin_is_a_fresh_registration() {
    let _serial = common::serial();
    let Some(source) = source(Options::default()) else {
        return;
    };
    within_limit("seed scenario", Duration::from_secs(30), move || {
        let manager = Manager::default();
        let backend = RecordingBackend::new("rec");
        let ledger = backend.ledger();
        let dev = manager.attach(backend).unwrap();
        manager.add_source(source.clone()).unwrap();
        let len = 16 * umm::page_size();
        let b = map_at(0, len, 1);
        let range = Range::new(b, len).unwrap();
        let first = manager
            .pin(range, &[dev.id()])
            .unwrap()
            .translation(dev)
            .unwrap()
            .id;
        // SAFETY: unmaps the test's mapping, no longer pinned.
        unsafe { libc::munmap(b as *mut _, len) };
        assert_eq!(map_at(b, len, 2), b);
        let pin = manager.pin(range, &[dev.id()]).unwrap();
        assert_ne!(
            pin.translation(dev).unwrap().id,
            first,
            "the stale registration came back"
        );
        drop(pin);
        manager.flush();
        assert_eq!((manager.stats().hits(), manager.stats().misses()), (0, 2));
        assert_eq!(ledger.deregistrations(), 1);
        assert_eq!(ledger.bad_deregistrations(), 0);
        assert!(source.stats().unmap_events >= 1);
        // SAFETY: the test's mapping.
        unsafe { libc::munmap(b as *mut _, len) };
    });
}

#[test]
fn register_that_unmaps_watched_memory_does_not_deadlock() {
    let _serial = common::serial();
    let Some(source) = source(Options::default()) else {
        return;
    };
    within_limit(
        "pins whose register() unmaps a watched, registered range",
        Duration::from_secs(30),
        move || {
            let manager = Manager::default();
            let len = 16 * umm::page_size();
            let victim = map_at(0, len, 3);
            let calls = Arc::new(AtomicUsize::new(0));
            let c = calls.clone();
            let backend = RecordingBackend::new("unmapping").with_register_hook(move |range| {
                // The second registration unmaps the first (registered and watched) range,
                // and empties a page of the range being registered.
                if c.fetch_add(1, Ordering::SeqCst) == 1 {
                    // SAFETY: test memory; the victim is not pinned any more.
                    unsafe {
                        libc::munmap(victim as *mut _, len);
                        libc::madvise(
                            range.start() as *mut _,
                            umm::page_size(),
                            libc::MADV_DONTNEED,
                        );
                    }
                }
            });
            let ledger = backend.ledger();
            let dev = manager.attach(backend).unwrap();
            manager.add_source(source.clone()).unwrap();
            drop(
                manager
                    .pin(Range::new(victim, len).unwrap(), &[dev.id()])
                    .unwrap(),
            );
            let other = map_at(0, len, 4);
            // The registration raced with an invalidation of its own range: the core may retry
            // or report it; it must not hang.
            let _ = manager
                .pin(Range::new(other, len).unwrap(), &[dev.id()])
                .map(drop);
            assert!(calls.load(Ordering::SeqCst) >= 2);
            let hits = manager.stats().hits();
            let again = map_at(victim, len, 5);
            assert_eq!(again, victim);
            drop(
                manager
                    .pin(Range::new(victim, len).unwrap(), &[dev.id()])
                    .unwrap(),
            );
            assert_eq!(
                manager.stats().hits(),
                hits,
                "the unmapped victim was a hit"
            );
            manager.flush();
            manager.evict_unreferenced();
            manager.flush();
            assert_eq!(ledger.bad_deregistrations(), 0);
            assert_eq!(ledger.registrations(), ledger.deregistrations());
            // SAFETY: the test's mappings.
            unsafe {
                libc::munmap(victim as *mut _, len);
                libc::munmap(other as *mut _, len);
            }
        },
    );
}

#[test]
fn a_second_manager_is_refused_until_the_first_detaches() {
    let _serial = common::serial();
    let Some(source) = source(Options::default()) else {
        return;
    };
    let first = Manager::default();
    let second = Manager::default();
    first.add_source(source.clone()).unwrap();
    match second.add_source(source.clone()) {
        Err(umm::Error::Source { source: e, .. }) => {
            assert!(
                matches!(
                    e.downcast_ref::<umm_uffd::UffdError>(),
                    Some(umm_uffd::UffdError::AlreadyAttached { .. })
                ),
                "{e:?}"
            );
        }
        other => panic!("a second manager was not refused: {other:?}"),
    }
    // The same manager twice is a second attachment too.
    assert!(first.add_source(source.clone()).is_err());
    // The first manager's watches end with it; the source can serve another one then.
    let dev = first.attach(RecordingBackend::new("rec")).unwrap();
    let len = 4 * umm::page_size();
    let b = map_at(0, len, 1);
    drop(first.pin(Range::new(b, len).unwrap(), &[dev.id()]).unwrap());
    assert_eq!(source.stats().watches, 1);
    drop(first);
    assert_eq!(
        source.stats().watches,
        0,
        "the first manager's watches outlived it"
    );
    second.add_source(source.clone()).unwrap();
    // SAFETY: the test's mapping.
    unsafe { libc::munmap(b as *mut _, len) };
}
