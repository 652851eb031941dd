//! Colour palettes: k-means centres in [-1, 1] space that turn pixels into tokens.
//!
//! Encoding maps a pixel `p` (u8 per channel) to `p / 127.5 - 1` and takes the nearest centre
//! by squared Euclidean distance; decoding maps a centre `c` back to `rint(127.5 * (c + 1))`
//! (REFERENCE.md §2).
//!
//! [`Palette::encode`] is the only quantiser: it computes distances with the arithmetic the
//! Python source of Hugging Face's `ImageGPTImageProcessor` writes (the private `Quantiser`)
//! and takes the first centre on a tie, as the processor's `argmin` does. Its ids equal the
//! processor's on the fixture photos (`tests/encode.rs`); on exact ties it is tested against
//! that arithmetic evaluated term by term, not against numpy itself, whose BLAS may fuse
//! operations.

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
    /// `[len, channels]` centres in [-1, 1] (what the model and decoding use).
    pub centers: Vec<f32>,
    /// The centres as their source stores them (float64 in Hugging Face configs and OpenAI's
    /// `kmeans_centers.npy`): encoding needs them unrounded to pick the processor's colours.
    exact: Vec<f64>,
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

/// A pixel level as Hugging Face's processor normalises it: `float32(level * (1/255))`, then
/// `(x - 0.5) / 0.5` in float32 (the same values as the older `level / 127.5 - 1`).
pub fn normalise(level: u8) -> f32 {
    let x = (level as f64 * (1.0 / 255.0)) as f32;
    (x - 0.5) / 0.5
}

impl Palette {
    pub fn new(channels: usize, centers: Vec<f32>) -> Result<Self> {
        let exact = centers.iter().map(|&c| c as f64).collect();
        Self::with_exact(channels, centers, exact)
    }

    /// A palette from float64 centres, kept exactly for encoding (rounded to f32 for the rest).
    pub fn from_exact(channels: usize, exact: Vec<f64>) -> Result<Self> {
        let centers = exact.iter().map(|&c| c as f32).collect();
        Self::with_exact(channels, centers, exact)
    }

    fn with_exact(channels: usize, centers: Vec<f32>, exact: Vec<f64>) -> Result<Self> {
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
        // Checked on the f32 copy: a float64 too large for f32 is refused too.
        if let Some(bad) = centers.iter().find(|c| !c.is_finite()) {
            bail!("palette holds a non-finite value ({bad})");
        }
        Ok(Self {
            channels,
            centers,
            exact,
        })
    }

    /// The centres as the source stored them, `[len, channels]`.
    pub fn exact_centers(&self) -> &[f64] {
        &self.exact
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

    /// Nearest centre to one pixel (`channels` bytes); the same id as [`Palette::encode`].
    pub fn encode_pixel(&self, px: &[u8]) -> u16 {
        assert_eq!(px.len(), self.channels);
        Quantiser::new(self).nearest(px) as u16
    }

    /// Tokens for interleaved pixels (`channels` bytes each). Grayscale goes through a
    /// 256-entry table of the same search; colour through the vectorised search.
    pub fn encode(&self, pixels: &[u8]) -> Vec<u16> {
        assert_eq!(pixels.len() % self.channels, 0);
        let q = Quantiser::new(self);
        if self.channels == 1 {
            let table: Vec<u16> = (0..=255u8).map(|v| q.nearest(&[v]) as u16).collect();
            return pixels.par_iter().map(|&p| table[p as usize]).collect();
        }
        let mut out = vec![0u16; pixels.len() / 3];
        out.par_chunks_mut(1024)
            .zip(pixels.par_chunks(3 * 1024))
            .for_each(|(ids, px)| q.encode_rgb(px, ids));
        out
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
        ensure!(
            opts.k >= 1,
            "a palette needs at least 1 colour (asked for 0)"
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
            .flat_map(|(c, _)| c[..channels].iter().map(|&v| normalise(v)))
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
                Self::from_exact(a.shape[1], a.to_f64())
            }
            "json" => {
                let text = String::from_utf8(crate::fsutil::read_regular(path)?)
                    .with_context(|| format!("{} is not text", path.display()))?;
                let rows: Vec<Vec<f64>> = serde_json::from_str(&text).with_context(|| {
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
                Self::from_exact(channels, rows.into_iter().flatten().collect())
            }
            _ => bail!(
                "{}: palettes are read from .npy or .json files",
                path.display()
            ),
        };
        p.with_context(|| format!("invalid palette in {}", path.display()))
    }

    /// Saves as `.npy` (float32 `[k, c]`, float64 when the exact centres need it) or `.json`,
    /// by extension, atomically; loading gives the same exact centres back.
    pub fn save(&self, path: &Path) -> Result<()> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let shape = [self.len(), self.channels];
        let bytes = match ext {
            "npy"
                if self
                    .exact
                    .iter()
                    .zip(&self.centers)
                    .all(|(&e, &c)| e == c as f64) =>
            {
                npy::encode_f32(&shape, &self.centers)
            }
            "npy" => {
                let raw: Vec<u8> = self.exact.iter().flat_map(|v| v.to_le_bytes()).collect();
                npy::encode(&shape, npy::DType::F64, &raw)
            }
            "json" => {
                let rows: Vec<&[f64]> = self.exact.chunks(self.channels).collect();
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
}

/// Centres of one block of the quantiser's exact search.
const LANES: usize = 8;
/// Centres of one block of the quantiser's float32 screen.
const SCREEN_LANES: usize = 16;

/// Nearest centres with the arithmetic of Hugging Face's `ImageGPTImageProcessor`
/// (`color_quantize`): for a pixel `a` (normalised in float32) and a centre `b` (float64),
/// `d = |a|^2 - 2 a.b + |b|^2` with `|a|^2` summed in float32 and the rest in float64, each sum
/// left to right, and the first index among equal distances (`np.argmin`).
///
/// A grayscale palette is searched as gray triples against the pixel copied to R, G and B:
/// that is what the processor computes for the model `igpt convert --to hf` writes, so gray
/// ids agree with it too, ties included (and a 256-entry table makes it free).
///
/// Colour pixels are first screened in float32 (16 centres per step): when the nearest centre
/// beats the second by far more than float32 rounding can move a distance, it is the
/// processor's choice too; otherwise (ties, near-ties) the exact float64 search decides.
struct Quantiser {
    /// Centres by channel, each padded to whole blocks of [`LANES`] (`[3, stride]`).
    soa: Vec<f64>,
    /// `|b|^2` per centre; +inf for padding, which is therefore never nearest.
    norms: Vec<f64>,
    stride: usize,
    /// The float32 centres by channel, padded to whole [`SCREEN_LANES`] blocks far away.
    screen: Vec<f32>,
    screen_stride: usize,
    /// How far float32 rounding may move a screened distance: `(d + scale) * 2^-18` bounds it
    /// with a wide margin (a few float32 ulps of the terms summed, `scale` = the largest
    /// `sum_c (|a_c| + |b_c|)^2`; pixels are within [-1, 1]).
    scale: f32,
    channels: usize,
}

/// Relative float32 error allowed in a screened distance (32 times the few ulps it can have).
const SCREEN_TOLERANCE: f32 = 1.0 / (1u32 << 18) as f32;

impl Quantiser {
    fn new(p: &Palette) -> Self {
        let k = p.len();
        let stride = k.next_multiple_of(LANES);
        let mut soa = vec![0.0f64; 3 * stride];
        let mut norms = vec![f64::INFINITY; stride];
        let screen_stride = k.next_multiple_of(SCREEN_LANES);
        // Padding lanes are infinitely far: never nearest (the comparisons are strict), whatever
        // the real centres are.
        let mut screen = vec![f32::INFINITY; 3 * screen_stride];
        let mut scale = 0.0f32;
        for (i, c) in p.exact.chunks_exact(p.channels).enumerate() {
            let b = if p.channels == 1 {
                [c[0]; 3]
            } else {
                [c[0], c[1], c[2]]
            };
            for (ch, &v) in b.iter().enumerate() {
                soa[ch * stride + i] = v;
                screen[ch * screen_stride + i] = v as f32;
            }
            norms[i] = b[0] * b[0] + b[1] * b[1] + b[2] * b[2];
            scale = scale.max(b.iter().map(|&v| (1.0 + v.abs() as f32).powi(2)).sum());
        }
        Self {
            soa,
            norms,
            stride,
            screen,
            screen_stride,
            scale,
            channels: p.channels,
        }
    }

    /// Nearest centre to one pixel (`channels` bytes), by the exact search.
    fn nearest(&self, px: &[u8]) -> usize {
        let rgb = if self.channels == 1 {
            [px[0]; 3]
        } else {
            [px[0], px[1], px[2]]
        };
        self.nearest_exact(rgb)
    }

    /// Ids of RGB pixels into `ids`, compiled for AVX-512 and AVX2 as well as the baseline and
    /// chosen at run time (the release binary targets plain x86-64). None of them fuses
    /// multiply-adds (Rust never contracts `a * b + c`), so all give the same ids.
    fn encode_rgb(&self, pixels: &[u8], ids: &mut [u16]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F, the feature `encode_rgb_avx512` enables.
                return unsafe { self.encode_rgb_avx512(pixels, ids) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, the feature `encode_rgb_avx2` enables.
                return unsafe { self.encode_rgb_avx2(pixels, ids) };
            }
        }
        self.encode_rgb_portable(pixels, ids)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn encode_rgb_avx512(&self, pixels: &[u8], ids: &mut [u16]) {
        self.encode_rgb_portable(pixels, ids)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn encode_rgb_avx2(&self, pixels: &[u8], ids: &mut [u16]) {
        self.encode_rgb_portable(pixels, ids)
    }

    #[inline(always)]
    fn encode_rgb_portable(&self, pixels: &[u8], ids: &mut [u16]) {
        for (id, px) in ids.iter_mut().zip(pixels.chunks_exact(3)) {
            let rgb = [px[0], px[1], px[2]];
            *id = match self.screened(rgb) {
                Some(i) => i,
                None => self.nearest_exact(rgb),
            } as u16;
        }
    }

    /// The nearest centre by float32 distances when the second nearest is clearly farther
    /// (so the exact search would pick it too); `None` when rounding might decide.
    #[inline(always)]
    fn screened(&self, rgb: [u8; 3]) -> Option<usize> {
        let a = rgb.map(normalise);
        let s = self.screen_stride;
        let mut best_d = [f32::INFINITY; SCREEN_LANES];
        let mut second_d = [f32::INFINITY; SCREEN_LANES];
        let mut best_i = [0u32; SCREEN_LANES];
        for k0 in (0..s).step_by(SCREEN_LANES) {
            let mut d = [0.0f32; SCREEN_LANES];
            for (ch, &av) in a.iter().enumerate() {
                let row: &[f32; SCREEN_LANES] = self.screen
                    [ch * s + k0..ch * s + k0 + SCREEN_LANES]
                    .try_into()
                    .expect("whole block");
                for l in 0..SCREEN_LANES {
                    let t = row[l] - av;
                    d[l] += t * t;
                }
            }
            for l in 0..SCREEN_LANES {
                let nearer = d[l] < best_d[l];
                second_d[l] = if nearer {
                    best_d[l]
                } else if d[l] < second_d[l] {
                    d[l]
                } else {
                    second_d[l]
                };
                best_i[l] = if nearer { (k0 + l) as u32 } else { best_i[l] };
                best_d[l] = if nearer { d[l] } else { best_d[l] };
            }
        }
        let mut lane = 0;
        for l in 1..SCREEN_LANES {
            if best_d[l] < best_d[lane] {
                lane = l;
            }
        }
        let best = best_d[lane];
        let mut second = f32::INFINITY;
        for l in 0..SCREEN_LANES {
            second = second.min(second_d[l]);
            if l != lane {
                second = second.min(best_d[l]);
            }
        }
        // NaN or infinite distances fail the test and go to the exact search.
        let margin = (best + second + 2.0 * self.scale) * SCREEN_TOLERANCE;
        (second - best > margin).then_some(best_i[lane] as usize)
    }

    /// Each lane keeps its first minimum (strict `<`, indices rising); the lowest index among
    /// the lanes' equal minima is then the first overall, as `np.argmin` gives.
    fn nearest_exact(&self, rgb: [u8; 3]) -> usize {
        let a = rgb.map(normalise);
        let a_norm = (a[0] * a[0] + a[1] * a[1] + a[2] * a[2]) as f64;
        let a = a.map(|x| x as f64);
        let s = self.stride;
        let mut best_d = [f64::INFINITY; LANES];
        let mut best_i = [0usize; LANES];
        for k0 in (0..s).step_by(LANES) {
            let lanes = |ch: usize| -> &[f64; LANES] {
                self.soa[ch * s + k0..ch * s + k0 + LANES]
                    .try_into()
                    .expect("whole block")
            };
            let (b0, b1, b2) = (lanes(0), lanes(1), lanes(2));
            let norms: &[f64; LANES] = self.norms[k0..k0 + LANES].try_into().expect("whole block");
            for l in 0..LANES {
                let ab = a[0] * b0[l] + a[1] * b1[l] + a[2] * b2[l];
                let d = a_norm - 2.0 * ab + norms[l];
                if d < best_d[l] {
                    best_d[l] = d;
                    best_i[l] = k0 + l;
                }
            }
        }
        let mut best = (best_d[0], best_i[0]);
        for l in 1..LANES {
            if best_d[l] < best.0 || (best_d[l] == best.0 && best_i[l] < best.1) {
                best = (best_d[l], best_i[l]);
            }
        }
        best.1
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
