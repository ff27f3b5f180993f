//! Bundle self-tests: reference inputs with the outputs the model gave for them when the
//! bundle was built, so a device can prove that the model it loaded computes what the
//! compressor measured before it trusts it.
//!
//! Both files hold raw little-endian `f32`: the inputs already preprocessed, one sample
//! after another, and each sample's first output row.

use std::path::Path;

use fleet_bundle::{Bundle, SelfTest};

use crate::{Backend, RuntimeError, Tensor, TractBackend};

/// Outcome of a passed self-test.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfTestReport {
    pub samples: usize,
    /// Largest difference found, relative as [`SelfTest::tolerance`] defines it.
    pub worst_difference: f32,
    pub tolerance: f32,
}

/// Why a self-test failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("the bundle carries no self-test")]
    Missing,
    #[error("invalid self-test data: {0}")]
    Invalid(String),
    #[error("self-test sample {sample} failed to run")]
    Run {
        sample: usize,
        #[source]
        source: RuntimeError,
    },
    #[error(
        "self-test sample {sample}: output {element} is {found}, expected {expected} \
         (difference {difference:.2e} over the tolerance {tolerance:.2e})"
    )]
    Mismatch {
        sample: usize,
        element: usize,
        found: f32,
        expected: f32,
        difference: f32,
        tolerance: f32,
    },
    #[error("self-test sample {sample}: top-1 class is {found}, expected {expected}")]
    ClassChanged {
        sample: usize,
        found: usize,
        expected: usize,
    },
    #[error(transparent)]
    Io(#[from] RuntimeError),
}

/// Runs the bundle's self-test with `run`, which takes one preprocessed sample and
/// returns the model's first output row.
pub fn check_self_test(
    bundle: &Bundle,
    mut run: impl FnMut(&[f32]) -> Result<Vec<f32>, RuntimeError>,
) -> Result<SelfTestReport, SelfTestError> {
    let test = bundle
        .manifest
        .self_test
        .as_ref()
        .ok_or(SelfTestError::Missing)?;
    let samples = test.samples as usize;
    if samples == 0 || !(test.tolerance.is_finite() && test.tolerance >= 0.0) {
        return Err(SelfTestError::Invalid(format!(
            "{samples} samples with tolerance {}",
            test.tolerance
        )));
    }
    let inputs = read_f32(&bundle.path_of(&test.inputs))?;
    let outputs = read_f32(&bundle.path_of(&test.outputs))?;
    if inputs.len() % samples != 0 || outputs.len() % samples != 0 {
        return Err(SelfTestError::Invalid(format!(
            "{} input and {} output values do not split into {samples} samples",
            inputs.len(),
            outputs.len()
        )));
    }
    let input_len = inputs.len() / samples;
    let output_len = outputs.len() / samples;
    let mut worst = 0.0f32;
    for sample in 0..samples {
        let input = &inputs[sample * input_len..(sample + 1) * input_len];
        let expected = &outputs[sample * output_len..(sample + 1) * output_len];
        let found = run(input).map_err(|source| SelfTestError::Run { sample, source })?;
        if found.len() != expected.len() {
            return Err(SelfTestError::Invalid(format!(
                "sample {sample} gave {} outputs, the bundle expects {}",
                found.len(),
                expected.len()
            )));
        }
        for (element, difference) in relative_differences(expected, &found).enumerate() {
            // A NaN output fails too.
            if difference.is_nan() || difference > test.tolerance {
                return Err(SelfTestError::Mismatch {
                    sample,
                    element,
                    found: found[element],
                    expected: expected[element],
                    difference,
                    tolerance: test.tolerance,
                });
            }
            worst = worst.max(difference);
        }
        let (found_class, expected_class) = (argmax(&found), argmax(expected));
        if found_class != expected_class {
            return Err(SelfTestError::ClassChanged {
                sample,
                found: found_class,
                expected: expected_class,
            });
        }
    }
    Ok(SelfTestReport {
        samples,
        worst_difference: worst,
        tolerance: test.tolerance,
    })
}

/// Returns each element's difference from `expected`, relative to the largest expected
/// magnitude (at least 1): the measure the self-test compares with its tolerance.
pub fn relative_differences<'a>(
    expected: &'a [f32],
    found: &'a [f32],
) -> impl Iterator<Item = f32> + 'a {
    let scale = expected
        .iter()
        .fold(1.0f32, |max, value| max.max(value.abs()));
    found
        .iter()
        .zip(expected)
        .map(move |(found, expected)| (found - expected).abs() / scale)
}

/// Loads the bundle's ONNX model with tract, one sample per run (padded to the model's
/// batch when its input declares a fixed one), and runs the bundle's self-test.
pub fn run_self_test(bundle: &Bundle) -> Result<SelfTestReport, SelfTestError> {
    run_self_test_with(bundle, |path, shape| {
        Ok(Box::new(TractBackend::load_onnx(path, shape)?))
    })
}

/// Runs the bundle's self-test as [`run_self_test`] does, on the backend `load` returns
/// for the model path and input shape (batch first).
pub fn run_self_test_with(
    bundle: &Bundle,
    load: impl FnOnce(&Path, &[usize]) -> Result<Box<dyn Backend>, RuntimeError>,
) -> Result<SelfTestReport, SelfTestError> {
    let manifest = &bundle.manifest;
    let (channels, height, width) = manifest.preprocessing.sample_shape();
    let batch = match manifest
        .inputs
        .first()
        .and_then(|input| input.shape.first())
    {
        Some(&fixed) if fixed > 0 => fixed as usize,
        _ => 1,
    };
    let shape = vec![batch, channels, height, width];
    let mut backend = load(&bundle.path_of(&manifest.model.path), &shape)?;
    check_self_test(bundle, |input| {
        let mut padded = input.to_vec();
        padded.resize(shape.iter().product(), 0.0);
        Ok(backend
            .run(Tensor::new(shape.clone(), padded)?)?
            .row(0)
            .to_vec())
    })
}

/// Writes `values` as raw little-endian `f32`, the layout of the self-test files.
pub fn write_f32(path: &Path, values: &[f32]) -> Result<(), RuntimeError> {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    std::fs::write(path, bytes).map_err(|source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_f32(path: &Path) -> Result<Vec<f32>, SelfTestError> {
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() % 4 != 0 {
        return Err(SelfTestError::Invalid(format!(
            "{} is {} bytes, not a whole number of f32 values",
            path.display(),
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect())
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (index, &value)| {
            if value > best.1 { (index, value) } else { best }
        })
        .0
}

/// Returns the manifest entry for a self-test of `samples` samples stored at the usual
/// paths inside a bundle.
pub fn self_test_entry(samples: usize, tolerance: f32) -> SelfTest {
    SelfTest {
        inputs: SELF_TEST_INPUTS.into(),
        outputs: SELF_TEST_OUTPUTS.into(),
        samples: samples as u32,
        tolerance,
    }
}

/// Bundle-relative paths the compressor writes the self-test to.
pub const SELF_TEST_INPUTS: &str = "self-test/inputs.f32";
pub const SELF_TEST_OUTPUTS: &str = "self-test/outputs.f32";
