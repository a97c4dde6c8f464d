//! Unit tests: the monitor's bookkeeping with a scripted source, and the path from a
//! source's event through `ucm_vm_munmap` to a UCM handler (the one the rcache installs),
//! with the userfaultfd source and a raw `munmap` syscall where userfaultfd is allowed.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use umm::{InvalidationSink, NotifierSource, Range};
use umm_auto::{Preference, SourceKind};

use super::*;

/// A source whose events, generation and refusals the test scripts.
#[derive(Default)]
struct Scripted {
    generation: AtomicU64,
    pending: Mutex<Vec<Range>>,
    watches: Mutex<HashMap<u64, Range>>,
    refuse: AtomicBool,
    overflow: AtomicBool,
}

impl Scripted {
    /// Records `range` as changed, as the kernel module does: ring, then generation.
    fn event(&self, range: Range) {
        self.pending.lock().unwrap().push(range);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

impl NotifierSource for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.refuse.load(Ordering::Relaxed) {
            return Err(Box::new(umm::source::Uncovered {
                range,
                mapping: "a MAP_SHARED shmem mapping",
                operation: "fallocate(PUNCH_HOLE)",
            }));
        }
        self.watches.lock().unwrap().insert(cookie, range);
        Ok(())
    }
    fn unwatch(&self, cookie: u64, range: Range) {
        let removed = self.watches.lock().unwrap().remove(&cookie);
        assert_eq!(
            removed,
            Some(range),
            "unwatch of an unknown or different watch"
        );
    }
    fn generation(&self) -> Option<&AtomicU64> {
        Some(&self.generation)
    }
    fn drain(&self, sink: &dyn InvalidationSink) {
        if self.overflow.swap(false, Ordering::AcqRel) {
            sink.invalidate_all();
        }
        let ranges = std::mem::take(&mut *self.pending.lock().unwrap());
        for r in ranges {
            sink.invalidate(r);
        }
    }
}

fn scripted(strict: bool) -> (Arc<Scripted>, Monitor) {
    let source = Arc::new(Scripted::default());
    let monitor = Monitor::new(source.clone(), SourceKind::Kmod, strict, true);
    (source, monitor)
}

// ---- a UCM handler for UCM_EVENT_VM_UNMAPPED, as the rcache adds one ------------------------

#[repr(C)]
struct VmUnmapped {
    address: *mut c_void,
    size: usize,
}

#[link(name = "ucm")]
extern "C" {
    fn ucm_set_event_handler(
        events: c_int,
        priority: c_int,
        cb: extern "C" fn(c_int, *mut VmUnmapped, *mut c_void),
        arg: *mut c_void,
    ) -> i8;
}

/// Every (address, size) UCM dispatched as `UCM_EVENT_VM_UNMAPPED` in this process.
static SEEN: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

extern "C" fn handler(event_type: c_int, event: *mut VmUnmapped, _arg: *mut c_void) {
    assert_eq!(event_type, UCM_EVENT_VM_UNMAPPED);
    // SAFETY: UCM passes a valid event whose vm_unmapped member is set for this type.
    let e = unsafe { &*event };
    SEEN.lock().unwrap().push((e.address as usize, e.size));
}

/// Declares the event external (as `install` does) and adds the handler, once.
fn ucm_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        ucm::set_external_vm_unmapped();
        // SAFETY: a valid extern "C" callback with the ucm_event_callback_t signature.
        let st = unsafe {
            ucm_set_event_handler(UCM_EVENT_VM_UNMAPPED, 1000, handler, std::ptr::null_mut())
        };
        assert_eq!(st, 0, "ucm_set_event_handler failed ({st})");
    });
}

fn seen(range: Range) -> bool {
    SEEN.lock()
        .unwrap()
        .iter()
        .any(|&(a, n)| a <= range.start() && a + n >= range.end())
}

// ---- tests ----------------------------------------------------------------------------------

#[test]
fn a_registration_is_watched_until_it_is_deregistered() {
    let (source, m) = scripted(true);
    let Watch::Cookie(cookie) = m.watch(0x10000, 0x3000) else {
        panic!("not watched");
    };
    assert_eq!(
        source.watches.lock().unwrap().get(&cookie),
        Some(&Range::new(0x10000, 0x3000).unwrap())
    );
    m.registered(0xabc0, cookie, 0x10000, 0x3000);
    assert_eq!(m.stats().live, 1);
    m.deregistering(0xabc0);
    assert!(
        source.watches.lock().unwrap().is_empty(),
        "dereg must unwatch"
    );
    assert_eq!(
        m.stats(),
        Stats {
            watched: 1,
            ..Stats::default()
        }
    );
    // A second dereg of the same (or an unknown) mr changes nothing.
    m.deregistering(0xabc0);
    assert!(source.watches.lock().unwrap().is_empty());
}

#[test]
fn a_failed_registration_drops_its_watch() {
    let (source, m) = scripted(true);
    let Watch::Cookie(cookie) = m.watch(0x20000, 0x1000) else {
        panic!("not watched");
    };
    m.unwatch(cookie, 0x20000, 0x1000);
    assert!(source.watches.lock().unwrap().is_empty());
    assert_eq!(m.stats().live, 0);
}

#[test]
fn what_the_source_cannot_protect_is_refused_in_strict_mode_only() {
    let (source, strict) = scripted(true);
    source.refuse.store(true, Ordering::Relaxed);
    assert_eq!(strict.watch(0x30000, 0x1000), Watch::Refuse);
    assert_eq!(strict.stats().refused, 1);
    let (source, lax) = scripted(false);
    source.refuse.store(true, Ordering::Relaxed);
    assert_eq!(lax.watch(0x30000, 0x1000), Watch::Unprotected);
    assert_eq!(lax.stats().unprotected, 1);
    assert_eq!(lax.stats().refused, 0);
}

#[test]
fn events_reach_ucm_at_the_next_sync_and_only_when_the_generation_moved() {
    ucm_handler();
    let (source, m) = scripted(true);
    let r = Range::new(0x7a5a_0000_0000, 0x4000).unwrap();
    m.sync();
    assert_eq!(m.stats().drains, 0, "nothing happened: no drain");
    // Recorded in the ring without a generation bump: the cheap check does not drain.
    source.pending.lock().unwrap().push(r);
    m.sync();
    assert_eq!(m.stats().drains, 0);
    assert!(!seen(r));
    source.generation.fetch_add(1, Ordering::Release);
    m.sync();
    assert!(
        seen(r),
        "ucm_vm_munmap did not reach the VM_UNMAPPED handler"
    );
    assert_eq!((m.stats().drains, m.stats().invalidations), (1, 1));
    let r2 = Range::new(0x7a5a_1000_0000, 0x1000).unwrap();
    source.event(r2);
    m.sync();
    assert!(seen(r2));
    assert_eq!((m.stats().drains, m.stats().invalidations), (2, 2));
    m.sync();
    assert_eq!(m.stats().drains, 2, "generation unchanged: no third drain");
}

#[test]
fn an_overflow_invalidates_every_live_registration() {
    ucm_handler();
    let (source, m) = scripted(true);
    let (a, b) = (0x7b00_0000_0000usize, 0x7b00_1000_0000usize);
    for (mr, addr) in [(1usize, a), (2, b)] {
        let Watch::Cookie(c) = m.watch(addr, 0x2000) else {
            panic!("not watched")
        };
        m.registered(mr, c, addr, 0x2000);
    }
    source.overflow.store(true, Ordering::Release);
    source.generation.fetch_add(1, Ordering::Release);
    m.sync();
    assert!(seen(Range::new(a, 0x2000).unwrap()) && seen(Range::new(b, 0x2000).unwrap()));
    assert_eq!(m.stats().invalidate_all, 1);
}

/// The raw-syscall row on the host: a real userfaultfd source sees `syscall(SYS_munmap)`,
/// which UCX's libc hooks cannot, and the range reaches UCM's handler.
#[test]
fn a_raw_munmap_seen_by_userfaultfd_reaches_ucm() {
    ucm_handler();
    let source = match umm_uffd::UffdSource::new(umm_uffd::Options::default()) {
        Ok(s) => s,
        Err(e) => {
            println!("SKIP: userfaultfd unavailable here: {e}");
            return;
        }
    };
    let m = Monitor::new(source, SourceKind::Uffd, true, true);
    let len = 64 << 10;
    // (Unmapped below by the raw syscall.)
    let p = umm::testing::map_anonymous(len).start() as *mut libc::c_void;
    // SAFETY: `p` is `len` writable bytes.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0xa5, len) };
    let Watch::Cookie(cookie) = m.watch(p as usize, len) else {
        panic!("userfaultfd refused private anonymous memory")
    };
    m.registered(0x5151, cookie, p as usize, len);
    let r = Range::new(p as usize, len).unwrap();
    assert!(!seen(r));
    // SAFETY: unmaps the mapping made above; nothing refers to it afterwards.
    let rc = unsafe { libc::syscall(libc::SYS_munmap, p, len) };
    assert_eq!(rc, 0);
    // The generation moved before the syscall returned; the range follows at the drain.
    m.sync();
    assert!(seen(r), "the raw munmap did not reach UCM");
    m.deregistering(0x5151);
}

#[test]
fn the_constructor_installs_only_when_preloaded_and_not_disabled() {
    let lib = Some("/opt/umm/lib/libumm_ucx.so");
    assert!(auto_install_wanted(lib, None));
    assert!(auto_install_wanted(
        Some("libumm_ucx.so libregcount.so"),
        None
    ));
    assert!(auto_install_wanted(Some("a.so:libumm_ucx.so"), Some("1")));
    assert!(!auto_install_wanted(lib, Some("0")));
    assert!(!auto_install_wanted(Some("libregcount.so"), None));
    assert!(!auto_install_wanted(Some("/x/libumm_ucxx.so"), Some("0")));
    assert!(!auto_install_wanted(None, None));
}

#[test]
fn interpose_and_none_are_refused() {
    assert!(matches!(
        open_source(Preference::Only(SourceKind::Interpose)),
        Err(UcxError::UnusableSource("interpose"))
    ));
    assert!(matches!(
        open_source(Preference::None),
        Err(UcxError::UnusableSource("none"))
    ));
}
