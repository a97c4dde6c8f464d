/*
 * test_vulkan.c: the C API with a Vulkan device the program created itself, on the host
 * (Mesa lavapipe, or any driver with VK_EXT_external_memory_host). Run by
 * scripts/test-capi.sh; with UMM_REQUIRE_VULKAN=1 a missing driver fails instead of
 * printing "SKIP: ...". Closing line: "N passed, N failed".
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <umm.h>
#include <vulkan/vulkan.h>

#include "check.h"

static int skip(const char *why)
{
	if (getenv("UMM_REQUIRE_VULKAN")) {
		printf("FAIL: %s (UMM_REQUIRE_VULKAN is set)\n0 passed, 1 failed\n", why);
		return 1;
	}
	printf("SKIP: %s\n", why);
	return 0;
}

static int has_host_import(VkPhysicalDevice pd)
{
	uint32_t n = 0;
	VkExtensionProperties *e;
	int found = 0;

	vkEnumerateDeviceExtensionProperties(pd, NULL, &n, NULL);
	e = calloc(n, sizeof(*e));
	vkEnumerateDeviceExtensionProperties(pd, NULL, &n, e);
	for (uint32_t i = 0; i < n; i++)
		found |= strcmp(e[i].extensionName, VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME) == 0;
	free(e);
	return found;
}

/* A device with one queue of family 0, with or without the host-import extension. */
static VkDevice make_device(VkPhysicalDevice pd, int with_ext)
{
	float prio = 1.0f;
	const char *ext = VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME;
	VkDeviceQueueCreateInfo q = {
		.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
		.queueFamilyIndex = 0,
		.queueCount = 1,
		.pQueuePriorities = &prio,
	};
	VkDeviceCreateInfo info = {
		.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
		.queueCreateInfoCount = 1,
		.pQueueCreateInfos = &q,
		.enabledExtensionCount = with_ext ? 1 : 0,
		.ppEnabledExtensionNames = with_ext ? &ext : NULL,
	};
	VkDevice dev = VK_NULL_HANDLE;

	if (vkCreateDevice(pd, &info, NULL, &dev) != VK_SUCCESS)
		return VK_NULL_HANDLE;
	return dev;
}

int main(void)
{
	VkApplicationInfo app = {
		.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
		.pApplicationName = "test_vulkan",
		.apiVersion = VK_API_VERSION_1_1,
	};
	VkInstanceCreateInfo ii = { .sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, .pApplicationInfo = &app };
	VkInstance inst;
	VkPhysicalDevice pds[16], pd = VK_NULL_HANDLE;
	uint32_t npd = 16;

	if (vkCreateInstance(&ii, NULL, &inst) != VK_SUCCESS)
		return skip("vkCreateInstance failed (no Vulkan driver)");
	vkEnumeratePhysicalDevices(inst, &npd, pds);
	for (uint32_t i = 0; i < npd && !pd; i++)
		if (has_host_import(pds[i]))
			pd = pds[i];
	if (!pd) {
		vkDestroyInstance(inst, NULL);
		return skip("no Vulkan device with VK_EXT_external_memory_host");
	}

	VkDevice dev = make_device(pd, 1), plain = make_device(pd, 0);
	umm_manager_t *m = NULL;
	umm_device_t gpu = 99, bad = 99;
	size_t len = 64 * 1024;
	char *buf = mmap(NULL, 4 * len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	umm_pin_t *p1 = NULL, *p2 = NULL, *p3 = NULL;
	umm_translation_t t1, t2, t3;
	umm_status_t s;

	CHECK(dev && plain, "vkCreateDevice");
	CHECK(umm_manager_create(&m) == UMM_OK, "create");
	s = umm_attach_vulkan(m, inst, pd, plain, &bad);
	CHECK(s == UMM_ERR_BACKEND && strstr(umm_last_error(), "VK_EXT_external_memory_host"),
	      "a device without the extension is refused: %s", umm_strerror(s));
	CHECK(umm_attach_vulkan(m, inst, pd, dev, &gpu) == UMM_OK, "attach");
	printf("device: %s\n", umm_device_name(m, gpu));

	/* Miss: one import + buffer. */
	CHECK(umm_pin(m, buf + 4096 + 8, len, &gpu, 1, &p1) == UMM_OK, "pin");
	CHECK(umm_pin_translation(p1, gpu, &t1) == UMM_OK, "translation");
	CHECK(t1.kind == UMM_DEVICE_VULKAN && t1.vk_memory != 0 && t1.vk_buffer != 0, "kind %d memory %#llx buffer %#llx",
	      t1.kind, (unsigned long long)t1.vk_memory, (unsigned long long)t1.vk_buffer);
	CHECK(t1.registered_addr + t1.offset == (uintptr_t)buf + 4096 + 8 && t1.registered_len >= len + 8,
	      "registered %#llx+%llu offset %llu", (unsigned long long)t1.registered_addr,
	      (unsigned long long)t1.registered_len, (unsigned long long)t1.offset);

	/* Hit: the same import. */
	CHECK(umm_pin(m, buf + 4096 + 8, len, &gpu, 1, &p2) == UMM_OK, "pin again");
	CHECK(umm_pin_translation(p2, gpu, &t2) == UMM_OK && t2.vk_memory == t1.vk_memory &&
		      t2.vk_buffer == t1.vk_buffer,
	      "hit");

	/* Invalidate: freed with the last pin; the next pin imports afresh. */
	CHECK(umm_invalidate(m, buf, 4 * len) == UMM_OK, "invalidate");
	CHECK(!umm_pin_is_valid(p1), "stale pin says so");
	umm_unpin(p1);
	umm_unpin(p2);
	CHECK(umm_pin(m, buf + 4096 + 8, len, &gpu, 1, &p3) == UMM_OK, "pin after invalidate");
	CHECK(umm_pin_translation(p3, gpu, &t3) == UMM_OK && t3.vk_memory != 0, "fresh import");
	umm_unpin(p3);

	umm_device_stats_t ds;
	CHECK(umm_device_stats(m, gpu, &ds) == UMM_OK && ds.registrations == 2 && ds.deregistrations == 1 &&
		      ds.hits == 1 && ds.cached_entries == 1,
	      "stats reg %llu dereg %llu hits %llu cached %llu", (unsigned long long)ds.registrations,
	      (unsigned long long)ds.deregistrations, (unsigned long long)ds.hits,
	      (unsigned long long)ds.cached_entries);

	/* Destroy frees umm's imports; the program's device and instance are still its own. */
	umm_manager_destroy(m);
	CHECK(vkDeviceWaitIdle(dev) == VK_SUCCESS, "the device is still usable after destroy");
	vkDestroyDevice(dev, NULL);
	vkDestroyDevice(plain, NULL);
	vkDestroyInstance(inst, NULL);
	munmap(buf, 4 * len);
	printf("ok vulkan\n");
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
