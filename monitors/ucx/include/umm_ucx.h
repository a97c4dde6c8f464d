/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * umm_ucx.h: UCX's registration cache invalidated by umm's notifier sources.
 *
 * Link with -lumm_ucx BEFORE -lucp (its uct_md_mem_reg and ibv_reg_mr* come
 * first), call umm_ucx_install() before ucp_init(). Or preload the library into
 * an unmodified program: LD_PRELOAD=libumm_ucx.so (UMM_UCX_AUTO=0 turns the
 * constructor off). Environment: UMM_SOURCE=kmod|uffd (default: the kernel
 * module, else userfaultfd), UMM_UCX_STRICT=0 (register what the source cannot
 * protect instead of failing the registration), UMM_UCX_KEEP_UCM_HOOKS=1 (keep
 * UCX's own unmap hooks as well), UMM_UCX_STATS=1 (counters at exit, stderr).
 */
#ifndef UMM_UCX_H
#define UMM_UCX_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Counters of the installed monitor. */
struct umm_ucx_stats {
	uint64_t watched;        /* registrations watched so far */
	uint64_t live;           /* registrations watched now */
	uint64_t refused;        /* registrations refused (strict mode) */
	uint64_t unprotected;    /* registered unwatched (UMM_UCX_STRICT=0) */
	uint64_t drains;         /* times pending events were delivered */
	uint64_t invalidations;  /* ranges handed to ucm_vm_munmap() */
	uint64_t invalidate_all; /* source overflows (everything invalidated) */
};

/* Installs the monitor once per process; 0 on success, -1 on failure. */
int umm_ucx_install(void);

/* Why the last failed umm_ucx_install() failed, or NULL. */
const char *umm_ucx_last_error(void);

/* "kmod" or "uffd" once installed, else NULL. */
const char *umm_ucx_source(void);

/* Copies the counters into *out; -1 when not installed or out is NULL. */
int umm_ucx_stats(struct umm_ucx_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* UMM_UCX_H */
