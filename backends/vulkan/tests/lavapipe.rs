//! Vulkan backend tests on a real Vulkan device (Mesa lavapipe in CI): imports, compute
//! kernels writing and reading imported host memory, the seed scenario and multi-device
//! invalidation through the core.
//!
//! Without a Vulkan device each test prints `SKIP <test>: <reason>` and returns, unless
//! `UMM_REQUIRE_VULKAN=1` (set by the project's test script), in which case it fails.

mod common;

use common::FileMapping;
use umm::testing::RecordingBackend;
use umm::{Backend, BackendErrorKind, Manager, Range};
use umm_vulkan::{pattern_bytes, Checksum, DeviceSelector, VulkanBackend, VulkanError};

const REQUIRE: &str = "UMM_REQUIRE_VULKAN";

fn vulkan(test: &str) -> Option<VulkanBackend> {
    match VulkanBackend::new(DeviceSelector::First) {
        Ok(b) => Some(b),
        Err(e) if !common::required(REQUIRE) => {
            common::skip(test, &format_args!("no usable Vulkan device: {e}"));
            None
        }
        Err(e) => panic!("{REQUIRE}=1 but no usable Vulkan device: {e}"),
    }
}

#[test]
fn list_devices_reports_host_import() {
    let Some(vk) = vulkan("list_devices_reports_host_import") else {
        return;
    };
    let devices = VulkanBackend::list_devices().unwrap();
    let me = devices
        .iter()
        .find(|d| d.name == vk.device_name())
        .expect("the opened device is listed");
    assert!(me.supports_host_import);
    assert!(me.import_alignment.is_power_of_two());
    assert_eq!(me.import_alignment, vk.import_alignment());
}

#[test]
fn selectors_index_name_uuid_open_the_same_device() {
    let Some(vk) = vulkan("selectors_index_name_uuid_open_the_same_device") else {
        return;
    };
    let info = VulkanBackend::list_devices()
        .unwrap()
        .into_iter()
        .find(|d| d.name == vk.device_name())
        .unwrap();
    for sel in [
        DeviceSelector::Index(info.index),
        DeviceSelector::Name(info.name.to_uppercase()),
        DeviceSelector::Uuid(info.uuid),
    ] {
        let other = VulkanBackend::new(sel.clone()).unwrap_or_else(|e| panic!("{sel}: {e}"));
        assert_eq!(other.device_name(), vk.device_name(), "{sel}");
    }
    let err = VulkanBackend::new(DeviceSelector::Name("no-such-gpu".into())).unwrap_err();
    assert!(matches!(err, VulkanError::NoDevice { .. }), "{err}");
    assert!(
        err.to_string().contains(&info.name),
        "lists present devices: {err}"
    );
    assert_eq!(err.kind(), BackendErrorKind::DeviceUnavailable);
}

/// No ICD: run this test binary again with the loader pointed at a driver list that does
/// not exist (environment changes must not leak into the other, parallel tests).
#[test]
fn no_driver_is_a_no_device_error() {
    const CHILD: &str = "UMM_VK_NO_DRIVER_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let err = VulkanBackend::new(DeviceSelector::First).expect_err("no driver, no device");
        assert!(
            matches!(err, VulkanError::NoDevice { .. } | VulkanError::NoLoader(_)),
            "{err:?}"
        );
        eprintln!("child saw: {err}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "no_driver_is_a_no_device_error", "--nocapture"])
        .env(CHILD, "1")
        .env("VK_DRIVER_FILES", "/nonexistent/umm_icd.json")
        .env("VK_ICD_FILENAMES", "/nonexistent/umm_icd.json")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("child saw: no Vulkan"),
        "child output:\n{text}"
    );
}

#[test]
fn misaligned_ranges_are_rejected_by_the_backend() {
    let Some(vk) = vulkan("misaligned_ranges_are_rejected_by_the_backend") else {
        return;
    };
    let map = FileMapping::new("misaligned", 4 * 4096, 0);
    let a = vk.import_alignment() as usize;
    for range in [
        Range::new(map.addr() + 64, a).unwrap(),
        Range::new(map.addr(), a + 64).unwrap(),
    ] {
        let err = vk.import(range).unwrap_err();
        assert!(matches!(err, VulkanError::Misaligned { .. }), "{err}");
        let be = vk.register(range).unwrap_err();
        assert_eq!(be.kind, BackendErrorKind::BadAddress);
    }
    assert_eq!(vk.live_imports(), 0);
    assert!(vk.capabilities().alignment >= a);
    assert!(vk.capabilities().allows_overlap);
}

#[test]
fn gpu_writes_pattern_into_imported_host_memory() {
    let Some(vk) = vulkan("gpu_writes_pattern_into_imported_host_memory") else {
        return;
    };
    let len = 256 * 1024;
    let map = FileMapping::new("fill", len, 0xAB);
    let import = vk.import(map.range()).unwrap();
    assert_eq!(vk.live_imports(), 1);
    // SAFETY: the mapping is live and no Rust reference to it exists during the call.
    unsafe { vk.fill_pattern(&import, 4096, 8192, 0x1234_5678) }.unwrap();
    let bytes = map.read();
    assert_eq!(
        &bytes[4096..4096 + 8192],
        &pattern_bytes(0x1234_5678, 8192)[..]
    );
    assert!(
        bytes[..4096].iter().all(|&b| b == 0xAB),
        "bytes before the span untouched"
    );
    assert!(
        bytes[4096 + 8192..].iter().all(|&b| b == 0xAB),
        "bytes after the span untouched"
    );
    // The whole buffer, more words than one row of workgroups would hold on small limits.
    // SAFETY: as above.
    unsafe { vk.fill_pattern(&import, 0, len as u64, 7) }.unwrap();
    assert_eq!(map.read(), pattern_bytes(7, len));
    vk.release(import).unwrap();
    assert_eq!(vk.live_imports(), 0);
}

#[test]
fn gpu_checksum_reads_host_written_bytes() {
    let Some(vk) = vulkan("gpu_checksum_reads_host_written_bytes") else {
        return;
    };
    let len = 64 * 1024;
    let map = FileMapping::new("checksum", len, 0);
    let host: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    map.write(0, &host);
    let import = vk.import(map.range()).unwrap();
    // SAFETY: live mapping, only read by the device.
    let sum = unsafe { vk.checksum(&import, 0, len as u64) }.unwrap();
    assert_eq!(sum, Checksum::of_bytes(&host));
    assert_eq!(sum.words as usize, len / 4);
    // A host write after the import is seen by the next kernel (no copy was taken).
    map.write(100, &[0xFF; 4]);
    let mut changed = host.clone();
    changed[100..104].copy_from_slice(&[0xFF; 4]);
    // SAFETY: as above.
    let sum2 = unsafe { vk.checksum(&import, 0, len as u64) }.unwrap();
    assert_eq!(sum2, Checksum::of_bytes(&changed));
    assert_ne!(sum2, sum);
    // A sub-span: the checksum restarts its positions at the span's first word.
    // SAFETY: as above.
    let part = unsafe { vk.checksum(&import, 4096, 4096) }.unwrap();
    assert_eq!(part, Checksum::of_bytes(&changed[4096..8192]));
    vk.release(import).unwrap();
}

#[test]
fn bad_kernel_spans_and_double_release_are_typed_errors() {
    let Some(vk) = vulkan("bad_kernel_spans_and_double_release_are_typed_errors") else {
        return;
    };
    let map = FileMapping::new("spans", 8192, 0);
    let import = vk.import(map.range()).unwrap();
    for (offset, len) in [(0, 0), (2, 4), (0, 6), (4096, 8192), (u64::MAX - 3, 8)] {
        // SAFETY: rejected before any device work.
        let err = unsafe { vk.checksum(&import, offset, len) }.unwrap_err();
        assert!(
            matches!(err, VulkanError::BadSpan { .. }),
            "{offset}+{len}: {err}"
        );
    }
    let (memory, buffer, range) = (import.memory, import.buffer, import.range);
    vk.release(import).unwrap();
    let again = umm_vulkan::VulkanImport {
        memory,
        buffer,
        offset: 0,
        size: 8192,
        range,
    };
    let err = vk.release(again).unwrap_err();
    assert!(matches!(err, VulkanError::UnknownImport { .. }), "{err}");
}

#[test]
fn dropping_the_backend_frees_imports_never_released() {
    let Some(vk) = vulkan("dropping_the_backend_frees_imports_never_released") else {
        return;
    };
    let map = FileMapping::new("leak", 3 * 4096, 0);
    let _forgotten = vk.import(map.range()).unwrap();
    let _forgotten2 = vk.import(map.range()).unwrap(); // overlapping imports are allowed
    assert_eq!(vk.live_imports(), 2);
    drop(vk); // frees both (a leak or double free would show under a validation layer)
}

#[test]
fn conformance_through_the_core() {
    let Some(vk) = vulkan("conformance_through_the_core") else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(vk).unwrap();
    let rec = manager.attach(RecordingBackend::new("rec")).unwrap();
    let backend = manager.backend(dev).unwrap();
    common::conformance(&manager, dev, rec.id(), &|| backend.live_imports());
}

/// The same conformance with the backend declaring `allows_overlap = false`: the core's
/// merge path for devices that refuse overlaps (CUDA) on a real device.
#[test]
fn conformance_through_the_core_refusing_overlap() {
    let Some(vk) = vulkan("conformance_through_the_core_refusing_overlap") else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(vk.allow_overlap(false)).unwrap();
    let rec = manager.attach(RecordingBackend::new("rec")).unwrap();
    let backend = manager.backend(dev).unwrap();
    common::conformance(&manager, dev, rec.id(), &|| backend.live_imports());
}

/// Refusing overlaps, an overlapping miss merges with what it overlaps into one import
/// (adjacent ones stay apart), and the GPU writes through the merged import at the pin's
/// offset.
#[test]
fn merged_import_is_usable_at_the_pins_offset() {
    let Some(vk) = vulkan("merged_import_is_usable_at_the_pins_offset") else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(vk.allow_overlap(false)).unwrap();
    let page = 4096;
    let map = FileMapping::new("merge", 8 * page, 0x33);
    let sub =
        |first: usize, pages: usize| Range::new(map.addr() + first * page, pages * page).unwrap();
    drop(manager.pin(sub(0, 2), &[dev.id()]).unwrap());
    drop(manager.pin(sub(2, 2), &[dev.id()]).unwrap()); // adjacent: its own import
    assert_eq!(manager.backend(dev).unwrap().live_imports(), 2);
    let pin = manager.pin(sub(1, 5), &[dev.id()]).unwrap(); // overlaps both
    assert!(pin.registered_range(dev).unwrap().contains(&sub(0, 6)));
    let backend = manager.backend(dev).unwrap();
    assert_eq!(backend.live_imports(), 1, "one merged import");
    assert!(manager.stats().device(dev).unwrap().merges >= 2);
    let (import, offset) = (pin.translation(dev).unwrap(), pin.offset(dev).unwrap());
    // SAFETY: the mapping is live; no Rust reference to it during the call.
    unsafe { backend.fill_pattern(import, offset as u64, 3 * page as u64, 4) }.unwrap();
    let bytes = map.read();
    assert_eq!(&bytes[page..4 * page], &pattern_bytes(4, 3 * page)[..]);
    assert!(bytes[..page]
        .iter()
        .chain(&bytes[4 * page..])
        .all(|&b| b == 0x33));
}

/// Refusing overlaps, the CUDA rule on a real device: F1 still pinned when F2 is mapped
/// over it and the range invalidated, so the new pin waits `busy_timeout` and fails with
/// `DeviceRangeBusy` naming the holder; once F1's pin drops, the new pin imports F2.
#[test]
fn refusing_overlap_a_pinned_stale_import_makes_the_new_pin_busy() {
    let test = "refusing_overlap_a_pinned_stale_import_makes_the_new_pin_busy";
    let Some(vk) = vulkan(test) else { return };
    let manager = Manager::new(umm::Config {
        busy_timeout: std::time::Duration::from_millis(50),
        ..umm::Config::default()
    });
    let dev = manager.attach(vk.allow_overlap(false)).unwrap();
    let len = 16 * 4096;
    let mut f1 = FileMapping::new("F1", len, 0x11);
    let range = f1.range();
    let held = manager.pin(range, &[dev.id()]).unwrap();
    let holder = held.registered_range(dev).unwrap();
    let f2 = f1.map_over("F2", 0x22);
    manager.invalidate(range);
    match manager.pin(range, &[dev.id()]) {
        Err(umm::Error::DeviceRangeBusy {
            device, holder: h, ..
        }) => {
            assert_eq!((device, h), (dev.id(), holder));
        }
        Err(e) => panic!("expected DeviceRangeBusy, got {e}"),
        Ok(_) => panic!("registered over a pinned stale import"),
    }
    drop(held);
    let pin = manager.pin(range, &[dev.id()]).unwrap();
    let backend = manager.backend(dev).unwrap();
    assert_eq!(
        backend.live_imports(),
        1,
        "the stale import was freed first"
    );
    // SAFETY: F2 is mapped at the range; the device only reads.
    let sum = unsafe { backend.checksum(pin.translation(dev).unwrap(), 0, len as u64) }.unwrap();
    assert_eq!(sum, Checksum::of_bytes(&f2.read()));
}

#[test]
fn gpu_uses_a_pinned_sub_range_at_its_offset() {
    let Some(vk) = vulkan("gpu_uses_a_pinned_sub_range_at_its_offset") else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(vk).unwrap();
    let map = FileMapping::new("subrange", 16 * 4096, 0x5A);
    // An unaligned user range: the manager registers the aligned range around it.
    let user = Range::new(map.addr() + 3 * 4096 + 40, 5000).unwrap();
    let pin = manager.pin(user, &[dev.id()]).unwrap();
    let import = pin.translation(dev).unwrap();
    let offset = pin.offset(dev).unwrap();
    assert_eq!(import.range, pin.registered_range(dev).unwrap());
    assert_eq!(import.range.start() + offset, user.start());
    let backend = manager.backend(dev).unwrap();
    // SAFETY: the mapping is live and not referenced while the device writes.
    unsafe { backend.fill_pattern(import, offset as u64, 5000, 99) }.unwrap();
    let bytes = map.read();
    let at = user.start() - map.addr();
    assert_eq!(&bytes[at..at + 5000], &pattern_bytes(99, 5000)[..]);
    assert!(bytes[..at]
        .iter()
        .chain(&bytes[at + 5000..])
        .all(|&b| b == 0x5A));
}

/// The seed scenario: F1 mapped at B, pinned and used by the GPU, then F2 mapped at B over
/// it. With the invalidation a notifier would deliver, the next pin misses and the GPU
/// sees F2's bytes.
#[test]
fn seed_scenario_gpu_sees_the_new_file_after_invalidation() {
    let Some(vk) = vulkan("seed_scenario_gpu_sees_the_new_file_after_invalidation") else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(vk).unwrap();
    let len = 64 * 1024;
    let mut f1 = FileMapping::new("F1", len, 0x11);
    let range = f1.range();
    {
        let pin = manager.pin(range, &[dev.id()]).unwrap();
        let backend = manager.backend(dev).unwrap();
        // SAFETY: F1 is mapped and not referenced during the call.
        unsafe { backend.fill_pattern(pin.translation(dev).unwrap(), 0, len as u64, 1) }.unwrap();
    } // pin dropped: the registration stays cached, as in any registration cache
    assert_eq!(f1.read(), pattern_bytes(1, len));

    let f2 = f1.map_over("F2", 0x22); // munmap(F1) + mmap(F2, MAP_FIXED) at the same B
    manager.invalidate(range); // what the kernel notifier / hooks deliver for that unmap
    let pin = manager.pin(range, &[dev.id()]).unwrap();
    let stats = manager.stats();
    let ds = stats.device(dev).unwrap();
    assert_eq!(
        (ds.misses, ds.registrations),
        (2, 2),
        "the second pin is a miss"
    );
    let backend = manager.backend(dev).unwrap();
    let import = pin.translation(dev).unwrap();
    // The GPU reads F2's bytes ...
    // SAFETY: F2 is mapped at B; the device only reads here.
    let sum = unsafe { backend.checksum(import, 0, len as u64) }.unwrap();
    assert_eq!(sum, Checksum::of_bytes(&vec![0x22; len]));
    // ... and writes into F2, never into F1.
    // SAFETY: as above; no Rust reference to F2's bytes is alive.
    unsafe { backend.fill_pattern(import, 0, len as u64, 2) }.unwrap();
    assert_eq!(f2.read(), pattern_bytes(2, len));
    assert_eq!(
        f1.file_bytes(),
        pattern_bytes(1, len),
        "F1 keeps the first kernel's bytes"
    );
    drop(pin);
    manager.flush();
    let ds = manager.stats().device(dev).unwrap().clone();
    assert_eq!(ds.deregistrations, 1, "F1's import was freed once");
    assert_eq!(
        manager.backend(dev).unwrap().live_imports(),
        1,
        "F2's import is cached"
    );
}

/// The same scenario with the invalidation left out on purpose: the cache hands back F1's
/// stale import. What the GPU then does is the driver's business: a real GPU pinned F1's
/// pages at import time and writes them (F2 never sees the bytes: the seed's bug, DESIGN
/// section 5), lavapipe dereferences the host pointer at use time and writes whatever is
/// mapped at B now (F2). Either way the cache is wrong; only invalidation fixes it.
#[test]
fn seed_scenario_without_invalidation_documents_the_stale_import() {
    let test = "seed_scenario_without_invalidation_documents_the_stale_import";
    let Some(vk) = vulkan(test) else { return };
    let manager = Manager::default();
    let dev = manager.attach(vk).unwrap();
    let len = 64 * 1024;
    let mut f1 = FileMapping::new("F1", len, 0x11);
    let range = f1.range();
    let first = manager
        .pin(range, &[dev.id()])
        .unwrap()
        .translation(dev)
        .unwrap()
        .memory;
    let f2 = f1.map_over("F2", 0x22);
    let pin = manager.pin(range, &[dev.id()]).unwrap();
    let import = pin.translation(dev).unwrap();
    assert_eq!(
        import.memory, first,
        "no invalidation: the stale import is a cache hit"
    );
    assert_eq!(manager.stats().device(dev).unwrap().hits, 1);
    let backend = manager.backend(dev).unwrap();
    // SAFETY: B is mapped (F2); on a pinning driver the import still holds F1's pages.
    unsafe { backend.fill_pattern(import, 0, len as u64, 3) }.unwrap();
    if backend.is_lavapipe() {
        assert_eq!(
            f2.read(),
            pattern_bytes(3, len),
            "lavapipe writes what is mapped now"
        );
        assert_eq!(f1.file_bytes(), vec![0x11; len]);
        eprintln!("{test}: lavapipe: the stale import wrote F2 (pointer used directly)");
    } else {
        assert_eq!(
            f1.file_bytes(),
            pattern_bytes(3, len),
            "a pinning GPU writes F1's pages"
        );
        assert_eq!(f2.read(), vec![0x22; len], "F2 never sees the GPU's bytes");
        eprintln!(
            "{test}: {}: the stale import wrote F1's pages",
            backend.device_name()
        );
    }
}

/// One range pinned on Vulkan, a recording backend (and CUDA where a GPU and driver
/// exist), invalidated once: every device deregisters exactly once.
#[test]
fn one_range_on_every_device_invalidated_once() {
    let test = "one_range_on_every_device_invalidated_once";
    let Some(vk) = vulkan(test) else { return };
    let manager = Manager::default();
    let vdev = manager.attach(vk).unwrap();
    let rec = RecordingBackend::new("rec");
    let ledger = rec.ledger();
    let rdev = manager.attach(rec).unwrap();
    let cuda = match umm_cuda::CudaBackend::new(0) {
        Ok(b) => Some(manager.attach(b).unwrap()),
        Err(e) => {
            eprintln!("{test}: CUDA part skipped: {e}");
            None
        }
    };
    let mut ids = vec![vdev.id(), rdev.id()];
    ids.extend(cuda.map(|c| c.id()));

    let map = FileMapping::new("three", 64 * 1024, 0);
    let pin = manager.pin(map.range(), &ids).unwrap();
    manager.invalidate(map.range());
    manager.invalidate(map.range()); // a second source reporting the same event
    assert!(!pin.is_valid());
    drop(pin);
    manager.flush();
    let stats = manager.stats();
    for id in &ids {
        let ds = stats.device(*id).unwrap();
        assert_eq!(
            (ds.registrations, ds.deregistrations),
            (1, 1),
            "{}",
            ds.name
        );
        assert_eq!(ds.deregistration_errors, 0, "{}", ds.name);
    }
    assert_eq!(manager.backend(vdev).unwrap().live_imports(), 0);
    assert_eq!((ledger.registrations(), ledger.deregistrations()), (1, 1));
    assert_eq!(ledger.bad_deregistrations(), 0);
    if let Some(c) = cuda {
        assert_eq!(manager.backend(c).unwrap().live_registrations(), 0);
    }
}
