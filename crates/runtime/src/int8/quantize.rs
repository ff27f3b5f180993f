//! `QuantizeLinear` from f32 to u8 with one scale and zero point, rebuilt as
//! [`U8QuantizeLinear`].
//!
//! Any other `QuantizeLinear` (per-axis scales, an i8 output, scale or zero point
//! computed at run time) keeps tract's implementation. The reason is logged at debug
//! level.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::kernels::quantize_u8;
use tract_onnx::tract_core::dyn_clone::clone_box;

use super::{Lowered, Lowering, OpBuilder, constant, scalar_f32, scalar_u8, wrap_tract_expansion};

/// tract's own `QuantizeLinear` builder, for the nodes the kernel does not cover.
pub(super) static TRACT_QUANTIZE_LINEAR: OnceLock<OpBuilder> = OnceLock::new();

pub(super) fn quantize_linear(
    context: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let has_zero_point = node.input.get(2).is_some_and(|name| !name.is_empty());
    wrap_tract_expansion(&TRACT_QUANTIZE_LINEAR, context, node, |tract| {
        Some(expand(Lowered(QuantizeLinear {
            tract: clone_box(tract),
            has_zero_point,
        })))
    })
}

/// `QuantizeLinear` as tract parses it, lowered to [`U8QuantizeLinear`].
#[derive(Debug, Clone)]
struct QuantizeLinear {
    tract: Box<dyn Expansion>,
    has_zero_point: bool,
}

impl Lowering for QuantizeLinear {
    const NAME: &'static str = "QuantizeLinear";

    fn tract(&self) -> &dyn Expansion {
        self.tract.as_ref()
    }

    fn lower(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<Box<dyn TypedOp>, String> {
        Ok(Box::new(self.u8_quantize(model, inputs)?))
    }
}

impl QuantizeLinear {
    /// Builds the u8 operator, or returns which parameter rules it out.
    fn u8_quantize(
        &self,
        model: &TypedModel,
        inputs: &[OutletId],
    ) -> Result<U8QuantizeLinear, String> {
        let constant = |slot: usize, parameter: &str| constant(model, inputs[slot], parameter);
        let input = model.outlet_fact(inputs[0]).map_err(|e| format!("{e:#}"))?;
        if input.datum_type != DatumType::F32 {
            return Err(format!("the input is {:?}, not f32", input.datum_type));
        }
        let scale = scalar_f32(&*constant(1, "scale")?)?;
        let zero_point = if self.has_zero_point {
            scalar_u8(&*constant(2, "zero point")?)?
        } else {
            0
        };
        Ok(U8QuantizeLinear { scale, zero_point })
    }
}

/// f32 to u8 quantization with one scale and zero point, computed by this module's
/// kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct U8QuantizeLinear {
    scale: f32,
    zero_point: u8,
}

// Equality compares the parameters, which contain no NaN: the scale is checked finite
// and positive when the operator is built.
impl Eq for U8QuantizeLinear {}

impl Op for U8QuantizeLinear {
    fn name(&self) -> StaticName {
        "U8QuantizeLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "scale {}, zero point {}",
            self.scale, self.zero_point
        )])
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for U8QuantizeLinear {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _context: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = tract_onnx::tract_core::args_1!(inputs);
        let plain = input.try_as_plain_ram()?;
        let values = plain.as_slice::<f32>()?;
        let mut output = Tensor::zero::<u8>(input.shape())?;
        {
            let mut plain_output = output.try_as_plain_ram_mut()?;
            quantize_u8(
                values,
                self.scale,
                self.zero_point,
                plain_output.as_slice_mut::<u8>()?,
            );
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for U8QuantizeLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs[0];
        ensure!(
            input.datum_type == DatumType::F32,
            "U8QuantizeLinear reads f32"
        );
        Ok(tvec!(TypedFact::dt_shape(
            DatumType::U8,
            input.shape.clone()
        )))
    }

    tract_onnx::tract_core::as_op!();
}
