//! The two libucm entry points this crate uses (`ucm/api/ucm.h`, UCX 1.13).

use std::ffi::{c_int, c_void};

/// `UCM_EVENT_VM_UNMAPPED` of `ucm_event_type_t`: the aggregated unmap event the rcache
/// subscribes to.
pub const UCM_EVENT_VM_UNMAPPED: c_int = 1 << 17;

// libucm leaves symbols for libucs to define (ucs_load_modules...): link both.
#[link(name = "ucs")]
extern "C" {}

#[link(name = "ucm")]
extern "C" {
    fn ucm_set_external_event(events: c_int);
    fn ucm_vm_munmap(addr: *mut c_void, length: usize);
}

/// Declares `UCM_EVENT_VM_UNMAPPED` external: handlers added afterwards (the rcache's)
/// install no unmap hooks; the events come from [`vm_munmap`].
pub(crate) fn set_external_vm_unmapped() {
    // SAFETY: FFI call with a plain bit mask; libucm takes its own lock.
    unsafe { ucm_set_external_event(UCM_EVENT_VM_UNMAPPED) }
}

/// Runs every `UCM_EVENT_VM_UNMAPPED` handler for `[addr, addr + len)`.
pub(crate) fn vm_munmap(addr: usize, len: usize) {
    // SAFETY: FFI call; ucm only passes the address and length to its handlers (the rcache
    // looks the range up in its page table), it never dereferences them.
    unsafe { ucm_vm_munmap(addr as *mut c_void, len) }
}
