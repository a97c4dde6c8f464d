//! The monitor's contract with libfabric, on a hand-driven source.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use umm::Range;
use umm_fabric::testing::ManualSource;
use umm_fabric::{FabricError, Monitor, MonitorOptions, Source};

const PAGE: usize = 4096;

fn range(start: usize, len: usize) -> Range {
    Range::new(start, len).expect("test range")
}

/// Waits (bounded) until `cond` holds.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn opts(release_after_notify: bool) -> MonitorOptions {
    MonitorOptions {
        interval: Duration::from_millis(2),
        release_after_notify,
    }
}

fn monitor_with_log(src: &Arc<ManualSource>) -> (Monitor, Arc<Mutex<Vec<Range>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let m = Monitor::new(
        Source::Other(src.clone()),
        Arc::new(move |r| l.lock().unwrap().push(r)),
        opts(false),
    )
    .expect("monitor");
    (m, log)
}

#[test]
fn a_hit_after_an_overlapping_invalidation_is_refused_others_stay_valid() {
    let src = Arc::new(ManualSource::new());
    let (m, _log) = monitor_with_log(&src);
    m.subscribe(0x100000, 16 * PAGE).unwrap();
    m.subscribe(0x200000, 16 * PAGE).unwrap();
    assert!(m.valid(0x100000, 16 * PAGE));
    src.fire(range(0x100000 + 15 * PAGE, PAGE));
    // No waiting: the generation moved, so valid drains the source itself.
    assert!(!m.valid(0x100000, 16 * PAGE), "stale entry reported valid");
    assert!(
        m.valid(0x200000, 16 * PAGE),
        "untouched entry reported invalid"
    );
    // A range touching but not overlapping stays valid.
    assert!(m.valid(0x100000 + 16 * PAGE, PAGE));
}

#[test]
fn invalidations_reach_notify_and_valid_refuses_until_notify_returned() {
    let src = Arc::new(ManualSource::new());
    let gate = Arc::new(Mutex::new(()));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (g, l) = (gate.clone(), log.clone());
    let held = gate.lock().unwrap();
    let m = Monitor::new(
        Source::Other(src.clone()),
        Arc::new(move |r| {
            // Blocks while the test holds the gate: notify is "in flight".
            let _g = g.lock().unwrap();
            l.lock().unwrap().push(r);
        }),
        opts(false),
    )
    .unwrap();
    m.subscribe(0x300000, 4 * PAGE).unwrap();
    let r = range(0x301000, PAGE);
    src.fire(r);
    // Even while notify is in flight (blocked on the gate), the range is invalid.
    for _ in 0..50 {
        assert!(!m.valid(0x300000, 4 * PAGE));
    }
    drop(held);
    wait_for("notify of the fired range", || {
        log.lock().unwrap().contains(&r)
    });
    wait_for("the range to leave the pending list", || {
        m.stats().pending == 0
    });
    assert!(m.valid(0x300000, 4 * PAGE), "delivered range still invalid");
    assert_eq!(m.stats().notified, 1);
}

#[test]
fn notify_may_call_back_into_unsubscribe_without_deadlock() {
    // libfabric's notify uncaches the entries and calls unsubscribe from inside notify.
    let src = Arc::new(ManualSource::new());
    let cell: Arc<OnceLock<Arc<Monitor>>> = Arc::new(OnceLock::new());
    let c = cell.clone();
    let m = Arc::new(
        Monitor::new(
            Source::Other(src.clone()),
            Arc::new(move |r: Range| {
                if let Some(m) = c.get() {
                    m.unsubscribe(0x400000, 8 * PAGE);
                    let _ = m.valid(r.start(), r.len());
                }
            }),
            opts(false),
        )
        .unwrap(),
    );
    cell.set(m.clone()).ok().unwrap();
    m.subscribe(0x400000, 8 * PAGE).unwrap();
    assert_eq!(src.watches().len(), 1);
    src.fire(range(0x400000, PAGE));
    wait_for("notify to unsubscribe", || src.watches().is_empty());
    assert_eq!(m.stats().subscriptions, 0);
    drop(cell);
}

#[test]
fn ranges_the_source_cannot_protect_are_refused() {
    let src = Arc::new(ManualSource::new());
    let (m, _log) = monitor_with_log(&src);
    src.refuse(range(0x500000, PAGE));
    let e = m.subscribe(0x500000, 2 * PAGE).unwrap_err();
    assert!(matches!(e, FabricError::Uncovered(_)), "{e:?}");
    assert!(e.code() < 0);
    assert!(src.watches().is_empty());
    assert_eq!(m.stats().subscriptions, 0);
    m.subscribe(0x600000, PAGE).unwrap();
}

#[test]
fn repeated_subscriptions_of_one_range_are_counted() {
    let src = Arc::new(ManualSource::new());
    let (m, _log) = monitor_with_log(&src);
    m.subscribe(0x700000, PAGE).unwrap();
    m.subscribe(0x700000, PAGE).unwrap();
    assert_eq!(src.watches().len(), 2);
    m.unsubscribe(0x700000, PAGE);
    assert_eq!(src.watches().len(), 1);
    m.unsubscribe(0x700000, PAGE);
    assert!(src.watches().is_empty());
    // Unknown ranges are ignored.
    m.unsubscribe(0x700000, PAGE);
}

#[test]
fn an_overflow_invalidates_and_notifies_every_subscription() {
    let src = Arc::new(ManualSource::new());
    let (m, log) = monitor_with_log(&src);
    m.subscribe(0x800000, PAGE).unwrap();
    m.subscribe(0x900000, 2 * PAGE).unwrap();
    src.overflow();
    assert!(!m.valid(0x800000, PAGE));
    assert!(
        !m.valid(0xa00000, PAGE),
        "after lost events nothing is valid"
    );
    wait_for("notify of both subscriptions", || {
        let l = log.lock().unwrap();
        l.contains(&range(0x800000, PAGE)) && l.contains(&range(0x900000, 2 * PAGE))
    });
    wait_for("the overflow to be delivered", || m.valid(0xa00000, PAGE));
}

#[test]
fn empty_ranges_are_errors_not_panics() {
    let src = Arc::new(ManualSource::new());
    let (m, _log) = monitor_with_log(&src);
    assert!(matches!(
        m.subscribe(0x1000, 0),
        Err(FabricError::BadRange { .. })
    ));
    assert!(!m.valid(0x1000, 0));
}

#[test]
fn with_release_after_notify_notified_subscriptions_are_dropped_others_kept() {
    // libfabric before 2.1 never unsubscribes: the monitor drops what a notify covered.
    let src = Arc::new(ManualSource::new());
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let m = Monitor::new(
        Source::Other(src.clone()),
        Arc::new(move |r| l.lock().unwrap().push(r)),
        opts(true),
    )
    .unwrap();
    m.subscribe(0xb00000, 4 * PAGE).unwrap();
    m.subscribe(0xc00000, 4 * PAGE).unwrap();
    assert_eq!(src.watches().len(), 2);
    src.fire(range(0xb01000, PAGE));
    wait_for("the notified subscription to be released", || {
        src.watches().len() == 1
    });
    assert!(log.lock().unwrap().contains(&range(0xb01000, PAGE)));
    assert_eq!(
        src.watches().values().copied().collect::<Vec<_>>(),
        vec![range(0xc00000, 4 * PAGE)]
    );
    assert_eq!(m.stats().subscriptions, 1);
}

#[test]
fn without_release_after_notify_subscriptions_wait_for_unsubscribe() {
    let src = Arc::new(ManualSource::new());
    let (m, log) = monitor_with_log(&src);
    m.subscribe(0xd00000, PAGE).unwrap();
    src.fire(range(0xd00000, PAGE));
    wait_for("notify", || log.lock().unwrap().len() == 1);
    wait_for("delivery", || m.stats().pending == 0);
    assert_eq!(
        src.watches().len(),
        1,
        "released although libfabric unsubscribes itself"
    );
    m.unsubscribe(0xd00000, PAGE);
    assert!(src.watches().is_empty());
}
