//! `umm-torture-preload`: the churn driver without hooks of its own, so that
//! `--source interpose` exercises the hooks of an `LD_PRELOAD`ed `libumm_preload.so` alone:
//!
//! ```text
//! LD_PRELOAD=target/release/libumm_preload.so umm-torture-preload --source interpose
//! ```
//!
//! Without the preload the interposition source is a setup error (SKIP).

fn main() -> std::process::ExitCode {
    umm_torture::cli::main()
}
