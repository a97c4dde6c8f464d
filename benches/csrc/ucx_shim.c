/* A UCX registration cache whose "registration" does nothing, so that the comparison
 * harness measures UCX's cache overhead (ucs_rcache_get + ucs_rcache_region_put) exactly
 * like it measures umm's (Manager::pin + drop) with the recording backend. */
#include <stddef.h>
#include <ucs/memory/rcache.h>

static ucs_status_t shim_reg(void *ctx, ucs_rcache_t *rc, void *arg,
			     ucs_rcache_region_t *region, uint16_t flags)
{
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
		.region_struct_size = sizeof(ucs_rcache_region_t),
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
