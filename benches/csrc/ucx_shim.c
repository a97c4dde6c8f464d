/* A UCX registration cache whose "registration" does nothing, so that the comparison
 * harness measures UCX's cache overhead (ucs_rcache_get + ucs_rcache_region_put) exactly
 * like it measures umm's (Manager::pin + drop) with the recording backend. */
#include <stddef.h>
#include <ucs/memory/rcache.h>

/* What a real user keeps after UCX's region (an lkey, a device pointer): the harness
 * reads it on every hit, as umm's harness reads the translation. */
struct shim_region {
	ucs_rcache_region_t super;
	uint64_t key;
};

static ucs_status_t shim_reg(void *ctx, ucs_rcache_t *rc, void *arg,
			     ucs_rcache_region_t *region, uint16_t flags)
{
	((struct shim_region *)region)->key = region->super.start ^ 0x5a;
	return UCS_OK;
}

static void shim_dereg(void *ctx, ucs_rcache_t *rc, ucs_rcache_region_t *region)
{
}

static void shim_dump(void *ctx, ucs_rcache_t *rc, ucs_rcache_region_t *region,
		      char *buf, size_t max)
{
	if (max)
		buf[0] = '\0';
}

static const ucs_rcache_ops_t shim_ops = {
	.mem_reg = shim_reg,
	.mem_dereg = shim_dereg,
	.dump_region = shim_dump,
};

void *umm_ucx_create(unsigned long max_regions)
{
	ucs_rcache_params_t p = {
		.region_struct_size = sizeof(struct shim_region),
		.alignment = 4096,
		.max_alignment = 4096,
		.ucm_events = 0, /* no memory hooks: cache overhead only */
		.ucm_event_priority = 0,
		.ops = &shim_ops,
		.context = NULL,
		.flags = UCS_RCACHE_FLAG_NO_PFN_CHECK,
		.max_regions = max_regions,
		.max_size = (size_t)-1,
		.max_unreleased = (size_t)-1,
	};
	ucs_rcache_t *rc = NULL;

	if (ucs_rcache_create(&p, "umm-bench", NULL, &rc) != UCS_OK)
		return NULL;
	return rc;
}

void *umm_ucx_get(void *rc, void *addr, size_t len)
{
	ucs_rcache_region_t *region = NULL;

	if (ucs_rcache_get(rc, addr, len, 3 /* PROT_READ|PROT_WRITE */, NULL,
			   &region) != UCS_OK)
		return NULL;
	return region;
}

void umm_ucx_put(void *rc, void *region)
{
	ucs_rcache_region_put(rc, region);
}

void umm_ucx_destroy(void *rc)
{
	ucs_rcache_destroy(rc);
}

uint64_t umm_ucx_region_key(void *region)
{
	return ((struct shim_region *)region)->key;
}

static void shim_invalidated(void *arg)
{
}

void umm_ucx_invalidate(void *rc, void *region)
{
	ucs_rcache_region_invalidate(rc, region, shim_invalidated, NULL);
}
