//! Allocation-free lookup of a mapping's extent in `/proc/self/maps` (for `shmdt`, which
//! takes only the address).

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
