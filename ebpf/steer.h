/* gati steering: the one definition of every BPF map's key and value layout.
 *
 * Included by the kernel programs (*.bpf.c) and by layout.c, which the daemon's
 * build script compiles for the host to check the #[repr(C)] Rust mirrors in
 * daemon/src/steer/layout.rs (sizes, offsets and constants must agree).
 * All fields are little-endian host integers; keys are __u32.
 */
#ifndef GATI_STEER_H
#define GATI_STEER_H

#include <linux/types.h>

/* Most SGSs a node steers to; SGS i owns socket slot i. */
#define STEER_MAX_SGS 16
/* Most routes (SGSs) one DAG may have. */
#define STEER_MAX_ROUTES 8
/* Socket slot of the I/O thread: non-DAG kinds, unknown targets, malformed. */
#define STEER_DEFAULT_SLOT STEER_MAX_SGS
#define STEER_SOCK_SLOTS (STEER_MAX_SGS + 1)
/* Most DAGs in the route map. */
#define STEER_MAX_DAGS 1024

/* The 64-byte request header (docs/protocol.md), as far as steering reads it. */
#define STEER_MAGIC 0x49544147u /* "GATI" little-endian */
#define STEER_VERSION 1
#define STEER_KIND_INVOKE_DAG 8
#define STEER_HEADER_LEN 64

/* map `steer_routes`: HASH, key = DAG id (the header's target_id). */
struct steer_routes {
	__u32 n;                        /* routes in use, 1..=STEER_MAX_ROUTES */
	__u32 _pad;
	__u32 sgs[STEER_MAX_ROUTES];    /* SGS index (= socket slot) */
	__u32 weight[STEER_MAX_ROUTES]; /* relative share, > 0 */
};

/* map `steer_load`: ARRAY (mmapable), key = SGS index; written by each SGS
 * as it runs, read by the program: the least `queued` wins, ties by weight;
 * each pick adds 1 to its SGS's `queued` until the SGS next publishes. */
struct steer_load {
	__u32 queued; /* requests held (queued or running, not yet answered) + picked since */
	__u32 idle;   /* idle warm workers */
};

/* map `steer_socks`: REUSEPORT_SOCKARRAY, key = socket slot, value = socket fd (4 bytes). */

/* map `steer_counters`: PERCPU_ARRAY of __u64, key = one of these. */
enum steer_counter {
	STEER_STEERED = 0,   /* an InvokeDag selected its SGS's socket */
	STEER_FALLBACK = 1,  /* an InvokeDag for an unknown DAG or an empty slot: default socket */
	STEER_OTHER = 2,     /* a well-formed header of another kind: default socket */
	STEER_MALFORMED = 3, /* shorter than a header, bad magic/version: default socket */
	STEER_DROPPED = 4,   /* no socket could be selected: the kernel's own choice */
	STEER_COUNTERS = 5,
};

/* An SK_REUSEPORT program's packet data starts at the transport header (it
 * is not pulled before the program runs): the request header follows it. */
#define STEER_UDP_HDR_LEN 8

/* Byte offsets in the request header. */
#define STEER_OFF_MAGIC 0
#define STEER_OFF_VERSION 4
#define STEER_OFF_KIND 6
#define STEER_OFF_REQUEST_ID 8
#define STEER_OFF_TARGET_ID 16
#define STEER_OFF_PAYLOAD_LEN 24
/* reserved[8]: on a kernel-steered Unix frame, the client connection's socket cookie. */
#define STEER_OFF_STAMP 56

/* Unix stream clients (steer_unix). Most accepted connections steered. */
#define STEER_MAX_CONNS 4096
/* Most frames of one passed write() whose boundaries are followed. */
#define STEER_UNIX_WALK 16

/* map `steer_unix_state`: HASH, key = socket cookie (__u64) of an accepted
 * connection, written {0, 0} by the daemon when it adds the connection to
 * `steer_unix_conns` (SOCKHASH, key = cookie); `steer_unix_sgs` is a SOCKMAP,
 * key = SGS index, value = the SGS socket's fd. */
struct steer_conn {
	__u32 remaining; /* bytes of a passed frame still to come */
	__u32 lost;      /* 1: frame boundaries no longer known: everything passes */
};

#endif
