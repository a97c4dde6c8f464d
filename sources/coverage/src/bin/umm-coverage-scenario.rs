//! The plain scenario binary (no hooks of its own); see `umm_coverage::cell::main_with`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(umm_coverage::cell::main_with(&args));
}
