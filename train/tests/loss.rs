//! Loss values on inputs whose results are known in closed form.

use candle_core::{Device, Tensor};
use fleet_train::{LossConfig, distillation_kl, smoothed_cross_entropy, training_loss};

fn tensor(values: &[f32], rows: usize) -> Tensor {
    Tensor::from_slice(values, (rows, values.len() / rows), &Device::Cpu).unwrap()
}

fn labels(values: &[u32]) -> Tensor {
    Tensor::from_slice(values, values.len(), &Device::Cpu).unwrap()
}

fn scalar(t: Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

#[test]
fn kl_of_equal_logits_is_zero() {
    let logits = tensor(&[1.0, -2.0, 0.5, 3.0, 0.0, 0.0], 2);
    let kl = scalar(distillation_kl(&logits, &logits, 4.0).unwrap());
    assert!(kl.abs() < 1e-6, "{kl}");
}

#[test]
fn kl_matches_closed_form() {
    // Teacher probabilities at T = 1: softmax(ln 3, 0) = (0.75, 0.25).
    // Student: uniform (0.5, 0.5). KL = 0.75 ln 1.5 + 0.25 ln 0.5.
    let teacher = tensor(&[3f32.ln(), 0.0], 1);
    let student = tensor(&[0.0, 0.0], 1);
    let expected = 0.75 * 1.5f32.ln() + 0.25 * 0.5f32.ln();
    let kl = scalar(distillation_kl(&student, &teacher, 1.0).unwrap());
    assert!((kl - expected).abs() < 1e-6, "{kl} vs {expected}");

    // At T = 2 the logits halve and the result is multiplied by T^2 = 4: softmax of
    // (ln 3 / 2, 0) is (sqrt 3, 1) / (sqrt 3 + 1).
    let p = 3f32.sqrt() / (3f32.sqrt() + 1.0);
    let expected = 4.0 * (p * (2.0 * p).ln() + (1.0 - p) * (2.0 * (1.0 - p)).ln());
    let kl = scalar(distillation_kl(&student, &teacher, 2.0).unwrap());
    assert!((kl - expected).abs() < 1e-5, "{kl} vs {expected}");
}

#[test]
fn cross_entropy_of_zero_logits_is_log_classes() {
    let logits = tensor(&[0.0; 20], 2);
    for smoothing in [0.0, 0.1, 0.5] {
        let ce = scalar(smoothed_cross_entropy(&logits, &labels(&[3, 7]), smoothing).unwrap());
        assert!(
            (ce - 10f32.ln()).abs() < 1e-5,
            "smoothing {smoothing}: {ce}"
        );
    }
}

#[test]
fn label_smoothing_mixes_in_the_uniform_term() {
    // log softmax of (ln 3, 0) = (ln 0.75, ln 0.25); label 0.
    let logits = tensor(&[3f32.ln(), 0.0], 1);
    let nll = -(0.75f32.ln());
    let uniform = -(0.75f32.ln() + 0.25f32.ln()) / 2.0;
    let ce = scalar(smoothed_cross_entropy(&logits, &labels(&[0]), 0.2).unwrap());
    let expected = 0.8 * nll + 0.2 * uniform;
    assert!((ce - expected).abs() < 1e-6, "{ce} vs {expected}");
}

#[test]
fn training_loss_weights_both_terms() {
    let student = tensor(&[0.0, 0.0], 1);
    let teacher = tensor(&[3f32.ln(), 0.0], 1);
    let config = LossConfig {
        temperature: 1.0,
        distill_weight: 0.25,
        label_weight: 2.0,
        label_smoothing: 0.0,
    };
    let terms = training_loss(&config, &student, Some(&teacher), &labels(&[1])).unwrap();
    let kl = 0.75 * 1.5f32.ln() + 0.25 * 0.5f32.ln();
    assert!((terms.distill - kl).abs() < 1e-6);
    assert!((terms.label - 2f32.ln()).abs() < 1e-6);
    let total = scalar(terms.total);
    assert!(
        (total - (0.25 * kl + 2.0 * 2f32.ln())).abs() < 1e-6,
        "{total}"
    );

    let without_teacher = training_loss(&config, &student, None, &labels(&[1])).unwrap();
    assert_eq!(without_teacher.distill, 0.0);
    assert!((scalar(without_teacher.total) - 2.0 * 2f32.ln()).abs() < 1e-6);
}

#[test]
fn invalid_loss_settings_are_rejected() {
    let cases = [
        (
            LossConfig {
                temperature: 0.0,
                ..LossConfig::default()
            },
            "temperature",
        ),
        (
            LossConfig {
                distill_weight: 0.0,
                label_weight: 0.0,
                ..LossConfig::default()
            },
            "both 0",
        ),
        (
            LossConfig {
                label_smoothing: 1.0,
                ..LossConfig::default()
            },
            "label_smoothing",
        ),
    ];
    for (config, expected) in cases {
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(expected), "{error}");
    }
}
