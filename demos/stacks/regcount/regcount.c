// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * regcount: counts memory registrations a process makes with libibverbs.
 *
 * Preload it (LD_PRELOAD=libregcount.so) into an unmodified program: every
 * ibv_reg_mr, ibv_reg_mr_iova, ibv_reg_mr_iova2, ibv_reg_dmabuf_mr and
 * ibv_dereg_mr call is counted and forwarded to libibverbs. At exit the totals
 * are printed as one line to stderr, or appended to the file named by
 * REGCOUNT_FILE:
 *
 *   regcount pid=1234 reg=3 reg_bytes=3145728 dereg=3
 *
 * The stacks' byte tables use it to count registrations without trusting any
 * library's logs. Build: cc -shared -fPIC -O2 -o libregcount.so regcount.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

struct ibv_pd;
struct ibv_mr;

static atomic_ulong regs, reg_bytes, deregs;

/*
 * libibverbs calls its own exported entry points through the PLT (ibv_reg_mr
 * calls ibv_reg_mr_iova2), so a nested call lands here again: only the
 * outermost call on a thread is counted.
 */
static __thread int depth;

/*
 * The next definition of `name`: the next object in the lookup order first (plain name, so
 * that an unversioned wrapper preloaded after this one is not skipped), then the version
 * libibverbs (rdma-core) exports it under, then libibverbs itself when it was loaded
 * privately (UCX dlopens it: RTLD_NEXT does not see it then).
 */
static void *next(const char *name, const char *version)
{
	void *f = dlsym(RTLD_NEXT, name);
	void *verbs;

	if (!f)
		f = dlvsym(RTLD_NEXT, name, version);
	if (!f) {
		verbs = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_NOLOAD);
		if (verbs)
			f = dlvsym(verbs, name, version);
	}
	if (!f) {
		fprintf(stderr, "regcount: %s not found\n", name);
		abort();
	}
	return f;
}

static struct ibv_mr *counted(struct ibv_mr *mr, size_t length)
{
	depth--;
	if (mr && depth == 0) {
		atomic_fetch_add(&regs, 1);
		atomic_fetch_add(&reg_bytes, length);
	}
	return mr;
}

struct ibv_mr *ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length,
			  int access)
{
	static struct ibv_mr *(*real)(struct ibv_pd *, void *, size_t, int);

	if (!real)
		real = next("ibv_reg_mr", "IBVERBS_1.1");
	depth++;
	return counted(real(pd, addr, length, access), length);
}

struct ibv_mr *ibv_reg_mr_iova(struct ibv_pd *pd, void *addr, size_t length,
			       uint64_t iova, int access)
{
	static struct ibv_mr *(*real)(struct ibv_pd *, void *, size_t,
				      uint64_t, int);

	if (!real)
		real = next("ibv_reg_mr_iova", "IBVERBS_1.7");
	depth++;
	return counted(real(pd, addr, length, iova, access), length);
}

struct ibv_mr *ibv_reg_mr_iova2(struct ibv_pd *pd, void *addr, size_t length,
				uint64_t iova, unsigned int access)
{
	static struct ibv_mr *(*real)(struct ibv_pd *, void *, size_t,
				      uint64_t, unsigned int);

	if (!real)
		real = next("ibv_reg_mr_iova2", "IBVERBS_1.8");
	depth++;
	return counted(real(pd, addr, length, iova, access), length);
}

struct ibv_mr *ibv_reg_dmabuf_mr(struct ibv_pd *pd, uint64_t offset,
				 size_t length, uint64_t iova, int fd,
				 int access)
{
	static struct ibv_mr *(*real)(struct ibv_pd *, uint64_t, size_t,
				      uint64_t, int, int);

	if (!real)
		real = next("ibv_reg_dmabuf_mr", "IBVERBS_1.12");
	depth++;
	return counted(real(pd, offset, length, iova, fd, access), length);
}

int ibv_dereg_mr(struct ibv_mr *mr)
{
	static int (*real)(struct ibv_mr *);
	int ret;

	if (!real)
		real = next("ibv_dereg_mr", "IBVERBS_1.1");
	depth++;
	ret = real(mr);
	depth--;
	if (ret == 0 && depth == 0)
		atomic_fetch_add(&deregs, 1);
	return ret;
}

__attribute__((destructor)) static void report(void)
{
	const char *path = getenv("REGCOUNT_FILE");
	FILE *out = path ? fopen(path, "a") : NULL;

	fprintf(out ? out : stderr, "regcount pid=%d reg=%lu reg_bytes=%lu dereg=%lu\n",
		(int)getpid(), atomic_load(&regs), atomic_load(&reg_bytes),
		atomic_load(&deregs));
	if (out)
		fclose(out);
}
