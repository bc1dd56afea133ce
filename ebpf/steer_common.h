/* gati steering: code shared by the kernel programs of steer.bpf.c (BPF only;
 * the map layouts themselves are in steer.h).
 *
 * steer_pick() is the one routing rule, mirrored by
 * sched::route::pick_least_loaded in Rust: among the DAG's routes, those whose
 * SGS holds the fewest requests (steer_load.queued); among those, the request
 * id modulo their total weight walks the routes in order. The pick counts
 * itself on the chosen SGS's `queued` (atomically) until that SGS next
 * publishes what it holds, so a burst between two publishes spreads over the
 * routes instead of all going to the SGS that was least loaded at the last
 * publish (userspace: sched::route::UserRouteTable::lookup does the same).
 */
#ifndef GATI_STEER_COMMON_H
#define GATI_STEER_COMMON_H

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

static __always_inline __u32 queued_of(__u32 sgs)
{
	struct steer_load *l = bpf_map_lookup_elem(&steer_load, &sgs);
	return l ? l->queued : 0;
}

/* The SGS (socket slot) for request `key` of DAG `dag`, or STEER_NO_SLOT
 * (unknown DAG, bad route entry). */
#define STEER_NO_SLOT 0xffffffffu
static __always_inline __u32 steer_pick(__u32 dag, __u64 key)
{
	struct steer_routes *r = bpf_map_lookup_elem(&steer_routes, &dag);
	if (!r)
		return STEER_NO_SLOT;
	__u32 n = r->n;
	if (n == 0 || n > STEER_MAX_ROUTES)
		return STEER_NO_SLOT;

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
		return STEER_NO_SLOT;
	__u32 slot = r->sgs[pick];
	if (slot >= STEER_MAX_SGS)
		return STEER_NO_SLOT;
	struct steer_load *l = bpf_map_lookup_elem(&steer_load, &slot);
	if (l)
		__sync_fetch_and_add(&l->queued, 1);
	return slot;
}

#endif
