//! The set of served models, swapped whole on reload.
//!
//! Readers (I/O threads) take a cheap snapshot per request; a reload builds
//! the new set off to the side and swaps it in. A replaced model's batcher
//! keeps running until the last request holding its handle is answered.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::batcher::ModelHandle;

/// Models by wire id.
pub type ModelSet = HashMap<u32, Arc<ModelHandle>>;

/// The served models.
#[derive(Default)]
pub struct Registry {
    current: RwLock<Arc<ModelSet>>,
}

impl Registry {
    /// The current set.
    pub fn snapshot(&self) -> Arc<ModelSet> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The model with wire id `id`.
    pub fn get(&self, id: u32) -> Option<Arc<ModelHandle>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// The model named `name`.
    pub fn by_name(&self, name: &str) -> Option<Arc<ModelHandle>> {
        self.get(crate::id::model_id(name)).filter(|m| m.meta.name == name)
    }

    /// Replaces the whole set.
    pub fn replace(&self, set: ModelSet) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }
}
