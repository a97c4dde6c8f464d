//! The operations the driver performs, and which of them each source is exercised on.

use std::fmt;

/// What a worker does in one step. `Pin` and `HeapPin` check; the rest change what is
/// mapped (each description says what the model expects afterwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// Pin a run of mapped pages of a slot on the NIC-like and/or the CUDA-like recorder,
    /// check tags and frames, drop it (or hold it for a while).
    Pin,
    /// Pin pages inside a live malloc block; check frames.
    HeapPin,
    /// `munmap` of a span.
    Munmap,
    /// `mmap(MAP_FIXED)` of fresh anonymous memory over a span.
    MapAnon,
    /// `mmap(MAP_FIXED | MAP_SHARED)` of a fresh memfd over a span.
    MapMemfd,
    /// `mremap(MREMAP_MAYMOVE | MREMAP_FIXED)` of a run to another place in the slot.
    MremapMove,
    /// `mremap` growing a run in place (what follows it is unmapped first).
    MremapGrow,
    /// `mremap` shrinking a run in place.
    MremapShrink,
    /// `mremap(MREMAP_DONTUNMAP)` of an anonymous run: both ends get new pages.
    MremapDontunmap,
    /// `madvise(MADV_DONTNEED)`.
    MadvDontneed,
    /// `madvise(MADV_FREE)` on anonymous pages.
    MadvFree,
    /// `madvise(MADV_REMOVE)` on shared (memfd, SysV) pages.
    MadvRemove,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)` on a mapped memfd.
    PunchHole,
    /// `ftruncate` of a mapped memfd down and back up.
    Ftruncate,
    /// `munmap` of a span, then `shmat` of a new SysV segment there.
    ShmatHole,
    /// `shmat(SHM_REMAP)` of a new SysV segment over mapped pages.
    ShmatRemap,
    /// `shmdt` of a segment attached in the slot.
    Shmdt,
    /// `fork`: the child writes its copy of the slot's private pages, checks that its copy
    /// of the manager refuses to pin, and `_exit`s; the parent waits.
    Fork,
    /// `fork`, then the parent writes its private pages while the child lives (COW break:
    /// new frames in the parent), then the child exits.
    ForkCow,
    /// `syscall(SYS_munmap | SYS_mmap | SYS_madvise)`, bypassing libc.
    RawSyscall,
    /// `malloc` of a large block (64 KiB from the heap, or 512 KiB from mmap).
    HeapMalloc,
    /// `free` of such a block.
    HeapFree,
    /// `malloc_trim(0)`.
    MallocTrim,
}

impl OpKind {
    /// Every operation, in a fixed order (counters are indexed by it).
    pub const ALL: [OpKind; 23] = [
        OpKind::Pin,
        OpKind::HeapPin,
        OpKind::Munmap,
        OpKind::MapAnon,
        OpKind::MapMemfd,
        OpKind::MremapMove,
        OpKind::MremapGrow,
        OpKind::MremapShrink,
        OpKind::MremapDontunmap,
        OpKind::MadvDontneed,
        OpKind::MadvFree,
        OpKind::MadvRemove,
        OpKind::PunchHole,
        OpKind::Ftruncate,
        OpKind::ShmatHole,
        OpKind::ShmatRemap,
        OpKind::Shmdt,
        OpKind::Fork,
        OpKind::ForkCow,
        OpKind::RawSyscall,
        OpKind::HeapMalloc,
        OpKind::HeapFree,
        OpKind::MallocTrim,
    ];

    /// Index in [`OpKind::ALL`].
    pub fn index(self) -> usize {
        OpKind::ALL.iter().position(|&o| o == self).unwrap_or(0)
    }

    /// The name used on the command line and in traces.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Pin => "pin",
            OpKind::HeapPin => "heap-pin",
            OpKind::Munmap => "munmap",
            OpKind::MapAnon => "map-anon",
            OpKind::MapMemfd => "map-memfd",
            OpKind::MremapMove => "mremap-move",
            OpKind::MremapGrow => "mremap-grow",
            OpKind::MremapShrink => "mremap-shrink",
            OpKind::MremapDontunmap => "mremap-dontunmap",
            OpKind::MadvDontneed => "madv-dontneed",
            OpKind::MadvFree => "madv-free",
            OpKind::MadvRemove => "madv-remove",
            OpKind::PunchHole => "punch-hole",
            OpKind::Ftruncate => "ftruncate",
            OpKind::ShmatHole => "shmat",
            OpKind::ShmatRemap => "shmat-remap",
            OpKind::Shmdt => "shmdt",
            OpKind::Fork => "fork",
            OpKind::ForkCow => "fork-cow",
            OpKind::RawSyscall => "raw-syscall",
            OpKind::HeapMalloc => "malloc",
            OpKind::HeapFree => "free",
            OpKind::MallocTrim => "malloc-trim",
        }
    }

    /// Parses [`OpKind::name`].
    pub fn parse(s: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|o| o.name() == s)
    }

    /// Relative frequency of the operation when enabled.
    pub fn weight(self) -> u32 {
        match self {
            OpKind::Pin => 40,
            OpKind::HeapPin => 8,
            OpKind::MapAnon => 6,
            OpKind::Munmap | OpKind::HeapMalloc | OpKind::HeapFree => 4,
            OpKind::MapMemfd | OpKind::MremapMove | OpKind::MadvDontneed | OpKind::RawSyscall => 3,
            OpKind::MremapGrow
            | OpKind::MremapShrink
            | OpKind::MremapDontunmap
            | OpKind::MadvFree
            | OpKind::MadvRemove
            | OpKind::PunchHole
            | OpKind::Shmdt => 2,
            OpKind::Ftruncate
            | OpKind::ShmatHole
            | OpKind::ShmatRemap
            | OpKind::Fork
            | OpKind::ForkCow
            | OpKind::MallocTrim => 1,
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which notifier source(s) the manager gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// No source: the driver calls `Manager::invalidate` before every change it makes (the
    /// control: it must pass every operation).
    Manual,
    /// `umm-uffd`.
    Uffd,
    /// `umm-interpose`, in-process hooks (the binary exports them).
    Interpose,
    /// `umm-kmod` (`/dev/umm_notify`, the guest).
    Kmod,
    /// userfaultfd and interposition together, plus the kernel module when it is loaded.
    Combined,
    /// Nothing invalidates at all: a run must fail (a planted bug).
    NoSource,
}

impl SourceKind {
    /// Every kind, for `--source all`-style loops (without [`SourceKind::NoSource`]).
    pub const REAL: [SourceKind; 5] = [
        SourceKind::Manual,
        SourceKind::Uffd,
        SourceKind::Interpose,
        SourceKind::Kmod,
        SourceKind::Combined,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Manual => "manual",
            SourceKind::Uffd => "uffd",
            SourceKind::Interpose => "interpose",
            SourceKind::Kmod => "kmod",
            SourceKind::Combined => "combined",
            SourceKind::NoSource => "none",
        }
    }

    /// Parses [`SourceKind::name`].
    pub fn parse(s: &str) -> Option<SourceKind> {
        [SourceKind::NoSource]
            .iter()
            .chain(SourceKind::REAL.iter())
            .copied()
            .find(|k| k.name() == s)
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Operations the coverage matrix (docs/coverage-matrix.md) says userfaultfd does not see on
/// today's main, and that it does not refuse either (issue 11 item 6): exercising them would
/// only re-find the known gap. Remove entries here as the strict modes land (a source then
/// refuses the memory, which the driver accepts).
const UFFD_BLIND: &[OpKind] = &[OpKind::PunchHole, OpKind::Ftruncate, OpKind::ShmatRemap];

/// The same for interposition: also glibc's internal unmaps (free, trim) and raw syscalls
/// (the driver declares `libc_only`, so strict interposition accepts its memory).
const INTERPOSE_BLIND: &[OpKind] = &[
    OpKind::PunchHole,
    OpKind::Ftruncate,
    OpKind::ShmatRemap,
    OpKind::RawSyscall,
    OpKind::HeapMalloc,
    OpKind::HeapFree,
    OpKind::MallocTrim,
    OpKind::HeapPin,
];

/// The operations `source` is exercised on by default: every one it catches (or refuses
/// the memory for) according to the coverage matrix.
pub fn default_ops(source: SourceKind, kmod_loaded: bool) -> Vec<OpKind> {
    let blind: &[OpKind] = match source {
        SourceKind::Manual | SourceKind::Kmod | SourceKind::NoSource => &[],
        SourceKind::Uffd => UFFD_BLIND,
        SourceKind::Interpose => INTERPOSE_BLIND,
        // Either source seeing the operation is enough; the kernel module sees all.
        SourceKind::Combined if kmod_loaded => &[],
        SourceKind::Combined => UFFD_BLIND,
    };
    OpKind::ALL
        .iter()
        .copied()
        .filter(|o| !blind.contains(o))
        .collect()
}
