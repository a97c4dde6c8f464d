//! Strict mode (the default): memory whose pages can be replaced without a userfaultfd
//! event (shmem files: fallocate(PUNCH_HOLE), ftruncate; SysV shm: shmat(SHM_REMAP),
//! shmdt) and memory userfaultfd cannot register (regular file mappings) is refused,
//! typed, naming the mapping and what the source cannot see. Non-strict accepts shmem.

mod common;

use common::source;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use umm::testing::RecordingBackend;
use umm::{Manager, NotifierSource, Range};
use umm_uffd::{Options, UffdError};

/// A `len`-byte memfd mapped MAP_SHARED (the descriptor stays open: hole punches could
/// come through it).
fn memfd_shared(len: usize) -> (OwnedFd, Range) {
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"umm-strict".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizes our own memfd.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(rc, 0);
    // SAFETY: maps our own memfd.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the fresh mapping is `len` bytes long.
    unsafe { std::ptr::write_bytes(p as *mut u8, 7, len) };
    (fd, Range::new(p as usize, len).unwrap())
}

fn anonymous(len: usize) -> Range {
    let r = umm::testing::map_anonymous(len);
    // SAFETY: the fresh mapping is `len` bytes long.
    unsafe { std::ptr::write_bytes(r.start() as *mut u8, 7, len) };
    r
}

fn unmap(r: Range) {
    // SAFETY: the test's own mapping.
    unsafe { libc::munmap(r.start() as *mut _, r.len()) };
}

#[test]
fn memfd_shared_pin_is_refused_naming_the_hole_punch_private_anonymous_still_pins() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let manager = Manager::default();
    let backend = RecordingBackend::new("rec");
    let ledger = backend.ledger();
    let dev = manager.attach(backend).unwrap();
    manager.add_source(s.clone()).unwrap();
    let len = 4 * umm::page_size();
    let (_fd, shared) = memfd_shared(len);
    match manager.pin(shared, &[dev.id()]) {
        Err(umm::Error::Uncovered {
            source_name,
            range,
            mapping,
            operation,
        }) => {
            assert_eq!(source_name, "userfaultfd");
            assert_eq!(range, shared);
            assert!(mapping.contains("memfd"), "{mapping}");
            assert!(operation.contains("fallocate(PUNCH_HOLE)"), "{operation}");
        }
        other => panic!(
            "a memfd MAP_SHARED pin was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    assert_eq!(
        ledger.registrations(),
        0,
        "the refused range was registered"
    );
    let private = anonymous(len);
    let pin = manager.pin(private, &[dev.id()]).unwrap();
    assert!(pin.is_valid());
    drop(pin);
    assert_eq!(s.stats().watches, 1);
    drop(manager);
    unmap(shared);
    unmap(private);
}

#[test]
fn non_strict_accepts_memfd_shared_and_still_sees_its_munmap() {
    let _serial = common::serial();
    let Some(s) = source(Options {
        strict: false,
        ..Options::default()
    }) else {
        return;
    };
    let manager = Manager::default();
    let dev = manager.attach(RecordingBackend::new("rec")).unwrap();
    manager.add_source(s.clone()).unwrap();
    let len = 4 * umm::page_size();
    let (_fd, shared) = memfd_shared(len);
    drop(manager.pin(shared, &[dev.id()]).unwrap());
    let st = s.stats();
    assert_eq!((st.watches, st.unwatchable), (1, 0), "{st:?}");
    unmap(shared);
    // (The pin drains the source: the event is counted once the reader settled.)
    // Whatever is mapped there now (other tests map concurrently), it is not a hit.
    drop(manager.pin(shared, &[dev.id()]));
    assert_eq!(manager.stats().hits(), 0, "the unmapped range was a hit");
    assert_eq!(s.stats().unmap_events, 1);
}

/// A regular file mapped MAP_SHARED: userfaultfd cannot register it at all; the error
/// names the mapping (with its path) and the cause, not a bare EINVAL.
#[test]
fn file_shared_mapping_is_refused_naming_the_file_and_the_cause() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("umm-uffd-strict-{}", std::process::id()));
    let len = 4 * umm::page_size();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(len as u64).unwrap();
    // SAFETY: maps our own file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let r = Range::new(p as usize, len).unwrap();
    let on_tmpfs = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| l.contains(path.to_str().unwrap()))
        && std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(&dir)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("tmpfs"))
            .unwrap_or(false);
    if on_tmpfs {
        eprintln!(
            "SKIP: {} is on tmpfs (shmem), not a regular file system",
            dir.display()
        );
    } else {
        match s.try_watch(1, r) {
            Err(e @ UffdError::Unsupported { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("MAP_SHARED mapping of a regular file"),
                    "{msg}"
                );
                assert!(msg.contains(path.to_str().unwrap()), "{msg}");
                assert!(msg.contains("cannot register"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        // Through the manager's trait: the same typed error, boxed.
        let e = s.watch(2, r).unwrap_err();
        assert!(e.downcast_ref::<UffdError>().is_some(), "{e:?}");
        // Not strict: counted, left uncovered.
        let lax = source(Options {
            strict: false,
            ..Options::default()
        })
        .unwrap();
        lax.try_watch(3, r).unwrap();
        assert_eq!(lax.stats().unwatchable, 1);
    }
    unmap(r);
    drop(file);
    let _ = std::fs::remove_file(&path);
}

/// The same classification with `/proc/self/maps` parsing (kernels before 6.11, such as
/// the guest's 6.1) as with PROCMAP_QUERY.
#[test]
fn maps_parsing_classifies_like_procmap_query() {
    let _serial = common::serial();
    let Some(q) = source(Options::default()) else {
        return;
    };
    let p = source(Options {
        procmap_query: false,
        ..Options::default()
    })
    .unwrap();
    assert!(!p.uses_procmap_query());
    eprintln!("PROCMAP_QUERY on this kernel: {}", q.uses_procmap_query());
    let len = 4 * umm::page_size();
    let (_fd, shared) = memfd_shared(len);
    let private = anonymous(len);
    for s in [&q, &p] {
        assert!(matches!(
            s.try_watch(1, shared),
            Err(UffdError::Uncovered(_))
        ));
        s.try_watch(2, private).unwrap();
        s.unwatch(2, private);
    }
    unmap(shared);
    unmap(private);
}
