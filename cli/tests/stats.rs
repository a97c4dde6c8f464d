//! `umm stats <pid>` reads a live process's counters: this test process exports them.

use std::process::Command;
use std::sync::Arc;

use serde_json::Value;
use umm::{testing::RecordingBackend, Manager, Range};

fn umm_stats(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_umm"))
        .arg("stats")
        .arg(std::process::id().to_string())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn reads_a_live_process_then_reports_when_it_stops_exporting() {
    let m = Arc::new(Manager::default());
    let nic = m.attach(RecordingBackend::new("nic")).unwrap();
    let buf = vec![0u8; 1 << 16];
    let range = Range::of_slice(&buf).unwrap();
    for _ in 0..4 {
        drop(m.pin(range, &[nic.id()]).unwrap());
    }
    m.invalidate(range);
    let export = m.export_stats().unwrap();

    let out = umm_stats(&["--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"], std::process::id());
    assert_eq!(v["invalidations"], 1);
    let d = &v["devices"][0];
    assert_eq!(
        (d["name"].as_str(), d["hits"].as_u64(), d["misses"].as_u64()),
        (Some("nic"), Some(3), Some(1))
    );

    let out = umm_stats(&[]);
    let table = String::from_utf8(out.stdout).unwrap();
    println!("{table}");
    assert!(table.contains("1 invalidations"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("nic (dev#0)") && l.contains("75.0")),
        "{table}"
    );

    let out = umm_stats(&["--watch", "0.05", "--count", "3"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("nic (dev#0)").count(), 3, "{text}");

    drop(export);
    let out = umm_stats(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("opt in") && err.contains("UMM_STATS_EXPORT=1"),
        "{err}"
    );
}
