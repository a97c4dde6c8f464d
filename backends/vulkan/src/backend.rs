//! Instance and device setup, device selection, and the [`Backend`] implementation.
//!
//! A registration is one `VK_EXT_external_memory_host` import:
//!
//! 1. check that the range's start and length are multiples of
//!    `minImportedHostPointerAlignment` (lavapipe accepts misaligned pointers, real drivers
//!    do not, so the check is ours);
//! 2. `vkCreateBuffer` with `VkExternalMemoryBufferCreateInfo{HOST_ALLOCATION_EXT}`;
//! 3. `vkGetMemoryHostPointerPropertiesEXT` for the pointer's `memoryTypeBits`, intersected
//!    with the buffer's requirements (host-coherent types preferred);
//! 4. `vkAllocateMemory` chained with `VkImportMemoryHostPointerInfoEXT`;
//! 5. `vkBindBufferMemory` at offset 0.
//!
//! Each failure undoes the steps before it. Deregistration destroys the buffer and frees the
//! memory; dropping the backend waits for the device to go idle, frees every import the
//! manager did not deregister (with a warning), then destroys the device and instance.
//!
//! **Overlap**: the spec (`VkImportMemoryHostPointerInfoEXT`) lets an application import the
//! same host payload several times, into several instances and several times into one,
//! while allowing an implementation to fail repeated imports into one physical device for
//! platform reasons; its valid-usage rules only constrain alignment, size, handle type and
//! memory type. lavapipe and NVIDIA's driver (H200; docs/design.md) accept overlapping and
//! repeated imports, so [`Capabilities::allows_overlap`] is `true` by default. For a driver
//! that refuses them, [`VulkanBackend::allow_overlap`]`(false)` makes the core merge and
//! order registrations as it does for CUDA.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::fmt;

use ash::vk;
use parking_lot::Mutex;
use umm::{Backend, BackendError, Capabilities, Range};

use crate::compute::Kernels;
use crate::error::VulkanError;

const HOST_ALLOCATION: vk::ExternalMemoryHandleTypeFlags =
    vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;

/// Which physical device to open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceSelector {
    /// The first device (in enumeration order) that supports `VK_EXT_external_memory_host`.
    #[default]
    First,
    /// The device at this index of `vkEnumeratePhysicalDevices`.
    Index(usize),
    /// The first device whose name contains this text (case-insensitive), e.g. "llvmpipe".
    Name(String),
    /// The device with this `deviceUUID` (`VkPhysicalDeviceIDProperties`).
    Uuid([u8; vk::UUID_SIZE]),
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::First => f.write_str("first device with VK_EXT_external_memory_host"),
            DeviceSelector::Index(i) => write!(f, "index {i}"),
            DeviceSelector::Name(n) => write!(f, "name containing {n:?}"),
            DeviceSelector::Uuid(u) => {
                f.write_str("uuid ")?;
                u.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

/// What [`VulkanBackend::list_devices`] reports about one physical device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Index in `vkEnumeratePhysicalDevices` order.
    pub index: usize,
    /// `deviceName`.
    pub name: String,
    /// `deviceUUID`.
    pub uuid: [u8; vk::UUID_SIZE],
    /// CPU (lavapipe), discrete GPU, ...
    pub device_type: vk::PhysicalDeviceType,
    /// Whether the device offers `VK_EXT_external_memory_host` (and Vulkan 1.1).
    pub supports_host_import: bool,
    /// `minImportedHostPointerAlignment` (0 when the extension is missing).
    pub import_alignment: u64,
}

/// One import: what a device needs to use a registered range (the core's `Translation`).
///
/// It describes the whole registered range; [`umm::Pin::offset`] gives the position of the
/// user's sub-range inside it. The handles are valid until the manager deregisters the
/// range (the last [`umm::Pin`] of an invalidated entry dropped, or eviction).
#[derive(Debug, PartialEq, Eq)]
pub struct VulkanImport {
    /// The imported host memory.
    pub memory: vk::DeviceMemory,
    /// A storage/transfer buffer bound over all of `memory`.
    pub buffer: vk::Buffer,
    /// Offset of the registered range's first byte in `memory` and `buffer` (always 0:
    /// ranges are aligned to the import alignment, so the import starts at the range).
    pub offset: u64,
    /// Bytes imported (the registered range's length).
    pub size: u64,
    /// The host range that was imported.
    pub range: Range,
}

/// A logical device, with everything freed in `Drop` (reverse order of creation).
pub(crate) struct Context {
    pub(crate) name: String,
    pub(crate) _entry: ash::Entry,
    pub(crate) instance: ash::Instance,
    pub(crate) device: ash::Device,
    pub(crate) host_ext: ash::ext::external_memory_host::Device,
    pub(crate) queue_family: u32,
    pub(crate) memory_props: vk::PhysicalDeviceMemoryProperties,
    pub(crate) limits: vk::PhysicalDeviceLimits,
    pub(crate) import_alignment: u64,
    pub(crate) max_allocation: u64,
    /// Whether we created the device and instance (and so destroy them); false for
    /// handles the application owns ([`VulkanBackend::from_raw`]).
    pub(crate) owned: bool,
}

impl Drop for Context {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // SAFETY: the device and instance were created by us and every child object has
        // been destroyed by the owners declared before this field (Kernels, imports).
        unsafe {
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

impl Context {
    /// The first memory type in `bits` with the `preferred` flags, else any type in `bits`.
    pub(crate) fn memory_type(&self, bits: u32, preferred: vk::MemoryPropertyFlags) -> Option<u32> {
        let types = &self.memory_props.memory_types[..self.memory_props.memory_type_count as usize];
        let candidates = || (0..types.len() as u32).filter(|i| bits & (1 << i) != 0);
        candidates()
            .find(|&i| types[i as usize].property_flags.contains(preferred))
            .or_else(|| candidates().next())
    }
}

fn device_name(props: &vk::PhysicalDeviceProperties) -> String {
    props
        .device_name_as_c_str()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "<unnamed>".to_string())
}

fn has_extension(instance: &ash::Instance, pd: vk::PhysicalDevice, name: &CStr) -> bool {
    // SAFETY: `pd` was enumerated from this live instance.
    let exts = unsafe { instance.enumerate_device_extension_properties(pd) }.unwrap_or_default();
    exts.iter()
        .any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == name))
}

/// Per physical device: info plus the properties needed to open it.
struct Candidate {
    info: DeviceInfo,
    physical: vk::PhysicalDevice,
    max_allocation: u64,
}

fn load_entry() -> Result<ash::Entry, VulkanError> {
    // SAFETY: loading libvulkan runs its initialisers; the loader is a well-behaved system
    // library and the Entry keeps it loaded for as long as any instance of ours exists.
    unsafe { ash::Entry::load() }.map_err(VulkanError::NoLoader)
}

fn create_instance(entry: &ash::Entry) -> Result<ash::Instance, VulkanError> {
    let app = vk::ApplicationInfo::default()
        .application_name(c"umm")
        .engine_name(c"umm-vulkan")
        .api_version(vk::API_VERSION_1_1);
    let info = vk::InstanceCreateInfo::default().application_info(&app);
    // SAFETY: `info` and `app` are valid for the call; no allocator callbacks.
    match unsafe { entry.create_instance(&info, None) } {
        Ok(i) => Ok(i),
        // The loader says this when it finds no ICD at all.
        Err(vk::Result::ERROR_INCOMPATIBLE_DRIVER) => Err(VulkanError::NoDevice {
            selector: "any".to_string(),
            reason: "the Vulkan loader found no driver (ICD)".to_string(),
        }),
        Err(e) => Err(VulkanError::vk("instance", "vkCreateInstance", e)),
    }
}

fn candidates(instance: &ash::Instance) -> Result<Vec<Candidate>, VulkanError> {
    // SAFETY: live instance.
    let pds = unsafe { instance.enumerate_physical_devices() }
        .map_err(|e| VulkanError::vk("instance", "vkEnumeratePhysicalDevices", e))?;
    let mut out = Vec::with_capacity(pds.len());
    for (index, pd) in pds.into_iter().enumerate() {
        // SAFETY: `pd` comes from this instance.
        let props = unsafe { instance.get_physical_device_properties(pd) };
        let api_ok = props.api_version >= vk::API_VERSION_1_1;
        let ext_ok = has_extension(instance, pd, ash::ext::external_memory_host::NAME);
        let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut id = vk::PhysicalDeviceIDProperties::default();
        let mut m3 = vk::PhysicalDeviceMaintenance3Properties::default();
        if api_ok {
            let mut props2 = vk::PhysicalDeviceProperties2::default()
                .push_next(&mut id)
                .push_next(&mut m3);
            if ext_ok {
                props2 = props2.push_next(&mut host);
            }
            // SAFETY: every chained struct is a valid output struct for this query and
            // outlives the call.
            unsafe { instance.get_physical_device_properties2(pd, &mut props2) };
        }
        out.push(Candidate {
            info: DeviceInfo {
                index,
                name: device_name(&props),
                uuid: id.device_uuid,
                device_type: props.device_type,
                supports_host_import: api_ok && ext_ok,
                import_alignment: if ext_ok {
                    host.min_imported_host_pointer_alignment
                } else {
                    0
                },
            },
            physical: pd,
            max_allocation: m3.max_memory_allocation_size,
        });
    }
    Ok(out)
}

fn select(cands: Vec<Candidate>, selector: &DeviceSelector) -> Result<Candidate, VulkanError> {
    let no_device = |reason: String| VulkanError::NoDevice {
        selector: selector.to_string(),
        reason,
    };
    if cands.is_empty() {
        return Err(no_device(
            "the Vulkan loader reports no physical device".into(),
        ));
    }
    let names = || {
        cands
            .iter()
            .map(|c| format!("{}:{}", c.info.index, c.info.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found = match selector {
        DeviceSelector::First => cands.iter().position(|c| c.info.supports_host_import),
        DeviceSelector::Index(i) => cands.iter().position(|c| c.info.index == *i),
        DeviceSelector::Name(n) => {
            let n = n.to_lowercase();
            cands
                .iter()
                .position(|c| c.info.name.to_lowercase().contains(&n))
        }
        DeviceSelector::Uuid(u) => cands.iter().position(|c| &c.info.uuid == u),
    };
    let Some(pos) = found else {
        return Err(no_device(format!("devices present: {}", names())));
    };
    let mut cands = cands;
    let c = cands.swap_remove(pos);
    if !c.info.supports_host_import {
        return Err(no_device(format!(
            "{} lacks Vulkan 1.1 or VK_EXT_external_memory_host",
            c.info.name
        )));
    }
    Ok(c)
}

fn open(selector: &DeviceSelector) -> Result<Context, VulkanError> {
    let entry = load_entry()?;
    let instance = create_instance(&entry)?;
    // From here on, `instance` must be destroyed on every error path.
    let destroy_instance = |instance: &ash::Instance| {
        // SAFETY: no device was created from it (or it was destroyed already).
        unsafe { instance.destroy_instance(None) }
    };
    let chosen = match candidates(&instance).and_then(|c| select(c, selector)) {
        Ok(c) => c,
        Err(e) => {
            destroy_instance(&instance);
            return Err(e);
        }
    };
    let pd = chosen.physical;
    let name = chosen.info.name.clone();
    // SAFETY: `pd` belongs to this instance.
    let families = unsafe { instance.get_physical_device_queue_family_properties(pd) };
    let Some(queue_family) = families
        .iter()
        .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
    else {
        destroy_instance(&instance);
        return Err(VulkanError::NoDevice {
            selector: selector.to_string(),
            reason: format!("{name} has no compute queue"),
        });
    };
    let priorities = [1.0f32];
    let queue_info = [vk::DeviceQueueCreateInfo::default()
        .queue_family_index(queue_family as u32)
        .queue_priorities(&priorities)];
    let ext_names = [ash::ext::external_memory_host::NAME.as_ptr()];
    let device_info = vk::DeviceCreateInfo::default()
        .queue_create_infos(&queue_info)
        .enabled_extension_names(&ext_names);
    // SAFETY: the create info and the arrays it points to outlive the call.
    let device = match unsafe { instance.create_device(pd, &device_info, None) } {
        Ok(d) => d,
        Err(e) => {
            destroy_instance(&instance);
            return Err(VulkanError::vk(&name, "vkCreateDevice", e));
        }
    };
    let host_ext = ash::ext::external_memory_host::Device::new(&instance, &device);
    // SAFETY: `pd` belongs to this instance.
    let (memory_props, props) = unsafe {
        (
            instance.get_physical_device_memory_properties(pd),
            instance.get_physical_device_properties(pd),
        )
    };
    tracing::debug!(
        device = %name,
        import_alignment = chosen.info.import_alignment,
        max_allocation = chosen.max_allocation,
        "opened Vulkan device"
    );
    Ok(Context {
        name,
        _entry: entry,
        instance,
        device,
        host_ext,
        queue_family: queue_family as u32,
        memory_props,
        limits: props.limits,
        import_alignment: chosen.info.import_alignment.max(1),
        max_allocation: chosen.max_allocation,
        owned: true,
    })
}

/// A Vulkan device as a `umm` backend: each registration imports the host range with
/// `VK_EXT_external_memory_host` and binds a [`vk::Buffer`] over it (see the
/// [module docs](self) for the steps and the overlap rule).
///
/// Also carries two compute kernels ([`VulkanBackend::fill_pattern`],
/// [`VulkanBackend::checksum`]) that use an import from the device, so a registration can
/// be proven, not just constructed.
pub struct VulkanBackend {
    // Field order is drop order: kernels and imports before the device (see `Drop`).
    /// `None` for a device the application owns (its queues are the application's).
    kernels: Option<Kernels>,
    /// Every live import (memory → buffer), so `Drop` frees what was not deregistered.
    live: Mutex<HashMap<vk::DeviceMemory, vk::Buffer>>,
    label: String,
    allows_overlap: bool,
    pub(crate) ctx: Context,
}

impl VulkanBackend {
    /// Loads the Vulkan loader at run time, opens the selected device with
    /// `VK_EXT_external_memory_host`, and prepares the compute kernels.
    ///
    /// Fails with [`VulkanError::NoLoader`] without `libvulkan.so.1`, and with
    /// [`VulkanError::NoDevice`] when no ICD is installed or nothing matches `selector`.
    pub fn new(selector: DeviceSelector) -> Result<Self, VulkanError> {
        let ctx = open(&selector)?;
        let kernels = Kernels::new(&ctx)?;
        Ok(VulkanBackend {
            label: format!("vulkan:{}", ctx.name),
            kernels: Some(kernels),
            live: Mutex::new(HashMap::new()),
            allows_overlap: true,
            ctx,
        })
    }

    /// Whether the backend tells the core that overlapping imports are allowed (default
    /// `true`, see the [module docs](self)); set `false` for a driver that refuses repeated
    /// imports of the same pages. Call before attaching (capabilities are read at attach).
    pub fn allow_overlap(mut self, allow: bool) -> Self {
        self.allows_overlap = allow;
        self
    }

    /// A backend over a device the application created and owns (for the C API): imports
    /// with `VK_EXT_external_memory_host` on `device`, which must have been created from
    /// `physical` of `instance` with that extension enabled (checked: the import entry
    /// point must resolve). umm never destroys these handles and submits nothing to the
    /// device's queues, so [`VulkanBackend::fill_pattern`] and
    /// [`VulkanBackend::checksum`] fail with [`VulkanError::NoKernels`] on it.
    ///
    /// # Safety
    /// The three handles must be live, belong together, come from this process's Vulkan
    /// loader (`libvulkan.so.1`), and stay alive until this backend is dropped (for a
    /// backend attached to a `umm::Manager`: until the manager is dropped). The
    /// application must not free the `VkDeviceMemory`/`VkBuffer` umm hands out.
    pub unsafe fn from_raw(
        instance: vk::Instance,
        physical: vk::PhysicalDevice,
        device: vk::Device,
    ) -> Result<Self, VulkanError> {
        let entry = load_entry()?;
        // SAFETY: the caller passes a live instance of this process's loader.
        let instance = unsafe { ash::Instance::load(entry.static_fn(), instance) };
        let chosen = candidates(&instance)?
            .into_iter()
            .find(|c| c.physical == physical)
            .ok_or_else(|| VulkanError::NoDevice {
                selector: "an application's VkPhysicalDevice".to_string(),
                reason: "not among the instance's physical devices".to_string(),
            })?;
        let name = chosen.info.name.clone();
        if !chosen.info.supports_host_import {
            return Err(VulkanError::NoDevice {
                selector: name.clone(),
                reason: format!("{name} lacks Vulkan 1.1 or VK_EXT_external_memory_host"),
            });
        }
        // SAFETY: live instance and device (the caller's contract); the name is a valid
        // NUL-terminated entry point name.
        let import_fn = unsafe {
            instance.get_device_proc_addr(device, c"vkGetMemoryHostPointerPropertiesEXT".as_ptr())
        };
        if import_fn.is_none() {
            return Err(VulkanError::NoDevice {
                selector: name.clone(),
                reason: "the VkDevice was created without VK_EXT_external_memory_host \
                         (add it to ppEnabledExtensionNames)"
                    .to_string(),
            });
        }
        // SAFETY: as above.
        let device = unsafe { ash::Device::load(instance.fp_v1_0(), device) };
        let host_ext = ash::ext::external_memory_host::Device::new(&instance, &device);
        // SAFETY: `physical` belongs to this instance (found above).
        let (memory_props, props) = unsafe {
            (
                instance.get_physical_device_memory_properties(physical),
                instance.get_physical_device_properties(physical),
            )
        };
        tracing::debug!(device = %name, "using an application's Vulkan device");
        Ok(VulkanBackend {
            label: format!("vulkan:{name}"),
            kernels: None,
            live: Mutex::new(HashMap::new()),
            allows_overlap: true,
            ctx: Context {
                name,
                _entry: entry,
                instance,
                device,
                host_ext,
                queue_family: 0,
                memory_props,
                limits: props.limits,
                import_alignment: chosen.info.import_alignment.max(1),
                max_allocation: chosen.max_allocation,
                owned: false,
            },
        })
    }

    /// Every physical device the loader reports, with whether it can import host memory.
    pub fn list_devices() -> Result<Vec<DeviceInfo>, VulkanError> {
        let entry = load_entry()?;
        let instance = create_instance(&entry)?;
        let result = candidates(&instance).map(|c| c.into_iter().map(|c| c.info).collect());
        // SAFETY: no device was created from this instance.
        unsafe { instance.destroy_instance(None) };
        result
    }

    /// The device's name (`deviceName`), e.g. "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub fn device_name(&self) -> &str {
        &self.ctx.name
    }

    /// Whether this is Mesa's CPU driver, where an import is bookkeeping only (the pointer
    /// is used directly; nothing is pinned).
    pub fn is_lavapipe(&self) -> bool {
        self.ctx.name.contains("llvmpipe")
    }

    /// `minImportedHostPointerAlignment`: registrations must start and end on it.
    pub fn import_alignment(&self) -> u64 {
        self.ctx.import_alignment
    }

    /// Imports that are live now (registered and not yet deregistered).
    pub fn live_imports(&self) -> usize {
        self.live.lock().len()
    }

    /// The raw ash device, for callers that record their own commands on an import.
    pub fn device(&self) -> &ash::Device {
        &self.ctx.device
    }

    /// Imports `range` (see the [module docs](self)); what [`Backend::register`] calls.
    pub fn import(&self, range: Range) -> Result<VulkanImport, VulkanError> {
        let ctx = &self.ctx;
        let align = ctx.import_alignment;
        if !(range.start() as u64).is_multiple_of(align)
            || !(range.len() as u64).is_multiple_of(align)
        {
            return Err(VulkanError::Misaligned {
                device: ctx.name.clone(),
                range,
                alignment: align,
            });
        }
        let size = range.len() as u64;
        let mut ext_buffer =
            vk::ExternalMemoryBufferCreateInfo::default().handle_types(HOST_ALLOCATION);
        let buffer_info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut ext_buffer);
        // SAFETY: valid create info; the buffer is destroyed on every later error path.
        let buffer = unsafe { ctx.device.create_buffer(&buffer_info, None) }
            .map_err(|e| VulkanError::vk(&ctx.name, "vkCreateBuffer", e))?;
        let destroy_buffer = || {
            // SAFETY: the buffer is ours, unbound or bound to memory freed after it, and
            // no command uses it yet.
            unsafe { ctx.device.destroy_buffer(buffer, None) }
        };

        let mut host_props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: the function pointer was loaded for this device (extension enabled);
        // the pointer is only inspected by the driver, and `host_props` outlives the call.
        let rc = unsafe {
            (ctx.host_ext.fp().get_memory_host_pointer_properties_ext)(
                ctx.device.handle(),
                HOST_ALLOCATION,
                range.start() as *const c_void,
                &mut host_props,
            )
        };
        if rc != vk::Result::SUCCESS {
            destroy_buffer();
            return Err(VulkanError::vk(
                &ctx.name,
                "vkGetMemoryHostPointerPropertiesEXT",
                rc,
            ));
        }
        // SAFETY: live buffer of this device.
        let reqs = unsafe { ctx.device.get_buffer_memory_requirements(buffer) };
        let bits = host_props.memory_type_bits & reqs.memory_type_bits;
        let Some(type_index) = ctx.memory_type(bits, vk::MemoryPropertyFlags::HOST_COHERENT) else {
            destroy_buffer();
            return Err(VulkanError::NoMemoryType {
                device: ctx.name.clone(),
                range,
                host_bits: host_props.memory_type_bits,
                buffer_bits: reqs.memory_type_bits,
            });
        };

        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(HOST_ALLOCATION)
            .host_pointer(range.start() as *mut c_void);
        let alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(size)
            .memory_type_index(type_index)
            .push_next(&mut import);
        // SAFETY: the pointer and size are aligned to minImportedHostPointerAlignment
        // (checked above) and the memory type comes from the host-pointer query. The
        // caller (the manager) keeps the range registered only while it is mapped, and
        // frees the import before reporting the range released.
        let memory = match unsafe { ctx.device.allocate_memory(&alloc, None) } {
            Ok(m) => m,
            Err(e) => {
                destroy_buffer();
                return Err(VulkanError::vk(&ctx.name, "vkAllocateMemory", e));
            }
        };
        // SAFETY: both objects are ours and unbound; offset 0 satisfies any alignment.
        if let Err(e) = unsafe { ctx.device.bind_buffer_memory(buffer, memory, 0) } {
            destroy_buffer();
            // SAFETY: memory is ours and no longer referenced by the destroyed buffer.
            unsafe { ctx.device.free_memory(memory, None) };
            return Err(VulkanError::vk(&ctx.name, "vkBindBufferMemory", e));
        }
        self.live.lock().insert(memory, buffer);
        tracing::trace!(device = %ctx.name, %range, memory_type = type_index, "imported host range");
        Ok(VulkanImport {
            memory,
            buffer,
            offset: 0,
            size,
            range,
        })
    }

    /// Frees an import made by [`VulkanBackend::import`]; what [`Backend::deregister`] calls.
    pub fn release(&self, import: VulkanImport) -> Result<(), VulkanError> {
        let Some(buffer) = self.live.lock().remove(&import.memory) else {
            return Err(VulkanError::UnknownImport {
                device: self.ctx.name.clone(),
                range: import.range,
            });
        };
        // The kernels wait for their fence before returning, so no command of ours still
        // uses the buffer here.
        // SAFETY: the buffer and memory were created by `import` and are destroyed once
        // (removed from `live` above); buffer first, then its memory.
        unsafe {
            self.ctx.device.destroy_buffer(buffer, None);
            self.ctx.device.free_memory(import.memory, None);
        }
        tracing::trace!(device = %self.ctx.name, range = %import.range, "freed import");
        Ok(())
    }

    pub(crate) fn kernels(&self) -> Result<&Kernels, VulkanError> {
        self.kernels.as_ref().ok_or_else(|| VulkanError::NoKernels {
            device: self.ctx.name.clone(),
        })
    }
}

impl Backend for VulkanBackend {
    type Translation = VulkanImport;

    fn name(&self) -> &str {
        &self.label
    }

    fn capabilities(&self) -> Capabilities {
        let alignment = (self.ctx.import_alignment as usize)
            .max(umm::page_size())
            .next_power_of_two();
        let max = if self.ctx.max_allocation == 0 {
            usize::MAX
        } else {
            usize::try_from(self.ctx.max_allocation).unwrap_or(usize::MAX)
        };
        Capabilities {
            allows_overlap: self.allows_overlap,
            alignment,
            max_registration: max & !(alignment - 1),
            // A host-pointer import may accept unmapped memory: the manager checks.
            rejects_unmapped: false,
        }
    }

    fn register(&self, range: Range) -> Result<VulkanImport, BackendError> {
        self.import(range).map_err(Into::into)
    }

    fn deregister(&self, range: Range, translation: VulkanImport) -> Result<(), BackendError> {
        debug_assert_eq!(range, translation.range);
        self.release(translation).map_err(Into::into)
    }
}

impl Drop for VulkanBackend {
    fn drop(&mut self) {
        if let Some(kernels) = self.kernels.as_mut() {
            // Our own device: wait for our kernels (an application's device may be busy
            // with the application's work, which is none of ours to wait for).
            // SAFETY: live device; waiting is always allowed.
            if let Err(e) = unsafe { self.ctx.device.device_wait_idle() } {
                tracing::warn!(device = %self.ctx.name, error = %e, "vkDeviceWaitIdle failed in drop");
            }
            kernels.destroy(&self.ctx);
        }
        let live = std::mem::take(&mut *self.live.lock());
        if !live.is_empty() {
            tracing::warn!(
                device = %self.ctx.name,
                count = live.len(),
                "freeing imports that were never deregistered"
            );
        }
        for (memory, buffer) in live {
            // SAFETY: each pair was created by `import`, is not in use (device idle) and is
            // destroyed once: it was taken out of the map.
            unsafe {
                self.ctx.device.destroy_buffer(buffer, None);
                self.ctx.device.free_memory(memory, None);
            }
        }
        // `ctx` drops after this body: device, then instance.
    }
}

impl fmt::Debug for VulkanBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VulkanBackend")
            .field("device", &self.ctx.name)
            .field("import_alignment", &self.ctx.import_alignment)
            .field("live_imports", &self.live_imports())
            .finish()
    }
}
