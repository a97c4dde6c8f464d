/*
 * hello_umm.c: the smallest complete use of libumm from C.
 *
 * A "device" registers memory through two callbacks (here: it only prints and hands out
 * a counter; in a real stack they would call ibv_reg_mr/ibv_dereg_mr, fi_mr_reg/fi_close,
 * ucp_mem_map/ucp_mem_unmap...). The program pins a buffer twice (one registration, one
 * hit), reports the unmap to umm before it happens, and pins the new memory at the same
 * address (a fresh registration, never the stale one).
 *
 * Build (after scripts/install-capi.sh /usr/local):
 *   cc hello_umm.c $(pkg-config --cflags --libs umm) -o hello_umm && ./hello_umm
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>

#include <umm.h>

static uint64_t next_key = 1;

static int my_register(void *ctx, void *addr, size_t len, uint64_t *translation)
{
	(void)ctx;
	*translation = next_key++;
	printf("  register   %p + %zu -> key %llu\n", addr, len, (unsigned long long)*translation);
	return 0;
}

static int my_deregister(void *ctx, void *addr, size_t len, uint64_t translation)
{
	(void)ctx;
	printf("  deregister %p + %zu (key %llu)\n", addr, len, (unsigned long long)translation);
	return 0;
}

#define TRY(call)                                                                    \
	do {                                                                         \
		umm_status_t s_ = (call);                                            \
		if (s_ != UMM_OK) {                                                  \
			fprintf(stderr, "%s: %s\n  %s\n", #call, umm_strerror(s_), umm_last_error()); \
			return 1;                                                    \
		}                                                                    \
	} while (0)

int main(void)
{
	size_t len = 1 << 20;
	umm_manager_t *umm;
	umm_device_t dev;
	umm_pin_t *pin;
	umm_translation_t t;
	umm_callbacks_t device = {
		.register_range = my_register,
		.deregister_range = my_deregister,
		.allows_overlap = true,
	};

	printf("libumm %s\n", umm_version());
	TRY(umm_manager_create(&umm));
	TRY(umm_attach_callbacks(umm, "my-nic", &device, &dev));

	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		return 1;

	for (int i = 0; i < 2; i++) {
		TRY(umm_pin(umm, buf, len, &dev, 1, &pin));
		TRY(umm_pin_translation(pin, dev, &t));
		printf("send %d: key %llu, offset %llu\n", i + 1, (unsigned long long)t.opaque,
		       (unsigned long long)t.offset);
		umm_unpin(pin); /* stays cached: the second pin is a hit */
	}

	/* The application's munmap hook: tell umm first, then unmap. */
	TRY(umm_invalidate(umm, buf, len));
	munmap(buf, len);
	char *again = mmap(buf, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (again == MAP_FAILED)
		return 1;
	TRY(umm_pin(umm, again, len, &dev, 1, &pin));
	TRY(umm_pin_translation(pin, dev, &t));
	printf("send 3 (new memory%s): key %llu\n", again == buf ? " at the same address" : "",
	       (unsigned long long)t.opaque);
	umm_unpin(pin);

	umm_stats_t st;
	TRY(umm_stats(umm, &st));
	printf("hits %llu, misses %llu, registrations %llu, deregistrations %llu\n",
	       (unsigned long long)st.hits, (unsigned long long)st.misses,
	       (unsigned long long)st.registrations, (unsigned long long)st.deregistrations);
	umm_manager_destroy(umm); /* deregisters what is still cached */
	munmap(again, len);
	return 0;
}
