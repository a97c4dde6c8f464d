//! One registration of one range on one device, and its lock-free reference count.
//!
//! # Reference counting
//!
//! A hit must not write a cache line that another thread's hit writes too (two threads
//! pinning the same buffer would bounce it between cores, ~100 ns per op measured here).
//! So the count is split into [`STRIPES`] counters kept in separate per-stripe arrays (see
//! the layout below); a thread always uses
//! the stripe [`thread_stripe`] gave it, and a [`crate::Pin`] remembers its stripe so that
//! it decrements the same one wherever it is dropped. The true count is the sum.
//!
//! Each 32-bit stripe word holds the references in its low [`REF_BITS`] bits and a hit
//! counter in the 8 bits above them, so one `lock xadd` both takes the reference and counts
//! the hit; the hit that wraps those 8 bits (`lock xadd` returns the old word, so exactly
//! one hit sees it) carries 256 into its chunk's `hits_carried`.
//!
//! The reference bits never wrap (a wrapped count would let a held registration be
//! deregistered and its entry reused: a use-after-free reachable from safe code with
//! `mem::forget`). `lock xadd` returns the old word, so an acquire that finds a stripe at
//! [`REF_SATURATED`] references takes its increment back and fails with
//! [`Acquire::Saturated`]; the margin above it (2^23 increments in flight at once) cannot
//! be reached by racing threads.
//!
//! # Killing an entry (the one subtle protocol)
//!
//! A reader (hit) does `stripe.fetch_add` **then** loads `state`; a killer (invalidation,
//! eviction, merge; always under the device's writer lock) stores a non-`LIVE` state
//! **then** sums the stripes. Both sides use `SeqCst`, so in the single total order either
//! the reader sees the new state (and backs off) or the killer sees the reader's reference
//! (and leaves the entry to the last [`crate::Pin`] to drop). A reader that backs off, and
//! any release that finds the entry not `LIVE`, goes to the device's slow release path,
//! which re-sums under the lock: whoever sees zero last reclaims, exactly once, because the
//! `INVALID → FREE` transition happens under the lock.
//!
//! The killer sums only the stripes marked in the entry's `stripes_used` bits: a reader
//! sets its stripe's bit (SeqCst, and only if it is clear) after its increment and before
//! its state load, and bits are never cleared, not even when the entry is recycled (a
//! reader holding an old `EntryRef` may take a reference on the entry's next life). So a
//! reader that did not see the killer's state precedes it, and so does its bit, in the
//! total order: the killer's later load of the bits sees it, and sums that stripe.
//!
//! An evictor's or merger's probe (`try_kill`) is the same protocol with a way back: it
//! stores `KILLING`, and if it finds a reference it stores `LIVE` again. So `KILLING` is
//! transient, and a holder of a reference must read it as "still valid" (it cannot be
//! killed while held).
//!
//! # Memory and layout
//!
//! Entries are type-stable: a device owns every entry it ever allocated until the manager
//! is dropped and recycles freed ones, so a reader that loaded a reference from the index
//! just before the entry was freed reads valid memory. It then validates (state and
//! range after taking its reference) instead of relying on the reference being current.
//!
//! Entries live in 4 KiB-aligned [`Chunk`]s of [`CHUNK`] entries, laid out by field, not by
//! entry: what a hit and its pin read (state, range, era, id and translation) is one
//! 64-byte line per entry, each reference-count stripe is an array of its own (a thread
//! only ever writes its stripe's array, so threads do not share written lines), and what
//! hits never touch (the writer's bookkeeping) is kept apart. A hit that reads its
//! translation touches two lines: its entry's header and its stripe's counter (measured
//! with the translation in an array of its own, reading it cost a third cache miss: a hit
//! with the read over 10^5 entries took twice as long as one without). An [`EntryRef`]
//! packs the chunk address and the
//! slot into one word, which is what the radix index stores.

use std::cell::{Cell, UnsafeCell};
use std::mem::size_of;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::backend::ErasedTranslation;
use crate::range::Range;

/// Number of reference-count stripes per entry.
pub(crate) const STRIPES: usize = 4;
/// Bits of each stripe word that count references; the bits above count hits.
pub(crate) const REF_BITS: u32 = 24;
const REF_MASK: u32 = (1 << REF_BITS) - 1;
/// References one stripe may hold; beyond it an acquire fails (see the module docs).
pub(crate) const REF_SATURATED: u32 = 1 << (REF_BITS - 1);
const HIT_ONE: u32 = 1 << REF_BITS;
/// Hits one stripe word counts before carrying into its chunk.
const HIT_WRAP: u64 = 1 << (32 - REF_BITS);
/// Entries per chunk; a slot number fits in the low bits of the 4 KiB-aligned chunk
/// address next to the index's tag bit.
pub(crate) const CHUNK: usize = 512;
const SLOT_SHIFT: u32 = 1;

/// Not in use: on the device's free list.
pub(crate) const FREE: u32 = 0;
/// Valid and findable by hits.
pub(crate) const LIVE: u32 = 1;
/// Invalidated: never returned again; deregistered once the last reference drops.
pub(crate) const INVALID: u32 = 2;
/// Transient, under the writer lock: being evicted or merged if nobody holds it.
pub(crate) const KILLING: u32 = 3;

/// What a hit and its pin read, in one cache line: the state, range and era it checks
/// and the translation it hands out.
#[repr(C, align(64))]
struct Header {
    /// `FREE`, `LIVE`, `INVALID` or `KILLING`; written under the writer lock only.
    state: AtomicU32,
    /// CLOCK bit (0/1): set by hits (only when clear, so a hot entry's line stays shared),
    /// cleared by the evictor's sweep.
    referenced: AtomicU16,
    /// Bit `s` is set once stripe `s` took a reference on this entry, in any of its lives
    /// (never cleared), before the taker reads the state: a killer sums only those stripes
    /// (module docs), one counter line instead of [`STRIPES`] when one thread pins.
    stripes_used: AtomicU16,
    /// Registered range, readable without the lock once `state == LIVE` was seen.
    start: AtomicUsize,
    end: AtomicUsize,
    /// The device's era when the entry was published: a `LIVE` entry of an older era was
    /// invalidated wholesale (`invalidate_all`) and is not yet cleaned up; hits refuse it.
    era: AtomicU64,
    /// The registration's id (the cookie its sources watch), unique per manager; written
    /// with the translation.
    id: AtomicU64,
    /// Written only while the entry is `FREE` and unreferenced (publication) or being
    /// reclaimed with no references left; read through a [`crate::Pin`] that holds a
    /// reference taken while `LIVE`.
    translation: UnsafeCell<Option<ErasedTranslation>>,
}

/// Why [`EntryRef::try_acquire`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Acquire {
    /// Not `LIVE`, of another era, or not covering the request: the caller holds nothing;
    /// `slow` says whether it must run the device's slow release path.
    Refused { slow: bool },
    /// The stripe holds [`REF_SATURATED`] references already.
    Saturated,
}

/// State only the holder of the device's writer lock touches: the entry's links in the
/// device's intrusive lists (see `manager::lists`) and which of them it is on. The range
/// and the registration id are not repeated here: the header holds them.
pub(crate) struct WriterSide {
    pub prev: Option<Link>,
    pub next: Option<Link>,
    /// Whether the entry is parked: found pinned by the evictor and taken off the LRU so
    /// that sweeps do not revisit it (it returns when its last pin drops).
    pub parked: bool,
    /// Whether the entry is on the device's stale list (invalid, still referenced).
    pub stale: bool,
    /// Whether the entry is in the device's map of shadowed entries (a newer entry took
    /// some of its pages in the index).
    pub shadowed: bool,
}

/// An entry's number within its device (chunk number × [`CHUNK`] + slot, plus one): what
/// the device's intrusive lists link with (see `manager::lists`).
pub(crate) type Link = std::num::NonZeroU32;

/// One stripe's counters, padded by a cache line so that the same entry's counters in
/// different stripes do not share their low 12 address bits (4 KiB aliasing between the
/// two hyperthreads of a core doing `lock xadd` on them measurably slowed two threads
/// hitting the same buffer).
#[repr(align(64))]
struct StripeArray {
    counters: [AtomicU32; CHUNK],
    _pad: [u64; 8],
}

/// [`CHUNK`] entries, by field (see the module docs).
#[repr(align(4096))]
pub(crate) struct Chunk {
    /// The device (index) whose entries these are: a pin's reference alone names its
    /// device, keeping pins small (their size showed in the hit's cost).
    device: u32,
    /// The chunk's number within its device (for [`Link`]s).
    number: u32,
    /// Hits carried out of the entries' stripe words (see the module docs).
    hits_carried: AtomicU64,
    headers: [Header; CHUNK],
    stripes: [StripeArray; STRIPES],
    /// Guarded by the device's writer lock.
    writers: [UnsafeCell<WriterSide>; CHUNK],
}

// SAFETY: every field is atomic except `translations` and `writers`. `writers` are only
// accessed by the holder of the owning device's writer lock. A translation is written only
// when no reader can read it (see the field doc and the module docs: readers hold a
// reference taken while LIVE, and writes happen before publication or after the last
// reference is gone), and translations are `Send + Sync`.
unsafe impl Sync for Chunk {}
// SAFETY: as above; moving a chunk between threads moves only `Send` data.
unsafe impl Send for Chunk {}

/// An owned [`Chunk`] in an anonymous mapping of its own: exactly its pages (an aligned
/// heap allocation of ~50 KiB rounds up and wastes the alignment), and no chunk-sized
/// temporary on the stack while building it. Freed with its device.
pub(crate) struct ChunkBox(NonNull<Chunk>);

// SAFETY: owns its chunk, which is Send + Sync.
unsafe impl Send for ChunkBox {}
// SAFETY: as above.
unsafe impl Sync for ChunkBox {}

impl ChunkBox {
    /// Chunk `number` of `device`; fails like an allocation when the mapping fails or the
    /// device would have more entries than a [`Link`] can number (2^32 - 1).
    pub(crate) fn new(device: u32, number: u32) -> ChunkBox {
        let layout = std::alloc::Layout::new::<Chunk>();
        if number as usize >= (u32::MAX as usize) / CHUNK {
            std::alloc::handle_alloc_error(layout);
        }
        // (Owned by the returned box.)
        let chunk = match crate::range::map_anonymous(size_of::<Chunk>()) {
            Some(p) if p.as_ptr() as usize & CHUNK_MASK == 0 => p.as_ptr().cast::<Chunk>(),
            _ => std::alloc::handle_alloc_error(layout),
        };
        // SAFETY: the mapping is zero-filled, aligned and large enough for a Chunk; zero
        // bytes are a valid value of every field (atomics at 0: `FREE`, no references, no
        // links, flags false) except the translations and the device, written here
        // through raw places before any reference to the chunk exists.
        unsafe {
            std::ptr::addr_of_mut!((*chunk).device).write(device);
            std::ptr::addr_of_mut!((*chunk).number).write(number);
            for slot in 0..CHUNK {
                std::ptr::addr_of_mut!((*chunk).headers[slot].translation)
                    .write(UnsafeCell::new(None));
            }
        }
        ChunkBox(NonNull::new(chunk).expect("mmap does not return null on success"))
    }
}

impl std::ops::Deref for ChunkBox {
    type Target = Chunk;

    fn deref(&self) -> &Chunk {
        // SAFETY: initialised in `new`, unmapped only in `drop`.
        unsafe { self.0.as_ref() }
    }
}

impl Drop for ChunkBox {
    fn drop(&mut self) {
        // SAFETY: we own the chunk and its mapping; nothing refers to it any more (chunks
        // are dropped with their device). Dropping it drops any translation left.
        unsafe {
            std::ptr::drop_in_place(self.0.as_ptr());
            libc::munmap(self.0.as_ptr().cast(), size_of::<Chunk>());
        }
    }
}

impl Chunk {
    /// The chunk's number within its device.
    pub(crate) fn number(&self) -> u32 {
        self.number
    }

    /// References to every entry of the chunk.
    pub(crate) fn entries(&self) -> impl DoubleEndedIterator<Item = EntryRef> + '_ {
        (0..CHUNK).map(move |slot| EntryRef::new(self, slot))
    }

    /// Hits counted on the chunk's entries since it was allocated.
    pub(crate) fn hits(&self) -> u64 {
        let in_words: u64 = self
            .stripes
            .iter()
            .flat_map(|s| s.counters.iter())
            .map(|c| u64::from(c.load(Ordering::Relaxed) >> REF_BITS))
            .sum();
        self.hits_carried.load(Ordering::Relaxed) + in_words
    }
}

/// One entry: its chunk's address with the slot number in the low bits (the chunk is
/// 4 KiB-aligned), one word, which is also what the radix index stores.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct EntryRef(std::num::NonZeroUsize);

// SAFETY: an EntryRef points into a chunk owned by a device, which outlives every use of
// the reference (chunks are freed only when the device is dropped); Chunk is Sync.
unsafe impl Send for EntryRef {}
// SAFETY: as above.
unsafe impl Sync for EntryRef {}

const CHUNK_MASK: usize = std::mem::align_of::<Chunk>() - 1;

impl EntryRef {
    pub(crate) fn new(chunk: &Chunk, slot: usize) -> EntryRef {
        debug_assert!(slot < CHUNK);
        let raw = chunk as *const Chunk as usize | (slot << SLOT_SHIFT);
        EntryRef(std::num::NonZeroUsize::new(raw).expect("chunk address is not null"))
    }

    /// The word the index stores: chunk address | slot << 1 (bit 0 stays clear).
    pub(crate) fn to_raw(self) -> usize {
        self.0.get()
    }

    /// Inverse of [`EntryRef::to_raw`].
    ///
    /// # Safety
    /// `raw` came from `to_raw` of an entry whose chunk is still owned by its device.
    #[inline]
    pub(crate) unsafe fn from_raw(raw: usize) -> EntryRef {
        // SAFETY: non-zero: it came from to_raw (caller's contract).
        EntryRef(unsafe { std::num::NonZeroUsize::new_unchecked(raw) })
    }

    #[inline]
    fn chunk(&self) -> &Chunk {
        // SAFETY: the high bits are the address of a chunk that outlives every EntryRef
        // (see the Send impl).
        unsafe { &*((self.0.get() & !CHUNK_MASK) as *const Chunk) }
    }

    /// The entry's [`Link`].
    pub(crate) fn link(&self) -> Link {
        let n = self.chunk().number as usize * CHUNK + self.slot() + 1;
        Link::new(n as u32).expect("numbered from 1; bounded in ChunkBox::new")
    }

    /// The entry in slot `slot` of this entry's chunk.
    pub(crate) fn in_same_chunk(&self, slot: usize) -> EntryRef {
        EntryRef::new(self.chunk(), slot)
    }

    /// The index of the device owning the entry.
    #[inline]
    pub(crate) fn device(&self) -> u32 {
        self.chunk().device
    }

    #[inline]
    fn slot(&self) -> usize {
        (self.0.get() >> SLOT_SHIFT) & (CHUNK - 1)
    }

    #[inline]
    fn header(&self) -> &Header {
        &self.chunk().headers[self.slot()]
    }

    #[inline]
    fn stripe(&self, stripe: usize) -> &AtomicU32 {
        &self.chunk().stripes[stripe].counters[self.slot()]
    }

    /// Takes a reference if the entry is `LIVE`, of `era`, and covers `want`; counts a hit
    /// when `hit`. On failure the caller holds nothing (see [`Acquire`]).
    #[inline]
    pub(crate) fn try_acquire(
        &self,
        stripe: usize,
        want: &Range,
        era: u64,
        hit: bool,
    ) -> Result<(), Acquire> {
        let inc = if hit { HIT_ONE | 1 } else { 1 };
        let h = self.header();
        // SeqCst: pairs with the killer's SeqCst state store + stripe loads (module docs).
        let old = self.stripe(stripe).fetch_add(inc, Ordering::SeqCst);
        if old & REF_MASK >= REF_SATURATED {
            self.stripe(stripe).fetch_sub(inc, Ordering::SeqCst);
            return Err(Acquire::Saturated);
        }
        // This hit wrapped the word's hit bits: carry them (taken back if refused below).
        let carried = hit && old >> REF_BITS == (HIT_WRAP - 1) as u32;
        if carried {
            self.chunk()
                .hits_carried
                .fetch_add(HIT_WRAP, Ordering::Relaxed);
        }
        self.mark_stripe_used(stripe);
        // SeqCst load also acquires the range stores published before `LIVE`.
        if h.state.load(Ordering::SeqCst) == LIVE
            && h.era.load(Ordering::Relaxed) == era
            && h.start.load(Ordering::Relaxed) <= want.start()
            && want.end() <= h.end.load(Ordering::Relaxed)
        {
            if hit && h.referenced.load(Ordering::Relaxed) == 0 {
                h.referenced.store(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        if carried {
            self.chunk()
                .hits_carried
                .fetch_sub(HIT_WRAP, Ordering::Relaxed);
        }
        Err(Acquire::Refused {
            slow: self.release_counted(stripe, inc),
        })
    }

    /// Whether a holder of a reference still has a valid entry: `LIVE` (or an evictor's
    /// transient `KILLING` probe, which cannot succeed while a reference is held) and of
    /// the device's current `era`.
    pub(crate) fn holds_valid(&self, era: u64) -> bool {
        matches!(self.state(), LIVE | KILLING) && self.header().era.load(Ordering::Relaxed) == era
    }

    /// Drops one reference taken on `stripe`. Returns whether the entry is not `LIVE`, in
    /// which case the caller must run the device's slow release path.
    #[inline]
    pub(crate) fn release(&self, stripe: usize) -> bool {
        self.release_counted(stripe, 1)
    }

    #[inline]
    fn release_counted(&self, stripe: usize, dec: u32) -> bool {
        self.stripe(stripe).fetch_sub(dec, Ordering::SeqCst);
        self.header().state.load(Ordering::SeqCst) != LIVE
    }

    /// Sum of references over all stripes. Exact once the state is not `LIVE` (module docs).
    pub(crate) fn refs(&self) -> u64 {
        let used = self.header().stripes_used.load(Ordering::SeqCst);
        (0..STRIPES)
            .filter(|s| used & (1 << s) != 0)
            .map(|s| u64::from(self.stripe(s).load(Ordering::SeqCst) & REF_MASK))
            .sum()
    }

    /// Sets `stripe`'s bit in `stripes_used` (a load when it is set already, as it is
    /// after the first reference). Called after the increment and before the state load.
    #[inline]
    fn mark_stripe_used(&self, stripe: usize) {
        let bit = 1 << stripe;
        let used = &self.header().stripes_used;
        if used.load(Ordering::SeqCst) & bit == 0 {
            used.fetch_or(bit, Ordering::SeqCst);
        }
    }

    pub(crate) fn state(&self) -> u32 {
        self.header().state.load(Ordering::SeqCst)
    }

    /// Sets the state; the caller holds the device's writer lock.
    pub(crate) fn set_state(&self, state: u32) {
        self.header().state.store(state, Ordering::SeqCst);
    }

    /// Tries `LIVE → KILLING → (no references)`; on `false` the entry is `LIVE` again.
    /// The caller holds the writer lock.
    pub(crate) fn try_kill(&self) -> bool {
        self.set_state(KILLING);
        if self.refs() == 0 {
            true
        } else {
            self.set_state(LIVE);
            false
        }
    }

    /// Reads and clears the CLOCK bit.
    pub(crate) fn take_referenced(&self) -> bool {
        self.header().referenced.swap(0, Ordering::Relaxed) != 0
    }

    /// Publishes a fresh registration in a `FREE` entry and takes one reference on
    /// `stripe` for the caller. The caller holds the writer lock.
    ///
    /// # Safety
    /// The entry must be `FREE` with no reference held, so no reader reads its translation.
    pub(crate) unsafe fn publish(
        &self,
        range: Range,
        id: u64,
        era: u64,
        translation: ErasedTranslation,
        stripe: usize,
    ) {
        debug_assert_eq!(self.state(), FREE);
        // SAFETY: caller guarantees no reader; the writer lock serialises writers.
        unsafe {
            *self.header().translation.get() = Some(translation);
            let w = self.writer();
            w.stale = false;
            w.parked = false;
            w.shadowed = false;
        }
        let h = self.header();
        h.start.store(range.start(), Ordering::Relaxed);
        h.end.store(range.end(), Ordering::Relaxed);
        h.era.store(era, Ordering::Relaxed);
        h.id.store(id, Ordering::Relaxed);
        h.referenced.store(0, Ordering::Relaxed);
        self.stripe(stripe).fetch_add(1, Ordering::SeqCst);
        self.mark_stripe_used(stripe);
        // Release (SeqCst): readers that see LIVE see the range and translation.
        self.set_state(LIVE);
    }

    /// Takes the translation of an entry with no references left and marks it `FREE`.
    ///
    /// # Safety
    /// The caller holds the writer lock, the entry is not `LIVE`, and `refs() == 0`.
    pub(crate) unsafe fn retire(&self) -> Option<ErasedTranslation> {
        self.set_state(FREE);
        // SAFETY: no reference is held, so no Pin reads the translation (caller's contract).
        unsafe { (*self.header().translation.get()).take() }
    }

    /// The translation, for a [`crate::Pin`] that holds a reference.
    ///
    /// # Safety
    /// The caller holds a reference taken while the entry was `LIVE`.
    pub(crate) unsafe fn translation(&self) -> Option<&ErasedTranslation> {
        // SAFETY: no writer runs while a reference is held (caller's contract).
        unsafe { (*self.header().translation.get()).as_ref() }
    }

    /// The registration id (of the current or last publication); exact for a holder of a
    /// reference taken while `LIVE` and under the writer lock.
    pub(crate) fn id(&self) -> u64 {
        self.header().id.load(Ordering::Relaxed)
    }

    /// The registered range of a published entry (the lock holder's view; exact under
    /// the device's writer lock).
    pub(crate) fn range(&self) -> Range {
        self.range_unlocked().expect("a published entry")
    }

    /// The device era the entry was published in.
    pub(crate) fn era(&self) -> u64 {
        self.header().era.load(Ordering::Relaxed)
    }

    /// The registered range, for a holder of a reference (lock-free copy).
    /// `None` only for an entry that was never published.
    pub(crate) fn range_unlocked(&self) -> Option<Range> {
        let h = self.header();
        Range::from_bounds(
            h.start.load(Ordering::Relaxed),
            h.end.load(Ordering::Relaxed),
        )
        .ok()
    }

    /// Writer-side fields.
    ///
    /// # Safety
    /// The caller holds the owning device's writer lock and no other reference to them.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn writer(&self) -> &mut WriterSide {
        // SAFETY: exclusive by the writer lock (caller's contract).
        unsafe { &mut *self.chunk().writers[self.slot()].get() }
    }
}

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's stripe: assigned round-robin at first use, so up to [`STRIPES`] threads
/// never share a reference-count line.
#[inline]
pub(crate) fn thread_stripe() -> usize {
    STRIPE.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            v
        } else {
            let v = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(v);
            v
        }
    })
}
