//! The mission in one test, on real stacks in the guest: one host range pinned on an RDMA
//! NIC (Soft-RoCE rxe0), a Vulkan device (lavapipe) and the recording backend through one
//! manager; the GPU writes it and the NIC's MR covers it; then **one** event (a plain
//! `munmap`, seen by the kernel module's MMU notifier) deregisters every device's
//! translation exactly once.
//!
//! Runs in the guest (scripts/test-rdma.sh loads the module and sets up rxe); elsewhere it
//! prints why it is skipped.

use std::sync::Arc;

use umm::testing::RecordingBackend;
use umm::{Manager, Range};
use umm_rdma::{Access, DeviceSelector, RdmaBackend, RdmaDevice};
use umm_vulkan::{pattern_bytes, DeviceSelector as VkSelector, VulkanBackend};

// The Soft-RoCE tests' helpers (the kernel's MR count from `rdma resource show`).
#[path = "../../../backends/rdma/tests/common/mod.rs"]
mod rdma_common;
use rdma_common::kernel_mr_count;

#[test]
fn one_munmap_deregisters_nic_gpu_and_recorder_once() {
    const TEST: &str = "one_munmap_deregisters_nic_gpu_and_recorder_once";
    let rxe0 = match RdmaDevice::open(&DeviceSelector::Name("rxe0".into())) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP {TEST}: needs Soft-RoCE rxe0 ({e}); run scripts/test-rdma.sh");
            return;
        }
    };
    let source = match umm_kmod::KmodSource::open() {
        Ok(s) => Arc::new(s),
        Err(e) => {
            println!("SKIP {TEST}: needs the kmod-notifier module ({e}); run scripts/test-rdma.sh");
            return;
        }
    };
    let vulkan = VulkanBackend::new(VkSelector::First).expect("Vulkan (lavapipe) in the guest");

    let manager = Manager::default();
    manager.add_source(source).unwrap();
    let nic = manager
        .attach(RdmaBackend::new(rxe0, Access::REMOTE_RW))
        .unwrap();
    let gpu = manager.attach(vulkan).unwrap();
    let recorder = RecordingBackend::new("recorder");
    let ledger = recorder.ledger();
    let rec = manager.attach(recorder).unwrap();

    let len = 16 * umm::page_size();
    // SAFETY: a fresh private anonymous mapping, unmapped by this test below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let range = Range::new(p as usize, len).unwrap();
    let mrs = kernel_mr_count("rxe0");
    {
        let pin = manager.pin(range, &[nic.id(), gpu.id(), rec.id()]).unwrap();
        assert_eq!(kernel_mr_count("rxe0"), mrs + 1, "the NIC registered it");
        let import = pin.translation(gpu).unwrap();
        let offset = pin.offset(gpu).unwrap() as u64;
        // SAFETY: the import is live (pinned), the range mapped, no reference to its bytes.
        unsafe {
            manager
                .backend(gpu)
                .unwrap()
                .fill_pattern(import, offset, len as u64, 7)
        }
        .unwrap();
        // SAFETY: reading our own mapping after the device finished writing it.
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
        assert_eq!(
            bytes,
            &pattern_bytes(7, len)[..],
            "the GPU wrote through the import"
        );
        // The same range again: a hit on all three devices.
        drop(manager.pin(range, &[nic.id(), gpu.id(), rec.id()]).unwrap());
    }
    assert_eq!(manager.backend(gpu).unwrap().live_imports(), 1, "cached");

    // One event: the application unmaps the buffer. Nobody calls umm.
    // SAFETY: unmaps the mapping made above; no pin or reference to it remains.
    assert_eq!(unsafe { libc::munmap(p, len) }, 0);

    manager.flush(); // what the next pin, the reaper or a hit's generation check would do
    assert_eq!(kernel_mr_count("rxe0"), mrs, "the NIC's MR is gone");
    assert_eq!(
        manager.backend(gpu).unwrap().live_imports(),
        0,
        "the GPU import is gone"
    );
    assert_eq!((ledger.registrations(), ledger.deregistrations()), (1, 1));
    let stats = manager.stats();
    for d in &stats.devices {
        assert_eq!(
            (d.registrations, d.deregistrations, d.hits, d.misses),
            (1, 1, 1, 1),
            "{}",
            d.name
        );
    }
    assert_eq!(
        stats.invalidations, 1,
        "one event, one invalidation, fanned out"
    );
}
