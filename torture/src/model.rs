//! The driver's model of a slot: what is mapped at each page and which tag it holds.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Anon,
    Memfd { file: u32, off: u32 },
    Shm { base: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Page {
    Unmapped,
    Mapped { kind: Kind, gen: u64 },
}

pub(crate) struct Slot {
    pub(crate) index: usize,
    pub(crate) base: usize,
    pub(crate) pages: [Page; SLOT_PAGES],
    pub(crate) files: Vec<(u32, OwnedFd)>,
    pub(crate) next_file: u32,
    pub(crate) trace: VecDeque<String>,
}

impl Slot {
    pub(crate) fn addr(&self, i: usize) -> usize {
        self.base + i * umm::page_size()
    }

    pub(crate) fn range(&self, a: usize, b: usize) -> Range {
        Range::new(self.addr(a), (b - a) * umm::page_size()).expect("slot ranges are valid")
    }

    pub(crate) fn kind(&self, i: usize) -> Option<Kind> {
        match self.pages[i] {
            Page::Mapped { kind, .. } => Some(kind),
            Page::Unmapped => None,
        }
    }

    pub(crate) fn set_unmapped(&mut self, a: usize, b: usize) {
        for p in &mut self.pages[a..b] {
            *p = Page::Unmapped;
        }
    }

    /// Closes the memfds no page maps any more (the mappings keep their files alive).
    pub(crate) fn forget_files(&mut self) {
        let pages = self.pages;
        self.files.retain(|(id, _)| {
            pages.iter().any(
                |p| matches!(p, Page::Mapped { kind: Kind::Memfd { file, .. }, .. } if file == id),
            )
        });
    }

    pub(crate) fn fd(&self, file: u32) -> Option<i32> {
        self.files
            .iter()
            .find(|(id, _)| *id == file)
            .map(|(_, fd)| fd.as_raw_fd())
    }

    /// A random span `[a, b)` of 1..=MAX_RUN pages.
    pub(crate) fn span(&self, rng: &mut Rng) -> (usize, usize) {
        let a = rng.below(SLOT_PAGES);
        let n = 1 + rng.below(MAX_RUN.min(SLOT_PAGES - a));
        (a, a + n)
    }

    /// A random run of consecutive pages accepted by `ok` (which sees the page before it
    /// too, to require continuity), at most `max` long.
    pub(crate) fn run(
        &self,
        rng: &mut Rng,
        max: usize,
        first: impl Fn(&Kind) -> bool,
        next: impl Fn(&Kind, &Kind) -> bool,
    ) -> Option<(usize, usize)> {
        let starts: Vec<usize> = (0..SLOT_PAGES)
            .filter(|&i| self.kind(i).is_some_and(|k| first(&k)))
            .collect();
        if starts.is_empty() {
            return None;
        }
        let a = starts[rng.below(starts.len())];
        let want = 1 + rng.below(max);
        let mut b = a + 1;
        while b < SLOT_PAGES && b - a < want {
            match (self.kind(b - 1), self.kind(b)) {
                (Some(p), Some(k)) if next(&p, &k) => b += 1,
                _ => break,
            }
        }
        Some((a, b))
    }

    /// A run of pages that `mremap` can move as one piece of one file/anonymous memory.
    pub(crate) fn movable_run(&self, rng: &mut Rng, anon_only: bool) -> Option<(usize, usize)> {
        self.run(
            rng,
            MAX_RUN,
            |k| matches!(k, Kind::Anon) || (!anon_only && matches!(k, Kind::Memfd { .. })),
            |p, k| match (p, k) {
                (Kind::Anon, Kind::Anon) => true,
                (Kind::Memfd { file: f, off: o }, Kind::Memfd { file: g, off: q }) => {
                    f == g && o + 1 == *q
                }
                _ => false,
            },
        )
    }

    /// A target for moving `n` pages from `a` that does not overlap the source.
    pub(crate) fn target(&self, rng: &mut Rng, a: usize, n: usize) -> Option<usize> {
        let c: Vec<usize> = (0..=SLOT_PAGES - n)
            .filter(|&t| t + n <= a || t >= a + n)
            .collect();
        (!c.is_empty()).then(|| c[rng.below(c.len())])
    }
}
