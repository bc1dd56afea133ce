// SPDX-License-Identifier: GPL-2.0
/* gati_dev: BPF_PROG_TYPE_CGROUP_DEVICE, attached to each app's cgroup (v2).
 * A character device of the rules' major with a GPU minor may be opened only
 * when its bit is set for the opener's cgroup; every other device is left to
 * the rest of the kernel's checks. A process in a cgroup below the app's
 * (no entry of its own) gets no GPU at all. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "devices.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, GATI_DEV_MAX_GROUPS);
	__type(key, __u64);
	__type(value, struct gati_dev_rules);
} gati_dev_rules SEC(".maps");

/* The GPUs' major, for processes without an entry (set at load). */
volatile const __u32 gati_dev_major = 195;

SEC("cgroup/dev")
int gati_dev(struct bpf_cgroup_dev_ctx *ctx)
{
	__u32 type = ctx->access_type & 0xFFFF;
	__u32 minor = ctx->minor;
	__u64 id;
	struct gati_dev_rules *r;

	if (type != BPF_DEVCG_DEV_CHAR || minor > GATI_DEV_MAX_GPU_MINOR)
		return 1;
	id = bpf_get_current_cgroup_id();
	r = bpf_map_lookup_elem(&gati_dev_rules, &id);
	if (!r)
		return ctx->major != gati_dev_major;
	if (ctx->major != r->major)
		return 1;
	return (r->allowed[(minor >> 6) & 3] >> (minor & 63)) & 1;
}

char LICENSE[] SEC("license") = "GPL";
