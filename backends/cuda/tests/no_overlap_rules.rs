//! The core's rules for devices that refuse overlapping registrations, which the CUDA
//! backend relies on, run everywhere with a recording stand-in that refuses overlaps the
//! way CUDA does (`HOST_MEMORY_ALREADY_REGISTERED`). The same sequences run on a real GPU
//! in `tests/gpu.rs`.

#[path = "../../vulkan/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::FileMapping;
use umm::testing::{Call, RecordingBackend};
use umm::{Config, Error, Manager, Range};

const PAGE: usize = 4096;

fn cuda_like() -> RecordingBackend {
    RecordingBackend::new("cuda-like").refusing_overlap()
}

#[test]
fn overlapping_misses_merge_and_adjacent_ones_stay_apart() {
    let manager = Manager::default();
    let rec = cuda_like();
    let ledger = rec.ledger();
    let dev = manager.attach(rec).unwrap();
    let map = FileMapping::new("merge", 8 * PAGE, 0);
    let sub =
        |first: usize, pages: usize| Range::new(map.addr() + first * PAGE, pages * PAGE).unwrap();
    drop(manager.pin(sub(0, 2), &[dev.id()]).unwrap());
    // Adjacent: CUDA accepts it, so it is its own registration.
    let p = manager.pin(sub(2, 2), &[dev.id()]).unwrap();
    assert_eq!(p.registered_range(dev), Some(sub(2, 2)));
    drop(p);
    assert_eq!(ledger.live().len(), 2);
    // Overlapping both: one registration covering the union.
    let p = manager.pin(sub(1, 2), &[dev.id()]).unwrap();
    assert!(p.registered_range(dev).unwrap().contains(&sub(0, 4)));
    drop(p);
    assert_eq!(ledger.live().len(), 1);
    assert!(
        !ledger
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Refused(..))),
        "never overlapped"
    );
    assert_eq!(ledger.bad_deregistrations(), 0);
}

#[test]
fn a_still_pinned_stale_entry_makes_the_new_pin_wait_then_fail_or_succeed() {
    let m1 = Manager::new(Config {
        busy_timeout: Duration::from_millis(50),
        ..Config::default()
    });
    let rec = cuda_like();
    let ledger = rec.ledger();
    let dev = m1.attach(rec).unwrap();
    let mut f1 = FileMapping::new("F1", 16 * PAGE, 0x11);
    let range = f1.range();
    let held = m1.pin(range, &[dev.id()]).unwrap();
    let holder = held.registered_range(dev).unwrap();
    let _f2 = f1.map_over("F2", 0x22);
    m1.invalidate(range);
    match m1.pin(range, &[dev.id()]) {
        Err(Error::DeviceRangeBusy {
            device,
            holder: h,
            waited,
            ..
        }) => {
            assert_eq!((device, h), (dev.id(), holder));
            assert!(waited >= Duration::from_millis(50));
        }
        Err(e) => panic!("expected DeviceRangeBusy, got {e}"),
        Ok(_) => panic!("registered over a pinned stale entry"),
    }
    assert_eq!(
        ledger.live().len(),
        1,
        "the stale registration is still held"
    );

    // The holder is released by another thread while the new pin waits.
    let m2 = Manager::new(Config {
        busy_timeout: Duration::from_secs(30),
        ..Config::default()
    });
    let rec = cuda_like();
    let ledger2 = rec.ledger();
    let dev2 = m2.attach(rec).unwrap();
    let mut g1 = FileMapping::new("G1", 16 * PAGE, 0x11);
    let range = g1.range();
    let held2 = m2.pin(range, &[dev2.id()]).unwrap();
    let _g2 = g1.map_over("G2", 0x22);
    m2.invalidate(range);
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held2);
        });
        let pin = m2
            .pin(range, &[dev2.id()])
            .expect("waits for the holder, then registers");
        assert!(pin.is_valid());
    });
    let calls = ledger2.calls();
    let order: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Register(t) => Some(("reg", t.id)),
            Call::Deregister(t) => Some(("dereg", t.id)),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [("reg", 1), ("dereg", 1), ("reg", 2)],
        "stale first, then fresh"
    );
    drop(held);
}

/// The conformance sequence `tests/gpu.rs` runs on CUDA, here on the stand-in.
#[test]
fn conformance_with_a_cuda_like_stand_in() {
    let manager = Manager::default();
    let rec = cuda_like();
    let ledger = rec.ledger();
    let dev = manager.attach(rec).unwrap();
    let other = manager.attach(RecordingBackend::new("rec")).unwrap();
    common::conformance(&manager, dev, other.id(), &|| ledger.live().len());
    assert_eq!(ledger.bad_deregistrations(), 0);
}
