//! `umm stats <pid>`: reads the snapshot a process serves with `Manager::export_stats`.

use std::process::ExitCode;
use std::time::Duration;

use clap::ArgMatches;
use serde_json::Value;

/// Runs the subcommand.
pub fn run(a: &ArgMatches) -> ExitCode {
    let pid = *a.get_one::<u32>("pid").expect("required");
    let json = a.get_flag("json");
    let watch = a.get_one::<f64>("watch").copied();
    let count = a.get_one::<u64>("count").copied();
    let mut shown = 0u64;
    loop {
        let snapshot = match umm::export::read_exported_stats(pid) {
            Ok(s) => s,
            Err(e) => {
                if shown > 0 {
                    // The process exited (or stopped exporting) while watched.
                    eprintln!("umm stats: process {pid} stopped exporting ({e})");
                    return ExitCode::SUCCESS;
                }
                eprintln!(
                    "umm stats: cannot read the counters of process {pid} ({e}): is it running, \
                     and did it opt in (UMM_STATS_EXPORT=1 with umm-auto, or Manager::export_stats)?"
                );
                return ExitCode::FAILURE;
            }
        };
        let parsed: Value = match serde_json::from_str(&snapshot) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("umm stats: process {pid} sent an unreadable snapshot ({e})");
                return ExitCode::FAILURE;
            }
        };
        let mut text = String::new();
        if json {
            text = format!("{}\n", snapshot.trim_end());
        } else {
            // Clear the screen (ANSI) only when refreshing on a terminal.
            if watch.is_some() && shown > 0 && std::io::IsTerminal::is_terminal(&std::io::stdout())
            {
                text.push_str("\x1b[H\x1b[2J");
            }
            text.push_str(&table(&parsed));
        }
        if !crate::emit(&text) {
            return ExitCode::SUCCESS;
        }
        shown += 1;
        match watch {
            Some(secs) if count.is_none_or(|c| shown < c) => {
                std::thread::sleep(Duration::from_secs_f64(secs.max(0.05)))
            }
            _ => return ExitCode::SUCCESS,
        }
    }
}

fn num(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// The snapshot as a table, like `umm::Stats`'s `Display`.
pub fn table(v: &Value) -> String {
    let mut out = format!(
        "process {}: {} invalidations, {} invalidate-all, {} partial hits\n",
        num(v, "pid"),
        num(v, "invalidations"),
        num(v, "invalidate_all"),
        num(v, "partial_hits")
    );
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        out += &format!("  ({e})\n");
    }
    let devices: Vec<&Value> = v
        .get("devices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let label = |d: &Value| {
        format!(
            "{} (dev#{})",
            d.get("name").and_then(Value::as_str).unwrap_or("?"),
            num(d, "id")
        )
    };
    let w = devices
        .iter()
        .map(|d| label(d).len())
        .max()
        .unwrap_or(0)
        .max(20);
    out += &format!(
        "  {:<w$} {:>10} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7} {:>8} {:>14}\n",
        "device",
        "hits",
        "misses",
        "hit %",
        "regs",
        "deregs",
        "inval",
        "evict",
        "cached",
        "registered"
    );
    for d in v
        .get("devices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (h, m) = (num(d, "hits"), num(d, "misses"));
        let rate = if h + m == 0 {
            "-".to_string()
        } else {
            format!("{:.1}", 100.0 * h as f64 / (h + m) as f64)
        };
        out += &format!(
            "  {:<w$} {:>10} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7} {:>8} {:>12} B\n",
            label(d),
            h,
            m,
            rate,
            num(d, "registrations"),
            num(d, "deregistrations"),
            num(d, "invalidated_entries"),
            num(d, "evictions"),
            num(d, "cached_entries"),
            num(d, "registered_bytes"),
        );
    }
    out
}
