//! Hand-mirrored userfaultfd ABI (`include/uapi/linux/userfaultfd.h`), with layout tests.
//!
//! Only what the source uses: the API handshake, (un)registration, write-protect
//! resolution and the event message.

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: flag of the `userfaultfd(2)` syscall.
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Event: a page fault (only possible for write-protected pages; this source never
/// write-protects, see the crate docs).
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Event: fork (never requested).
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// Event: mremap moved a registered range.
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// Event: madvise(MADV_DONTNEED/MADV_REMOVE/MADV_FREE) emptied a registered range.
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// Event: munmap (or an unmap by mmap(MAP_FIXED), mremap, brk) of a registered range.
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// Feature bit: fork event.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// Feature bit: remap event.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// Feature bit: remove event.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Feature bit: unmap event.
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Feature bit: write-protect mode on shmem/hugetlbfs (memfd ranges).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

/// Registration mode: write-protect (faults only on pages we write-protect: never).
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_UFFDIO_WRITEPROTECT` bit in `uffdio_api.ioctls` / `uffdio_register.ioctls`.
pub const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

/// `UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
/// `UFFDIO_REGISTER = _IOWR(0xAA, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
/// `UFFDIO_UNREGISTER = _IOR(0xAA, 0x01, struct uffdio_range)`.
pub const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
/// `UFFDIO_WAKE = _IOR(0xAA, 0x02, struct uffdio_range)`.
pub const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT = _IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());
/// `USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)` on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioApi {
    /// (in) `UFFD_API`.
    pub api: u64,
    /// (in/out) requested / granted features.
    pub features: u64,
    /// (out) supported ioctls.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRange {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRegister {
    /// (in) range.
    pub range: UffdioRange,
    /// (in) `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// (out) ioctls usable on the range.
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioWriteprotect {
    /// (in) range.
    pub range: UffdioRange,
    /// (in) 0 = clear write protection and wake.
    pub mode: u64,
}

/// `struct uffd_msg`: an 8-byte header and a 24-byte union, read as three `u64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// The union: pagefault {flags, address, ptid}, remap {from, to, len},
    /// remove/unmap {start, end}.
    pub arg: [u64; 3],
}

/// `PROCMAP_QUERY = _IOWR('f', 17, struct procmap_query)` on an open `/proc/<pid>/maps`
/// (Linux 6.11+; older kernels answer `ENOTTY`).
pub const PROCMAP_QUERY: u64 =
    (3 << 30) | ((std::mem::size_of::<ProcmapQuery>() as u64) << 16) | (0x66 << 8) | 17;
/// `PROCMAP_QUERY_VMA_SHARED`: the VMA is a shared mapping (`VM_MAYSHARE`).
pub const PROCMAP_QUERY_VMA_SHARED: u64 = 0x08;
/// `PROCMAP_QUERY_COVERING_OR_NEXT_VMA`: return the VMA covering the address, or the next one.
pub const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;

/// `struct procmap_query` (`include/uapi/linux/fs.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcmapQuery {
    /// (in) `sizeof(struct procmap_query)`.
    pub size: u64,
    /// (in) `PROCMAP_QUERY_*` flags.
    pub query_flags: u64,
    /// (in) the address to query.
    pub query_addr: u64,
    /// (out) start of the VMA found.
    pub vma_start: u64,
    /// (out) end of the VMA found.
    pub vma_end: u64,
    /// (out) `PROCMAP_QUERY_VMA_*` flags.
    pub vma_flags: u64,
    /// (out) page size of the VMA.
    pub vma_page_size: u64,
    /// (out) file offset of the VMA.
    pub vma_offset: u64,
    /// (out) inode of the backing file, 0 if none.
    pub inode: u64,
    /// (out) device major of the backing file.
    pub dev_major: u32,
    /// (out) device minor of the backing file.
    pub dev_minor: u32,
    /// (in/out) size of the name buffer / of the name with its NUL (0: no name).
    pub vma_name_size: u32,
    /// (in/out) size of the build-id buffer (0: not wanted).
    pub build_id_size: u32,
    /// (in) address of the name buffer.
    pub vma_name_addr: u64,
    /// (in) address of the build-id buffer.
    pub build_id_addr: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_uapi_header() {
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRange>(), 16);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(offset_of!(UffdMsg, arg), 8);
        assert_eq!(offset_of!(UffdioRegister, mode), 16);
        assert_eq!(size_of::<ProcmapQuery>(), 104);
        assert_eq!(offset_of!(ProcmapQuery, dev_major), 72);
        assert_eq!(offset_of!(ProcmapQuery, vma_name_addr), 88);
    }

    #[test]
    fn opcodes_match_known_values() {
        // Values printed by a C program including <linux/userfaultfd.h> (x86_64).
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(PROCMAP_QUERY, 0xc068_6611);
    }
}
