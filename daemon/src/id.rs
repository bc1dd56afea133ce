//! The stable 32-bit id of a model or DAG name: what config validation checks
//! for collisions, the registry and scheduler key on, and the wire carries as
//! a request's target id. Its own module so that config, infer and sched need
//! nothing from the API layer.

/// Stable 32-bit id of a name (FNV-1a); never 0, which means "no target" on the wire.
pub fn model_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_stable_and_never_zero() {
        assert_eq!(super::model_id("cifar10"), super::model_id("cifar10"));
        assert_ne!(super::model_id("cifar10"), super::model_id("fmnist"));
        assert_ne!(super::model_id(""), 0);
    }
}
