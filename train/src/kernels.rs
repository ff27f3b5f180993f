//! CPU kernels for the convolution blocks, as candle custom operations with their own
//! backward passes.
//!
//! On the CPU the model keeps activations channel-first, `[C, N, H, W]`, so that a 3x3
//! convolution becomes one large matrix product: `weight [Cout, C*9]` times the im2col
//! matrix `[C*9, N*H*W]`, whose result is already `[Cout, N, H, W]`. candle's own
//! `conv2d` computes its input gradient with a direct transposed convolution, which
//! made a training step about four times slower on two cores. candle 0.11's
//! `max_pool2d` backward also divides the gradient by the window area (4 for 2x2),
//! which the pool here does not. Only float32 is implemented here; other devices use
//! candle's operations (see `model.rs`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::{IndexedParallelIterator, ParallelIterator, ParallelSliceMut};

/// Returns the im2col matrix of a `[C, N, H, W]` float32 tensor for a 3x3 kernel with
/// padding 1 and stride 1: row `c*9 + dy*3 + dx`, column `(n*H + y)*W + x` contains
/// `input[c, n, y + dy - 1, x + dx - 1]`, or 0 outside the image.
pub fn im2col_3x3(input: &Tensor) -> candle_core::Result<Tensor> {
    input.contiguous()?.apply_op1(Im2Col3x3)
}

/// Applies a 2x2 max pool with stride 2 to the last two dimensions of a 4-D float32
/// tensor, dropping an odd last row or column. The gradient goes to the first maximum
/// of each window in row order.
pub fn max_pool_2x2(input: &Tensor) -> candle_core::Result<Tensor> {
    input.contiguous()?.apply_op1(MaxPool2x2)
}

fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op} is implemented for float32 only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    Ok(&values[start..end])
}

struct Im2Col3x3;

impl CustomOp1 for Im2Col3x3 {
    fn name(&self) -> &'static str {
        "im2col-3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (channels, batch, height, width) = layout.shape().dims4()?;
        let input = f32_slice(storage, layout, self.name())?;
        let plane = height * width;
        let row_len = batch * plane;
        let mut out = vec![0f32; channels * 9 * row_len];
        out.par_chunks_mut(row_len.max(1))
            .enumerate()
            .for_each(|(row, dst)| {
                let (channel, dy, dx) = (row / 9, (row % 9) / 3, row % 3);
                let src = &input[channel * row_len..(channel + 1) * row_len];
                // Output x takes input x + dx - 1, so the valid x range shrinks by one
                // on the side the kernel tap points to.
                let x_begin = usize::from(dx == 0);
                let x_end = if dx == 2 { width - 1 } else { width };
                for image in 0..batch {
                    for y in 0..height {
                        let Some(sy) = (y + dy).checked_sub(1).filter(|&sy| sy < height) else {
                            continue;
                        };
                        let dst_row = image * plane + y * width;
                        let src_row = image * plane + sy * width;
                        if x_begin < x_end {
                            dst[dst_row + x_begin..dst_row + x_end].copy_from_slice(
                                &src[src_row + x_begin + dx - 1..src_row + x_end + dx - 1],
                            );
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((channels * 9, row_len))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (channels, batch, height, width) = arg.dims4()?;
        let col2im = Col2Im3x3 {
            channels,
            batch,
            height,
            width,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&col2im)?))
    }
}

/// The adjoint of [`Im2Col3x3`]: sums each column entry back onto the input pixel it
/// was copied from.
struct Col2Im3x3 {
    channels: usize,
    batch: usize,
    height: usize,
    width: usize,
}

impl CustomOp1 for Col2Im3x3 {
    fn name(&self) -> &'static str {
        "col2im-3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let columns = f32_slice(storage, layout, self.name())?;
        let (height, width) = (self.height, self.width);
        let plane = height * width;
        let row_len = self.batch * plane;
        if columns.len() != self.channels * 9 * row_len {
            candle_core::bail!(
                "col2im-3x3 expected {} values, got {}",
                self.channels * 9 * row_len,
                columns.len()
            );
        }
        let mut out = vec![0f32; self.channels * row_len];
        out.par_chunks_mut(row_len.max(1))
            .enumerate()
            .for_each(|(channel, dst)| {
                for tap in 0..9 {
                    let (dy, dx) = (tap / 3, tap % 3);
                    let row = channel * 9 + tap;
                    let src = &columns[row * row_len..(row + 1) * row_len];
                    let x_begin = usize::from(dx == 0);
                    let x_end = if dx == 2 { width - 1 } else { width };
                    for image in 0..self.batch {
                        for y in 0..height {
                            let Some(sy) = (y + dy).checked_sub(1).filter(|&sy| sy < height) else {
                                continue;
                            };
                            let src_row = image * plane + y * width;
                            let dst_row = image * plane + sy * width;
                            for x in x_begin..x_end {
                                dst[dst_row + x + dx - 1] += src[src_row + x];
                            }
                        }
                    }
                }
            });
        let shape = Shape::from((self.channels, self.batch, height, width));
        Ok((CpuStorage::F32(out), shape))
    }
}

struct MaxPool2x2;

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b, height, width) = layout.shape().dims4()?;
        let input = f32_slice(storage, layout, self.name())?;
        let (out_height, out_width) = (height / 2, width / 2);
        let out_plane = out_height * out_width;
        let mut out = vec![0f32; a * b * out_plane];
        out.par_chunks_mut(out_plane.max(1))
            .enumerate()
            .for_each(|(plane, dst)| {
                let src = &input[plane * height * width..(plane + 1) * height * width];
                for y in 0..out_height {
                    for x in 0..out_width {
                        let top = 2 * y * width + 2 * x;
                        let bottom = top + width;
                        dst[y * out_width + x] = src[top]
                            .max(src[top + 1])
                            .max(src[bottom])
                            .max(src[bottom + 1]);
                    }
                }
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((a, b, out_height, out_width)),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = arg.apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool2x2Backward)?;
        Ok(Some(grad))
    }
}

/// Routes each window's gradient to the window's first maximum in the pooled input.
struct MaxPool2x2Backward;

impl CustomOp2 for MaxPool2x2Backward {
    fn name(&self) -> &'static str {
        "max-pool-2x2-backward"
    }

    fn cpu_fwd(
        &self,
        input_storage: &CpuStorage,
        input_layout: &Layout,
        grad_storage: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, _, height, width) = input_layout.shape().dims4()?;
        let input = f32_slice(input_storage, input_layout, self.name())?;
        let grad = f32_slice(grad_storage, grad_layout, self.name())?;
        let (out_height, out_width) = (height / 2, width / 2);
        let plane = height * width;
        let mut out = vec![0f32; input.len()];
        out.par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(index, dst)| {
                let src = &input[index * plane..(index + 1) * plane];
                let grad = &grad[index * out_height * out_width..];
                for y in 0..out_height {
                    for x in 0..out_width {
                        let top = 2 * y * width + 2 * x;
                        let window = [top, top + 1, top + width, top + width + 1];
                        let mut best = window[0];
                        for &position in &window[1..] {
                            if src[position] > src[best] {
                                best = position;
                            }
                        }
                        dst[best] = grad[y * out_width + x];
                    }
                }
            });
        Ok((CpuStorage::F32(out), input_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn im2col_convolution_matches_candle_conv2d() {
        let device = Device::Cpu;
        // Channel-first [C = 2, N = 3, H = 5, W = 4].
        let x = Var::randn(0f32, 1.0, (2, 3, 5, 4), &device).unwrap();
        let weight = Var::randn(0f32, 1.0, (6, 2, 3, 3), &device).unwrap();

        let ours = weight
            .reshape((6, 18))
            .unwrap()
            .matmul(&im2col_3x3(x.as_tensor()).unwrap())
            .unwrap()
            .reshape((6, 3, 5, 4))
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        let nchw = x.transpose(0, 1).unwrap();
        let candle = nchw.conv2d(&weight, 1, 1, 1, 1).unwrap();
        assert!(max_abs_diff(&ours, &candle) < 1e-4);

        let ours_grads = (ours.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let candle_grads = (candle.sqr().unwrap().sum_all().unwrap())
            .backward()
            .unwrap();
        for var in [&x, &weight] {
            let diff = max_abs_diff(ours_grads.get(var).unwrap(), candle_grads.get(var).unwrap());
            assert!(diff < 1e-3, "gradient differs by {diff}");
        }
    }

    #[test]
    fn max_pool_matches_reshape_and_max() {
        let device = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 2, 6, 4), &device).unwrap();
        let ours = max_pool_2x2(x.as_tensor()).unwrap();
        let reference = x
            .reshape((3, 2, 3, 2, 2, 2))
            .unwrap()
            .max(5)
            .unwrap()
            .max(3)
            .unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-6);
        assert!(max_abs_diff(&ours, &x.max_pool2d(2).unwrap()) < 1e-6);

        let weights = Tensor::randn(0f32, 1.0, (3, 2, 3, 2), &device).unwrap();
        let ours_grads = (ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let reference_grads = (reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let diff = max_abs_diff(
            ours_grads.get(&x).unwrap(),
            reference_grads.get(&x).unwrap(),
        );
        assert!(diff < 1e-6, "gradient differs by {diff}");
    }

    #[test]
    fn max_pool_gradient_goes_to_maximum() {
        let device = Device::Cpu;
        let values: Vec<f32> = vec![1.0, 5.0, 2.0, 0.0, 3.0, 9.0, 4.0, 8.0, 7.0];
        let x = Var::from_vec(values, (1, 1, 3, 3), &device).unwrap();
        let pooled = max_pool_2x2(x.as_tensor()).unwrap();
        assert_eq!(
            pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [5.0]
        );
        let grads = (pooled * 2.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads.get(&x).unwrap().flatten_all().unwrap();
        assert_eq!(
            grad.to_vec1::<f32>().unwrap(),
            [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
    }
}
