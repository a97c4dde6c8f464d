//! The scenario binary with the interposition hooks exported by the binary itself (the
//! in-process mode); see `umm_coverage::cell::main_with`.

umm_interpose::export_hooks!();

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(umm_coverage::cell::main_with(&args));
}
