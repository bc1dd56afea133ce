/* Host program run by daemon/build.rs: prints steer.h's sizes, offsets and
 * constants as Rust constants, which daemon/src/steer/layout.rs checks its
 * #[repr(C)] mirrors against in a test (with the argument `devices`: devices.h's, for daemon/src/auction/devices/v2.rs). */
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include "steer.h"
#include "devices.h"

#define C(name, v) printf("pub const %s: usize = %lu;\n", name, (unsigned long)(v))

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "devices") == 0) {
		C("GATI_DEV_MAX_GROUPS", GATI_DEV_MAX_GROUPS);
		C("GATI_DEV_MAX_GPU_MINOR", GATI_DEV_MAX_GPU_MINOR);
		C("SIZEOF_GATI_DEV_RULES", sizeof(struct gati_dev_rules));
		C("OFFSETOF_GATI_DEV_RULES_MAJOR", offsetof(struct gati_dev_rules, major));
		C("OFFSETOF_GATI_DEV_RULES_ALLOWED", offsetof(struct gati_dev_rules, allowed));
		return 0;
	}
	C("STEER_MAX_SGS", STEER_MAX_SGS);
	C("STEER_MAX_ROUTES", STEER_MAX_ROUTES);
	C("STEER_DEFAULT_SLOT", STEER_DEFAULT_SLOT);
	C("STEER_SOCK_SLOTS", STEER_SOCK_SLOTS);
	C("STEER_MAX_DAGS", STEER_MAX_DAGS);
	C("STEER_MAGIC", STEER_MAGIC);
	C("STEER_VERSION", STEER_VERSION);
	C("STEER_KIND_INVOKE_DAG", STEER_KIND_INVOKE_DAG);
	C("STEER_HEADER_LEN", STEER_HEADER_LEN);
	C("STEER_UDP_HDR_LEN", STEER_UDP_HDR_LEN);
	C("STEER_OFF_MAGIC", STEER_OFF_MAGIC);
	C("STEER_OFF_VERSION", STEER_OFF_VERSION);
	C("STEER_OFF_KIND", STEER_OFF_KIND);
	C("STEER_OFF_REQUEST_ID", STEER_OFF_REQUEST_ID);
	C("STEER_OFF_TARGET_ID", STEER_OFF_TARGET_ID);
	C("STEER_COUNTERS", STEER_COUNTERS);
	C("STEER_STEERED", STEER_STEERED);
	C("STEER_FALLBACK", STEER_FALLBACK);
	C("STEER_OTHER", STEER_OTHER);
	C("STEER_MALFORMED", STEER_MALFORMED);
	C("STEER_DROPPED", STEER_DROPPED);
	C("SIZEOF_STEER_ROUTES", sizeof(struct steer_routes));
	C("OFFSETOF_STEER_ROUTES_N", offsetof(struct steer_routes, n));
	C("OFFSETOF_STEER_ROUTES_SGS", offsetof(struct steer_routes, sgs));
	C("OFFSETOF_STEER_ROUTES_WEIGHT", offsetof(struct steer_routes, weight));
	C("SIZEOF_STEER_LOAD", sizeof(struct steer_load));
	C("OFFSETOF_STEER_LOAD_QUEUED", offsetof(struct steer_load, queued));
	C("OFFSETOF_STEER_LOAD_IDLE", offsetof(struct steer_load, idle));
	C("STEER_OFF_PAYLOAD_LEN", STEER_OFF_PAYLOAD_LEN);
	C("STEER_OFF_STAMP", STEER_OFF_STAMP);
	C("STEER_MAX_CONNS", STEER_MAX_CONNS);
	C("SIZEOF_STEER_CONN", sizeof(struct steer_conn));
	C("OFFSETOF_STEER_CONN_REMAINING", offsetof(struct steer_conn, remaining));
	C("OFFSETOF_STEER_CONN_LOST", offsetof(struct steer_conn, lost));
	return 0;
}
