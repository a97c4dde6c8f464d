//! Compiles `shaders/kernels.wgsl` to SPIR-V with naga, into `$OUT_DIR/kernels.spv`.
//! The shader source is the only checked-in form of the kernels (no binary blobs).

use std::path::PathBuf;

fn main() {
    let src_path = "shaders/kernels.wgsl";
    println!("cargo:rerun-if-changed={src_path}");
    let source = std::fs::read_to_string(src_path).expect("read shaders/kernels.wgsl");
    let module = match naga::front::wgsl::parse_str(&source) {
        Ok(m) => m,
        Err(e) => panic!("{}", e.emit_to_string_with_path(&source, src_path)),
    };
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::IMMEDIATES,
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{}", e.emit_to_string_with_path(&source, src_path)));
    let options = naga::back::spv::Options::default();
    let words = naga::back::spv::write_vec(&module, &info, &options, None)
        .unwrap_or_else(|e| panic!("SPIR-V generation failed: {e}"));
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("kernels.spv");
    std::fs::write(&out, bytes).expect("write kernels.spv");
}
