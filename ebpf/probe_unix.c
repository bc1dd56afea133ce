/* Probe of what the kernel allows for steer_unix (SK_SKB stream verdict, no
 * parser, on AF_UNIX stream sockets); findings in docs/steering.md. Not part
 * of the build. As root:
 *   clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -Iebpf -c ebpf/steer.bpf.c -o /tmp/steer.bpf.o
 *   cc -O1 -Iebpf ebpf/probe_unix.c -o /tmp/probe_unix -lbpf && /tmp/probe_unix /tmp/steer.bpf.o
 * (V=1 prints libbpf's log, the verifier's included; ANY=1 splits frames
 * anywhere, also inside the header's length field.)
 */
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <poll.h>
#include <stdint.h>
#include "steer.h"

static void hdr(uint8_t *h, uint16_t kind, uint64_t rid, uint32_t dag, uint32_t plen) {
	memset(h, 0, 64);
	uint32_t m = STEER_MAGIC; uint16_t v = 1;
	memcpy(h, &m, 4); memcpy(h + 4, &v, 2); memcpy(h + 6, &kind, 2); memcpy(h + 8, &rid, 8);
	memcpy(h + 16, &dag, 4); memcpy(h + 24, &plen, 4);
}
static int rd(int fd, uint8_t *buf, int cap, int ms) {
	struct pollfd p = { fd, POLLIN, 0 };
	if (poll(&p, 1, ms) <= 0) return -1;
	return recv(fd, buf, cap, MSG_DONTWAIT);
}
int main(int argc, char **argv) {
	if (!getenv("V")) libbpf_set_print(NULL);
	struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
	if (!obj) { printf("open: %s\n", strerror(errno)); return 1; }
	int e = bpf_object__load(obj);
	if (e) { printf("load: %d %s\n", e, strerror(-e)); return 1; }
	struct bpf_program *prog = bpf_object__find_program_by_name(obj, "steer_unix");
	int pfd = bpf_program__fd(prog);
	int conns = bpf_object__find_map_fd_by_name(obj, "steer_unix_conns");
	int sgsm = bpf_object__find_map_fd_by_name(obj, "steer_unix_sgs");
	int state = bpf_object__find_map_fd_by_name(obj, "steer_unix_state");
	int routes = bpf_object__find_map_fd_by_name(obj, "steer_routes");
	int ctr = bpf_object__find_map_fd_by_name(obj, "steer_unix_counters");
	e = bpf_prog_attach(pfd, conns, BPF_SK_SKB_STREAM_VERDICT, 0);
	printf("attach stream_verdict to sockhash: %d %s\n", e, e ? strerror(errno) : "ok");
	int cp[2], sp[2];
	socketpair(AF_UNIX, SOCK_STREAM, 0, cp); socketpair(AF_UNIX, SOCK_STREAM, 0, sp);
	uint64_t cookie; socklen_t cl = 8;
	e = getsockopt(cp[1], SOL_SOCKET, SO_COOKIE, &cookie, &cl);
	printf("SO_COOKIE: %d cookie=%llu\n", e, (unsigned long long)cookie);
	struct steer_conn z = {0, 0};
	e = bpf_map_update_elem(state, &cookie, &z, BPF_ANY); printf("state insert %d\n", e);
	uint64_t fd64 = cp[1];
	e = bpf_map_update_elem(conns, &cookie, &fd64, BPF_ANY);
	printf("sockhash insert AF_UNIX stream: %d %s\n", e, e ? strerror(errno) : "ok");
	uint32_t k0 = 0, sfd = sp[0];
	e = bpf_map_update_elem(sgsm, &k0, &sfd, BPF_ANY);
	printf("sockmap insert SGS socket: %d %s\n", e, e ? strerror(errno) : "ok");
	struct steer_routes r = {0}; r.n = 1; r.sgs[0] = 0; r.weight[0] = 1; uint32_t dag = 7;
	bpf_map_update_elem(routes, &dag, &r, BPF_ANY);
	uint8_t f[64 + 16], buf[4096];
	// 1. one whole InvokeDag frame -> SGS socket, stamped
	hdr(f, 8, 1, 7, 16); memset(f + 64, 'x', 16);
	write(cp[0], f, sizeof f);
	int n = rd(sp[0], buf, sizeof buf, 1000);
	uint64_t st = 0; if (n >= 64) memcpy(&st, buf + 56, 8);
	printf("1 whole frame: SGS got %d bytes, stamp %s; conn got %d\n", n, st == cookie ? "== cookie" : "WRONG", rd(cp[1], buf, sizeof buf, 50));
	// 2. split: header, then payload -> passes to conn
	write(cp[0], f, 64); write(cp[0], f + 64, 16);
	int a = rd(cp[1], buf, sizeof buf, 500); usleep(1000); int b = rd(cp[1], buf, sizeof buf, 50);
	printf("2 split frame: conn got %d + %d, SGS got %d\n", a, b, rd(sp[0], buf, sizeof buf, 50));
	// 3. after the split, a whole frame is steered again
	write(cp[0], f, sizeof f);
	printf("3 whole after split: SGS got %d, conn %d\n", rd(sp[0], buf, sizeof buf, 500), rd(cp[1], buf, sizeof buf, 50));
	// 4. Ping frame -> conn
	uint8_t pg[64]; hdr(pg, 2, 9, 0, 0); write(cp[0], pg, 64);
	printf("4 ping: conn got %d, SGS %d\n", rd(cp[1], buf, sizeof buf, 500), rd(sp[0], buf, sizeof buf, 50));
	// 5. unknown DAG -> conn
	hdr(f, 8, 2, 99, 16); write(cp[0], f, sizeof f);
	printf("5 unknown dag: conn got %d, SGS %d\n", rd(cp[1], buf, sizeof buf, 500), rd(sp[0], buf, sizeof buf, 50));
	// 6. answer from "SGS thread" on the conn
	write(cp[1], pg, 64); printf("6 answer on conn: client got %d\n", rd(cp[0], buf, sizeof buf, 500));
	// 7. two frames in one write -> conn
	uint8_t two[2 * 80]; hdr(two, 8, 3, 7, 16); hdr(two + 80, 8, 4, 7, 16); write(cp[0], two, sizeof two);
	printf("7 two frames one write: conn got %d, SGS %d\n", rd(cp[1], buf, sizeof buf, 500), rd(sp[0], buf, sizeof buf, 50));
	// 8. exactly-once over many frames with random splits
	srand(1); int sent_sgs = 0, sent_conn = 0, got_sgs = 0, got_conn = 0;
	for (int i = 0; i < 3000; i++) {
		hdr(f, 8, 100 + i, 7, 16);
		if (rand() % 4 == 0) { int cut = (getenv("ANY") ? 1 + rand() % 79 : 28 + rand() % 52); write(cp[0], f, cut); write(cp[0], f + cut, 80 - cut); sent_conn += 80; }
		else { write(cp[0], f, 80); sent_sgs += 80; }
		int m; while ((m = recv(sp[0], buf, sizeof buf, MSG_DONTWAIT)) > 0) got_sgs += m;
		while ((m = recv(cp[1], buf, sizeof buf, MSG_DONTWAIT)) > 0) got_conn += m;
	}
	for (int t = 0; t < 100 && (got_sgs < sent_sgs || got_conn < sent_conn); t++) {
		usleep(10000); int m; while ((m = recv(sp[0], buf, sizeof buf, MSG_DONTWAIT)) > 0) got_sgs += m;
		while ((m = recv(cp[1], buf, sizeof buf, MSG_DONTWAIT)) > 0) got_conn += m;
	}
	printf("8 random splits (3000 frames): sgs %d/%d bytes, conn %d/%d bytes\n", got_sgs, sent_sgs, got_conn, sent_conn);
	struct steer_conn s2; bpf_map_lookup_elem(state, &cookie, &s2); printf("state: remaining %u lost %u\n", s2.remaining, s2.lost);
	int ncpu = libbpf_num_possible_cpus(); uint64_t v[256];
	for (uint32_t c = 0; c < 5; c++) { bpf_map_lookup_elem(ctr, &c, v); uint64_t s = 0; for (int i = 0; i < ncpu; i++) s += v[i]; printf("counter %u = %llu\n", c, (unsigned long long)s); }
	{ uint64_t k, nk; void *pk = NULL; while (bpf_map_get_next_key(state, pk, &nk) == 0) { struct steer_conn x; bpf_map_lookup_elem(state, &nk, &x); printf("state key %llu = %u/%u\n", (unsigned long long)nk, x.remaining, x.lost); k = nk; pk = &k; } }
	uint64_t c0, c1; cl = 8; getsockopt(cp[0], SOL_SOCKET, SO_COOKIE, &c0, &cl); getsockopt(sp[0], SOL_SOCKET, SO_COOKIE, &c1, &cl); printf("cookies: client end %llu sgs end %llu\n", (unsigned long long)c0, (unsigned long long)c1);
	// 9. a stream parser on AF_UNIX?
	e = bpf_prog_attach(pfd, sgsm, BPF_SK_SKB_STREAM_PARSER, 0); printf("9 attach as parser to sockmap: %d %s\n", e, e ? strerror(errno) : "ok");
	int q[2]; socketpair(AF_UNIX, SOCK_STREAM, 0, q); uint32_t k1 = 1, qfd = q[0];
	e = bpf_map_update_elem(sgsm, &k1, &qfd, BPF_ANY); printf("  insert AF_UNIX with a parser attached: %d %s\n", e, e ? strerror(errno) : "ok");
	return 0;
}
