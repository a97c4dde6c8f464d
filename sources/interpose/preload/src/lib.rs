//! # umm-preload: the umm interposition hooks as an `LD_PRELOAD` library
//!
//! `libumm_preload.so` exports `munmap`, `mmap`, `mmap64`, `mremap`, `madvise`, `shmdt`,
//! `shmat`, `brk`, `sbrk`, `free`, `realloc`, `reallocarray`, `malloc_trim` and
//! `umm_interpose_set_sink` (see [`umm_interpose`]). Each hook reports
//! the affected range to the manager installed with `umm_interpose::install` (which finds
//! this library through `dlsym(RTLD_DEFAULT, "umm_interpose_set_sink")`) and then calls
//! the next definition (`dlsym(RTLD_NEXT)`: libc, or another interposer loaded after it).
//!
//! ```text
//! LD_PRELOAD=target/release/libumm_preload.so ./my-rdma-app
//! ```
//!
//! Load it with `LD_PRELOAD`, not `dlopen`: a preloaded library's thread-local recursion
//! flag lives in static TLS, while a `dlopen`ed one's is allocated lazily per thread by
//! `__tls_get_addr` (which may call `malloc` on a thread's first hook).
//!
//! Before a manager is installed, and in processes that never install one, the hooks only
//! pass the call on.

umm_interpose::export_hooks!();
