//! Image grids: token images laid out in rows and columns, scaled up with nearest neighbour
//! so small images stay crisp.

use crate::palette::Palette;
use anyhow::{Context, Result, ensure};
use image::{Rgb, RgbImage};
use std::path::Path;

/// The picture of one token image (`side * side` tokens), as RGB.
pub fn tokens_to_image(palette: &Palette, tokens: &[u16], side: usize) -> Result<RgbImage> {
    ensure!(
        tokens.len() == side * side,
        "{} tokens do not make a {side}x{side} image",
        tokens.len()
    );
    let px = palette.decode(tokens)?;
    let rgb: Vec<u8> = if palette.channels == 1 {
        px.iter().flat_map(|&v| [v, v, v]).collect()
    } else {
        px
    };
    RgbImage::from_raw(side as u32, side as u32, rgb).context("image size")
}

/// The prefix of an image with the rest blanked out: what a completion starts from.
pub fn occluded(palette: &Palette, tokens: &[u16], side: usize, keep: usize) -> Result<RgbImage> {
    let mut img = tokens_to_image(palette, tokens, side)?;
    for (i, p) in img.pixels_mut().enumerate() {
        if i >= keep {
            // A checkerboard of two grays marks the missing part.
            let (x, y) = (i % side, i / side);
            *p = if (x / 2 + y / 2) % 2 == 0 {
                Rgb([96, 96, 110])
            } else {
                Rgb([128, 128, 140])
            };
        }
    }
    Ok(img)
}

/// Lays `tiles` (all the same size) out `cols` per row, each scaled by `scale`, with a gap of
/// `pad` pixels, and writes a PNG.
pub fn save_grid(path: &Path, tiles: &[RgbImage], cols: usize, scale: u32, pad: u32) -> Result<()> {
    ensure!(!tiles.is_empty() && cols > 0, "nothing to draw");
    let (w, h) = tiles[0].dimensions();
    ensure!(
        tiles.iter().all(|t| t.dimensions() == (w, h)),
        "grid tiles differ in size"
    );
    let rows = tiles.len().div_ceil(cols) as u32;
    let cols = cols.min(tiles.len()) as u32;
    let (tw, th) = (w * scale, h * scale);
    let mut out = RgbImage::from_pixel(
        cols * (tw + pad) + pad,
        rows * (th + pad) + pad,
        Rgb([255, 255, 255]),
    );
    for (i, t) in tiles.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        let (x0, y0) = (pad + c * (tw + pad), pad + r * (th + pad));
        for y in 0..th {
            for x in 0..tw {
                out.put_pixel(x0 + x, y0 + y, *t.get_pixel(x / scale, y / scale));
            }
        }
    }
    let tmp = path.with_extension("tmp.png");
    out.save(&tmp)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A scale that makes a tile about 128 pixels wide.
pub fn auto_scale(side: usize) -> u32 {
    (128 / side.max(1)).clamp(1, 16) as u32
}
