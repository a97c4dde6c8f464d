// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * mpi_remap: large MPI messages from a buffer remapped by raw syscalls.
 *
 * Rank 0 sends ITERS messages of LEN bytes to rank 1; before each one it
 * replaces the buffer's pages with syscall(SYS_munmap) + syscall(SYS_mmap) at
 * the same address (as static binaries and Go do: no libc hook sees it) and
 * writes that iteration's pattern. Rank 1 checks every byte and counts the
 * messages that carried anything else. Then, from an unchanging buffer, the
 * 8-byte ping-pong latency and the LEN-byte streaming bandwidth.
 *
 *   mpi_remap iters=N bad=B stale=S lat_us=L bw_MiBs=W
 *
 * Build: mpicc.mpich -O2 -Wall -Wextra -o mpi_remap mpi_remap.c
 */
#define _GNU_SOURCE
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LEN (4UL << 20)
#define ITERS 8
#define LAT_ITERS 200
#define BW_ITERS 20

static uint8_t pattern(size_t i, int it)
{
	return (uint8_t)(i * 131 + 17 + it * 29);
}

int main(int argc, char **argv)
{
	int rank, bad = 0, stale = 0;
	uint8_t *buf;
	double t0, lat, bw;

	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		MPI_Abort(MPI_COMM_WORLD, 2);

	for (int it = 0; it < ITERS; it++) {
		if (rank == 0) {
			if (it > 0) {
				long r;

				if (syscall(SYS_munmap, buf, LEN))
					MPI_Abort(MPI_COMM_WORLD, 3);
				r = syscall(SYS_mmap, buf, LEN,
					    PROT_READ | PROT_WRITE,
					    MAP_PRIVATE | MAP_ANONYMOUS |
						    MAP_FIXED_NOREPLACE,
					    -1, 0);
				if (r != (long)(uintptr_t)buf)
					MPI_Abort(MPI_COMM_WORLD, 4);
			}
			for (size_t i = 0; i < LEN; i++)
				buf[i] = pattern(i, it);
			MPI_Send(buf, LEN, MPI_BYTE, 1, it, MPI_COMM_WORLD);
		} else {
			size_t good = 0, old = 0;

			memset(buf, 0xee, LEN);
			MPI_Recv(buf, LEN, MPI_BYTE, 0, it, MPI_COMM_WORLD,
				 MPI_STATUS_IGNORE);
			for (size_t i = 0; i < LEN; i++) {
				good += buf[i] == pattern(i, it);
				old += it > 0 && buf[i] == pattern(i, it - 1);
			}
			bad += good != LEN;
			stale += old == LEN;
		}
	}

	/* Latency: 8-byte ping-pong. */
	MPI_Barrier(MPI_COMM_WORLD);
	t0 = MPI_Wtime();
	for (int i = 0; i < LAT_ITERS; i++) {
		if (rank == 0) {
			MPI_Send(buf, 8, MPI_BYTE, 1, 1000, MPI_COMM_WORLD);
			MPI_Recv(buf, 8, MPI_BYTE, 1, 1001, MPI_COMM_WORLD,
				 MPI_STATUS_IGNORE);
		} else {
			MPI_Recv(buf, 8, MPI_BYTE, 0, 1000, MPI_COMM_WORLD,
				 MPI_STATUS_IGNORE);
			MPI_Send(buf, 8, MPI_BYTE, 0, 1001, MPI_COMM_WORLD);
		}
	}
	lat = (MPI_Wtime() - t0) / LAT_ITERS / 2 * 1e6;

	/* Bandwidth: LEN-byte messages from one buffer, acknowledged at the end. */
	MPI_Barrier(MPI_COMM_WORLD);
	t0 = MPI_Wtime();
	for (int i = 0; i < BW_ITERS; i++) {
		if (rank == 0)
			MPI_Send(buf, LEN, MPI_BYTE, 1, 2000, MPI_COMM_WORLD);
		else
			MPI_Recv(buf, LEN, MPI_BYTE, 0, 2000, MPI_COMM_WORLD,
				 MPI_STATUS_IGNORE);
	}
	if (rank == 0)
		MPI_Recv(buf, 1, MPI_BYTE, 1, 2001, MPI_COMM_WORLD,
			 MPI_STATUS_IGNORE);
	else
		MPI_Send(buf, 1, MPI_BYTE, 0, 2001, MPI_COMM_WORLD);
	bw = (double)LEN * BW_ITERS / (MPI_Wtime() - t0) / (1 << 20);

	if (rank == 1)
		printf("mpi_remap iters=%d bad=%d stale=%d lat_us=%.1f bw_MiBs=%.1f\n",
		       ITERS, bad, stale, lat, bw);
	MPI_Finalize();
	return 0;
}
