//! The parent side: runs one cell (or run) in a child process under a watchdog.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Binary, ColumnSpec, CoverageError};

/// Name of the plain scenario binary.
pub const PLAIN: &str = "umm-coverage-scenario";
/// Name of the scenario binary that exports the interposition hooks.
pub const INPROC: &str = "umm-coverage-scenario-inproc";
/// File name of the LD_PRELOAD library.
pub const PRELOAD: &str = "libumm_preload.so";

/// Where the scenario binaries and the preload library are.
#[derive(Clone, Debug)]
pub struct Bins {
    /// The plain scenario binary.
    pub plain: PathBuf,
    /// The in-process-hooks scenario binary.
    pub inproc: PathBuf,
    /// `libumm_preload.so`, if built.
    pub preload: Option<PathBuf>,
}

/// `libumm_preload.so` in `dir` or `dir/deps`.
pub fn find_preload(dir: &Path) -> Option<PathBuf> {
    [dir.join(PRELOAD), dir.join("deps").join(PRELOAD)]
        .into_iter()
        .find(|p| p.is_file())
}

impl Bins {
    /// The binaries next to this executable (for a test executable in `deps/`, one level
    /// up).
    pub fn locate() -> Bins {
        let exe = std::env::current_exe().unwrap_or_default();
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.ends_with("deps") {
            dir.pop();
        }
        Bins {
            plain: dir.join(PLAIN),
            inproc: dir.join(INPROC),
            preload: find_preload(&dir),
        }
    }

    /// Runs `args` in the binary of `spec` (with the preload library when it asks for
    /// it) and returns its stdout; kills it and fails after `limit`.
    pub fn run(
        &self,
        spec: &ColumnSpec,
        args: &[&str],
        limit: Duration,
    ) -> Result<String, CoverageError> {
        let bin = match spec.binary {
            Binary::Plain => &self.plain,
            Binary::InProcess => &self.inproc,
        };
        let what = format!(
            "{} {}{}",
            bin.display(),
            args.join(" "),
            if spec.preload { " (LD_PRELOAD)" } else { "" }
        );
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if spec.preload {
            let so = self
                .preload
                .as_ref()
                .ok_or_else(|| CoverageError::Unavailable {
                    column: spec.id,
                    reason: format!("{PRELOAD} not built (cargo build -p umm-preload)"),
                })?;
            cmd.env("LD_PRELOAD", so);
        }
        let mut child = cmd.spawn().map_err(|source| CoverageError::Io {
            what: what.clone(),
            source,
        })?;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CoverageError::Timeout {
                        what,
                        secs: limit.as_secs(),
                    });
                }
                Err(source) => return Err(CoverageError::Io { what, source }),
            }
        };
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        if !status.success() {
            return Err(CoverageError::Child {
                what,
                status: status.to_string(),
                output: format!("{stdout}{stderr}"),
            });
        }
        Ok(stdout)
    }
}
