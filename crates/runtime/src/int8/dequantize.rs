//! `DequantizeLinear` from u8 or i8 to f32 with one scale and zero point, rebuilt as
//! [`ScalarDequantizeLinear`].
//!
//! The quantizer writes such nodes before every float residual addition. On
//! EfficientNet-Lite0 the 15 of them took 0.75 ms in tract's operator and take 0.29 ms
//! in this one, whose loop vectorises (`op_profile`, one thread, Intel Xeon). Any other
//! `DequantizeLinear` (per-axis or blocked scales, another input type, parameters
//! computed at run time) keeps tract's implementation. The reason is logged at debug
//! level.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::dyn_clone::clone_box;
use tract_onnx::tract_hir::internal::*;

use super::{
    Lowered, Lowering, OpBuilder, constant, dequantize_values, scalar_f32, values,
    wrap_tract_expansion, written_tensor,
};

/// tract's own `DequantizeLinear` builder, for the nodes the kernel does not cover.
pub(super) static TRACT_DEQUANTIZE_LINEAR: OnceLock<OpBuilder> = OnceLock::new();

pub(super) fn dequantize_linear(
    context: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let has_zero_point = node.input.get(2).is_some_and(|name| !name.is_empty());
    wrap_tract_expansion(&TRACT_DEQUANTIZE_LINEAR, context, node, |tract| {
        Some(expand(Lowered(DequantizeLinear {
            tract: clone_box(tract),
            has_zero_point,
        })))
    })
}

/// `DequantizeLinear` as tract parses it, lowered to [`ScalarDequantizeLinear`].
#[derive(Debug, Clone)]
struct DequantizeLinear {
    tract: Box<dyn Expansion>,
    has_zero_point: bool,
}

impl Lowering for DequantizeLinear {
    const NAME: &'static str = "DequantizeLinear";

    fn tract(&self) -> &dyn Expansion {
        self.tract.as_ref()
    }

    fn lower(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<Box<dyn TypedOp>, String> {
        let constant_at = |slot: usize, parameter: &str| constant(model, inputs[slot], parameter);
        let input = model
            .outlet_fact(inputs[0])
            .map_err(|e| format!("{e:#}"))?
            .datum_type;
        if !matches!(input, DatumType::U8 | DatumType::I8) {
            return Err(format!("the input is {input:?}, not u8 or i8"));
        }
        let scale = constant_at(1, "scale")?;
        if scale.len() != 1 {
            return Err(format!(
                "the scale has shape {:?}, not one value",
                scale.shape()
            ));
        }
        let scale = scalar_f32(&scale)?;
        let zero_point = if self.has_zero_point {
            let zero_point = constant_at(2, "zero point")?;
            if zero_point.len() != 1 || zero_point.datum_type() != input {
                return Err(format!(
                    "the zero point is {:?} of shape {:?}, not one {input:?} value",
                    zero_point.datum_type(),
                    zero_point.shape()
                ));
            }
            values::<i32>(&zero_point)?[0]
        } else {
            0
        };
        Ok(Box::new(ScalarDequantizeLinear {
            scale,
            zero_point,
            input,
        }))
    }
}

/// u8 or i8 to f32 with one scale and zero point: `(x - zero_point) * scale`, in that
/// order, as ONNX specifies and tract computes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarDequantizeLinear {
    scale: f32,
    zero_point: i32,
    /// `U8` or `I8`.
    input: DatumType,
}

// Equality compares the parameters, which contain no NaN: the scale is checked finite
// and positive when the operator is built.
impl Eq for ScalarDequantizeLinear {}

impl ScalarDequantizeLinear {
    fn dequantize<T: Datum + Copy + Into<i32>>(&self, input: &Tensor) -> TractResult<Tensor> {
        let plain = input.try_as_plain_ram()?;
        let values = plain.as_slice::<T>()?;
        let (scale, zero_point) = (self.scale, self.zero_point);
        written_tensor(input.shape(), |output: &mut [f32]| {
            dequantize_values(values, scale, zero_point, output);
        })
    }
}

impl Op for ScalarDequantizeLinear {
    fn name(&self) -> StaticName {
        "ScalarDequantizeLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "from {:?}, scale {}, zero point {}",
            self.input, self.scale, self.zero_point
        )])
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for ScalarDequantizeLinear {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _context: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = tract_onnx::tract_core::args_1!(inputs);
        let output = match self.input {
            DatumType::I8 => self.dequantize::<i8>(&input)?,
            _ => self.dequantize::<u8>(&input)?,
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for ScalarDequantizeLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs[0];
        ensure!(
            input.datum_type == self.input,
            "ScalarDequantizeLinear reads {:?}, got {:?}",
            self.input,
            input.datum_type
        );
        Ok(tvec!(f32::fact(input.shape.clone())))
    }

    tract_onnx::tract_core::as_op!();
}
