//! The device's intrusive entry lists (LRU, parked, old era, stale, free): links live in
//! the entries' writer sides, so keeping an entry on a list costs no allocation and no
//! memory beyond its two links, and every operation is O(1).
//!
//! A `List` is a field of `DeviceState`, which only the holder of the device's writer lock
//! can reach; every entry passed in is that device's, so the lock held to reach the list
//! is the lock its writer side needs. An entry is on at most one list at a time; the
//! callers know which (see the `WriterSide` flags and `DeviceState::lists`).

use crate::entry::{EntryRef, WriterSide};

/// A doubly linked list of entries, oldest first.
#[derive(Default)]
pub(super) struct List {
    head: Option<EntryRef>,
    tail: Option<EntryRef>,
    len: usize,
}

#[allow(clippy::mut_from_ref)]
fn links(e: &EntryRef) -> &mut WriterSide {
    // SAFETY: lists are reached only through `DeviceState`, i.e. under the device's writer
    // lock, and hold only that device's entries (module docs); the reference is used for
    // one link update and not kept.
    unsafe { e.writer() }
}

impl List {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn front(&self) -> Option<EntryRef> {
        self.head
    }

    pub fn push_back(&mut self, e: EntryRef) {
        let w = links(&e);
        w.prev = self.tail;
        w.next = None;
        match self.tail {
            Some(t) => links(&t).next = Some(e),
            None => self.head = Some(e),
        }
        self.tail = Some(e);
        self.len += 1;
    }

    /// Takes `e` off the list; it must be on it.
    pub fn remove(&mut self, e: EntryRef) {
        let w = links(&e);
        let (prev, next) = (w.prev.take(), w.next.take());
        match prev {
            Some(p) => links(&p).next = next,
            None => {
                debug_assert_eq!(self.head, Some(e), "entry not on this list");
                self.head = next;
            }
        }
        match next {
            Some(n) => links(&n).prev = prev,
            None => self.tail = prev,
        }
        self.len -= 1;
    }

    pub fn pop_front(&mut self) -> Option<EntryRef> {
        let e = self.head?;
        self.remove(e);
        Some(e)
    }

    /// Moves every entry of `other` to the end of this list, in O(1).
    pub fn append(&mut self, other: &mut List) {
        let Some(first) = other.head.take() else {
            return;
        };
        match self.tail {
            Some(t) => {
                links(&t).next = Some(first);
                links(&first).prev = Some(t);
            }
            None => self.head = Some(first),
        }
        self.tail = other.tail.take();
        self.len += std::mem::take(&mut other.len);
    }

    /// The entries, oldest first (the list must not change while iterating).
    pub fn iter(&self) -> impl Iterator<Item = EntryRef> + '_ {
        std::iter::successors(self.head, |e| links(e).next)
    }
}

/// The free entries: a stack linked through `next`.
#[derive(Default)]
pub(super) struct FreeList {
    top: Option<EntryRef>,
}

impl FreeList {
    pub fn is_empty(&self) -> bool {
        self.top.is_none()
    }

    pub fn push(&mut self, e: EntryRef) {
        let w = links(&e);
        w.prev = None;
        w.next = self.top;
        self.top = Some(e);
    }

    pub fn pop(&mut self) -> Option<EntryRef> {
        let e = self.top?;
        self.top = links(&e).next.take();
        Some(e)
    }
}
