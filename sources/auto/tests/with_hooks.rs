//! In a binary that exports the interposition hooks, `UMM_SOURCE=interpose` adds them
//! once the application declares `UMM_INTERPOSE_LIBC_ONLY=1` (one test: it sets the
//! variable).

umm_interpose::export_hooks!();

use std::sync::Arc;

use umm::{testing::RecordingBackend, Manager};
use umm_auto::{add_source_with, probe_one, Preference, SourceKind};

#[test]
fn interposition_is_available_once_declared_and_catches_munmap() {
    // Undeclared: strict interposition would refuse every pin, so it is unavailable and
    // says how to declare it.
    std::env::remove_var("UMM_INTERPOSE_LIBC_ONLY");
    let status = probe_one(SourceKind::Interpose);
    assert!(!status.available, "{status}");
    assert!(status.fix.unwrap().contains("UMM_INTERPOSE_LIBC_ONLY=1"));
    let m = Arc::new(Manager::default());
    assert!(add_source_with(&m, Preference::Only(SourceKind::Interpose)).is_err());
    drop(m);
    // The only test of this binary: nothing else reads the environment meanwhile.
    std::env::set_var("UMM_INTERPOSE_LIBC_ONLY", "1");
    let status = probe_one(SourceKind::Interpose);
    assert!(status.available, "{status}");
    let m = Arc::new(Manager::default());
    let choice = add_source_with(&m, Preference::Only(SourceKind::Interpose)).unwrap();
    assert_eq!(choice.picked, Some(SourceKind::Interpose));
    let nic = m.attach(RecordingBackend::new("nic")).unwrap();
    let r = umm::testing::map_anonymous(1 << 16);
    let pin = m.pin(r, &[nic.id()]).unwrap();
    // SAFETY: our own mapping.
    let unmapped = unsafe { libc::munmap(r.start() as *mut libc::c_void, r.len()) };
    assert_eq!(unmapped, 0);
    assert!(!pin.is_valid());
}
