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
    let bins = bins();
    let mut wrong = Vec::new();
    for col in EXPECTED_COLUMNS {
        let spec = spec(col);
        for scen in SCENARIOS {
            let expect = table::expected(scen.id, col).expect("every cell has an expectation");
            match table::run_cell(&bins, spec, scen.id, LIMIT) {
                Ok(Cell::Ran(v)) => {
                    if !expect.matches(&v) {
                        wrong.push(format!(
                            "{col} / {}: expected {expect:?}, got {v:?}",
                            scen.id
                        ));
                    }
                }
                Ok(Cell::Skipped(why)) => {
                    eprintln!("SKIP {col} / {}: {why}", scen.id);
                }
                Ok(Cell::NotRun) => unreachable!("host columns"),
                Err(e) => wrong.push(format!("{col} / {}: {e}", scen.id)),
            }
        }
    }
    let kmod = spec("kmod");
    assert!(!kmod.on_host);
    eprintln!("kmod column: not run on the host (runs in the qemu guest)");
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
            Err(e) if id == "uffd" && e.to_string().contains("userfaultfd is not available") => {
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

#[test]
fn generated_table_agrees_with_the_expected_matrix() {
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/coverage-matrix.md");
    let text = std::fs::read_to_string(&doc).expect("docs/coverage-matrix.md exists");
    for scen in SCENARIOS {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {} |", scen.title)))
            .unwrap_or_else(|| panic!("no row for {} in {}", scen.title, doc.display()));
        let cells: Vec<&str> = row
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        for (i, col) in EXPECTED_COLUMNS.iter().enumerate() {
            let want = table::expected(scen.id, col).unwrap();
            let cell = cells[i + 1];
            let caught = cell.starts_with("caught");
            assert_eq!(
                caught,
                want == Expect::Caught,
                "{}: column {col}: {cell}",
                scen.title
            );
        }
        assert_eq!(cells[4], "not run on the host", "{}", scen.title);
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
