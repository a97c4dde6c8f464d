//! What is mapped where in this process: the VMAs covering a range, read with the
//! `PROCMAP_QUERY` ioctl (Linux 6.11+, one ioctl per VMA) or, on older kernels, by parsing
//! `/proc/self/maps` up to the range; their classification; and the VMA count against
//! `vm.max_map_count`.
//!
//! The source classifies the range of every new watch (the miss path; cache hits never
//! come here) to refuse memory it cannot protect, to name the mapping in its errors, and
//! to widen registrations to whole VMAs or aligned spans without crossing into other
//! mappings.

use std::ffi::CStr;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};

use umm::Range;

use crate::sys::{
    ProcmapQuery, PROCMAP_QUERY, PROCMAP_QUERY_COVERING_OR_NEXT_VMA, PROCMAP_QUERY_VMA_SHARED,
};

/// One VMA, as `/proc/self/maps` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// A shared mapping (`s` in `/proc/self/maps`: `MAP_SHARED`, SysV shm).
    pub shared: bool,
    /// Inode of the backing file (0 for anonymous memory).
    pub inode: u64,
    /// The name: a path (with " (deleted)" for unlinked files), `[heap]`, `[stack]`,
    /// `[anon:...]`, `[vdso]`..., or empty for anonymous memory.
    pub name: String,
}

/// What kind of memory a [`Vma`] is, as far as userfaultfd coverage goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Private anonymous memory (`malloc`, `mmap(MAP_PRIVATE|MAP_ANONYMOUS)`, heap,
    /// stacks): every way to replace its pages (munmap, mremap, mmap over it, madvise) is
    /// an event.
    PrivateAnonymous,
    /// `MAP_SHARED|MAP_ANONYMOUS` (or a shared `/dev/zero` mapping): shmem without a file
    /// descriptor, so no `fallocate`/`ftruncate` (short of a privileged
    /// `/proc/<pid>/map_files` open); `madvise(MADV_REMOVE)` is an event.
    SharedAnonymous,
    /// A tmpfs, memfd or hugetlbfs file: `fallocate(PUNCH_HOLE)` and `ftruncate` replace
    /// pages without any userfaultfd event.
    Shmem,
    /// A SysV shared memory segment: `shmat(SHM_REMAP)` over it and `shmdt` give no event
    /// (and the kernel refuses to register it without `UFFD_FEATURE_WP_ASYNC`).
    SysV,
    /// A `MAP_SHARED` mapping of a regular file: the kernel refuses to register it.
    SharedFile,
    /// A `MAP_PRIVATE` mapping of a regular file: the kernel refuses to register it in
    /// write-protect mode, and `ftruncate` of the file would unmap its pages silently.
    PrivateFile,
    /// `[vdso]`, `[vvar]`, `[vsyscall]` and the like.
    Special,
}

impl Mapping {
    /// The mapping in words, for errors.
    pub fn describe(self) -> &'static str {
        match self {
            Mapping::PrivateAnonymous => "private anonymous memory",
            Mapping::SharedAnonymous => "shared anonymous memory",
            Mapping::Shmem => "a tmpfs/memfd/hugetlbfs (shmem) file mapping",
            Mapping::SysV => "a SysV shared memory segment",
            Mapping::SharedFile => "a MAP_SHARED mapping of a regular file",
            Mapping::PrivateFile => "a MAP_PRIVATE mapping of a regular file",
            Mapping::Special => "a special kernel mapping",
        }
    }
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Whether the file at `path` (a name from `/proc/self/maps`) lives on tmpfs/hugetlbfs.
fn on_shmem(path: &str) -> bool {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a valid statfs to write.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    let t = st.f_type as i64;
    t == TMPFS_MAGIC || t == HUGETLBFS_MAGIC
}

impl Vma {
    /// Classifies the VMA (may `statfs` its file).
    pub fn mapping(&self) -> Mapping {
        let name = self.name.as_str();
        if name.is_empty() {
            return if self.shared {
                Mapping::SharedAnonymous
            } else {
                Mapping::PrivateAnonymous
            };
        }
        if name.starts_with('[') {
            return if name == "[heap]" || name.starts_with("[stack") || name.starts_with("[anon:") {
                Mapping::PrivateAnonymous
            } else if name.starts_with("[anon_shmem:") {
                Mapping::SharedAnonymous
            } else {
                Mapping::Special
            };
        }
        if name.starts_with("/SYSV") && self.shared {
            return Mapping::SysV;
        }
        if name == "/dev/zero (deleted)" || name == "/dev/zero" {
            // Shared: shmem without a descriptor; private: anonymous memory.
            return if self.shared {
                Mapping::SharedAnonymous
            } else {
                Mapping::PrivateAnonymous
            };
        }
        if name.starts_with("/memfd:") || on_shmem(name) {
            // Private shmem mappings too: their unwritten pages follow the file.
            return Mapping::Shmem;
        }
        if self.shared {
            Mapping::SharedFile
        } else {
            Mapping::PrivateFile
        }
    }
}

/// Reads the VMAs of this process.
pub struct Vmas {
    /// An open `/proc/self/maps` for `PROCMAP_QUERY`, when the kernel has it.
    query: Option<OwnedFd>,
}

impl Vmas {
    /// Uses `PROCMAP_QUERY` if `use_ioctl` and the kernel answers it, else parses
    /// `/proc/self/maps` on every call.
    pub fn new(use_ioctl: bool) -> Vmas {
        let query = use_ioctl
            .then(|| std::fs::File::open("/proc/self/maps").ok())
            .flatten()
            .map(OwnedFd::from)
            .filter(|fd| {
                // Probe with an address that is surely mapped: this function's code.
                let probe = Vmas::new as *const () as usize;
                matches!(query_one(fd, probe, &mut vec![0u8; NAME_BUF]), Ok(Some(_)))
            });
        Vmas { query }
    }

    /// Whether the `PROCMAP_QUERY` ioctl is used.
    pub fn uses_procmap_query(&self) -> bool {
        self.query.is_some()
    }

    /// The VMAs that overlap `range`, in address order (holes are gaps between them).
    pub fn covering(&self, range: Range) -> io::Result<Vec<Vma>> {
        match &self.query {
            Some(fd) => covering_by_query(fd, range),
            None => covering_by_parsing(range),
        }
    }
}

/// Room for a path and " (deleted)".
const NAME_BUF: usize = libc::PATH_MAX as usize + 32;

fn query_one(fd: &OwnedFd, addr: usize, name: &mut [u8]) -> io::Result<Option<Vma>> {
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_flags: PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
        query_addr: addr as u64,
        vma_name_size: name.len() as u32,
        vma_name_addr: name.as_mut_ptr() as u64,
        ..ProcmapQuery::default()
    };
    // SAFETY: PROCMAP_QUERY reads and writes one `procmap_query` (layout tested) and writes
    // at most `vma_name_size` bytes to `name`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), PROCMAP_QUERY as _, &mut q) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let name = if q.vma_name_size == 0 {
        String::new()
    } else {
        CStr::from_bytes_until_nul(name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Ok(Some(Vma {
        start: q.vma_start as usize,
        end: q.vma_end as usize,
        shared: q.vma_flags & PROCMAP_QUERY_VMA_SHARED != 0,
        inode: q.inode,
        name,
    }))
}

fn covering_by_query(fd: &OwnedFd, range: Range) -> io::Result<Vec<Vma>> {
    let mut out = Vec::new();
    let mut name = vec![0u8; NAME_BUF];
    let mut at = range.start();
    while at < range.end() {
        match query_one(fd, at, &mut name)? {
            Some(v) if v.start < range.end() => {
                at = v.end;
                out.push(v);
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Parses one `/proc/self/maps` line: `start-end perms offset dev inode [name]`.
fn parse_line(line: &str) -> Option<Vma> {
    let mut rest = line;
    let mut field = || {
        let s = rest.trim_start();
        let end = s.find(' ').unwrap_or(s.len());
        let (f, r) = s.split_at(end);
        rest = r;
        f
    };
    let (a, b) = field().split_once('-')?;
    let perms = field();
    let _offset = field();
    let _dev = field();
    let inode = field().parse().ok()?;
    let name = rest.trim_start().to_string();
    Some(Vma {
        start: usize::from_str_radix(a, 16).ok()?,
        end: usize::from_str_radix(b, 16).ok()?,
        shared: perms.as_bytes().get(3) == Some(&b's'),
        inode,
        name,
    })
}

fn covering_by_parsing(range: Range) -> io::Result<Vec<Vma>> {
    let f = BufReader::with_capacity(64 << 10, std::fs::File::open("/proc/self/maps")?);
    let mut out = Vec::new();
    for line in f.lines() {
        let line = line?;
        let Some(v) = parse_line(&line) else {
            continue;
        };
        if v.start >= range.end() {
            break;
        }
        if v.end > range.start() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The VMAs of this process now (lines of `/proc/self/maps`; a few ms at tens of thousands).
pub fn map_count() -> io::Result<usize> {
    let mut f = std::fs::File::open("/proc/self/maps")?;
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0;
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok(n);
        }
        n += buf[..got].iter().filter(|&&b| b == b'\n').count();
    }
}

/// `vm.max_map_count` (65530 if it cannot be read: the kernel's default).
pub fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let v = parse_line("7f00-7f10 rw-s 00000000 00:01 1234   /memfd:x (deleted)").unwrap();
        assert_eq!(
            (v.start, v.end, v.shared, v.inode),
            (0x7f00, 0x7f10, true, 1234)
        );
        assert_eq!(v.name, "/memfd:x (deleted)");
        assert_eq!(v.mapping(), Mapping::Shmem);
        let v = parse_line("1000-2000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!((v.shared, v.name.as_str()), (false, ""));
        assert_eq!(v.mapping(), Mapping::PrivateAnonymous);
        let v = parse_line("1000-2000 rw-s 00000000 00:01 7 /SYSV00000000 (deleted)").unwrap();
        assert_eq!(v.mapping(), Mapping::SysV);
        let v = parse_line("1000-2000 r--p 00000000 00:00 0  [vvar]").unwrap();
        assert_eq!(v.mapping(), Mapping::Special);
        let v = parse_line("1000-2000 rw-p 00000000 00:00 0  [heap]").unwrap();
        assert_eq!(v.mapping(), Mapping::PrivateAnonymous);
    }

    #[test]
    fn query_and_parsing_agree() {
        let q = Vmas::new(true);
        if !q.uses_procmap_query() {
            eprintln!("SKIP: this kernel has no PROCMAP_QUERY (Linux 6.11+)");
            return;
        }
        let p = Vmas::new(false);
        // This test binary's own code, heap and a fresh anonymous mapping.
        let len = 8 * umm::page_size();
        // SAFETY: a fresh private anonymous mapping.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(m, libc::MAP_FAILED);
        let code = Range::new(parses_maps_lines as *const () as usize & !4095, 4096).unwrap();
        for r in [code, Range::new(m as usize, len).unwrap()] {
            assert_eq!(q.covering(r).unwrap(), p.covering(r).unwrap(), "{r}");
        }
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(m, len) };
    }
}
