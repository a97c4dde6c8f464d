//! `umm-torture`: the churn driver from the command line (see [`umm_torture::cli`]). This
//! binary exports the interposition hooks itself (in-process mode).

umm_interpose::export_hooks!();

fn main() -> std::process::ExitCode {
    umm_torture::cli::main()
}
