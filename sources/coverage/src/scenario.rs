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
    /// The source refused to watch the memory (it cannot cover it at all).
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

fn raw_syscall_munmap(cx: &Ctx) -> Result<Verdict, String> {
    let len = PAGES * page();
    let p = anon(len)?;
    // SAFETY: the munmap system call on our own mapping, bypassing libc's symbol.
    Ok(cx.measure(range(p, len)?, || unsafe {
        libc::syscall(libc::SYS_munmap, p, len);
    }))
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
        id: "raw_syscall_munmap",
        title: "syscall(SYS_munmap) (raw)",
        run: raw_syscall_munmap,
    },
];
