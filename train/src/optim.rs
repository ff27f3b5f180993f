//! AdamW with decoupled weight decay, and gradient clipping by global norm.
//!
//! candle-nn has an AdamW too, but its moment estimates are private, so a checkpoint
//! could not carry them and a resumed run would restart the moments from zero. This one
//! exposes its state for [`crate::checkpoint`].

use std::collections::HashMap;

use candle_core::Tensor;
use candle_core::backprop::GradStore;
use serde::{Deserialize, Serialize};

use crate::model::Parameter;
use crate::{Result, TrainError};

/// Hyperparameters of [`AdamW`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Base learning rate; the schedule scales it step by step.
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    /// Decoupled weight decay per unit of learning rate, applied to weights of rank 2
    /// and more (convolution kernels and matrices) but not to biases.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            learning_rate: 3e-3,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

impl AdamWConfig {
    /// Checks that the rate and decay are finite and not negative and the betas in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(TrainError::InvalidConfig(format!(
                "optimizer.learning_rate is {}, expected a positive number",
                self.learning_rate
            )));
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(TrainError::InvalidConfig(format!(
                    "optimizer.{name} is {beta}, expected at least 0 and below 1"
                )));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) || self.epsilon <= 0.0 {
            return Err(TrainError::InvalidConfig(format!(
                "optimizer.weight_decay = {} and epsilon = {}: expected 0 or more and a positive epsilon",
                self.weight_decay, self.epsilon
            )));
        }
        Ok(())
    }
}

/// First and second moment estimates of one parameter.
#[derive(Debug, Clone)]
struct Moments {
    first: Tensor,
    second: Tensor,
}

/// The optimizer state: step count and moment estimates, by parameter name.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    steps: u64,
    moments: HashMap<String, Moments>,
}

impl AdamW {
    /// Creates an optimizer with zero moments for `parameters`.
    pub fn new(parameters: &[Parameter], config: AdamWConfig) -> Result<AdamW> {
        let mut moments = HashMap::new();
        for parameter in parameters {
            let zeros = parameter.var.as_tensor().zeros_like()?;
            moments.insert(
                parameter.name.clone(),
                Moments {
                    first: zeros.clone(),
                    second: zeros,
                },
            );
        }
        Ok(AdamW {
            config,
            steps: 0,
            moments,
        })
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one update at `learning_rate`, with every gradient multiplied by
    /// `gradient_scale` first (the clipping factor). Parameters without a gradient are
    /// left alone.
    pub fn step(
        &mut self,
        parameters: &[Parameter],
        grads: &GradStore,
        learning_rate: f64,
        gradient_scale: f64,
    ) -> Result<()> {
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            epsilon,
            weight_decay,
            ..
        } = self.config;
        let correction1 = 1.0 - beta1.powi(self.steps as i32);
        let correction2 = 1.0 - beta2.powi(self.steps as i32);
        for parameter in parameters {
            let Some(grad) = grads.get(&parameter.var) else {
                continue;
            };
            let grad = (grad.detach() * gradient_scale)?;
            let moments = self.moments.get_mut(&parameter.name).ok_or_else(|| {
                TrainError::InvalidConfig(format!(
                    "the optimizer has no state for parameter {}",
                    parameter.name
                ))
            })?;
            moments.first = ((&moments.first * beta1)? + (&grad * (1.0 - beta1))?)?;
            moments.second = ((&moments.second * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;

            let denominator = ((&moments.second / correction2)?.sqrt()? + epsilon)?;
            let update = ((&moments.first / correction1)? / denominator)?;
            let value = parameter.var.as_tensor().detach();
            let decayed = if parameter.decay {
                (value * (1.0 - learning_rate * weight_decay))?
            } else {
                value
            };
            parameter.var.set(&(decayed - (update * learning_rate)?)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`adamw.m.NAME`, `adamw.v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::with_capacity(2 * self.moments.len());
        for (name, moments) in &self.moments {
            tensors.push((format!("adamw.m.{name}"), moments.first.clone()));
            tensors.push((format!("adamw.v.{name}"), moments.second.clone()));
        }
        tensors
    }

    /// Restores the step count and the moments saved by [`AdamW::state_tensors`],
    /// checking that every parameter has both moments with its own shape.
    pub fn load_state(&mut self, steps: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, moments) in &mut self.moments {
            for (key, slot) in [
                (format!("adamw.m.{name}"), &mut moments.first),
                (format!("adamw.v.{name}"), &mut moments.second),
            ] {
                let saved = tensors.get(&key).ok_or_else(|| {
                    TrainError::InvalidConfig(format!("optimizer state {key} is missing"))
                })?;
                if saved.dims() != slot.dims() {
                    return Err(TrainError::InvalidConfig(format!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        saved.dims(),
                        slot.dims()
                    )));
                }
                *slot = saved.to_device(slot.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Returns the global L2 norm of the gradients of `parameters` and the factor that
/// brings it down to `max_norm` (1 when it is already below, or when `max_norm` is
/// `None`).
pub fn clip_factor(
    parameters: &[Parameter],
    grads: &GradStore,
    max_norm: Option<f32>,
) -> Result<(f32, f64)> {
    let mut sum_of_squares = 0.0f64;
    for parameter in parameters {
        if let Some(grad) = grads.get(&parameter.var) {
            let square: f32 = grad.sqr()?.sum_all()?.to_scalar()?;
            sum_of_squares += f64::from(square);
        }
    }
    let norm = sum_of_squares.sqrt();
    let factor = match max_norm {
        Some(max) if norm > f64::from(max) => f64::from(max) / (norm + 1e-6),
        _ => 1.0,
    };
    Ok((norm as f32, factor))
}
