//! The hit path allocates nothing: a counting global allocator observes a thread doing
//! thousands of hits (and their drops) on two devices. Also: `Manager` and `Pin` are
//! `Send + Sync`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::Arena;
use umm::testing::RecordingBackend;
use umm::{Manager, Pin};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts calls on the calling thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

#[test]
fn hits_and_their_drops_allocate_nothing() {
    let arena = Arena::new(64);
    let m = Manager::default();
    let a = m.attach(RecordingBackend::new("a")).unwrap();
    let b = m
        .attach(RecordingBackend::new("b").refusing_overlap())
        .unwrap();
    let devs = [a.id(), b.id()];
    let ranges: Vec<_> = (0..16).map(|i| arena.pages(i * 4, 2)).collect();
    for r in &ranges {
        drop(m.pin(*r, &devs).unwrap()); // misses: these may allocate
    }
    let before = allocations();
    for k in 0..10_000 {
        let p = m.pin(ranges[k % ranges.len()], &devs).unwrap();
        assert!(p.translation(a).is_some());
        drop(p);
    }
    assert_eq!(allocations() - before, 0, "the hit path allocated");
    assert_eq!(m.stats().hits(), 20_000);
}

#[test]
fn manager_and_pin_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Manager>();
    send_sync::<Pin<'static>>();
}
