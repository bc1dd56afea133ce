/* gati GPU device rules on cgroup v2: the layout of the `gati_dev_rules` map.
 *
 * Included by devices.bpf.c and by layout.c (which the daemon's build script
 * runs to check the #[repr(C)] mirror in daemon/src/auction/devices/v2.rs).
 */
#ifndef GATI_DEVICES_H
#define GATI_DEVICES_H

#include <linux/types.h>

/* Most app cgroups one node has rules for. */
#define GATI_DEV_MAX_GROUPS 1024
/* Highest GPU minor (NVIDIA: 254 nvidia-modeset, 255 nvidiactl stay open). */
#define GATI_DEV_MAX_GPU_MINOR 253

/* map `gati_dev_rules`: HASH, key = the app cgroup's id (__u64, its inode). */
struct gati_dev_rules {
	__u32 major;      /* the GPUs' character-device major */
	__u32 _pad;
	__u64 allowed[4]; /* bit m: minor m may be opened (m <= GATI_DEV_MAX_GPU_MINOR) */
};

#endif
