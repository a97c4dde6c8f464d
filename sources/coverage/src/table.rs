//! The expected matrix and its markdown rendering.

use std::fmt::Write;
use std::time::Duration;

use crate::cell::Delays;
use crate::harness::Bins;
use crate::scenario::{Verdict, SCENARIOS};
use crate::{columns, ColumnSpec, CoverageError};

/// What a cell must show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Reported.
    Caught,
    /// Not reported: the source accepted the memory and stays silent (a stale
    /// registration).
    Missed,
    /// The source refuses to watch this kind of memory: the pin fails with a typed error,
    /// never silently stale.
    Refused,
    /// Caught or refused, depending on the kernel (both safe).
    Safe,
}

impl Expect {
    /// The word the README table shows for it.
    pub fn word(self) -> &'static str {
        match self {
            Expect::Caught => "caught",
            Expect::Missed => "**not caught**",
            Expect::Refused => "refused",
            Expect::Safe => "caught or refused (kernel)",
        }
    }

    /// What a rendered cell (`caught, ...`, `refused (...)`, `**not caught**`) shows.
    pub fn of_cell(cell: &str) -> Option<Expect> {
        if cell.starts_with("caught") {
            Some(Expect::Caught)
        } else if cell.starts_with("refused") {
            Some(Expect::Refused)
        } else if cell.starts_with("**not caught**") {
            Some(Expect::Missed)
        } else {
            None
        }
    }

    /// Whether a rendered cell showing `got` is what this expects.
    pub fn accepts(self, got: Expect) -> bool {
        self == got || (self == Expect::Safe && matches!(got, Expect::Caught | Expect::Refused))
    }

    /// Whether `v` is what this expects.
    pub fn matches(self, v: &Verdict) -> bool {
        matches!(
            (self, v),
            (Expect::Caught, Verdict::Caught { .. })
                | (Expect::Missed, Verdict::Missed)
                | (Expect::Refused, Verdict::Unwatchable(_))
                | (
                    Expect::Safe,
                    Verdict::Caught { .. } | Verdict::Unwatchable(_)
                )
        )
    }
}

use Expect::{Caught as C, Refused as R, Safe as S};

/// The expected matrix: (scenario, [userfaultfd, in-process hooks, LD_PRELOAD hooks,
/// kernel module]). A change in what a source catches fails `tests/matrix.rs` (host
/// columns) and `umm-coverage-scenario check` (every available column, e.g. in the guest).
/// "refused" is safe (the pin fails with a typed error); "not caught" is a stale
/// registration the source accepted silently.
pub const EXPECTED: &[(&str, [Expect; 4])] = &[
    ("munmap_whole", [C, C, C, C]),
    ("munmap_part", [C, C, C, C]),
    ("mremap_move", [C, C, C, C]),
    ("mremap_shrink", [C, C, C, C]),
    ("map_fixed_over", [C, C, C, C]),
    ("madv_dontneed", [C, C, C, C]),
    // The hooked free() reports the block before glibc's internal __munmap.
    ("free_large_malloc", [C, C, C, C]),
    ("brk_shrink", [C, C, C, C]),
    // SysV shm cannot be registered with userfaultfd (EINVAL).
    ("shmdt", [R, C, C, C]),
    // Nothing is unmapped: the parent's pages are replaced by copies on its next write.
    // The MMU notifier reports the fork itself; userfaultfd and the hooks learn of it
    // from a pthread_atfork parent handler, before fork() returns in the parent.
    ("fork_cow_break", [C, C, C, C]),
    // A raw system call (a static binary) bypasses every symbol: strict interposition
    // refuses every pin until the application declares libc_only (this row runs
    // undeclared; every other row of the interposition columns runs declared).
    ("raw_syscall_munmap", [C, R, R, C]),
    ("munmap_other_thread", [C, C, C, C]),
    // Caught on the host's kernel (6.18); the guest's 6.1 refuses the call on memory
    // registered with userfaultfd (EINVAL) or under an MMU interval notifier (EAGAIN).
    ("mremap_dontunmap", [S, C, C, S]),
    ("madv_free", [C, C, C, C]),
    ("madv_remove", [C, C, C, C]),
    // The hooked free() reports the block; glibc's trim madvises it internally later.
    ("malloc_trim", [C, C, C, C]),
    ("shmat_remap", [R, C, C, C]),
    // Neither userfaultfd (no event for a hole punch or truncation) nor the hooks see it:
    // both refuse file and shmem mappings in strict mode.
    ("punch_hole_shmem", [R, R, R, C]),
    // A regular file's MAP_SHARED mapping cannot be registered with userfaultfd.
    ("punch_hole_ext4", [R, R, R, C]),
    ("ftruncate_shrink", [R, R, R, C]),
];

/// Column ids of [`EXPECTED`]'s entries, in order.
pub const EXPECTED_COLUMNS: [&str; 4] = ["uffd", "interpose", "preload", "kmod"];

/// The expectation of one cell, if the host has one.
pub fn expected(scenario: &str, column: &str) -> Option<Expect> {
    let i = EXPECTED_COLUMNS.iter().position(|c| *c == column)?;
    EXPECTED
        .iter()
        .find(|(s, _)| *s == scenario)
        .map(|(_, e)| e[i])
}

/// A cell as run by the harness.
pub enum Cell {
    /// The child ran it.
    Ran(Verdict),
    /// The column cannot run here (reason).
    Skipped(String),
    /// The column is not run on this machine.
    NotRun,
}

/// What an unavailable column's cells say.
pub const NOT_RUN: &str = "not run on the host";

/// Runs one cell in a child; parses its line.
pub fn run_cell(
    bins: &Bins,
    spec: &ColumnSpec,
    scenario: &str,
    limit: Duration,
) -> Result<Cell, CoverageError> {
    if !(spec.available)() {
        return Ok(Cell::NotRun);
    }
    let out = bins.run(spec, &["cell", spec.id, scenario], limit)?;
    let line = out.lines().last().unwrap_or("");
    if let Some(reason) = line.strip_prefix("SKIP ") {
        return Ok(Cell::Skipped(reason.to_string()));
    }
    Verdict::parse(line)
        .map(Cell::Ran)
        .ok_or_else(|| CoverageError::Child {
            what: format!("cell {} {scenario}", spec.id),
            status: "unparsable".into(),
            output: out.clone(),
        })
}

/// Runs the delay measurement of one column in a child.
pub fn run_delays(
    bins: &Bins,
    spec: &ColumnSpec,
    n: usize,
    limit: Duration,
) -> Result<Option<Delays>, CoverageError> {
    if !(spec.available)() {
        return Ok(None);
    }
    let out = bins.run(spec, &["delays", spec.id, &n.to_string()], limit)?;
    Ok(out.lines().last().and_then(Delays::parse))
}

fn us(ns: u64) -> String {
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 10_000 {
        format!("{:.1} µs", ns as f64 / 1000.0)
    } else {
        format!("{} µs", ns / 1000)
    }
}

/// The reason of a refusal, short: the operation a strict source names, else the OS error.
fn refusal(why: &str) -> String {
    if let Some(i) = why.find("cannot see ") {
        return format!("cannot see {}", &why[i + "cannot see ".len()..]);
    }
    why.rsplit(": ").next().unwrap_or(why).to_string()
}

/// Renders the matrix.
pub fn markdown(
    cells: &[(&str, Vec<Cell>)],
    delays: &[Option<Delays>],
    specs: &[&ColumnSpec],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Coverage matrix of the notifier sources\n");
    let _ = writeln!(
        s,
        "Generated by `target/debug/umm-coverage-scenario table > docs/coverage-matrix.md` \
         (crate `umm-coverage`); the caught / refused / not caught pattern is asserted by \
         `cargo test -p umm-coverage`. Each cell runs in its own child process: the scenario \
         watches a 64 KiB range (4 MiB for `free()`) through the source, runs the operation, \
         and reports whether the source reported an overlapping range, with the delay from \
         the call to the first report. \"refused\" means the source would not watch that \
         memory (a pin of it fails with a typed error, e.g. `Error::Uncovered` naming the \
         operation the source cannot see): safe. \"**not caught**\" means the source \
         accepted the memory and stayed silent: a stale registration. \"by return\" means the source had recorded the event \
         before the call returned (for userfaultfd: its generation counter had moved, which \
         is what a cache hit checks). The interposition columns run in strict mode with the \
         application's `libc_only` declaration (`UMM_INTERPOSE_LIBC_ONLY=1`: no raw memory \
         system calls in the process), except the raw-syscall row, which runs without it: \
         undeclared, strict interposition refuses every pin, since a raw `munmap` it cannot \
         see could make any registration stale. The fork row is caught by the kernel \
         module at the fork and by userfaultfd and interposition through a \
         `pthread_atfork` parent handler (everything is invalidated before `fork()` \
         returns in the parent).\n"
    );
    let _ = write!(s, "| scenario |");
    for c in specs {
        let _ = write!(s, " {} |", c.title);
    }
    let _ = write!(s, "\n|---|");
    for _ in specs {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    for (scen, row) in cells {
        let title = SCENARIOS
            .iter()
            .find(|x| x.id == *scen)
            .map_or(*scen, |x| x.title);
        let _ = write!(s, "| {title} |");
        for c in row {
            let text = match c {
                Cell::Ran(Verdict::Caught {
                    delay_ns,
                    by_return,
                    ..
                }) => format!(
                    "caught, {}{}",
                    us(*delay_ns),
                    if *by_return { ", by return" } else { "" }
                ),
                Cell::Ran(Verdict::Missed) => "**not caught**".into(),
                Cell::Ran(Verdict::Unwatchable(why)) => {
                    format!("refused ({})", refusal(why))
                }
                Cell::Skipped(why) => format!("skipped ({why})"),
                Cell::NotRun => NOT_RUN.into(),
            };
            let _ = write!(s, " {text} |");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\n## Event delay per source (1000 munmaps of 64 KiB, one source at a time)\n\n\
         | source | delay median | delay p99 | munmap median | munmap p99 | recorded by return |\n\
         |---|---|---|---|---|---|"
    );
    for (c, d) in specs.iter().zip(delays) {
        match d {
            Some(d) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {}/{} |",
                    c.title,
                    us(d.p50_delay),
                    us(d.p99_delay),
                    us(d.p50_call),
                    us(d.p99_call),
                    d.by_return,
                    d.n
                );
            }
            None => {
                let _ = writeln!(s, "| {} | {NOT_RUN} | | | | |", c.title);
            }
        }
    }
    let _ = writeln!(
        s,
        "\nThe delay is measured from just before the call to the probe's timestamp: for \
         the hooks it is the time to reach the sink before the real call runs; for \
         userfaultfd it is the time until the reader thread has read the event (the kernel \
         blocks the caller until then; the generation is bumped before the read, so the \
         event is always recorded by return). Numbers from the 2-vCPU build VM, a noisy \
         shared machine: orders of magnitude, not benchmarks.\n\n\
         The **manual source** is `Manager::invalidate(range)`: an application that knows \
         it is about to unmap or reuse memory (its own allocator, a raw syscall, a static \
         binary) calls it itself. The **kernel module** column (`kmod-notifier`) runs only in \
         the qemu guest: `bash sources/coverage/guest-matrix.sh` builds the module, boots the \
         guest and runs the same scenario binaries there (section below, when generated)."
    );
    s
}

/// Runs every cell of every available matrix column in children and compares it with
/// [`EXPECTED`]; returns the mismatches (empty: all as expected) and the cells run.
pub fn check(bins: &Bins, limit: Duration) -> Result<(Vec<String>, usize), String> {
    let mut wrong = Vec::new();
    let mut ran = 0;
    for col in EXPECTED_COLUMNS {
        let spec = columns()
            .iter()
            .find(|c| c.id == col)
            .expect("expected columns exist");
        for scen in SCENARIOS {
            let expect = expected(scen.id, col).expect("every cell has an expectation");
            match run_cell(bins, spec, scen.id, limit) {
                Ok(Cell::Ran(v)) => {
                    ran += 1;
                    if !expect.matches(&v) {
                        wrong.push(format!(
                            "{col} / {}: expected {expect:?}, got {v:?}",
                            scen.id
                        ));
                    }
                }
                Ok(Cell::Skipped(why)) => eprintln!("SKIP {col} / {}: {why}", scen.id),
                Ok(Cell::NotRun) => {}
                Err(e) => wrong.push(format!("{col} / {}: {e}", scen.id)),
            }
        }
    }
    Ok((wrong, ran))
}

/// Appends the matrix a guest run produced (`guest-matrix.sh`) to the host's markdown.
pub fn with_guest(mut host: String, guest_md: &str) -> String {
    let body = guest_md
        .find("| scenario |")
        .map_or(guest_md, |i| &guest_md[i..]);
    let body = body
        .find("\nThe delay is measured")
        .map_or(body, |i| &body[..i]);
    let _ = write!(
        host,
        "\n## In the qemu guest: Debian 6.1 kernel, TCG, kernel module loaded\n\n\
         Generated by `bash sources/coverage/guest-matrix.sh` (release build; every cell is \
         also asserted there by `umm-coverage-scenario check`). TCG emulation makes every \
         number here 10-100x slower than native. For the kernel module the probe is called \
         when the cell drains the source after the call returned, so its delay includes the \
         whole call; \"by return\" means its generation page had moved, which is what every \
         cache hit checks. The ext4 hole-punch row uses an ext4 filesystem on a loop device \
         over a file in the guest's /tmp (the guest's root is the host's, read-only over \
         9p); on the host it uses the system temporary directory, on the ext4 root disk.\n\n{}\n",
        body.trim_end()
    );
    host
}

/// Runs every matrix cell and delay measurement in children and renders the markdown.
pub fn generate(bins: &Bins, limit: Duration) -> Result<String, String> {
    let specs: Vec<&ColumnSpec> = columns().iter().filter(|c| c.in_matrix).collect();
    let mut cells = Vec::new();
    for scen in SCENARIOS {
        let mut row = Vec::new();
        for spec in &specs {
            row.push(run_cell(bins, spec, scen.id, limit).map_err(|e| e.to_string())?);
        }
        cells.push((scen.id, row));
    }
    let mut delays = Vec::new();
    for spec in &specs {
        delays.push(run_delays(bins, spec, 1000, limit).map_err(|e| e.to_string())?);
    }
    Ok(markdown(&cells, &delays, &specs))
}
