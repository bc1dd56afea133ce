// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* gati's steering programs (one object, sharing the route and load maps of
 * steer_common.h, which also holds the routing rule steer_pick()).
 *
 * steer_udp (SK_REUSEPORT, UDP ingress): reads the 64-byte header of each
 * datagram and selects the socket of the SGS serving its DAG. Everything that
 * is not an InvokeDag for a routed DAG goes to the default slot (the I/O
 * thread's socket), counted by kind.
 *
 * steer_unix (SK_SKB stream verdict, no parser: Unix stream clients): see below.
 */
#include "steer_common.h"

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
	__u32 slot = steer_pick(dag, key);
	if (slot == STEER_NO_SLOT)
		return select_slot(md, STEER_DEFAULT_SLOT, STEER_FALLBACK);
	return select_slot(md, slot, STEER_STEERED);
}

/* ---- Unix stream clients: steer_unix ------------------------------------
 *
 * An SK_SKB stream verdict without a parser (the parser is refused on AF_UNIX
 * since 6.14), attached to steer_unix_conns, the daemon's accepted client
 * connections. It sees one skb per client write(). An skb that is exactly one
 * well-formed InvokeDag frame (64-byte header + payload_len bytes) on a
 * connection at a frame boundary, for a routed DAG, gets the connection's
 * socket cookie written into the header's reserved bytes and is redirected
 * into the receive queue of the chosen SGS's socket (steer_unix_sgs), which
 * the SGS reads; the SGS answers on the client's connection (the cookie
 * names it). Everything else passes to the connection's own queue, read by
 * the I/O thread as without steering: partial frames, several frames in one
 * write, other kinds, unknown DAGs. steer_unix_state (keyed by cookie, written
 * by the daemon at accept) follows the frame boundaries of what passed; a
 * header split across writes (its length unknown) or a bad magic makes the
 * connection `lost`: everything on it passes from then on.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, STEER_MAX_CONNS);
	__type(key, __u64);
	__type(value, __u32);
} steer_unix_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, STEER_MAX_SGS);
	__type(key, __u32);
	__type(value, __u32);
} steer_unix_sgs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STEER_MAX_CONNS);
	__type(key, __u64);
	__type(value, struct steer_conn);
} steer_unix_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STEER_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} steer_unix_counters SEC(".maps");

/* Just the fields read, relocated against the running kernel's BTF (CO-RE). */
typedef struct {
	__s64 counter;
} atomic64_t;
struct sock_common {
	atomic64_t skc_cookie;
} __attribute__((preserve_access_index));
struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));
struct unix_sock {
	struct sock *peer;
} __attribute__((preserve_access_index));

/* The cookie of the socket that receives `skb`: on AF_UNIX the skb belongs
 * to the sender (the client's end), whose peer is the daemon's accepted
 * socket; the daemon asked for its cookie (SO_COOKIE) before adding it, so
 * it is set. 0 when unknown. */
static __always_inline __u64 receiver_cookie(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 0;
	struct unix_sock *u = bpf_skc_to_unix_sock(sk);
	if (!u)
		return 0;
	struct sock *peer = u->peer;
	if (!peer)
		return 0;
	return (__u64)peer->__sk_common.skc_cookie.counter;
}

static __always_inline int pass(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&steer_unix_counters, &which);
	if (c)
		*c += 1;
	return SK_PASS;
}

/* Follows the frames in bytes [off, len) of a passed skb, `off` at a frame start. */
static __always_inline void follow(struct __sk_buff *skb, struct steer_conn *st, __u64 off, __u32 len)
{
	for (int i = 0; i < STEER_UNIX_WALK; i++) {
		if (off >= len) {
			st->remaining = (__u32)(off - len);
			return;
		}
		__u32 plen = 0;
		if (len - off < STEER_OFF_PAYLOAD_LEN + 4 ||
		    bpf_skb_load_bytes(skb, (__u32)off + STEER_OFF_PAYLOAD_LEN, &plen, 4) != 0) {
			st->lost = 1; /* the length is in the next write */
			return;
		}
		off += STEER_HEADER_LEN + (__u64)plen;
	}
	if (off >= len && off - len < 0xffffffffull) {
		st->remaining = (__u32)(off - len);
		return;
	}
	st->lost = 1; /* more frames in one write than followed */
}

SEC("sk_skb/stream_verdict")
int steer_unix(struct __sk_buff *skb)
{
	__u64 cookie = receiver_cookie(skb);
	__u32 len = skb->len;
	struct steer_conn *st = bpf_map_lookup_elem(&steer_unix_state, &cookie);
	if (!st || st->lost)
		return pass(STEER_MALFORMED);
	if (st->remaining) {
		if (len <= st->remaining) {
			st->remaining -= len;
			return pass(STEER_MALFORMED);
		}
		__u32 off = st->remaining;
		st->remaining = 0;
		follow(skb, st, off, len);
		return pass(STEER_MALFORMED);
	}
	__u64 words[STEER_HEADER_LEN / 8];
	__u8 *hdr = (__u8 *)words;
	if (len < STEER_HEADER_LEN || bpf_skb_load_bytes(skb, 0, words, sizeof(words)) != 0) {
		follow(skb, st, 0, len);
		return pass(STEER_MALFORMED);
	}
	__u32 magic = *(__u32 *)&hdr[STEER_OFF_MAGIC];
	__u16 version = *(__u16 *)&hdr[STEER_OFF_VERSION];
	if (magic != STEER_MAGIC || version != STEER_VERSION) {
		st->lost = 1; /* the I/O thread closes such a connection */
		return pass(STEER_MALFORMED);
	}
	__u32 plen = *(__u32 *)&hdr[STEER_OFF_PAYLOAD_LEN];
	if ((__u64)STEER_HEADER_LEN + plen != len) {
		follow(skb, st, 0, len);
		return pass(STEER_MALFORMED);
	}
	__u16 kind = *(__u16 *)&hdr[STEER_OFF_KIND];
	if (kind != STEER_KIND_INVOKE_DAG)
		return pass(STEER_OTHER);
	__u32 dag = *(__u32 *)&hdr[STEER_OFF_TARGET_ID];
	__u64 key = *(__u64 *)&hdr[STEER_OFF_REQUEST_ID];
	__u32 slot = steer_pick(dag, key);
	if (slot == STEER_NO_SLOT)
		return pass(STEER_FALLBACK);
	/* SK_PASS with the redirect set; SK_DROP (no socket in the slot) clears it,
	 * and the frame passes unchanged. */
	if (bpf_sk_redirect_map(skb, &steer_unix_sgs, slot, BPF_F_INGRESS) != SK_PASS)
		return pass(STEER_FALLBACK);
	if (bpf_skb_store_bytes(skb, STEER_OFF_STAMP, &cookie, sizeof(cookie), 0) != 0) {
		/* Unstamped, the SGS could not answer it: clear the redirect (a
		 * failing lookup does) and pass it. */
		bpf_sk_redirect_map(skb, &steer_unix_sgs, STEER_MAX_SGS, 0);
		return pass(STEER_FALLBACK);
	}
	return pass(STEER_STEERED);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
