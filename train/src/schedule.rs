//! Learning-rate schedules over optimizer steps.

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// The learning-rate schedule of a run relative to the base rate, as written in a
/// recipe (`kind = "warmup-cosine"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// A linear rise from near 0 to the base rate over `warmup_epochs`, then a cosine
    /// decay to `min_lr_ratio * base` at the last step.
    WarmupCosine {
        #[serde(default = "default_warmup_epochs")]
        warmup_epochs: f32,
        #[serde(default = "default_min_lr_ratio")]
        min_lr_ratio: f32,
    },
    /// The base rate times `gamma` after every `step_epochs` epochs.
    Step { step_epochs: usize, gamma: f32 },
}

fn default_warmup_epochs() -> f32 {
    1.0
}

fn default_min_lr_ratio() -> f32 {
    0.01
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::WarmupCosine {
            warmup_epochs: default_warmup_epochs(),
            min_lr_ratio: default_min_lr_ratio(),
        }
    }
}

impl LrSchedule {
    /// Checks that every field is finite and in its range.
    pub fn validate(&self) -> Result<()> {
        match *self {
            LrSchedule::Constant => Ok(()),
            LrSchedule::WarmupCosine {
                warmup_epochs,
                min_lr_ratio,
            } => {
                if !(warmup_epochs.is_finite() && warmup_epochs >= 0.0) {
                    return Err(TrainError::InvalidConfig(format!(
                        "schedule.warmup_epochs is {warmup_epochs}, expected 0 or more"
                    )));
                }
                if !(0.0..=1.0).contains(&min_lr_ratio) {
                    return Err(TrainError::InvalidConfig(format!(
                        "schedule.min_lr_ratio is {min_lr_ratio}, expected 0 to 1"
                    )));
                }
                Ok(())
            }
            LrSchedule::Step { step_epochs, gamma } => {
                if step_epochs == 0 || !(gamma.is_finite() && gamma > 0.0) {
                    return Err(TrainError::InvalidConfig(format!(
                        "schedule step_epochs = {step_epochs} and gamma = {gamma}: \
                         expected at least 1 epoch and a positive gamma"
                    )));
                }
                Ok(())
            }
        }
    }

    /// Learning rate for optimizer step `step` (counted from 0) of a run with
    /// `total_steps` steps of which `steps_per_epoch` make one epoch.
    pub fn learning_rate(
        &self,
        base_lr: f64,
        step: u64,
        steps_per_epoch: u64,
        total_steps: u64,
    ) -> f64 {
        match *self {
            LrSchedule::Constant => base_lr,
            LrSchedule::WarmupCosine {
                warmup_epochs,
                min_lr_ratio,
            } => {
                let warmup = (f64::from(warmup_epochs) * steps_per_epoch as f64).round() as u64;
                if step < warmup {
                    return base_lr * (step + 1) as f64 / warmup as f64;
                }
                let decay_steps = total_steps.saturating_sub(warmup).max(1);
                let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
                let min_lr = base_lr * f64::from(min_lr_ratio);
                min_lr + (base_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            LrSchedule::Step { step_epochs, gamma } => {
                let epoch = step / steps_per_epoch.max(1);
                let drops = epoch / step_epochs.max(1) as u64;
                base_lr * f64::from(gamma).powi(drops as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_rises_then_decays() {
        let schedule = LrSchedule::WarmupCosine {
            warmup_epochs: 1.0,
            min_lr_ratio: 0.1,
        };
        let lr = |step| schedule.learning_rate(1.0, step, 10, 110);
        // The ratio 0.1 is an f32, so results match to about 1e-8.
        assert!((lr(0) - 0.1).abs() < 1e-6);
        assert!((lr(9) - 1.0).abs() < 1e-6);
        assert!((lr(10) - 1.0).abs() < 1e-6);
        assert!((lr(60) - 0.55).abs() < 1e-6);
        assert!((lr(110) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn step_schedule_drops_by_gamma() {
        let schedule = LrSchedule::Step {
            step_epochs: 2,
            gamma: 0.5,
        };
        assert_eq!(schedule.learning_rate(1.0, 19, 10, 100), 1.0);
        assert_eq!(schedule.learning_rate(1.0, 20, 10, 100), 0.5);
        assert_eq!(schedule.learning_rate(1.0, 45, 10, 100), 0.25);
    }
}
