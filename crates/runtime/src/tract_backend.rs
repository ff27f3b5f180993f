//! CPU inference with tract.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::{
    Framework, InferenceFact, InferenceModelExt, IntoRunnable, TValue, TypedFact, TypedOp,
    TypedSimplePlan, tvec,
};
use tract_onnx::tract_hir::internal::DatumType;

use crate::{Backend, RuntimeError, Tensor};

/// A model optimised by tract for one fixed input shape.
#[derive(Debug)]
pub struct TractBackend {
    state: tract_onnx::tract_core::plan::SimpleState<TypedFact, Box<dyn TypedOp>>,
    input_shape: Vec<usize>,
}

impl TractBackend {
    /// Loads an ONNX file, fixes its input to `input_shape` (batch first) and optimises it.
    ///
    /// Fixing every dimension lets tract plan memory and pick kernels once, which is
    /// several times faster than running with a symbolic batch dimension.
    pub fn load_onnx(path: &Path, input_shape: &[usize]) -> Result<TractBackend, RuntimeError> {
        let load_error = |error: tract_onnx::prelude::TractError| RuntimeError::Load {
            path: path.to_path_buf(),
            reason: format!("{error:#}"),
        };
        let mut model = crate::onnx().model_for_path(path).map_err(load_error)?;
        let fact = InferenceFact::dt_shape(DatumType::F32, input_shape.to_vec());
        model.set_input_fact(0, fact).map_err(load_error)?;
        let optimized = model.into_optimized().map_err(load_error)?;
        check_single_float_output(path, optimized.output_fact(0).map_err(load_error)?)?;
        let plan: Arc<TypedSimplePlan> = optimized.into_runnable().map_err(load_error)?;
        let state = plan.spawn().map_err(load_error)?;
        tracing::debug!(model = %path.display(), shape = ?input_shape, "tract model ready");
        Ok(TractBackend {
            state,
            input_shape: input_shape.to_vec(),
        })
    }
}

/// Checks that the first output is float32 with a shape known once the input is fixed.
/// `run` reads only that output, so any other model would fail on every request.
fn check_single_float_output(path: &Path, fact: &TypedFact) -> Result<(), RuntimeError> {
    if fact.datum_type != DatumType::F32 {
        return Err(RuntimeError::Unsupported(format!(
            "{}: the first output is {:?}; models must output float32",
            path.display(),
            fact.datum_type
        )));
    }
    let shape = &fact.shape;
    if shape.as_concrete().is_none() {
        return Err(RuntimeError::Unsupported(format!(
            "{}: output shape {shape:?} is not fully known after fixing the input shape",
            path.display()
        )));
    }
    Ok(())
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    fn run(&mut self, input: Tensor) -> Result<Tensor, RuntimeError> {
        input.check_shape(&self.input_shape)?;
        let inference_error = |error: tract_onnx::prelude::TractError| RuntimeError::Inference {
            backend: "tract",
            reason: format!("{error:#}"),
        };
        let tensor = tract_onnx::prelude::Tensor::from_shape(&input.shape, &input.data)
            .map_err(inference_error)?;
        let outputs = self
            .state
            .run(tvec![TValue::from(tensor)])
            .map_err(inference_error)?;
        let view = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(inference_error)?;
        Ok(Tensor {
            shape: view.shape().to_vec(),
            data: view.iter().copied().collect(),
        })
    }
}
