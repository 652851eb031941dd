//! Images to token ids exactly as Hugging Face's `ImageGPTImageProcessor` makes them:
//! Pillow's BILINEAR resize, `x / 255` then `(x - 0.5) / 0.5` in float32 (the same values as
//! the older `x / 127.5 - 1`), then the nearest cluster by the processor's own distance formula.
//!
//! Pillow's resize is reproduced bit for bit: separable passes (horizontal first, each rounded
//! to 8 bits), a triangle filter whose support widens with the scale factor when shrinking
//! (antialiasing), and coefficients in fixed point with 22 fractional bits.

/// Fractional bits of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output sample: the first input index, and the fixed-point weights of the inputs
/// from there on.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Coefficients for resampling `in_size` samples to `out_size` (Pillow's `precompute_coeffs`
/// for the whole-image box, then `normalize_coeffs_8bpc`).
fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle's support is 1
    // Pillow multiplies by the reciprocal rather than dividing; the rounding differs.
    let inv = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut w: Vec<f64> = (0..count)
            .map(|x| triangle((x as f64 + xmin as f64 - center + 0.5) * inv))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
            }
        }
        let fixed = w
            .iter()
            .map(|&k| {
                let s = k * (1u32 << PRECISION_BITS) as f64;
                if k < 0.0 {
                    (s - 0.5) as i32
                } else {
                    (s + 0.5) as i32
                }
            })
            .collect();
        start.push(xmin);
        weights.push(fixed);
    }
    Taps { start, weights }
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's `Image.resize((out_w, out_h), Image.BILINEAR)` of an 8-bit image with
/// `channels` interleaved channels.
pub fn resize_bilinear(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_eq!(src.len(), w * h * channels);
    assert!(w > 0 && h > 0 && out_w > 0 && out_h > 0);
    let c = channels;
    let horizontal = if out_w != w {
        let t = taps(w, out_w);
        let mut out = vec![0u8; out_w * h * c];
        for y in 0..h {
            let row = &src[y * w * c..(y + 1) * w * c];
            for xx in 0..out_w {
                for ch in 0..c {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (k, &wt) in t.weights[xx].iter().enumerate() {
                        acc += row[(t.start[xx] + k) * c + ch] as i32 * wt;
                    }
                    out[(y * out_w + xx) * c + ch] = clip8(acc);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    if out_h == h {
        return horizontal;
    }
    let t = taps(h, out_h);
    let mut out = vec![0u8; out_w * out_h * c];
    for yy in 0..out_h {
        for x in 0..out_w * c {
            let mut acc: i32 = 1 << (PRECISION_BITS - 1);
            for (k, &wt) in t.weights[yy].iter().enumerate() {
                acc += horizontal[(t.start[yy] + k) * out_w * c + x] as i32 * wt;
            }
            out[yy * out_w * c + x] = clip8(acc);
        }
    }
    out
}

/// The processor's value for an 8-bit level: `float32(level * (1/255))`, then
/// `(x - 0.5) / 0.5` in float32.
pub fn normalise(level: u8) -> f32 {
    let x = (level as f64 * (1.0 / 255.0)) as f32;
    (x - 0.5) / 0.5
}

/// Nearest cluster for RGB pixels by the processor's formula `|a|^2 - 2 a.b + |b|^2`, with `|a|^2`
/// summed in float32 and the rest in float64, first index on ties (`np.argmin`).
pub struct HfQuantiser {
    clusters: Vec<[f64; 3]>,
    norms: Vec<f64>,
}

impl HfQuantiser {
    /// `centers`: `[k][3]` as the preprocessor config stores them.
    pub fn new(centers: &[f64]) -> Self {
        let clusters: Vec<[f64; 3]> = centers
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        let norms = clusters
            .iter()
            .map(|c| c[0] * c[0] + c[1] * c[1] + c[2] * c[2])
            .collect();
        Self { clusters, norms }
    }

    pub fn nearest(&self, rgb: [u8; 3]) -> u16 {
        let a = rgb.map(normalise);
        let a2 = (a[0] * a[0] + a[1] * a[1] + a[2] * a[2]) as f64;
        let a = a.map(|x| x as f64);
        let mut best = (f64::INFINITY, 0usize);
        for (i, (c, &b2)) in self.clusters.iter().zip(&self.norms).enumerate() {
            let ab = a[0] * c[0] + a[1] * c[1] + a[2] * c[2];
            let d = a2 - 2.0 * ab + b2;
            if d < best.0 {
                best = (d, i);
            }
        }
        best.1 as u16
    }

    /// Token ids of an RGB image already at the model's size.
    pub fn encode(&self, rgb: &[u8]) -> Vec<u16> {
        rgb.chunks_exact(3)
            .map(|p| self.nearest([p[0], p[1], p[2]]))
            .collect()
    }
}

/// What was done to an image to make it RGB, for telling the user.
pub fn rgb_conversion_note(color: image::ColorType) -> Option<&'static str> {
    use image::ColorType as C;
    match color {
        C::Rgb8 => None,
        C::Rgba8 => Some("RGBA: alpha dropped"),
        C::L8 => Some("grayscale: copied to R, G and B"),
        C::La8 => Some("grayscale with alpha: alpha dropped, gray copied to R, G and B"),
        _ => Some("converted to 8-bit RGB"),
    }
}
