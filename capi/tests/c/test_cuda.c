/*
 * test_cuda.c: the C API with a CUDA context the program owns. The driver API is loaded
 * with dlopen (no CUDA headers or toolkit needed to build this file).
 * Without libcuda.so.1 it checks that umm_attach_cuda_context fails with UMM_ERR_BACKEND
 * naming the missing driver (and prints a note that the GPU part did not run); with a
 * driver and a GPU it pins, checks the device pointer, a hit, an invalidation and a fresh
 * registration. Closing line: "N passed, N failed".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <umm.h>

#include "check.h"

typedef int (*cu_init_t)(unsigned int);
typedef int (*cu_device_get_t)(int *, int);
typedef int (*cu_retain_t)(void **, int);
typedef int (*cu_release_t)(int);

int main(void)
{
	umm_manager_t *m = NULL;
	umm_device_t gpu = 99;
	umm_status_t s;
	void *lib = dlopen("libcuda.so.1", RTLD_NOW);

	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	if (!lib) {
		/* Any non-NULL value: umm must fail on the missing driver before using it. */
		s = umm_attach_cuda_context(m, (void *)0x1, &gpu);
		CHECK(s == UMM_ERR_BACKEND && strstr(umm_last_error(), "libcuda"),
		      "no driver: %s / %s", umm_strerror(s), umm_last_error());
		printf("note: no CUDA driver here: only the missing-driver error was checked\n");
		umm_manager_destroy(m);
		printf("%d passed, %d failed\n", passed, failed);
		return failed != 0;
	}

	cu_init_t cu_init = (cu_init_t)dlsym(lib, "cuInit");
	cu_device_get_t cu_device_get = (cu_device_get_t)dlsym(lib, "cuDeviceGet");
	cu_retain_t cu_retain = (cu_retain_t)dlsym(lib, "cuDevicePrimaryCtxRetain");
	cu_release_t cu_release = (cu_release_t)dlsym(lib, "cuDevicePrimaryCtxRelease_v2");
	int dev = 0;
	void *ctx = NULL;

	if (!cu_init || !cu_device_get || !cu_retain || !cu_release || cu_init(0) != 0 ||
	    cu_device_get(&dev, 0) != 0 || cu_retain(&ctx, dev) != 0) {
		printf("FAIL: libcuda.so.1 is present but no context could be made on device 0\n");
		printf("%d passed, %d failed\n", passed, failed + 1);
		return 1;
	}
	CHECK(umm_attach_cuda_context(m, ctx, &gpu) == UMM_OK, "attach");
	printf("device: %s\n", umm_device_name(m, gpu));

	size_t len = 1 << 20;
	char *buf = mmap(NULL, 4 * len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_pin_t *p1 = NULL, *p2 = NULL, *p3 = NULL;
	umm_translation_t t1, t2, t3;

	CHECK(umm_pin(m, buf + 100, len, &gpu, 1, &p1) == UMM_OK, "pin");
	CHECK(umm_pin_translation(p1, gpu, &t1) == UMM_OK, "translation");
	CHECK(t1.kind == UMM_DEVICE_CUDA && t1.cuda_device_ptr != 0, "kind %d device pointer %#llx", t1.kind,
	      (unsigned long long)t1.cuda_device_ptr);
	CHECK(t1.registered_addr + t1.offset == (uintptr_t)buf + 100, "offset");
	CHECK(umm_pin(m, buf + 100, len, &gpu, 1, &p2) == UMM_OK && umm_pin_translation(p2, gpu, &t2) == UMM_OK &&
		      t2.cuda_device_ptr == t1.cuda_device_ptr,
	      "hit");
	CHECK(umm_invalidate(m, buf, 4 * len) == UMM_OK && !umm_pin_is_valid(p1), "invalidate");
	umm_unpin(p1);
	umm_unpin(p2);
	/* CUDA refuses a second registration of the same addresses: this works only because
	 * the stale one was unregistered at the last unpin. */
	CHECK(umm_pin(m, buf + 100, len, &gpu, 1, &p3) == UMM_OK && umm_pin_translation(p3, gpu, &t3) == UMM_OK,
	      "fresh registration of the same addresses");
	umm_unpin(p3);

	umm_device_stats_t ds;
	CHECK(umm_device_stats(m, gpu, &ds) == UMM_OK && ds.registrations == 2 && ds.deregistrations == 1,
	      "stats reg %llu dereg %llu", (unsigned long long)ds.registrations,
	      (unsigned long long)ds.deregistrations);
	umm_manager_destroy(m);
	cu_release(dev);
	munmap(buf, 4 * len);
	printf("ok cuda\n");
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
