/*
 * test_verbs.c: the C API with a verbs protection domain the program allocated itself,
 * on Soft-RoCE (rxe0) in the guest (scripts/test-capi.sh --in-guest). Checks the MRs
 * umm creates and releases against the kernel's own count (`rdma resource show`), and
 * that the program can free its protection domain after the manager is gone (which
 * ibv_dealloc_pd refuses with EBUSY while any MR is left).
 * Without an RDMA device it prints "SKIP: ..." and exits 0 (the script then fails the
 * run: in the guest rxe is set up, so a skip is a bug). Closing line: "N passed, N failed".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <infiniband/verbs.h>
#include <umm.h>

#include "check.h"

/* The number of MRs the kernel holds on `dev` ("N: rxe0: pd 1 cq 0 qp 0 cm_id 0 mr 2 ..."). */
static long kernel_mr_count(const char *dev)
{
	char line[512], key[64];
	long n = -1;
	FILE *f = popen("rdma resource show", "r");

	if (!f)
		return -1;
	snprintf(key, sizeof(key), " %s: ", dev);
	while (fgets(line, sizeof(line), f)) {
		char *mr;

		if (!strstr(line, key))
			continue;
		mr = strstr(line, " mr ");
		if (mr)
			n = strtol(mr + 4, NULL, 10);
	}
	pclose(f);
	return n;
}

int main(void)
{
	int ndev = 0;
	struct ibv_device **list = ibv_get_device_list(&ndev);
	struct ibv_device *dev = NULL;

	for (int i = 0; list && i < ndev; i++)
		if (strcmp(ibv_get_device_name(list[i]), "rxe0") == 0)
			dev = list[i];
	if (!dev) {
		printf("SKIP: no verbs device rxe0 (%s); run scripts/test-capi.sh, which sets up Soft-RoCE in the guest\n",
		       list ? "not in the device list" : strerror(errno));
		return 0;
	}
	struct ibv_context *ctx = ibv_open_device(dev);
	struct ibv_pd *pd = ctx ? ibv_alloc_pd(ctx) : NULL;

	if (!pd) {
		printf("FAIL: opening rxe0 / ibv_alloc_pd: %s\n0 passed, 1 failed\n", strerror(errno));
		return 1;
	}

	size_t len = 64 * 1024;
	char *buf = mmap(NULL, 4 * len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_manager_t *m = NULL;
	umm_device_t nic = 99, bad = 99;
	umm_pin_t *p1 = NULL, *p2 = NULL, *p3 = NULL;
	umm_translation_t t1, t2, t3;
	long mr0 = kernel_mr_count("rxe0");

	CHECK(mr0 >= 0, "kernel MR count readable");
	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	CHECK(umm_attach_verbs_pd(m, pd, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ,
				  &nic) == UMM_OK,
	      "attach pd");
	CHECK(strcmp(umm_device_name(m, nic), "rxe0") == 0, "device name %s", umm_device_name(m, nic));
	CHECK(umm_attach_verbs_pd(m, pd, IBV_ACCESS_MW_BIND, &bad) == UMM_ERR_INVALID_ARGUMENT,
	      "unsupported access flag refused");

	/* Miss: one MR in our pd. */
	CHECK(umm_pin(m, buf + 100, len, &nic, 1, &p1) == UMM_OK, "pin");
	CHECK(umm_pin_translation(p1, nic, &t1) == UMM_OK, "translation");
	CHECK(t1.kind == UMM_DEVICE_VERBS && t1.lkey != 0 && t1.rkey != 0, "kind %d lkey %#x rkey %#x", t1.kind,
	      t1.lkey, t1.rkey);
	CHECK(t1.registered_addr <= (uintptr_t)buf + 100 &&
		      t1.registered_addr + t1.registered_len >= (uintptr_t)buf + 100 + len &&
		      t1.registered_addr + t1.offset == (uintptr_t)buf + 100,
	      "MR %#llx+%llu offset %llu covers the pin", (unsigned long long)t1.registered_addr,
	      (unsigned long long)t1.registered_len, (unsigned long long)t1.offset);
	CHECK(kernel_mr_count("rxe0") == mr0 + 1, "kernel holds one more MR (%ld -> %ld)", mr0,
	      kernel_mr_count("rxe0"));

	/* Hit: same keys, no new MR. */
	CHECK(umm_pin(m, buf + 100, len, &nic, 1, &p2) == UMM_OK, "pin again");
	CHECK(umm_pin_translation(p2, nic, &t2) == UMM_OK && t2.lkey == t1.lkey && t2.rkey == t1.rkey, "hit");
	CHECK(kernel_mr_count("rxe0") == mr0 + 1, "a hit registers nothing");

	/* Invalidate: the MR goes with the last pin; the next pin gets a fresh one. */
	CHECK(umm_invalidate(m, buf, 4 * len) == UMM_OK, "invalidate");
	CHECK(!umm_pin_is_valid(p1), "stale pin says so");
	umm_unpin(p1);
	umm_unpin(p2);
	CHECK(kernel_mr_count("rxe0") == mr0, "MR deregistered at the last unpin (%ld)", kernel_mr_count("rxe0"));
	CHECK(umm_pin(m, buf + 100, len, &nic, 1, &p3) == UMM_OK, "pin after invalidate");
	CHECK(umm_pin_translation(p3, nic, &t3) == UMM_OK && t3.lkey != 0, "fresh MR");
	CHECK(kernel_mr_count("rxe0") == mr0 + 1, "one MR again");
	umm_unpin(p3);

	umm_device_stats_t ds;
	CHECK(umm_device_stats(m, nic, &ds) == UMM_OK && ds.registrations == 2 && ds.deregistrations == 1 &&
		      ds.hits == 1,
	      "stats reg %llu dereg %llu hits %llu", (unsigned long long)ds.registrations,
	      (unsigned long long)ds.deregistrations, (unsigned long long)ds.hits);

	/* Destroy deregisters the cached MR; then the program can free its pd. */
	umm_manager_destroy(m);
	CHECK(kernel_mr_count("rxe0") == mr0, "no MR left after destroy");
	CHECK(ibv_dealloc_pd(pd) == 0, "ibv_dealloc_pd after destroy: %s", strerror(errno));
	ibv_close_device(ctx);
	ibv_free_device_list(list);
	munmap(buf, 4 * len);
	printf("ok verbs on rxe0\n");
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
