//! bfloat16 storage for inference: weights packed for products, and the conversions.
//!
//! Generating a token reads every weight once, so its speed is the memory bandwidth over the
//! weights' bytes; halving those bytes is what makes decoding faster. Products keep f32
//! accumulation: with AVX-512 BF16 one `vdpbf16ps` multiplies 16 pairs of bf16 values and adds
//! them to 16 f32 sums, which is why a packed weight interleaves pairs of its rows. Only the
//! weights are rounded: each input is split into a bf16 high part and a bf16 remainder, both
//! multiplied, so the input keeps 16 bits of its 24 (rounding the inputs as well would double
//! the error, for arithmetic that is not the limit here).

use super::matmul::SendPtr;
use crate::backend::Op;
use rayon::prelude::*;

/// Columns per panel of a packed weight (one 512-bit register of f32 sums).
const PANEL: usize = 16;
/// Panels one parallel task covers.
const GROUP: usize = 4;
/// Rows one parallel task covers (its panels stay in the L1/L2 cache meanwhile).
const ROW_BLOCK: usize = 64;

/// bf16 bits of `x`, rounded to nearest even.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// The f32 value of bf16 bits (exact).
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Whether this CPU multiplies bf16 pairs natively (`vdpbf16ps`).
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Elements of a packed `[k, n]` weight: `[ceil(n / 16)][ceil(k / 2)][16][2]`, zero-padded.
pub fn packed_len(k: usize, n: usize) -> usize {
    k.div_ceil(2) * 2 * n.next_multiple_of(PANEL)
}

/// Elements of the bf16 split of `[m, k]` inputs that [`matmul`] needs as scratch.
pub fn input_scratch_len(m: usize, k: usize) -> usize {
    m * k.div_ceil(2) * 4
}

/// Packs the f32 weight `w` (`[k, n]`, or `[n, k]` with `Op::T`) into `dst` for [`matmul`].
pub fn pack(dst: &mut [u16], w: &[f32], op: Op, k: usize, n: usize) {
    assert_eq!(w.len(), k * n, "pack: the weight has the wrong size");
    assert_eq!(
        dst.len(),
        packed_len(k, n),
        "pack: the destination has the wrong size"
    );
    let k2 = k.div_ceil(2);
    dst.par_chunks_mut(k2 * 2 * PANEL)
        .enumerate()
        .for_each(|(p, panel)| {
            for (i, pair) in panel.chunks_mut(2 * PANEL).enumerate() {
                for lane in 0..PANEL {
                    let c = p * PANEL + lane;
                    for s in 0..2 {
                        let r = 2 * i + s;
                        pair[2 * lane + s] = if c < n && r < k {
                            to_bf16(match op {
                                Op::N => w[r * n + c],
                                Op::T => w[c * k + r],
                            })
                        } else {
                            0
                        };
                    }
                }
            }
        });
}

/// `out[m, n] (+)= x[m, k] @ w` with `w` packed by [`pack`]. `x` is split into bf16 high and
/// low parts in `scratch` (at least [`input_scratch_len`] elements); products accumulate in
/// f32. With
/// `native`, the AVX-512 BF16 kernel runs (the caller checked [`native`]); otherwise a
/// portable loop computes the same products.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    x: &[f32],
    w: &[u16],
    scratch: &mut [u16],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    native: bool,
) {
    assert_eq!(out.len(), m * n, "packed matmul: output has the wrong size");
    assert_eq!(x.len(), m * k, "packed matmul: input has the wrong size");
    assert_eq!(
        w.len(),
        packed_len(k, n),
        "packed matmul: weight has the wrong size"
    );
    assert!(
        scratch.len() >= input_scratch_len(m, k),
        "packed matmul: scratch too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    let k2 = k.div_ceil(2);
    // Each row: its high parts (k2 pairs), then its low parts.
    let xs = &mut scratch[..m * k2 * 4];
    let convert = |(row, dst): (&[f32], &mut [u16])| {
        let (hi, lo) = dst.split_at_mut(k2 * 2);
        for ((h, l), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(row) {
            *h = to_bf16(v);
            *l = to_bf16(v - from_bf16(*h));
        }
        if k % 2 == 1 {
            hi[k] = 0;
            lo[k] = 0;
        }
    };
    if m * k >= 1 << 16 {
        x.par_chunks(k)
            .zip(xs.par_chunks_mut(k2 * 4))
            .for_each(convert);
    } else {
        x.chunks(k).zip(xs.chunks_mut(k2 * 4)).for_each(convert);
    }
    let xs: &[u16] = xs;
    let panels = n.div_ceil(PANEL);
    let groups = panels.div_ceil(GROUP);
    let row_blocks = m.div_ceil(ROW_BLOCK);
    let out_p = SendPtr(out.as_mut_ptr());
    let use_native = native && self::native();
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        let (r0, r1) = (rb * ROW_BLOCK, ((rb + 1) * ROW_BLOCK).min(m));
        let (p0, p1) = (g * GROUP, ((g + 1) * GROUP).min(panels));
        let tile = Tile {
            x: &xs[r0 * k2 * 4..r1 * k2 * 4],
            w: &w[p0 * k2 * 2 * PANEL..p1 * k2 * 2 * PANEL],
            k2,
            rows: r1 - r0,
            col0: p0 * PANEL,
            n,
            accumulate,
        };
        // SAFETY: rows r0..r1 and columns p0*16..p1*16 (clipped to n) of `out` belong to this
        // task alone; `tile.write` touches no others and stays inside `out` (m * n elements).
        let out_rows = unsafe { out_p.get().add(r0 * n) };
        if use_native {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `native()` confirmed AVX-512F and AVX-512 BF16 on this CPU.
            unsafe {
                tile.run_avx512(out_rows)
            };
        } else {
            tile.run_portable(out_rows);
        }
    });
}

/// One task's share of a packed product: a block of rows times a group of panels.
struct Tile<'a> {
    /// The rows' bf16 inputs, `[rows][hi, lo][2 * k2]`.
    x: &'a [u16],
    /// The group's panels, `[panels][k2][16][2]`.
    w: &'a [u16],
    k2: usize,
    rows: usize,
    /// First output column of the group, and the output row length.
    col0: usize,
    n: usize,
    accumulate: bool,
}

impl Tile<'_> {
    fn panels(&self) -> usize {
        self.w.len() / (self.k2 * 2 * PANEL)
    }

    /// Writes `sums` (16 columns of one row) to output row `r`, panel `p` of the group.
    ///
    /// # Safety
    /// `out` must point at row 0 of this tile's rows of an output with `n` columns, of which
    /// this tile owns its columns.
    #[inline(always)]
    unsafe fn write(&self, out: *mut f32, r: usize, p: usize, sums: &[f32; PANEL]) {
        let c0 = self.col0 + p * PANEL;
        let valid = PANEL.min(self.n.saturating_sub(c0));
        for (l, &s) in sums.iter().enumerate().take(valid) {
            // SAFETY: column c0 + l < n of row r, inside this tile's part of the output.
            let o = unsafe { &mut *out.add(r * self.n + c0 + l) };
            *o = if self.accumulate { *o + s } else { s };
        }
    }

    fn run_portable(&self, out: *mut f32) {
        let (k2, panel_len) = (self.k2, self.k2 * 2 * PANEL);
        for p in 0..self.panels() {
            let panel = &self.w[p * panel_len..(p + 1) * panel_len];
            for r in 0..self.rows {
                let x = &self.x[r * 4 * k2..(r + 1) * 4 * k2];
                let sums = panel_dot(&x[..2 * k2], &x[2 * k2..], panel);
                // SAFETY: forwarded from `matmul`, which owns these rows and columns for us.
                unsafe { self.write(out, r, p, &sums) };
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F and AVX-512 BF16; `out` as for [`Tile::write`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn run_avx512(&self, out: *mut f32) {
        let panels = self.panels();
        let mut r = 0;
        while r < self.rows {
            let left = self.rows - r;
            // Up to 16 sums in registers: 8 rows x 2 panels, or up to 4 rows x 4 panels.
            let rows = if left >= 8 { 8 } else { left.min(4) };
            let mut p = 0;
            while p < panels {
                let wide = panels - p >= 4;
                // SAFETY: rows r..r+rows and the panels each call takes exist in this tile;
                // the CPU features are the caller's contract.
                p += unsafe {
                    match (rows, wide, panels - p >= 2) {
                        (8, _, true) => self.block::<8, 2>(out, r, p),
                        (8, _, false) => self.block::<8, 1>(out, r, p),
                        (4, true, _) => self.block::<4, 4>(out, r, p),
                        (3, true, _) => self.block::<3, 4>(out, r, p),
                        (2, true, _) => self.block::<2, 4>(out, r, p),
                        (1, true, _) => self.block::<1, 4>(out, r, p),
                        (4, false, _) => self.block::<4, 1>(out, r, p),
                        (3, false, _) => self.block::<3, 1>(out, r, p),
                        (2, false, _) => self.block::<2, 1>(out, r, p),
                        _ => self.block::<1, 1>(out, r, p),
                    }
                };
            }
            r += rows;
        }
    }

    /// Rows `r0..r0 + R` times panels `p0..p0 + P`; returns `P`.
    ///
    /// # Safety
    /// As for [`Tile::run_avx512`], and those rows and panels must exist in this tile.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn block<const R: usize, const P: usize>(
        &self,
        out: *mut f32,
        r0: usize,
        p0: usize,
    ) -> usize {
        use std::arch::x86_64::*;
        debug_assert!(r0 + R <= self.rows && p0 + P <= self.panels());
        let k2 = self.k2;
        let panel_len = k2 * 2 * PANEL;
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        let x = self.x.as_ptr() as *const u32;
        let w = self.w.as_ptr();
        for i in 0..k2 {
            let mut wv = [_mm512_setzero_si512(); P];
            for (p, v) in wv.iter_mut().enumerate() {
                // SAFETY: panel p0 + p < panels, pair i < k2: 32 elements inside `self.w`.
                *v = unsafe {
                    _mm512_loadu_si512(w.add((p0 + p) * panel_len + i * 2 * PANEL) as *const _)
                };
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: row r0 + r < rows, pair i < k2: both parts inside `self.x` (read as
                // u32 pairs).
                let (hi, lo) = unsafe {
                    let row = x.add((r0 + r) * 2 * k2 + i);
                    (row.read_unaligned(), row.add(k2).read_unaligned())
                };
                let (hi, lo) = (
                    bf16x32(_mm512_set1_epi32(hi as i32)),
                    bf16x32(_mm512_set1_epi32(lo as i32)),
                );
                for (a, &v) in acc_r.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(_mm512_dpbf16_ps(*a, lo, bf16x32(v)), hi, bf16x32(v));
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (p, a) in acc_r.iter().enumerate() {
                let mut sums = [0.0f32; PANEL];
                // SAFETY: `sums` holds 16 floats.
                unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), *a) };
                // SAFETY: forwarded from the caller.
                unsafe { self.write(out, r0 + r, p0 + p, &sums) };
            }
        }
        P
    }
}

/// Reinterprets 32 packed bf16 values for `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bf16x32(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both are 64-byte plain vector types; every bit pattern is valid for each.
    unsafe { std::mem::transmute(v) }
}

super::simd::dispatch! {
    /// Sums of one row's inputs (bf16 high and low parts) against one panel `[k2][16][2]`
    /// (the portable path).
    pub fn panel_dot(hi: &[u16], lo: &[u16], panel: &[u16]) -> [f32; PANEL] {
        let mut acc = [0.0f32; PANEL];
        for ((h, l), w) in hi.chunks_exact(2).zip(lo.chunks_exact(2)).zip(panel.chunks_exact(2 * PANEL)) {
            let (x0, x1) = (from_bf16(h[0]) + from_bf16(l[0]), from_bf16(h[1]) + from_bf16(l[1]));
            for l in 0..PANEL {
                acc[l] += x0 * from_bf16(w[2 * l]) + x1 * from_bf16(w[2 * l + 1]);
            }
        }
        acc
    }
}
