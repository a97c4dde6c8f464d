//! umm over real verbs on Soft-RoCE (rxe0 <-veth-> rxe1 in the guest; see
//! scripts/test-rdma.sh). Each test skips with a printed reason where the devices are absent.
//! Run with `--test-threads=1`: `register_deregister_balance` reads the device's MR count.

mod common;

use std::sync::Arc;

use common::{kernel_mr_count, rxe_pair, Anon, Rng};
use umm::testing::RecordingBackend;
use umm::{BackendErrorKind, Config, Manager};
use umm_rdma::transport::{connect_pair, Local, Remote};
use umm_rdma::{fork_support, Access, RdmaBackend};

const PAGE: usize = 4096;

/// The backend alone (no manager): register, RDMA WRITE rxe1 -> rxe0, RDMA READ back,
/// deregister; the kernel's MR count follows.
#[test]
fn backend_register_write_read() {
    let Some((rxe0, rxe1)) = rxe_pair("backend_register_write_read") else {
        return;
    };
    let base = kernel_mr_count("rxe1");
    let src = Anon::new(16 * PAGE);
    let dst = Anon::new(16 * PAGE);
    let back = Anon::new(16 * PAGE);
    let peer = RdmaBackend::new(rxe0.clone(), Access::REMOTE_RW);
    let local = RdmaBackend::new(rxe1.clone(), Access::LOCAL_WRITE);
    // SAFETY: the mappings outlive the MRs (deregistered below).
    let (dst_mr, src_mr, back_mr) = unsafe {
        (
            peer.register_raw(dst.range()).unwrap(),
            local.register_raw(src.range()).unwrap(),
            local.register_raw(back.range()).unwrap(),
        )
    };
    assert_eq!(kernel_mr_count("rxe1"), base + 2);
    assert_eq!((src_mr.addr, src_mr.len), (src.addr() as u64, 16 * PAGE));
    let (mut qp, _peer_qp) = connect_pair(&rxe1, &rxe0, 0).unwrap();
    let mut rng = Rng(42);
    let data = rng.bytes(16 * PAGE);
    src.fill(0, &data);
    qp.write(
        Local::new(&src_mr, src.addr(), (16 * PAGE) as u32),
        Remote::new(&dst_mr, dst.addr()),
    )
    .unwrap();
    assert!(dst.read(0, 16 * PAGE) == data);
    // SAFETY: no reference to `back`'s bytes is alive during the READ.
    unsafe {
        qp.read(
            Local::new(&back_mr, back.addr() + 100, 5000),
            Remote::new(&dst_mr, dst.addr() + 200),
        )
    }
    .unwrap();
    assert_eq!(back.read(100, 5000), data[200..5200]);
    // An rkey the peer never handed out: the WRITE fails with a typed completion error.
    let err = qp
        .write(
            Local::new(&src_mr, src.addr(), 4096),
            Remote {
                addr: dst.addr() as u64,
                rkey: dst_mr.rkey ^ 0x5a5a00,
            },
        )
        .unwrap_err();
    println!("bad rkey: {err}");
    assert!(matches!(err, umm_rdma::RdmaError::WorkCompletion { .. }));
    use umm::Backend;
    local.deregister(src.range(), src_mr).unwrap();
    local.deregister(back.range(), back_mr).unwrap();
    assert_eq!(kernel_mr_count("rxe1"), base);
    drop(dst_mr);
}

/// Access flags per pin: two backends on one device (one protection domain) with different
/// access, both attached to one manager; a peer's RDMA WRITE through the local-only MR's rkey
/// is refused by the device, through the remote-write one it lands. Devices are found by
/// name and by GUID.
#[test]
fn access_flags_per_pin_and_selection_by_guid() {
    let Some((rxe0, rxe1)) = rxe_pair("access_flags_per_pin_and_selection_by_guid") else {
        return;
    };
    let listed = umm_rdma::list_devices().unwrap();
    let info = listed.iter().find(|d| d.name == "rxe0").unwrap();
    assert_eq!(info.guid, rxe0.guid());
    let by_guid = umm_rdma::RdmaDevice::open(&umm_rdma::DeviceSelector::Guid(info.guid)).unwrap();
    assert_eq!(by_guid.name(), "rxe0");
    let text = format!("guid:{:#x}", info.guid);
    assert_eq!(
        umm_rdma::DeviceSelector::parse(&text).unwrap(),
        umm_rdma::DeviceSelector::Guid(info.guid)
    );

    let buf = Anon::new(4 * PAGE);
    let src = Anon::new(4 * PAGE);
    let manager = Manager::default();
    let local_only = manager
        .attach(RdmaBackend::new(rxe0.clone(), Access::LOCAL_WRITE))
        .unwrap();
    let remote_rw = manager
        .attach(RdmaBackend::new(rxe0.clone(), Access::REMOTE_RW))
        .unwrap();
    let pin = manager
        .pin(buf.range(), &[local_only.id(), remote_rw.id()])
        .unwrap();
    let sender = RdmaBackend::new(rxe1.clone(), Access::LOCAL_READ);
    // SAFETY: `src` outlives the MR.
    let src_mr = unsafe { sender.register_raw(src.range()) }.unwrap();
    src.fill(0, &[0x5a; 4 * PAGE]);

    let (mut qp, _peer) = connect_pair(&rxe1, &rxe0, 0).unwrap();
    let err = qp
        .write(
            Local::new(&src_mr, src.addr(), 1024),
            Remote::new(pin.translation(local_only).unwrap(), buf.addr()),
        )
        .unwrap_err();
    assert!(err.to_string().contains("RemoteAccessError"), "{err}");
    assert_eq!(buf.read(0, 1024), vec![0; 1024]);

    // A fresh queue pair (the refused WRITE moved the first one to the error state), over
    // GID index 1 (IPv4-mapped; needs the sysctls of rxe-setup.sh).
    let (mut qp, _peer) = connect_pair(&rxe1, &rxe0, 1).unwrap();
    qp.write(
        Local::new(&src_mr, src.addr(), 1024),
        Remote::new(pin.translation(remote_rw).unwrap(), buf.addr()),
    )
    .unwrap();
    assert_eq!(buf.read(0, 1024), vec![0x5a; 1024]);
    assert_eq!(
        pin.translation(local_only).unwrap().access,
        Access::LOCAL_WRITE
    );
    drop(src_mr);
}

/// Every registration umm makes is one MR in the kernel, and every one is gone again after
/// invalidation + flush: the device's own counter (`rdma resource show`) agrees with the stats.
#[test]
fn register_deregister_balance() {
    let Some((rxe0, _rxe1)) = rxe_pair("register_deregister_balance") else {
        return;
    };
    let base = kernel_mr_count("rxe0");
    let buf = Anon::new(64 * PAGE);
    let manager = Manager::default();
    let nic = manager
        .attach(RdmaBackend::new(rxe0, Access::REMOTE_RW))
        .unwrap();
    for i in 0..20 {
        // Distinct, non-adjacent one-page ranges: 20 registrations.
        drop(
            manager
                .pin(buf.sub(i * 3 * PAGE, 100), &[nic.id()])
                .unwrap(),
        );
    }
    assert_eq!(kernel_mr_count("rxe0"), base + 20);
    let s = manager.stats();
    assert_eq!(s.device(nic).unwrap().registrations, 20);
    manager.invalidate(buf.range());
    manager.flush();
    assert_eq!(kernel_mr_count("rxe0"), base);
    let s = manager.stats();
    assert_eq!(s.device(nic).unwrap().deregistrations, 20);
    assert_eq!(s.device(nic).unwrap().deregistration_errors, 0);
    // Eviction deregisters too.
    drop(manager.pin(buf.sub(0, PAGE), &[nic.id()]).unwrap());
    assert_eq!(kernel_mr_count("rxe0"), base + 1);
    assert_eq!(manager.evict_unreferenced(), 1);
    assert_eq!(kernel_mr_count("rxe0"), base);
}

/// Miss, hit (same and inner range), partial hit across two real devices; the cached
/// translation carries the data of an RDMA WRITE at the right offset.
#[test]
fn hit_miss_partial_hit() {
    let Some((rxe0, rxe1)) = rxe_pair("hit_miss_partial_hit") else {
        return;
    };
    let src = Anon::new(16 * PAGE);
    let dst = Anon::new(16 * PAGE);
    let peer = RdmaBackend::new(rxe0.clone(), Access::REMOTE_RW);
    // SAFETY: `dst` outlives `dst_mr` (dropped first, at the end of the test).
    let dst_mr = unsafe { peer.register_raw(dst.range()) }.unwrap();
    let (mut qp, _peer_qp) = connect_pair(&rxe1, &rxe0, 0).unwrap();

    let manager = Manager::default();
    let a = manager
        .attach(RdmaBackend::new(rxe1.clone(), Access::LOCAL_READ))
        .unwrap();
    let b = manager
        .attach(RdmaBackend::new(rxe0.clone(), Access::LOCAL_WRITE))
        .unwrap();
    let whole = src.sub(0, 8 * PAGE);
    drop(manager.pin(whole, &[a.id()]).unwrap()); // miss on a
    let inner = src.sub(3 * PAGE + 100, 2000);
    {
        let pin = manager.pin(inner, &[a.id()]).unwrap(); // hit on a (inside the entry)
        let mr = pin.translation(a).unwrap();
        assert!(mr.covers(inner));
        assert_eq!(pin.offset(a), Some(3 * PAGE + 100));
        let data: Vec<u8> = (0..2000u32).map(|i| (i * 7) as u8).collect();
        src.fill(3 * PAGE + 100, &data);
        qp.write(
            Local::new(mr, inner.start(), 2000),
            Remote::new(&dst_mr, dst.addr() + 3 * PAGE + 100),
        )
        .unwrap();
        assert_eq!(dst.read(3 * PAGE + 100, 2000), data);
    }
    drop(manager.pin(whole, &[a.id(), b.id()]).unwrap()); // hit on a, miss on b
    let s = manager.stats();
    assert_eq!(s.device(a).unwrap().misses, 1);
    assert_eq!(s.device(a).unwrap().hits, 2);
    assert_eq!(s.device(b).unwrap().misses, 1);
    assert_eq!(s.partial_hits, 1);
    assert_eq!(s.registrations(), 2);
    drop(dst_mr);
}

/// One range pinned on rxe and on the recording backend, invalidated once: each device
/// deregisters exactly once, and the kernel's MR is gone.
#[test]
fn invalidation_fans_out_to_rxe_and_recording_backend() {
    let Some((rxe0, _rxe1)) = rxe_pair("invalidation_fans_out_to_rxe_and_recording_backend") else {
        return;
    };
    let base = kernel_mr_count("rxe0");
    let buf = Anon::new(8 * PAGE);
    let manager = Manager::default();
    let nic = manager
        .attach(RdmaBackend::new(rxe0, Access::REMOTE_RW))
        .unwrap();
    let rec = RecordingBackend::new("gpu");
    let ledger = rec.ledger();
    let gpu = manager.attach(rec).unwrap();
    let pin = manager
        .pin(buf.sub(PAGE, 2 * PAGE), &[nic.id(), gpu.id()])
        .unwrap();
    assert_eq!(kernel_mr_count("rxe0"), base + 1);
    manager.invalidate(buf.range());
    manager.invalidate(buf.range()); // a second source reporting the same event
    assert!(!pin.is_valid());
    assert_eq!(kernel_mr_count("rxe0"), base + 1, "held pin keeps its MR");
    drop(pin);
    manager.flush();
    assert_eq!(kernel_mr_count("rxe0"), base);
    let s = manager.stats();
    assert_eq!(s.device(nic).unwrap().deregistrations, 1);
    assert_eq!(s.device(gpu).unwrap().deregistrations, 1);
    assert_eq!((ledger.registrations(), ledger.deregistrations()), (1, 1));
    assert_eq!(ledger.bad_deregistrations(), 0);
}

/// 10^4 random pins (with occasional invalidations) whose translations carry RDMA WRITEs
/// from rxe1 to rxe0; every byte is checked on the receiving side.
#[test]
fn random_pins_with_rdma_write_byte_checks() {
    let Some((rxe0, rxe1)) = rxe_pair("random_pins_with_rdma_write_byte_checks") else {
        return;
    };
    const LEN: usize = 256 * PAGE;
    let iterations: usize = std::env::var("UMM_RDMA_RANDOM_PINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let src = Anon::new(LEN);
    let dst = Anon::new(LEN);
    let peer = RdmaBackend::new(rxe0.clone(), Access::REMOTE_RW);
    // SAFETY: `dst` outlives `dst_mr`.
    let dst_mr = unsafe { peer.register_raw(dst.range()) }.unwrap();
    let (mut qp, _peer_qp) = connect_pair(&rxe1, &rxe0, 0).unwrap();
    let manager = Manager::default();
    let nic = manager
        .attach(RdmaBackend::new(rxe1, Access::LOCAL_READ))
        .unwrap();
    let mut rng = Rng(0x5eed_1234_5678_9abc);
    let mut invalidations = 0;
    for i in 0..iterations {
        // Sizes above any inline threshold, up to 4 pages, anywhere in the buffer.
        let len = 256 + rng.below(4 * PAGE - 256);
        let off = rng.below(LEN - len);
        let data = rng.bytes(len);
        src.fill(off, &data);
        let range = src.sub(off, len);
        {
            let pin = manager.pin(range, &[nic.id()]).unwrap();
            let mr = pin.translation(nic).unwrap();
            assert!(
                mr.covers(range),
                "iteration {i}: {mr:?} does not cover {range}"
            );
            qp.write(
                Local::new(mr, off + src.addr(), len as u32),
                Remote::new(&dst_mr, dst.addr() + off),
            )
            .unwrap_or_else(|e| panic!("iteration {i}: {e}"));
        }
        assert!(
            dst.read(off, len) == data,
            "iteration {i}: peer bytes differ at {off:#x}+{len}"
        );
        if rng.below(100) == 0 {
            let len = 1 + rng.below(16 * PAGE);
            manager.invalidate(src.sub(rng.below(LEN - len), len));
            invalidations += 1;
        }
    }
    manager.invalidate(src.range());
    manager.flush();
    let s = manager.stats();
    let d = s.device(nic).unwrap();
    println!(
        "{iterations} pins: {} hits, {} misses, {} registrations, {invalidations} random invalidations",
        d.hits, d.misses, d.registrations
    );
    assert_eq!(d.hits + d.misses, iterations as u64);
    assert_eq!(d.registrations, d.deregistrations);
    assert_eq!(d.deregistration_errors, 0);
    drop(dst_mr);
}

/// A forked child (that writes its copy of the buffer and exits) does not break the
/// parent's cached registration: the parent's next RDMA WRITE through the cached translation
/// sends the parent's current bytes.
#[test]
fn fork_keeps_parent_registrations() {
    let Some((rxe0, rxe1)) = rxe_pair("fork_keeps_parent_registrations") else {
        return;
    };
    println!("rdma-core fork support: {:?}", fork_support());
    let src = Anon::new(4 * PAGE);
    let dst = Anon::new(4 * PAGE);
    let peer = RdmaBackend::new(rxe0.clone(), Access::REMOTE_RW);
    // SAFETY: `dst` outlives `dst_mr`.
    let dst_mr = unsafe { peer.register_raw(dst.range()) }.unwrap();
    let (mut qp, _peer_qp) = connect_pair(&rxe1, &rxe0, 0).unwrap();
    let manager = Manager::default();
    let nic = manager
        .attach(RdmaBackend::new(rxe1, Access::LOCAL_READ))
        .unwrap();
    let len = 4 * PAGE;
    let send = |qp: &mut umm_rdma::transport::RcQp| {
        let pin = manager.pin(src.range(), &[nic.id()]).unwrap();
        let mr = pin.translation(nic).unwrap();
        qp.write(
            Local::new(mr, src.addr(), len as u32),
            Remote::new(&dst_mr, dst.addr()),
        )
        .unwrap();
    };
    src.fill(0, &vec![0xa1; len]);
    send(&mut qp);
    assert_eq!(dst.read(0, len), vec![0xa1; len]);

    // SAFETY: the child only writes its private copy of `src` and calls _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: child side: async-signal-safe memory writes and _exit only.
        unsafe {
            std::ptr::write_bytes(src.ptr, 0xcc, len);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);

    // The parent writes after the fork (the copy-on-write case that broke pre-5.13 verbs).
    src.fill(0, &vec![0xb2; len]);
    send(&mut qp);
    assert_eq!(
        dst.read(0, len),
        vec![0xb2; len],
        "parent's MR lost its pages after fork"
    );
    let s = manager.stats();
    assert_eq!((s.misses(), s.hits()), (1, 1));
    drop(dst_mr);
}

/// The RLIMIT_MEMLOCK path without CAP_IPC_LOCK: this test re-runs this binary (only
/// `memlock_child`) with CAP_IPC_LOCK dropped from the bounding set and RLIMIT_MEMLOCK at
/// 1 MiB, and checks the child's verdict.
#[test]
fn memlock_enomem_evicts_then_names_the_limit() {
    use std::os::unix::process::CommandExt;
    if rxe_pair("memlock_enomem_evicts_then_names_the_limit").is_none() {
        return;
    }
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "memlock_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("UMM_RDMA_MEMLOCK_CHILD", "1");
    // SAFETY: prctl and setrlimit are async-signal-safe system calls; nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            const CAP_IPC_LOCK: libc::c_ulong = 14;
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let lim = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("re-running the test binary");
    let text = String::from_utf8_lossy(&out.stdout);
    println!(
        "--- child ---\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed");
    assert!(
        text.contains("MEMLOCK CHILD OK"),
        "child did not run its checks"
    );
}

/// The child half of `memlock_enomem_evicts_then_names_the_limit` (a no-op unless run by it).
#[test]
fn memlock_child() {
    if std::env::var_os("UMM_RDMA_MEMLOCK_CHILD").is_none() {
        return;
    }
    let (rxe0, _rxe1) = rxe_pair("memlock_child").expect("devices in the child");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(cap_eff & (1 << 14), 0, "CAP_IPC_LOCK still effective");
    assert_eq!(umm::memlock_limit(), Some(1 << 20));
    let buf = Anon::new(4 << 20);
    let backend = RdmaBackend::new(rxe0.clone(), Access::REMOTE_RW);

    // The backend alone: ENOMEM is OutOfMemory and names the limit and the capability.
    // SAFETY: `buf` outlives the (failed) registration.
    let err = unsafe { backend.register_raw(buf.sub(0, 2 << 20)) }.unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::OutOfMemory);
    let text = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        text.contains("RLIMIT_MEMLOCK: 1048576 bytes, without CAP_IPC_LOCK"),
        "{text}"
    );
    println!("backend error: {text}");

    // Through the manager: the cached 768 KiB entry is evicted to make room, once.
    let manager = Arc::new(Manager::new(Config::default()));
    let nic = manager.attach(backend).unwrap();
    let a = buf.sub(0, 768 << 10);
    let b = buf.sub(1 << 20, 768 << 10);
    let c = buf.sub(2 << 20, 768 << 10);
    drop(manager.pin(a, &[nic.id()]).unwrap());
    let held = manager.pin(b, &[nic.id()]).unwrap();
    let s = manager.stats();
    assert_eq!(s.device(nic).unwrap().evictions, 1);
    assert_eq!(s.device(nic).unwrap().registrations, 2);
    // Nothing left to evict while `b` is held: a typed error naming the limit.
    match manager.pin(c, &[nic.id()]) {
        Err(umm::Error::MemlockLimit { memlock_limit, .. }) => {
            assert_eq!(memlock_limit, Some(1 << 20))
        }
        Err(e) => panic!("expected MemlockLimit, got {e}"),
        Ok(_) => panic!("registered 1.5 MiB under a 1 MiB RLIMIT_MEMLOCK"),
    }
    drop(held);
    println!("MEMLOCK CHILD OK");
}
