//! `umm doctor`: what works on this machine, why the rest does not, and the fix.

use std::fmt;

use serde_json::{json, Value};

/// How one line turned out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Works.
    Yes,
    /// Does not work (for a source or backend: one of the alternatives).
    No,
    /// Works, but a limit may bite.
    Warn,
    /// A limit that makes the requested setup fail.
    Fail,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Yes => "yes",
            Verdict::No => "no",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Line {
    /// What was checked (`userfaultfd`, `RDMA`, `RLIMIT_MEMLOCK`...).
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// How to fix it, when it does not work.
    pub fix: Option<String>,
}

impl Line {
    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "ok": matches!(self.verdict, Verdict::Yes | Verdict::Warn),
            "verdict": self.verdict.word(),
            "detail": self.detail,
            "fix": self.fix,
        })
    }
}

/// Everything `umm doctor` checked.
pub struct Report {
    /// Notifier sources, best first (from `umm_auto::probe`).
    pub sources: Vec<Line>,
    /// Device backends.
    pub backends: Vec<Line>,
    /// Process and system limits.
    pub limits: Vec<Line>,
}

impl Report {
    /// Runs every check.
    pub fn gather(working_set: Option<u64>) -> Report {
        let sources = umm_auto::probe()
            .into_iter()
            .map(|s| Line {
                name: format!("{} ({})", s.kind.title(), s.kind.name()),
                verdict: if s.available {
                    Verdict::Yes
                } else {
                    Verdict::No
                },
                detail: s.detail,
                fix: s.fix,
            })
            .collect();
        Report {
            sources,
            backends: vec![rdma(), vulkan(), cuda()],
            limits: vec![memlock(working_set), max_map_count()],
        }
    }

    /// A notifier source and a backend work, and no limit fails.
    pub fn usable(&self) -> bool {
        let ok = |l: &&Line| l.verdict == Verdict::Yes;
        self.sources.iter().any(|l| ok(&l))
            && self.backends.iter().any(|l| ok(&l))
            && !self.limits.iter().any(|l| l.verdict == Verdict::Fail)
    }

    fn picked(&self) -> Option<&Line> {
        self.sources.iter().find(|l| l.verdict == Verdict::Yes)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "usable": self.usable(),
            "auto_source": self.picked().map(|l| l.name.clone()),
            "sources": self.sources.iter().map(Line::json).collect::<Vec<_>>(),
            "backends": self.backends.iter().map(Line::json).collect::<Vec<_>>(),
            "limits": self.limits.iter().map(Line::json).collect::<Vec<_>>(),
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (title, lines) in [
            ("notifier sources (best first)", &self.sources),
            ("backends", &self.backends),
            ("limits", &self.limits),
        ] {
            writeln!(f, "{title}:")?;
            for l in lines {
                writeln!(f, "  {:<4} {:<26} {}", l.verdict.word(), l.name, l.detail)?;
                if let Some(fix) = &l.fix {
                    writeln!(f, "       {:<26} fix: {fix}", "")?;
                }
            }
        }
        match self.picked() {
            Some(l) => writeln!(f, "umm_auto::add_best_source picks: {}", l.name)?,
            None => writeln!(
                f,
                "umm_auto::add_best_source: no notifier source works here"
            )?,
        }
        writeln!(
            f,
            "verdict: {}",
            if self.usable() {
                "usable (a notifier source and a backend work)"
            } else {
                "NOT usable (see the lines above)"
            }
        )
    }
}

fn rdma() -> Line {
    let name = "RDMA (umm-rdma)".to_string();
    let rxe_fix = "for Soft-RoCE: modprobe rdma_rxe && rdma link add rxe0 type rxe netdev <iface> \
                   (scripts/rxe-setup.sh sets up rxe0/rxe1 over a veth pair)";
    match umm_rdma::list_devices() {
        Err(e) => {
            let detail = e.to_string();
            let fix = if detail.contains("os error 38") || detail.contains("not implemented") {
                format!("the kernel exposes no verbs devices (ENOSYS): load ib_uverbs and a driver (modprobe ib_uverbs mlx5_ib ...); {rxe_fix}")
            } else {
                format!("install rdma-core (libibverbs1, ibverbs-providers) and load ib_uverbs; {rxe_fix}")
            };
            Line {
                name,
                verdict: Verdict::No,
                detail,
                fix: Some(fix),
            }
        }
        Ok(devs) if devs.is_empty() => Line {
            name,
            verdict: Verdict::No,
            detail: "verbs works but lists no device".into(),
            fix: Some(format!("load the NIC's driver (mlx5_ib, ...); {rxe_fix}")),
        },
        Ok(devs) => {
            let mut active = 0;
            let parts: Vec<String> = devs
                .iter()
                .map(|d| {
                    let sel = umm_rdma::DeviceSelector::Name(d.name.clone());
                    let port = match umm_rdma::RdmaDevice::open(&sel) {
                        Ok(dev) => match dev.check_port_active(1) {
                            Ok(()) => {
                                active += 1;
                                "port 1 ACTIVE".to_string()
                            }
                            Err(e) => e.to_string(),
                        },
                        Err(e) => format!("cannot open: {e}"),
                    };
                    format!("{} (guid {:016x}, {port})", d.name, d.guid)
                })
                .collect();
            Line {
                name,
                verdict: if active > 0 {
                    Verdict::Yes
                } else {
                    Verdict::No
                },
                detail: parts.join(", "),
                fix: (active == 0).then(|| {
                    "bring the port's link up (ip link set <iface> up; rdma link show)".to_string()
                }),
            }
        }
    }
}

fn vulkan() -> Line {
    let name = "Vulkan (umm-vulkan)".to_string();
    match umm_vulkan::VulkanBackend::list_devices() {
        Err(e) => Line {
            name,
            verdict: Verdict::No,
            detail: e.to_string(),
            fix: Some(
                "install a Vulkan loader and ICD: libvulkan1 and mesa-vulkan-drivers (lavapipe, on the CPU) or the GPU vendor's driver"
                    .into(),
            ),
        },
        Ok(devs) => {
            let usable: Vec<String> = devs
                .iter()
                .filter(|d| d.supports_host_import)
                .map(|d| format!("{} (import alignment {})", d.name, d.import_alignment))
                .collect();
            if usable.is_empty() {
                Line {
                    name,
                    verdict: Verdict::No,
                    detail: if devs.is_empty() {
                        "the loader lists no device (no ICD)".into()
                    } else {
                        format!(
                            "no device offers VK_EXT_external_memory_host: {}",
                            devs.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                        )
                    },
                    fix: Some("install an ICD with VK_EXT_external_memory_host: mesa-vulkan-drivers (lavapipe) or the GPU vendor's driver".into()),
                }
            } else {
                Line { name, verdict: Verdict::Yes, detail: usable.join(", "), fix: None }
            }
        }
    }
}

fn cuda() -> Line {
    let name = "CUDA (umm-cuda)".to_string();
    if !umm_cuda::backend::driver_present() {
        return Line {
            name,
            verdict: Verdict::No,
            detail: "libcuda.so cannot be loaded (no CUDA driver)".into(),
            fix: Some("install the NVIDIA driver (it ships libcuda.so)".into()),
        };
    }
    match umm_cuda::backend::device_count() {
        Ok(n) if n > 0 => Line {
            name,
            verdict: Verdict::Yes,
            detail: format!("{n} device(s)"),
            fix: None,
        },
        Ok(_) => Line {
            name,
            verdict: Verdict::No,
            detail: "the driver reports no device".into(),
            fix: Some("check nvidia-smi; the GPU must be visible (CUDA_VISIBLE_DEVICES)".into()),
        },
        Err(e) => Line {
            name,
            verdict: Verdict::No,
            detail: e.to_string(),
            fix: Some("check nvidia-smi and that the driver matches the kernel".into()),
        },
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn memlock(working_set: Option<u64>) -> Line {
    let name = "RLIMIT_MEMLOCK".to_string();
    let fix =
        "raise it: ulimit -l unlimited, or `* - memlock unlimited` in /etc/security/limits.conf \
               (LimitMEMLOCK= for a systemd service), or run with CAP_IPC_LOCK"
            .to_string();
    let limit = umm::memlock_limit();
    let is_root = has_cap_ipc_lock();
    let shown = limit.map_or("unlimited".into(), bytes);
    match (limit, working_set) {
        (None, _) => Line {
            name,
            verdict: Verdict::Yes,
            detail: "unlimited".into(),
            fix: None,
        },
        (Some(_), _) if is_root => Line {
            name,
            verdict: Verdict::Yes,
            detail: format!("{shown} (this process has CAP_IPC_LOCK, which ignores it)"),
            fix: None,
        },
        (Some(l), Some(ws)) if l < ws => Line {
            name,
            verdict: Verdict::Fail,
            detail: format!(
                "{shown} < the working set of {} (RDMA registrations would fail with ENOMEM)",
                bytes(ws)
            ),
            fix: Some(fix),
        },
        (Some(_), Some(ws)) => Line {
            name,
            verdict: Verdict::Yes,
            detail: format!("{shown} >= the working set of {}", bytes(ws)),
            fix: None,
        },
        (Some(_), None) => Line {
            name,
            verdict: Verdict::Warn,
            detail: format!(
                "{shown}: RDMA can register at most this much (give --working-set to check)"
            ),
            fix: Some(fix),
        },
    }
}

fn max_map_count() -> Line {
    let name = "vm.max_map_count".to_string();
    match std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        Some(n) if n >= 65530 => Line {
            name,
            verdict: Verdict::Yes,
            detail: n.to_string(),
            fix: None,
        },
        Some(n) => Line {
            name,
            verdict: Verdict::Warn,
            detail: format!("{n}: registrations split mappings; many buffers may exhaust it"),
            fix: Some("sudo sysctl vm.max_map_count=262144".into()),
        },
        None => Line {
            name,
            verdict: Verdict::Warn,
            detail: "cannot read /proc/sys/vm/max_map_count".into(),
            fix: None,
        },
    }
}

/// Whether CAP_IPC_LOCK (bit 14) is in this process's effective capabilities.
fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 14) != 0)
}
