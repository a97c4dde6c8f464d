//! A fork child's copy of a userfaultfd source must touch nothing the parent uses: after
//! the child dropped its copy (of the source, or of a manager holding it) or unwatched a
//! range, the parent's munmap of a watched range must still return and be reported.
//! Each scenario runs in its own test process (integration test binary) under a
//! watchdog; the child does only what the scenario needs, then `_exit`s.

mod common;

use common::{source, within, LIMIT};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use umm::testing::RecordingBackend;
use umm::{Device, InvalidationSink, Manager, NotifierSource, Range};
use umm_uffd::{Options, UffdSource};

fn map(pages: usize) -> Range {
    let r = umm::testing::map_anonymous(pages * umm::page_size());
    // SAFETY: the fresh mapping is `r.len()` bytes long.
    unsafe { std::ptr::write_bytes(r.start() as *mut u8, 1, r.len()) };
    r
}

/// Forks; the child runs `child` and `_exit`s with its result; the parent waits (bounded:
/// a child still running after [`LIMIT`] is killed and the test fails).
/// A manager with one recording device, covered by a userfaultfd source, and four fresh
/// pages; `None` (the test skips, `source` says why) without userfaultfd.
fn covered_manager() -> Option<(Manager, Device<RecordingBackend>, Arc<UffdSource>, Range)> {
    let s = source(Options::default())?;
    let manager = Manager::default();
    let dev = manager.attach(RecordingBackend::new("rec")).unwrap();
    manager.add_source(s.clone()).unwrap();
    Some((manager, dev, s, map(4)))
}

fn in_child(child: impl FnOnce() -> i32) {
    // SAFETY: the child runs `child` (each test keeps it to drops and syscalls) and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = child();
        // SAFETY: _exit ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + LIMIT;
    let mut status = 0;
    loop {
        // SAFETY: polls our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            break;
        }
        assert_eq!(rc, 0, "waitpid: {}", std::io::Error::last_os_error());
        if Instant::now() > deadline {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the fork child did not exit within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the fork child failed: status {status:#x}"
    );
}

#[derive(Default)]
struct Log(parking_lot::Mutex<Vec<Range>>, AtomicUsize);

impl InvalidationSink for Log {
    fn invalidate(&self, range: Range) {
        self.0.lock().push(range);
    }
    fn invalidate_all(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

/// The parent munmaps `r` (bounded) and must see the UNMAP event: drained into a log
/// when `drain` (the drain waits for the reader to settle, so the counter is final then);
/// else left for the manager the source serves, and checked by the caller.
fn parent_munmap_is_reported(s: &UffdSource, r: Range, drain: bool) -> u64 {
    let before = s.stats().unmap_events;
    if drain {
        // The fork made the parent's pages copy-on-write: the first drain after it
        // invalidates everything (see `a_parent_write_after_fork_...` below).
        let log = Log::default();
        s.drain(&log);
        assert_eq!(log.1.load(Ordering::Relaxed), 1, "no invalidation at fork");
    }
    within("the parent's munmap of a watched range", move || {
        // SAFETY: unmaps the test's own mapping.
        assert_eq!(unsafe { libc::munmap(r.start() as *mut _, r.len()) }, 0);
    });
    if drain {
        let log = Log::default();
        s.drain(&log);
        assert_eq!(*log.0.lock(), vec![r]);
        assert_eq!(log.1.load(Ordering::Relaxed), 0);
        assert_eq!(
            s.stats().unmap_events,
            before + 1,
            "the parent's munmap gave no UNMAP event"
        );
    }
    before
}

#[test]
fn child_dropping_its_copy_of_the_source_leaves_the_parent_reader_running() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let r = map(4);
    s.watch(1, r).unwrap();
    let mut only = Some(s);
    in_child(|| {
        drop(only.take()); // the child's only reference: UffdSource::drop runs there
        0
    });
    let s = only.take().unwrap(); // (the parent's own copy is untouched)
    parent_munmap_is_reported(&s, r, true);
}

#[test]
fn child_dropping_its_copy_of_a_manager_leaves_the_parent_covered() {
    let _serial = common::serial();
    let Some((manager, dev, s, r)) = covered_manager() else {
        return;
    };
    let pin = manager.pin(r, &[dev.id()]).unwrap();
    drop(pin);
    let mut copies = Some((manager, s));
    in_child(|| {
        // The child drops the manager (detach, then its cached entries: a child must not
        // unwatch them) and its last reference to the source.
        drop(copies.take());
        0
    });
    let (manager, s) = copies.take().unwrap();
    let before = parent_munmap_is_reported(&s, r, false);
    let pin = manager.pin(r, &[dev.id()]);
    // The range is unmapped now: whatever the backend says, it must not be a cache hit.
    drop(pin);
    assert_eq!(manager.stats().hits(), 0, "the unmapped range was a hit");
    assert_eq!(
        s.stats().unmap_events,
        before + 1,
        "the parent's munmap gave no UNMAP event"
    );
}

#[test]
fn child_unwatching_does_not_unregister_the_parents_range() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let r = map(4);
    s.watch(9, r).unwrap();
    in_child(|| {
        s.unwatch(9, r);
        0
    });
    parent_munmap_is_reported(&s, r, true);
    s.unwatch(9, r);
}

#[test]
fn child_detaching_leaves_the_parent_covered() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let manager = Manager::default();
    manager.add_source(s.clone()).unwrap();
    let id = manager.id();
    let r = map(4);
    s.watch(1_000_000, r).unwrap();
    in_child(|| {
        s.detach(id);
        0
    });
    parent_munmap_is_reported(&s, r, true);
    s.unwatch(1_000_000, r);
    drop(manager);
}

#[test]
fn parent_dropping_the_source_while_a_child_lives_leaves_no_munmap_blocked() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let r = map(4);
    s.watch(2, r).unwrap();
    let mut fds = [0; 2];
    // SAFETY: creates a pipe into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let [rd, wr] = fds;
    // SAFETY: the child only blocks in read(2) until the parent closes the pipe, then
    // `_exit`s: it holds its inherited descriptors meanwhile (unless the source closed
    // them at fork).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: closes our copy of the write end, then reads one byte into `b`.
        unsafe {
            libc::close(wr);
            libc::read(rd, (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    // SAFETY: our copy of the read end.
    unsafe { libc::close(rd) };
    drop(s);
    let unmapped = std::panic::catch_unwind(|| {
        within(
            "munmap after the source was dropped, while a child lives",
            move || {
                // SAFETY: the test's own mapping.
                assert_eq!(unsafe { libc::munmap(r.start() as *mut _, r.len()) }, 0)
            },
        )
    });
    // SAFETY: releases and reaps the child.
    unsafe {
        libc::close(wr);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    unmapped.unwrap();
}

/// After a fork the parent's private pages are shared copy-on-write with the child; the
/// parent's next write moves the range to new frames with no unmap. A translation cached
/// before the fork must not be served after it (issue 11: this was a cache hit with the
/// registration made before the fork).
#[test]
fn a_parent_write_after_fork_is_never_served_from_the_cache() {
    let _serial = common::serial();
    let Some((manager, dev, s, r)) = covered_manager() else {
        return;
    };
    let before = manager
        .pin(r, &[dev.id()])
        .unwrap()
        .registration_id(dev.id());
    // Cached, and a hit while nothing happened.
    let again = manager
        .pin(r, &[dev.id()])
        .unwrap()
        .registration_id(dev.id());
    assert_eq!(again, before);
    let forks = s.stats().fork_notices;
    in_child(|| 0);
    assert_eq!(s.stats().fork_notices, forks + 1);
    // The copy-on-write break: the parent's addresses get new frames.
    // SAFETY: the test's own mapping, `r.len()` bytes.
    unsafe { std::ptr::write_bytes(r.start() as *mut u8, 2, r.len()) };
    let after = manager
        .pin(r, &[dev.id()])
        .unwrap()
        .registration_id(dev.id());
    assert_ne!(
        after, before,
        "the registration made before the fork was served after the parent's write"
    );
    assert_eq!(manager.stats().hits(), 1);
}
