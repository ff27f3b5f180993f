//! `QuantizeLinear` from f32 to u8 or i8 with one scale and zero point, rebuilt as
//! [`ScalarQuantizeLinear`].
//!
//! tract 0.23 ignores opset 21's `output_dtype` and writes u8 where it specifies i8, so
//! this operator reads it. Any other `QuantizeLinear` (per-axis scales, another output type,
//! scale or zero point computed at run time) keeps tract's implementation. The reason is logged at debug
//! level.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::tract_hir::internal::*;

use super::kernels::{Quantized, quantize_f32};
use tract_onnx::tract_core::dyn_clone::clone_box;

use super::{
    Lowered, Lowering, OpBuilder, constant, scalar_f32, values, wrap_tract_expansion,
    written_tensor,
};

/// tract's own `QuantizeLinear` builder, for the nodes the kernel does not cover.
pub(super) static TRACT_QUANTIZE_LINEAR: OnceLock<OpBuilder> = OnceLock::new();

pub(super) fn quantize_linear(
    context: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let has_zero_point = node.input.get(2).is_some_and(|name| !name.is_empty());
    let output_type = node
        .attribute
        .iter()
        .find(|attribute| attribute.name == "output_dtype")
        .map_or(0, |attribute| attribute.i);
    wrap_tract_expansion(&TRACT_QUANTIZE_LINEAR, context, node, |tract| {
        Some(expand(Lowered(QuantizeLinear {
            tract: clone_box(tract),
            has_zero_point,
            output_type,
        })))
    })
}

/// `QuantizeLinear` as tract parses it, lowered to [`ScalarQuantizeLinear`].
#[derive(Debug, Clone)]
struct QuantizeLinear {
    tract: Box<dyn Expansion>,
    has_zero_point: bool,
    /// The `output_dtype` attribute (an ONNX data type), 0 when absent.
    output_type: i64,
}

impl Lowering for QuantizeLinear {
    const NAME: &'static str = "QuantizeLinear";

    fn tract(&self) -> &dyn Expansion {
        self.tract.as_ref()
    }

    fn lower(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<Box<dyn TypedOp>, String> {
        Ok(Box::new(self.scalar_quantize(model, inputs)?))
    }

    /// Uses tract's rules, except that without a zero point the output type comes from
    /// `output_dtype`, which tract's rules leave at u8.
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        solver: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        if self.has_zero_point || self.output_type != DataType::Int8 as i64 {
            return self.tract.rules(solver, inputs, outputs);
        }
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        solver.equals(&inputs[1].datum_type, f32::datum_type())?;
        solver.equals(&outputs[0].datum_type, i8::datum_type())?;
        solver.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }
}

impl QuantizeLinear {
    /// Builds this module's operator, or returns which parameter rules it out.
    fn scalar_quantize(
        &self,
        model: &TypedModel,
        inputs: &[OutletId],
    ) -> Result<ScalarQuantizeLinear, String> {
        let constant_at = |slot: usize, parameter: &str| constant(model, inputs[slot], parameter);
        let input = model.outlet_fact(inputs[0]).map_err(|e| format!("{e:#}"))?;
        if input.datum_type != DatumType::F32 {
            return Err(format!("the input is {:?}, not f32", input.datum_type));
        }
        let scale = scalar_f32(&*constant_at(1, "scale")?)?;

        // The zero point's type is the output's; without one, opset 21's `output_dtype`
        // names it, and u8 is the default.
        let (output, zero_point) = if self.has_zero_point {
            let zero_point = constant_at(2, "zero point")?;
            if zero_point.len() != 1 {
                return Err(format!(
                    "the zero point has shape {:?}, not one value",
                    zero_point.shape()
                ));
            }
            let value = values::<i32>(&zero_point)?[0];
            (zero_point.datum_type(), value)
        } else {
            let output = match self.output_type {
                0 => DatumType::U8,
                t if t == DataType::Uint8 as i64 => DatumType::U8,
                t if t == DataType::Int8 as i64 => DatumType::I8,
                other => return Err(format!("the output type is ONNX data type {other}")),
            };
            (output, 0)
        };
        if !matches!(output, DatumType::U8 | DatumType::I8) {
            return Err(format!("the output is {output:?}, not u8 or i8"));
        }
        Ok(ScalarQuantizeLinear {
            scale,
            zero_point,
            output,
        })
    }
}

/// f32 to u8 or i8 quantization with one scale and zero point, computed by this
/// module's kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarQuantizeLinear {
    scale: f32,
    zero_point: i32,
    /// `U8` or `I8`.
    output: DatumType,
}

// Equality compares the parameters, which contain no NaN: the scale is checked finite
// and positive when the operator is built.
impl Eq for ScalarQuantizeLinear {}

impl Op for ScalarQuantizeLinear {
    fn name(&self) -> StaticName {
        "ScalarQuantizeLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "to {:?}, scale {}, zero point {}",
            self.output, self.scale, self.zero_point
        )])
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for ScalarQuantizeLinear {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _context: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = tract_onnx::tract_core::args_1!(inputs);
        let plain = input.try_as_plain_ram()?;
        let values = plain.as_slice::<f32>()?;
        let output = match self.output {
            DatumType::I8 => self.quantize::<i8>(values, input.shape())?,
            _ => self.quantize::<u8>(values, input.shape())?,
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl ScalarQuantizeLinear {
    fn quantize<T: Quantized + Datum>(
        &self,
        values: &[f32],
        shape: &[usize],
    ) -> TractResult<Tensor> {
        written_tensor(shape, |output: &mut [T]| {
            quantize_f32(values, self.scale, self.zero_point, output);
        })
    }
}

impl TypedOp for ScalarQuantizeLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs[0];
        ensure!(
            input.datum_type == DatumType::F32,
            "ScalarQuantizeLinear reads f32"
        );
        Ok(tvec!(TypedFact::dt_shape(self.output, input.shape.clone())))
    }

    tract_onnx::tract_core::as_op!();
}
