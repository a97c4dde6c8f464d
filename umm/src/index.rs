//! The lock-free lookup index of one device: a radix tree keyed by 4 KiB page number.
//!
//! # Why a radix tree
//!
//! Measured on the project's machine (docs/design.md): a binary search over a sorted
//! snapshot costs ~10 ns at 10^3 entries and ~100 ns with a cache miss at 10^5, an
//! `arc-swap`ed snapshot adds two locked operations per lookup and costs O(n) per insert,
//! while a page-table-like radix stays at 17–19 ns at every size (measured through the
//! whole `pin` + drop: 26 ns at 1 and 10^3 entries, 29 ns at 10^5). So hits walk a four-level
//! tree of 512-slot nodes (4 KiB pages → 36-bit page numbers → 48-bit addresses, the
//! x86-64 and arm64 user address space); higher addresses are simply never found here and
//! take the locked slow path.
//!
//! # Slots
//!
//! A slot holds 0 (nothing), a child node pointer (low bit clear), or an entry word
//! (`EntryRef::to_raw`: the entry's chunk address with its slot number in the low bits,
//! bit 0 clear) with the low bit set, meaning "this entry covers (part of) every page of the slot's span" —
//! an entry covering a whole aligned 2 MiB or 1 GiB block sits in one upper-level slot, so
//! inserting a large registration writes O(levels × 512) slots, not one per page.
//!
//! Entries of one device may overlap (verbs and Vulkan allow it). The index is a *hint*:
//! the most recently inserted entry wins a page, and a reader always validates the entry it
//! found (state and range, after taking its reference; see `entry`). When the entry found
//! at the first page does not cover the whole request, the hit falls back to the locked
//! path, which searches every live entry. Removing an entry clears the slots that point to
//! it; the caller then re-inserts the live entries that overlapped it (`fill_empty`).
//!
//! Only the holder of the device's writer lock modifies the tree. Child nodes are published
//! with `Release` after being filled.
//!
//! # Giving nodes back under lock-free readers
//!
//! A node whose slots all became empty is unlinked from its parent and returned to the
//! index's [`NodePool`]. Nodes are *type-stable*: the pool carves them out of its own
//! mappings and never unmaps them while the index lives, so a reader that loaded the
//! pointer just before the unlink still reads mapped memory. What it reads may be the old
//! contents, zeros, or the contents of the node's next use (another span, another level):
//! zeros end the walk (miss), a child pointer leads into another pool node (mapped), and an
//! entry word leads to an entry that the hit validates anyway (`LIVE`, its era, and a range
//! that covers the request), so a recycled node can cost a needless slow path, never a
//! wrong translation. The walk is bounded by the reader's own level count. Beyond a few
//! resident spares, freed nodes are `MADV_DONTNEED`ed: their memory goes back to the
//! kernel and reads as zeros until reused, so the index's memory follows what is cached
//! now, not what was ever cached.

use std::sync::atomic::{AtomicUsize, Ordering};

const FANOUT_BITS: u32 = 9;
const FANOUT: usize = 1 << FANOUT_BITS;
const LEVELS: u32 = 4;
const PAGE_BITS: u32 = 12;
/// One past the highest page number the tree covers.
const PAGE_LIMIT: u64 = 1 << (FANOUT_BITS * LEVELS);
const ENTRY_TAG: usize = 1;

/// One 4 KiB node: exactly one page, so the pool can give its memory back page by page.
#[repr(C, align(4096))]
struct Node {
    slots: [AtomicUsize; FANOUT],
}

/// Nodes per pool mapping (1 MiB).
const SLAB_NODES: usize = 256;
/// Freed nodes kept resident for reuse; beyond this they are `MADV_DONTNEED`ed.
const RESIDENT_SPARES: usize = 64;

/// Where an index's nodes come from; see the [module docs](self). Kept with the writer's
/// state (under the device's lock) and passed to every update: taking it `&mut` is what
/// makes an update exclusive, with no lock of its own. It must outlive the readers of its
/// index: both belong to the device.
pub(crate) struct NodePool {
    /// Every mapping ever made, unmapped when the index drops.
    slabs: Vec<*mut Node>,
    /// Freed nodes, resident (reused first) ...
    spares: Vec<*mut Node>,
    /// ... and given back to the kernel (they read as zeros).
    cold: Vec<*mut Node>,
    /// Nodes linked into the tree now (the root excluded).
    in_use: usize,
}

// SAFETY: the raw pointers are to the pool's own mappings, used only through `&mut self`.
unsafe impl Send for NodePool {}

impl NodePool {
    pub(crate) fn new() -> Self {
        NodePool {
            slabs: Vec::new(),
            spares: Vec::new(),
            cold: Vec::new(),
            in_use: 0,
        }
    }

    fn alloc(&mut self, fill: usize) -> *mut Node {
        let node = match self.spares.pop().or_else(|| self.cold.pop()) {
            Some(n) => n,
            None => {
                let bytes = SLAB_NODES * std::mem::size_of::<Node>();
                // (Ours until Drop.)
                let Some(p) = crate::range::map_anonymous(bytes) else {
                    std::alloc::handle_alloc_error(std::alloc::Layout::new::<Node>());
                };
                let base = p.as_ptr().cast::<Node>();
                self.slabs.push(base);
                // SAFETY: every `base.add(i)` lies inside the new mapping of SLAB_NODES nodes.
                self.cold
                    .extend((1..SLAB_NODES).rev().map(|i| unsafe { base.add(i) }));
                base
            }
        };
        // SAFETY: pool nodes stay mapped while the index lives; zero-filled anonymous
        // memory is a valid `Node` (all-zero atomics).
        for slot in unsafe { &(*node).slots } {
            slot.store(fill, Ordering::Relaxed);
        }
        self.in_use += 1;
        node
    }

    /// Takes back a node already unlinked from the tree (readers may still read it).
    fn free(&mut self, node: *mut Node) {
        self.in_use -= 1;
        if self.spares.len() < RESIDENT_SPARES {
            self.spares.push(node);
            return;
        }
        // SAFETY: the page is ours and stays mapped; DONTNEED only drops its contents, so a
        // racing reader reads zeros (an empty slot), which is safe (module docs).
        unsafe {
            libc::madvise(
                node.cast(),
                std::mem::size_of::<Node>(),
                libc::MADV_DONTNEED,
            )
        };
        self.cold.push(node);
    }
}

impl Drop for NodePool {
    fn drop(&mut self) {
        for &slab in &self.slabs {
            // SAFETY: each slab is a mapping of SLAB_NODES nodes made in `alloc`; the index
            // is being dropped, so no reader remains.
            unsafe {
                libc::munmap(slab.cast(), SLAB_NODES * std::mem::size_of::<Node>());
            }
        }
    }
}

/// See the [module docs](self).
pub(crate) struct RadixIndex {
    root: Box<Node>,
    /// Nodes linked into the tree now (the root excluded), for `bytes` without the pool.
    in_use: AtomicUsize,
}

// SAFETY: readers reach nodes through the atomic slots; nodes belong to the pool passed
// to updates.
unsafe impl Send for RadixIndex {}
// SAFETY: as above.
unsafe impl Sync for RadixIndex {}

/// Page span `[first, last]` (inclusive) of a byte range, clamped to what the tree covers.
fn pages(start: usize, end: usize) -> Option<(u64, u64)> {
    let first = (start >> PAGE_BITS) as u64;
    let last = ((end - 1) >> PAGE_BITS) as u64;
    if first >= PAGE_LIMIT {
        return None;
    }
    Some((first, last.min(PAGE_LIMIT - 1)))
}

fn span_bits(level: u32) -> u32 {
    FANOUT_BITS * level
}

impl RadixIndex {
    /// Whether every slot of `node` is empty, looking from slot `near` outwards.
    fn is_empty_from(node: &Node, near: usize) -> bool {
        let (before, after) = node.slots.split_at(near.min(FANOUT));
        after
            .iter()
            .chain(before.iter().rev())
            .all(|s| s.load(Ordering::Relaxed) == 0)
    }

    pub(crate) fn new() -> Self {
        RadixIndex {
            root: Box::new(Node {
                slots: std::array::from_fn(|_| AtomicUsize::new(0)),
            }),
            in_use: AtomicUsize::new(0),
        }
    }

    /// Bytes of nodes linked into the tree now (the root included).
    pub(crate) fn bytes(&self) -> usize {
        (self.in_use.load(Ordering::Relaxed) + 1) * std::mem::size_of::<Node>()
    }

    /// The entry word (an `EntryRef::to_raw`) the tree holds for the page of `addr`, or 0.
    /// Lock-free, allocation-free.
    #[inline]
    pub(crate) fn lookup(&self, addr: usize) -> usize {
        let page = (addr >> PAGE_BITS) as u64;
        if page >= PAGE_LIMIT {
            return 0;
        }
        let mut node: &Node = &self.root;
        let mut level = LEVELS - 1;
        loop {
            let idx = ((page >> span_bits(level)) as usize) & (FANOUT - 1);
            // Acquire: pairs with the Release publication of child nodes and entries.
            let v = node.slots[idx].load(Ordering::Acquire);
            if v & ENTRY_TAG != 0 {
                return v & !ENTRY_TAG;
            }
            if v == 0 || level == 0 {
                return 0;
            }
            // SAFETY: a non-zero untagged slot above level 0 is a child node published with
            // Release; nodes are freed only when the whole index is dropped.
            node = unsafe { &*(v as *const Node) };
            level -= 1;
        }
    }

    /// Whether the tree can hold every page below `end` (entries reaching beyond it are
    /// not in the tree).
    pub(crate) fn covers(&self, end: usize) -> bool {
        (((end - 1) >> PAGE_BITS) as u64) < PAGE_LIMIT
    }

    /// Whether any page of `[start, end)` may hold an entry. Entries beyond the covered
    /// address space are not in the tree, so a range reaching beyond it always may.
    /// Lock-free, allocation-free.
    pub(crate) fn any_in(&self, start: usize, end: usize) -> bool {
        if !self.covers(end) {
            return true;
        }
        match pages(start, end) {
            Some((first, last)) => Self::any_in_node(&self.root, LEVELS - 1, 0, first, last),
            None => true,
        }
    }

    fn any_in_node(node: &Node, level: u32, base: u64, first: u64, last: u64) -> bool {
        let bits = span_bits(level);
        let lo = ((first.max(base) - base) >> bits) as usize;
        let hi = ((last - base) >> bits).min(FANOUT as u64 - 1) as usize;
        (lo..=hi).any(|idx| {
            let v = node.slots[idx].load(Ordering::Acquire);
            if v == 0 {
                false
            } else if v & ENTRY_TAG != 0 || level == 0 {
                true
            } else {
                // SAFETY: child node, see `lookup`.
                let child = unsafe { &*(v as *const Node) };
                Self::any_in_node(child, level - 1, base + ((idx as u64) << bits), first, last)
            }
        })
    }

    /// Calls `f` with the entry word of every page of `[start, end)` that holds one, in
    /// address order (a word covering many pages through an upper slot is passed once
    /// per slot, so the same word may come several times). Caller holds the writer lock
    /// (the tree does not change meanwhile). Allocation-free.
    pub(crate) fn for_each_in(&self, start: usize, end: usize, mut f: impl FnMut(usize)) {
        if let Some((first, last)) = pages(start, end) {
            Self::for_each_in_node(&self.root, LEVELS - 1, 0, first, last, &mut f);
        }
    }

    fn for_each_in_node(
        node: &Node,
        level: u32,
        base: u64,
        first: u64,
        last: u64,
        f: &mut impl FnMut(usize),
    ) {
        let bits = span_bits(level);
        let lo = ((first.max(base) - base) >> bits) as usize;
        let hi = ((last - base) >> bits).min(FANOUT as u64 - 1) as usize;
        for idx in lo..=hi {
            let v = node.slots[idx].load(Ordering::Acquire);
            if v & ENTRY_TAG != 0 {
                f(v & !ENTRY_TAG);
            } else if v != 0 && level > 0 {
                // SAFETY: child node, see `lookup`.
                let child = unsafe { &*(v as *const Node) };
                let child_base = base + ((idx as u64) << bits);
                Self::for_each_in_node(child, level - 1, child_base, first, last, f);
            }
        }
    }

    /// Points every page of `[start, end)` at `entry` (the newest entry wins).
    /// Caller holds the writer lock.
    pub(crate) fn insert(&self, pool: &mut NodePool, start: usize, end: usize, entry: usize) {
        let tagged = entry | ENTRY_TAG;
        self.update(pool, start, end, &|_| Some(tagged));
    }

    /// Clears the pages of `[start, end)` that point at `entry`, and gives back the nodes
    /// that became empty. Caller holds the lock.
    pub(crate) fn remove(&self, pool: &mut NodePool, start: usize, end: usize, entry: usize) {
        let tagged = entry | ENTRY_TAG;
        self.update(pool, start, end, &|cur| (cur == tagged).then_some(0));
    }

    /// Points the pages of `[start, end)` that point at `old` at `new` instead (never
    /// through an empty slot: a lock-free reader sees one entry or the other). Caller holds
    /// the lock.
    pub(crate) fn replace(
        &self,
        pool: &mut NodePool,
        start: usize,
        end: usize,
        old: usize,
        new: usize,
    ) {
        let (old, new) = (old | ENTRY_TAG, new | ENTRY_TAG);
        self.update(pool, start, end, &|cur| (cur == old).then_some(new));
    }

    /// Points the empty pages of `[start, end)` at `entry`. Caller holds the lock.
    pub(crate) fn fill_empty(&self, pool: &mut NodePool, start: usize, end: usize, entry: usize) {
        let tagged = entry | ENTRY_TAG;
        self.update(pool, start, end, &|cur| (cur == 0).then_some(tagged));
    }

    /// Applies `f` (current slot value → new value, `None` = keep) to every page of
    /// `[start, end)`, splitting upper slots that the range covers only in part and
    /// unlinking children that end up empty.
    fn update(
        &self,
        pool: &mut NodePool,
        start: usize,
        end: usize,
        f: &impl Fn(usize) -> Option<usize>,
    ) {
        if let Some((first, last)) = pages(start, end) {
            Self::update_node(pool, &self.root, LEVELS - 1, 0, first, last, f);
            self.in_use.store(pool.in_use, Ordering::Relaxed);
        }
    }

    fn update_node(
        pool: &mut NodePool,
        node: &Node,
        level: u32,
        base: u64,
        first: u64,
        last: u64,
        f: &impl Fn(usize) -> Option<usize>,
    ) {
        let bits = span_bits(level);
        let lo = ((first.max(base) - base) >> bits) as usize;
        let hi = ((last - base) >> bits).min(FANOUT as u64 - 1) as usize;
        for idx in lo..=hi {
            let slot_first = base + ((idx as u64) << bits);
            let slot_last = slot_first + (1u64 << bits) - 1;
            let cur = node.slots[idx].load(Ordering::Relaxed);
            let is_child = cur != 0 && cur & ENTRY_TAG == 0 && level > 0;
            // (`f(0) == None` means the update may clear slots but never fills an empty one:
            // only then can a child become empty.)
            if is_child {
                // SAFETY: child node owned by this index; we hold the writer lock.
                let child = unsafe { &*(cur as *const Node) };
                Self::update_node(pool, child, level - 1, slot_first, first, last, f);
                // Looked at from the slots just updated outwards: a dense node is found
                // non-empty at once, not after a run of empty slots before its first one.
                let near = ((first.max(slot_first) - slot_first) >> span_bits(level - 1)) as usize;
                if f(0).is_none() && Self::is_empty_from(child, near) {
                    // Unlink first (Release), then recycle: see the module docs.
                    node.slots[idx].store(0, Ordering::Release);
                    pool.free(cur as *mut Node);
                }
                continue;
            }
            let new = match f(cur) {
                Some(new) if new != cur => new,
                _ => continue,
            };
            if level == 0 || (first <= slot_first && slot_last <= last) {
                // Release: the entry's publication happens-before a reader that sees it.
                node.slots[idx].store(new, Ordering::Release);
            } else {
                // Split: a child repeating the current value, then update inside it, then
                // publish it. Readers see either the old value or the finished child.
                let child = pool.alloc(cur);
                // SAFETY: a pool node not linked anywhere yet (only stale readers of a
                // former use may read it, which the module docs allow).
                Self::update_node(
                    pool,
                    unsafe { &*child },
                    level - 1,
                    slot_first,
                    first,
                    last,
                    f,
                );
                node.slots[idx].store(child as usize, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(n: usize) -> usize {
        n * 64
    }

    #[test]
    fn insert_lookup_remove_with_splits() {
        let ix = RadixIndex::new();
        let mut pool = NodePool::new();
        let big = (1usize << 30, 3usize << 30); // two whole 1 GiB blocks
        ix.insert(&mut pool, big.0, big.1, fake(1));
        assert_eq!(ix.lookup(big.0 + 12345), fake(1));
        assert_eq!(ix.lookup(big.1 - 1), fake(1));
        assert!(ix.lookup(big.1) == 0);
        // A small newer entry inside splits the upper slot; the rest still finds the big one.
        ix.insert(&mut pool, big.0 + 0x5000, big.0 + 0x7000, fake(2));
        assert_eq!(ix.lookup(big.0 + 0x5000), fake(2));
        assert_eq!(ix.lookup(big.0 + 0x6fff), fake(2));
        assert_eq!(ix.lookup(big.0 + 0x4fff), fake(1));
        assert_eq!(ix.lookup(big.0 + 0x7000), fake(1));
        assert_eq!(ix.lookup(big.0 + (5 << 20)), fake(1));
        // Removing the small one leaves holes that fill_empty restores.
        ix.remove(&mut pool, big.0 + 0x5000, big.0 + 0x7000, fake(2));
        assert!(ix.lookup(big.0 + 0x5000) == 0);
        ix.fill_empty(&mut pool, big.0, big.1, fake(1));
        assert_eq!(ix.lookup(big.0 + 0x5000), fake(1));
        // remove only clears slots of that entry.
        ix.remove(&mut pool, big.0, big.1, fake(3));
        assert_eq!(ix.lookup(big.0), fake(1));
        ix.remove(&mut pool, big.0, big.1, fake(1));
        assert!(ix.lookup(big.0) == 0 && ix.lookup(big.0 + 0x5000) == 0);
        assert!(!ix.any_in(big.0, big.1));
        assert_eq!(ix.bytes(), 4096, "every emptied node was given back");
    }

    #[test]
    fn a_node_is_given_back_only_when_empty_on_both_sides_of_the_removal() {
        let ix = RadixIndex::new();
        let mut pool = NodePool::new();
        let leaf = 1usize << 21; // one leaf node covers these 512 pages
        ix.insert(&mut pool, leaf + 0x1000, leaf + 0x2000, fake(1));
        ix.insert(&mut pool, leaf + 0x1f0000, leaf + 0x1f1000, fake(2)); // far after it
        ix.insert(&mut pool, leaf + 0x100000, leaf + 0x101000, fake(3)); // in the middle
        let with_leaf = ix.bytes();
        ix.remove(&mut pool, leaf + 0x100000, leaf + 0x101000, fake(3));
        assert_eq!(ix.bytes(), with_leaf, "entries left before and after it");
        ix.remove(&mut pool, leaf + 0x1f0000, leaf + 0x1f1000, fake(2));
        assert_eq!(ix.bytes(), with_leaf, "an entry left before it");
        assert_eq!(ix.lookup(leaf + 0x1000), fake(1));
        ix.remove(&mut pool, leaf + 0x1000, leaf + 0x2000, fake(1));
        assert_eq!(ix.bytes(), 4096);
    }

    #[test]
    fn for_each_in_visits_the_words_of_the_range_in_order() {
        let ix = RadixIndex::new();
        let mut pool = NodePool::new();
        let words = |start, end| {
            let mut v = Vec::new();
            ix.for_each_in(start, end, |w| v.push(w));
            v
        };
        ix.insert(&mut pool, 1 << 30, 2 << 30, fake(1)); // one upper slot: passed once
        ix.insert(&mut pool, 0x10000, 0x12000, fake(2)); // two leaf pages
        ix.insert(&mut pool, 0x11000, 0x13000, fake(3)); // over the second one, and one more
        assert_eq!(words(0, 3 << 30), vec![fake(2), fake(3), fake(3), fake(1)]);
        assert_eq!(words(0x11fff, 0x12001), vec![fake(3), fake(3)]);
        assert_eq!(words(0x13000, 1 << 30), Vec::<usize>::new());
        assert_eq!(words((1 << 30) + 5, (1 << 30) + 6), vec![fake(1)]);
    }

    #[test]
    fn any_in_and_out_of_range() {
        let ix = RadixIndex::new();
        let mut pool = NodePool::new();
        ix.insert(&mut pool, 0x10000, 0x12000, fake(7));
        assert!(ix.any_in(0x11fff, 0x20000));
        assert!(ix.any_in(0, usize::MAX));
        assert!(!ix.any_in(0x12000, 0x13000));
        assert!(!ix.any_in(0, 0x10000));
        // Beyond the covered address space: never found, never panics.
        ix.insert(&mut pool, usize::MAX - 0xfff, usize::MAX, fake(9));
        assert!(ix.lookup(usize::MAX - 5) == 0);
    }
}
