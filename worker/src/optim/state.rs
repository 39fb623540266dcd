//! An optimizer's state as named host tensors — `<parameter index>.<slot>` — so checkpoints can store
//! it and a resumed job can restore it exactly. Parameter indices follow the order of
//! `VarStore::trainable_variables`, which is the models' construction order (deterministic).

use std::collections::BTreeMap;
use tch::{Device, Tensor};

/// Why a saved optimizer state does not fit the optimizer it is loaded into.
#[derive(Debug, thiserror::Error)]
#[error("optimizer state: {0}")]
pub struct StateError(pub String);

#[derive(Debug, Default)]
pub struct OptimState {
    slots: BTreeMap<(usize, String), Tensor>,
}

impl OptimState {
    /// Stores a host copy of `t` as parameter `i`'s `slot`.
    pub fn put(&mut self, i: usize, slot: &str, t: &Tensor) {
        let host = t.detach().to_device(Device::Cpu).copy();
        self.slots.insert((i, slot.to_string()), host);
    }

    /// Parameter `i`'s `slot` as a fresh tensor on `like`'s device.
    pub fn take(&self, i: usize, slot: &str, like: &Tensor) -> Option<Tensor> {
        self.slots
            .get(&(i, slot.to_string()))
            .map(|t| t.to_device(like.device()).copy())
    }

    /// Parameter `i`'s `slot` as a host scalar.
    pub fn scalar(&self, i: usize, slot: &str) -> Option<f64> {
        self.slots
            .get(&(i, slot.to_string()))
            .map(|t| t.double_value(&[0]))
    }

    /// Every slot must name a parameter that exists, be one of `slots` (or `step`, a 1-element
    /// tensor), and have that parameter's shape.
    pub fn check_params(&self, params: &[Tensor], slots: &[&str]) -> Result<(), StateError> {
        for ((i, slot), t) in &self.slots {
            let p = params.get(*i).ok_or_else(|| {
                StateError(format!(
                    "slot {i}.{slot} names parameter {i} but the model has {}",
                    params.len()
                ))
            })?;
            if slot == "step" {
                if t.numel() != 1 {
                    return Err(StateError(format!(
                        "slot {i}.step holds {} values",
                        t.numel()
                    )));
                }
                continue;
            }
            if !slots.contains(&slot.as_str()) {
                return Err(StateError(format!(
                    "unknown slot {i}.{slot} (this optimizer keeps {slots:?})"
                )));
            }
            if t.size() != p.size() {
                return Err(StateError(format!(
                    "slot {i}.{slot} has shape {:?} but parameter {i} has {:?}",
                    t.size(),
                    p.size()
                )));
            }
        }
        Ok(())
    }

    /// `(name, tensor)` pairs for a checkpoint, names `<i>.<slot>`.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .map(|((i, slot), t)| (format!("{i}.{slot}"), t.shallow_clone()))
            .collect()
    }

    /// The inverse of [`OptimState::named`].
    pub fn from_named(named: Vec<(String, Tensor)>) -> Result<OptimState, StateError> {
        let mut s = OptimState::default();
        for (name, t) in named {
            let (i, slot) = name
                .split_once('.')
                .and_then(|(i, slot)| Some((i.parse::<usize>().ok()?, slot)))
                .ok_or_else(|| StateError(format!("malformed slot name {name:?}")))?;
            s.slots.insert((i, slot.to_string()), t);
        }
        Ok(s)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}
