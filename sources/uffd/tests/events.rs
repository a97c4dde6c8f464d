//! The userfaultfd source against the real kernel. Every blocking step runs under a
//! watchdog that fails the test instead of hanging; without userfaultfd the tests print a
//! skip reason.

mod common;

use common::{source, within};

use std::sync::atomic::Ordering;

use parking_lot::Mutex;
use umm::{InvalidationSink, NotifierSource, Range};
use umm_uffd::{Options, UffdError, UffdSource};

#[derive(Default)]
struct Log(Mutex<Vec<Range>>, Mutex<usize>);

impl InvalidationSink for Log {
    fn invalidate(&self, range: Range) {
        self.0.lock().push(range);
    }
    fn invalidate_all(&self) {
        *self.1.lock() += 1;
    }
}

fn map(pages: usize) -> Range {
    umm::testing::map_anonymous(pages * umm::page_size())
}

fn touch(r: Range) {
    for a in (r.start()..r.end()).step_by(umm::page_size()) {
        // SAFETY: `a` lies inside a live read-write mapping of this test.
        unsafe { (a as *mut u8).write_volatile(1) };
    }
}

fn generation(s: &UffdSource) -> u64 {
    s.generation().unwrap().load(Ordering::Acquire)
}

/// What the source has for us now: `drain` waits for every event announced before it,
/// and the reader announces before it releases the unmapping thread.
fn drained(s: &UffdSource) -> Vec<Range> {
    let log = Log::default();
    s.drain(&log);
    let v = log.0.lock().clone();
    v
}

#[test]
fn munmap_whole_and_part_are_reported_before_munmap_returns_or_just_after() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let r = map(4);
    touch(r);
    s.watch(1, r).unwrap();
    let page = umm::page_size();
    let part = Range::new(r.start() + page, page).unwrap();
    within("munmap of one page", move || {
        // SAFETY: unmaps a page of our own mapping.
        let rc = unsafe { libc::munmap(part.start() as *mut _, part.len()) };
        assert_eq!(rc, 0)
    });
    assert_eq!(drained(&s), vec![part]);
    let g = generation(&s);
    within("munmap of the rest", move || {
        // SAFETY: unmaps the rest of our own mapping.
        assert_eq!(unsafe { libc::munmap(r.start() as *mut _, r.len()) }, 0)
    });
    assert!(generation(&s) > g);
    let got = drained(&s);
    assert!(
        !got.is_empty() && got.iter().all(|g| r.contains(g)),
        "{got:?}"
    );
    assert_eq!(s.stats().unmap_events, 1 + got.len() as u64);
    s.unwatch(1, r);
}

#[test]
fn madvise_dontneed_is_reported_and_refaulting_does_not_hang() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let r = map(8);
    touch(r);
    s.watch(7, r).unwrap();
    within(
        "madvise(DONTNEED) then touching the pages again",
        move || {
            // SAFETY: empties our own mapping.
            let rc = unsafe { libc::madvise(r.start() as *mut _, r.len(), libc::MADV_DONTNEED) };
            assert_eq!(rc, 0);
            touch(r); // faults in fresh zero pages: must not be trapped
        },
    );
    assert_eq!(drained(&s), vec![r]);
    assert_eq!(s.stats().faults_resolved, 0);
    s.unwatch(7, r);
    // SAFETY: our own mapping, no longer watched.
    unsafe { libc::munmap(r.start() as *mut _, r.len()) };
    assert!(drained(&s).is_empty(), "unwatched ranges must not report");
}

#[test]
fn mremap_move_reports_the_old_place() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let r = map(4);
    touch(r);
    s.watch(3, r).unwrap();
    let new = within("mremap to a larger size (moves)", move || {
        // SAFETY: moves our own mapping; the old addresses are not used afterwards.
        let p = unsafe {
            libc::mremap(
                r.start() as *mut _,
                r.len(),
                r.len() * 64,
                libc::MREMAP_MAYMOVE,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    });
    let got = drained(&s);
    if new != r.start() {
        assert!(got.contains(&r), "{got:?}");
        assert_eq!(s.stats().remap_events, 1);
    }
    s.unwatch(3, r);
    // SAFETY: unmaps the moved mapping.
    within("munmap of the moved mapping", move || unsafe {
        libc::munmap(new as *mut _, r.len() * 64)
    });
}

#[test]
fn overlapping_watches_keep_the_registration_until_the_last_unwatch() {
    let _serial = common::serial();
    let Some(_) = source(Options::default()) else {
        return;
    };
    // Exact registrations (no widening), so the pages of each watch are all there is.
    let s = UffdSource::new(Options {
        span: 0,
        ..Options::default()
    })
    .unwrap();
    let r = map(4);
    s.watch(10, r).unwrap();
    s.watch(11, Range::new(r.start(), umm::page_size()).unwrap())
        .unwrap();
    s.unwatch(10, r);
    // Page 0 is still watched by cookie 11, pages 1..4 are not.
    let page = umm::page_size();
    within("munmap of pages 1..4", move || {
        // SAFETY: unmaps part of our own mapping.
        unsafe { libc::munmap((r.start() + page) as *mut _, r.len() - page) }
    });
    assert!(drained(&s).is_empty(), "pages 1..4 were unregistered");
    within("munmap of page 0", move || {
        // SAFETY: unmaps the rest of our own mapping.
        unsafe { libc::munmap(r.start() as *mut _, page) }
    });
    assert_eq!(drained(&s), vec![Range::new(r.start(), page).unwrap()]);
    s.unwatch(11, r);
}

#[test]
fn watches_in_one_small_vma_share_its_whole_registration() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let page = umm::page_size();
    let r = map(8);
    let one = move |i: usize| Range::new(r.start() + i * page, page).unwrap();
    s.watch(20, one(1)).unwrap();
    s.watch(21, one(5)).unwrap();
    let st = s.stats();
    assert_eq!((st.watches, st.spans, st.vmas_added), (2, 1, 0), "{st:?}");
    s.unwatch(20, one(1));
    // The VMA stays registered for cookie 21: an unmap of an unwatched page of it is an
    // event too (it invalidates nothing cached).
    within("munmap of page 7", move || {
        // SAFETY: unmaps a page of our own mapping.
        unsafe { libc::munmap(one(7).start() as *mut _, page) }
    });
    assert_eq!(drained(&s), vec![one(7)]);
    s.unwatch(21, one(5));
    assert_eq!(s.stats().spans, 0);
    within("munmap of the rest", move || {
        // SAFETY: unmaps the rest of our own mapping.
        unsafe { libc::munmap(r.start() as *mut _, 7 * page) }
    });
    assert!(
        drained(&s).is_empty(),
        "the last unwatch unregistered the VMA"
    );
}

#[test]
fn fork_child_is_not_covered_and_never_hangs() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let r = map(4);
    touch(r);
    s.watch(5, r).unwrap();
    let status = within("fork + child munmap + waitpid", move || {
        // SAFETY: the child only calls async-signal-safe functions (getpid via the watch
        // refusal path allocates nothing before it returns an error value) and _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: unmaps the child's copy; without EVENT_FORK it is unregistered.
            let rc = unsafe { libc::munmap(r.start() as *mut _, r.len()) };
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(if rc == 0 { 0 } else { 2 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    });
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    assert!(
        drained(&s).is_empty(),
        "the child's unmap is not the parent's event"
    );
    s.unwatch(5, r);
    // SAFETY: our own mapping.
    unsafe { libc::munmap(r.start() as *mut _, r.len()) };
}

#[test]
fn dropping_the_source_leaves_no_thread_blocked() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let r = map(2);
    s.watch(1, r).unwrap();
    within("dropping the source", move || drop(s));
    within("munmap after the source is gone", move || {
        // SAFETY: our own mapping.
        assert_eq!(unsafe { libc::munmap(r.start() as *mut _, r.len()) }, 0)
    });
}

#[test]
fn sysv_shm_is_refused_in_strict_mode_and_counted_otherwise() {
    let _serial = common::serial();
    let Some(s) = source(Options::default()) else {
        return;
    };
    let lax = UffdSource::new(Options {
        strict: false,
        ..Options::default()
    })
    .unwrap();
    let len = 4 * umm::page_size();
    // SAFETY: a private SysV segment, attached, removed at the end.
    let (id, p) = unsafe {
        let id = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
        assert!(id >= 0);
        (id, libc::shmat(id, std::ptr::null(), 0))
    };
    let r = Range::new(p as usize, len).unwrap();
    // Strict: refused before registering, naming what userfaultfd cannot see there.
    match s.try_watch(1, r) {
        Err(UffdError::Uncovered(u)) => {
            assert_eq!(u.range, r);
            assert!(u.operation.contains("shmat(SHM_REMAP)"), "{u}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.stats().uncovered, 1);
    // Not strict: the kernel refuses it (without UFFD_FEATURE_WP_ASYNC), so it is counted.
    lax.try_watch(2, r).unwrap();
    let st = lax.stats();
    assert_eq!(st.unwatchable + st.watches, 1, "{st:?}");
    // SAFETY: detaches and removes our own segment.
    unsafe {
        libc::shmdt(p);
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
    }
}

#[test]
fn ring_overflow_invalidates_everything_once() {
    let _serial = common::serial();
    let Some(_) = source(Options::default()) else {
        return;
    };
    let s = UffdSource::new(Options {
        ring_capacity: 2,
        ..Options::default()
    })
    .unwrap();
    let pages: Vec<Range> = (0..5).map(|_| map(1)).collect();
    for (i, r) in pages.iter().enumerate() {
        s.watch(i as u64, *r).unwrap();
    }
    let p2 = pages.clone();
    within("five munmaps", move || {
        for r in p2 {
            // SAFETY: our own mappings.
            unsafe { libc::munmap(r.start() as *mut _, r.len()) };
        }
    });
    let log = Log::default();
    s.drain(&log);
    assert_eq!(*log.1.lock(), 1);
    assert!(log.0.lock().is_empty());
    assert!(s.stats().overflows >= 1);
}
