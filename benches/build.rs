//! Builds the UCX shim when UCX's registration cache headers are installed
//! (`libucx-dev`, installed by scripts/setup.sh); otherwise the comparison harness
//! reports UCX as not available.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(umm_has_ucx)");
    println!("cargo::rerun-if-changed=csrc/ucx_shim.c");
    if std::path::Path::new("/usr/include/ucs/memory/rcache.h").exists() {
        cc::Build::new()
            .file("csrc/ucx_shim.c")
            .opt_level(2)
            .warnings(true)
            .flag_if_supported("-Wno-unused-parameter")
            .compile("umm_ucx_shim");
        println!("cargo::rustc-link-lib=ucs");
        println!("cargo::rustc-cfg=umm_has_ucx");
    } else {
        println!(
            "cargo::warning=UCX headers not found: the UCX column of the comparison is skipped"
        );
    }
}
