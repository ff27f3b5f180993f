//! Loss functions: distillation (KL divergence at a temperature) and cross-entropy with
//! label smoothing, both averaged over the batch.

use candle_core::{D, DType, Tensor};
use candle_nn::ops::log_softmax;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// Weights of the distillation and label terms, with the temperature and the label
/// smoothing they use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Softmax temperature for the distillation term; higher spreads the teacher's
    /// probability over more classes.
    pub temperature: f32,
    /// Weight of `T^2 * KL(teacher || student)`.
    pub distill_weight: f32,
    /// Weight of the cross-entropy on the true labels.
    pub label_weight: f32,
    /// Probability mass moved from the true class to a uniform distribution, 0 to 1.
    pub label_smoothing: f32,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            temperature: 4.0,
            distill_weight: 0.7,
            label_weight: 0.3,
            label_smoothing: 0.0,
        }
    }
}

impl LossConfig {
    /// Checks that the temperature is positive, the weights are not negative and not
    /// both zero, and the smoothing is in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(TrainError::InvalidConfig(message));
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return invalid(format!(
                "loss.temperature is {}, expected a positive number",
                self.temperature
            ));
        }
        for (name, weight) in [
            ("distill_weight", self.distill_weight),
            ("label_weight", self.label_weight),
        ] {
            if !(weight.is_finite() && weight >= 0.0) {
                return invalid(format!("loss.{name} is {weight}, expected 0 or more"));
            }
        }
        if self.distill_weight == 0.0 && self.label_weight == 0.0 {
            return invalid("loss.distill_weight and loss.label_weight are both 0".into());
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return invalid(format!(
                "loss.label_smoothing is {}, expected at least 0 and below 1",
                self.label_smoothing
            ));
        }
        Ok(())
    }
}

/// The weighted total (a scalar tensor to differentiate) and its two terms.
#[derive(Debug, Clone)]
pub struct LossTerms {
    pub total: Tensor,
    /// Batch mean of `T^2 * KL(teacher || student)`, or 0 without teacher logits.
    pub distill: f32,
    /// Batch mean of the smoothed cross-entropy on the labels.
    pub label: f32,
}

/// Computes the training loss of a batch. `teacher_logits` may be absent, as in
/// fine-tuning, and then only the label term counts (with its weight).
pub fn training_loss(
    config: &LossConfig,
    student_logits: &Tensor,
    teacher_logits: Option<&Tensor>,
    labels: &Tensor,
) -> Result<LossTerms> {
    let student_logits = student_logits.to_dtype(DType::F32)?;
    let label = smoothed_cross_entropy(&student_logits, labels, config.label_smoothing)?;
    let label_value = label.to_scalar::<f32>()?;
    let mut total = (&label * f64::from(config.label_weight))?;
    let mut distill_value = 0.0;
    if let Some(teacher_logits) = teacher_logits {
        let distill = distillation_kl(&student_logits, teacher_logits, config.temperature)?;
        distill_value = distill.to_scalar::<f32>()?;
        total = (total + (distill * f64::from(config.distill_weight))?)?;
    }
    Ok(LossTerms {
        total,
        distill: distill_value,
        label: label_value,
    })
}

/// Returns `T^2 * mean_batch KL(softmax(teacher / T) || softmax(student / T))`.
///
/// Dividing the logits by `T` shrinks the gradient by about `T^2`, so the factor keeps
/// the term's gradient roughly independent of the temperature.
pub fn distillation_kl(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    temperature: f32,
) -> Result<Tensor> {
    let t = f64::from(temperature);
    let log_student = log_softmax(&(student_logits / t)?, D::Minus1)?;
    let log_teacher = log_softmax(&(teacher_logits.to_dtype(DType::F32)? / t)?, D::Minus1)?;
    let teacher = log_teacher.exp()?;
    let kl = (teacher * (log_teacher - log_student)?)?.sum(D::Minus1)?;
    Ok((kl.mean(0)? * (t * t))?)
}

/// Returns the batch mean of `-sum_c y_c log softmax(logits)_c`, where `y` puts
/// `1 - smoothing` on the label and spreads `smoothing` evenly over all classes.
/// `labels` is a u32 tensor of shape `[batch]`.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f32) -> Result<Tensor> {
    let log_probs = log_softmax(logits, D::Minus1)?;
    let label_indices = labels.to_dtype(DType::U32)?.unsqueeze(1)?;
    let nll = log_probs.gather(&label_indices, 1)?.squeeze(1)?.neg()?;
    if smoothing == 0.0 {
        return Ok(nll.mean(0)?);
    }
    let uniform = log_probs.mean(D::Minus1)?.neg()?;
    let mixed = ((nll * (1.0 - f64::from(smoothing)))? + (uniform * f64::from(smoothing))?)?;
    Ok(mixed.mean(0)?)
}

/// Counts the rows whose largest logit is at the label's position.
pub fn correct_predictions(logits: &Tensor, labels: &[u32]) -> Result<usize> {
    let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(predicted.iter().zip(labels).filter(|(p, l)| p == l).count())
}
