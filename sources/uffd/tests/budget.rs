//! userfaultfd registrations split VMAs; the process may hold at most `vm.max_map_count`
//! of them, and past that the application's own `mmap`s fail with ENOMEM. The source must
//! keep well below: coalesce what it registers, and refuse (typed) before the limit.
//! Each test binary is its own process, so the VMA counts here are this file's alone;
//! the tests run one at a time.

mod common;

use common::source;

use umm::testing::RecordingBackend;
use umm::{Manager, Range};
use umm_uffd::{Options, UffdError};

fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530)
}

fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

fn map(len: usize) -> usize {
    // SAFETY: a fresh private anonymous mapping, never touched by the kernel for us.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p as usize
}

/// Whether `e` is this source's typed refusal for the VMA budget.
fn is_budget_refusal(e: &umm::Error) -> bool {
    match e {
        umm::Error::Watch { source, .. } => {
            matches!(
                source.downcast_ref::<UffdError>(),
                Some(UffdError::VmaBudget { .. })
            )
        }
        _ => false,
    }
}

/// Pins `n` one-page ranges two pages apart (each registered with userfaultfd) and checks
/// that the process stays well below `vm.max_map_count` and that an unrelated mmap works.
/// Returns how many pins succeeded before the first (typed) refusal.
fn pins_two_pages_apart(options: Options, n: usize) -> Option<usize> {
    let s = source(options)?;
    let max = max_map_count();
    let page = umm::page_size();
    let manager = Manager::default();
    let dev = manager.attach(RecordingBackend::new("rec")).unwrap();
    manager.add_source(s.clone()).unwrap();
    let base = map(2 * n * page);
    // Touch every pinned page (the manager checks that a range is mapped).
    let before = map_count();
    let mut ok = 0;
    let mut refused = None;
    for i in 0..n {
        let r = Range::new(base + 2 * i * page, page).unwrap();
        // SAFETY: the page lies in the test's mapping.
        unsafe { (r.start() as *mut u8).write_volatile(1) };
        match manager.pin(r, &[dev.id()]) {
            Ok(pin) => {
                ok += 1;
                drop(pin); // stays cached (and watched)
            }
            Err(e) => {
                assert!(is_budget_refusal(&e), "pin {i} failed untyped: {e:?}");
                refused.get_or_insert(i);
            }
        }
    }
    let after = map_count();
    eprintln!(
        "{n} pins two pages apart ({options:?}): {ok} cached, first refusal at {refused:?}, \
         VMAs {before} -> {after} (vm.max_map_count {max}), source stats {:?}",
        s.stats()
    );
    assert!(
        after < max - max / 8,
        "the source let the process reach {after} of {max} VMAs"
    );
    // The application's own mmaps still work: 1000 separate ones.
    let mut mine = Vec::new();
    for _ in 0..1000 {
        // SAFETY: a fresh anonymous mapping, alternating protections so none merge.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                if mine.len() % 2 == 0 {
                    libc::PROT_READ
                } else {
                    libc::PROT_READ | libc::PROT_WRITE
                },
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "the application's mmap failed: {}",
            std::io::Error::last_os_error()
        );
        mine.push(p);
    }
    for p in mine {
        // SAFETY: the mappings made above.
        unsafe { libc::munmap(p, page) };
    }
    drop(manager);
    assert_eq!(s.stats().watches, 0);
    // SAFETY: the test's mapping.
    unsafe { libc::munmap(base as *mut _, 2 * n * page) };
    Some(ok)
}

#[test]
fn watches_two_pages_apart_are_coalesced_and_never_exhaust_the_vma_limit() {
    let _serial = common::serial();
    let n = max_map_count() * 5 / 8; // 40,956 with the default limit: past it, today
    let Some(ok) = pins_two_pages_apart(Options::default(), n) else {
        return;
    };
    assert_eq!(ok, n, "coalesced watches need no refusal");
}

#[test]
fn exact_watches_two_pages_apart_are_refused_typed_well_below_the_vma_limit() {
    let _serial = common::serial();
    // Exact registrations: every watch splits its VMA twice, so the budget must refuse.
    let options = Options {
        span: 0,
        ..Options::default()
    };
    let n = max_map_count() * 5 / 8;
    let Some(ok) = pins_two_pages_apart(options, n) else {
        return;
    };
    assert!(ok < n, "no refusal among {n} exact watches two pages apart");
    assert!(
        ok >= max_map_count() / 16,
        "refused too early: after {ok} pins"
    );
}
