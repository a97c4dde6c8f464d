//! Two compute kernels that use an import from the device: `fill` writes a pattern into it,
//! `checksum` reads it. They are the proof that a registration is usable, not just
//! constructed. Source: `shaders/kernels.wgsl`, compiled to SPIR-V by `build.rs` (naga).
//!
//! Each call records one command buffer (bind the import's buffer, push
//! `{first, count, seed, width}`, dispatch, barrier shader-write → host-read), submits it
//! and waits for its fence, so the bytes are visible to the host when the call returns and
//! no command of ours outlives the call (deregistration may free the import right after).
//! Calls are serialised by one mutex (one command buffer, one descriptor set).

use std::time::Duration;

use ash::vk;
use parking_lot::Mutex;

use crate::backend::{Context, VulkanBackend, VulkanImport};
use crate::error::VulkanError;

/// The SPIR-V produced by build.rs from `shaders/kernels.wgsl`.
static SPIRV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.spv"));

const WORKGROUP: u32 = 64;
/// How long a kernel may run before the call gives up (a hung device, not a slow one).
const FENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// The word the `fill` kernel writes at word `i` of its span (host-side twin of the
/// shader's `pattern_word`).
pub fn pattern_word(seed: u32, i: u32) -> u32 {
    i.wrapping_mul(0x9E37_79B9) ^ seed
}

/// The bytes `fill` writes over `len` bytes (a multiple of 4) with `seed`.
pub fn pattern_bytes(seed: u32, len: usize) -> Vec<u8> {
    (0..(len / 4) as u32)
        .flat_map(|i| pattern_word(seed, i).to_ne_bytes())
        .collect()
}

/// What the `checksum` kernel computes over a span of 32-bit words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum {
    /// Σ word\[i\] · (2i + 1), wrapping: changes when any word changes or moves.
    pub sum: u32,
    /// Words read (each invocation counts one).
    pub words: u32,
}

impl Checksum {
    /// The same checksum computed on the host over `bytes` (length a multiple of 4).
    pub fn of_bytes(bytes: &[u8]) -> Checksum {
        let mut sum = 0u32;
        let mut words = 0u32;
        for (i, w) in bytes.chunks_exact(4).enumerate() {
            let word = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
            sum = sum.wrapping_add(word.wrapping_mul(2u32.wrapping_mul(i as u32).wrapping_add(1)));
            words = words.wrapping_add(1);
        }
        Checksum { sum, words }
    }
}

/// The host-visible result buffer's mapping.
struct Mapped(*mut u32);

// SAFETY: the pointer is a persistent mapping of device memory owned by `Kernels`; it is
// only dereferenced under the `State` mutex while that memory is alive.
unsafe impl Send for Mapped {}

/// Per-call objects, used under the mutex.
struct State {
    queue: vk::Queue,
    command_buffer: vk::CommandBuffer,
    set: vk::DescriptorSet,
    fence: vk::Fence,
    result: Mapped,
}

/// Pipelines and per-call objects. Handles start null so that [`Kernels::destroy`] can
/// undo a partial construction (destroying `VK_NULL_HANDLE` is a no-op in Vulkan).
pub(crate) struct Kernels {
    shader: vk::ShaderModule,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    fill: vk::Pipeline,
    checksum: vk::Pipeline,
    descriptor_pool: vk::DescriptorPool,
    command_pool: vk::CommandPool,
    result_buffer: vk::Buffer,
    result_memory: vk::DeviceMemory,
    state: Mutex<State>,
}

impl Kernels {
    pub(crate) fn new(ctx: &Context) -> Result<Kernels, VulkanError> {
        let mut k = Kernels {
            shader: vk::ShaderModule::null(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            fill: vk::Pipeline::null(),
            checksum: vk::Pipeline::null(),
            descriptor_pool: vk::DescriptorPool::null(),
            command_pool: vk::CommandPool::null(),
            result_buffer: vk::Buffer::null(),
            result_memory: vk::DeviceMemory::null(),
            state: Mutex::new(State {
                queue: vk::Queue::null(),
                command_buffer: vk::CommandBuffer::null(),
                set: vk::DescriptorSet::null(),
                fence: vk::Fence::null(),
                result: Mapped(std::ptr::null_mut()),
            }),
        };
        match k.build(ctx) {
            Ok(()) => Ok(k),
            Err(e) => {
                k.destroy(ctx);
                Err(e)
            }
        }
    }

    fn build(&mut self, ctx: &Context) -> Result<(), VulkanError> {
        let d = &ctx.device;
        let err = |call| move |e| VulkanError::vk(&ctx.name, call, e);
        let code = ash::util::read_spv(&mut std::io::Cursor::new(SPIRV))
            .expect("build.rs wrote whole SPIR-V words");
        // SAFETY: every create info below is valid and outlives its call; each created
        // handle is stored in `self` right away so `destroy` frees it on any later error.
        unsafe {
            self.shader = d
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&code), None)
                .map_err(err("vkCreateShaderModule"))?;
            let bindings = [0, 1].map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            });
            self.set_layout = d
                .create_descriptor_set_layout(
                    &vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings),
                    None,
                )
                .map_err(err("vkCreateDescriptorSetLayout"))?;
            let push = [vk::PushConstantRange::default()
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
                .offset(0)
                .size(16)];
            let set_layouts = [self.set_layout];
            self.layout = d
                .create_pipeline_layout(
                    &vk::PipelineLayoutCreateInfo::default()
                        .set_layouts(&set_layouts)
                        .push_constant_ranges(&push),
                    None,
                )
                .map_err(err("vkCreatePipelineLayout"))?;
            let infos = [c"fill", c"checksum"].map(|entry| {
                vk::ComputePipelineCreateInfo::default()
                    .layout(self.layout)
                    .stage(
                        vk::PipelineShaderStageCreateInfo::default()
                            .stage(vk::ShaderStageFlags::COMPUTE)
                            .module(self.shader)
                            .name(entry),
                    )
            });
            let pipelines = d
                .create_compute_pipelines(vk::PipelineCache::null(), &infos, None)
                .map_err(|(created, e)| {
                    for p in created {
                        d.destroy_pipeline(p, None);
                    }
                    VulkanError::vk(&ctx.name, "vkCreateComputePipelines", e)
                })?;
            (self.fill, self.checksum) = (pipelines[0], pipelines[1]);

            let sizes = [vk::DescriptorPoolSize::default()
                .ty(vk::DescriptorType::STORAGE_BUFFER)
                .descriptor_count(2)];
            self.descriptor_pool = d
                .create_descriptor_pool(
                    &vk::DescriptorPoolCreateInfo::default()
                        .max_sets(1)
                        .pool_sizes(&sizes),
                    None,
                )
                .map_err(err("vkCreateDescriptorPool"))?;
            let state = self.state.get_mut();
            state.set = d
                .allocate_descriptor_sets(
                    &vk::DescriptorSetAllocateInfo::default()
                        .descriptor_pool(self.descriptor_pool)
                        .set_layouts(&set_layouts),
                )
                .map_err(err("vkAllocateDescriptorSets"))?[0];
            self.command_pool = d
                .create_command_pool(
                    &vk::CommandPoolCreateInfo::default()
                        .queue_family_index(ctx.queue_family)
                        .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                    None,
                )
                .map_err(err("vkCreateCommandPool"))?;
            state.command_buffer = d
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(self.command_pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
                .map_err(err("vkAllocateCommandBuffers"))?[0];
            state.fence = d
                .create_fence(&vk::FenceCreateInfo::default(), None)
                .map_err(err("vkCreateFence"))?;
            state.queue = d.get_device_queue(ctx.queue_family, 0);

            self.result_buffer = d
                .create_buffer(
                    &vk::BufferCreateInfo::default()
                        .size(8)
                        .usage(vk::BufferUsageFlags::STORAGE_BUFFER)
                        .sharing_mode(vk::SharingMode::EXCLUSIVE),
                    None,
                )
                .map_err(err("vkCreateBuffer"))?;
            let reqs = d.get_buffer_memory_requirements(self.result_buffer);
            let host =
                vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
            let type_index = ctx
                .memory_type(reqs.memory_type_bits, host)
                .filter(|&i| {
                    ctx.memory_props.memory_types[i as usize]
                        .property_flags
                        .contains(host)
                })
                .ok_or(VulkanError::vk(
                    &ctx.name,
                    "no host-visible coherent memory type",
                    vk::Result::ERROR_FEATURE_NOT_PRESENT,
                ))?;
            self.result_memory = d
                .allocate_memory(
                    &vk::MemoryAllocateInfo::default()
                        .allocation_size(reqs.size)
                        .memory_type_index(type_index),
                    None,
                )
                .map_err(err("vkAllocateMemory"))?;
            d.bind_buffer_memory(self.result_buffer, self.result_memory, 0)
                .map_err(err("vkBindBufferMemory"))?;
            state.result = Mapped(
                d.map_memory(self.result_memory, 0, 8, vk::MemoryMapFlags::empty())
                    .map_err(err("vkMapMemory"))?
                    .cast(),
            );
        }
        Ok(())
    }

    /// Frees everything (null handles are skipped by Vulkan). Called once, from
    /// `VulkanBackend::drop` after the device went idle, or on a failed construction.
    pub(crate) fn destroy(&mut self, ctx: &Context) {
        let d = &ctx.device;
        let state = self.state.get_mut();
        // SAFETY: the device is idle (or nothing was ever submitted); each handle is ours,
        // destroyed once (reset to null below) in reverse order of creation. Freeing the
        // pools frees the set and command buffer; freeing mapped memory unmaps it.
        unsafe {
            d.destroy_buffer(self.result_buffer, None);
            d.free_memory(self.result_memory, None);
            d.destroy_fence(state.fence, None);
            d.destroy_command_pool(self.command_pool, None);
            d.destroy_descriptor_pool(self.descriptor_pool, None);
            d.destroy_pipeline(self.checksum, None);
            d.destroy_pipeline(self.fill, None);
            d.destroy_pipeline_layout(self.layout, None);
            d.destroy_descriptor_set_layout(self.set_layout, None);
            d.destroy_shader_module(self.shader, None);
        }
        state.result = Mapped(std::ptr::null_mut());
        state.fence = vk::Fence::null();
        self.result_buffer = vk::Buffer::null();
        self.result_memory = vk::DeviceMemory::null();
        self.command_pool = vk::CommandPool::null();
        self.descriptor_pool = vk::DescriptorPool::null();
        self.checksum = vk::Pipeline::null();
        self.fill = vk::Pipeline::null();
        self.layout = vk::PipelineLayout::null();
        self.set_layout = vk::DescriptorSetLayout::null();
        self.shader = vk::ShaderModule::null();
    }

    /// Runs `pipeline` over bytes `[offset, offset + len)` of `import`; returns the result
    /// words (the checksum; zeros for `fill`).
    fn run(
        &self,
        ctx: &Context,
        pipeline: vk::Pipeline,
        import: &VulkanImport,
        offset: u64,
        len: u64,
        seed: u32,
    ) -> Result<[u32; 2], VulkanError> {
        let bad = |reason| VulkanError::BadSpan {
            device: ctx.name.clone(),
            offset,
            len,
            size: import.size,
            reason,
        };
        if len == 0 || !offset.is_multiple_of(4) || !len.is_multiple_of(4) {
            return Err(bad("offset and length must be non-zero multiples of 4"));
        }
        if offset.checked_add(len).is_none_or(|end| end > import.size) {
            return Err(bad("span exceeds the import"));
        }
        let count = u32::try_from(len / 4).map_err(|_| bad("more than 2^32 words"))?;
        // Bind from the span's start rounded down to the storage-buffer offset alignment,
        // at most maxStorageBufferRange bytes.
        let limits = &ctx.limits;
        let bind_align = limits.min_storage_buffer_offset_alignment.max(4);
        let base = import.offset + offset / bind_align * bind_align;
        let skip = import.offset + offset - base;
        let max_range = u64::from(limits.max_storage_buffer_range) & !3;
        let range = (import.offset + import.size - base).min(max_range);
        if skip + len > range {
            return Err(bad("span exceeds maxStorageBufferRange"));
        }
        let groups = count.div_ceil(WORKGROUP);
        let x = groups.min(limits.max_compute_work_group_count[0]);
        let y = groups.div_ceil(x);
        if y > limits.max_compute_work_group_count[1] {
            return Err(bad("span exceeds the dispatch limits"));
        }
        let params = [(skip / 4) as u32, count, seed, x * WORKGROUP];
        let mut push = [0u8; 16];
        for (dst, word) in push.chunks_exact_mut(4).zip(params) {
            dst.copy_from_slice(&word.to_ne_bytes());
        }

        let d = &ctx.device;
        let err = |call| move |e| VulkanError::vk(&ctx.name, call, e);
        let state = self.state.lock();
        // SAFETY: `result` maps 8 bytes of live host-coherent memory; no command is in
        // flight (every call waits for its fence before unlocking).
        unsafe { std::ptr::write_bytes(state.result.0, 0, 2) };
        let buffers = [
            vk::DescriptorBufferInfo::default()
                .buffer(import.buffer)
                .offset(base)
                .range(range),
            vk::DescriptorBufferInfo::default()
                .buffer(self.result_buffer)
                .offset(0)
                .range(8),
        ];
        let writes = [0, 1].map(|i| {
            vk::WriteDescriptorSet::default()
                .dst_set(state.set)
                .dst_binding(i)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&buffers[i as usize..i as usize + 1])
        });
        let barrier = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ)];
        let cb = state.command_buffer;
        // SAFETY: the descriptor set, command buffer and fence are not in use (we hold the
        // lock and the previous call waited for its fence); the import's buffer is alive
        // for the duration of the call (the caller's contract, see `fill_pattern`).
        unsafe {
            d.update_descriptor_sets(&writes, &[]);
            d.reset_command_buffer(cb, vk::CommandBufferResetFlags::empty())
                .map_err(err("vkResetCommandBuffer"))?;
            d.begin_command_buffer(
                cb,
                &vk::CommandBufferBeginInfo::default()
                    .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(err("vkBeginCommandBuffer"))?;
            d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, pipeline);
            d.cmd_bind_descriptor_sets(
                cb,
                vk::PipelineBindPoint::COMPUTE,
                self.layout,
                0,
                &[state.set],
                &[],
            );
            d.cmd_push_constants(cb, self.layout, vk::ShaderStageFlags::COMPUTE, 0, &push);
            d.cmd_dispatch(cb, x, y, 1);
            d.cmd_pipeline_barrier(
                cb,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &barrier,
                &[],
                &[],
            );
            d.end_command_buffer(cb)
                .map_err(err("vkEndCommandBuffer"))?;
            let cbs = [cb];
            let submit = [vk::SubmitInfo::default().command_buffers(&cbs)];
            d.queue_submit(state.queue, &submit, state.fence)
                .map_err(err("vkQueueSubmit"))?;
            let waited = d.wait_for_fences(&[state.fence], true, FENCE_TIMEOUT.as_nanos() as u64);
            if let Err(e) = waited {
                // The command may still run: wait for the whole device before the lock
                // (and possibly the import) is released.
                let _ = d.device_wait_idle();
                let _ = d.reset_fences(&[state.fence]);
                return Err(VulkanError::vk(&ctx.name, "vkWaitForFences", e));
            }
            d.reset_fences(&[state.fence])
                .map_err(err("vkResetFences"))?;
            // SAFETY (read): the fence signalled after the host-read barrier, and the
            // memory is host-coherent.
            Ok([
                state.result.0.read_volatile(),
                state.result.0.add(1).read_volatile(),
            ])
        }
    }
}

impl VulkanBackend {
    /// Runs the `fill` kernel: the device writes [`pattern_word`]`(seed, i)` into word `i`
    /// of bytes `[offset, offset + len)` of `import` (offsets relative to the registered
    /// range; `offset` and `len` multiples of 4). Returns once the bytes are visible to the
    /// host.
    ///
    /// # Safety
    /// `import` must be a live import of this backend (its entry not yet deregistered),
    /// its range must still be mapped (on lavapipe the device dereferences the host pointer
    /// directly), and no Rust reference may be alive to the bytes written.
    pub unsafe fn fill_pattern(
        &self,
        import: &VulkanImport,
        offset: u64,
        len: u64,
        seed: u32,
    ) -> Result<(), VulkanError> {
        let k = self.kernels()?;
        k.run(&self.ctx, k.fill, import, offset, len, seed)
            .map(|_| ())
    }

    /// Runs the `checksum` kernel: the device reads bytes `[offset, offset + len)` of
    /// `import` and returns [`Checksum`] (compare with [`Checksum::of_bytes`]).
    ///
    /// # Safety
    /// `import` must be a live import of this backend and its range still mapped.
    pub unsafe fn checksum(
        &self,
        import: &VulkanImport,
        offset: u64,
        len: u64,
    ) -> Result<Checksum, VulkanError> {
        let k = self.kernels()?;
        let [sum, words] = k.run(&self.ctx, k.checksum, import, offset, len, 0)?;
        Ok(Checksum { sum, words })
    }
}
