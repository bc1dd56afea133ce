//! Building the served model set from config, reusing unchanged models on reload.

use std::sync::Arc;
use std::time::SystemTime;

use crate::config::ModelConfig;
use crate::infer::registry::ModelSet;
use crate::infer::{InferError, LoadedModel, ModelHandle};

/// A model that failed to load.
#[derive(Debug, thiserror::Error)]
#[error("model `{name}`: {source}")]
pub struct ModelLoadError {
    pub name: String,
    #[source]
    pub source: InferError,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

/// Identity of a model file on disk, to notice a replaced file with an unchanged config.
pub fn file_stamp(cfg: &ModelConfig) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(&cfg.path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Loads every model of `configs`, keeping handles from `old` whose config and
/// file are unchanged. All or nothing: any failure leaves `old` as it is.
pub fn build(
    configs: &[ModelConfig],
    old: &ModelSet,
    stamps: &mut std::collections::HashMap<String, Option<(u64, SystemTime)>>,
    busy_poll: std::time::Duration,
) -> Result<(ModelSet, Changes), Vec<ModelLoadError>> {
    let mut set = ModelSet::new();
    let mut changes = Changes::default();
    let mut errors = Vec::new();
    let mut new_stamps = std::collections::HashMap::new();
    for cfg in configs {
        let stamp = file_stamp(cfg);
        let id = crate::id::model_id(&cfg.name);
        let previous = old.get(&id).filter(|h| h.meta.name == cfg.name);
        if let Some(h) = previous {
            if h.config == *cfg && stamps.get(&cfg.name) == Some(&stamp) {
                set.insert(id, Arc::clone(h));
                changes.kept.push(cfg.name.clone());
                new_stamps.insert(cfg.name.clone(), stamp);
                continue;
            }
        }
        let started = std::time::Instant::now();
        match LoadedModel::load(cfg).and_then(|m| ModelHandle::start(m, busy_poll)) {
            Ok(handle) => {
                tracing::info!(
                    model = %cfg.name,
                    stages = handle.meta.stages.len(),
                    cuts = ?handle.meta.stages.iter().map(|s| s.output.as_str()).collect::<Vec<_>>(),
                    est_batch1_us = handle.cost.predict(1).as_micros() as u64,
                    load_ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                );
                set.insert(id, Arc::new(handle));
                if previous.is_some() { &mut changes.replaced } else { &mut changes.added }.push(cfg.name.clone());
                new_stamps.insert(cfg.name.clone(), stamp);
            }
            Err(source) => errors.push(ModelLoadError { name: cfg.name.clone(), source }),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    for h in old.values() {
        if !configs.iter().any(|c| c.name == h.meta.name) {
            changes.removed.push(h.meta.name.clone());
        }
    }
    *stamps = new_stamps;
    Ok((set, changes))
}
