//! Hand-written mirror of `kmod-notifier/include/uapi/linux/umm_notify.h`.
//!
//! The C header is the source of truth. Sizes are checked at compile time below, and the
//! test `layout_matches_c_header` compiles a C program against the header with the host's
//! C compiler and compares every size, offset, constant and ioctl number with this file.

#![allow(non_camel_case_types)]

// The ioctl encoding below is the asm-generic one (x86, arm64; not powerpc, mips, sparc), and
// the generation page is read with `AtomicU64::load(Acquire)` on read-only memory, which is a
// plain `mov` on x86_64 and an `ldar` on aarch64 (the std docs promise read-only safety only
// for relaxed loads in general).
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!(
    "umm-kmod supports x86_64 and aarch64 (ioctl encoding, atomic loads of a read-only page)"
);

use std::mem::size_of;

/// `UMM_NOTIFY_ABI_VERSION`: bumped on every incompatible change of the header (2: ids
/// allocated by the module, every use from another address space refused).
pub const UMM_NOTIFY_ABI_VERSION: u32 = 2;

/// `UMM_NOTIFY_DEVICE`: the device node.
pub const UMM_NOTIFY_DEVICE: &str = "/dev/umm_notify";

/// `struct umm_notify_watch`: argument of [`UMM_NOTIFY_IOC_WATCH`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct umm_notify_watch {
    /// (in) first byte; page aligned.
    pub start: u64,
    /// (in) length; page aligned, non-zero, no overflow.
    pub len: u64,
    /// (in) must be 0; (out) the id the module allocated (1..=max_watches, unique in the
    /// open file while the watch exists).
    pub id: u64,
    /// (in) must be 0.
    pub flags: u64,
}

/// `struct umm_notify_unwatch`: argument of [`UMM_NOTIFY_IOC_UNWATCH`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct umm_notify_unwatch {
    /// (in) id of a watch of this file, as returned by WATCH.
    pub id: u64,
    /// (in) must be 0.
    pub flags: u64,
}

/// `struct umm_notify_info`: argument of [`UMM_NOTIFY_IOC_INFO`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct umm_notify_info {
    /// (out) the module's ABI version.
    pub abi_version: u32,
    /// (out) `size_of::<umm_notify_record>()` as the module sees it.
    pub record_size: u32,
    /// (out) capacity of this file's ring.
    pub ring_entries: u32,
    /// (out) most watches one file may hold.
    pub max_watches: u32,
    /// (out) watches this file holds now.
    pub watches: u64,
    /// (out) bytes to `mmap` for [`umm_notify_shared`].
    pub shared_size: u64,
}

/// `enum umm_notify_event` value 0: reserved.
pub const UMM_NOTIFY_EVENT_NONE: u32 = 0;
/// munmap, mremap move or shrink, `mmap(MAP_FIXED)` over the range.
pub const UMM_NOTIFY_EVENT_UNMAP: u32 = 1;
/// Page table entries cleared: madvise, COW break, reclaim, truncate, and on Linux 6.1
/// also KSM merging and every ordinary page migration (see [`crate::EventKind`]).
pub const UMM_NOTIFY_EVENT_CLEAR: u32 = 2;
/// mprotect.
pub const UMM_NOTIFY_EVENT_PROTECTION_VMA: u32 = 3;
/// Write-protection of pages: fork's write-protect of the parent, `page_mkclean`.
pub const UMM_NOTIFY_EVENT_PROTECTION_PAGE: u32 = 4;
/// Soft-dirty tracking reset.
pub const UMM_NOTIFY_EVENT_SOFT_DIRTY: u32 = 5;
/// The address space is torn down (exit).
pub const UMM_NOTIFY_EVENT_RELEASE: u32 = 6;
/// Migration to or from device-private memory (ordinary migration arrives as CLEAR).
pub const UMM_NOTIFY_EVENT_MIGRATE: u32 = 7;
/// Device-exclusive access.
pub const UMM_NOTIFY_EVENT_EXCLUSIVE: u32 = 8;
/// A kernel event kind newer than the header.
pub const UMM_NOTIFY_EVENT_OTHER: u32 = 254;
/// Records were lost: invalidate everything.
pub const UMM_NOTIFY_EVENT_OVERFLOW: u32 = 255;

/// `struct umm_notify_record`: one invalidation, as returned by `read()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct umm_notify_record {
    /// Id of the watch it hit (0 for an overflow).
    pub id: u64,
    /// First byte invalidated, clipped to the watch.
    pub start: u64,
    /// One past the last byte invalidated, clipped to the watch.
    pub end: u64,
    /// A `UMM_NOTIFY_EVENT_*` value.
    pub kind: u32,
    /// 0.
    pub flags: u32,
    /// The generation right after this event was recorded.
    pub seq: u64,
}

/// `struct umm_notify_shared`: the read-only page mapped at offset 0.
#[repr(C)]
#[derive(Debug, Default)]
pub struct umm_notify_shared {
    /// Bumped (release order) by every recorded event, before the causing syscall returns.
    pub generation: u64,
    /// Events that found the ring full (cumulative).
    pub overflows: u64,
    /// The module's ABI version.
    pub abi_version: u32,
    /// Reserved, zero.
    pub __pad: u32,
}

/// `UMM_NOTIFY_IOC_MAGIC`.
pub const UMM_NOTIFY_IOC_MAGIC: u32 = 0xB9;

const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Linux's `_IOC(dir, type, nr, size)` (the asm-generic layout used by x86 and arm64).
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `UMM_NOTIFY_IOC_WATCH`: `_IOWR(0xB9, 1, struct umm_notify_watch)`.
pub const UMM_NOTIFY_IOC_WATCH: u32 = ioc(
    IOC_READ | IOC_WRITE,
    UMM_NOTIFY_IOC_MAGIC,
    1,
    size_of::<umm_notify_watch>(),
);
/// `UMM_NOTIFY_IOC_UNWATCH`: `_IOW(0xB9, 2, struct umm_notify_unwatch)`.
pub const UMM_NOTIFY_IOC_UNWATCH: u32 = ioc(
    IOC_WRITE,
    UMM_NOTIFY_IOC_MAGIC,
    2,
    size_of::<umm_notify_unwatch>(),
);
/// `UMM_NOTIFY_IOC_INFO`: `_IOR(0xB9, 3, struct umm_notify_info)`.
pub const UMM_NOTIFY_IOC_INFO: u32 = ioc(
    IOC_READ,
    UMM_NOTIFY_IOC_MAGIC,
    3,
    size_of::<umm_notify_info>(),
);

const _: () = {
    assert!(size_of::<umm_notify_watch>() == 32);
    assert!(size_of::<umm_notify_unwatch>() == 16);
    assert!(size_of::<umm_notify_info>() == 32);
    assert!(size_of::<umm_notify_record>() == 40);
    assert!(size_of::<umm_notify_shared>() == 24);
    assert!(UMM_NOTIFY_IOC_WATCH == 0xC020_B901);
    assert!(UMM_NOTIFY_IOC_UNWATCH == 0x4010_B902);
    assert!(UMM_NOTIFY_IOC_INFO == 0x8020_B903);
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of};
    use std::path::PathBuf;
    use std::process::Command;

    /// Every value the C side can print, with the Rust side's value.
    fn rust_values() -> Vec<(&'static str, u64)> {
        macro_rules! size {
            ($t:ident) => {
                (concat!("sizeof ", stringify!($t)), size_of::<$t>() as u64)
            };
        }
        macro_rules! align {
            ($t:ident) => {
                (concat!("alignof ", stringify!($t)), align_of::<$t>() as u64)
            };
        }
        macro_rules! off {
            ($t:ident, $f:ident) => {
                (
                    concat!("offsetof ", stringify!($t), ".", stringify!($f)),
                    offset_of!($t, $f) as u64,
                )
            };
        }
        macro_rules! val {
            ($c:ident) => {
                (stringify!($c), $c as u64)
            };
        }
        vec![
            size!(umm_notify_watch),
            align!(umm_notify_watch),
            off!(umm_notify_watch, start),
            off!(umm_notify_watch, len),
            off!(umm_notify_watch, id),
            off!(umm_notify_watch, flags),
            size!(umm_notify_unwatch),
            off!(umm_notify_unwatch, id),
            off!(umm_notify_unwatch, flags),
            size!(umm_notify_info),
            off!(umm_notify_info, abi_version),
            off!(umm_notify_info, record_size),
            off!(umm_notify_info, ring_entries),
            off!(umm_notify_info, max_watches),
            off!(umm_notify_info, watches),
            off!(umm_notify_info, shared_size),
            size!(umm_notify_record),
            align!(umm_notify_record),
            off!(umm_notify_record, id),
            off!(umm_notify_record, start),
            off!(umm_notify_record, end),
            off!(umm_notify_record, kind),
            off!(umm_notify_record, flags),
            off!(umm_notify_record, seq),
            size!(umm_notify_shared),
            off!(umm_notify_shared, generation),
            off!(umm_notify_shared, overflows),
            off!(umm_notify_shared, abi_version),
            off!(umm_notify_shared, __pad),
            val!(UMM_NOTIFY_ABI_VERSION),
            val!(UMM_NOTIFY_IOC_MAGIC),
            val!(UMM_NOTIFY_IOC_WATCH),
            val!(UMM_NOTIFY_IOC_UNWATCH),
            val!(UMM_NOTIFY_IOC_INFO),
            val!(UMM_NOTIFY_EVENT_NONE),
            val!(UMM_NOTIFY_EVENT_UNMAP),
            val!(UMM_NOTIFY_EVENT_CLEAR),
            val!(UMM_NOTIFY_EVENT_PROTECTION_VMA),
            val!(UMM_NOTIFY_EVENT_PROTECTION_PAGE),
            val!(UMM_NOTIFY_EVENT_SOFT_DIRTY),
            val!(UMM_NOTIFY_EVENT_RELEASE),
            val!(UMM_NOTIFY_EVENT_MIGRATE),
            val!(UMM_NOTIFY_EVENT_EXCLUSIVE),
            val!(UMM_NOTIFY_EVENT_OTHER),
            val!(UMM_NOTIFY_EVENT_OVERFLOW),
        ]
    }

    /// The C expression printed for one name of [`rust_values`].
    fn c_expr(name: &str) -> String {
        if let Some(t) = name.strip_prefix("sizeof ") {
            format!("sizeof(struct {t})")
        } else if let Some(t) = name.strip_prefix("alignof ") {
            format!("_Alignof(struct {t})")
        } else if let Some(tf) = name.strip_prefix("offsetof ") {
            let (t, f) = tf.split_once('.').expect("type.field");
            format!("offsetof(struct {t}, {f})")
        } else {
            name.to_string()
        }
    }

    #[test]
    fn device_path_matches_header() {
        let header = std::fs::read_to_string(header_path()).expect("read the uapi header");
        assert!(header.contains(&format!(
            "#define UMM_NOTIFY_DEVICE \"{UMM_NOTIFY_DEVICE}\""
        )));
    }

    fn header_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../include/uapi/linux/umm_notify.h")
    }

    /// Compiles a C program that includes the uapi header and prints every size, offset,
    /// constant and ioctl number, and compares them with the Rust mirror.
    #[test]
    fn layout_matches_c_header() {
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let values = rust_values();
        let dir = std::env::temp_dir().join(format!("umm-kmod-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut src = String::from(
            "#include <stddef.h>\n#include <stdio.h>\n#include \"umm_notify.h\"\nint main(void)\n{\n",
        );
        for (name, _) in &values {
            src += &format!(
                "\tprintf(\"%s=%llu\\n\", \"{name}\", (unsigned long long)({}));\n",
                c_expr(name)
            );
        }
        src += "\treturn 0;\n}\n";
        std::fs::write(dir.join("abi.c"), src).unwrap();
        let include = header_path().parent().unwrap().to_path_buf();
        let exe = dir.join("abi");
        let built = Command::new(&cc)
            .arg("-std=gnu11")
            .arg("-I")
            .arg(&include)
            .arg(dir.join("abi.c"))
            .arg("-o")
            .arg(&exe)
            .status();
        match built {
            Err(e) => {
                println!("SKIP layout_matches_c_header: no C compiler ({cc}: {e})");
                return;
            }
            Ok(s) => assert!(
                s.success(),
                "compiling the ABI probe against {include:?} failed"
            ),
        }
        let out = Command::new(&exe).output().expect("run the ABI probe");
        std::fs::remove_dir_all(&dir).ok();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut checked = 0;
        for line in text.lines() {
            let (name, c) = line.split_once('=').unwrap();
            let c: u64 = c.parse().unwrap();
            let rust = values.iter().find(|(n, _)| *n == name).unwrap().1;
            assert_eq!(rust, c, "{name}: Rust mirror {rust:#x}, C header {c:#x}");
            checked += 1;
        }
        assert_eq!(checked, values.len());
    }
}
