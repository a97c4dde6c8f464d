//! Gives libumm.so its SONAME (libumm.so.<major>, or .0.<minor> before 1.0), so programs
//! linked against it keep working across compatible updates of the installed library.

fn main() {
    let major = env!("CARGO_PKG_VERSION_MAJOR");
    let minor = env!("CARGO_PKG_VERSION_MINOR");
    let soname = if major == "0" {
        format!("libumm.so.0.{minor}")
    } else {
        format!("libumm.so.{major}")
    };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
    println!("cargo:rerun-if-changed=build.rs");
}
