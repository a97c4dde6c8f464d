/*
 * test_callbacks.c: the C API with a callback device, on the host (no hardware).
 * Built and run by scripts/test-capi.sh against umm.h and libumm (shared and static).
 * Prints "ok"/"FAIL" per check and a closing "N passed, N failed" line; exits non-zero
 * if any check failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <umm.h>

#include "check.h"

/* A recording device: every registration gets a fresh token; deregistration checks it. */
struct recorder {
	atomic_uint_fast64_t next_token;
	atomic_int registrations;
	atomic_int deregistrations;
	atomic_int bad_deregistrations;
	atomic_int fail_with; /* errno the next register returns, 0 = succeed */
	uintptr_t last_addr;
	size_t last_len;
};

static int rec_register(void *ctx, void *addr, size_t len, uint64_t *translation)
{
	struct recorder *r = ctx;
	int e = atomic_exchange(&r->fail_with, 0);

	if (e)
		return e;
	r->last_addr = (uintptr_t)addr;
	r->last_len = len;
	/* The token encodes the address so deregister can check the pair. */
	*translation = ((uint64_t)atomic_fetch_add(&r->next_token, 1) << 48) ^ (uint64_t)(uintptr_t)addr;
	atomic_fetch_add(&r->registrations, 1);
	return 0;
}

static int rec_deregister(void *ctx, void *addr, size_t len, uint64_t translation)
{
	struct recorder *r = ctx;

	if ((translation & ((1ULL << 48) - 1)) != (uint64_t)(uintptr_t)addr || len == 0)
		atomic_fetch_add(&r->bad_deregistrations, 1);
	atomic_fetch_add(&r->deregistrations, 1);
	return 0;
}

static umm_device_t attach(umm_manager_t *m, struct recorder *r, const char *name, bool overlap)
{
	umm_callbacks_t cb = {
		.ctx = r,
		.register_range = rec_register,
		.deregister_range = rec_deregister,
		.allows_overlap = overlap,
	};
	umm_device_t dev = 0;
	umm_status_t s = umm_attach_callbacks(m, name, &cb, &dev);

	CHECK(s == UMM_OK, "attach %s: %s", name, umm_strerror(s));
	return dev;
}

static void test_hit_invalidate_reregister(void)
{
	struct recorder r = { .next_token = 1 };
	umm_manager_t *m = NULL;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t len = 16 * page;
	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_pin_t *p1 = NULL, *p2 = NULL, *p3 = NULL;
	umm_translation_t t1, t2, t3;
	umm_stats_t st;
	umm_device_t dev;

	CHECK(buf != MAP_FAILED, "mmap");
	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	dev = attach(m, &r, "recorder", true);
	CHECK(strcmp(umm_device_name(m, dev), "recorder") == 0, "name %s", umm_device_name(m, dev));

	/* Miss: one registration covering the (unaligned) request. */
	CHECK(umm_pin(m, buf + 100, 3 * page, &dev, 1, &p1) == UMM_OK, "pin 1");
	CHECK(umm_pin_translation(p1, dev, &t1) == UMM_OK, "translation 1");
	CHECK(t1.kind == UMM_DEVICE_CALLBACKS, "kind %d", t1.kind);
	CHECK(t1.registered_addr <= (uintptr_t)buf + 100 &&
	      t1.registered_addr + t1.registered_len >= (uintptr_t)buf + 100 + 3 * page,
	      "registered %#llx+%llu covers the pin", (unsigned long long)t1.registered_addr,
	      (unsigned long long)t1.registered_len);
	CHECK(t1.registered_addr + t1.offset == (uintptr_t)buf + 100, "offset %llu",
	      (unsigned long long)t1.offset);
	CHECK((t1.opaque & ((1ULL << 48) - 1)) == t1.registered_addr, "opaque is the callback's value");
	CHECK(r.registrations == 1, "registrations %d", r.registrations);

	/* Hit: same translation, no callback. */
	CHECK(umm_pin(m, buf + 100, 3 * page, &dev, 1, &p2) == UMM_OK, "pin 2");
	CHECK(umm_pin_translation(p2, dev, &t2) == UMM_OK && t2.opaque == t1.opaque, "hit: same value");
	CHECK(t2.registration_id == t1.registration_id, "hit: same registration id");
	CHECK(r.registrations == 1, "a hit registers nothing (%d)", r.registrations);
	CHECK(umm_stats(m, &st) == UMM_OK && st.hits == 1 && st.misses == 1 && st.devices == 1,
	      "stats hits %llu misses %llu", (unsigned long long)st.hits, (unsigned long long)st.misses);

	/* Invalidate: both pins stale; the registration lives until the last unpin. */
	CHECK(umm_invalidate(m, buf, len) == UMM_OK, "invalidate");
	CHECK(!umm_pin_is_valid(p1) && !umm_pin_is_valid(p2), "pins report stale");
	umm_unpin(p1);
	CHECK(r.deregistrations == 0, "still pinned: not deregistered (%d)", r.deregistrations);
	umm_unpin(p2);
	CHECK(r.deregistrations == 1, "last unpin deregisters once (%d)", r.deregistrations);

	/* A new pin registers afresh: a new value, never the stale one. */
	CHECK(umm_pin(m, buf + 100, 3 * page, &dev, 1, &p3) == UMM_OK, "pin 3");
	CHECK(umm_pin_translation(p3, dev, &t3) == UMM_OK && t3.opaque != t1.opaque, "fresh value");
	CHECK(t3.registration_id != t1.registration_id, "fresh registration id");
	CHECK(umm_pin_is_valid(p3), "fresh pin valid");
	CHECK(r.registrations == 2, "registrations %d", r.registrations);
	umm_unpin(p3);
	CHECK(r.deregistrations == 1, "unpinned valid entries stay cached (%d)", r.deregistrations);

	umm_device_stats_t ds;
	CHECK(umm_device_stats(m, dev, &ds) == UMM_OK && ds.registrations == 2 &&
	      ds.deregistrations == 1 && ds.cached_entries == 1 && ds.invalidated_entries == 1,
	      "device stats reg %llu dereg %llu cached %llu inval %llu",
	      (unsigned long long)ds.registrations, (unsigned long long)ds.deregistrations,
	      (unsigned long long)ds.cached_entries, (unsigned long long)ds.invalidated_entries);

	umm_manager_destroy(m);
	CHECK(r.deregistrations == 2, "destroy deregisters the cached entry (%d)", r.deregistrations);
	CHECK(r.bad_deregistrations == 0, "deregister got the value register returned");
	munmap(buf, len);
	printf("ok hit / invalidate / re-register\n");
}

static void test_errors(void)
{
	struct recorder r = { .next_token = 1 };
	umm_manager_t *m = NULL;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *buf = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_pin_t *p = NULL;
	umm_device_t dev, other = 7;
	umm_callbacks_t incomplete = { .register_range = rec_register };
	umm_status_t s;

	CHECK(umm_manager_create(NULL) == UMM_ERR_INVALID_ARGUMENT, "create(NULL)");
	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	dev = attach(m, &r, "nic0", true);

	s = umm_attach_callbacks(m, "x", &incomplete, &other);
	CHECK(s == UMM_ERR_INVALID_ARGUMENT, "incomplete table: %s", umm_strerror(s));

	s = umm_pin(m, buf, 0, &dev, 1, &p);
	CHECK(s == UMM_ERR_EMPTY_RANGE && p == NULL, "empty range: %s", umm_strerror(s));

	other = 7;
	s = umm_pin(m, buf, page, &other, 1, &p);
	CHECK(s == UMM_ERR_UNKNOWN_DEVICE, "unknown device: %s", umm_strerror(s));
	CHECK(strstr(umm_last_error(), "device 7") != NULL, "message names it: %s", umm_last_error());

	umm_device_t twice[2] = { dev, dev };
	s = umm_pin(m, buf, page, twice, 2, &p);
	CHECK(s == UMM_ERR_BAD_DEVICE_LIST, "device twice: %s", umm_strerror(s));

	/* A register callback failing with EFAULT: a backend error naming the device. */
	atomic_store(&r.fail_with, EFAULT);
	s = umm_pin(m, buf, page, &dev, 1, &p);
	CHECK(s == UMM_ERR_BACKEND, "EFAULT: %s", umm_strerror(s));
	CHECK(strstr(umm_last_error(), "nic0") && strstr(umm_last_error(), "Bad address"),
	      "message: %s", umm_last_error());

	/* Unmapped memory is refused before any callback. */
	munmap(buf + 2 * page, page);
	int before = r.registrations;
	s = umm_pin(m, buf + 2 * page, page, &dev, 1, &p);
	CHECK(s == UMM_ERR_UNMAPPED, "unmapped: %s", umm_strerror(s));
	CHECK(r.registrations == before, "no callback for unmapped memory");

	CHECK(umm_pin_translation(NULL, dev, NULL) == UMM_ERR_INVALID_ARGUMENT, "NULL pin");
	CHECK(strncmp(umm_strerror(UMM_ERR_MEMLOCK), "UMM_ERR_MEMLOCK", 15) == 0, "strerror");
	CHECK(strcmp(umm_version(), "0.1.0") == 0, "version %s", umm_version());
	umm_unpin(NULL);
	umm_manager_destroy(NULL);
	umm_manager_destroy(m);
	munmap(buf, 4 * page);
	printf("ok errors\n");
}

/* Two devices, one of which refuses overlaps (like CUDA): one pin covers both. */
static void test_two_devices(void)
{
	struct recorder nic = { .next_token = 1 }, gpu = { .next_token = 1 };
	umm_manager_t *m = NULL;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *buf = mmap(NULL, 8 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_pin_t *a = NULL, *b = NULL;
	umm_translation_t tn, tg;

	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	umm_device_t devs[2] = { attach(m, &nic, "nic", true), attach(m, &gpu, "gpu", false) };

	CHECK(umm_pin(m, buf, 2 * page, devs, 2, &a) == UMM_OK, "pin a");
	CHECK(umm_pin_translation(a, devs[0], &tn) == UMM_OK && umm_pin_translation(a, devs[1], &tg) == UMM_OK,
	      "both translations");
	umm_unpin(a);
	/* Overlapping request: the no-overlap device merges (deregisters the old one first). */
	CHECK(umm_pin(m, buf + page, 3 * page, devs, 2, &b) == UMM_OK, "pin b");
	CHECK(umm_pin_translation(b, devs[1], &tg) == UMM_OK && tg.registered_addr == (uintptr_t)buf &&
	      tg.registered_len >= 4 * page, "merged registration %#llx+%llu",
	      (unsigned long long)tg.registered_addr, (unsigned long long)tg.registered_len);
	CHECK(gpu.deregistrations == 1, "gpu: old registration gone before the merged one (%d)",
	      gpu.deregistrations);
	umm_unpin(b);

	/* One invalidation deregisters on both devices. */
	CHECK(umm_invalidate(m, buf, 8 * page) == UMM_OK, "invalidate");
	CHECK(umm_flush(m) == UMM_OK, "flush");
	CHECK(nic.registrations == nic.deregistrations && gpu.registrations == gpu.deregistrations,
	      "every registration deregistered: nic %d/%d gpu %d/%d", nic.registrations,
	      nic.deregistrations, gpu.registrations, gpu.deregistrations);
	umm_manager_destroy(m);
	munmap(buf, 8 * page);
	printf("ok two devices\n");
}

/* A pin outlives umm_manager_destroy: the manager stays alive until the last unpin. */
static void test_destroy_with_pin(void)
{
	struct recorder r = { .next_token = 1 };
	umm_manager_t *m = NULL;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *buf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_pin_t *p = NULL;
	umm_translation_t t;

	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	umm_device_t dev = attach(m, &r, "late", true);
	CHECK(umm_pin(m, buf, page, &dev, 1, &p) == UMM_OK, "pin");
	umm_manager_destroy(m);
	CHECK(r.deregistrations == 0, "pinned: not deregistered at destroy");
	CHECK(umm_pin_translation(p, dev, &t) == UMM_OK && umm_pin_is_valid(p), "pin still usable");
	umm_unpin(p);
	CHECK(r.deregistrations == 1, "last unpin released the manager (%d)", r.deregistrations);
	munmap(buf, page);
	printf("ok destroy with a pin held\n");
}

/* Threads pin and unpin the same and their own buffers; counts stay consistent. */
struct worker {
	umm_manager_t *m;
	umm_device_t dev;
	char *shared;
	char *own;
	int errors;
};

static void *work(void *arg)
{
	struct worker *w = arg;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	for (int i = 0; i < 2000; i++) {
		umm_pin_t *p = NULL;
		char *b = (i & 1) ? w->shared : w->own;

		if (umm_pin(w->m, b, page, &w->dev, 1, &p) != UMM_OK) {
			w->errors++;
			continue;
		}
		umm_translation_t t;
		if (umm_pin_translation(p, w->dev, &t) != UMM_OK || t.registered_addr + t.offset != (uintptr_t)b)
			w->errors++;
		umm_unpin(p);
	}
	return NULL;
}

static void test_threads(void)
{
	struct recorder r = { .next_token = 1 };
	umm_manager_t *m = NULL;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	enum { N = 4 };
	char *buf = mmap(NULL, (N + 1) * 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct worker w[N];
	pthread_t th[N];
	umm_stats_t st;

	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	umm_device_t dev = attach(m, &r, "mt", true);
	for (int i = 0; i < N; i++) {
		w[i] = (struct worker){ .m = m, .dev = dev, .shared = buf, .own = buf + (i + 1) * 2 * page };
		pthread_create(&th[i], NULL, work, &w[i]);
	}
	for (int i = 0; i < N; i++) {
		pthread_join(th[i], NULL);
		CHECK(w[i].errors == 0, "thread %d errors %d", i, w[i].errors);
	}
	CHECK(umm_stats(m, &st) == UMM_OK && st.hits + st.misses == N * 2000, "pins %llu",
	      (unsigned long long)(st.hits + st.misses));
	CHECK(r.registrations == N + 1, "one registration per buffer (%d)", r.registrations);
	umm_manager_destroy(m);
	CHECK(r.deregistrations == N + 1, "all deregistered at destroy (%d)", r.deregistrations);
	munmap(buf, (N + 1) * 2 * page);
	printf("ok threads\n");
}

/* In a fork child the parent's manager refuses to work and deregisters nothing. */
static void test_fork(void)
{
	struct recorder r = { .next_token = 1 };
	umm_manager_t *m = NULL;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *buf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_pin_t *p = NULL;
	int status = 0;

	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	umm_device_t dev = attach(m, &r, "forked", true);
	CHECK(umm_pin(m, buf, page, &dev, 1, &p) == UMM_OK, "pin");
	umm_unpin(p);
	pid_t pid = fork();
	if (pid == 0) {
		umm_pin_t *q = NULL;
		umm_status_t s = umm_pin(m, buf, page, &dev, 1, &q);
		umm_manager_destroy(m);
		/* Exit code: 0 when refused with FORKED_CHILD and nothing deregistered here. */
		_exit(s == UMM_ERR_FORKED_CHILD && r.deregistrations == 0 ? 0 : 1);
	}
	CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "child: UMM_ERR_FORKED_CHILD and no deregistration (status %#x)", status);
	umm_manager_destroy(m);
	CHECK(r.deregistrations == 1, "parent deregisters its own (%d)", r.deregistrations);
	munmap(buf, page);
	printf("ok fork\n");
}

/* The manager is configured by UMM_* variables: a bad value is refused, UMM_CACHE=0 works. */
static void test_environment(void)
{
	struct recorder r = { .next_token = 1 };
	umm_manager_t *m = NULL;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *buf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_pin_t *p = NULL;
	umm_status_t s;

	setenv("UMM_MAX_CACHED_BYTES", "lots", 1);
	s = umm_manager_create(&m);
	CHECK(s == UMM_ERR_CONFIG && m == NULL, "malformed variable: %s", umm_strerror(s));
	CHECK(strstr(umm_last_error(), "UMM_MAX_CACHED_BYTES") != NULL, "message names it: %s", umm_last_error());
	unsetenv("UMM_MAX_CACHED_BYTES");

	setenv("UMM_CACHE", "0", 1);
	CHECK(umm_manager_create(&m) == UMM_OK, "create with UMM_CACHE=0");
	umm_device_t dev = attach(m, &r, "uncached", true);
	CHECK(umm_pin(m, buf, page, &dev, 1, &p) == UMM_OK, "pin");
	umm_unpin(p);
	CHECK(r.deregistrations == 1, "UMM_CACHE=0: deregistered at the last unpin (%d)", r.deregistrations);
	umm_manager_destroy(m);
	unsetenv("UMM_CACHE");
	munmap(buf, page);
	printf("ok environment\n");
}

int main(void)
{
	test_hit_invalidate_reregister();
	test_errors();
	test_two_devices();
	test_destroy_with_pin();
	test_threads();
	test_fork();
	test_environment();
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
