//! The coverage matrix, asserted: every (scenario, source) cell runs in a child process
//! under a watchdog (a hang fails the cell), and must show what `table::EXPECTED` says.
//! Also per source: the seed scenario and the deadlock checks through a manager, and the
//! checked-in `docs/coverage-matrix.md` must agree with the expected pattern.

use std::path::PathBuf;
use std::time::Duration;

use umm_coverage::harness::{find_preload, Bins};
use umm_coverage::scenario::{Verdict, SCENARIOS};
use umm_coverage::table::{self, Cell, Expect, EXPECTED_COLUMNS};
use umm_coverage::{columns, ColumnSpec};

const LIMIT: Duration = Duration::from_secs(60);

fn bins() -> Bins {
    let plain = PathBuf::from(env!("CARGO_BIN_EXE_umm-coverage-scenario"));
    let dir = plain.parent().unwrap().to_path_buf();
    Bins {
        plain,
        inproc: PathBuf::from(env!("CARGO_BIN_EXE_umm-coverage-scenario-inproc")),
        preload: find_preload(&dir),
    }
}

fn spec(id: &str) -> &'static ColumnSpec {
    columns().iter().find(|c| c.id == id).unwrap()
}

#[test]
fn matrix_matches_the_expected_one() {
    let (wrong, ran) = table::check(&bins(), LIMIT).unwrap();
    if !(spec("kmod").available)() {
        eprintln!(
            "kmod column: not run on the host (/dev/umm_notify absent; runs in the qemu guest)"
        );
    }
    eprintln!("{ran} cells ran");
    assert!(
        wrong.is_empty(),
        "coverage regressions:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn stacked_interposition_layers_catch_and_do_not_hang() {
    let bins = bins();
    for scen in ["munmap_whole", "madv_dontneed", "mremap_move"] {
        match table::run_cell(&bins, spec("stacked"), scen, LIMIT).unwrap() {
            Cell::Ran(v) => assert!(v.is_caught(), "{scen}: {v:?}"),
            Cell::Skipped(why) => eprintln!("SKIP stacked / {scen}: {why}"),
            Cell::NotRun => unreachable!(),
        }
    }
}

fn run_all(what: &str, ok_prefix: &str) {
    let bins = bins();
    let mut failed = Vec::new();
    for id in ["uffd", "interpose", "preload", "stacked"] {
        match bins.run(spec(id), &[what, id], LIMIT) {
            Ok(out) if out.lines().last().is_some_and(|l| l.starts_with(ok_prefix)) => {
                eprintln!("{id}: {}", out.trim());
            }
            Ok(out) => failed.push(format!("{id}: {out}")),
            // No usable userfaultfd on this kernel: the column says so and is skipped.
            Err(e) if id == "uffd" && e.to_string().contains("column uffd unavailable") => {
                eprintln!("SKIP {what} {id}: {e}");
            }
            Err(e) => failed.push(format!("{id}: {e}")),
        }
    }
    assert!(failed.is_empty(), "{what} failed:\n{}", failed.join("\n"));
}

#[test]
fn seed_scenario_second_pin_is_a_fresh_registration_per_source() {
    run_all("seed", "SEED ok");
}

#[test]
fn no_deadlock_with_unmapping_backend_and_malloc_storms_per_source() {
    run_all("stress", "STRESS ok");
}

/// The cells of a markdown table row, trimmed.
fn table_cells(row: &str) -> Vec<&str> {
    row.split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

#[test]
fn readme_table_agrees_with_the_expected_matrix() {
    let readme = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md exists");
    for scen in SCENARIOS {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {} |", scen.title)))
            .unwrap_or_else(|| panic!("no row for {} in README.md", scen.title));
        let cells = table_cells(row);
        for (i, col) in EXPECTED_COLUMNS.iter().enumerate() {
            let want = table::expected(scen.id, col).unwrap();
            assert_eq!(
                cells[i + 1],
                want.word(),
                "README.md: {}: column {col}",
                scen.title
            );
        }
    }
}

#[test]
fn generated_table_agrees_with_the_expected_matrix() {
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/coverage-matrix.md");
    let text = std::fs::read_to_string(&doc).expect("docs/coverage-matrix.md exists");
    for scen in SCENARIOS {
        let mut rows = text
            .lines()
            .filter(|l| l.starts_with(&format!("| {} |", scen.title)));
        let row = rows
            .next()
            .unwrap_or_else(|| panic!("no row for {} in {}", scen.title, doc.display()));
        // The guest section (if generated): every column, the kernel module's included.
        if let Some(guest) = rows.next() {
            let cells = table_cells(guest);
            for (i, col) in EXPECTED_COLUMNS.iter().enumerate() {
                let want = table::expected(scen.id, col).unwrap();
                assert!(
                    Expect::of_cell(cells[i + 1]).is_some_and(|got| want.accepts(got)),
                    "guest: {}: column {col}: expected {want:?}, got {}",
                    scen.title,
                    cells[i + 1]
                );
            }
        }
        let cells = table_cells(row);
        for (i, col) in EXPECTED_COLUMNS.iter().enumerate() {
            if *col == "kmod" {
                assert_eq!(cells[i + 1], table::NOT_RUN, "{}", scen.title);
                continue;
            }
            let want = table::expected(scen.id, col).unwrap();
            let cell = cells[i + 1];
            assert!(
                Expect::of_cell(cell).is_some_and(|got| want.accepts(got)),
                "{}: column {col}: expected {want:?}, got {cell}",
                scen.title
            );
        }
    }
}

#[test]
fn verdict_lines_round_trip() {
    for v in [
        Verdict::Caught {
            delay_ns: 5,
            call_ns: 7,
            by_return: true,
        },
        Verdict::Missed,
        Verdict::Unwatchable("EINVAL here".into()),
    ] {
        assert_eq!(Verdict::parse(&v.to_line()), Some(v));
    }
}
