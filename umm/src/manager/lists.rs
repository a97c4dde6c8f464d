//! The device's intrusive entry lists (LRU, parked, old era, stale, free): links live in
//! the entries' writer sides, so keeping an entry on a list costs no allocation, every
//! operation is O(1), and the links are 32-bit entry numbers ([`Link`]: 8 bytes an entry
//! for both, not 16), resolved through the device's [`ChunkTable`].
//!
//! A `List` is a field of `DeviceState`, which only the holder of the device's writer lock
//! can reach; every entry passed in is that device's, so the lock held to reach the list
//! is the lock its writer side needs. An entry is on at most one list at a time; the
//! callers know which (see the `WriterSide` flags and `DeviceState`).

use crate::entry::{ChunkBox, EntryRef, Link, WriterSide, CHUNK};

/// The device's chunks by number (their addresses), to follow links.
#[derive(Default)]
pub(super) struct ChunkTable(Vec<usize>);

impl ChunkTable {
    /// The number the next chunk gets.
    pub fn next_number(&self) -> u32 {
        u32::try_from(self.0.len()).expect("fewer than 2^32 chunks")
    }

    /// Records a chunk made with [`ChunkTable::next_number`].
    pub fn push(&mut self, chunk: &ChunkBox) {
        debug_assert_eq!(chunk.number(), self.next_number());
        self.0.push(
            chunk
                .entries()
                .next()
                .expect("a chunk has entries")
                .to_raw(),
        );
    }

    fn entry(&self, link: Link) -> EntryRef {
        let n = link.get() - 1;
        let (chunk, slot) = (n as usize / CHUNK, n as usize % CHUNK);
        // SAFETY: `self.0[chunk]` is the raw word of slot 0 of a chunk of this device
        // (chunks live as long as the device); adding a slot makes the word of that slot.
        unsafe { EntryRef::from_raw(self.0[chunk]).in_same_chunk(slot) }
    }
}

/// A doubly linked list of entries, oldest first.
#[derive(Default)]
pub(super) struct List {
    head: Option<Link>,
    tail: Option<Link>,
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

    pub fn front(&self, t: &ChunkTable) -> Option<EntryRef> {
        self.head.map(|l| t.entry(l))
    }

    pub fn push_back(&mut self, e: EntryRef, t: &ChunkTable) {
        let w = links(&e);
        w.prev = self.tail;
        w.next = None;
        match self.tail {
            Some(tail) => links(&t.entry(tail)).next = Some(e.link()),
            None => self.head = Some(e.link()),
        }
        self.tail = Some(e.link());
        self.len += 1;
    }

    /// Takes `e` off the list; it must be on it.
    pub fn remove(&mut self, e: EntryRef, t: &ChunkTable) {
        let w = links(&e);
        let (prev, next) = (w.prev.take(), w.next.take());
        match prev {
            Some(p) => links(&t.entry(p)).next = next,
            None => {
                debug_assert_eq!(self.head, Some(e.link()), "entry not on this list");
                self.head = next;
            }
        }
        match next {
            Some(n) => links(&t.entry(n)).prev = prev,
            None => self.tail = prev,
        }
        self.len -= 1;
    }

    pub fn pop_front(&mut self, t: &ChunkTable) -> Option<EntryRef> {
        let e = self.front(t)?;
        self.remove(e, t);
        Some(e)
    }

    /// Moves every entry of `other` to the end of this list, in O(1).
    pub fn append(&mut self, other: &mut List, t: &ChunkTable) {
        let Some(first) = other.head.take() else {
            return;
        };
        match self.tail {
            Some(tail) => {
                links(&t.entry(tail)).next = Some(first);
                links(&t.entry(first)).prev = Some(tail);
            }
            None => self.head = Some(first),
        }
        self.tail = other.tail.take();
        self.len += std::mem::take(&mut other.len);
    }

    /// The entries, oldest first (the list must not change while iterating).
    pub fn iter<'a>(&self, t: &'a ChunkTable) -> impl Iterator<Item = EntryRef> + 'a {
        std::iter::successors(self.front(t), move |e| links(e).next.map(|l| t.entry(l)))
    }
}

/// The free entries: a stack linked through `next`.
#[derive(Default)]
pub(super) struct FreeList {
    top: Option<Link>,
}

impl FreeList {
    pub fn is_empty(&self) -> bool {
        self.top.is_none()
    }

    pub fn push(&mut self, e: EntryRef) {
        let w = links(&e);
        w.prev = None;
        w.next = self.top;
        self.top = Some(e.link());
    }

    pub fn pop(&mut self, t: &ChunkTable) -> Option<EntryRef> {
        let e = t.entry(self.top?);
        self.top = links(&e).next.take();
        Some(e)
    }
}
