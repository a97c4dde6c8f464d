// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * mpi-remap: large MPI messages from a buffer remapped by raw system calls
 * between iterations, every byte checked; then latency and bandwidth.
 *
 * Two ranks. Rank 0 sends a 1 MiB buffer ITERS times; before each send
 * after the first it replaces the buffer's pages with
 * syscall(SYS_munmap) + syscall(SYS_mmap) at the same address (as static
 * binaries and Go do, past any libc hook) and writes that iteration's
 * pattern. Rank 1 checks every byte of each message. Over Open MPI's
 * pml cm + mtl ofi (verbs;ofi_rxm), 1 MiB goes through rxm's rendezvous and
 * libfabric's MR cache: a monitor that misses the remap makes the NIC send
 * the old pages. Then, with a buffer that stays put (cache hits):
 * ping-pong latency of 8 bytes and bandwidth of 1 MiB messages.
 *
 * Rank 1 prints:
 *   mpi-remap monitor=umm:kmod iterations=8 corrupted=0 bad_bytes=0
 *   mpi-remap latency_us=.. bandwidth_MBps=..
 * Exit status 0 when the run completed (whatever the bytes), 1 otherwise.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LEN (1u << 20)
#define ITERS 8
#define LAT_ITERS 200
#define BW_ITERS 20

static unsigned char pattern(size_t i, int iter)
{
	return (unsigned char)(i * 131 + (i >> 12) * 7 + (size_t)iter * 29 + 1);
}

static const char *monitor_name(void)
{
	const char *(*source)(void) =
		(const char *(*)(void))dlsym(RTLD_DEFAULT, "umm_fabric_source");
	static char name[32];
	const char *s = source ? source() : NULL;

	if (!s)
		return source ? "umm:not-started" : "stock";
	snprintf(name, sizeof(name), "umm:%s", s);
	return name;
}

static void *raw_remap(void *buf)
{
	void *p;

	if (syscall(SYS_munmap, buf, LEN)) {
		perror("SYS_munmap");
		MPI_Abort(MPI_COMM_WORLD, 1);
	}
	p = (void *)syscall(SYS_mmap, buf, LEN, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (p != buf) {
		fprintf(stderr, "mpi-remap: SYS_mmap gave %p, not %p\n", p, buf);
		MPI_Abort(MPI_COMM_WORLD, 1);
	}
	return p;
}

int main(int argc, char **argv)
{
	int rank, size, corrupted = 0;
	size_t bad = 0;
	unsigned char *buf;
	char mon[32] = "";

	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	if (size != 2) {
		if (!rank)
			fprintf(stderr, "mpi-remap: run with 2 ranks\n");
		MPI_Finalize();
		return 1;
	}
	buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mmap");
		MPI_Abort(MPI_COMM_WORLD, 1);
	}

	/* Correctness: remapped between iterations. */
	for (int it = 0; it < ITERS; it++) {
		if (rank == 0) {
			if (it)
				raw_remap(buf);
			for (size_t i = 0; i < LEN; i++)
				buf[i] = pattern(i, it);
			MPI_Send(buf, LEN, MPI_BYTE, 1, it, MPI_COMM_WORLD);
		} else {
			size_t b = 0;

			memset(buf, 0, LEN);
			MPI_Recv(buf, LEN, MPI_BYTE, 0, it, MPI_COMM_WORLD,
				 MPI_STATUS_IGNORE);
			for (size_t i = 0; i < LEN; i++)
				b += buf[i] != pattern(i, it);
			if (b)
				corrupted++;
			bad += b;
		}
	}
	/* Which monitor served the sender. */
	if (rank == 0) {
		snprintf(mon, sizeof(mon), "%s", monitor_name());
		MPI_Send(mon, sizeof(mon), MPI_CHAR, 1, 100, MPI_COMM_WORLD);
	} else {
		MPI_Recv(mon, sizeof(mon), MPI_CHAR, 0, 100, MPI_COMM_WORLD,
			 MPI_STATUS_IGNORE);
		printf("mpi-remap monitor=%s iterations=%d corrupted=%d bad_bytes=%zu\n",
		       mon, ITERS, corrupted, bad);
		fflush(stdout);
	}

	/* Latency: 8-byte ping-pong. */
	MPI_Barrier(MPI_COMM_WORLD);
	double t0 = MPI_Wtime();

	for (int i = 0; i < LAT_ITERS; i++) {
		if (rank == 0) {
			MPI_Send(buf, 8, MPI_BYTE, 1, 200, MPI_COMM_WORLD);
			MPI_Recv(buf, 8, MPI_BYTE, 1, 201, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
		} else {
			MPI_Recv(buf, 8, MPI_BYTE, 0, 200, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
			MPI_Send(buf, 8, MPI_BYTE, 0, 201, MPI_COMM_WORLD);
		}
	}
	double lat = (MPI_Wtime() - t0) / LAT_ITERS / 2 * 1e6;

	/* Bandwidth: 1 MiB messages from a buffer that stays put, one ack. */
	MPI_Barrier(MPI_COMM_WORLD);
	t0 = MPI_Wtime();
	for (int i = 0; i < BW_ITERS; i++) {
		if (rank == 0)
			MPI_Send(buf, LEN, MPI_BYTE, 1, 300, MPI_COMM_WORLD);
		else
			MPI_Recv(buf, LEN, MPI_BYTE, 0, 300, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
	}
	if (rank == 0)
		MPI_Recv(mon, 1, MPI_CHAR, 1, 301, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
	else
		MPI_Send(mon, 1, MPI_CHAR, 0, 301, MPI_COMM_WORLD);
	double bw = (double)LEN * BW_ITERS / (MPI_Wtime() - t0) / 1e6;

	if (rank == 1) {
		printf("mpi-remap latency_us=%.1f bandwidth_MBps=%.1f\n", lat, bw);
		fflush(stdout);
	}
	MPI_Finalize();
	return 0;
}
