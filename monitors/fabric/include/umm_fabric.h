/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * umm-fabric: umm's notifier sources as libfabric's memory monitor.
 *
 * Link with -lumm_fabric (libumm_fabric.so), or LD_PRELOAD it into an unmodified
 * program (its constructor installs the monitor; UMM_FABRIC_AUTO=0 disables that).
 * Environment: UMM_SOURCE=auto|kmod|uffd, UMM_FABRIC_INTERVAL_MS, UMM_FABRIC_VERBOSE.
 * Leave FI_MR_CACHE_MONITOR unset.
 */
#ifndef UMM_FABRIC_H
#define UMM_FABRIC_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Import umm's monitor into libfabric (fi_open("mr_cache") + fi_import_fid). Call it
 * before the first fi_domain(). Returns 0 (also when already installed) or a negative
 * errno: -EBUSY (libfabric has a monitor in use, or FI_MR_CACHE_MONITOR is set),
 * -ENOSYS (no libfabric), -EINVAL (a malformed UMM_* variable).
 */
int umm_fabric_install(void);

/* 1 once umm_fabric_install() succeeded in this process, else 0. */
int umm_fabric_installed(void);

/*
 * "kmod" or "uffd": the source the monitor runs on, once libfabric started it (at the
 * first domain with an MR cache); NULL before.
 */
const char *umm_fabric_source(void);

#ifdef __cplusplus
}
#endif

#endif /* UMM_FABRIC_H */
