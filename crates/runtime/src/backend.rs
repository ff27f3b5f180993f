//! The trait every inference backend implements.

use crate::RuntimeError;

/// A dense float32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Creates a tensor, checking that `data` has as many elements as `shape` requires.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, RuntimeError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(RuntimeError::ShapeMismatch {
                expected: shape,
                found: vec![data.len()],
            });
        }
        Ok(Tensor { shape, data })
    }

    /// Checks that the tensor has exactly the shape `expected`, as a backend prepared
    /// for one input shape requires.
    pub fn check_shape(&self, expected: &[usize]) -> Result<(), RuntimeError> {
        if self.shape != expected {
            return Err(RuntimeError::ShapeMismatch {
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Returns row `index` of a tensor whose first dimension is the batch.
    pub fn row(&self, index: usize) -> &[f32] {
        let width: usize = self.shape[1..].iter().product();
        &self.data[index * width..(index + 1) * width]
    }
}

/// A loaded model that turns a batch of inputs into a batch of outputs.
///
/// A backend is built for one batch size; [`Backend::batch_size`] returns it, and callers
/// pad a partial last batch.
pub trait Backend: Send {
    /// Short name for logs and reports, such as `tract`.
    fn name(&self) -> &'static str;

    /// Shape of the input this backend was prepared for, batch dimension first.
    fn input_shape(&self) -> &[usize];

    /// Number of samples in one call of [`Backend::run`].
    fn batch_size(&self) -> usize {
        self.input_shape()[0]
    }

    /// Runs the model on one batch and returns its first output.
    fn run(&mut self, input: Tensor) -> Result<Tensor, RuntimeError>;
}
