//! Integer kernels for quantized 2-D convolutions in NCHW layout: u8 activations with a
//! zero point, symmetric i8 weights per output channel, i32 bias, and the rescale to the
//! u8 output fused into the store.
//!
//! Two forms cover the convolutions of image classifiers:
//!
//! * [`GemmConv`] turns a convolution into a matrix product per group, with output
//!   channels as rows and output pixels as columns. The input is packed into panels of
//!   16 pixels times 4 reduction steps. That is the layout of the AVX-512 VNNI
//!   instruction `vpdpbusd`, which sums u8 x i8 products four at a time into i32 lanes:
//!   four times the multiply-adds of an f32 FMA per instruction. x86-64 CPUs without
//!   VNNI run the same layout through an AVX2 tile of exact 16-bit products. Other
//!   machines run a portable tile that the compiler vectorises.
//! * [`DepthwiseConv`] computes each channel directly. Its products are small enough to
//!   be exact in f32 (see [`DEPTHWISE_MAX_TAPS`]), so it runs in vectorised f32
//!   arithmetic and still returns the integer result. With AVX-512 it puts 16
//!   channels in the lanes of a register, and with AVX2 8. Elsewhere it runs over rows
//!   of output pixels one channel at a time.
//!
//! Rounding is to nearest, ties to even, before the output zero point is added, as
//! onnxruntime's `QLinearConv` does.

use std::cell::RefCell;

/// Pixels in one packed panel: one 512-bit register of i32 accumulators.
const PANEL_PIXELS: usize = 16;
/// Reduction steps `vpdpbusd` sums into each accumulator.
const STEP: usize = 4;
/// Output channels computed together by one tile.
const TILE_ROWS: usize = 4;
/// Panels computed together by one tile: 4 x 4 accumulator registers.
const TILE_PANELS: usize = 4;
/// Output pixels of one tile.
const TILE_PIXELS: usize = TILE_PANELS * PANEL_PIXELS;
/// i32 sums of one tile, by output channel and pixel.
type Tile = [[i32; TILE_PIXELS]; TILE_ROWS];
/// Reduction steps a tile covers before the next row tile reads the same panels. The
/// panels of one block then take `TILE_PANELS * BLOCK_STEPS * 64` = 24 KiB, which stays
/// in a 32 or 48 KiB L1 data cache while every row tile reads it again. Without the
/// blocks, the 1152-to-320 layer of EfficientNet-Lite0 (73 KiB of panels per tile) ran
/// at 180 GMAC/s against 300 for the 320-to-1280 layer (`int8_kernels`, Intel Xeon
/// with AVX-512 VNNI).
const BLOCK_STEPS: usize = 96;
/// Bytes of one panel for one group of [`STEP`] reduction steps.
const PANEL_STEP_BYTES: usize = PANEL_PIXELS * STEP;
/// Largest kernel area the f32 depthwise path accepts: every partial sum stays below
/// 2^24, where f32 represents integers exactly (255 x 128 = 32,640 per product).
pub const DEPTHWISE_MAX_TAPS: usize = (1 << 24) / MAX_PRODUCT as usize;
/// Largest magnitude of one u8 x i8 product after the input zero point is subtracted:
/// |x - zero point| up to 255 times |w| up to 128.
const MAX_PRODUCT: i64 = 255 * 128;

/// Shape of one 2-D convolution, batch excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub in_channels: usize,
    pub in_height: usize,
    pub in_width: usize,
    pub out_channels: usize,
    pub out_height: usize,
    pub out_width: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// Padding before the first row and the first column.
    pub pad_before: [usize; 2],
    pub group: usize,
}

impl Geometry {
    pub fn input_len(&self) -> usize {
        self.in_channels * self.in_height * self.in_width
    }

    pub fn output_len(&self) -> usize {
        self.out_channels * self.out_height * self.out_width
    }

    fn out_pixels(&self) -> usize {
        self.out_height * self.out_width
    }

    /// Input row and column read for output `(oy, ox)` at kernel tap `(ky, kx)`, before
    /// the padding is subtracted.
    #[cfg(test)]
    fn padded_source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> (usize, usize) {
        (
            oy * self.strides[0] + ky * self.dilations[0],
            ox * self.strides[1] + kx * self.dilations[1],
        )
    }
}

/// Rescale from the i32 accumulator of one output channel to the u8 output:
/// `round((acc + bias) * multiplier) + zero_point`, saturated to 0..=255.
#[derive(Debug, Clone, PartialEq)]
pub struct Requantize {
    /// Per output channel, in accumulator units.
    pub bias: Vec<i32>,
    /// Per output channel: input scale x weight scale / output scale.
    pub multiplier: Vec<f32>,
    pub output_zero_point: u8,
}

#[inline(always)]
pub(super) fn requantize(value: f32, multiplier: f32, zero_point: i32) -> u8 {
    // The zero point is added after rounding, in integers: added to the float first,
    // it can drop the low bits that decide a rounding (46.500008 + 104 is 150.5 in f32).
    let rounded = round_to_even((value * multiplier).clamp(-512.0, 512.0));
    (rounded + zero_point).clamp(0, 255) as u8
}

/// Rounds `value`, which must lie within -512 to 512, to the nearest integer, ties to
/// even.
///
/// Adding 1.5 x 2^23 leaves the rounded value in the low mantissa bits. Unlike
/// `f32::round_ties_even` followed by a saturating cast, every step has a SIMD
/// instruction, so the compiler vectorises the loops that call this.
#[inline(always)]
fn round_to_even(value: f32) -> i32 {
    const ROUNDING: f32 = 12_582_912.0;
    ((value + ROUNDING).to_bits() as i32).wrapping_sub(ROUNDING.to_bits() as i32)
}

/// A grouped convolution computed as one integer matrix product per group.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmConv {
    geometry: Geometry,
    /// Output channels per group.
    rows: usize,
    /// Reduction length per group: input channels per group x kernel area.
    depth: usize,
    /// `depth` rounded up to [`STEP`], divided by it.
    steps: usize,
    /// Weights per group, in tiles of [`TILE_ROWS`] rows: `[tile][step][row][STEP]`,
    /// zero beyond `rows` and `depth`.
    weights: Vec<i8>,
    requantize: Requantize,
    input_zero_point: u8,
}

impl GemmConv {
    /// Packs `weights` (OIHW, i8) for the product. `requantize.bias` is the layer's bias;
    /// the correction for the input zero point is folded into it here. Returns `None`
    /// when the lengths disagree with `geometry`, the reduction is empty, or the
    /// accumulator could overflow i32.
    pub fn new(
        geometry: Geometry,
        weights: &[i8],
        mut requantize: Requantize,
        input_zero_point: u8,
    ) -> Option<GemmConv> {
        let rows = geometry.out_channels / geometry.group;
        let depth = geometry.in_channels / geometry.group * geometry.kernel[0] * geometry.kernel[1];
        if depth == 0
            || weights.len() != geometry.out_channels * depth
            || requantize.bias.len() != geometry.out_channels
        {
            return None;
        }
        let steps = depth.div_ceil(STEP);
        let tiles = rows.div_ceil(TILE_ROWS);
        let group_len = tiles * steps * TILE_ROWS * STEP;
        let mut packed = vec![0i8; geometry.group * group_len];
        for channel in 0..geometry.out_channels {
            let (group, row) = (channel / rows, channel % rows);
            let source = &weights[channel * depth..(channel + 1) * depth];
            let tile_start = group * group_len + row / TILE_ROWS * steps * TILE_ROWS * STEP;
            for (k, &weight) in source.iter().enumerate() {
                let offset = (k / STEP * TILE_ROWS + row % TILE_ROWS) * STEP + k % STEP;
                packed[tile_start + offset] = weight;
            }
            // sum(w * (x - zp)) = sum(w * x) - zp * sum(w): the product runs on raw u8.
            let weight_sum: i64 = source.iter().map(|&w| i64::from(w)).sum();
            let bias =
                i64::from(requantize.bias[channel]) - i64::from(input_zero_point) * weight_sum;
            let max_sum = depth as i64 * MAX_PRODUCT;
            if bias.abs() + max_sum > i64::from(i32::MAX) {
                return None;
            }
            requantize.bias[channel] = bias as i32;
        }
        Some(GemmConv {
            geometry,
            rows,
            depth,
            steps,
            weights: packed,
            requantize,
            input_zero_point,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Computes one image: `input` is CHW u8, `output` receives CHW u8.
    pub fn run(&self, input: &[u8], output: &mut [u8]) {
        assert_eq!(input.len(), self.geometry.input_len(), "input length");
        assert_eq!(output.len(), self.geometry.output_len(), "output length");
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                // SAFETY: the CPU supports every feature the function enables.
                unsafe { self.run_vnni(input, output) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                unsafe { self.run_avx2(input, output) };
                return;
            }
        }
        self.run_with(
            input,
            output,
            |weights, panels, panel_len, steps, _, acc| {
                tile_portable(weights, panels, panel_len, steps, acc)
            },
        );
    }

    /// Computes one image with the AVX2 tile, whatever else the CPU supports, so that
    /// tests on CPUs with VNNI check it too. Returns `false`, writing nothing, where the
    /// CPU lacks AVX2.
    #[cfg(test)]
    pub(super) fn run_avx2_tile(&self, input: &[u8], output: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports the features the function enables.
            unsafe { self.run_avx2(input, output) };
            return true;
        }
        false
    }

    /// Computes one image with the portable tile only, whatever the CPU supports.
    pub fn run_portable(&self, input: &[u8], output: &mut [u8]) {
        assert_eq!(input.len(), self.geometry.input_len(), "input length");
        assert_eq!(output.len(), self.geometry.output_len(), "output length");
        self.run_with(
            input,
            output,
            |weights, panels, panel_len, steps, _, acc| {
                tile_portable(weights, panels, panel_len, steps, acc)
            },
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_vnni(&self, input: &[u8], output: &mut [u8]) {
        self.run_with(
            input,
            output,
            |weights, panels, panel_len, steps, _, acc| {
                // SAFETY: `run_vnni` is only called where the CPU has these features, and
                // `tile_vnni` checks the slice lengths.
                unsafe {
                    match panels.len() / panel_len {
                        4 => tile_vnni::<4>(weights, panels, panel_len, steps, acc),
                        3 => tile_vnni::<3>(weights, panels, panel_len, steps, acc),
                        2 => tile_vnni::<2>(weights, panels, panel_len, steps, acc),
                        _ => tile_vnni::<1>(weights, panels, panel_len, steps, acc),
                    }
                }
            },
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, input: &[u8], output: &mut [u8]) {
        self.run_with(
            input,
            output,
            |weights, panels, panel_len, steps, pixels, acc| {
                // SAFETY: `run_avx2` is only called where the CPU has AVX2, and `tile_avx2`
                // checks the slice lengths.
                unsafe { tile_avx2(weights, panels, panel_len, steps, pixels, acc) }
            },
        );
    }

    #[inline(always)]
    fn run_with(
        &self,
        input: &[u8],
        output: &mut [u8],
        tile: impl Fn(&[i8], &[u8], usize, StepRange, usize, &mut Tile),
    ) {
        let geometry = &self.geometry;
        let pixels = geometry.out_pixels();
        let pixel_tiles = pixels.div_ceil(TILE_PIXELS);
        // The last tile may contain fewer panels: a 14 x 14 plane is 13 panels, not 16.
        let panel_count = pixels.div_ceil(PANEL_PIXELS);
        let panel_len = self.steps * PANEL_STEP_BYTES;
        let group_input_len = geometry.input_len() / geometry.group;
        let row_tiles = self.rows.div_ceil(TILE_ROWS);
        let tile_len = self.steps * TILE_ROWS * STEP;

        // Taken out of the thread-local instead of borrowed in a closure: code inside a
        // closure passed to `LocalKey` is compiled without this function's target
        // features, which made the rescale run in scalar SSE2.
        let mut scratch = PACKED_INPUT.take();
        let blocks = self.steps.div_ceil(BLOCK_STEPS);
        // With one block, the sums of one tile at a time. With several, the sums of every
        // row tile, kept until the last block.
        let mut sums = std::mem::take(&mut scratch.sums);
        sums.resize(
            if blocks == 1 { 1 } else { row_tiles },
            [[0; TILE_PIXELS]; TILE_ROWS],
        );
        for group in 0..geometry.group {
            let group_input = &input[group * group_input_len..][..group_input_len];
            self.pack_input(group_input, panel_count, &mut scratch);
            let panels = &scratch.panels;
            let group_weights =
                &self.weights[group * row_tiles * tile_len..][..row_tiles * tile_len];

            for pixel_tile in 0..pixel_tiles {
                let first_panel = pixel_tile * TILE_PANELS;
                let tile_panels = &panels[first_panel * panel_len..]
                    [..(panel_count - first_panel).min(TILE_PANELS) * panel_len];
                let pixel_start = pixel_tile * TILE_PIXELS;
                let pixel_count = (pixels - pixel_start).min(TILE_PIXELS);
                let store = |row_tile: usize, acc: &Tile, output: &mut [u8]| {
                    let first_channel = group * self.rows + row_tile * TILE_ROWS;
                    let channels = (self.rows - row_tile * TILE_ROWS).min(TILE_ROWS);
                    self.store_tile(
                        acc,
                        first_channel,
                        channels,
                        pixel_start,
                        pixel_count,
                        output,
                    );
                };
                for block in 0..blocks {
                    let steps = StepRange {
                        first: block * BLOCK_STEPS,
                        count: (self.steps - block * BLOCK_STEPS).min(BLOCK_STEPS),
                        accumulate: block > 0,
                    };
                    for (row_tile, weights) in group_weights.chunks_exact(tile_len).enumerate() {
                        let weights = &weights[steps.first * TILE_ROWS * STEP..]
                            [..steps.count * TILE_ROWS * STEP];
                        let acc = &mut sums[if blocks == 1 { 0 } else { row_tile }];
                        tile(weights, tile_panels, panel_len, steps, pixel_count, acc);
                        if blocks == 1 {
                            store(row_tile, acc, output);
                        }
                    }
                }
                if blocks > 1 {
                    for (row_tile, acc) in sums.iter().enumerate() {
                        store(row_tile, acc, output);
                    }
                }
            }
        }
        scratch.sums = sums;
        PACKED_INPUT.set(scratch);
    }

    /// Rescales the first `channels` rows and `pixel_count` pixels of a tile to u8 and
    /// writes them to channels `first_channel..` and pixels `pixel_start..` of `output`.
    #[inline(always)]
    fn store_tile(
        &self,
        acc: &Tile,
        first_channel: usize,
        channels: usize,
        pixel_start: usize,
        pixel_count: usize,
        output: &mut [u8],
    ) {
        let pixels = self.geometry.out_pixels();
        let zero_point = i32::from(self.requantize.output_zero_point);
        for (channel, sums) in (first_channel..first_channel + channels).zip(acc) {
            let bias = self.requantize.bias[channel];
            let multiplier = self.requantize.multiplier[channel];
            let target = &mut output[channel * pixels + pixel_start..][..pixel_count];
            for (out, &sum) in target.iter_mut().zip(sums) {
                // Cannot overflow: `GemmConv::new` bounds bias plus products.
                *out = requantize(sum.wrapping_add(bias) as f32, multiplier, zero_point);
            }
        }
    }

    /// Writes `panel_count` panels of one group's input into `panels`: panel `p`,
    /// reduction step `s` holds, for each of its 16 pixels, the 4 input values of
    /// reduction indices `4s..4s+4`. Positions in the padding read the zero point;
    /// reduction indices past the end read 0, which the zero weights there cancel.
    /// Pixels past the end read whatever the scratch held: they only feed accumulators
    /// that are never stored.
    ///
    /// The input is first laid out as the im2col matrix (one row per reduction index,
    /// one column per output pixel), which a 1x1 convolution already is, and then
    /// interleaved four rows at a time. Other convolutions first copy the input into a
    /// padded buffer, so that each row of the matrix is a run of copies without bounds
    /// or padding checks. That cut the time of the int8 digit CNN's 3x3 layers by 26 to
    /// 33%, and of EfficientNet-Lite0's stride-2 stem by 12 to 35%. Copying the short
    /// runs of 7 and 14 bytes without `memcpy` then cut the digit CNN's 3x3 layers from
    /// 0.039-0.041 to 0.032-0.034 ms each (`op_profile`, AMD EPYC Zen 4).
    #[inline(always)]
    fn pack_input(&self, input: &[u8], panel_count: usize, scratch: &mut PackScratch) {
        let PackScratch {
            panels,
            columns,
            padded,
            ..
        } = scratch;
        let geometry = &self.geometry;
        let pixels = geometry.out_pixels();
        let row_len = panel_count * PANEL_PIXELS;
        let pointwise = geometry.kernel == [1, 1]
            && geometry.strides == [1, 1]
            && geometry.pad_before == [0, 0]
            && geometry.out_height == geometry.in_height
            && geometry.out_width == geometry.in_width;
        // Neither scratch buffer is cleared (see above): zeroing them took a memset of
        // the whole packed input per layer.
        let rows: &[u8] = if pointwise && pixels == row_len {
            input
        } else {
            let columns = grown(columns, self.depth * row_len);
            if pointwise {
                for (k, row) in columns.chunks_exact_mut(row_len).enumerate() {
                    row[..pixels].copy_from_slice(&input[k * pixels..(k + 1) * pixels]);
                }
            } else {
                self.pad_input(input, padded);
                for (k, row) in columns.chunks_exact_mut(row_len).enumerate() {
                    self.im2col_row(padded, k, &mut row[..pixels]);
                }
            }
            columns
        };
        let panels = grown(panels, panel_count * self.steps * PANEL_STEP_BYTES);
        let zeros = [0u8; PANEL_PIXELS];
        for (panel, target) in panels
            .chunks_exact_mut(self.steps * PANEL_STEP_BYTES)
            .enumerate()
        {
            for (step, block) in target.chunks_exact_mut(PANEL_STEP_BYTES).enumerate() {
                let source = |j: usize| -> &[u8; PANEL_PIXELS] {
                    let k = step * STEP + j;
                    if k < self.depth {
                        rows[k * row_len + panel * PANEL_PIXELS..][..PANEL_PIXELS]
                            .try_into()
                            .expect("16 bytes")
                    } else {
                        &zeros
                    }
                };
                let sources = [source(0), source(1), source(2), source(3)];
                interleave_rows(sources, block.try_into().expect("64 bytes"));
            }
        }
    }

    /// Returns the height and width of one channel of the padded input: the padding
    /// before, the input, and as much padding after as the last kernel window reaches.
    fn padded_size(&self) -> (usize, usize) {
        let geometry = &self.geometry;
        let span = |axis: usize, size: usize, out: usize| {
            (size + geometry.pad_before[axis]).max(
                (out - 1) * geometry.strides[axis]
                    + (geometry.kernel[axis] - 1) * geometry.dilations[axis]
                    + 1,
            )
        };
        (
            span(0, geometry.in_height, geometry.out_height),
            span(1, geometry.in_width, geometry.out_width),
        )
    }

    /// Writes one group's input into `padded`, each channel surrounded by the zero
    /// point, so that every kernel window lies inside its channel.
    fn pad_input(&self, input: &[u8], padded: &mut Vec<u8>) {
        let geometry = &self.geometry;
        let (height, width) = (geometry.in_height, geometry.in_width);
        let (padded_height, padded_width) = self.padded_size();
        let [pad_top, pad_left] = geometry.pad_before;
        let channels = geometry.in_channels / geometry.group;
        padded.clear();
        padded.resize(
            channels * padded_height * padded_width,
            self.input_zero_point,
        );
        for (channel, plane) in input.chunks_exact(height * width).enumerate() {
            for (y, source) in plane.chunks_exact(width).enumerate() {
                let start = (channel * padded_height + y + pad_top) * padded_width + pad_left;
                padded[start..start + width].copy_from_slice(source);
            }
        }
    }

    /// Writes row `k` of the im2col matrix from the output of [`GemmConv::pad_input`]:
    /// for every output pixel, the input value that reduction index `k` (input channel,
    /// kernel row, kernel column) multiplies. Each output row reads one run of a padded
    /// row, every `stride` bytes.
    #[inline(always)]
    fn im2col_row(&self, padded: &[u8], k: usize, row: &mut [u8]) {
        let geometry = &self.geometry;
        let [kernel_height, kernel_width] = geometry.kernel;
        let [stride_y, stride_x] = geometry.strides;
        let [dilation_y, dilation_x] = geometry.dilations;
        let (padded_height, padded_width) = self.padded_size();
        let channel = k / (kernel_height * kernel_width);
        let ky = k / kernel_width % kernel_height;
        let kx = k % kernel_width;
        let first = (channel * padded_height + ky * dilation_y) * padded_width + kx * dilation_x;

        for (oy, target) in row.chunks_exact_mut(geometry.out_width).enumerate() {
            let source = &padded[first + oy * stride_y * padded_width..];
            match stride_x {
                1 => copy_short(source, target),
                2 => take_every::<2>(source, target),
                _ => {
                    for (value, &x) in target.iter_mut().zip(source.iter().step_by(stride_x)) {
                        *value = x;
                    }
                }
            }
        }
    }
}

/// Copies `source[..target.len()]` to `target`. The rows of small planes are a few
/// bytes long (7 and 14 in the digit CNN), and a call to `memcpy` for each cost more
/// than the copy. Up to 16 bytes move as two overlapping words instead.
#[inline(always)]
fn copy_short(source: &[u8], target: &mut [u8]) {
    fn word<const N: usize>(bytes: &[u8]) -> [u8; N] {
        bytes[..N].try_into().expect("N bytes")
    }
    let len = target.len();
    let source = &source[..len];
    match len {
        0 => {}
        1 => target[0] = source[0],
        2..=3 => {
            let (head, tail) = (word::<2>(source), word::<2>(&source[len - 2..]));
            target[..2].copy_from_slice(&head);
            target[len - 2..].copy_from_slice(&tail);
        }
        4..=7 => {
            let (head, tail) = (word::<4>(source), word::<4>(&source[len - 4..]));
            target[..4].copy_from_slice(&head);
            target[len - 4..].copy_from_slice(&tail);
        }
        8..=16 => {
            let (head, tail) = (word::<8>(source), word::<8>(&source[len - 8..]));
            target[..8].copy_from_slice(&head);
            target[len - 8..].copy_from_slice(&tail);
        }
        _ => target.copy_from_slice(source),
    }
}

/// Writes every `STRIDE`-th byte of `source`, from the first, to `target`. With the
/// stride a constant, the compiler vectorises the loop: in the VNNI build, a stride of
/// 2 became byte truncations of 16-bit lanes.
#[inline(always)]
fn take_every<const STRIDE: usize>(source: &[u8], target: &mut [u8]) {
    let Some((last, init)) = target.split_last_mut() else {
        return;
    };
    // Whole chunks for all but the last value: the source may end right after it.
    for (value, chunk) in init.iter_mut().zip(source.chunks_exact(STRIDE)) {
        *value = chunk[0];
    }
    *last = source[init.len() * STRIDE];
}

/// Interleaves four rows of 16 bytes into one panel step: `block[4 * pixel + j]` is
/// `rows[j][pixel]`, a 4 x 16 byte transpose.
///
/// It uses the unpack instructions of SSE2 (part of every x86-64) or the interleaving
/// store of NEON (part of every aarch64). Copied byte by byte, the packing made
/// EfficientNet-Lite0's integer convolutions take 5.2 ms instead of 4.75 ms
/// (`op_profile`, one thread, AMD EPYC).
#[inline(always)]
pub(super) fn interleave_rows(
    rows: [&[u8; PANEL_PIXELS]; STEP],
    block: &mut [u8; PANEL_STEP_BYTES],
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_loadu_si128, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpackhi_epi16,
            _mm_unpacklo_epi8, _mm_unpacklo_epi16,
        };
        // SAFETY: SSE2 is part of x86-64; every load and store stays within the 16-byte
        // rows and the 64-byte block.
        unsafe {
            let [r0, r1, r2, r3] = rows.map(|row| _mm_loadu_si128(row.as_ptr().cast::<__m128i>()));
            // Pairs (r0, r1) and (r2, r3) per pixel, pixels 0..8 and 8..16.
            let (low01, high01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
            let (low23, high23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
            let quarters = [
                _mm_unpacklo_epi16(low01, low23),
                _mm_unpackhi_epi16(low01, low23),
                _mm_unpacklo_epi16(high01, high23),
                _mm_unpackhi_epi16(high01, high23),
            ];
            for (quarter, value) in quarters.into_iter().enumerate() {
                let address = block.as_mut_ptr().add(quarter * 16);
                _mm_storeu_si128(address.cast::<__m128i>(), value);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::aarch64::{uint8x16x4_t, vld1q_u8, vst4q_u8};
        // SAFETY: NEON is part of aarch64; the loads read 16-byte rows and the store
        // writes the 64-byte block.
        unsafe {
            let [r0, r1, r2, r3] = rows.map(|row| vld1q_u8(row.as_ptr()));
            vst4q_u8(block.as_mut_ptr(), uint8x16x4_t(r0, r1, r2, r3));
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    for pixel in 0..PANEL_PIXELS {
        for (j, row) in rows.iter().enumerate() {
            block[pixel * STEP + j] = row[pixel];
        }
    }
}

/// Returns the first `len` elements of `buffer`, lengthening it with zeros where it is
/// shorter. A scratch buffer is never shortened: layers of one model need different
/// lengths, and growing it back for every larger layer cleared the new part on every
/// run.
fn grown<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// Buffers [`GemmConv::pack_input`] fills for each group.
#[derive(Default)]
struct PackScratch {
    panels: Vec<u8>,
    columns: Vec<u8>,
    padded: Vec<u8>,
    /// Sums of the tiles [`GemmConv::run_with`] has not stored yet.
    sums: Vec<Tile>,
}

thread_local! {
    /// Scratch for packed input panels, the im2col matrix and the padded input, reused
    /// across layers and runs on one thread.
    static PACKED_INPUT: RefCell<PackScratch> = const {
        RefCell::new(PackScratch {
            panels: Vec::new(),
            columns: Vec::new(),
            padded: Vec::new(),
            sums: Vec::new(),
        })
    };
    /// Scratch for the depthwise kernel.
    static DEPTHWISE_SCRATCH: RefCell<DepthwiseScratch> = const {
        RefCell::new(DepthwiseScratch {
            phases: Vec::new(),
            sums: Vec::new(),
            plane: Vec::new(),
            levels: Vec::new(),
            blocks: Vec::new(),
        })
    };
}

/// The reduction steps one call of a tile function covers.
#[derive(Debug, Clone, Copy)]
struct StepRange {
    /// First step, an offset into each panel.
    first: usize,
    count: usize,
    /// Adds to the sums already in the tile instead of starting from zero.
    accumulate: bool,
}

/// Multiplies one tile of [`TILE_ROWS`] weight rows by the consecutive input panels of
/// `panel_len` bytes each in `panels` (at most [`TILE_PANELS`]) over the reduction
/// steps `steps`, writing `acc[row][pixel]` for their pixels. `weights` starts at the
/// first of those steps.
///
/// TODO: an aarch64 tile using `sdot`/`udot` (ARMv8.2 dot product, on Jetson Orin and
/// Raspberry Pi 5). This portable loop ran at 2 to 3 GMAC/s on x86-64 built for plain
/// SSE2, against 40 to 70 with VNNI, and has not been timed on ARM hardware.
#[inline(always)]
fn tile_portable(
    weights: &[i8],
    panels: &[u8],
    panel_len: usize,
    steps: StepRange,
    acc: &mut Tile,
) {
    if !steps.accumulate {
        *acc = [[0; TILE_PIXELS]; TILE_ROWS];
    }
    // The panel count is a constant in each loop: with a bound known only at run time,
    // the loop built for SSE2 ran 1.5 to 2.3 times slower on EfficientNet-Lite0's
    // pointwise layers (`int8_kernels` example, AMD EPYC).
    match panels.len() / panel_len {
        4.. => tile_portable_panels::<4>(weights, panels, panel_len, steps, acc),
        3 => tile_portable_panels::<3>(weights, panels, panel_len, steps, acc),
        2 => tile_portable_panels::<2>(weights, panels, panel_len, steps, acc),
        _ => tile_portable_panels::<1>(weights, panels, panel_len, steps, acc),
    }
}

/// [`tile_portable`] over `PANELS` panels.
#[inline(always)]
fn tile_portable_panels<const PANELS: usize>(
    weights: &[i8],
    panels: &[u8],
    panel_len: usize,
    steps: StepRange,
    acc: &mut Tile,
) {
    for step in 0..steps.count {
        let w = &weights[step * TILE_ROWS * STEP..][..TILE_ROWS * STEP];
        let offset = (steps.first + step) * PANEL_STEP_BYTES;
        for panel in 0..PANELS {
            let x = &panels[panel * panel_len + offset..][..PANEL_STEP_BYTES];
            for (row, sums) in acc.iter_mut().enumerate() {
                let w = &w[row * STEP..][..STEP];
                for pixel in 0..PANEL_PIXELS {
                    let x = &x[pixel * STEP..][..STEP];
                    // Wrapping arithmetic only so that debug builds vectorise this
                    // loop too: `GemmConv::new` bounds the sums far below i32::MAX.
                    let dot = (0..STEP).fold(0i32, |dot, j| {
                        dot.wrapping_add(i32::from(x[j]).wrapping_mul(i32::from(w[j])))
                    });
                    let sum = &mut sums[panel * PANEL_PIXELS + pixel];
                    *sum = sum.wrapping_add(dot);
                }
            }
        }
    }
}

/// [`tile_portable`] with `vpdpbusd` over `PANELS` panels: each instruction adds 16
/// four-term u8 x i8 dot products into 16 i32 accumulators, and the tile's
/// accumulators (up to 16) stay in registers.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const PANELS: usize>(
    weights: &[i8],
    panels: &[u8],
    panel_len: usize,
    steps: StepRange,
    acc: &mut Tile,
) {
    use std::arch::x86_64::{
        __m512i, _mm512_dpbusd_epi32, _mm512_loadu_si512, _mm512_set1_epi32, _mm512_setzero_si512,
        _mm512_storeu_si512,
    };
    assert!(weights.len() >= steps.count * TILE_ROWS * STEP);
    assert!((steps.first + steps.count) * PANEL_STEP_BYTES <= panel_len);
    assert!(PANELS <= TILE_PANELS);
    assert!(panels.len() >= PANELS * panel_len);
    let mut sums = [[_mm512_setzero_si512(); PANELS]; TILE_ROWS];
    if steps.accumulate {
        for (row_sums, source) in sums.iter_mut().zip(acc.iter()) {
            for (panel, sum) in row_sums.iter_mut().enumerate() {
                // SAFETY: each row of `acc` is TILE_PANELS x 16 i32, one 512-bit load each.
                *sum = unsafe {
                    _mm512_loadu_si512(source.as_ptr().add(panel * PANEL_PIXELS).cast::<__m512i>())
                };
            }
        }
    }
    let weights = weights.as_ptr().cast::<i32>();
    let panels = panels[steps.first * PANEL_STEP_BYTES..].as_ptr();
    for step in 0..steps.count {
        // SAFETY: the asserts above bound every offset read here.
        unsafe {
            let mut x = [_mm512_setzero_si512(); PANELS];
            for (panel, value) in x.iter_mut().enumerate() {
                let address = panels.add(panel * panel_len + step * PANEL_STEP_BYTES);
                *value = _mm512_loadu_si512(address.cast::<__m512i>());
            }
            let w = weights.add(step * TILE_ROWS);
            for (row, row_sums) in sums.iter_mut().enumerate() {
                let broadcast = _mm512_set1_epi32(w.add(row).read_unaligned());
                for (sum, &x) in row_sums.iter_mut().zip(&x) {
                    *sum = _mm512_dpbusd_epi32(*sum, x, broadcast);
                }
            }
        }
    }
    for (target, row_sums) in acc.iter_mut().zip(&sums) {
        for (panel, &sum) in row_sums.iter().enumerate() {
            // SAFETY: each row of `acc` is TILE_PANELS x 16 i32, one 512-bit store each.
            unsafe {
                let address = target.as_mut_ptr().add(panel * PANEL_PIXELS);
                _mm512_storeu_si512(address.cast::<__m512i>(), sum);
            }
        }
    }
}

/// Reduction steps whose weights [`tile_avx2`] widens to i16 at a time, on the stack.
#[cfg(target_arch = "x86_64")]
const AVX2_CHUNK_STEPS: usize = 64;

/// [`tile_portable`] with AVX2's `vpmaddwd`, for x86-64 CPUs without VNNI.
///
/// Inputs and weights are widened to i16 and multiplied in pairs into i32 lanes, so
/// every sum is exact. AVX2's u8 x i8 product `vpmaddubsw` would do twice the work per
/// instruction, but it saturates pairs of products at 16 bits (2 x 255 x 127 does not
/// fit), and its results would then differ from ONNX's. Each register contains 4
/// pixels with two partial sums each, for reduction indices 0-1 and 2-3 of a step.
/// The two are added when the tile is stored. A pass covers 4 rows and 8 pixels: 8
/// accumulators, 2 input registers and one broadcast weight. Passes that would contain
/// none of the tile's first `pixels` pixels are skipped: a 7 x 7 plane's last panel has
/// one pixel.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(
    weights: &[i8],
    panels: &[u8],
    panel_len: usize,
    steps: StepRange,
    pixels: usize,
    acc: &mut Tile,
) {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm_loadu_si128, _mm256_add_epi32, _mm256_cvtepi8_epi16,
        _mm256_cvtepu8_epi16, _mm256_hadd_epi32, _mm256_loadu_si256, _mm256_madd_epi16,
        _mm256_permute4x64_epi64, _mm256_set1_epi64x, _mm256_setzero_si256, _mm256_storeu_si256,
    };
    /// Pixels whose partial sums one register contains.
    const QUARTER: usize = 4;
    const QUARTERS: usize = PANEL_PIXELS / QUARTER;
    assert!(weights.len() >= steps.count * TILE_ROWS * STEP);
    assert!((steps.first + steps.count) * PANEL_STEP_BYTES <= panel_len);
    let panel_count = (panels.len() / panel_len).min(TILE_PANELS);
    let first_offset = steps.first * PANEL_STEP_BYTES;
    let accumulate = steps.accumulate;
    let steps = steps.count;

    // Passes of 8 pixels per panel that contain some of the first `pixels` pixels.
    let halves = |panel: usize| {
        pixels
            .saturating_sub(panel * PANEL_PIXELS)
            .min(PANEL_PIXELS)
            .div_ceil(2 * QUARTER)
    };
    // `[panel quarter][row]`: pixels 4q..4q+4 of the tile, two partial sums each.
    let mut partials = [[_mm256_setzero_si256(); TILE_ROWS]; TILE_PANELS * QUARTERS];
    // One step's weights as i16, `[row][STEP]`, fit one i64 per row.
    let mut wide = [0i64; AVX2_CHUNK_STEPS * TILE_ROWS];
    for chunk_start in (0..steps).step_by(AVX2_CHUNK_STEPS) {
        let chunk = (steps - chunk_start).min(AVX2_CHUNK_STEPS);
        // SAFETY: the asserts above bound every offset read here, and `wide` has room
        // for `AVX2_CHUNK_STEPS` steps of 4 rows.
        unsafe {
            for step in 0..chunk {
                let source = weights
                    .as_ptr()
                    .add((chunk_start + step) * TILE_ROWS * STEP);
                let widened = _mm256_cvtepi8_epi16(_mm_loadu_si128(source.cast::<__m128i>()));
                _mm256_storeu_si256(
                    wide.as_mut_ptr().add(step * TILE_ROWS).cast::<__m256i>(),
                    widened,
                );
            }
            for panel in 0..panel_count {
                for half in 0..halves(panel) {
                    let quarter = panel * QUARTERS + half * 2;
                    let mut sums = [partials[quarter], partials[quarter + 1]];
                    let base = panels.as_ptr().add(
                        panel * panel_len
                            + first_offset
                            + chunk_start * PANEL_STEP_BYTES
                            + half * 2 * QUARTER * STEP,
                    );
                    for step in 0..chunk {
                        let mut x = [_mm256_setzero_si256(); 2];
                        for (j, x) in x.iter_mut().enumerate() {
                            let address = base.add(step * PANEL_STEP_BYTES + j * QUARTER * STEP);
                            *x = _mm256_cvtepu8_epi16(_mm_loadu_si128(address.cast::<__m128i>()));
                        }
                        for row in 0..TILE_ROWS {
                            let w = _mm256_set1_epi64x(*wide.as_ptr().add(step * TILE_ROWS + row));
                            for (sums, &x) in sums.iter_mut().zip(&x) {
                                sums[row] = _mm256_add_epi32(sums[row], _mm256_madd_epi16(x, w));
                            }
                        }
                    }
                    [partials[quarter], partials[quarter + 1]] = sums;
                }
            }
        }
    }
    for panel in 0..panel_count {
        for (row, target) in acc.iter_mut().enumerate() {
            for pair in 0..halves(panel) {
                let quarter = panel * QUARTERS + pair * 2;
                // Pixels [0 1 4 5 | 2 3 6 7] of the two quarters, put in order.
                let added = _mm256_hadd_epi32(partials[quarter][row], partials[quarter + 1][row]);
                let mut ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(added);
                let start = panel * PANEL_PIXELS + pair * 2 * QUARTER;
                let target = target[start..start + 2 * QUARTER]
                    .as_mut_ptr()
                    .cast::<__m256i>();
                // SAFETY: 8 i32 from `start`, inside the row of TILE_PIXELS.
                unsafe {
                    if accumulate {
                        ordered = _mm256_add_epi32(ordered, _mm256_loadu_si256(target));
                    }
                    _mm256_storeu_si256(target, ordered);
                }
            }
        }
    }
}

/// A matrix product of u8 rows by constant i8 weights with i32 results: ONNX
/// `MatMulInteger` whose right-hand side is a constant with zero point 0.
///
/// tract's own `MatMulInteger` sums the weight columns on every run, because its
/// zero-point correction reads them. On EfficientNet-Lite0's 1280 x 1000 classifier
/// that sum alone took 0.7 ms. Here the sums are taken once, when the operator is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegerMatMul {
    /// Reduction length: columns of the input, rows of the weights.
    depth: usize,
    /// Output columns.
    columns: usize,
    /// Weights by output column, `[column][depth]`.
    weights: Vec<i8>,
    /// Per column, the input zero point times the column's weight sum.
    offsets: Vec<i32>,
}

impl IntegerMatMul {
    /// Takes `weights` as ONNX stores them, `[depth][columns]`. Returns `None` when the
    /// lengths disagree or the accumulator could overflow i32.
    pub fn new(
        depth: usize,
        columns: usize,
        weights: &[i8],
        input_zero_point: u8,
    ) -> Option<IntegerMatMul> {
        if weights.len() != depth * columns || depth == 0 || columns == 0 {
            return None;
        }
        let max_sum = depth as i64 * MAX_PRODUCT;
        if max_sum * 2 > i64::from(i32::MAX) {
            return None;
        }
        let mut by_column = vec![0i8; weights.len()];
        let mut offsets = Vec::with_capacity(columns);
        for column in 0..columns {
            let target = &mut by_column[column * depth..][..depth];
            for (k, value) in target.iter_mut().enumerate() {
                *value = weights[k * columns + column];
            }
            let sum: i64 = target.iter().map(|&w| i64::from(w)).sum();
            offsets.push((i64::from(input_zero_point) * sum) as i32);
        }
        Some(IntegerMatMul {
            depth,
            columns,
            weights: by_column,
            offsets,
        })
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Multiplies the rows of `input` (`[rows][depth]`) into `output` (`[rows][columns]`).
    pub fn run(&self, input: &[u8], output: &mut [i32]) {
        assert_eq!(input.len() % self.depth, 0, "input length");
        assert_eq!(
            output.len(),
            input.len() / self.depth * self.columns,
            "output length"
        );
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                // SAFETY: the CPU supports every feature the function enables.
                unsafe { self.run_vnni(input, output) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: as above.
                unsafe { self.run_avx512(input, output) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                unsafe { self.run_avx2(input, output) };
                return;
            }
        }
        self.run_generic(input, output);
    }

    /// Computes the product of [`IntegerMatMul::run_generic`] with `vpdpbusd`, 64
    /// products of a column per instruction. The plain loop widens every byte to i32 first: on the int8 digit
    /// CNN's 1152-to-256 layer it took 0.013 ms against onnxruntime's 0.005.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_vnni(&self, input: &[u8], output: &mut [i32]) {
        use std::arch::x86_64::{
            _mm512_dpbusd_epi32, _mm512_maskz_loadu_epi8, _mm512_reduce_add_epi32,
            _mm512_setzero_si512,
        };
        const CHUNK: usize = 64;
        for (row, out) in input
            .chunks_exact(self.depth)
            .zip(output.chunks_exact_mut(self.columns))
        {
            for ((value, weights), offset) in out
                .iter_mut()
                .zip(self.weights.chunks_exact(self.depth))
                .zip(&self.offsets)
            {
                let mut sum = _mm512_setzero_si512();
                for start in (0..self.depth).step_by(CHUNK) {
                    let len = (self.depth - start).min(CHUNK);
                    let mask = u64::MAX >> (CHUNK - len);
                    // SAFETY: `start` lies inside both slices, and the mask covers only
                    // their `len` bytes from it; masked-out bytes are never read.
                    let (x, w) = unsafe {
                        (
                            _mm512_maskz_loadu_epi8(mask, row.as_ptr().add(start).cast()),
                            _mm512_maskz_loadu_epi8(mask, weights.as_ptr().add(start)),
                        )
                    };
                    sum = _mm512_dpbusd_epi32(sum, x, w);
                }
                // Cannot overflow: `new` bounds the sum.
                *value = _mm512_reduce_add_epi32(sum).wrapping_sub(*offset);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn run_avx512(&self, input: &[u8], output: &mut [i32]) {
        self.run_generic(input, output);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, input: &[u8], output: &mut [i32]) {
        self.run_generic(input, output);
    }

    /// Computes the product in plain loops, which the compiler vectorises for the
    /// enclosing function's target features.
    #[inline(always)]
    fn run_generic(&self, input: &[u8], output: &mut [i32]) {
        for (row, out) in input
            .chunks_exact(self.depth)
            .zip(output.chunks_exact_mut(self.columns))
        {
            for ((value, weights), offset) in out
                .iter_mut()
                .zip(self.weights.chunks_exact(self.depth))
                .zip(&self.offsets)
            {
                // Wrapping only so that debug builds vectorise too: `new` bounds the sum.
                let dot = row.iter().zip(weights).fold(0i32, |dot, (&x, &w)| {
                    dot.wrapping_add(i32::from(x) * i32::from(w))
                });
                *value = dot.wrapping_sub(*offset);
            }
        }
    }
}

/// An 8-bit type `QuantizeLinear` writes.
pub trait Quantized: Copy {
    const MIN: i32;
    const MAX: i32;
    /// Converts a value already within `MIN..=MAX`.
    fn from_i32(value: i32) -> Self;
}

impl Quantized for u8 {
    const MIN: i32 = 0;
    const MAX: i32 = 255;
    fn from_i32(value: i32) -> u8 {
        value as u8
    }
}

impl Quantized for i8 {
    const MIN: i32 = -128;
    const MAX: i32 = 127;
    fn from_i32(value: i32) -> i8 {
        value as i8
    }
}

/// Quantizes `input` as ONNX `QuantizeLinear` with one scale and zero point:
/// `saturate(round_ties_even(x / scale) + zero_point)`. NaN becomes the type's minimum,
/// as in onnxruntime.
///
/// tract multiplies by the reciprocal of the scale instead of dividing, which puts
/// some values on the neighbouring level (2 of 200,000 random values at scale 0.05).
/// Its loop also took 3 ns a value on the 150,528 inputs of EfficientNet-Lite0. With
/// this one, all 11 quantize nodes of that model take 0.025 ms together (`op_profile`,
/// AMD EPYC).
pub fn quantize_f32<T: Quantized>(input: &[f32], scale: f32, zero_point: i32, output: &mut [T]) {
    assert_eq!(input.len(), output.len(), "output length");
    run_widest(|| quantize_linear_generic(input, scale, zero_point, output));
}

/// Dequantizes `input` as ONNX `DequantizeLinear` with one scale and zero point:
/// `(x - zero_point) * scale`, in that order, as ONNX specifies and tract computes it.
pub fn dequantize_values<T: Copy + Into<i32>>(
    input: &[T],
    scale: f32,
    zero_point: i32,
    output: &mut [f32],
) {
    assert_eq!(input.len(), output.len(), "output length");
    run_widest(|| dequantize_generic(input, scale, zero_point, output));
}

/// Runs `body`, a loop the compiler vectorises, built for the widest vectors the CPU
/// has. This crate is compiled for the x86-64 baseline, so a plain loop would use SSE2
/// only. `body` must be an `#[inline(always)]` call: each `unsafe` wrapper below then
/// compiles its own copy of the loop with the wrapper's target features.
#[inline(always)]
fn run_widest(body: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports every feature the function enables.
            unsafe { run_avx512(body) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            unsafe { run_avx2(body) };
            return;
        }
    }
    body();
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512(body: impl FnOnce()) {
    body();
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2(body: impl FnOnce()) {
    body();
}

#[inline(always)]
fn dequantize_generic<T: Copy + Into<i32>>(
    input: &[T],
    scale: f32,
    zero_point: i32,
    output: &mut [f32],
) {
    for (out, &value) in output.iter_mut().zip(input) {
        *out = (value.into() - zero_point) as f32 * scale;
    }
}

#[inline(always)]
fn quantize_linear_generic<T: Quantized>(
    input: &[f32],
    scale: f32,
    zero_point: i32,
    output: &mut [T],
) {
    for (out, &value) in output.iter_mut().zip(input) {
        // `max` returns -512 for NaN, where `clamp` would keep the NaN; any value
        // beyond 512 saturates either way.
        #[allow(clippy::manual_clamp)]
        let level = round_to_even((value / scale).max(-512.0).min(512.0));
        *out = T::from_i32((level + zero_point).clamp(T::MIN, T::MAX));
    }
}

/// Buffers the depthwise kernel reuses across channels, layers and runs on one thread.
#[derive(Default)]
struct DepthwiseScratch {
    /// The padded phase planes of one channel, zero point subtracted.
    phases: Vec<f32>,
    /// One channel's sums, with the phase planes' row length.
    sums: Vec<f32>,
    /// One channel's input as f32, zero point subtracted.
    plane: Vec<f32>,
    /// `sums` rescaled to u8.
    levels: Vec<u8>,
    /// One block of channels in the blocked form: `[padded row][padded column][lane]`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    blocks: Vec<f32>,
}

/// A depthwise convolution (one input channel per group, one output channel per input
/// channel) computed directly, without a matrix product.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthwiseConv {
    geometry: Geometry,
    /// `[channel][ky][kx]`, as f32.
    weights: Vec<f32>,
    /// Added in i32 after the products: a bias can be far beyond f32's exact integers.
    bias: Vec<i32>,
    multiplier: Vec<f32>,
    output_zero_point: u8,
    input_zero_point: u8,
    /// Built only where the CPU runs the blocked form.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    blocked: Option<BlockedForm>,
}

/// Tables and lane-ordered parameters of the blocked depthwise form, laid out once when
/// the model loads. Channels are taken `lanes` at a time, one register of f32. The last
/// block is padded with channels whose weights and bias are zero and whose output is
/// dropped.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct BlockedForm {
    /// Channels per block: 16 for AVX-512, 8 for AVX2.
    lanes: usize,
    /// `[block][tap][lane]`.
    weights: Vec<f32>,
    /// `[block][lane]`.
    bias: Vec<i32>,
    /// `[block][lane]`.
    multiplier: Vec<f32>,
    /// Floats in one block's padded input, `[padded row][padded column][lane]`.
    padded_len: usize,
    /// The padding of the padded block as `(start, length)` runs of floats.
    padding: Vec<(usize, usize)>,
    /// Per input pixel (row-major), where its lanes go in the padded block.
    input_offsets: Vec<u32>,
    /// Per output pixel (row-major), where its kernel window starts in the padded block.
    window_offsets: Vec<u32>,
    /// Per kernel tap, its distance from the start of the window.
    tap_offsets: Vec<usize>,
}

impl BlockedForm {
    fn new(
        geometry: &Geometry,
        weights: &[f32],
        bias: &[i32],
        multiplier: &[f32],
        lanes: usize,
    ) -> Self {
        let [kernel_height, kernel_width] = geometry.kernel;
        let [stride_y, stride_x] = geometry.strides;
        let [dilation_y, dilation_x] = geometry.dilations;
        let [pad_top, pad_left] = geometry.pad_before;
        let (width, out_width) = (geometry.in_width, geometry.out_width);
        let padded_height = (geometry.in_height + pad_top)
            .max((geometry.out_height - 1) * stride_y + (kernel_height - 1) * dilation_y + 1);
        let padded_width = (width + pad_left)
            .max((out_width - 1) * stride_x + (kernel_width - 1) * dilation_x + 1);
        let taps = kernel_height * kernel_width;

        let blocks = geometry.in_channels.div_ceil(lanes);
        let mut lane_weights = vec![0.0; blocks * taps * lanes];
        let mut lane_bias = vec![0; blocks * lanes];
        let mut lane_multiplier = vec![0.0; blocks * lanes];
        for channel in 0..geometry.in_channels {
            let (block, lane) = (channel / lanes, channel % lanes);
            for tap in 0..taps {
                lane_weights[(block * taps + tap) * lanes + lane] = weights[channel * taps + tap];
            }
            lane_bias[channel] = bias[channel];
            lane_multiplier[channel] = multiplier[channel];
        }

        let padded_pixel = |y: usize, x: usize| (y * padded_width + x) * lanes;
        // Offsets are stored as u32 to halve the tables of wide planes.
        // `DepthwiseConv::run_blocked` returns `false` where they do not fit.
        let narrow = |offset: usize| u32::try_from(offset).unwrap_or(u32::MAX);
        let interior = pad_top..pad_top + geometry.in_height;
        let mut padding = Vec::new();
        for y in 0..padded_height {
            if interior.contains(&y) {
                padding.push((padded_pixel(y, 0), pad_left * lanes));
                let right = pad_left + width;
                padding.push((padded_pixel(y, right), (padded_width - right) * lanes));
            } else {
                padding.push((padded_pixel(y, 0), padded_width * lanes));
            }
        }
        padding.retain(|&(_, len)| len > 0);

        BlockedForm {
            lanes,
            weights: lane_weights,
            bias: lane_bias,
            multiplier: lane_multiplier,
            padded_len: padded_height * padded_width * lanes,
            padding,
            input_offsets: (0..geometry.in_height * width)
                .map(|q| narrow(padded_pixel(q / width + pad_top, q % width + pad_left)))
                .collect(),
            window_offsets: (0..geometry.out_pixels())
                .map(|p| {
                    narrow(padded_pixel(
                        p / out_width * stride_y,
                        p % out_width * stride_x,
                    ))
                })
                .collect(),
            tap_offsets: (0..taps)
                .map(|t| padded_pixel(t / kernel_width * dilation_y, t % kernel_width * dilation_x))
                .collect(),
        }
    }
}

/// Floats in one 64-byte cache line.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const CACHE_LINE_FLOATS: usize = 16;

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl BlockedForm {
    /// Returns one block's padded input inside `scratch`, starting on a 64-byte
    /// boundary, with its padding zeroed. The interior is not cleared: every block
    /// overwrites all of it.
    ///
    /// A pixel of 16 lanes is 64 bytes. In an aligned block it fills one cache line,
    /// and otherwise every load of it spans two. Aligning cut the time of the
    /// `int8_kernels` depthwise layers by 16 to 23% on an AMD EPYC (Zen 4) with 16
    /// lanes, and also helped with 8.
    fn prepare<'a>(&self, scratch: &'a mut Vec<f32>) -> &'a mut [f32] {
        let scratch = grown(scratch, self.padded_len + CACHE_LINE_FLOATS);
        let skip = scratch
            .as_ptr()
            .align_offset(CACHE_LINE_FLOATS * size_of::<f32>())
            .min(CACHE_LINE_FLOATS);
        let padded = &mut scratch[skip..skip + self.padded_len];
        for &(start, len) in &self.padding {
            padded[start..start + len].fill(0.0);
        }
        padded
    }
}

/// Returns input pixel `q` of the `count` channels of a block that starts at
/// `block_input`, each plane `in_plane` bytes, as f32 by lane. Lanes past `count` are 0.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn lane_values<const LANES: usize>(
    block_input: &[u8],
    in_plane: usize,
    q: usize,
    count: usize,
) -> [f32; LANES] {
    let mut values = [0.0f32; LANES];
    for (lane, value) in values.iter_mut().enumerate().take(count) {
        *value = f32::from(block_input[lane * in_plane + q]);
    }
    values
}

impl DepthwiseConv {
    /// Returns `None` unless `geometry` is depthwise, its kernel area is at most
    /// [`DEPTHWISE_MAX_TAPS`], and no bias plus products can overflow i32.
    pub fn new(
        geometry: Geometry,
        weights: &[i8],
        requantize: Requantize,
        input_zero_point: u8,
    ) -> Option<DepthwiseConv> {
        let taps = geometry.kernel[0] * geometry.kernel[1];
        let depthwise =
            geometry.group == geometry.in_channels && geometry.out_channels == geometry.in_channels;
        let max_sum = taps as i64 * MAX_PRODUCT;
        let fits = requantize
            .bias
            .iter()
            .all(|&bias| i64::from(bias).abs() + max_sum <= i64::from(i32::MAX));
        if !depthwise
            || taps > DEPTHWISE_MAX_TAPS
            || !fits
            || weights.len() != geometry.out_channels * taps
        {
            return None;
        }
        let weights: Vec<f32> = weights.iter().map(|&w| f32::from(w)).collect();
        let bias = requantize.bias;
        let blocked = blocked_lanes().map(|lanes| {
            BlockedForm::new(&geometry, &weights, &bias, &requantize.multiplier, lanes)
        });
        Some(DepthwiseConv {
            weights,
            bias,
            multiplier: requantize.multiplier,
            output_zero_point: requantize.output_zero_point,
            input_zero_point,
            geometry,
            blocked,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Returns this kernel with its blocked form laid out for `lanes` channels per block,
    /// so that tests on CPUs with AVX-512 check the 8-lane form too.
    #[cfg(test)]
    pub(super) fn with_blocked_lanes(mut self, lanes: usize) -> DepthwiseConv {
        self.blocked = Some(BlockedForm::new(
            &self.geometry,
            &self.weights,
            &self.bias,
            &self.multiplier,
            lanes,
        ));
        self
    }

    /// Computes one image: `input` is CHW u8, `output` receives CHW u8.
    pub fn run(&self, input: &[u8], output: &mut [u8]) {
        if !self.run_blocked(input, output) {
            self.run_planes(input, output);
        }
    }

    /// Computes one image with the channels in SIMD lanes, as [`blocked_avx512::run`]
    /// describes. Returns `false`, writing nothing, unless the CPU has AVX-512F, or AVX2
    /// and FMA, and every offset fits the 32-bit offsets of the form's tables (and, with
    /// AVX-512, of its gathers and scatters).
    ///
    /// On EfficientNet-Lite0 this form is faster than [`DepthwiseConv::run_planes`] on
    /// every depthwise layer, from 112 x 112 pixels of 32 channels to 7 x 7 of 1152.
    /// It has no per-channel work (padding, converting and rescaling rows of a few
    /// pixels), no columns computed and dropped, and no masked tails.
    pub fn run_blocked(&self, input: &[u8], output: &mut [u8]) -> bool {
        assert_eq!(input.len(), self.geometry.input_len(), "input length");
        assert_eq!(output.len(), self.geometry.output_len(), "output length");
        #[cfg(target_arch = "x86_64")]
        if let Some(form) = &self.blocked {
            let fits_offsets = i32::try_from(input.len().max(output.len())).is_ok()
                && u32::try_from(form.padded_len).is_ok();
            let avx512 = form.lanes == blocked_avx512::LANES
                && std::arch::is_x86_feature_detected!("avx512f");
            let avx2 = form.lanes == blocked_avx2::LANES
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if fits_offsets && (avx512 || avx2) {
                let mut scratch = DEPTHWISE_SCRATCH.take();
                let padded = &mut scratch.blocks;
                // SAFETY: the CPU supports the features of the form its lanes select, the
                // lengths match the geometry the form was laid out for, and the offsets
                // fit in i32.
                unsafe {
                    if avx512 {
                        blocked_avx512::run(self, form, input, output, padded);
                    } else {
                        blocked_avx2::run(self, form, input, output, padded);
                    }
                }
                DEPTHWISE_SCRATCH.set(scratch);
                return true;
            }
        }
        false
    }

    /// Computes one image a channel at a time, as [`DepthwiseConv::run_generic`]
    /// describes.
    pub fn run_planes(&self, input: &[u8], output: &mut [u8]) {
        assert_eq!(input.len(), self.geometry.input_len(), "input length");
        assert_eq!(output.len(), self.geometry.output_len(), "output length");
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features the function enables.
                unsafe { self.run_avx2(input, output) };
                return;
            }
        }
        self.run_generic(input, output);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, input: &[u8], output: &mut [u8]) {
        self.run_generic(input, output);
    }

    /// Computes each channel as a sum of shifted copies of its input, one per kernel tap.
    ///
    /// The channel is padded with zeros after subtracting the zero point. It is split
    /// into `stride_y x stride_x` phase planes, rows and columns grouped by their
    /// remainder modulo the stride. Then, for every tap, the inputs of all output pixels
    /// are one contiguous run of a phase plane, and each tap is a single multiply-add
    /// over the whole output. The output is laid out with the phase plane's row length,
    /// and the columns past the output width are computed and dropped.
    #[inline(always)]
    fn run_generic(&self, input: &[u8], output: &mut [u8]) {
        let geometry = &self.geometry;
        let [kernel_height, kernel_width] = geometry.kernel;
        let [stride_y, stride_x] = geometry.strides;
        let [dilation_y, dilation_x] = geometry.dilations;
        let [pad_top, pad_left] = geometry.pad_before;
        let (height, width) = (geometry.in_height, geometry.in_width);
        let (out_height, out_width) = (geometry.out_height, geometry.out_width);
        let padded_height = (height + pad_top)
            .max((out_height - 1) * stride_y + (kernel_height - 1) * dilation_y + 1);
        let padded_width = (width + pad_left)
            .max((out_width - 1) * stride_x + (kernel_width - 1) * dilation_x + 1);
        let phase_width = padded_width.div_ceil(stride_x);
        // One spare row: the last tap's run may extend past the plane's last row.
        let phase_height = padded_height.div_ceil(stride_y) + 1;
        let phase_len = phase_height * phase_width;
        let run_len = out_height * phase_width;
        let input_zero_point = f32::from(self.input_zero_point);
        let output_zero_point = i32::from(self.output_zero_point);
        let taps = kernel_height * kernel_width;

        // Taken out of the thread-local rather than borrowed in a closure, so that this
        // loop is compiled with the caller's target features (see `GemmConv::run_with`).
        let mut scratch = DEPTHWISE_SCRATCH.take();
        let DepthwiseScratch {
            phases,
            sums,
            plane: converted,
            levels,
            ..
        } = &mut scratch;
        phases.clear();
        phases.resize(stride_y * stride_x * phase_len, 0.0);
        sums.resize(run_len, 0.0);
        levels.resize(run_len, 0);
        converted.resize(height * width, 0.0);
        // Where each tap's run starts in the phase planes, the same for every channel.
        let mut tap_starts = Vec::with_capacity(taps);
        for ky in 0..kernel_height {
            let (row_offset, phase_y) =
                ((ky * dilation_y) / stride_y, (ky * dilation_y) % stride_y);
            for kx in 0..kernel_width {
                let (column_offset, phase_x) =
                    ((kx * dilation_x) / stride_x, (kx * dilation_x) % stride_x);
                tap_starts.push(
                    (phase_y * stride_x + phase_x) * phase_len
                        + row_offset * phase_width
                        + column_offset,
                );
            }
        }
        for channel in 0..geometry.in_channels {
            let plane = &input[channel * height * width..(channel + 1) * height * width];
            if stride_x == 1 {
                // One conversion over the whole plane vectorises even when rows are
                // short, and each row is then a plain copy.
                for (slot, &value) in converted.iter_mut().zip(plane) {
                    *slot = f32::from(value) - input_zero_point;
                }
            }
            for (y, source_row) in plane.chunks_exact(width).enumerate() {
                let padded_y = y + pad_top;
                let row_start =
                    padded_y % stride_y * stride_x * phase_len + padded_y / stride_y * phase_width;
                if stride_x == 1 {
                    let start = row_start + pad_left;
                    let count = width.min(phase_width - pad_left);
                    phases[start..start + count].copy_from_slice(&converted[y * width..][..count]);
                    continue;
                }
                for phase_x in 0..stride_x {
                    // Input columns x whose padded column x + pad_left is in this phase.
                    let first_x = (phase_x + stride_x - pad_left % stride_x) % stride_x;
                    let start = row_start + phase_x * phase_len + (first_x + pad_left) / stride_x;
                    let target =
                        &mut phases[start..start + phase_width - (first_x + pad_left) / stride_x];
                    subtract_zero_point(
                        &source_row[first_x.min(width)..],
                        stride_x,
                        input_zero_point,
                        target,
                    );
                }
            }

            let weights = &self.weights[channel * taps..(channel + 1) * taps];
            accumulate_taps(phases, &tap_starts, weights, sums);

            // Rescaled in one pass over the whole run, which vectorises where rows of 7
            // or 14 outputs do not, then copied row by row. The sums of products are
            // exact integers, and `new` bounds them plus the bias within i32.
            let (bias, multiplier) = (self.bias[channel], self.multiplier[channel]);
            for (level, &sum) in levels.iter_mut().zip(sums.iter()) {
                let total = (sum as i32).wrapping_add(bias);
                *level = requantize(total as f32, multiplier, output_zero_point);
            }
            let target_plane =
                &mut output[channel * out_height * out_width..][..out_height * out_width];
            for (target, row) in target_plane
                .chunks_exact_mut(out_width)
                .zip(levels.chunks_exact(phase_width))
            {
                target.copy_from_slice(&row[..out_width]);
            }
        }
        DEPTHWISE_SCRATCH.set(scratch);
    }
}

/// Sets `sums[i]` to the sum over taps t of `weights[t] * phases[starts[t] + i]`.
#[inline(always)]
fn accumulate_taps(phases: &[f32], starts: &[usize], weights: &[f32], sums: &mut [f32]) {
    let len = sums.len();
    sums.fill(0.0);
    for (&start, &weight) in starts.iter().zip(weights) {
        for (sum, &value) in sums.iter_mut().zip(&phases[start..][..len]) {
            *sum += weight * value;
        }
    }
}

/// Writes `source[0], source[stride], source[2 * stride], ...` minus `zero_point` as f32
/// into `target`, as far as either reaches. Strides 1 and 2 get loops the compiler
/// vectorises.
#[inline(always)]
fn subtract_zero_point(source: &[u8], stride: usize, zero_point: f32, target: &mut [f32]) {
    match stride {
        1 => {
            for (slot, &value) in target.iter_mut().zip(source) {
                *slot = f32::from(value) - zero_point;
            }
        }
        2 => {
            // Fixed-size blocks, so the even bytes are picked with shuffles.
            let blocks = target.len().min(source.len() / 32);
            let (head, tail) = target.split_at_mut(blocks * 16);
            for (slots, values) in head.chunks_exact_mut(16).zip(source.chunks_exact(32)) {
                for i in 0..16 {
                    slots[i] = f32::from(values[2 * i]) - zero_point;
                }
            }
            for (slot, &value) in tail.iter_mut().zip(source[blocks * 32..].iter().step_by(2)) {
                *slot = f32::from(value) - zero_point;
            }
        }
        _ => {
            for (slot, &value) in target.iter_mut().zip(source.iter().step_by(stride)) {
                *slot = f32::from(value) - zero_point;
            }
        }
    }
}

/// Returns the channels per block of the blocked depthwise form on this CPU, or `None`
/// where it runs the plane form only.
///
/// TODO: a NEON form with 4 channels per register for aarch64 boards. Until then they
/// run the plane form, which has not been timed on ARM hardware.
fn blocked_lanes() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(blocked_avx512::LANES);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(blocked_avx2::LANES);
        }
    }
    None
}

/// The blocked depthwise form for AVX-512F.
#[cfg(target_arch = "x86_64")]
mod blocked_avx512 {
    use std::arch::x86_64::{
        __m128i, __m512, __m512i, __mmask16, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
        _mm_loadl_epi64, _mm_unpacklo_epi64, _mm512_add_epi32, _mm512_and_si512,
        _mm512_castsi512_si256, _mm512_cvt_roundps_epi32, _mm512_cvtepi32_ps, _mm512_cvtepu8_epi32,
        _mm512_cvttps_epi32, _mm512_extracti64x4_epi64, _mm512_fmadd_ps, _mm512_loadu_ps,
        _mm512_loadu_si512, _mm512_mask_i32gather_epi32, _mm512_mask_i32scatter_epi32,
        _mm512_max_epi32, _mm512_max_ps, _mm512_min_epi32, _mm512_min_ps, _mm512_mul_ps,
        _mm512_mullo_epi32, _mm512_or_si512, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setr_epi32,
        _mm512_setzero_ps, _mm512_setzero_si512, _mm512_slli_epi32, _mm512_srli_epi32,
        _mm512_storeu_ps, _mm512_storeu_si512, _mm512_sub_ps,
    };

    use super::blocked_avx2::{transpose_in, transpose_out};
    use super::{BlockedForm, DepthwiseConv, lane_values};

    /// Channels in one block: one 512-bit register of f32.
    pub(super) const LANES: usize = 16;

    /// Output pixels computed together: eight independent accumulator registers, so
    /// that consecutive multiply-adds do not wait for each other's results.
    const PIXELS: usize = 8;
    /// Pixels one gather reads and one scatter writes: four bytes per 32-bit lane.
    const PIXELS_PER_WORD: usize = 4;
    /// Channels of one 8 x 8 byte transpose: half a block.
    const HALF: usize = LANES / 2;

    /// Computes one image a block of 16 channels at a time.
    ///
    /// The block's input is laid out as a zero-padded `[row][column][channel]` array of
    /// f32, the zero point subtracted. Each output pixel is then a multiply-add of whole
    /// registers per kernel tap, with the stride and dilation only in the offsets. As in
    /// the plane form, every product and partial sum is an integer below 2^24, so the
    /// f32 arithmetic is exact and both forms write the same bytes.
    ///
    /// A full block of 16 channels moves between the channel planes and the lanes with
    /// the 8 x 8 byte transposes of [`blocked_avx2`], two per group of 8 pixels. A last
    /// block of fewer channels uses masked gathers, which read four neighbouring pixels
    /// of every channel, and masked scatters. On an AMD EPYC (Zen 4) the transposes cut
    /// the time of EfficientNet-Lite0's depthwise layers by 0 to 12% against gathers and
    /// scatters (`int8_kernels` example).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `form` must be laid out for `conv`'s geometry, the
    /// lengths of `input` and `output` must match it, and both must fit in i32.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(
        conv: &DepthwiseConv,
        form: &BlockedForm,
        input: &[u8],
        output: &mut [u8],
        scratch: &mut Vec<f32>,
    ) {
        let geometry = &conv.geometry;
        let channels = geometry.in_channels;
        let in_plane = geometry.in_height * geometry.in_width;
        let out_plane = geometry.out_pixels();
        let taps = form.tap_offsets.len();
        let padded = form.prepare(scratch);
        let input_zero_point = _mm512_set1_ps(f32::from(conv.input_zero_point));
        let output_zero_point = _mm512_set1_epi32(i32::from(conv.output_zero_point));
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        // Byte offsets of each lane's channel plane; the caller checked they fit.
        let in_planes = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(in_plane as i32));
        let out_planes = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(out_plane as i32));
        let byte = _mm512_set1_epi32(0xff);

        for block in 0..channels.div_ceil(LANES) {
            let first = block * LANES;
            let count = (channels - first).min(LANES);
            let mask = ((1u32 << count) - 1) as __mmask16;
            let block_input = &input[first * in_plane..];
            let padded_ptr = padded.as_mut_ptr();

            let mut q = 0;
            if count == LANES {
                while q + PIXELS <= in_plane {
                    // SAFETY: channel c's 8 bytes from `q` lie inside its plane, and every
                    // input offset lies in the padded block, as laid out.
                    unsafe {
                        let rows = |half: usize| -> [__m128i; HALF] {
                            std::array::from_fn(|c| {
                                let channel = half * HALF + c;
                                _mm_loadl_epi64(
                                    block_input.as_ptr().add(channel * in_plane + q).cast(),
                                )
                            })
                        };
                        let low = transpose_in(rows(0));
                        let high = transpose_in(rows(1));
                        for (j, (low, high)) in low.into_iter().zip(high).enumerate() {
                            let bytes = _mm_unpacklo_epi64(low, high);
                            let values = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
                            _mm512_storeu_ps(
                                padded_ptr.add(form.input_offsets[q + j] as usize),
                                _mm512_sub_ps(values, input_zero_point),
                            );
                        }
                    }
                    q += PIXELS;
                }
            }
            while count < LANES && q + PIXELS_PER_WORD <= in_plane {
                // SAFETY: lane c reads bytes `c * in_plane + q .. + 4` of `block_input`,
                // inside channel `first + c`'s plane; masked lanes read nothing. Every
                // input offset lies in the padded block, as laid out.
                unsafe {
                    let words = _mm512_mask_i32gather_epi32::<1>(
                        _mm512_setzero_si512(),
                        mask,
                        in_planes,
                        block_input.as_ptr().add(q).cast(),
                    );
                    let pixels = [
                        words,
                        _mm512_srli_epi32::<8>(words),
                        _mm512_srli_epi32::<16>(words),
                        _mm512_srli_epi32::<24>(words),
                    ];
                    for (j, &pixel) in pixels.iter().enumerate() {
                        let values = _mm512_cvtepi32_ps(_mm512_and_si512(pixel, byte));
                        _mm512_storeu_ps(
                            padded_ptr.add(form.input_offsets[q + j] as usize),
                            _mm512_sub_ps(values, input_zero_point),
                        );
                    }
                }
                q += PIXELS_PER_WORD;
            }
            for q in q..in_plane {
                let values = lane_values::<LANES>(block_input, in_plane, q, count);
                // SAFETY: the offset lies in the padded block, as laid out.
                unsafe {
                    _mm512_storeu_ps(
                        padded_ptr.add(form.input_offsets[q] as usize),
                        _mm512_sub_ps(_mm512_loadu_ps(values.as_ptr()), input_zero_point),
                    );
                }
            }

            let lane_range = block * LANES..(block + 1) * LANES;
            // SAFETY: each range is exactly one register's lanes.
            let rescale = unsafe {
                Rescale {
                    bias: _mm512_loadu_si512(form.bias[lane_range.clone()].as_ptr().cast()),
                    multiplier: _mm512_loadu_ps(form.multiplier[lane_range].as_ptr()),
                    zero_point: output_zero_point,
                }
            };
            let weights = &form.weights[block * taps * LANES..][..taps * LANES];
            let block_output = output[first * out_plane..].as_mut_ptr();
            let mut p = 0;
            while p + PIXELS <= out_plane {
                // SAFETY: window and tap offsets stay inside the padded block, as laid
                // out; the stores and scatters write bytes `p .. p + 8` of the block's
                // planes.
                unsafe {
                    let levels = pixels::<PIXELS>(
                        padded,
                        &form.window_offsets[p..],
                        form,
                        weights,
                        &rescale,
                    );
                    if count == LANES {
                        let low = transpose_out(levels.map(|l| _mm512_castsi512_si256(l)));
                        let high = transpose_out(levels.map(|l| _mm512_extracti64x4_epi64::<1>(l)));
                        for (c, bytes) in low.into_iter().chain(high).enumerate() {
                            block_output
                                .add(c * out_plane + p)
                                .cast::<i64>()
                                .write_unaligned(bytes);
                        }
                    } else {
                        for (group, four) in levels.chunks_exact(PIXELS_PER_WORD).enumerate() {
                            _mm512_mask_i32scatter_epi32::<1>(
                                block_output.add(p + group * PIXELS_PER_WORD).cast(),
                                mask,
                                out_planes,
                                word(four),
                            );
                        }
                    }
                }
                p += PIXELS;
            }
            for p in p..out_plane {
                let mut levels = [0i32; LANES];
                // SAFETY: as above, for one pixel.
                unsafe {
                    let [level] =
                        pixels::<1>(padded, &form.window_offsets[p..], form, weights, &rescale);
                    _mm512_storeu_si512(levels.as_mut_ptr().cast(), level);
                }
                for (lane, &level) in levels.iter().enumerate().take(count) {
                    output[(first + lane) * out_plane + p] = level as u8;
                }
            }
        }
    }

    struct Rescale {
        bias: __m512i,
        multiplier: __m512,
        zero_point: __m512i,
    }

    /// Computes the u8 levels, one per 32-bit lane, of `N` output pixels whose windows
    /// start at `windows[..N]`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and every window plus tap offset must leave a
    /// whole register inside `padded`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pixels<const N: usize>(
        padded: &[f32],
        windows: &[u32],
        form: &BlockedForm,
        weights: &[f32],
        rescale: &Rescale,
    ) -> [__m512i; N] {
        let windows = &windows[..N];
        let mut sums = [_mm512_setzero_ps(); N];
        for (tap, &offset) in form.tap_offsets.iter().enumerate() {
            // SAFETY: the caller's contract bounds every read.
            unsafe {
                let weight = _mm512_loadu_ps(weights.as_ptr().add(tap * LANES));
                for (sum, &window) in sums.iter_mut().zip(windows) {
                    let values = _mm512_loadu_ps(padded.as_ptr().add(window as usize + offset));
                    *sum = _mm512_fmadd_ps(weight, values, *sum);
                }
            }
        }
        // The bias is added in i32, as in the plane form. Then the steps of
        // `requantize`: clamp, round to even, add the zero point, saturate.
        let mut levels = [_mm512_setzero_si512(); N];
        for (level, &sum) in levels.iter_mut().zip(&sums) {
            let total = _mm512_add_epi32(_mm512_cvttps_epi32(sum), rescale.bias);
            let scaled = _mm512_min_ps(
                _mm512_max_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(total), rescale.multiplier),
                    _mm512_set1_ps(-512.0),
                ),
                _mm512_set1_ps(512.0),
            );
            let rounded = _mm512_cvt_roundps_epi32::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(scaled);
            *level = _mm512_min_epi32(
                _mm512_max_epi32(
                    _mm512_add_epi32(rounded, rescale.zero_point),
                    _mm512_setzero_si512(),
                ),
                _mm512_set1_epi32(255),
            );
        }
        levels
    }

    /// Packs four pixels' levels into words containing the four consecutive pixels of one
    /// channel each, lowest byte first, as they lie in the channel plane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn word(levels: &[__m512i]) -> __m512i {
        _mm512_or_si512(
            _mm512_or_si512(levels[0], _mm512_slli_epi32::<8>(levels[1])),
            _mm512_or_si512(
                _mm512_slli_epi32::<16>(levels[2]),
                _mm512_slli_epi32::<24>(levels[3]),
            ),
        )
    }
}

/// The blocked depthwise form for AVX2 and FMA: [`blocked_avx512`]'s method with 8
/// channels per register. The output passes through an 8 x 8 byte transpose of pack
/// and shuffle instructions, and the input through the mirror transpose of unpack
/// instructions.
///
/// The two modules mirror each other line for line where the intrinsics differ only
/// in width. They stay apart because sharing that code would take a trait over
/// register types whose methods each carry their own target features.
#[cfg(target_arch = "x86_64")]
mod blocked_avx2 {
    use std::arch::x86_64::{
        __m128i, __m256, __m256i, _mm_loadl_epi64, _mm_srli_si128, _mm_unpackhi_epi16,
        _mm_unpackhi_epi32, _mm_unpacklo_epi8, _mm_unpacklo_epi16, _mm_unpacklo_epi32,
        _mm256_add_epi32, _mm256_cvtepi32_ps, _mm256_cvtepu8_epi32, _mm256_cvtps_epi32,
        _mm256_cvttps_epi32, _mm256_extract_epi64, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_loadu_si256, _mm256_max_epi32, _mm256_max_ps, _mm256_min_epi32, _mm256_min_ps,
        _mm256_mul_ps, _mm256_packs_epi32, _mm256_packus_epi16, _mm256_set1_epi32, _mm256_set1_ps,
        _mm256_setr_epi8, _mm256_setzero_ps, _mm256_setzero_si256, _mm256_shuffle_epi8,
        _mm256_storeu_ps, _mm256_storeu_si256, _mm256_sub_ps, _mm256_unpackhi_epi32,
        _mm256_unpacklo_epi32,
    };

    use super::{BlockedForm, DepthwiseConv, lane_values};

    /// Channels in one block: one 256-bit register of f32.
    pub(super) const LANES: usize = 8;
    /// Output pixels computed together, as in the AVX-512 form; also the pixels of one
    /// transpose.
    const PIXELS: usize = 8;

    /// Computes one image a block of 8 channels at a time.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `form` must be laid out for `conv`'s geometry
    /// with 8 lanes, and the lengths of `input` and `output` must match it.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(
        conv: &DepthwiseConv,
        form: &BlockedForm,
        input: &[u8],
        output: &mut [u8],
        scratch: &mut Vec<f32>,
    ) {
        let geometry = &conv.geometry;
        let channels = geometry.in_channels;
        let in_plane = geometry.in_height * geometry.in_width;
        let out_plane = geometry.out_pixels();
        let taps = form.tap_offsets.len();
        assert_eq!(form.lanes, LANES, "lanes of the blocked form");
        assert_eq!(input.len(), channels * in_plane, "input length");
        assert_eq!(output.len(), channels * out_plane, "output length");
        let padded = form.prepare(scratch);
        let input_zero_point = _mm256_set1_ps(f32::from(conv.input_zero_point));
        let rescale_zero_point = _mm256_set1_epi32(i32::from(conv.output_zero_point));

        for block in 0..channels.div_ceil(LANES) {
            let first = block * LANES;
            let count = (channels - first).min(LANES);
            let block_input = &input[first * in_plane..];
            let padded_ptr = padded.as_mut_ptr();

            let mut q = 0;
            if count == LANES {
                while q + PIXELS <= in_plane {
                    // SAFETY: channel c's 8 bytes from `q` lie inside its plane, and every
                    // input offset lies in the padded block, as laid out.
                    unsafe {
                        let rows: [__m128i; LANES] = std::array::from_fn(|c| {
                            _mm_loadl_epi64(block_input.as_ptr().add(c * in_plane + q).cast())
                        });
                        for (j, bytes) in transpose_in(rows).into_iter().enumerate() {
                            let values = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                            _mm256_storeu_ps(
                                padded_ptr.add(form.input_offsets[q + j] as usize),
                                _mm256_sub_ps(values, input_zero_point),
                            );
                        }
                    }
                    q += PIXELS;
                }
            }
            for q in q..in_plane {
                let values = lane_values::<LANES>(block_input, in_plane, q, count);
                // SAFETY: the offset lies in the padded block, as laid out.
                unsafe {
                    _mm256_storeu_ps(
                        padded_ptr.add(form.input_offsets[q] as usize),
                        _mm256_sub_ps(_mm256_loadu_ps(values.as_ptr()), input_zero_point),
                    );
                }
            }

            let lane_range = block * LANES..(block + 1) * LANES;
            // SAFETY: each range is exactly one register's lanes.
            let rescale = unsafe {
                Rescale {
                    bias: _mm256_loadu_si256(form.bias[lane_range.clone()].as_ptr().cast()),
                    multiplier: _mm256_loadu_ps(form.multiplier[lane_range].as_ptr()),
                    zero_point: rescale_zero_point,
                }
            };
            let weights = &form.weights[block * taps * LANES..][..taps * LANES];
            let block_output = &mut output[first * out_plane..];
            let mut p = 0;
            while p + PIXELS <= out_plane {
                // SAFETY: window and tap offsets stay inside the padded block, as laid
                // out, and channel c's 8 bytes from `p` lie inside its output plane.
                unsafe {
                    let levels = pixels::<PIXELS>(
                        padded,
                        &form.window_offsets[p..],
                        form,
                        weights,
                        &rescale,
                    );
                    if count == LANES {
                        for (c, bytes) in transpose_out(levels).into_iter().enumerate() {
                            block_output
                                .as_mut_ptr()
                                .add(c * out_plane + p)
                                .cast::<i64>()
                                .write_unaligned(bytes);
                        }
                    } else {
                        for (j, level) in levels.into_iter().enumerate() {
                            store_lanes(level, count, &mut block_output[p + j..], out_plane);
                        }
                    }
                }
                p += PIXELS;
            }
            for p in p..out_plane {
                // SAFETY: as above, for one pixel.
                let [level] = unsafe {
                    pixels::<1>(padded, &form.window_offsets[p..], form, weights, &rescale)
                };
                store_lanes(level, count, &mut block_output[p..], out_plane);
            }
        }
    }

    struct Rescale {
        bias: __m256i,
        multiplier: __m256,
        zero_point: __m256i,
    }

    /// Writes the first `count` lanes of `levels` to `target[0]`, `target[stride]`, ...
    #[inline]
    #[target_feature(enable = "avx2")]
    fn store_lanes(levels: __m256i, count: usize, target: &mut [u8], stride: usize) {
        let mut lanes = [0i32; LANES];
        // SAFETY: `lanes` is one register wide.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), levels) };
        for (lane, &level) in lanes.iter().enumerate().take(count) {
            target[lane * stride] = level as u8;
        }
    }

    /// Takes 8 consecutive pixels of 8 channels, one channel per register's low 8 bytes,
    /// and returns the 8 pixels, each with its 8 channels in the low 8 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn transpose_in(rows: [__m128i; LANES]) -> [__m128i; PIXELS] {
        // Channel pairs per pixel, then channel quads per pixel pair, then all eight.
        let pairs = [0, 2, 4, 6].map(|c| _mm_unpacklo_epi8(rows[c], rows[c + 1]));
        let quads = [
            _mm_unpacklo_epi16(pairs[0], pairs[1]),
            _mm_unpackhi_epi16(pairs[0], pairs[1]),
            _mm_unpacklo_epi16(pairs[2], pairs[3]),
            _mm_unpackhi_epi16(pairs[2], pairs[3]),
        ];
        let pixel_pairs = [
            _mm_unpacklo_epi32(quads[0], quads[2]),
            _mm_unpackhi_epi32(quads[0], quads[2]),
            _mm_unpacklo_epi32(quads[1], quads[3]),
            _mm_unpackhi_epi32(quads[1], quads[3]),
        ];
        std::array::from_fn(|j| {
            let pair = pixel_pairs[j / 2];
            if j % 2 == 0 {
                pair
            } else {
                _mm_srli_si128::<8>(pair)
            }
        })
    }

    /// Takes the levels (0 to 255, one per 32-bit lane) of 8 consecutive pixels and
    /// returns, per channel, its 8 pixels as bytes in plane order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn transpose_out(levels: [__m256i; PIXELS]) -> [i64; LANES] {
        // Bytes `[pixel][channel]` of pixels 0-3 and 4-7, channels 0-3 in the low
        // 128-bit half and 4-7 in the high one.
        let low = _mm256_packus_epi16(
            _mm256_packs_epi32(levels[0], levels[1]),
            _mm256_packs_epi32(levels[2], levels[3]),
        );
        let high = _mm256_packus_epi16(
            _mm256_packs_epi32(levels[4], levels[5]),
            _mm256_packs_epi32(levels[6], levels[7]),
        );
        // A 4 x 4 transpose in each half: `[channel][pixel]`.
        let order = _mm256_setr_epi8(
            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6,
            10, 14, 3, 7, 11, 15,
        );
        let (low, high) = (
            _mm256_shuffle_epi8(low, order),
            _mm256_shuffle_epi8(high, order),
        );
        // Channels 0, 1 | 4, 5 and 2, 3 | 6, 7, each with pixels 0-3 then 4-7.
        let even = _mm256_unpacklo_epi32(low, high);
        let odd = _mm256_unpackhi_epi32(low, high);
        [
            _mm256_extract_epi64::<0>(even),
            _mm256_extract_epi64::<1>(even),
            _mm256_extract_epi64::<0>(odd),
            _mm256_extract_epi64::<1>(odd),
            _mm256_extract_epi64::<2>(even),
            _mm256_extract_epi64::<3>(even),
            _mm256_extract_epi64::<2>(odd),
            _mm256_extract_epi64::<3>(odd),
        ]
    }

    /// Computes the u8 levels, one per 32-bit lane, of `N` output pixels whose windows
    /// start at `windows[..N]`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and every window plus tap offset must leave a
    /// whole register inside `padded`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pixels<const N: usize>(
        padded: &[f32],
        windows: &[u32],
        form: &BlockedForm,
        weights: &[f32],
        rescale: &Rescale,
    ) -> [__m256i; N] {
        let windows = &windows[..N];
        let mut sums = [_mm256_setzero_ps(); N];
        for (tap, &offset) in form.tap_offsets.iter().enumerate() {
            // SAFETY: the caller's contract bounds every read.
            unsafe {
                let weight = _mm256_loadu_ps(weights.as_ptr().add(tap * LANES));
                for (sum, &window) in sums.iter_mut().zip(windows) {
                    let values = _mm256_loadu_ps(padded.as_ptr().add(window as usize + offset));
                    *sum = _mm256_fmadd_ps(weight, values, *sum);
                }
            }
        }
        // The bias is added in i32, as in the plane form. Then the steps of
        // `requantize`. `vcvtps2dq` and `vcvtdq2ps` round to nearest, ties to even, in
        // the default rounding mode, which nothing in the runtime changes.
        let mut levels = [_mm256_setzero_si256(); N];
        for (level, &sum) in levels.iter_mut().zip(&sums) {
            let total = _mm256_add_epi32(_mm256_cvttps_epi32(sum), rescale.bias);
            let scaled = _mm256_min_ps(
                _mm256_max_ps(
                    _mm256_mul_ps(_mm256_cvtepi32_ps(total), rescale.multiplier),
                    _mm256_set1_ps(-512.0),
                ),
                _mm256_set1_ps(512.0),
            );
            *level = _mm256_min_epi32(
                _mm256_max_epi32(
                    _mm256_add_epi32(_mm256_cvtps_epi32(scaled), rescale.zero_point),
                    _mm256_setzero_si256(),
                ),
                _mm256_set1_epi32(255),
            );
        }
        levels
    }
}

/// Reference convolution, one multiply-add at a time, for tests.
#[cfg(test)]
pub(crate) fn reference(
    geometry: &Geometry,
    input: &[u8],
    weights: &[i8],
    requantize: &Requantize,
    input_zero_point: u8,
) -> Vec<u8> {
    let channels_per_group = geometry.in_channels / geometry.group;
    let rows = geometry.out_channels / geometry.group;
    let [kernel_height, kernel_width] = geometry.kernel;
    let mut output = vec![0u8; geometry.output_len()];
    for channel in 0..geometry.out_channels {
        let group = channel / rows;
        for oy in 0..geometry.out_height {
            for ox in 0..geometry.out_width {
                let mut sum = i64::from(requantize.bias[channel]);
                for c in 0..channels_per_group {
                    let input_channel = group * channels_per_group + c;
                    for ky in 0..kernel_height {
                        for kx in 0..kernel_width {
                            let (y, x) = geometry.padded_source(oy, ox, ky, kx);
                            let y = y as i64 - geometry.pad_before[0] as i64;
                            let x = x as i64 - geometry.pad_before[1] as i64;
                            let inside = (0..geometry.in_height as i64).contains(&y)
                                && (0..geometry.in_width as i64).contains(&x);
                            let value = if inside {
                                let index = (input_channel * geometry.in_height + y as usize)
                                    * geometry.in_width
                                    + x as usize;
                                i64::from(input[index]) - i64::from(input_zero_point)
                            } else {
                                0
                            };
                            let weight =
                                weights[((channel * channels_per_group + c) * kernel_height + ky)
                                    * kernel_width
                                    + kx];
                            sum += value * i64::from(weight);
                        }
                    }
                }
                output[(channel * geometry.out_height + oy) * geometry.out_width + ox] =
                    requantize_exact(
                        sum,
                        requantize.multiplier[channel],
                        requantize.output_zero_point,
                    );
            }
        }
    }
    output
}

#[cfg(test)]
fn requantize_exact(sum: i64, multiplier: f32, zero_point: u8) -> u8 {
    ((sum as f64 * f64::from(multiplier)).round_ties_even() + f64::from(zero_point))
        .clamp(0.0, 255.0) as u8
}
