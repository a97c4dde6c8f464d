//! `umm`: the command line of the umm memory-registration manager.
//!
//! * `umm doctor [--working-set SIZE] [--json]`: which notifier sources and device backends
//!   work on this machine, why the others do not and how to fix them. Exit status 0 when a
//!   notifier source and a backend work (and RLIMIT_MEMLOCK covers `--working-set`), 1
//!   otherwise.
//! * `umm stats <pid> [--json] [--watch SECS] [--count N]`: the live counters of a process
//!   that exports them (`Manager::export_stats`, or `UMM_STATS_EXPORT=1` with `umm-auto`).
//! * `umm bench [--quick]`: the comparison harness (`umm-benches`' `compare`) and its table.
//!
//! The notifier-source lines come from `umm_auto::probe`, the function the library's
//! automatic choice uses, so the tool and the library never disagree.

use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{json, Value};

// The interposition source is user-space only: it works wherever a program exports these
// hooks, so the doctor (a program like any other) exports them to answer for it. Without a
// sink installed they only pass calls through.
umm_interpose::export_hooks!();

mod doctor;
mod stats;

fn cli() -> Command {
    Command::new("umm")
        .about("umm: one memory-registration cache for RDMA, CUDA and Vulkan")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("doctor")
                .about("Which notifier sources and backends work here, and how to fix those that do not")
                .arg(
                    Arg::new("working-set")
                        .long("working-set")
                        .value_name("SIZE")
                        .help("Bytes the application will keep registered (e.g. 4G, 512M): checked against RLIMIT_MEMLOCK"),
                )
                .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).help("One JSON object on stdout")),
        )
        .subcommand(
            Command::new("stats")
                .about("The live counters of a process that exports them (UMM_STATS_EXPORT=1 or Manager::export_stats)")
                .arg(Arg::new("pid").required(true).value_parser(clap::value_parser!(u32)))
                .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).help("Print the raw JSON snapshot"))
                .arg(
                    Arg::new("watch")
                        .long("watch")
                        .value_name("SECS")
                        .num_args(0..=1)
                        .default_missing_value("1")
                        .value_parser(clap::value_parser!(f64))
                        .help("Refresh every SECS seconds (default 1) until interrupted or the process exits"),
                )
                .arg(
                    Arg::new("count")
                        .long("count")
                        .value_name("N")
                        .value_parser(clap::value_parser!(u64))
                        .help("With --watch: stop after N snapshots"),
                ),
        )
        .subcommand(
            Command::new("bench")
                .about("Run the comparison harness (umm vs a linear list, a locked BTreeMap, UCX's rcache) and print its table")
                .arg(Arg::new("quick").long("quick").action(ArgAction::SetTrue).help("10x fewer operations")),
        )
}

fn main() -> ExitCode {
    let m = cli().get_matches();
    match m.subcommand() {
        Some(("doctor", a)) => run_doctor(a),
        Some(("stats", a)) => stats::run(a),
        Some(("bench", a)) => run_bench(a.get_flag("quick")),
        _ => unreachable!("clap requires a subcommand"),
    }
}

fn run_doctor(a: &ArgMatches) -> ExitCode {
    let working_set = match a.get_one::<String>("working-set").map(|s| parse_size(s)) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            eprintln!("umm doctor: --working-set: {e}");
            return ExitCode::from(2);
        }
    };
    let report = doctor::Report::gather(working_set);
    let text = if a.get_flag("json") {
        format!("{:#}\n", report.to_json())
    } else {
        report.to_string()
    };
    if !emit(&text) {
        return ExitCode::FAILURE;
    }
    if report.usable() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `4096`, `64K`, `512M`, `4G`, `1T` (powers of 1024; an optional trailing `B`/`iB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches(['B', 'b']);
    let (num, mult) = match t.chars().last() {
        Some(c @ ('k' | 'K' | 'm' | 'M' | 'g' | 'G' | 't' | 'T')) => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => 40,
            };
            (&t[..t.len() - 1], 1u64 << shift)
        }
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 64K, 512M, 4G)"))
}

fn run_bench(quick: bool) -> ExitCode {
    // The harness is a binary of umm-benches (its measuring code lives in its main). From a
    // source tree: build and run it optimized with cargo (a debug build would measure
    // nothing useful); elsewhere: the `compare` installed next to this binary.
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("compare")))
        .filter(|p| p.is_file());
    let mut cmd = if std::path::Path::new(repo)
        .join("benches/Cargo.toml")
        .is_file()
    {
        let mut c = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        c.current_dir(repo).args([
            "run",
            "-q",
            "-p",
            "umm-benches",
            "--release",
            "--bin",
            "compare",
            "--",
        ]);
        c
    } else if let Some(p) = sibling {
        std::process::Command::new(p)
    } else {
        eprintln!("umm bench: neither the umm source tree nor an installed `compare` was found");
        return ExitCode::FAILURE;
    };
    if quick {
        cmd.arg("--quick");
    }
    match cmd.status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("umm bench: the harness failed ({s})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("umm bench: cannot run the harness ({e}); run `cargo run -p umm-benches --release --bin compare` from the repository");
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to stdout; `false` when stdout is gone (a closed pipe: `umm doctor | head`),
/// which ends the command quietly instead of panicking like `print!`.
pub fn emit(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .is_ok()
}

/// A `Value` from a count that may be absent.
pub fn opt(v: Option<u64>) -> Value {
    v.map_or(Value::Null, |v| json!(v))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
