//! Colour palettes: k-means centres in [-1, 1] space that turn pixels into tokens.
//!
//! Encoding maps a pixel `p` (u8 per channel) to `p / 127.5 - 1` and takes the nearest centre
//! by squared Euclidean distance; decoding maps a centre `c` back to `rint(127.5 * (c + 1))`
//! (REFERENCE.md §2).

use crate::backend::cpu::simd;
use crate::npy;
use anyhow::{Context, Result, bail, ensure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Palette {
    /// Values per colour: 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// `[len, channels]` centres in [-1, 1].
    pub centers: Vec<f32>,
}

/// Options for [`Palette::fit`].
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub k: usize,
    pub iterations: usize,
    /// Pixels sampled from the data before clustering (0: use them all).
    pub sample: usize,
    pub seed: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            k: 512,
            iterations: 30,
            sample: 1_000_000,
            seed: 0,
        }
    }
}

fn to_unit(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

impl Palette {
    pub fn new(channels: usize, centers: Vec<f32>) -> Result<Self> {
        ensure!(
            channels == 1 || channels == 3,
            "a palette has 1 or 3 channels (got {channels})"
        );
        ensure!(
            !centers.is_empty() && centers.len().is_multiple_of(channels),
            "palette data is not a whole number of colours"
        );
        ensure!(
            centers.len() / channels <= 65536,
            "palettes are limited to 65536 colours"
        );
        if let Some(bad) = centers.iter().find(|c| !c.is_finite()) {
            bail!("palette holds a non-finite value ({bad})");
        }
        Ok(Self { channels, centers })
    }

    pub fn len(&self) -> usize {
        self.centers.len() / self.channels
    }

    pub fn is_empty(&self) -> bool {
        self.centers.is_empty()
    }

    pub fn center(&self, i: usize) -> &[f32] {
        &self.centers[i * self.channels..(i + 1) * self.channels]
    }

    /// Evenly spaced gray levels (a simple 1-channel palette).
    pub fn uniform_gray(levels: usize) -> Result<Self> {
        ensure!(levels >= 2, "a palette needs at least two levels");
        let centers = (0..levels)
            .map(|i| -1.0 + 2.0 * i as f32 / (levels - 1) as f32)
            .collect();
        Self::new(1, centers)
    }

    /// Nearest centre to one pixel (`channels` bytes).
    pub fn encode_pixel(&self, px: &[u8]) -> u16 {
        let idx = CenterIndex::new(&self.centers, self.channels);
        idx.nearest_pixel(px) as u16
    }

    /// Tokens for interleaved pixels (`channels` bytes each). Grayscale goes through a
    /// 256-entry table; colour through a vectorised nearest-centre search.
    pub fn encode(&self, pixels: &[u8]) -> Vec<u16> {
        assert_eq!(pixels.len() % self.channels, 0);
        let idx = CenterIndex::new(&self.centers, self.channels);
        if self.channels == 1 {
            let table: Vec<u16> = (0..=255u8)
                .map(|v| idx.nearest_pixel(&[v]) as u16)
                .collect();
            return pixels.par_iter().map(|&p| table[p as usize]).collect();
        }
        pixels
            .par_chunks(self.channels * 1024)
            .flat_map_iter(|c| {
                c.chunks_exact(self.channels)
                    .map(|px| idx.nearest_pixel(px) as u16)
            })
            .collect()
    }

    /// Pixels for tokens; ids outside the palette are an error.
    pub fn decode(&self, tokens: &[u16]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(tokens.len() * self.channels);
        for &t in tokens {
            ensure!(
                (t as usize) < self.len(),
                "token id {t} is outside the palette of {} colours",
                self.len()
            );
            for &c in self.center(t as usize) {
                out.push((127.5 * (c + 1.0)).round_ties_even().clamp(0.0, 255.0) as u8);
            }
        }
        Ok(out)
    }

    /// k-means (k-means++ seeding, Lloyd iterations) over the pixels' colours in [-1, 1]
    /// space. Identical colours are merged with weights first, so the work scales with the
    /// number of distinct colours. Deterministic for a given seed.
    pub fn fit(pixels: &[u8], channels: usize, opts: &FitOptions) -> Result<Self> {
        ensure!(
            channels == 1 || channels == 3,
            "a palette has 1 or 3 channels (got {channels})"
        );
        ensure!(
            pixels.len().is_multiple_of(channels) && !pixels.is_empty(),
            "no pixels to fit a palette on"
        );
        let n_px = pixels.len() / channels;
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        // Sample pixels, then count distinct colours (sorted, so the order is deterministic).
        let mut counts: HashMap<[u8; 3], u32> = HashMap::new();
        let take = if opts.sample == 0 || opts.sample >= n_px {
            n_px
        } else {
            opts.sample
        };
        for s in 0..take {
            let i = if take == n_px {
                s
            } else {
                rng.random_range(0..n_px)
            };
            let mut key = [0u8; 3];
            key[..channels].copy_from_slice(&pixels[i * channels..(i + 1) * channels]);
            *counts.entry(key).or_default() += 1;
        }
        let mut colours: Vec<([u8; 3], u32)> = counts.into_iter().collect();
        colours.sort_unstable();
        ensure!(
            colours.len() >= opts.k,
            "the data has only {} distinct colours in the sample, fewer than the {} requested: choose a smaller palette",
            colours.len(),
            opts.k
        );
        let points: Vec<f32> = colours
            .iter()
            .flat_map(|(c, _)| c[..channels].iter().map(|&v| to_unit(v)))
            .collect();
        let weights: Vec<f64> = colours.iter().map(|&(_, w)| w as f64).collect();
        let centers = kmeans(
            &points,
            &weights,
            channels,
            opts.k,
            opts.iterations,
            &mut rng,
        );
        Self::new(channels, centers)
    }

    /// Loads a palette: `.npy` (`[k, c]` float, OpenAI's `kmeans_centers.npy`) or `.json`
    /// (a list of colours, each a list of `c` numbers in [-1, 1]).
    pub fn load(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let p = match ext {
            "npy" => {
                let a = npy::read(path)?;
                ensure!(
                    a.shape.len() == 2 && (a.shape[1] == 1 || a.shape[1] == 3),
                    "{}: a palette array must have shape [k, 1] or [k, 3], found {:?}",
                    path.display(),
                    a.shape
                );
                ensure!(
                    matches!(a.dtype, npy::DType::F32 | npy::DType::F64),
                    "{}: palette centres must be float32 or float64, found {:?}",
                    path.display(),
                    a.dtype
                );
                Self::new(
                    a.shape[1],
                    a.to_f64().into_iter().map(|v| v as f32).collect(),
                )
            }
            "json" => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let rows: Vec<Vec<f32>> = serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{}: expected a JSON list of colours like [[-1.0, 0.5, 0.2], ...]",
                        path.display()
                    )
                })?;
                let channels = rows.first().map_or(0, |r| r.len());
                ensure!(
                    rows.iter().all(|r| r.len() == channels),
                    "{}: colours have different lengths",
                    path.display()
                );
                Self::new(channels, rows.into_iter().flatten().collect())
            }
            _ => bail!(
                "{}: palettes are read from .npy or .json files",
                path.display()
            ),
        };
        p.with_context(|| format!("invalid palette in {}", path.display()))
    }

    /// Saves as `.npy` (float32 `[k, c]`) or `.json`, by extension, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let bytes = match ext {
            "npy" => npy::encode_f32(&[self.len(), self.channels], &self.centers),
            "json" => {
                let rows: Vec<&[f32]> = self.centers.chunks(self.channels).collect();
                serde_json::to_vec(&rows)?
            }
            _ => bail!("{}: palettes are written as .npy or .json", path.display()),
        };
        crate::fsutil::write_atomic(path, &bytes)
    }
}

/// Centres laid out channel-major and padded to whole SIMD blocks, for nearest-centre search.
struct CenterIndex {
    soa: Vec<f32>,
    stride: usize,
}

impl CenterIndex {
    fn new(centers: &[f32], c: usize) -> Self {
        let k = centers.len() / c;
        let stride = k.next_multiple_of(16);
        // Padding centres sit far outside [-1, 1], so they are never nearest.
        let mut soa = vec![1e6f32; c * stride];
        for (i, ctr) in centers.chunks_exact(c).enumerate() {
            for ch in 0..c {
                soa[ch * stride + i] = ctr[ch];
            }
        }
        Self { soa, stride }
    }

    fn nearest(&self, p: &[f32]) -> (usize, f32) {
        simd::nearest_center(&self.soa, self.stride, p)
    }

    fn nearest_pixel(&self, px: &[u8]) -> usize {
        let mut p = [0.0f32; 3];
        for (d, &v) in p.iter_mut().zip(px) {
            *d = to_unit(v);
        }
        self.nearest(&p[..px.len()]).0
    }
}

/// Weighted k-means; returns `[k, c]` centres.
fn kmeans(
    points: &[f32],
    weights: &[f64],
    c: usize,
    k: usize,
    iterations: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let n = weights.len();
    // k-means++ seeding: each next centre drawn with probability proportional to w * D^2.
    let first = pick_weighted(weights, rng.random::<f64>());
    let mut centers: Vec<f32> = points[first * c..(first + 1) * c].to_vec();
    let mut d2: Vec<f64> = (0..n)
        .map(|i| dist2(&points[i * c..(i + 1) * c], &centers[..c]))
        .collect();
    while centers.len() < k * c {
        let w: Vec<f64> = d2.iter().zip(weights).map(|(d, w)| d * w).collect();
        let next = pick_weighted(&w, rng.random::<f64>());
        let ctr = points[next * c..(next + 1) * c].to_vec();
        d2.par_iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = d.min(dist2(&points[i * c..(i + 1) * c], &ctr)));
        centers.extend_from_slice(&ctr);
    }
    // Lloyd iterations; sums are accumulated per fixed chunk and added in order.
    const CHUNK: usize = 4096;
    for _ in 0..iterations {
        let index = CenterIndex::new(&centers, c);
        let assign: Vec<(usize, f32)> = (0..n)
            .into_par_iter()
            .map(|i| index.nearest(&points[i * c..(i + 1) * c]))
            .collect();
        let partial: Vec<Vec<f64>> = (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|ch| {
                let mut acc = vec![0.0f64; k * (c + 1)];
                for i in ch * CHUNK..((ch + 1) * CHUNK).min(n) {
                    let (j, _) = assign[i];
                    for ci in 0..c {
                        acc[j * (c + 1) + ci] += weights[i] * points[i * c + ci] as f64;
                    }
                    acc[j * (c + 1) + c] += weights[i];
                }
                acc
            })
            .collect();
        let mut acc = vec![0.0f64; k * (c + 1)];
        for p in &partial {
            for (a, v) in acc.iter_mut().zip(p) {
                *a += v;
            }
        }
        let mut moved = false;
        let mut taken = vec![false; n];
        for j in 0..k {
            let wsum = acc[j * (c + 1) + c];
            if wsum > 0.0 {
                for ci in 0..c {
                    let v = (acc[j * (c + 1) + ci] / wsum) as f32;
                    moved |= v != centers[j * c + ci];
                    centers[j * c + ci] = v;
                }
            } else {
                // Empty cluster: re-seed it at the point that is worst served now.
                let far = (0..n)
                    .filter(|&i| !taken[i])
                    .max_by(|&a, &b| {
                        (assign[a].1 as f64 * weights[a])
                            .total_cmp(&(assign[b].1 as f64 * weights[b]))
                            .then(b.cmp(&a))
                    })
                    .unwrap_or(0);
                taken[far] = true;
                centers[j * c..(j + 1) * c].copy_from_slice(&points[far * c..(far + 1) * c]);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    centers
}

fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) * (x - y)) as f64)
        .sum()
}

fn pick_weighted(w: &[f64], u: f64) -> usize {
    let total: f64 = w.iter().sum();
    if total <= 0.0 {
        return 0;
    }
    let mut target = u * total;
    for (i, &x) in w.iter().enumerate() {
        if target < x {
            return i;
        }
        target -= x;
    }
    w.iter().rposition(|&x| x > 0.0).unwrap_or(0)
}
