//! Address ranges of the process's virtual memory.

use crate::error::Error;

/// `[start, start + len)` of this process's virtual address space.
///
/// A `Range` is never empty and never wraps past the end of the address space:
/// both are checked by [`Range::new`], the only constructor that takes raw numbers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Range {
    start: usize,
    len: usize,
}

impl Range {
    /// A checked range. Fails on a zero length ([`Error::EmptyRange`]) or when
    /// `start + len` overflows ([`Error::RangeOverflow`]).
    pub const fn new(start: usize, len: usize) -> Result<Range, Error> {
        if len == 0 {
            return Err(Error::EmptyRange { start });
        }
        match start.checked_add(len) {
            Some(_) => Ok(Range { start, len }),
            None => Err(Error::RangeOverflow { start, len }),
        }
    }

    /// The range covering `[start, end)`; fails like [`Range::new`] when `end <= start`.
    pub fn from_bounds(start: usize, end: usize) -> Result<Range, Error> {
        if end <= start {
            return Err(Error::EmptyRange { start });
        }
        Range::new(start, end - start)
    }

    /// The range of a slice's bytes.
    pub fn of_slice<T>(slice: &[T]) -> Result<Range, Error> {
        Range::new(slice.as_ptr() as usize, std::mem::size_of_val(slice))
    }

    /// First address.
    pub const fn start(&self) -> usize {
        self.start
    }

    /// Length in bytes (never 0).
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: kept for API symmetry with collections (clippy's `len_without_is_empty`).
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// One past the last address. Cannot overflow: checked at construction.
    pub const fn end(&self) -> usize {
        self.start + self.len
    }

    /// Whether `other` lies entirely inside `self`.
    pub const fn contains(&self, other: &Range) -> bool {
        self.start <= other.start && other.end() <= self.end()
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end() && other.start < self.end()
    }

    /// Whether the two ranges overlap or touch end to start.
    pub const fn overlaps_or_touches(&self, other: &Range) -> bool {
        self.start <= other.end() && other.start <= self.end()
    }

    /// The smallest range covering both.
    pub fn union(&self, other: &Range) -> Range {
        let start = self.start.min(other.start);
        let end = self.end().max(other.end());
        Range {
            start,
            len: end - start,
        }
    }

    /// The bytes both ranges cover, if any.
    pub fn intersection(&self, other: &Range) -> Option<Range> {
        let start = self.start.max(other.start);
        let end = self.end().min(other.end());
        (start < end).then(|| Range {
            start,
            len: end - start,
        })
    }

    /// This range rounded out to multiples of `align` (a power of two).
    ///
    /// Fails with [`Error::RangeOverflow`] when the rounded end does not fit in the
    /// address space.
    pub fn align_out(&self, align: usize) -> Result<Range, Error> {
        debug_assert!(align.is_power_of_two());
        let start = self.start & !(align - 1);
        let end = self
            .end()
            .checked_add(align - 1)
            .ok_or(Error::RangeOverflow {
                start: self.start,
                len: self.len,
            })?
            & !(align - 1);
        Range::from_bounds(start, end)
    }

    /// Whether start and length are multiples of `align` (a power of two).
    pub const fn is_aligned(&self, align: usize) -> bool {
        (self.start | self.len) & (align - 1) == 0
    }
}

impl std::fmt::Debug for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end())
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) ({} bytes)",
            self.start,
            self.end(),
            self.len
        )
    }
}

/// The size of a base page of this process, read once.
pub fn page_size() -> usize {
    use std::sync::OnceLock;
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v > 0 {
            v as usize
        } else {
            4096
        }
    })
}

/// A fresh private anonymous read-write mapping of `len` bytes (zero-filled,
/// page-aligned), owned by the caller, who unmaps it; `None` if the kernel refuses.
pub(crate) fn map_anonymous(len: usize) -> Option<std::ptr::NonNull<libc::c_void>> {
    // SAFETY: a new mapping at an address the kernel picks: it touches no existing memory.
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
        None
    } else {
        std::ptr::NonNull::new(p)
    }
}

/// Whether every page of `range` is mapped: `msync(MS_ASYNC)` fails with `ENOMEM` on
/// unmapped pages and otherwise does nothing for anonymous memory.
pub(crate) fn is_mapped(range: &Range) -> bool {
    // SAFETY: msync only inspects the mappings of the range; MS_ASYNC schedules nothing
    // that touches our memory.
    unsafe {
        libc::msync(
            range.start() as *mut libc::c_void,
            range.len(),
            libc::MS_ASYNC,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_overflow() {
        assert!(matches!(
            Range::new(0x1000, 0),
            Err(Error::EmptyRange { start: 0x1000 })
        ));
        assert!(matches!(
            Range::new(usize::MAX, 2),
            Err(Error::RangeOverflow { .. })
        ));
        assert!(matches!(
            Range::new(usize::MAX - 100, 50).unwrap().align_out(4096),
            Err(Error::RangeOverflow { .. })
        ));
    }

    #[test]
    fn geometry() {
        let a = Range::new(0x1000, 0x2000).unwrap();
        let b = Range::new(0x2800, 0x1000).unwrap();
        let c = Range::new(0x3000, 0x10).unwrap();
        assert!(a.overlaps(&b) && !a.overlaps(&c) && a.overlaps_or_touches(&c));
        assert_eq!(a.union(&b), Range::from_bounds(0x1000, 0x3800).unwrap());
        assert_eq!(
            a.intersection(&b),
            Some(Range::from_bounds(0x2800, 0x3000).unwrap())
        );
        assert_eq!(a.intersection(&c), None);
        assert_eq!(
            Range::new(0x1001, 2).unwrap().align_out(0x1000).unwrap(),
            Range::new(0x1000, 0x1000).unwrap()
        );
        assert!(a.contains(&Range::new(0x1000, 0x2000).unwrap()));
        assert!(!a.contains(&b));
    }
}
