//! The one path from an image to a model's tokens, taken by every command (training data,
//! `complete`, `score`, `encode`, `classify`, `features`, `probe`, `finetune`): channels
//! converted ([`convert_channels`]), Pillow's BILINEAR resize to the model's side
//! ([`resize_bilinear`]), then the palette's quantiser ([`Palette::encode`], Hugging Face's
//! arithmetic). [`shape`] does the first two, [`image_tokens`] all three; data sets go through
//! [`crate::data::ImageSet::shaped`] and [`crate::data::load_shaped`], which call [`shape`].
//! For RGB models the ids are exactly those of Hugging Face's `ImageGPTImageProcessor`.
//!
//! Pillow's resize is reproduced bit for bit: separable passes (horizontal first, each rounded
//! to 8 bits), a triangle filter whose support widens with the scale factor when shrinking
//! (antialiasing), and coefficients in fixed point with 22 fractional bits.

mod jpeg;

use crate::palette::Palette;
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

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

/// What is done to an image of colour type `color` to give it `channels`, for telling the user.
pub fn conversion_note(color: image::ColorType, channels: usize) -> Option<&'static str> {
    use image::ColorType as C;
    match (color, channels) {
        (C::Rgb8, 3) | (C::L8, 1) => None,
        (C::Rgba8, 3) => Some("RGBA: alpha dropped (the alpha channel is not used)"),
        (C::L8, _) => Some("grayscale: copied to R, G and B"),
        (C::La8, 3) => Some("grayscale with alpha: alpha dropped, gray copied to R, G and B"),
        (C::La8, _) => Some("grayscale with alpha: alpha dropped"),
        (C::Rgb8, _) => Some("colour: converted to gray (Pillow's luma)"),
        (C::Rgba8, _) => Some(
            "RGBA: alpha dropped (the alpha channel is not used), colour converted to gray (Pillow's luma)",
        ),
        (_, 3) => Some("converted to 8-bit RGB"),
        _ => Some("converted to 8-bit gray"),
    }
}

/// Pillow's `convert("L")` of one RGB pixel (ITU-R 601-2 luma in 16-bit fixed point, rounded).
pub fn luma(rgb: [u8; 3]) -> u8 {
    ((rgb[0] as u32 * 19595 + rgb[1] as u32 * 38470 + rgb[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Interleaved pixels with `from` channels as `to` channels: RGB to gray by [`luma`], gray to
/// RGB by copying (1 and 3 channels only).
pub fn convert_channels(pixels: &[u8], from: usize, to: usize) -> Result<Vec<u8>> {
    ensure!(
        matches!(from, 1 | 3) && matches!(to, 1 | 3),
        "images must have 1 or 3 channels (got {from} -> {to})"
    );
    Ok(match (from, to) {
        (1, 3) => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        (3, 1) => pixels
            .chunks_exact(3)
            .map(|p| luma([p[0], p[1], p[2]]))
            .collect(),
        _ => pixels.to_vec(),
    })
}

/// An 8-bit image: `height x width x channels` interleaved bytes.
#[derive(Debug, Clone, Copy)]
pub struct ImageRef<'a> {
    pub pixels: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

/// An image as a model sees it: converted to `channels`, then resized (whole image, aspect
/// ratio not kept) to `side x side` by [`resize_bilinear`].
pub fn shape(img: ImageRef, side: usize, channels: usize) -> Result<Vec<u8>> {
    ensure!(
        img.width > 0 && img.height > 0 && side > 0,
        "cannot resize a {}x{} image to {side}x{side}",
        img.width,
        img.height
    );
    ensure!(
        img.pixels.len() == img.width * img.height * img.channels,
        "{} bytes do not make a {}x{}x{} image",
        img.pixels.len(),
        img.width,
        img.height,
        img.channels
    );
    let converted = convert_channels(img.pixels, img.channels, channels)?;
    Ok(resize_bilinear(
        &converted, img.width, img.height, channels, side, side,
    ))
}

/// Token ids of one image for a model of side `side` with `palette` (its channel count).
pub fn image_tokens(img: ImageRef, side: usize, palette: &Palette) -> Result<Vec<u16>> {
    Ok(palette.encode(&shape(img, side, palette.channels)?))
}

/// A decoded image file: 8-bit RGB (gray files copied to R, G and B, alpha dropped, CMYK
/// JPEGs converted as Pillow's `convert("RGB")`; gray comes back unchanged from [`luma`]).
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    /// The file's own colour type ([`conversion_note`]); `Rgb8` for a CMYK JPEG.
    pub color: image::ColorType,
    /// A CMYK (or YCCK) JPEG, converted to RGB.
    pub cmyk: bool,
}

impl Decoded {
    pub fn image(&self) -> ImageRef<'_> {
        ImageRef {
            pixels: &self.rgb,
            width: self.width,
            height: self.height,
            channels: 3,
        }
    }

    /// What is done to this file to give it `channels`, for telling the user.
    pub fn conversion_note(&self, channels: usize) -> Option<&'static str> {
        match (self.cmyk, channels) {
            (true, 3) => Some("CMYK: converted to RGB (Pillow's convert(\"RGB\"))"),
            (true, _) => Some(
                "CMYK: converted to RGB (Pillow's convert(\"RGB\")), then to gray (Pillow's luma)",
            ),
            _ => conversion_note(self.color, channels),
        }
    }
}

const LIMITS_HINT: &str = "; IGPT_MAX_IMAGE_SIDE and IGPT_MAX_IMAGE_MB raise them";

/// Decodes a PNG or JPEG file (by its content), naming the file in any error. JPEGs are
/// decoded as Pillow decodes them ([`jpeg`]), PNGs by the `image` crate.
pub fn decode_file(path: &Path) -> Result<Decoded> {
    use std::io::{Read, Seek};
    crate::fsutil::ensure_regular_file(path)?;
    let name = path.display().to_string();
    let lim = decode_limits();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {name}"))?;
    let mut head = Vec::with_capacity(3);
    (&mut file)
        .take(3)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {name}"))?;
    file.rewind()
        .with_context(|| format!("cannot read {name}"))?;
    if jpeg::is_jpeg(&head) {
        // The whole file, but never more than the decoded image may take.
        let mut bytes = Vec::new();
        file.take(lim.max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {name}"))?;
        if bytes.len() as u64 > lim.max_bytes {
            return Err(too_large(&name, lim, LIMITS_HINT));
        }
        return decode_jpeg(&bytes, &name, lim, LIMITS_HINT);
    }
    let reader = image::ImageReader::new(std::io::BufReader::new(file));
    decode(reader, &name, lim, LIMITS_HINT)
}

/// Decodes a PNG or JPEG image held in memory (by its content, within `limits`); `name`
/// says what it is in any error.
pub fn decode_bytes(bytes: &[u8], name: &str, limits: DecodeLimits) -> Result<Decoded> {
    if jpeg::is_jpeg(bytes) {
        return decode_jpeg(bytes, name, limits, "");
    }
    decode(
        image::ImageReader::new(std::io::Cursor::new(bytes)),
        name,
        limits,
        "",
    )
}

fn too_large(name: &str, limits: DecodeLimits, hint: &str) -> anyhow::Error {
    anyhow::Error::new(TooLarge {
        name: name.to_string(),
        limits,
        hint: hint.to_string(),
    })
}

fn decode_jpeg(bytes: &[u8], name: &str, lim: DecodeLimits, hint: &str) -> Result<Decoded> {
    let img = jpeg::decode(bytes, lim.max_side, lim.max_bytes).map_err(|e| match e {
        jpeg::Error::TooLarge => too_large(name, lim, hint),
        e => anyhow::Error::new(e).context(format!("cannot decode image {name}")),
    })?;
    if img.width == 0 || img.height == 0 {
        bail!("{name} is an empty image");
    }
    let (color, cmyk) = match img.kind {
        jpeg::Kind::Gray => (image::ColorType::L8, false),
        jpeg::Kind::Rgb => (image::ColorType::Rgb8, false),
        jpeg::Kind::Cmyk => (image::ColorType::Rgb8, true),
    };
    Ok(Decoded {
        width: img.width,
        height: img.height,
        rgb: img.rgb,
        color,
        cmyk,
    })
}

/// PNG (and anything else the `image` crate recognises that is not a JPEG).
fn decode<R: std::io::BufRead + std::io::Seek>(
    reader: image::ImageReader<R>,
    name: &str,
    lim: DecodeLimits,
    hint: &str,
) -> Result<Decoded> {
    let mut reader = reader
        .with_guessed_format()
        .with_context(|| format!("cannot read {name}"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(lim.max_side);
    limits.max_image_height = Some(lim.max_side);
    limits.max_alloc = Some(lim.max_bytes);
    reader.limits(limits);
    if reader.format().is_none() {
        bail!("{name} is not a PNG or JPEG image");
    }
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => too_large(name, lim, hint),
        e => anyhow::Error::new(e).context(format!("cannot decode image {name}")),
    })?;
    let color = img.color();
    let rgb = img.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    if width == 0 || height == 0 {
        bail!("{name} is an empty image");
    }
    Ok(Decoded {
        width,
        height,
        rgb: rgb.into_raw(),
        color,
        cmyk: false,
    })
}

/// An image past the decoder's [`DecodeLimits`].
#[derive(Debug, thiserror::Error)]
#[error(
    "{name}: the image is larger than the decoder's limits ({} pixels a side, {} MB decoded{hint})",
    limits.max_side,
    limits.max_bytes >> 20
)]
pub struct TooLarge {
    pub name: String,
    pub limits: DecodeLimits,
    hint: String,
}

/// How large an image file may be once decoded.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest width or height, in pixels.
    pub max_side: u32,
    /// Largest decoded size, in bytes.
    pub max_bytes: u64,
}

/// The decoder's limits: 16,384 pixels a side and 512 MB decoded by default (a photo of
/// 100 megapixels fits), or `IGPT_MAX_IMAGE_SIDE` / `IGPT_MAX_IMAGE_MB`.
pub fn decode_limits() -> DecodeLimits {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    DecodeLimits {
        max_side: var("IGPT_MAX_IMAGE_SIDE").map_or(16_384, |v| v.min(u32::MAX as u64) as u32),
        max_bytes: var("IGPT_MAX_IMAGE_MB").map_or(512 << 20, |v| v.saturating_mul(1 << 20)),
    }
}
