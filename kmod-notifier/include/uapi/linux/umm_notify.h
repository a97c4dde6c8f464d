/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note OR MIT */
/*
 * umm_notify: user ABI of /dev/umm_notify, the umm project's MMU interval
 * notifier device.
 *
 * One open file binds the opening process's mm; every use of it from another
 * mm (a forked child, or after execve() of an inherited fd) fails with EPERM
 * (poll: POLLERR), so a child can neither remove the parent's watches nor
 * read its records. Each WATCH inserts one mmu_interval_notifier over
 * [start, start + len) and returns the id the module allocated for it (dense,
 * 1..max_watches). WATCH returns only after every invalidation of the mm that
 * was already running has finished; every later invalidation of a watched
 * range (munmap, mremap, MAP_FIXED over it, madvise(MADV_DONTNEED), COW break,
 * migration, exit, ...) appends one struct umm_notify_record to the file's
 * ring and bumps the generation in the mmap()able page, both before the
 * causing operation returns. read()
 * returns records; poll() reports EPOLLIN while records are pending. When the
 * ring is full, the file records an overflow instead: the next read() returns
 * one record of kind UMM_NOTIFY_EVENT_OVERFLOW (meaning "everything may have
 * changed"), the pending records are dropped and recording resumes.
 *
 * This header is the source of truth; the Rust crate umm-kmod mirrors it and
 * tests the mirror against it. All fields are __u64/__u32 with explicit
 * padding; reserved fields and flags must be zero.
 */
#ifndef _UAPI_LINUX_UMM_NOTIFY_H
#define _UAPI_LINUX_UMM_NOTIFY_H

#include <linux/ioctl.h>
#include <linux/types.h>

/*
 * Bumped on every incompatible change of anything in this file.
 * 2: ids allocated by the module (WATCH returns it; was a caller cookie),
 *    every use from another mm fails with EPERM.
 */
#define UMM_NOTIFY_ABI_VERSION 2

#define UMM_NOTIFY_DEVICE "/dev/umm_notify"

/**
 * struct umm_notify_watch - argument of UMM_NOTIFY_IOC_WATCH
 * @start: (in) first byte of the range; page aligned
 * @len: (in) length in bytes; page aligned, non-zero, start + len must not
 *	 overflow or exceed the user address space
 * @id: (in) must be 0; (out) the watch's id, 1..max_watches, unique in this
 *	open file while the watch exists (reused after UNWATCH)
 * @flags: (in) must be 0
 */
struct umm_notify_watch {
	__u64 start;
	__u64 len;
	__u64 id;
	__u64 flags;
};

/**
 * struct umm_notify_unwatch - argument of UMM_NOTIFY_IOC_UNWATCH
 * @id: (in) id of a watch of this file, as returned by WATCH
 * @flags: (in) must be 0
 */
struct umm_notify_unwatch {
	__u64 id;
	__u64 flags;
};

/**
 * struct umm_notify_info - argument of UMM_NOTIFY_IOC_INFO
 * @abi_version: (out) UMM_NOTIFY_ABI_VERSION of the module
 * @record_size: (out) sizeof(struct umm_notify_record)
 * @ring_entries: (out) capacity of this file's ring
 * @max_watches: (out) most watches one file may hold
 * @watches: (out) watches this file holds now
 * @shared_size: (out) bytes to mmap() for struct umm_notify_shared
 */
struct umm_notify_info {
	__u32 abi_version;
	__u32 record_size;
	__u32 ring_entries;
	__u32 max_watches;
	__u64 watches;
	__u64 shared_size;
};

/*
 * Event kinds. 0 is reserved; 1..8 are the kernel's enum mmu_notifier_event
 * plus one, so no kind is lost if the kernel grows new ones (reported as
 * UMM_NOTIFY_EVENT_OTHER). Nothing is filtered: the module records every kind,
 * and a consumer that keeps device registrations must treat every kind as an
 * invalidation (umm does): the kind is the kernel's hint, not a contract.
 *
 * What Linux 6.1 (Debian 12) reports, from its callers of
 * mmu_notifier_range_init():
 *  UNMAP: munmap(), mremap() move and shrink, mmap(MAP_FIXED) over the range,
 *	the OOM reaper, hugetlb unmaps.
 *  CLEAR: madvise(MADV_DONTNEED, MADV_FREE, MADV_REMOVE), truncation and hole
 *	punching of a mapped file, the COW break of a write after fork(),
 *	reclaim and swap-out, page migration of every ordinary kind (NUMA
 *	balancing, compaction, move_pages(), memory hot-unplug), KSM merging,
 *	THP split and collapse, uprobes.
 *  PROTECTION_VMA: mprotect().
 *  PROTECTION_PAGE: fork() write-protecting the parent's private pages,
 *	writeback cleaning dirty shared file pages (page_mkclean).
 *  SOFT_DIRTY: writing 4 to /proc/<pid>/clear_refs.
 *  RELEASE: the mm is torn down (exit, execve()).
 *  MIGRATE: only migration to or from device-private memory (migrate_vma_*,
 *	HMM drivers); ordinary page migration arrives as CLEAR.
 *  EXCLUSIVE: make_device_exclusive_range() (device atomics) and its undo.
 * KSM merging and ordinary migration thus arrive as CLEAR, not as
 * PROTECTION_PAGE or MIGRATE; other kernels may differ.
 */
enum umm_notify_event {
	UMM_NOTIFY_EVENT_NONE = 0,
	UMM_NOTIFY_EVENT_UNMAP = 1,		/* munmap, mremap, MAP_FIXED */
	UMM_NOTIFY_EVENT_CLEAR = 2,		/* madvise, COW, reclaim, KSM, migration */
	UMM_NOTIFY_EVENT_PROTECTION_VMA = 3,	/* mprotect */
	UMM_NOTIFY_EVENT_PROTECTION_PAGE = 4,	/* fork write-protect, page_mkclean */
	UMM_NOTIFY_EVENT_SOFT_DIRTY = 5,	/* soft-dirty tracking reset */
	UMM_NOTIFY_EVENT_RELEASE = 6,		/* the mm is torn down (exit) */
	UMM_NOTIFY_EVENT_MIGRATE = 7,		/* device-private migration only */
	UMM_NOTIFY_EVENT_EXCLUSIVE = 8,		/* device exclusive access */
	UMM_NOTIFY_EVENT_OTHER = 254,		/* a kind newer than this header */
	UMM_NOTIFY_EVENT_OVERFLOW = 255,	/* records lost: invalidate all */
};

/**
 * struct umm_notify_record - one invalidation, as returned by read()
 * @id: id of the watch it hit (0 for OVERFLOW)
 * @start: first byte invalidated, clipped to the watch
 * @end: one past the last byte invalidated, clipped to the watch
 *	 (OVERFLOW: start 0, end ~0)
 * @kind: an enum umm_notify_event
 * @flags: 0
 * @seq: value of the generation right after this event was recorded
 */
struct umm_notify_record {
	__u64 id;
	__u64 start;
	__u64 end;
	__u32 kind;
	__u32 flags;
	__u64 seq;
};

/**
 * struct umm_notify_shared - the read-only page mmap()ed at offset 0
 * @generation: bumped (release order) by every recorded event, before the
 *		causing operation returns; a reader that sees an unchanged
 *		value knows no watched range changed since it last looked
 * @overflows: how many events found the ring full (cumulative)
 * @abi_version: UMM_NOTIFY_ABI_VERSION
 * @__pad: reserved, zero
 */
struct umm_notify_shared {
	__u64 generation;
	__u64 overflows;
	__u32 abi_version;
	__u32 __pad;
};

#define UMM_NOTIFY_IOC_MAGIC 0xB9

#define UMM_NOTIFY_IOC_WATCH	_IOWR(UMM_NOTIFY_IOC_MAGIC, 1, struct umm_notify_watch)
#define UMM_NOTIFY_IOC_UNWATCH	_IOW(UMM_NOTIFY_IOC_MAGIC, 2, struct umm_notify_unwatch)
#define UMM_NOTIFY_IOC_INFO	_IOR(UMM_NOTIFY_IOC_MAGIC, 3, struct umm_notify_info)

#endif /* _UAPI_LINUX_UMM_NOTIFY_H */
