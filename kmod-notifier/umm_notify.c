// SPDX-License-Identifier: GPL-2.0
/*
 * umm_notify - MMU interval notifier device for the umm registration cache.
 *
 * /dev/umm_notify lets a process learn, synchronously with the causing
 * operation, that a range it registered with a device (RDMA NIC, GPU) was
 * unmapped, remapped or had its pages replaced. The ABI is documented in
 * include/uapi/linux/umm_notify.h.
 *
 * Design:
 *
 *  - open() binds the caller's mm (mmgrab) and preallocates the file's ring
 *    of records and its shared generation page. Nothing is allocated in the
 *    notifier path. Every later use of the file (ioctl, read, poll, mmap)
 *    from another mm, e.g. a forked child holding the inherited fd, fails
 *    with -EPERM (poll: EPOLLERR): a child can neither remove the parent's
 *    watches nor consume its records.
 *  - WATCH inserts one mmu_interval_notifier under an id the module
 *    allocates (dense, 1..max_watches, so the index costs a few bytes per
 *    watch whatever user space calls it); UNWATCH removes it. Both run under
 *    ctx->lock (a mutex), which the notifier never takes.
 *  - WATCH returns only after any invalidation of the mm that was already
 *    running when the notifier was inserted has finished
 *    (mmu_interval_read_begin()): such an invalidation does not call the new
 *    notifier, so returning earlier would let user space register pages that
 *    are being torn down without ever hearing of it. Every invalidation that
 *    starts after the insertion calls the notifier.
 *  - umm_invalidate() runs inside every invalidation of a watched range,
 *    whoever causes it (the process itself, another task, reclaim, KSM,
 *    migration, exit): it takes only ctx->ring_lock (a spinlock that no
 *    sleeping path holds), appends a record, bumps the generation with
 *    release order and wakes readers. It never defers, never sleeps, never
 *    filters by caller or event kind.
 *  - A full ring sets ctx->overflow instead of dropping silently; read()
 *    then reports one OVERFLOW record ("invalidate everything") and discards
 *    the pending records, which that record covers.
 *  - release() (last close, including at exit) removes every notifier,
 *    waiting for running callbacks, and frees everything.
 *
 * Lock order: ctx->lock -> mmap_lock (taken inside
 * mmu_interval_notifier_insert()); ctx->read_lock -> mmap_lock (page faults
 * in copy_to_user()); ctx->ring_lock is innermost and is never held across
 * anything that sleeps or faults.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/fs.h>
#include <linux/log2.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#include <linux/xarray.h>

#include "include/uapi/linux/umm_notify.h"

static unsigned int ring_entries = 4096;
module_param(ring_entries, uint, 0444);
MODULE_PARM_DESC(ring_entries,
		 "records per open file, rounded up to a power of two (16..1048576, default 4096)");

/*
 * One watch costs about 140 bytes of kernel memory (a kmalloc-128 object plus
 * its share of the dense xarray), charged to the opener's memory cgroup: the
 * default bounds one open file's watches to about 36 MiB.
 */
static unsigned int max_watches = 1U << 18;
module_param(max_watches, uint, 0444);
MODULE_PARM_DESC(max_watches,
		 "watches one open file may hold (1..2^31, default 262144, about 140 bytes each)");

/**
 * struct umm_ctx - state of one open file of /dev/umm_notify
 * @mm: the opener's mm; mmgrab()ed in open, mmdrop()ed in release
 * @lock: serializes WATCH, UNWATCH and release; protects @watches and
 *	  @nr_watches. Never taken by the notifier.
 * @watches: id -> struct umm_watch (ids allocated by xa_alloc(), dense)
 * @nr_watches: number of entries in @watches
 * @read_lock: one reader of the ring at a time; only its holder advances
 *	       @head
 * @ring_lock: protects @head, @tail, @overflow and the writes to @shared;
 *	       innermost, never held while sleeping or faulting
 * @head: index of the oldest unread record (monotonic; slot = @head & @mask)
 * @tail: index of the next record to write (monotonic)
 * @mask: ring capacity - 1 (capacity is a power of two)
 * @overflow: an event found the ring full since the last OVERFLOW record
 * @ring: preallocated records
 * @shared_page: the page mapped read-only by mmap()
 * @shared: page_address(@shared_page)
 * @wq: readers and pollers waiting for records
 */
struct umm_ctx {
	struct mm_struct *mm;
	struct mutex lock; /* see kernel-doc above */
	struct xarray watches;
	u64 nr_watches;
	struct mutex read_lock; /* see kernel-doc above */
	spinlock_t ring_lock; /* see kernel-doc above */
	u64 head;
	u64 tail;
	u32 mask;
	bool overflow;
	struct umm_notify_record *ring;
	struct page *shared_page;
	struct umm_notify_shared *shared;
	wait_queue_head_t wq;
};

/**
 * struct umm_watch - one watched range
 * @mni: the interval notifier; inserted by WATCH, removed by UNWATCH/release
 * @ctx: the file it reports to
 * @id: its id in @ctx->watches, returned by WATCH and reported in records
 * @start: first byte watched
 * @end: one past the last byte watched
 */
struct umm_watch {
	struct mmu_interval_notifier mni;
	struct umm_ctx *ctx;
	u32 id;
	u64 start;
	u64 end;
};

static u32 umm_event_kind(enum mmu_notifier_event event)
{
	switch (event) {
	case MMU_NOTIFY_UNMAP:
		return UMM_NOTIFY_EVENT_UNMAP;
	case MMU_NOTIFY_CLEAR:
		return UMM_NOTIFY_EVENT_CLEAR;
	case MMU_NOTIFY_PROTECTION_VMA:
		return UMM_NOTIFY_EVENT_PROTECTION_VMA;
	case MMU_NOTIFY_PROTECTION_PAGE:
		return UMM_NOTIFY_EVENT_PROTECTION_PAGE;
	case MMU_NOTIFY_SOFT_DIRTY:
		return UMM_NOTIFY_EVENT_SOFT_DIRTY;
	case MMU_NOTIFY_RELEASE:
		return UMM_NOTIFY_EVENT_RELEASE;
	case MMU_NOTIFY_MIGRATE:
		return UMM_NOTIFY_EVENT_MIGRATE;
	case MMU_NOTIFY_EXCLUSIVE:
		return UMM_NOTIFY_EVENT_EXCLUSIVE;
	}
	return UMM_NOTIFY_EVENT_OTHER;
}

/**
 * umm_invalidate() - record one invalidation of a watched range
 * @mni: the watch's interval notifier
 * @range: what is being invalidated
 * @cur_seq: the notifier sequence for mmu_interval_set_seq()
 *
 * Context: any task (the process itself, another task, kswapd, ksmd, a
 * migration or compaction thread), possibly with @range not blockable. Takes
 * only ctx->ring_lock; allocates nothing; never sleeps.
 *
 * Return: always true (the event is recorded, or the overflow flag set).
 */
static bool umm_invalidate(struct mmu_interval_notifier *mni,
			   const struct mmu_notifier_range *range,
			   unsigned long cur_seq)
{
	struct umm_watch *w = container_of(mni, struct umm_watch, mni);
	struct umm_ctx *ctx = w->ctx;
	struct umm_notify_record *rec;
	u64 gen;

	spin_lock(&ctx->ring_lock);
	mmu_interval_set_seq(mni, cur_seq);
	gen = ctx->shared->generation + 1;
	if (ctx->tail - ctx->head > ctx->mask) {
		ctx->overflow = true;
		WRITE_ONCE(ctx->shared->overflows, ctx->shared->overflows + 1);
	} else {
		rec = &ctx->ring[ctx->tail & ctx->mask];
		rec->id = w->id;
		rec->start = max_t(u64, range->start, w->start);
		rec->end = min_t(u64, range->end, w->end);
		rec->kind = umm_event_kind(range->event);
		rec->flags = 0;
		rec->seq = gen;
		ctx->tail++;
	}
	/*
	 * Release: a reader that observes the new generation (acquire load of
	 * the mmap()ed page) and then calls read() finds the record, which is
	 * also published by ring_lock.
	 */
	smp_store_release(&ctx->shared->generation, gen);
	spin_unlock(&ctx->ring_lock);

	wake_up_interruptible_poll(&ctx->wq, EPOLLIN | EPOLLRDNORM);
	return true;
}

static const struct mmu_interval_notifier_ops umm_mni_ops = {
	.invalidate = umm_invalidate,
};

/*
 * Whether the caller may use @ctx: only from the mm bound at open. A forked
 * child (or a process after execve() of an inherited fd) gets -EPERM.
 */
static bool umm_same_mm(struct umm_ctx *ctx)
{
	return current->mm == ctx->mm;
}

/* Records (or an overflow) are waiting. Takes ctx->ring_lock. */
static bool umm_pending(struct umm_ctx *ctx)
{
	bool pending;

	spin_lock(&ctx->ring_lock);
	pending = ctx->overflow || ctx->tail != ctx->head;
	spin_unlock(&ctx->ring_lock);
	return pending;
}

/**
 * umm_ioctl_watch() - WATCH: insert an interval notifier under a new id
 * @ctx: the file's state
 * @arg: user pointer to struct umm_notify_watch; its id is written back
 *
 * Context: process context of the opener (checked by the caller); takes
 * ctx->lock, then mmap_lock inside mmu_interval_notifier_insert(), and may
 * sleep in mmu_interval_read_begin() until an invalidation of the mm that
 * was running at insertion time has finished.
 *
 * Return: 0, -EFAULT (bad pointer, or range beyond the address space),
 * -EINVAL (flags or id set, zero length, unaligned start or length),
 * -EOVERFLOW (start + len wraps), -ENOSPC (max_watches reached), -ENOMEM.
 */
static long umm_ioctl_watch(struct umm_ctx *ctx, void __user *arg)
{
	struct umm_notify_watch req;
	struct umm_watch *w;
	u32 id;
	int ret;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags || req.id)
		return -EINVAL;
	if (!req.len || !PAGE_ALIGNED(req.start) || !PAGE_ALIGNED(req.len))
		return -EINVAL;
	if (req.start + req.len < req.start)
		return -EOVERFLOW;
	if (req.start + req.len > ctx->mm->task_size)
		return -EFAULT;

	w = kzalloc(sizeof(*w), GFP_KERNEL_ACCOUNT);
	if (!w)
		return -ENOMEM;
	w->ctx = ctx;
	w->start = req.start;
	w->end = req.start + req.len;

	mutex_lock(&ctx->lock);
	ret = xa_alloc(&ctx->watches, &id, w, XA_LIMIT(1, max_watches),
		       GFP_KERNEL_ACCOUNT);
	if (ret) {
		if (ret == -EBUSY)
			ret = -ENOSPC;
		goto err_unlock;
	}
	w->id = id;
	ret = mmu_interval_notifier_insert(&w->mni, ctx->mm, req.start, req.len,
					   &umm_mni_ops);
	if (ret)
		goto err_erase;
	/*
	 * An invalidation already running when the notifier went in does not
	 * call it (the notifier waits on the mm's deferred list until every
	 * running invalidation ends). Wait for those to finish, as
	 * mmu_interval_notifier users do before reading pages: after this, the
	 * range holds what the running invalidations left, and every later
	 * invalidation calls umm_invalidate(). The sequence itself is not
	 * needed: user space reads the pages only after WATCH returns.
	 */
	mmu_interval_read_begin(&w->mni);
	/*
	 * Still under ctx->lock, so no other thread can remove the watch by
	 * guessing its id before we know whether the caller learnt it.
	 */
	req.id = id;
	if (copy_to_user(arg, &req, sizeof(req))) {
		ret = -EFAULT;
		goto err_remove;
	}
	ctx->nr_watches++;
	mutex_unlock(&ctx->lock);
	return 0;

err_remove:
	mmu_interval_notifier_remove(&w->mni);
err_erase:
	xa_erase(&ctx->watches, id);
err_unlock:
	mutex_unlock(&ctx->lock);
	kfree(w);
	return ret;
}

/**
 * umm_ioctl_unwatch() - UNWATCH: remove the interval notifier of an id
 * @ctx: the file's state
 * @arg: user pointer to struct umm_notify_unwatch
 *
 * Context: process context, may sleep: mmu_interval_notifier_remove() waits
 * for a running callback of this watch. Pairs with umm_ioctl_watch().
 *
 * Return: 0, -EFAULT, -EINVAL (flags set), -ENOENT (no such id).
 */
static long umm_ioctl_unwatch(struct umm_ctx *ctx, void __user *arg)
{
	struct umm_notify_unwatch req;
	struct umm_watch *w;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags)
		return -EINVAL;

	if (req.id > U32_MAX)
		return -ENOENT;
	mutex_lock(&ctx->lock);
	w = xa_erase(&ctx->watches, req.id);
	if (w)
		ctx->nr_watches--;
	mutex_unlock(&ctx->lock);
	if (!w)
		return -ENOENT;

	mmu_interval_notifier_remove(&w->mni);
	kfree(w);
	return 0;
}

static long umm_ioctl_info(struct umm_ctx *ctx, void __user *arg)
{
	struct umm_notify_info info;

	memset(&info, 0, sizeof(info));
	info.abi_version = UMM_NOTIFY_ABI_VERSION;
	info.record_size = sizeof(struct umm_notify_record);
	info.ring_entries = ctx->mask + 1;
	info.max_watches = max_watches;
	mutex_lock(&ctx->lock);
	info.watches = ctx->nr_watches;
	mutex_unlock(&ctx->lock);
	info.shared_size = PAGE_SIZE;
	if (copy_to_user(arg, &info, sizeof(info)))
		return -EFAULT;
	return 0;
}

static long umm_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct umm_ctx *ctx = file->private_data;
	void __user *uarg = (void __user *)arg;

	if (!umm_same_mm(ctx))
		return -EPERM;
	switch (cmd) {
	case UMM_NOTIFY_IOC_WATCH:
		return umm_ioctl_watch(ctx, uarg);
	case UMM_NOTIFY_IOC_UNWATCH:
		return umm_ioctl_unwatch(ctx, uarg);
	case UMM_NOTIFY_IOC_INFO:
		return umm_ioctl_info(ctx, uarg);
	}
	return -ENOTTY;
}

/**
 * umm_read() - read records
 * @file: the open file
 * @buf: user buffer
 * @count: its size; at least one record
 * @ppos: unused (stream)
 *
 * Context: process context, may sleep (unless O_NONBLOCK) and fault. Takes
 * ctx->read_lock, briefly ctx->ring_lock (never across copy_to_user()).
 * Records in [head, tail) are never written by the notifier (a full ring
 * sets the overflow flag instead), so they are copied without ring_lock.
 *
 * Return: bytes read (a multiple of the record size), -EPERM (from another
 * mm, e.g. a forked child), -EINVAL (@count too small), -EAGAIN (O_NONBLOCK
 * and nothing pending), -EFAULT, -ERESTARTSYS.
 */
static ssize_t umm_read(struct file *file, char __user *buf, size_t count,
			loff_t *ppos)
{
	const size_t size = sizeof(struct umm_notify_record);
	struct umm_ctx *ctx = file->private_data;
	struct umm_notify_record over;
	u64 head, avail, n, done, idx, chunk;
	ssize_t ret;

	if (!umm_same_mm(ctx))
		return -EPERM;
	if (count < size)
		return -EINVAL;
	if (mutex_lock_interruptible(&ctx->read_lock))
		return -ERESTARTSYS;

	for (;;) {
		spin_lock(&ctx->ring_lock);
		if (ctx->overflow) {
			ctx->overflow = false;
			ctx->head = ctx->tail;
			memset(&over, 0, sizeof(over));
			over.end = U64_MAX;
			over.kind = UMM_NOTIFY_EVENT_OVERFLOW;
			over.seq = ctx->shared->generation;
			spin_unlock(&ctx->ring_lock);
			if (copy_to_user(buf, &over, size)) {
				/* Not delivered: report it again next time. */
				spin_lock(&ctx->ring_lock);
				ctx->overflow = true;
				spin_unlock(&ctx->ring_lock);
				ret = -EFAULT;
			} else {
				ret = size;
			}
			goto out_unlock;
		}
		head = ctx->head;
		avail = ctx->tail - head;
		spin_unlock(&ctx->ring_lock);
		if (avail)
			break;
		if (file->f_flags & O_NONBLOCK) {
			ret = -EAGAIN;
			goto out_unlock;
		}
		if (wait_event_interruptible(ctx->wq, umm_pending(ctx))) {
			ret = -ERESTARTSYS;
			goto out_unlock;
		}
	}

	n = min_t(u64, avail, count / size);
	for (done = 0; done < n; done += chunk) {
		idx = (head + done) & ctx->mask;
		chunk = min_t(u64, n - done, (u64)ctx->mask + 1 - idx);
		if (copy_to_user(buf + done * size, &ctx->ring[idx], chunk * size))
			break;
	}
	if (!done) {
		ret = -EFAULT;
		goto out_unlock;
	}
	spin_lock(&ctx->ring_lock);
	/* An overflow meanwhile may have emptied the ring: keep head <= tail. */
	if (ctx->head == head)
		ctx->head = head + done;
	spin_unlock(&ctx->ring_lock);
	ret = done * size;

out_unlock:
	mutex_unlock(&ctx->read_lock);
	return ret;
}

/* From another mm (a forked child): EPOLLERR, never the parent's EPOLLIN. */
static __poll_t umm_poll(struct file *file, struct poll_table_struct *wait)
{
	struct umm_ctx *ctx = file->private_data;

	if (!umm_same_mm(ctx))
		return EPOLLERR;
	poll_wait(file, &ctx->wq, wait);
	return umm_pending(ctx) ? EPOLLIN | EPOLLRDNORM : 0;
}

/**
 * umm_mmap() - map the generation page read-only
 * @file: the open file
 * @vma: one page at offset 0, without PROT_WRITE or PROT_EXEC
 *
 * Context: mmap_lock held for write by the caller.
 *
 * Return: 0, -EINVAL (wrong size or offset), -EPERM (writable or
 * executable, or from another mm), or the error of vm_insert_page().
 */
static int umm_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct umm_ctx *ctx = file->private_data;

	if (vma->vm_mm != ctx->mm)
		return -EPERM;
	if (vma->vm_pgoff || vma->vm_end - vma->vm_start != PAGE_SIZE)
		return -EINVAL;
	if (vma->vm_flags & (VM_WRITE | VM_EXEC))
		return -EPERM;
	vma->vm_flags &= ~(VM_MAYWRITE | VM_MAYEXEC);
	vma->vm_flags |= VM_DONTEXPAND | VM_DONTDUMP;
	return vm_insert_page(vma, vma->vm_start, ctx->shared_page);
}

/**
 * umm_open() - bind the caller's mm and preallocate the ring and page
 * @inode: the misc device's inode
 * @file: the new file
 *
 * Context: process context. Pairs with umm_release().
 *
 * Return: 0, -EINVAL (no mm: kernel thread), -ENOMEM.
 */
static int umm_open(struct inode *inode, struct file *file)
{
	struct umm_ctx *ctx;
	int ret;

	if (!current->mm)
		return -EINVAL;
	ctx = kzalloc(sizeof(*ctx), GFP_KERNEL_ACCOUNT);
	if (!ctx)
		return -ENOMEM;
	ctx->mask = ring_entries - 1;
	ctx->ring = kvcalloc(ring_entries, sizeof(*ctx->ring), GFP_KERNEL_ACCOUNT);
	if (!ctx->ring) {
		ret = -ENOMEM;
		goto err_free_ctx;
	}
	ctx->shared_page = alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO);
	if (!ctx->shared_page) {
		ret = -ENOMEM;
		goto err_free_ring;
	}
	ctx->shared = page_address(ctx->shared_page);
	ctx->shared->abi_version = UMM_NOTIFY_ABI_VERSION;

	mutex_init(&ctx->lock);
	mutex_init(&ctx->read_lock);
	spin_lock_init(&ctx->ring_lock);
	xa_init_flags(&ctx->watches, XA_FLAGS_ALLOC1 | XA_FLAGS_ACCOUNT);
	init_waitqueue_head(&ctx->wq);
	mmgrab(current->mm); /* pairs with mmdrop() in umm_release() */
	ctx->mm = current->mm;

	file->private_data = ctx;
	return stream_open(inode, file);

err_free_ring:
	kvfree(ctx->ring);
err_free_ctx:
	kfree(ctx);
	return ret;
}

/**
 * umm_release() - remove every watch and free the file's state
 * @inode: the misc device's inode
 * @file: the file being released (last close, also at process exit)
 *
 * Context: process context, may sleep (waits for running callbacks). The mm
 * may already be torn down; the mmgrab() of open keeps it valid.
 *
 * Return: 0.
 */
static int umm_release(struct inode *inode, struct file *file)
{
	struct umm_ctx *ctx = file->private_data;
	struct umm_watch *w;
	unsigned long id;

	mutex_lock(&ctx->lock);
	xa_for_each(&ctx->watches, id, w) {
		xa_erase(&ctx->watches, id);
		mmu_interval_notifier_remove(&w->mni);
		kfree(w);
	}
	ctx->nr_watches = 0;
	mutex_unlock(&ctx->lock);
	xa_destroy(&ctx->watches);

	mmdrop(ctx->mm);
	/* Still mapped after fork? vm_insert_page() took its own reference. */
	put_page(ctx->shared_page);
	kvfree(ctx->ring);
	mutex_destroy(&ctx->read_lock);
	mutex_destroy(&ctx->lock);
	kfree(ctx);
	return 0;
}

static const struct file_operations umm_fops = {
	.owner = THIS_MODULE,
	.open = umm_open,
	.release = umm_release,
	.read = umm_read,
	.poll = umm_poll,
	.mmap = umm_mmap,
	.unlocked_ioctl = umm_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = no_llseek,
};

static struct miscdevice umm_miscdev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "umm_notify",
	.fops = &umm_fops,
	/*
	 * Root and the device's group only: udev/99-umm-notify.rules (installed
	 * by scripts/install-kmod.sh) gives the node to group "umm". One open
	 * file can hold max_watches watches (about 140 bytes each) and a ring
	 * of ring_entries records (40 bytes each), charged to its memory cgroup.
	 */
	.mode = 0660,
};

static int __init umm_init(void)
{
	BUILD_BUG_ON(sizeof(struct umm_notify_record) != 40);
	BUILD_BUG_ON(sizeof(struct umm_notify_shared) > PAGE_SIZE);

	ring_entries = roundup_pow_of_two(clamp(ring_entries, 16U, 1U << 20));
	max_watches = clamp(max_watches, 1U, 1U << 31);
	return misc_register(&umm_miscdev);
}

static void __exit umm_exit(void)
{
	misc_deregister(&umm_miscdev);
}

module_init(umm_init);
module_exit(umm_exit);

MODULE_DESCRIPTION("umm: MMU interval notifier device for registration caches");
MODULE_AUTHOR("umm project");
/* GPL: mmu_interval_notifier_insert/remove are EXPORT_SYMBOL_GPL. */
MODULE_LICENSE("GPL");
