//! `MatMulInteger` with constant i8 weights, as the quantizer writes a `Gemm`, rebuilt
//! as [`IntegerMatMulOp`] with the weight sums taken when the model loads.
//!
//! Any other `MatMulInteger` (weights computed at run time, a weight zero point other
//! than 0, batched inputs of more than two axes, an input shape not fixed at load) keeps
//! tract's implementation. The reason is logged at debug level.

use std::sync::{Arc, OnceLock};

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::kernels::IntegerMatMul;
use tract_onnx::tract_core::dyn_clone::clone_box;

use super::{
    Lowered, Lowering, OpBuilder, constant, scalar_u8, u8_shape, values, wrap_tract_expansion,
    written_tensor,
};

/// tract's own `MatMulInteger` builder, for the nodes the kernel does not cover.
pub(super) static TRACT_MATMUL_INTEGER: OnceLock<OpBuilder> = OnceLock::new();

pub(super) fn matmul_integer(
    context: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    // Absent optional inputs take no slot, so the weight zero point moves up when the
    // input zero point is missing.
    let present = |index: usize| node.input.get(index).is_some_and(|name| !name.is_empty());
    let input_zero_point = present(2).then_some(2);
    let weight_zero_point = present(3).then_some(2 + usize::from(present(2)));
    wrap_tract_expansion(&TRACT_MATMUL_INTEGER, context, node, |tract| {
        Some(expand(Lowered(MatMulInteger {
            tract: clone_box(tract),
            input_zero_point,
            weight_zero_point,
        })))
    })
}

/// `MatMulInteger` as tract parses it, lowered to [`IntegerMatMulOp`].
#[derive(Debug, Clone)]
struct MatMulInteger {
    tract: Box<dyn Expansion>,
    /// Input slot of the input's zero point, if the node has one.
    input_zero_point: Option<usize>,
    /// Input slot of the weights' zero point, if the node has one.
    weight_zero_point: Option<usize>,
}

impl Lowering for MatMulInteger {
    const NAME: &'static str = "MatMulInteger";

    fn tract(&self) -> &dyn Expansion {
        self.tract.as_ref()
    }

    fn lower(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<Box<dyn TypedOp>, String> {
        Ok(Box::new(self.integer_matmul(model, inputs)?))
    }
}

impl MatMulInteger {
    /// Builds the integer operator, or returns which parameter rules it out.
    fn integer_matmul(
        &self,
        model: &TypedModel,
        inputs: &[OutletId],
    ) -> Result<IntegerMatMulOp, String> {
        let constant_at = |slot: usize, parameter: &str| constant(model, inputs[slot], parameter);
        let shape = u8_shape(model, inputs[0])?;
        let [_, depth] = shape[..] else {
            return Err(format!("the input has shape {shape:?}, not two axes"));
        };

        let weights = constant_at(1, "weight")?;
        if weights.datum_type() != DatumType::I8 {
            return Err(format!("the weight is {:?}, not i8", weights.datum_type()));
        }
        let [weight_depth, columns] = weights.shape()[..] else {
            return Err(format!(
                "the weight has shape {:?}, not two axes",
                weights.shape()
            ));
        };
        if weight_depth != depth {
            return Err(format!(
                "the weight has {weight_depth} rows for {depth} input columns"
            ));
        }

        if let Some(slot) = self.weight_zero_point
            && values::<i32>(&*constant_at(slot, "weight zero point")?)?
                .iter()
                .any(|&zero_point| zero_point != 0)
        {
            return Err("a weight zero point is not 0".into());
        }
        let input_zero_point = match self.input_zero_point {
            Some(slot) => scalar_u8(&*constant_at(slot, "input zero point")?)?,
            None => 0,
        };
        let kernel = IntegerMatMul::new(depth, columns, &values::<i8>(&weights)?, input_zero_point)
            .ok_or("the accumulator could overflow i32")?;
        Ok(IntegerMatMulOp {
            kernel: Arc::new(kernel),
        })
    }
}

/// A product of u8 rows by constant i8 weights with i32 results, computed by this
/// module's kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegerMatMulOp {
    kernel: Arc<IntegerMatMul>,
}

impl Op for IntegerMatMulOp {
    fn name(&self) -> StaticName {
        "IntegerMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "depth {}, {} columns",
            self.kernel.depth(),
            self.kernel.columns()
        )])
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for IntegerMatMulOp {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _context: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = tract_onnx::tract_core::args_1!(inputs);
        let rows = input.shape()[0];
        let plain = input.try_as_plain_ram()?;
        let data = plain.as_slice::<u8>()?;
        ensure!(
            data.len() == rows * self.kernel.depth(),
            "IntegerMatMul expects {} input values per row, got {} for {rows}",
            self.kernel.depth(),
            data.len()
        );
        let output = written_tensor(&[rows, self.kernel.columns()], |output: &mut [i32]| {
            self.kernel.run(data, output);
        })?;
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for IntegerMatMulOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs[0];
        ensure!(input.datum_type == DatumType::U8, "IntegerMatMul reads u8");
        ensure!(input.rank() == 2, "IntegerMatMul reads a matrix");
        let shape: TVec<TDim> = tvec![input.shape[0].clone(), self.kernel.columns().into()];
        Ok(tvec!(TypedFact::dt_shape(DatumType::I32, shape)))
    }

    tract_onnx::tract_core::as_op!();
}
