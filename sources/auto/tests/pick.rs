//! The automatic choice agrees with `probe`, and the picked source protects a pin.

use std::sync::Arc;

use umm::{testing::RecordingBackend, Manager, Range};
use umm_auto::{add_source_with, probe, Preference, SourceKind, Verdict};

/// One test at a time: each makes userfaultfd sources, which register whole spans of the
/// VMA around a watch; two sources sharing a merged VMA would see EBUSY.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn mmap(len: usize) -> *mut u8 {
    umm::testing::map_anonymous(len).start() as *mut u8
}

#[test]
fn auto_picks_the_first_available_source_of_probe_and_it_catches_munmap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let statuses = probe();
    assert_eq!(
        statuses.iter().map(|s| s.kind).collect::<Vec<_>>(),
        SourceKind::ALL
    );
    for s in &statuses {
        println!("{s}");
        assert_eq!(s.available, s.fix.is_none(), "{s}");
    }
    // No hooks in this test binary: interposition is never available here.
    assert!(!statuses[2].available);
    let Some(best) = statuses.iter().find(|s| s.available) else {
        println!("SKIP: no notifier source works here");
        return;
    };
    let m = Arc::new(Manager::default());
    let choice = add_source_with(&m, Preference::Auto).unwrap();
    println!("{choice}");
    assert_eq!(choice.picked, Some(best.kind));
    assert_eq!(
        choice.skipped,
        statuses
            .iter()
            .take_while(|s| !s.available)
            .cloned()
            .collect::<Vec<_>>()
    );
    assert_eq!(choice.coverage, best.kind.coverage());
    assert!(choice
        .coverage
        .with(Verdict::Caught)
        .contains(&"munmap of the whole range"));

    let nic = m.attach(RecordingBackend::new("nic")).unwrap();
    let len = 1 << 16;
    let p = mmap(len);
    let pin = m
        .pin(Range::new(p as usize, len).unwrap(), &[nic.id()])
        .unwrap();
    assert!(pin.is_valid());
    // SAFETY: our own mapping; the pin only records its address.
    assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
    assert!(!pin.is_valid(), "the {} source missed a munmap", best.kind);
}

#[test]
fn a_named_source_that_is_unavailable_is_an_error_with_the_fix() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Arc::new(Manager::default());
    let e = add_source_with(&m, Preference::Only(SourceKind::Interpose)).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("interposition") && text.contains("export_hooks!"),
        "{text}"
    );
    if !std::path::Path::new("/dev/umm_notify").exists() {
        let e = add_source_with(&m, Preference::Only(SourceKind::Kmod)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("kernel module") && text.contains("fix:"),
            "{text}"
        );
    }
}

#[test]
fn none_adds_nothing_and_covers_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Arc::new(Manager::default());
    let choice = add_source_with(&m, Preference::None).unwrap();
    assert_eq!(choice.picked, None);
    assert!(choice.coverage.with(Verdict::Caught).is_empty());
}
