//! CUDA backend tests on a real GPU: registration rules, a PTX kernel reading and writing
//! through the device pointer, the core's merge path and busy rule for devices that refuse
//! overlaps, and the seed scenario.
//!
//! Without a driver or device each test prints `SKIP <test>: <reason>` and returns, unless
//! `UMM_REQUIRE_CUDA=1`, in which case it fails.

#[path = "../../vulkan/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::FileMapping;
use umm::testing::RecordingBackend;
use umm::{Backend, BackendErrorKind, Config, Error, Manager, Range};
use umm_cuda::{xor_pattern_bytes, CudaBackend, CudaError};

const REQUIRE: &str = "UMM_REQUIRE_CUDA";
const PAGE: usize = 4096;

fn cuda(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) if !common::required(REQUIRE) => {
            common::skip(test, &format_args!("{e}"));
            None
        }
        Err(e) => panic!("{REQUIRE}=1 but no usable CUDA device: {e}"),
    }
}

fn sub(map: &FileMapping, first_page: usize, pages: usize) -> Range {
    Range::new(map.addr() + first_page * PAGE, pages * PAGE).unwrap()
}

#[test]
fn registration_refuses_overlap_allows_adjacent() {
    let Some(gpu) = cuda("registration_refuses_overlap_allows_adjacent") else {
        return;
    };
    assert!(!gpu.capabilities().allows_overlap);
    let map = FileMapping::new("rules", 6 * PAGE, 0);
    let a = gpu.host_register(sub(&map, 0, 2)).unwrap();
    assert!(a.device_ptr.is_some_and(|p| p != 0));
    let err = gpu.host_register(sub(&map, 1, 2)).unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::AlreadyRegistered, "{err}");
    let b = gpu
        .host_register(sub(&map, 2, 2))
        .expect("adjacent ranges register");
    assert_eq!(gpu.live_registrations(), 2);
    gpu.host_unregister(a).unwrap();
    gpu.host_unregister(b).unwrap();
    assert_eq!(gpu.live_registrations(), 0);
    let again = umm_cuda::CudaRegistration {
        device_ptr: None,
        range: sub(&map, 0, 2),
    };
    assert!(matches!(
        gpu.host_unregister(again),
        Err(CudaError::NotRegistered { .. })
    ));
}

#[test]
fn kernel_reads_and_writes_through_the_device_pointer() {
    let Some(gpu) = cuda("kernel_reads_and_writes_through_the_device_pointer") else {
        return;
    };
    let len = 64 * 1024;
    let map = FileMapping::new("kernel", len, 0x5A);
    let reg = gpu.host_register(map.range()).unwrap();
    // SAFETY: the mapping is live; no Rust reference to it during the call.
    unsafe { gpu.xor_pattern(&reg, 4096, 8192, 0xC0FFEE) }.unwrap();
    let bytes = map.read();
    assert_eq!(
        &bytes[4096..4096 + 8192],
        &xor_pattern_bytes(&[0x5A; 8192], 0xC0FFEE)[..]
    );
    assert!(bytes[..4096]
        .iter()
        .chain(&bytes[4096 + 8192..])
        .all(|&b| b == 0x5A));
    // SAFETY: as above; rejected before any launch.
    let err = unsafe { gpu.xor_pattern(&reg, 0, len as u64 + 4, 1) }.unwrap_err();
    assert!(matches!(err, CudaError::BadSpan { .. }), "{err}");
    gpu.host_unregister(reg).unwrap();
}

#[test]
fn conformance_through_the_core() {
    let Some(gpu) = cuda("conformance_through_the_core") else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(gpu).unwrap();
    let rec = manager.attach(RecordingBackend::new("rec")).unwrap();
    let backend = manager.backend(dev).unwrap();
    common::conformance(&manager, dev, rec.id(), &|| backend.live_registrations());
}

/// CUDA refuses overlaps, so the core merges overlapping misses into one larger
/// registration (unregistering the smaller ones first); adjacent ones CUDA accepts, so they
/// stay apart.
#[test]
fn overlapping_misses_merge_and_adjacent_ones_stay_apart() {
    let test = "overlapping_misses_merge_and_adjacent_ones_stay_apart";
    let Some(gpu) = cuda(test) else { return };
    let manager = Manager::default();
    let dev = manager.attach(gpu).unwrap();
    let map = FileMapping::new("merge", 8 * PAGE, 0);
    drop(manager.pin(sub(&map, 0, 2), &[dev.id()]).unwrap());
    let p = manager.pin(sub(&map, 2, 2), &[dev.id()]).unwrap(); // adjacent
    assert_eq!(p.registered_range(dev), Some(sub(&map, 2, 2)));
    drop(p);
    assert_eq!(manager.backend(dev).unwrap().live_registrations(), 2);
    let p = manager.pin(sub(&map, 1, 2), &[dev.id()]).unwrap(); // overlapping both
    assert!(p.registered_range(dev).unwrap().contains(&sub(&map, 0, 4)));
    let t = p.translation(dev).unwrap();
    let off = p.offset(dev).unwrap() as u64;
    // SAFETY: mapping live; the translation's device pointer covers the merged range.
    unsafe {
        manager
            .backend(dev)
            .unwrap()
            .xor_pattern(t, off, 2 * PAGE as u64, 5)
    }
    .unwrap();
    let bytes = map.read();
    assert_eq!(
        &bytes[PAGE..3 * PAGE],
        &xor_pattern_bytes(&[0; 2 * PAGE], 5)[..]
    );
    drop(p);
    let backend = manager.backend(dev).unwrap();
    assert_eq!(backend.live_registrations(), 1, "one merged registration");
    let ds = manager.stats().device(dev).unwrap().clone();
    assert!(ds.merges >= 2, "{ds:?}");
    assert_eq!(ds.registrations - ds.deregistrations, 1);
}

/// F1 pinned and still held, F2 mapped over it at the same address, invalidated: CUDA
/// cannot register F2 while F1's registration exists, so the new pin waits up to
/// `busy_timeout` and fails with `DeviceRangeBusy` naming the holder; once F1's pin drops
/// (here from another thread, while the new pin waits) the new pin succeeds and the GPU
/// writes F2.
#[test]
fn a_still_pinned_stale_entry_makes_the_new_pin_wait_then_fail_or_succeed() {
    let test = "a_still_pinned_stale_entry_makes_the_new_pin_wait_then_fail_or_succeed";
    let Some(gpu) = cuda(test) else { return };
    let m1 = Manager::new(Config {
        busy_timeout: Duration::from_millis(50),
        ..Config::default()
    });
    let dev = m1.attach(gpu).unwrap();
    let len = 16 * PAGE;
    let mut f1 = FileMapping::new("F1", len, 0x11);
    let range = f1.range();
    let held = m1.pin(range, &[dev.id()]).unwrap();
    let holder = held.registered_range(dev).unwrap();
    let f2 = f1.map_over("F2", 0x22);
    m1.invalidate(range);
    assert!(!held.is_valid());
    match m1.pin(range, &[dev.id()]) {
        Err(Error::DeviceRangeBusy {
            device,
            range: r,
            holder: h,
            waited,
        }) => {
            assert_eq!(device, dev.id());
            assert!(r.contains(&range) || r == range);
            assert_eq!(h, holder);
            assert!(waited >= Duration::from_millis(50));
        }
        Err(e) => panic!("expected DeviceRangeBusy, got {e}"),
        Ok(_) => panic!("a fresh registration while the stale one is pinned"),
    }
    // Released by another thread while the pin waits (generous timeout; no timing asserted).
    let manager = Manager::new(Config {
        busy_timeout: Duration::from_secs(30),
        ..Config::default()
    });
    drop(held); // the last pin of the stale entry: F1's registration goes now
    m1.flush();
    assert_eq!(m1.backend(dev).unwrap().live_registrations(), 0);
    drop(f2);
    let mut g1 = FileMapping::new("G1", len, 0x11);
    let dev = manager.attach(CudaBackend::new(0).unwrap()).unwrap();
    let range = g1.range();
    let held = manager.pin(range, &[dev.id()]).unwrap();
    let g2 = g1.map_over("G2", 0x22);
    manager.invalidate(range);
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        let pin = manager
            .pin(range, &[dev.id()])
            .expect("waits for the holder, then registers");
        let t = pin.translation(dev).unwrap();
        // SAFETY: G2 is mapped at the range; no Rust reference to it during the call.
        unsafe {
            manager
                .backend(dev)
                .unwrap()
                .xor_pattern(t, 0, len as u64, 9)
        }
        .unwrap();
    });
    assert_eq!(g2.read(), xor_pattern_bytes(&vec![0x22; len], 9));
    assert_eq!(
        g1.file_bytes(),
        vec![0x11; len],
        "the old file is untouched"
    );
}

/// The seed scenario with the invalidation a notifier delivers: the second pin misses and
/// the GPU reads and writes F2.
#[test]
fn seed_scenario_gpu_sees_the_new_file_after_invalidation() {
    let Some(gpu) = cuda("seed_scenario_gpu_sees_the_new_file_after_invalidation") else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(gpu).unwrap();
    let len = 64 * 1024;
    let mut f1 = FileMapping::new("F1", len, 0x11);
    let range = f1.range();
    {
        let pin = manager.pin(range, &[dev.id()]).unwrap();
        let t = pin.translation(dev).unwrap();
        // SAFETY: F1 mapped, not referenced during the call.
        unsafe {
            manager
                .backend(dev)
                .unwrap()
                .xor_pattern(t, 0, len as u64, 1)
        }
        .unwrap();
    }
    let f1_after = xor_pattern_bytes(&vec![0x11; len], 1);
    assert_eq!(f1.read(), f1_after);
    let f2 = f1.map_over("F2", 0x22);
    manager.invalidate(range);
    let pin = manager.pin(range, &[dev.id()]).unwrap();
    let ds = manager.stats().device(dev).unwrap().clone();
    assert_eq!((ds.misses, ds.registrations, ds.deregistrations), (2, 2, 1));
    let t = pin.translation(dev).unwrap();
    // SAFETY: F2 mapped at the range; not referenced during the call.
    unsafe {
        manager
            .backend(dev)
            .unwrap()
            .xor_pattern(t, 0, len as u64, 2)
    }
    .unwrap();
    assert_eq!(
        f2.read(),
        xor_pattern_bytes(&vec![0x22; len], 2),
        "GPU read and wrote F2"
    );
    assert_eq!(
        f1.file_bytes(),
        f1_after,
        "F1 untouched by the second kernel"
    );
}

/// The seed's bug on a GPU, on purpose: no invalidation, the cache hands back F1's
/// registration, and the kernel writes F1's (still pinned) pages while F2 keeps its bytes
/// (DESIGN section 5, measured on an H100).
#[test]
fn seed_scenario_without_invalidation_writes_the_old_pages() {
    let Some(gpu) = cuda("seed_scenario_without_invalidation_writes_the_old_pages") else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(gpu).unwrap();
    let len = 64 * 1024;
    let mut f1 = FileMapping::new("F1", len, 0x11);
    let range = f1.range();
    drop(manager.pin(range, &[dev.id()]).unwrap());
    let f2 = f1.map_over("F2", 0x22);
    let pin = manager.pin(range, &[dev.id()]).unwrap();
    assert_eq!(manager.stats().device(dev).unwrap().hits, 1, "stale hit");
    let t = pin.translation(dev).unwrap();
    // SAFETY: the registration still pins F1's pages, so the device writes memory that
    // stays allocated; no Rust reference to either file's bytes during the call.
    unsafe {
        manager
            .backend(dev)
            .unwrap()
            .xor_pattern(t, 0, len as u64, 3)
    }
    .unwrap();
    assert_eq!(
        f1.file_bytes(),
        xor_pattern_bytes(&vec![0x11; len], 3),
        "F1's pages written"
    );
    assert_eq!(f2.read(), vec![0x22; len], "F2 never sees the GPU's bytes");
}
