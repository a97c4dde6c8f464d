//! Importing into the real libfabric of this machine (no device needed: the import only
//! sets libfabric's default monitor). Skips where libfabric is not installed.

use umm_fabric::{install, installed, umm_fabric_install, FabricError};

#[test]
fn install_imports_into_libfabric_once_and_refuses_an_overriding_env() {
    // One test (one process) because it changes the environment and libfabric's state.
    std::env::set_var("FI_MR_CACHE_MONITOR", "memhooks");
    match install() {
        Err(FabricError::MonitorOverridden(v)) => assert_eq!(v, "memhooks"),
        other => panic!("FI_MR_CACHE_MONITOR set: expected a refusal, got {other:?}"),
    }
    assert!(!installed());
    std::env::remove_var("FI_MR_CACHE_MONITOR");

    std::env::set_var("UMM_SOURCE", "interpose");
    assert!(matches!(
        install(),
        Err(FabricError::BadEnv {
            var: "UMM_SOURCE",
            ..
        })
    ));
    std::env::remove_var("UMM_SOURCE");

    match install() {
        Err(FabricError::NoLibfabric(why)) => {
            println!("SKIP: libfabric is not installed: {why}");
            return;
        }
        Err(e) => panic!("install failed: {e}"),
        Ok(()) => {}
    }
    assert!(installed());
    // Again: a no-op success (libfabric itself would answer -FI_EBUSY to a second import).
    assert_eq!(umm_fabric_install(), 0);
    // libfabric has not started it (no domain was opened).
    assert!(umm_fabric::monitor().is_none());
}
