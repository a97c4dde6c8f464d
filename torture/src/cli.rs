//! The command line shared by `umm-torture` (in-process interposition hooks) and
//! `umm-torture-preload` (no hooks of its own: run it with
//! `LD_PRELOAD=libumm_preload.so` to test the preloaded hooks alone).
//!
//! ```text
//! umm-torture [--source manual|uffd|interpose|kmod|combined|none|all[,...]] [--seed S]
//!             [--threads N] [--ops N] [--duration SECS] [--slots N] [--heap-slots N]
//!             [--op-set all|NAME,...] [--plant drop-every=N] [--min-ops N] [--rdma] [--vulkan]
//!             [--require] [--expect-failure]
//! ```
//!
//! Exit status: 0 when every run is green (with `--expect-failure`: when every run found a
//! failure), 1 otherwise, 2 on bad arguments. A source that is not available here prints
//! `SKIP: <reason>` and does not count, unless `--require` is given.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{run, OpKind, Options, RunError, SourceKind};

fn usage() -> ExitCode {
    eprintln!(
        "usage: umm-torture [--source LIST] [--seed S] [--threads N] [--ops N] [--duration SECS] \
         [--slots N] [--heap-slots N] [--op-set all|NAME,...] [--plant drop-every=N] [--min-ops N] \
         [--rdma] [--vulkan] [--require] [--expect-failure]\n\
         sources: manual uffd interpose kmod combined none all\n\
         operations: {}",
        OpKind::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(" ")
    );
    ExitCode::from(2)
}

/// The command line of the `umm-torture` binaries (see the binary's docs).
pub fn main() -> ExitCode {
    let mut opts = Options {
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        ..Options::default()
    };
    let mut sources = vec![SourceKind::Manual];
    let mut min_ops = 0u64;
    let mut require = false;
    let mut expect_failure = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next();
        let num = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--source" => {
                let Some(v) = val() else { return usage() };
                sources.clear();
                for s in v.split(',') {
                    if s == "all" {
                        sources.extend(SourceKind::REAL);
                    } else if let Some(k) = SourceKind::parse(s) {
                        sources.push(k);
                    } else {
                        return usage();
                    }
                }
            }
            "--seed" => match num(val()) {
                Some(v) => opts.seed = v,
                None => return usage(),
            },
            "--threads" => match num(val()) {
                Some(v) => opts.threads = v as usize,
                None => return usage(),
            },
            "--ops" => match num(val()) {
                Some(v) => opts.ops = v,
                None => return usage(),
            },
            "--duration" => match num(val()) {
                Some(v) => {
                    opts.duration = Some(Duration::from_secs(v));
                    opts.ops = u64::MAX;
                }
                None => return usage(),
            },
            "--slots" => match num(val()) {
                Some(v) => opts.slots = v as usize,
                None => return usage(),
            },
            "--heap-slots" => match num(val()) {
                Some(v) => opts.heap_slots = v as usize,
                None => return usage(),
            },
            "--min-ops" => match num(val()) {
                Some(v) => min_ops = v,
                None => return usage(),
            },
            "--op-set" => {
                let Some(v) = val() else { return usage() };
                if v == "all" {
                    opts.op_set = Some(OpKind::ALL.to_vec());
                } else {
                    let mut set = Vec::new();
                    for n in v.split(',') {
                        match OpKind::parse(n) {
                            Some(k) => set.push(k),
                            None => return usage(),
                        }
                    }
                    opts.op_set = Some(set);
                }
            }
            "--plant" => {
                let Some(v) = val() else { return usage() };
                match v.strip_prefix("drop-every=").and_then(|n| n.parse().ok()) {
                    Some(n) if n > 0 => opts.drop_every = Some(n),
                    _ => return usage(),
                }
            }
            "--require" => require = true,
            "--rdma" => opts.rdma = true,
            "--vulkan" => opts.vulkan = true,
            "--expect-failure" => expect_failure = true,
            _ => return usage(),
        }
    }
    let mut bad = 0;
    for source in sources {
        let o = Options {
            source,
            ..opts.clone()
        };
        println!(
            "=== source {source}, seed {}, {} threads, {} ops{}",
            o.seed,
            o.threads,
            if o.ops == u64::MAX {
                "unbounded".to_string()
            } else {
                o.ops.to_string()
            },
            o.duration.map_or(String::new(), |d| format!(", {d:?}"))
        );
        match run(&o) {
            Ok(r) => {
                let names: Vec<&str> = r.op_set.iter().map(|k| k.name()).collect();
                println!("operations enabled: {}", names.join(" "));
                println!("{r}");
                if expect_failure {
                    println!("!!! source {source}: expected a failure, the run was green");
                    bad += 1;
                } else if r.ops < min_ops {
                    println!(
                        "!!! source {source}: only {} operations, wanted {min_ops}",
                        r.ops
                    );
                    bad += 1;
                } else {
                    println!(
                        "OK source {source}: {} operations, {} invalidations",
                        r.ops, r.invalidations
                    );
                }
            }
            Err(RunError::Setup(s)) => {
                println!("SKIP: source {source}: {s}");
                if require {
                    bad += 1;
                }
            }
            Err(RunError::Failed(f)) => {
                println!("{f}");
                if expect_failure {
                    println!("OK source {source}: failed as expected");
                } else {
                    bad += 1;
                }
            }
        }
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
