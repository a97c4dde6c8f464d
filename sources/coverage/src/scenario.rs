//! The scenarios: each sets up memory, watches it through the column, runs one operation
//! that takes the memory away or changes it, and reports whether (and how fast) the
//! column's source told the probe.

use umm::Range;

use crate::probe::{now_ns, Probe};
use crate::Column;

/// What one cell found.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The source reported an overlapping range.
    Caught {
        /// From just before the operation to the first report (may be after it returned).
        delay_ns: u64,
        /// How long the operation itself took.
        call_ns: u64,
        /// Whether the source had recorded something by the time the operation returned
        /// (for userfaultfd: the generation had moved, so no cache hit can miss it).
        by_return: bool,
    },
    /// Nothing was reported.
    Missed,
    /// The source refused to watch the memory (it cannot cover it): a pin of it fails
    /// with a typed error instead of being made stale silently.
    Unwatchable(String),
}

impl Verdict {
    /// Whether it is [`Verdict::Caught`].
    pub fn is_caught(&self) -> bool {
        matches!(self, Verdict::Caught { .. })
    }

    /// The one-line form a child prints (`CELL ...`).
    pub fn to_line(&self) -> String {
        match self {
            Verdict::Caught {
                delay_ns,
                call_ns,
                by_return,
            } => format!("CELL caught {delay_ns} {call_ns} {}", u8::from(*by_return)),
            Verdict::Missed => "CELL missed".into(),
            Verdict::Unwatchable(why) => format!("CELL unwatchable {}", why.replace('\n', " ")),
        }
    }

    /// Parses [`Verdict::to_line`] output.
    pub fn parse(line: &str) -> Option<Verdict> {
        let rest = line.strip_prefix("CELL ")?;
        let mut it = rest.splitn(2, ' ');
        match it.next()? {
            "caught" => {
                let mut n = it.next()?.split(' ');
                Some(Verdict::Caught {
                    delay_ns: n.next()?.parse().ok()?,
                    call_ns: n.next()?.parse().ok()?,
                    by_return: n.next()? == "1",
                })
            }
            "missed" => Some(Verdict::Missed),
            "unwatchable" => Some(Verdict::Unwatchable(it.next().unwrap_or("").to_string())),
            _ => None,
        }
    }
}

/// What a scenario gets.
pub struct Ctx<'a> {
    /// The column under test.
    pub col: &'a dyn Column,
    /// Where the column reports.
    pub probe: &'a Probe,
}

impl Ctx<'_> {
    /// Watches `watch`, runs `op`, and looks for a report overlapping `watch`.
    pub fn measure(&self, watch: Range, op: impl FnOnce()) -> Verdict {
        if let Err(why) = self.col.watch(watch) {
            return Verdict::Unwatchable(why);
        }
        // The hooked `free` reports every heap block: start from an empty record.
        self.probe.clear();
        let mark = self.col.mark();
        let t0 = now_ns();
        op();
        let t1 = now_ns();
        let by_return = self.col.recorded_since(mark);
        self.col.settle();
        let found = self.probe.first_overlap(watch, t0);
        self.col.unwatch(watch);
        match found {
            Some(t) => Verdict::Caught {
                delay_ns: t.saturating_sub(t0),
                call_ns: t1 - t0,
                by_return,
            },
            None if self.probe.invalidate_alls() > 0 => Verdict::Caught {
                delay_ns: t1 - t0,
                call_ns: t1 - t0,
                by_return,
            },
            None => Verdict::Missed,
        }
    }
}

/// One row of the matrix.
pub struct Scenario {
    /// Short id used on command lines.
    pub id: &'static str,
    /// Row heading.
    pub title: &'static str,
    /// Runs it.
    pub run: fn(&Ctx) -> Result<Verdict, String>,
}

/// Pages per scenario mapping (64 KiB with 4 KiB pages).
const PAGES: usize = 16;

fn page() -> usize {
    umm::page_size()
}

/// A touched private anonymous mapping.
pub fn anon(len: usize) -> Result<*mut libc::c_void, String> {
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    touch(p as usize, len);
    Ok(p)
}

fn touch(start: usize, len: usize) {
    for a in (start..start + len).step_by(page()) {
        // SAFETY: callers pass live read-write memory of their own.
        unsafe { (a as *mut u8).write_volatile(0x5a) };
    }
}

fn range(p: *mut libc::c_void, len: usize) -> Result<Range, String> {
    Range::new(p as usize, len).map_err(|e| e.to_string())
}

fn munmap_whole(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    // SAFETY: unmaps our own mapping.
    Ok(cx.measure(range(p, len)?, || unsafe {
        libc::munmap(p, len);
    }))
}

fn munmap_part(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    let mid = 4 * page();
    // SAFETY: unmaps a middle part of our own mapping.
    let v = cx.measure(range(p, len)?, || unsafe {
        libc::munmap(p.add(mid), mid);
    });
    // SAFETY: the rest of our mapping.
    unsafe { libc::munmap(p, len) };
    Ok(v)
}

fn mremap_move(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    let dst = anon(len)?;
    let mut moved = libc::MAP_FAILED;
    // SAFETY: moves our own mapping onto another of ours (MREMAP_FIXED replaces it).
    let v = cx.measure(range(p, len)?, || unsafe {
        moved = libc::mremap(p, len, len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, dst);
    });
    if moved != dst {
        return Err(format!("mremap: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the moved mapping.
    unsafe { libc::munmap(dst, len) };
    Ok(v)
}

fn mremap_shrink(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    let mut q = libc::MAP_FAILED;
    // SAFETY: shrinks our own mapping in place.
    let v = cx.measure(range(p, len)?, || unsafe {
        q = libc::mremap(p, len, len / 2, 0);
    });
    if q != p {
        return Err(format!("mremap: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: what is left of our mapping.
    unsafe { libc::munmap(p, len / 2) };
    Ok(v)
}

fn map_fixed_over(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    // SAFETY: maps fresh memory over our own mapping.
    let v = cx.measure(range(p, len)?, || unsafe {
        libc::mmap(
            p,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
    });
    // SAFETY: our mapping.
    unsafe { libc::munmap(p, len) };
    Ok(v)
}

fn madv_dontneed(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    // SAFETY: empties our own mapping.
    let v = cx.measure(range(p, len)?, || unsafe {
        libc::madvise(p, len, libc::MADV_DONTNEED);
    });
    touch(p as usize, len); // refaults must not hang
                            // SAFETY: our mapping.
    unsafe { libc::munmap(p, len) };
    Ok(v)
}

fn free_large_malloc(cx: &Ctx) -> Result<Verdict, String> {
    let len = 4 << 20; // above glibc's mmap threshold: its own mapping
                       // SAFETY: plain malloc; freed in the operation.
    let m = unsafe { libc::malloc(len) };
    if m.is_null() {
        return Err("malloc failed".into());
    }
    touch(m as usize, len);
    let watch = range(m, len)?
        .align_out(page())
        .map_err(|e| e.to_string())?;
    // SAFETY: frees our own block.
    Ok(cx.measure(watch, || unsafe { libc::free(m) }))
}

fn brk_shrink(cx: &Ctx) -> Result<Verdict, String> {
    let grow = PAGES * page();
    // SAFETY: sbrk(0) reads the break.
    let cur = unsafe { libc::sbrk(0) } as usize;
    // SAFETY: grows the heap by `grow` bytes, given back below.
    if unsafe { libc::sbrk(grow as isize) } as isize == -1 {
        return Err(format!("sbrk: {}", std::io::Error::last_os_error()));
    }
    let start = (cur + page() - 1) & !(page() - 1);
    let end = (cur + grow) & !(page() - 1);
    touch(start, end - start);
    let watch = Range::from_bounds(start, end).map_err(|e| e.to_string())?;
    // SAFETY: gives back exactly what we took.
    Ok(cx.measure(watch, || unsafe {
        libc::sbrk(-(grow as isize));
    }))
}

fn shmdt(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    // SAFETY: a private SysV segment, removed below.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600) };
    if id < 0 {
        return Err(format!("shmget: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: attaches our segment anywhere.
    let p = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    // SAFETY: marks it for removal once detached.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    if p as isize == -1 {
        return Err(format!("shmat: {}", std::io::Error::last_os_error()));
    }
    touch(p as usize, len);
    // SAFETY: detaches our segment.
    Ok(cx.measure(range(p, len)?, || unsafe {
        libc::shmdt(p);
    }))
}

fn fork_cow_break(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    let mut fds = [0; 2];
    // SAFETY: creates a pipe into `fds`.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err("pipe failed".into());
    }
    let v = cx.measure(range(p, len)?, || {
        // SAFETY: the child only calls read and _exit (async-signal-safe).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut b = 0u8;
            // SAFETY: waits for the parent's byte, then exits.
            unsafe {
                libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        // The parent writes while the child still shares the pages: copy-on-write break,
        // the parent's virtual addresses now point to new pages.
        touch(p as usize, len);
        // SAFETY: wakes the child and reaps it.
        unsafe {
            libc::write(fds[1], b"x".as_ptr().cast(), 1);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    });
    // SAFETY: our pipe and mapping.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
        libc::munmap(p, len);
    }
    Ok(v)
}

/// The id of the raw `syscall(SYS_munmap)` row.
pub const RAW_SYSCALL_MUNMAP: &str = "raw_syscall_munmap";

fn raw_syscall_munmap(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    // SAFETY: the munmap system call on our own mapping, bypassing libc's symbol.
    Ok(cx.measure(range(p, len)?, || unsafe {
        libc::syscall(libc::SYS_munmap, p, len);
    }))
}

/// A memfd of `len` bytes filled with `0x5a`, and its `MAP_SHARED` mapping.
fn shared_file(fd: i32, len: usize) -> Result<*mut libc::c_void, String> {
    let buf = vec![0x5au8; len];
    // SAFETY: writes our buffer to our file.
    if unsafe { libc::pwrite(fd, buf.as_ptr().cast(), len, 0) } != len as isize {
        return Err(format!("write: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: maps our file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    touch(p as usize, len);
    Ok(p)
}

fn memfd(len: usize) -> Result<(i32, *mut libc::c_void), String> {
    // SAFETY: creates an anonymous file (tmpfs-backed shmem).
    let fd = unsafe { libc::memfd_create(c"umm-coverage".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    Ok((fd, shared_file(fd, len)?))
}

/// The directory for the ext4 scenario: `$UMM_COVERAGE_EXT4_DIR`, else the system's
/// temporary directory; it must be on ext4 (the host's `/tmp` is on the root disk; the
/// guest mounts a loop-device ext4, see `guest-matrix.sh`).
fn ext4_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::env::var_os("UMM_COVERAGE_EXT4_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let c =
        std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs of a NUL-terminated path into our buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "statfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    const EXT4_SUPER_MAGIC: i64 = 0xEF53;
    if st.f_type as i64 != EXT4_SUPER_MAGIC {
        return Err(format!(
            "{} is not on ext4 (f_type {:#x}): set UMM_COVERAGE_EXT4_DIR",
            dir.display(),
            st.f_type
        ));
    }
    Ok(dir)
}

fn punch_hole(fd: i32, len: usize) {
    // SAFETY: punches a hole over our whole file (its size is kept).
    unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        );
    }
}

fn finish_file(fd: i32, p: *mut libc::c_void, len: usize) {
    // SAFETY: our mapping and descriptor.
    unsafe {
        libc::munmap(p, len);
        libc::close(fd);
    }
}

fn punch_hole_shmem(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let (fd, p) = memfd(len)?;
    let v = cx.measure(range(p, len)?, || punch_hole(fd, len));
    finish_file(fd, p, len);
    Ok(v)
}

fn punch_hole_ext4(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let path = ext4_dir()?.join(format!("umm-coverage-punch.{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    let p = shared_file(fd, len)?;
    // SAFETY: writes the pages back, so the punch drops real blocks, not just cache.
    unsafe { libc::msync(p, len, libc::MS_SYNC) };
    let v = cx.measure(range(p, len)?, || punch_hole(fd, len));
    finish_file(fd, p, len);
    Ok(v)
}

fn ftruncate_shrink(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let (fd, p) = memfd(len)?;
    // SAFETY: truncates our file to nothing (the mapping is not touched afterwards).
    let v = cx.measure(range(p, len)?, || unsafe {
        libc::ftruncate(fd, 0);
    });
    finish_file(fd, p, len);
    Ok(v)
}

fn shm_segment(len: usize) -> Result<i32, String> {
    // SAFETY: a private SysV segment; the caller removes it.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600) };
    if id < 0 {
        return Err(format!("shmget: {}", std::io::Error::last_os_error()));
    }
    Ok(id)
}

fn shmat_remap(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let a = shm_segment(len)?;
    let b = shm_segment(len)?;
    // SAFETY: attaches our segment anywhere; marks it for removal once detached (the
    // second one only after it is attached: an unattached removed segment is gone).
    let p = unsafe {
        let p = libc::shmat(a, std::ptr::null(), 0);
        libc::shmctl(a, libc::IPC_RMID, std::ptr::null_mut());
        p
    };
    if p as isize == -1 {
        // SAFETY: removes our second segment.
        unsafe { libc::shmctl(b, libc::IPC_RMID, std::ptr::null_mut()) };
        return Err(format!("shmat: {}", std::io::Error::last_os_error()));
    }
    touch(p as usize, len);
    let mut q = p;
    // SAFETY: attaches the second segment over the first (SHM_REMAP replaces it).
    let v = cx.measure(range(p, len)?, || unsafe {
        q = libc::shmat(b, p, libc::SHM_REMAP);
    });
    let err = std::io::Error::last_os_error();
    // SAFETY: removes the second segment (once detached) and detaches what is at p.
    unsafe {
        libc::shmctl(b, libc::IPC_RMID, std::ptr::null_mut());
        libc::shmdt(p);
    }
    if q != p {
        return Err(format!("shmat(SHM_REMAP): {err}"));
    }
    Ok(v)
}

fn madv_free(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    // SAFETY: lazily frees our own mapping's pages.
    let v = cx.measure(range(p, len)?, || unsafe {
        libc::madvise(p, len, libc::MADV_FREE);
    });
    // SAFETY: our mapping.
    unsafe { libc::munmap(p, len) };
    Ok(v)
}

fn madv_remove(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    // SAFETY: a fresh shared anonymous mapping (MADV_REMOVE needs shmem).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    touch(p as usize, len);
    let mut rc = 0;
    // SAFETY: frees our own mapping's backing store.
    let v = cx.measure(range(p, len)?, || unsafe {
        rc = libc::madvise(p, len, libc::MADV_REMOVE);
    });
    if rc != 0 {
        return Err(format!(
            "madvise(MADV_REMOVE): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: our mapping.
    unsafe { libc::munmap(p, len) };
    Ok(v)
}

fn malloc_trim(cx: &Ctx) -> Result<Verdict, String> {
    let len = 100 << 10; // below glibc's mmap threshold: a block of the heap
                         // SAFETY: plain mallocs; the guard keeps the block off the top of the heap (so the
                         // free itself trims nothing and malloc_trim has to madvise it).
    let (m, guard) = unsafe { (libc::malloc(len), libc::malloc(64)) };
    if m.is_null() || guard.is_null() {
        return Err("malloc failed".into());
    }
    touch(m as usize, len);
    let start = (m as usize).div_ceil(page()) * page() + page();
    let watch =
        Range::from_bounds(start, (m as usize + len) & !(page() - 1)).map_err(|e| e.to_string())?;
    // SAFETY: frees our block, then trims the heap.
    let v = cx.measure(watch, || unsafe {
        libc::free(m);
        libc::malloc_trim(0);
    });
    // SAFETY: our guard block.
    unsafe { libc::free(guard) };
    Ok(v)
}

fn munmap_other_thread(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)? as usize;
    Ok(cx.measure(range(p as *mut _, len)?, || {
        std::thread::spawn(move || {
            // SAFETY: unmaps our own mapping, from another thread.
            unsafe { libc::munmap(p as *mut _, len) };
        })
        .join()
        .expect("the unmapping thread");
    }))
}

fn mremap_dontunmap(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    let mut moved = libc::MAP_FAILED;
    // SAFETY: moves our mapping's pages elsewhere, leaving the range mapped and empty.
    let v = cx.measure(range(p, len)?, || unsafe {
        moved = libc::mremap(p, len, len, libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP);
    });
    if moved == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        // SAFETY: our mapping.
        unsafe { libc::munmap(p, len) };
        if matches!(v, Verdict::Unwatchable(_)) {
            return Ok(v);
        }
        // Some kernels refuse it on watched memory (6.1: EINVAL on a userfaultfd range,
        // EAGAIN under an MMU interval notifier): nothing moved, nothing can be stale.
        return Ok(Verdict::Unwatchable(format!(
            "the kernel refuses mremap(MREMAP_DONTUNMAP) on watched memory: {err}"
        )));
    }
    // SAFETY: both of our mappings.
    unsafe {
        libc::munmap(p, len);
        libc::munmap(moved, len);
    }
    Ok(v)
}

/// Every scenario, in table order.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        id: "munmap_whole",
        title: "munmap of the whole range",
        run: munmap_whole,
    },
    Scenario {
        id: "munmap_part",
        title: "munmap of a part",
        run: munmap_part,
    },
    Scenario {
        id: "mremap_move",
        title: "mremap move (MREMAP_FIXED)",
        run: mremap_move,
    },
    Scenario {
        id: "mremap_shrink",
        title: "mremap shrink in place",
        run: mremap_shrink,
    },
    Scenario {
        id: "map_fixed_over",
        title: "mmap(MAP_FIXED) over the range",
        run: map_fixed_over,
    },
    Scenario {
        id: "madv_dontneed",
        title: "madvise(MADV_DONTNEED)",
        run: madv_dontneed,
    },
    Scenario {
        id: "free_large_malloc",
        title: "free() of a 4 MiB malloc block",
        run: free_large_malloc,
    },
    Scenario {
        id: "brk_shrink",
        title: "sbrk shrink of the heap top",
        run: brk_shrink,
    },
    Scenario {
        id: "shmdt",
        title: "shmdt of a SysV segment",
        run: shmdt,
    },
    Scenario {
        id: "fork_cow_break",
        title: "fork + parent write (COW break)",
        run: fork_cow_break,
    },
    Scenario {
        id: RAW_SYSCALL_MUNMAP,
        title: "syscall(SYS_munmap) (raw, as in a static binary)",
        run: raw_syscall_munmap,
    },
    Scenario {
        id: "munmap_other_thread",
        title: "munmap from another thread",
        run: munmap_other_thread,
    },
    Scenario {
        id: "mremap_dontunmap",
        title: "mremap(MREMAP_DONTUNMAP)",
        run: mremap_dontunmap,
    },
    Scenario {
        id: "madv_free",
        title: "madvise(MADV_FREE)",
        run: madv_free,
    },
    Scenario {
        id: "madv_remove",
        title: "madvise(MADV_REMOVE) of shared anonymous memory",
        run: madv_remove,
    },
    Scenario {
        id: "malloc_trim",
        title: "free() + malloc_trim(0) of a 100 KiB heap block",
        run: malloc_trim,
    },
    Scenario {
        id: "shmat_remap",
        title: "shmat(SHM_REMAP) over a SysV segment",
        run: shmat_remap,
    },
    Scenario {
        id: "punch_hole_shmem",
        title: "fallocate(PUNCH_HOLE) of a memfd (shmem) mapping",
        run: punch_hole_shmem,
    },
    Scenario {
        id: "punch_hole_ext4",
        title: "fallocate(PUNCH_HOLE) of an ext4 file mapping",
        run: punch_hole_ext4,
    },
    Scenario {
        id: "ftruncate_shrink",
        title: "ftruncate shrink of a memfd (shmem) mapping",
        run: ftruncate_shrink,
    },
];
