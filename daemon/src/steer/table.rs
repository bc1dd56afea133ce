//! [`BpfRouteTable`]: the load balancer's routes written into the kernel's
//! `steer_routes` map, with a userspace copy for the requests that still pass
//! through a thread (Unix socket, the UDP default socket), so both paths apply
//! the same rule over the same routes and the same load board.

use std::sync::{Arc, Mutex};

use super::program::Kernel;
use crate::sched::route::{LoadBoard, Route, RouteTable, SgsIndex, UserRouteTable};

pub struct BpfRouteTable {
    kernel: Arc<Mutex<Kernel>>,
    shadow: UserRouteTable,
}

impl BpfRouteTable {
    /// Clears the kernel's route map (a new scheduler publishes all its routes).
    pub fn new(kernel: Arc<Mutex<Kernel>>, load: Arc<LoadBoard>) -> Self {
        {
            let mut k = kernel.lock().unwrap_or_else(|p| p.into_inner());
            for dag in k.dags() {
                let _ = k.publish(dag, &[]);
            }
        }
        Self { kernel, shadow: UserRouteTable::with_load(load) }
    }

    /// Every DAG's routes, by DAG id.
    pub fn snapshot(&self) -> Vec<(u32, Vec<Route>)> {
        self.shadow.snapshot()
    }
}

impl RouteTable for BpfRouteTable {
    fn publish(&self, dag: u32, routes: &[Route]) {
        self.shadow.publish(dag, routes);
        let mut k = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = k.publish(dag, routes) {
            // Only the LB writes here (start and rescaling): not client-triggered.
            tracing::error!(dag, error = %e, "cannot write the kernel's route map; its datagrams go to the default socket");
        }
    }

    fn lookup(&self, dag: u32, key: u64) -> Option<SgsIndex> {
        self.shadow.lookup(dag, key)
    }

    fn kind(&self) -> &'static str {
        "ebpf"
    }
}
