// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * ucx_bytes: does UCX send the bytes that are in the buffer now?
 *
 * Two processes speak UCP (tag API) over a connection made through rdmacm
 * (ucp_listener on the receiver, UCP_EP_PARAM_FIELD_SOCK_ADDR on the sender).
 * After a small warm-up message (which completes the wireup), the sender sends
 * 1 MiB from a buffer (rendezvous, zero-copy from the sender's registered
 * pages, which UCX's rcache keeps registered), changes the
 * buffer's mapping by one method, writes new bytes and sends the same address
 * again. The receiver checks every byte of both messages and prints one line:
 *
 *   ucx_bytes row=<method> first=new second=<new|old|mixed|zero> new=<n> old=<n>
 *
 * "old" means the NIC sent the pages that were mapped before the change (a stale
 * registration), "new" that it sent what the buffer holds now.
 *
 * Usage:
 *   ucx_bytes recv <ip> <port> <method>     (prints "listening" when ready)
 *   ucx_bytes send <ip> <port> <method>
 * Methods: libc raw fixed fork punch shmremap dontneed
 * BYTES_TIMEOUT=<s> limits the run (default 300); BYTES_DEBUG=1 prints the
 * buffer address and the endpoint's configuration after the first send.
 *
 * Build: cc -O2 -Wall -Wextra -o ucx_bytes ucx_bytes.c -lucp -lucs
 * Linked with umm-ucx (calls umm_ucx_install() first, prints its counters at
 * exit): add -DUMM_UCX_LINKED -I monitors/ucx/include and -lumm_ucx BEFORE -lucp.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <ucp/api/ucp.h>
#include <unistd.h>
#ifdef UMM_UCX_LINKED
#include <umm_ucx.h>
#endif

#define LEN (1UL << 20)
#define TAG 0x5eedULL

static void die(const char *what)
{
	fprintf(stderr, "ucx_bytes[%d]: %s: %s\n", getpid(), what,
		strerror(errno));
	exit(2);
}

static void die_ucs(const char *what, ucs_status_t st)
{
	fprintf(stderr, "ucx_bytes[%d]: %s: %s\n", getpid(), what,
		ucs_status_string(st));
	exit(2);
}

/* Message 1 carries the old pattern, message 2 the new one. */
static uint8_t pattern(size_t i, int gen)
{
	return (uint8_t)(i * 131 + 17) ^ (gen ? 0x5a : 0);
}

static void fill(uint8_t *p, int gen)
{
	for (size_t i = 0; i < LEN; i++)
		p[i] = pattern(i, gen);
}

static ucp_context_h ctx;
static ucp_worker_h worker;
static ucp_ep_h ep;

static void init_ucp(void)
{
	ucp_params_t params = {
		.field_mask = UCP_PARAM_FIELD_FEATURES,
		.features = UCP_FEATURE_TAG,
	};
	ucp_worker_params_t wp = {
		.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
		.thread_mode = UCS_THREAD_MODE_SINGLE,
	};
	ucs_status_t st;

	st = ucp_init(&params, NULL, &ctx);
	if (st != UCS_OK)
		die_ucs("ucp_init", st);
	st = ucp_worker_create(ctx, &wp, &worker);
	if (st != UCS_OK)
		die_ucs("ucp_worker_create", st);
}

static void wait_req(void *req, const char *what)
{
	ucs_status_t st;

	if (req == NULL)
		return;
	if (UCS_PTR_IS_ERR(req))
		die_ucs(what, UCS_PTR_STATUS(req));
	do {
		ucp_worker_progress(worker);
		st = ucp_request_check_status(req);
	} while (st == UCS_INPROGRESS);
	ucp_request_free(req);
	if (st != UCS_OK)
		die_ucs(what, st);
}

static struct sockaddr_in addr_of(const char *ip, const char *port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };

	sa.sin_port = htons((uint16_t)atoi(port));
	if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
		fprintf(stderr, "ucx_bytes: bad address %s\n", ip);
		exit(2);
	}
	return sa;
}

static void on_conn(ucp_conn_request_h req, void *arg)
{
	ucp_ep_params_t p = {
		.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST,
		.conn_request = req,
	};
	ucs_status_t st;

	(void)arg;
	if (ep != NULL) {
		ucp_listener_reject(NULL, req);
		return;
	}
	st = ucp_ep_create(worker, &p, &ep);
	if (st != UCS_OK)
		die_ucs("ucp_ep_create (server)", st);
}

static const char *verdict(size_t n_new, size_t n_old, size_t n_zero)
{
	if (n_new == LEN)
		return "new";
	if (n_old == LEN)
		return "old";
	if (n_zero == LEN)
		return "zero";
	return "mixed";
}

static int receiver(const char *ip, const char *port, const char *row)
{
	struct sockaddr_in sa = addr_of(ip, port);
	ucp_listener_params_t lp = {
		.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR |
			      UCP_LISTENER_PARAM_FIELD_CONN_HANDLER,
		.sockaddr = { .addr = (struct sockaddr *)&sa,
			      .addrlen = sizeof(sa) },
		.conn_handler = { .cb = on_conn, .arg = NULL },
	};
	ucp_request_param_t rp = { .op_attr_mask = 0 };
	ucp_listener_h listener;
	const char *v[2];
	size_t n_new = 0, n_old = 0;
	uint8_t *buf;
	ucs_status_t st;

	init_ucp();
	st = ucp_listener_create(worker, &lp, &listener);
	if (st != UCS_OK)
		die_ucs("ucp_listener_create", st);
	printf("listening\n");
	fflush(stdout);
	buf = malloc(LEN);
	if (!buf)
		die("malloc");
	wait_req(ucp_tag_recv_nbx(worker, buf, 8, TAG + 1, ~0ULL, &rp),
		 "warm-up recv");
	for (int m = 0; m < 2; m++) {
		size_t nn = 0, no = 0, nz = 0;

		memset(buf, 0xee, LEN);
		wait_req(ucp_tag_recv_nbx(worker, buf, LEN, TAG, ~0ULL, &rp),
			 "ucp_tag_recv_nbx");
		for (size_t i = 0; i < LEN; i++) {
			nn += buf[i] == pattern(i, m);
			no += buf[i] == pattern(i, !m);
			nz += buf[i] == 0;
		}
		v[m] = verdict(nn, no, nz);
		n_new = nn;
		n_old = no;
	}
	printf("ucx_bytes row=%s first=%s second=%s new=%zu old=%zu\n", row,
	       v[0], v[1], n_new, n_old);
	fflush(stdout);
	/* Let the sender's rendezvous completions reach it before we go. */
	for (int i = 0; i < 1000; i++)
		ucp_worker_progress(worker);
	return 0;
}

static void send_buf(void *buf)
{
	ucp_request_param_t rp = { .op_attr_mask = 0 };

	wait_req(ucp_tag_send_nbx(ep, buf, LEN, TAG, &rp), "ucp_tag_send_nbx");
}

static void *map_anon(void *at, int extra)
{
	void *p = mmap(at, LEN, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | extra, -1, 0);

	if (p == MAP_FAILED)
		die("mmap");
	if (at && p != at) {
		fprintf(stderr, "ucx_bytes: mmap gave %p, wanted %p\n", p, at);
		exit(2);
	}
	return p;
}

static int sender(const char *ip, const char *port, const char *method)
{
	struct sockaddr_in sa = addr_of(ip, port);
	ucp_ep_params_t p = {
		.field_mask = UCP_EP_PARAM_FIELD_FLAGS |
			      UCP_EP_PARAM_FIELD_SOCK_ADDR,
		.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER,
		.sockaddr = { .addr = (struct sockaddr *)&sa,
			      .addrlen = sizeof(sa) },
	};
	ucp_request_param_t cp = {
		.op_attr_mask = 0,
		.flags = UCP_EP_CLOSE_FLAG_FORCE,
	};
	ucp_request_param_t rp = { .op_attr_mask = 0 };
	uint64_t warm = 1;
	uint8_t *buf;
	int shm1 = -1, fd = -1, pipefd[2] = { -1, -1 };
	pid_t child = -1;
	ucs_status_t st;

	init_ucp();
	st = ucp_ep_create(worker, &p, &ep);
	if (st != UCS_OK)
		die_ucs("ucp_ep_create (client)", st);
	/*
	 * A small message first: sends made before the connection is wired up
	 * go through the wireup lane by copy, so the measured first send would
	 * register nothing and the rcache would have nothing to hand out again.
	 */
	wait_req(ucp_tag_send_nbx(ep, &warm, sizeof(warm), TAG + 1, &rp),
		 "warm-up send");

	/* The buffer, first version. */
	if (!strcmp(method, "punch")) {
		char path[] = "/dev/shm/ucx_bytes.XXXXXX";

		fd = mkstemp(path);
		if (fd < 0 || unlink(path) || ftruncate(fd, LEN))
			die("tmpfs file");
		buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
			   0);
		if (buf == MAP_FAILED)
			die("mmap tmpfs");
	} else if (!strcmp(method, "shmremap")) {
		shm1 = shmget(IPC_PRIVATE, LEN, IPC_CREAT | 0600);
		if (shm1 < 0)
			die("shmget");
		buf = shmat(shm1, NULL, 0);
		if (buf == (void *)-1)
			die("shmat");
		shmctl(shm1, IPC_RMID, NULL);
	} else {
		buf = map_anon(NULL, 0);
	}
	fill(buf, 0);
	send_buf(buf);
	if (getenv("BYTES_DEBUG")) {
		fprintf(stderr, "buf %p\n", (void *)buf);
		ucp_ep_print_info(ep, stderr);
	}

	/* Change what is mapped at buf. */
	if (!strcmp(method, "libc")) {
		if (munmap(buf, LEN))
			die("munmap");
		map_anon(buf, MAP_FIXED_NOREPLACE);
	} else if (!strcmp(method, "raw")) {
		long r;

		if (syscall(SYS_munmap, buf, LEN))
			die("SYS_munmap");
		r = syscall(SYS_mmap, buf, LEN, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
			    -1, 0);
		if (r != (long)(uintptr_t)buf)
			die("SYS_mmap");
	} else if (!strcmp(method, "fixed")) {
		map_anon(buf, MAP_FIXED);
	} else if (!strcmp(method, "fork")) {
		char c;

		if (pipe(pipefd))
			die("pipe");
		child = fork();
		if (child < 0)
			die("fork");
		if (child == 0) {
			close(pipefd[1]);
			/* Hold the copy until the parent has sent. */
			while (read(pipefd[0], &c, 1) < 0 && errno == EINTR)
				;
			_exit(0);
		}
		close(pipefd[0]);
	} else if (!strcmp(method, "punch")) {
		if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
			      LEN))
			die("fallocate(PUNCH_HOLE)");
	} else if (!strcmp(method, "shmremap")) {
		int shm2 = shmget(IPC_PRIVATE, LEN, IPC_CREAT | 0600);

		if (shm2 < 0)
			die("shmget 2");
		if (shmat(shm2, buf, SHM_REMAP) != buf)
			die("shmat(SHM_REMAP)");
		shmctl(shm2, IPC_RMID, NULL);
	} else if (!strcmp(method, "dontneed")) {
		if (madvise(buf, LEN, MADV_DONTNEED))
			die("madvise(MADV_DONTNEED)");
	} else {
		fprintf(stderr, "ucx_bytes: unknown method %s\n", method);
		exit(2);
	}
	fill(buf, 1);
	send_buf(buf);

	if (child > 0) {
		close(pipefd[1]);
		waitpid(child, NULL, 0);
	}
	wait_req(ucp_ep_close_nbx(ep, &cp), "ucp_ep_close_nbx");
	printf("sent row=%s\n", method);
	return 0;
}

#ifdef UMM_UCX_LINKED
static void print_umm_stats(void)
{
	struct umm_ucx_stats s;

	if (umm_ucx_stats(&s) == 0)
		fprintf(stderr,
			"umm-ucx pid=%d source=%s linked watched=%llu refused=%llu invalidations=%llu\n",
			getpid(), umm_ucx_source(),
			(unsigned long long)s.watched,
			(unsigned long long)s.refused,
			(unsigned long long)s.invalidations);
}
#endif

int main(int argc, char **argv)
{
	/* A hang must fail the run, not stall it. */
	const char *t = getenv("BYTES_TIMEOUT");

	alarm(t ? (unsigned)atoi(t) : 300);
#ifdef UMM_UCX_LINKED
	if (umm_ucx_install()) {
		fprintf(stderr, "umm_ucx_install: %s\n", umm_ucx_last_error());
		return 2;
	}
	atexit(print_umm_stats);
#endif
	if (argc == 5 && !strcmp(argv[1], "recv"))
		return receiver(argv[2], argv[3], argv[4]);
	if (argc == 5 && !strcmp(argv[1], "send"))
		return sender(argv[2], argv[3], argv[4]);
	fprintf(stderr,
		"usage: ucx_bytes recv <ip> <port> <row> | send <ip> <port> <method>\n"
		"methods: libc raw fixed fork punch shmremap dontneed\n");
	return 2;
}
