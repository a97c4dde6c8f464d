//! `umm doctor` gives the right verdict here, checked against independent ground truth.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn doctor(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_umm"))
        .arg("doctor")
        .arg("--json")
        .args(args)
        .output()
        .expect("run umm doctor");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), v)
}

fn line<'a>(v: &'a Value, group: &str, prefix: &str) -> &'a Value {
    v[group]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no {group} line {prefix}: {v:#}"))
}

fn ok(l: &Value) -> bool {
    l["ok"].as_bool().unwrap()
}

/// True when the libcuda.so the CUDA backend would load is on this machine.
fn libcuda_present() -> bool {
    let out = Command::new("/sbin/ldconfig").arg("-p").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so"))
        .unwrap_or(false)
}

fn lavapipe_icd_present() -> bool {
    ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .any(|d| {
            std::fs::read_dir(d)
                .map(|it| {
                    it.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("lvp_icd"))
                })
                .unwrap_or(false)
        })
}

#[test]
fn verdict_matches_the_machine() {
    let (code, v) = doctor(&[]);
    println!("{v:#}");
    let has_kmod = Path::new("/dev/umm_notify").exists();
    let has_verbs = Path::new("/sys/class/infiniband")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some());
    assert_eq!(ok(line(&v, "sources", "kernel module")), has_kmod);
    let uffd_allowed = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|s| s.trim() == "1")
        // SAFETY: geteuid has no preconditions.
        || unsafe { libc::geteuid() } == 0;
    assert_eq!(ok(line(&v, "sources", "userfaultfd")), uffd_allowed);
    // The doctor exports the interposition hooks itself: available wherever the
    // application declared it makes no raw memory syscalls (else every pin is refused).
    let declared = std::env::var("UMM_INTERPOSE_LIBC_ONLY").is_ok_and(|v| v == "1");
    assert_eq!(ok(line(&v, "sources", "interposition")), declared);
    assert_eq!(ok(line(&v, "backends", "RDMA")), has_verbs);
    if lavapipe_icd_present() {
        assert!(
            ok(line(&v, "backends", "Vulkan")),
            "lavapipe is installed: {v:#}"
        );
    }
    assert_eq!(ok(line(&v, "backends", "CUDA")), libcuda_present());
    if !has_verbs {
        let fix = line(&v, "backends", "RDMA")["fix"].as_str().unwrap();
        assert!(fix.contains("rxe"), "{fix}");
    }
    assert_eq!(code == 0, v["usable"].as_bool().unwrap());
}

/// The build host: userfaultfd yes, RDMA no, Vulkan yes (lavapipe), CUDA no.
#[test]
fn host_verdict() {
    if Path::new("/sys/class/infiniband").exists() || !lavapipe_icd_present() || libcuda_present() {
        println!("SKIP: not the build host's configuration (verbs devices, no lavapipe, or a CUDA driver)");
        return;
    }
    let (code, v) = doctor(&[]);
    assert!(ok(line(&v, "sources", "userfaultfd")), "{v:#}");
    assert!(!ok(line(&v, "backends", "RDMA")), "{v:#}");
    assert!(ok(line(&v, "backends", "Vulkan")), "{v:#}");
    assert!(!ok(line(&v, "backends", "CUDA")), "{v:#}");
    assert!(line(&v, "backends", "RDMA")["detail"]
        .as_str()
        .unwrap()
        .contains("ibv_get_device_list"));
    assert_eq!(v["auto_source"], "userfaultfd (uffd)");
    assert_eq!(code, 0);
}

/// The guest of scripts/test-pipeline.sh: module loaded and rxe set up.
#[test]
fn guest_verdict() {
    if std::env::var_os("UMM_EXPECT_GUEST").is_none() {
        println!("SKIP: UMM_EXPECT_GUEST unset (set by scripts/test-pipeline.sh in the guest)");
        return;
    }
    let (code, v) = doctor(&[]);
    println!("{v:#}");
    assert!(ok(line(&v, "sources", "kernel module")), "{v:#}");
    assert!(ok(line(&v, "backends", "RDMA")), "{v:#}");
    assert_eq!(v["auto_source"], "kernel module (kmod)");
    assert_eq!(code, 0);
}

#[test]
fn a_working_set_above_memlock_fails_with_the_fix() {
    let (Ok(_), Ok(_)) = (which("prlimit"), which("setpriv")) else {
        println!("SKIP: prlimit/setpriv missing");
        return;
    };
    let out = Command::new("prlimit")
        .args([
            "--memlock=65536:65536",
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--inh-caps=-ipc_lock",
        ])
        .arg(env!("CARGO_BIN_EXE_umm"))
        .args(["doctor", "--json", "--working-set", "1G"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let l = line(&v, "limits", "RLIMIT_MEMLOCK");
    assert_eq!(l["verdict"], "FAIL", "{v:#}");
    assert!(l["fix"].as_str().unwrap().contains("ulimit -l"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["usable"], false);
}

fn which(name: &str) -> Result<(), ()> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(name).is_file())
        .then_some(())
        .ok_or(())
}

/// `umm doctor | head -0`: a closed stdout ends the command with a status, not a panic
/// (it panicked with exit 101 in `println!` before).
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_umm"))
        .args(["doctor", "--json"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
}
