// Compute kernels that prove a VK_EXT_external_memory_host import is usable by the device.
// Compiled to SPIR-V at build time by build.rs (naga); no binary blobs are checked in.
//
// Both kernels see the imported buffer as 32-bit words and work on words
// [first, first + count) of it. Invocation i handles word first + i; a 2-D dispatch covers
// more words than one dimension of workgroups allows (index = x + y * width).
//
// `params` are Vulkan push constants (naga spells them `var<immediate>`).
// The pattern must stay identical to `umm_vulkan::pattern_word` (host side).

struct Params {
    first: u32,
    count: u32,
    seed: u32,
    // Invocations per dispatch row: num_workgroups.x * 64.
    width: u32,
}

var<immediate> params: Params;

@group(0) @binding(0) var<storage, read_write> data: array<u32>;
@group(0) @binding(1) var<storage, read_write> result: array<atomic<u32>, 2>;

fn pattern_word(seed: u32, i: u32) -> u32 {
    return (i * 0x9E3779B9u) ^ seed;
}

fn index(id: vec3<u32>) -> u32 {
    return id.x + id.y * params.width;
}

// Writes pattern_word(seed, i) into word first + i.
@compute @workgroup_size(64)
fn fill(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = index(id);
    if (i < params.count) {
        data[params.first + i] = pattern_word(params.seed, i);
    }
}

// result[0] += word * (2i + 1) (wrapping), result[1] += 1 per word read:
// a position-sensitive checksum of words [first, first + count).
@compute @workgroup_size(64)
fn checksum(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = index(id);
    if (i < params.count) {
        let word = data[params.first + i];
        atomicAdd(&result[0], word * (2u * i + 1u));
        atomicAdd(&result[1], 1u);
    }
}
