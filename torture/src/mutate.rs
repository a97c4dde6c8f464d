//! The operations that change what is mapped (and the heap operations), each updating the
//! model to what the kernel did.

use super::*;

impl<'m> Ctx<'m> {
    pub(crate) fn heap_op(
        &self,
        op: OpKind,
        block: &mut Option<(usize, usize)>,
        rng: &mut Rng,
    ) -> Outcome {
        let page = self.page();
        let interior = |p: usize, len: usize| {
            let a = (p + page - 1) & !(page - 1);
            let b = (p + len) & !(page - 1);
            (a, b)
        };
        match (op, *block) {
            (OpKind::HeapMalloc, None) => {
                let len = if rng.one_in(2) { 64 << 10 } else { 512 << 10 } + rng.below(3) * page;
                // SAFETY: plain malloc; the block is freed by HeapFree or at the end.
                let p = unsafe { libc::malloc(len) } as usize;
                if p == 0 {
                    return Outcome::Failed(format!("malloc({len}) failed"));
                }
                let (a, b) = interior(p, len);
                let mut q = a;
                while q < b {
                    let gen = self.next_gen();
                    // SAFETY: inside the block we just allocated and own.
                    unsafe { std::ptr::write_volatile(q as *mut [u64; 2], [gen, q as u64]) };
                    q += page;
                }
                *block = Some((p, len));
                Outcome::Done(format!("{len} B at {p:#x}"))
            }
            (OpKind::HeapFree, Some((p, len))) => {
                let (a, b) = interior(p, len);
                if let Ok(r) = Range::from_bounds(a, b) {
                    self.before(&[r]);
                }
                // SAFETY: `p` came from malloc and is freed once (the slot is cleared).
                unsafe { libc::free(p as *mut libc::c_void) };
                *block = None;
                Outcome::Done(format!("{len} B at {p:#x}"))
            }
            (OpKind::HeapPin, Some((p, len))) => {
                let (a, b) = interior(p, len);
                let n = (b - a) / page;
                let first = rng.below(n);
                let k = 1 + rng.below(MAX_RUN.min(n - first));
                let Ok(range) = Range::new(a + first * page, k * page) else {
                    return Outcome::Idle;
                };
                match self.manager.pin(range, &[self.nic.id()]) {
                    Ok(pin) => {
                        if let (Some(t), Some(pm)) = (pin.translation(self.nic), &self.pagemap) {
                            let reg = t.recorded.range;
                            for i in 0..k {
                                let addr = range.start() + i * page;
                                let rec = t.pages[(addr - reg.start()) / page];
                                let cur = frames::pfn(pm, addr);
                                if rec.pfn != 0 && cur != 0 && rec.pfn != cur {
                                    if self.frame_move_excused() {
                                        continue;
                                    }
                                    self.fail(
                                        None,
                                        format!(
                                            "STALE heap pin {range} (block {p:#x}+{len}): registration #{} of {reg} \
                                             recorded frame {:#x} at {addr:#x}, frame {cur:#x} is mapped now",
                                            t.recorded.id, rec.pfn
                                        ),
                                    );
                                    return Outcome::Done(String::new());
                                }
                                self.pages_checked.fetch_add(1, Ordering::Relaxed);
                            }
                            self.pins_checked.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Done(format!("{range} in block {p:#x}"))
                    }
                    Err(e) => {
                        self.pin_error(&e);
                        Outcome::Failed(format!("{range}: {e}"))
                    }
                }
            }
            _ => Outcome::Idle,
        }
    }

    pub(crate) fn map_fixed(&self, addr: usize, len: usize, flags: i32, fd: i32) -> bool {
        // SAFETY: MAP_FIXED inside the driver's reserved pool, whose pages only the holder
        // of the slot lock touches; the model is updated by the caller.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        p as usize == addr
    }

    pub(crate) fn munmap(&self, s: &mut Slot, a: usize, b: usize) -> bool {
        // SAFETY: unmaps pages of the driver's pool (slot lock held).
        let rc = unsafe { libc::munmap(s.addr(a) as *mut libc::c_void, (b - a) * self.page()) };
        s.set_unmapped(a, b);
        rc == 0
    }

    pub(crate) fn new_memfd(&self, s: &mut Slot) -> Option<(u32, i32)> {
        // SAFETY: creates a new descriptor (owned below).
        let fd = unsafe { libc::memfd_create(c"umm-torture".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizes the memfd we own.
        if unsafe { libc::ftruncate(fd, (FILE_PAGES * self.page()) as libc::off_t) } != 0 {
            return None;
        }
        let id = s.next_file;
        s.next_file += 1;
        s.files.push((id, owned));
        Some((id, fd))
    }

    pub(crate) fn new_shm(&self, len: usize) -> Option<i32> {
        // SAFETY: creates a private SysV segment; removed right after attaching.
        let id = unsafe { libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600) };
        (id >= 0).then_some(id)
    }

    pub(crate) fn attach_shm(&self, s: &mut Slot, a: usize, b: usize, remap: bool) -> Outcome {
        let Some(id) = self.new_shm((b - a) * self.page()) else {
            return Outcome::Failed(format!("shmget errno {}", errno()));
        };
        let flags = if remap { libc::SHM_REMAP } else { 0 };
        // SAFETY: attaches the new segment at a page of the pool (slot lock held);
        // SHM_REMAP replaces what the model says is mapped there.
        let p = unsafe { libc::shmat(id, s.addr(a) as *const libc::c_void, flags) };
        let e = errno();
        // SAFETY: marks the segment for removal; it lives until its last detach.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        if p as usize != s.addr(a) {
            return Outcome::Failed(format!("[{a},{b}) shmat errno {e}"));
        }
        for i in a..b {
            self.retag(s, i, Kind::Shm { base: a as u8 });
        }
        Outcome::Done(format!("[{a},{b}) segment {id}"))
    }

    /// After a failed `mremap` the kernel may have done part of the work (since Linux 6.17
    /// a move spanning several VMAs moves them one by one and stops at the first error):
    /// probe each page of `[a, b)` and make the model match what is there.
    pub(crate) fn reconcile(&self, s: &mut Slot, a: usize, b: usize) -> Vec<usize> {
        let mut changed = Vec::new();
        for i in a..b {
            let Page::Mapped { kind, gen } = s.pages[i] else {
                continue;
            };
            let addr = s.addr(i);
            match frames::read_tag(addr) {
                None => {
                    s.pages[i] = Page::Unmapped;
                    changed.push(i);
                }
                Some(t) if t.gen == gen && t.addr == addr as u64 => {}
                Some(_) => {
                    self.retag(s, i, kind);
                    changed.push(i);
                }
            }
        }
        changed
    }

    pub(crate) fn mutate(&self, op: OpKind, s: &mut Slot, rng: &mut Rng) -> Outcome {
        let page = self.page();
        match op {
            OpKind::Munmap => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                let ok = self.munmap(s, a, b);
                done(ok, format!("[{a},{b})"))
            }
            OpKind::MapAnon => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                if !self.map_fixed(s.addr(a), (b - a) * page, flags, -1) {
                    let e = errno();
                    self.munmap(s, a, b);
                    return Outcome::Failed(format!("[{a},{b}) errno {e}"));
                }
                for i in a..b {
                    self.retag(s, i, Kind::Anon);
                }
                Outcome::Done(format!("[{a},{b})"))
            }
            OpKind::MapMemfd => {
                let (a, b) = s.span(rng);
                let Some((file, fd)) = self.new_memfd(s) else {
                    return Outcome::Failed(format!("memfd errno {}", errno()));
                };
                self.before(&[s.range(a, b)]);
                if !self.map_fixed(s.addr(a), (b - a) * page, libc::MAP_SHARED, fd) {
                    let e = errno();
                    self.munmap(s, a, b);
                    return Outcome::Failed(format!("[{a},{b}) errno {e}"));
                }
                for i in a..b {
                    let off = (i - a) as u32;
                    self.retag(s, i, Kind::Memfd { file, off });
                }
                Outcome::Done(format!("[{a},{b}) file {file}"))
            }
            OpKind::MremapMove | OpKind::MremapDontunmap => {
                let dontunmap = op == OpKind::MremapDontunmap;
                let Some((a, b)) = s.movable_run(rng, dontunmap) else {
                    return Outcome::Idle;
                };
                let n = b - a;
                let Some(t) = s.target(rng, a, n) else {
                    return Outcome::Idle;
                };
                self.before(&[s.range(a, b), s.range(t, t + n)]);
                let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
                if dontunmap {
                    flags |= libc::MREMAP_DONTUNMAP;
                }
                // SAFETY: moves pool pages to other pool pages (slot lock held); the model
                // follows below whatever the outcome.
                let p = unsafe {
                    libc::mremap(
                        s.addr(a) as *mut libc::c_void,
                        n * page,
                        n * page,
                        flags,
                        s.addr(t) as *mut libc::c_void,
                    )
                };
                if p as usize != s.addr(t) {
                    // MREMAP_FIXED may have unmapped the target before failing.
                    let e = errno();
                    self.munmap(s, t, t + n);
                    let changed = self.reconcile(s, a, b);
                    return Outcome::Failed(format!(
                        "[{a},{b}) -> {t} errno {e} (target unmapped; source pages changed anyway: {changed:?})"
                    ));
                }
                let kinds: Vec<Kind> = (a..b).filter_map(|i| s.kind(i)).collect();
                if dontunmap {
                    // The source keeps its mapping, emptied: new pages on the next touch.
                    for i in a..b {
                        self.retag(s, i, Kind::Anon);
                    }
                } else {
                    s.set_unmapped(a, b);
                }
                for (j, k) in kinds.into_iter().enumerate() {
                    self.retag(s, t + j, k);
                }
                Outcome::Done(format!("[{a},{b}) -> {t}"))
            }
            OpKind::MremapGrow => {
                let Some((a, b)) = s.movable_run(rng, false) else {
                    return Outcome::Idle;
                };
                if b >= SLOT_PAGES {
                    return Outcome::Idle;
                }
                let mut k = 1 + rng.below(MAX_RUN.min(SLOT_PAGES - b));
                let last = s.kind(b - 1);
                if let Some(Kind::Memfd { file, off }) = last {
                    // Stay inside the file and never map one file page at two addresses.
                    let aliased = |o: u32| {
                        (0..SLOT_PAGES).any(|i| {
                            (i < a || i >= b) && s.kind(i) == Some(Kind::Memfd { file, off: o })
                        })
                    };
                    let mut ok = 0;
                    while ok < k
                        && (off as usize + 1 + ok) < FILE_PAGES
                        && !aliased(off + 1 + ok as u32)
                    {
                        ok += 1;
                    }
                    k = ok;
                }
                if k == 0 {
                    return Outcome::Idle;
                }
                self.before(&[s.range(b, b + k)]);
                self.munmap(s, b, b + k);
                // SAFETY: grows a pool mapping in place into pool pages just unmapped.
                let p = unsafe {
                    libc::mremap(
                        s.addr(a) as *mut libc::c_void,
                        (b - a) * page,
                        (b - a + k) * page,
                        0,
                        std::ptr::null_mut::<libc::c_void>(),
                    )
                };
                if p as usize != s.addr(a) {
                    let e = errno();
                    let changed = self.reconcile(s, a, b);
                    return Outcome::Failed(format!(
                        "[{a},{b}) +{k} errno {e} (changed anyway: {changed:?})"
                    ));
                }
                for j in 0..k {
                    let kind = match last {
                        Some(Kind::Memfd { file, off }) => Kind::Memfd {
                            file,
                            off: off + 1 + j as u32,
                        },
                        _ => Kind::Anon,
                    };
                    self.retag(s, b + j, kind);
                }
                Outcome::Done(format!("[{a},{b}) +{k}"))
            }
            OpKind::MremapShrink => {
                let Some((a, b)) = s.movable_run(rng, false) else {
                    return Outcome::Idle;
                };
                if b - a < 2 {
                    return Outcome::Idle;
                }
                let m = a + 1 + rng.below(b - a - 1);
                self.before(&[s.range(m, b)]);
                // SAFETY: shrinks a pool mapping in place (slot lock held).
                let p = unsafe {
                    libc::mremap(
                        s.addr(a) as *mut libc::c_void,
                        (b - a) * page,
                        (m - a) * page,
                        0,
                        std::ptr::null_mut::<libc::c_void>(),
                    )
                };
                if p as usize != s.addr(a) {
                    let e = errno();
                    self.munmap(s, m, b);
                    let changed = self.reconcile(s, a, m);
                    return Outcome::Failed(format!(
                        "[{a},{b}) -> [{a},{m}) errno {e} (tail unmapped; changed anyway: {changed:?})"
                    ));
                }
                s.set_unmapped(m, b);
                Outcome::Done(format!("[{a},{b}) -> [{a},{m})"))
            }
            OpKind::MadvDontneed | OpKind::MadvFree | OpKind::MadvRemove => {
                let (advice, run) = match op {
                    OpKind::MadvDontneed => (
                        libc::MADV_DONTNEED,
                        s.run(rng, MAX_RUN, |_| true, |_, _| true),
                    ),
                    OpKind::MadvFree => (
                        libc::MADV_FREE,
                        s.run(rng, MAX_RUN, |k| *k == Kind::Anon, |_, k| *k == Kind::Anon),
                    ),
                    _ => {
                        let shared = |k: &Kind| !matches!(k, Kind::Anon);
                        (
                            libc::MADV_REMOVE,
                            s.run(rng, MAX_RUN, shared, |_, k| shared(k)),
                        )
                    }
                };
                let Some((a, b)) = run else {
                    return Outcome::Idle;
                };
                self.before(&[s.range(a, b)]);
                // SAFETY: madvise on mapped pool pages (slot lock held).
                let rc = unsafe {
                    libc::madvise(s.addr(a) as *mut libc::c_void, (b - a) * page, advice)
                };
                let e = errno();
                self.retag_run(s, a, b);
                done(rc == 0, format!("[{a},{b}) rc {rc} errno {e}"))
            }
            OpKind::PunchHole | OpKind::Ftruncate => {
                let files: Vec<(usize, u32, u32)> = (0..SLOT_PAGES)
                    .filter_map(|i| match s.kind(i) {
                        Some(Kind::Memfd { file, off }) => Some((i, file, off)),
                        _ => None,
                    })
                    .collect();
                if files.is_empty() {
                    return Outcome::Idle;
                }
                let (_, file, off) = files[rng.below(files.len())];
                let Some(fd) = s.fd(file) else {
                    return Outcome::Idle;
                };
                let (lo, hi) = if op == OpKind::PunchHole {
                    let lo = off.saturating_sub(rng.below(2) as u32);
                    (lo, (lo + 1 + rng.below(4) as u32).min(FILE_PAGES as u32))
                } else {
                    (off.saturating_sub(rng.below(3) as u32), FILE_PAGES as u32)
                };
                let hit: Vec<usize> = files
                    .iter()
                    .filter(|(_, f, o)| *f == file && (lo..hi).contains(o))
                    .map(|(i, _, _)| *i)
                    .collect();
                let ranges: Vec<Range> = hit.iter().map(|&i| s.range(i, i + 1)).collect();
                self.before(&ranges);
                let rc = if op == OpKind::PunchHole {
                    // SAFETY: punches a hole in a memfd we own.
                    unsafe {
                        libc::fallocate(
                            fd,
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            (lo as usize * page) as libc::off_t,
                            ((hi - lo) as usize * page) as libc::off_t,
                        )
                    }
                } else {
                    // SAFETY: truncates a memfd we own down and back up; its mapped pages
                    // beyond `lo` are zapped and come back empty (no access in between).
                    unsafe {
                        libc::ftruncate(fd, (lo as usize * page) as libc::off_t)
                            | libc::ftruncate(fd, (FILE_PAGES * page) as libc::off_t)
                    }
                };
                let e = errno();
                for i in hit.iter().copied() {
                    if let Some(k) = s.kind(i) {
                        self.retag(s, i, k);
                    }
                }
                done(
                    rc == 0,
                    format!("file {file} pages [{lo},{hi}) -> slot pages {hit:?} errno {e}"),
                )
            }
            OpKind::ShmatHole => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                self.munmap(s, a, b);
                self.attach_shm(s, a, b, false)
            }
            OpKind::ShmatRemap => {
                let Some((a, b)) = s.run(rng, MAX_RUN, |_| true, |_, _| true) else {
                    return Outcome::Idle;
                };
                self.before(&[s.range(a, b)]);
                self.attach_shm(s, a, b, true)
            }
            OpKind::Shmdt => {
                let bases: Vec<usize> = (0..SLOT_PAGES)
                    .filter(|&i| s.kind(i) == Some(Kind::Shm { base: i as u8 }))
                    .collect();
                if bases.is_empty() {
                    return Outcome::Idle;
                }
                let base = bases[rng.below(bases.len())];
                let hit: Vec<usize> = (0..SLOT_PAGES)
                    .filter(|&i| s.kind(i) == Some(Kind::Shm { base: base as u8 }))
                    .collect();
                let ranges: Vec<Range> = hit.iter().map(|&i| s.range(i, i + 1)).collect();
                self.before(&ranges);
                // SAFETY: detaches a segment the driver attached in the pool.
                let rc = unsafe { libc::shmdt(s.addr(base) as *const libc::c_void) };
                let e = errno();
                for &i in &hit {
                    s.set_unmapped(i, i + 1);
                }
                done(rc == 0, format!("at {base}: pages {hit:?} errno {e}"))
            }
            OpKind::Fork => self.fork(s, false),
            OpKind::ForkCow => self.fork(s, true),
            OpKind::RawSyscall => self.raw(s, rng),
            _ => Outcome::Idle,
        }
    }

    pub(crate) fn raw(&self, s: &mut Slot, rng: &mut Rng) -> Outcome {
        let page = self.page();
        match rng.below(3) {
            0 => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                // SAFETY: raw munmap of pool pages (slot lock held).
                let rc = unsafe { libc::syscall(libc::SYS_munmap, s.addr(a), (b - a) * page) };
                s.set_unmapped(a, b);
                done(rc == 0, format!("munmap [{a},{b})"))
            }
            1 => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                // SAFETY: raw MAP_FIXED anonymous mapping over pool pages (slot lock held).
                let p = unsafe {
                    libc::syscall(
                        libc::SYS_mmap,
                        s.addr(a),
                        (b - a) * page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if p as usize != s.addr(a) {
                    let e = errno();
                    self.munmap(s, a, b);
                    return Outcome::Failed(format!("mmap [{a},{b}) errno {e}"));
                }
                for i in a..b {
                    self.retag(s, i, Kind::Anon);
                }
                Outcome::Done(format!("mmap [{a},{b})"))
            }
            _ => {
                let Some((a, b)) = s.run(rng, MAX_RUN, |_| true, |_, _| true) else {
                    return Outcome::Idle;
                };
                self.before(&[s.range(a, b)]);
                // SAFETY: raw madvise(DONTNEED) of mapped pool pages (slot lock held).
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_madvise,
                        s.addr(a),
                        (b - a) * page,
                        libc::MADV_DONTNEED,
                    )
                };
                self.retag_run(s, a, b);
                done(rc == 0, format!("madvise(DONTNEED) [{a},{b})"))
            }
        }
    }

    /// Runs with every other worker stopped (the caller holds the fork lock for writing).
    pub(crate) fn fork(&self, s: &mut Slot, cow: bool) -> Outcome {
        let anon: Vec<usize> = (0..SLOT_PAGES)
            .filter(|&i| s.kind(i) == Some(Kind::Anon))
            .collect();
        let addrs: Vec<usize> = anon.iter().map(|&i| s.addr(i)).collect();
        let probe = s.range(0, 1);
        self.forks.fetch_add(1, Ordering::SeqCst);
        let nic = self.nic.id();
        let mut pipe = [-1; 2];
        // SAFETY: creates a pipe whose two descriptors we close below.
        if cow && unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Outcome::Failed(format!("pipe errno {}", errno()));
        }
        // SAFETY: fork; the child only writes its copy of private pages, makes one call
        // that must fail fast (its copy of the manager refuses), reads a pipe and _exits:
        // nothing that allocates or takes a lock another thread could have held.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            for &a in &addrs {
                // SAFETY: the child's private copy of a mapped anonymous pool page.
                unsafe { std::ptr::write_volatile((a + 64) as *mut u64, !0) };
            }
            let code = match self.manager.pin(probe, &[nic]) {
                Err(umm::Error::ForkedChild { .. }) => 0,
                _ => 3,
            };
            if cow {
                let mut b = [0u8; 1];
                // SAFETY: closes our copy of the write end, then waits for the parent's.
                unsafe {
                    libc::close(pipe[1]);
                    libc::read(pipe[0], b.as_mut_ptr().cast(), 1);
                }
            }
            // SAFETY: leaves the child without running anything of the parent's.
            unsafe { libc::_exit(code) };
        }
        if pid < 0 {
            let e = errno();
            if cow {
                // SAFETY: our pipe descriptors.
                unsafe {
                    libc::close(pipe[0]);
                    libc::close(pipe[1]);
                }
            }
            return Outcome::Failed(format!("fork errno {e}"));
        }
        if cow {
            // The parent writes while the child shares the pages: new frames here.
            let ranges: Vec<Range> = anon.iter().map(|&i| s.range(i, i + 1)).collect();
            self.before(&ranges);
            for &i in &anon {
                self.retag(s, i, Kind::Anon);
            }
            // SAFETY: our pipe descriptors; closing the write end lets the child exit.
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child we forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            self.fail(
                Some(s),
                format!("fork child exited with status {status:#x}: its copy of the manager did not refuse pin with ForkedChild"),
            );
        }
        Outcome::Done(format!("{} private pages, child {pid}", anon.len()))
    }
}
