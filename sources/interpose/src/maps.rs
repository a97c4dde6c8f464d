//! `/proc/self/maps`: the allocation-free extent lookup of `shmdt` (which takes only the
//! address), and the classification of a range for strict mode (watch path, allocates).

/// The end of the mapping that starts at `addr` (extended over directly following lines
/// of the same inode, i.e. the same segment split by `mprotect`), or `None`.
/// Uses only `open`/`read`/`close` and a stack buffer.
pub(crate) fn extent_of(addr: usize) -> Option<usize> {
    // SAFETY: open with a NUL-terminated path; returns a descriptor or -1.
    let fd = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 8192];
    let mut have = 0usize;
    let mut found: Option<(usize, u64)> = None; // (end, inode)
    let mut result = None;
    'read: loop {
        // SAFETY: reads into the free tail of `buf`.
        let n = unsafe { libc::read(fd, buf[have..].as_mut_ptr().cast(), buf.len() - have) };
        if n <= 0 {
            break;
        }
        have += n as usize;
        let mut consumed = 0;
        while let Some(nl) = buf[consumed..have].iter().position(|&b| b == b'\n') {
            let line = &buf[consumed..consumed + nl];
            consumed += nl + 1;
            let Some((start, end, inode)) = parse(line) else {
                continue;
            };
            match found {
                None if start == addr => found = Some((end, inode)),
                Some((prev_end, ino)) if start == prev_end && inode == ino => {
                    found = Some((end, ino))
                }
                Some((prev_end, _)) => {
                    result = Some(prev_end);
                    break 'read;
                }
                None => {}
            }
        }
        buf.copy_within(consumed..have, 0);
        have -= consumed;
        if have == buf.len() {
            break; // a line longer than the buffer: give up rather than misparse
        }
    }
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(fd) };
    result.or(found.map(|(end, _)| end))
}

/// The first mapping overlapping `[start, end)` whose pages an operation on a file can
/// replace without unmapping them (hole punch, truncation), described for
/// [`umm::Uncovered::mapping`]; `None` when every overlapping mapping is anonymous,
/// shared anonymous (`/dev/zero`), SysV shm (no descriptor to punch or truncate;
/// `shmdt` and `shmat(SHM_REMAP)` are hooked) or a kernel special mapping.
pub(crate) fn classify(start: usize, end: usize) -> Option<&'static str> {
    let text = std::fs::read("/proc/self/maps").ok()?;
    text.split(|&b| b == b'\n').find_map(|line| {
        let (lo, hi, inode) = parse(line)?;
        if hi <= start || lo >= end || inode == 0 {
            return None;
        }
        let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
        let shared = fields.nth(1)?.get(3) == Some(&b's');
        let path = fields.nth(3).unwrap_or(b"");
        if path.starts_with(b"/SYSV") || path.starts_with(b"/dev/zero") || path.starts_with(b"[") {
            return None;
        }
        Some(if shared {
            "a MAP_SHARED file or shmem mapping"
        } else {
            "a MAP_PRIVATE file mapping"
        })
    })
}

fn hex(s: &[u8]) -> Option<usize> {
    let mut v = 0usize;
    if s.is_empty() {
        return None;
    }
    for &c in s {
        let d = (c as char).to_digit(16)? as usize;
        v = v.checked_mul(16)?.checked_add(d)?;
    }
    Some(v)
}

/// `start-end perms offset dev inode [path]` → (start, end, inode).
fn parse(line: &[u8]) -> Option<(usize, usize, u64)> {
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let range = fields.next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    let inode_field = fields.nth(3)?;
    let inode = std::str::from_utf8(inode_field).ok()?.parse().ok()?;
    Some((start, end, inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        assert_eq!(
            parse(b"7f00a000-7f00c000 rw-s 00000000 00:01 98317    /SYSV00000000 (deleted)"),
            Some((0x7f00a000, 0x7f00c000, 98317))
        );
        assert_eq!(parse(b"garbage"), None);
    }

    fn map(flags: i32, fd: i32, len: usize) -> *mut libc::c_void {
        // SAFETY: a fresh mapping, unmapped by the caller.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        p
    }

    #[test]
    fn classifies_what_a_file_operation_can_change() {
        let len = 2 * umm::page_size();
        let anon = map(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, len);
        let shared_anon = map(libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, len);
        // SAFETY: a memfd of `len` bytes, closed below.
        let fd = unsafe { libc::memfd_create(c"classify".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: sizes our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
        let memfd = map(libc::MAP_SHARED, fd, len);
        let private_file = map(libc::MAP_PRIVATE, fd, len);
        let at = |p: *mut libc::c_void| classify(p as usize, p as usize + len);
        assert_eq!(at(anon), None);
        assert_eq!(at(shared_anon), None);
        assert_eq!(at(memfd), Some("a MAP_SHARED file or shmem mapping"));
        assert_eq!(at(private_file), Some("a MAP_PRIVATE file mapping"));
        // SAFETY: our mappings and descriptor.
        unsafe {
            for p in [anon, shared_anon, memfd, private_file] {
                libc::munmap(p, len);
            }
            libc::close(fd);
        }
    }

    #[test]
    fn finds_a_fresh_mapping() {
        let len = 3 * umm::page_size();
        // SAFETY: a fresh mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_eq!(extent_of(p as usize), Some(p as usize + len));
        // SAFETY: our mapping.
        unsafe { libc::munmap(p, len) };
    }
}
