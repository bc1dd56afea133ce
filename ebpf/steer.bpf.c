// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* SK_REUSEPORT program for gati's UDP ingress: reads the 64-byte header of each
 * datagram and selects the socket of the SGS serving its DAG.
 *
 * Choice (mirrored by sched::route::pick_least_loaded in Rust): among the DAG's
 * routes, those whose SGS holds the fewest requests (steer_load.queued); among
 * those, the request id modulo their total weight walks the routes in order.
 * Everything that is not an InvokeDag for a routed DAG goes to the default slot
 * (the I/O thread's socket), counted by kind.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "steer.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STEER_MAX_DAGS);
	__type(key, __u32);
	__type(value, struct steer_routes);
} steer_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STEER_MAX_SGS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct steer_load);
} steer_load SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, STEER_SOCK_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} steer_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STEER_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} steer_counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&steer_counters, &which);
	if (c)
		*c += 1;
}

/* Selects `slot`, else the default slot; counts `what` or STEER_DROPPED. */
static __always_inline int select_slot(struct sk_reuseport_md *md, __u32 slot, __u32 what)
{
	if (bpf_sk_select_reuseport(md, &steer_socks, &slot, 0) == 0) {
		count(what);
		return SK_PASS;
	}
	if (what == STEER_STEERED) {
		__u32 def = STEER_DEFAULT_SLOT;
		if (bpf_sk_select_reuseport(md, &steer_socks, &def, 0) == 0) {
			count(STEER_FALLBACK);
			return SK_PASS;
		}
	}
	count(STEER_DROPPED);
	/* SK_PASS without a selection: the kernel hashes over the group. */
	return SK_PASS;
}

static __always_inline __u32 queued_of(__u32 sgs)
{
	struct steer_load *l = bpf_map_lookup_elem(&steer_load, &sgs);
	return l ? l->queued : 0;
}

SEC("sk_reuseport")
int steer_udp(struct sk_reuseport_md *md)
{
	/* __u64 words: every field read below is naturally aligned. */
	__u64 words[STEER_HEADER_LEN / 8];
	__u8 *hdr = (__u8 *)words;
	if (bpf_skb_load_bytes(md, STEER_UDP_HDR_LEN, words, sizeof(words)) != 0)
		return select_slot(md, STEER_DEFAULT_SLOT, STEER_MALFORMED);
	__u32 magic = *(__u32 *)&hdr[STEER_OFF_MAGIC];
	__u16 version = *(__u16 *)&hdr[STEER_OFF_VERSION];
	if (magic != STEER_MAGIC || version != STEER_VERSION)
		return select_slot(md, STEER_DEFAULT_SLOT, STEER_MALFORMED);
	__u16 kind = *(__u16 *)&hdr[STEER_OFF_KIND];
	if (kind != STEER_KIND_INVOKE_DAG)
		return select_slot(md, STEER_DEFAULT_SLOT, STEER_OTHER);
	__u32 dag = *(__u32 *)&hdr[STEER_OFF_TARGET_ID];
	__u64 key = *(__u64 *)&hdr[STEER_OFF_REQUEST_ID];
	struct steer_routes *r = bpf_map_lookup_elem(&steer_routes, &dag);
	if (!r)
		return select_slot(md, STEER_DEFAULT_SLOT, STEER_FALLBACK);
	__u32 n = r->n;
	if (n == 0 || n > STEER_MAX_ROUTES)
		return select_slot(md, STEER_DEFAULT_SLOT, STEER_FALLBACK);

	__u32 q[STEER_MAX_ROUTES];
	__u32 least = 0xffffffffu;
	for (int i = 0; i < STEER_MAX_ROUTES; i++) {
		q[i] = 0xffffffffu;
		if ((__u32)i < n) {
			q[i] = queued_of(r->sgs[i]);
			if (q[i] < least)
				least = q[i];
		}
	}
	__u64 total = 0;
	for (int i = 0; i < STEER_MAX_ROUTES; i++)
		if ((__u32)i < n && q[i] == least)
			total += r->weight[i];
	__u32 pick = STEER_MAX_ROUTES;
	if (total == 0) {
		for (int i = 0; i < STEER_MAX_ROUTES; i++)
			if ((__u32)i < n && q[i] == least && pick == STEER_MAX_ROUTES)
				pick = i;
	} else {
		__u64 x = key % total;
		for (int i = 0; i < STEER_MAX_ROUTES; i++) {
			if ((__u32)i < n && q[i] == least && pick == STEER_MAX_ROUTES) {
				__u64 w = r->weight[i];
				if (x < w)
					pick = i;
				else
					x -= w;
			}
		}
	}
	if (pick >= STEER_MAX_ROUTES)
		return select_slot(md, STEER_DEFAULT_SLOT, STEER_FALLBACK);
	__u32 slot = r->sgs[pick];
	if (slot >= STEER_MAX_SGS)
		return select_slot(md, STEER_DEFAULT_SLOT, STEER_FALLBACK);
	return select_slot(md, slot, STEER_STEERED);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
