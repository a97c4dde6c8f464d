//! The stale-DMA scenario as a test: on rxe the naive cache really sends the old file's
//! bytes (the danger is real, not assumed), and umm with every available notifier source
//! never does. Skips with a printed reason where Soft-RoCE is absent.

// The interposition source's hooks for this test binary's code.
umm_interpose::export_hooks!();

use stale_dma::{notifiers, run, DemoError, Mode, Rig};

#[test]
fn naive_cache_sends_stale_bytes_and_umm_never_does() {
    let rig = match Rig::open() {
        Ok(rig) => rig,
        Err(e @ DemoError::NoDevices(_)) => {
            println!("SKIP naive_cache_sends_stale_bytes_and_umm_never_does: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let rx_before = stale_dma::peer_veth_rx_bytes().expect("veth v0 exists with rxe0");
    let naive = run(&rig, &Mode::Naive).unwrap();
    let rx_after = stale_dma::peer_veth_rx_bytes().unwrap();
    assert!(
        rx_after - rx_before >= 2 * stale_dma::LEN as u64,
        "the two 64 KiB WRITEs did not cross the veth ({} bytes)",
        rx_after - rx_before
    );
    assert_eq!(naive.name_of(&naive.first), "F1");
    assert_eq!(
        naive.name_of(&naive.second),
        "F1",
        "the naive cache should reproduce the stale DMA on rxe"
    );
    assert!(naive.stale());
    // scripts/test-rdma.sh names the sources that must run in the guest (a skip fails then).
    let required = std::env::var("UMM_STALE_DMA_REQUIRE").unwrap_or_default();
    let mut ran = 0;
    for n in notifiers() {
        // Repeat: the fix must hold every time, not once.
        for round in 0..3 {
            let o = match run(&rig, &Mode::Umm(&n)) {
                Ok(o) => o,
                Err(e @ DemoError::Source { .. }) => {
                    assert!(
                        !required.split(',').any(|r| r == n.name),
                        "required source skipped: {e}"
                    );
                    println!("(umm + {} not available here: {e})", n.name);
                    break;
                }
                Err(e) => panic!("umm + {} round {round}: {e}", n.name),
            };
            assert_eq!(o.name_of(&o.first), "F1", "umm + {}", n.name);
            assert_eq!(o.name_of(&o.second), "F2", "umm + {} round {round}", n.name);
            let (invalidations, registrations, deregistrations) = o.stats.unwrap();
            // One unmap event; the interposition source reports two (the munmap hook and the
            // mmap(MAP_FIXED) hook, both recorded before the deferred queue is applied).
            assert!(
                (1..=2).contains(&invalidations),
                "umm + {}: {invalidations} invalidations",
                n.name
            );
            assert_eq!(registrations, 2, "umm + {}: one fresh registration", n.name);
            assert_eq!(deregistrations, 1, "umm + {}: the stale MR is gone", n.name);
            ran += 1;
        }
    }
    assert!(ran >= 3, "the manual source always runs");
}
