/*
 * check.h: the checks shared by the C API's test programs. Each failed check prints
 * its file, line, condition, message and umm's last error; each program closes with
 * its "N passed, N failed" line.
 */
#ifndef UMM_TEST_CHECK_H
#define UMM_TEST_CHECK_H

#include <stdio.h>

#include <umm.h>

static int passed, failed;

#define CHECK(cond, ...)                                               \
	do {                                                           \
		if (cond) {                                            \
			passed++;                                      \
		} else {                                               \
			failed++;                                      \
			printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, \
			       #cond);                                 \
			printf(__VA_ARGS__);                           \
			printf(" (last error: %s)\n", umm_last_error()); \
		}                                                      \
	} while (0)

#endif /* UMM_TEST_CHECK_H */
