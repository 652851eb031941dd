//! Vectorisable inner loops, compiled for AVX-512 and AVX2 as well as the baseline and chosen
//! at run time (the release binary targets plain x86-64, so it runs on any machine).
//!
//! Each loop is written over fixed 16-lane chunks so the compiler turns it into SIMD code; the
//! exponential is a polynomial rather than a libm call, which would not vectorise.

/// Generates `pub fn $name` that calls the best compiled copy of `$body` for this CPU.
macro_rules! dispatch {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports every feature `v4` was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports every feature `v3` was compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

pub(crate) use dispatch;

const LANES: usize = 16;

/// How a cache element is stored: f32 as it is, or a `u16` holding bfloat16 bits.
pub trait Stored: Copy + Send + Sync + 'static {
    fn load(self) -> f32;
    fn store(x: f32) -> Self;
    /// [`attend`] over a cache of this element type.
    fn attend(
        out: &mut [f32],
        q: &[f32],
        keys_t: &[Self],
        values: &[Self],
        scores: &mut [f32],
        len: usize,
        scale: f32,
    );
}

impl Stored for f32 {
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
    fn attend(
        out: &mut [f32],
        q: &[f32],
        keys_t: &[Self],
        values: &[Self],
        scores: &mut [f32],
        len: usize,
        scale: f32,
    ) {
        attend(out, q, keys_t, values, scores, len, scale)
    }
}

impl Stored for u16 {
    #[inline(always)]
    fn load(self) -> f32 {
        super::bf16::from_bf16(self)
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        super::bf16::to_bf16(x)
    }
    fn attend(
        out: &mut [f32],
        q: &[f32],
        keys_t: &[Self],
        values: &[Self],
        scores: &mut [f32],
        len: usize,
        scale: f32,
    ) {
        attend_bf16(out, q, keys_t, values, scores, len, scale)
    }
}

/// `e^x` to about 2 ulp for x in [-87, 88]; outside it, the value at the nearer end (so below
/// −87 about 1.6e-38, never 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest via the 1.5 * 2^23 trick (vectorises, unlike f32::round).
    let shifted = x * LOG2E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // The low mantissa bits of `shifted` hold n itself; reading them avoids a float-to-int
    // cast, which Rust saturates and the compiler then cannot vectorise.
    let bits = shifted
        .to_bits()
        .wrapping_sub(0x4B40_0000)
        .wrapping_add(127)
        << 23;
    p * f32::from_bits(bits)
}

/// [`exp`], but 0 below −87 (NaN stays NaN).
#[inline(always)]
fn exp_or_zero(x: f32) -> f32 {
    let e = exp(x);
    if x < -87.0 { 0.0 } else { e }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

dispatch! {
    /// Largest element (−∞ for an empty slice).
    pub fn max(x: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in lanes.iter().chain(tail) {
            if v > m {
                m = v;
            }
        }
        m
    }
}

dispatch! {
    /// `x[i] = e^(x[i] - shift)`; returns the sum of the results.
    pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let mut lanes = [0.0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = exp(c[i] - shift);
                lanes[i] += c[i];
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - shift);
            sum += *v;
        }
        sum
    }
}

dispatch! {
    /// `out[i] = e^((x[i] - shift) * scale)`, exactly 0 where the exponent is below −87 (as
    /// libm's underflows, where [`exp`] would floor it at e^−87, so that a colour of −∞ or of
    /// no probability is never drawn); returns the sum of the results, added in the same order
    /// on every machine.
    pub fn exp_scaled(out: &mut [f32], x: &[f32], shift: f32, scale: f32) -> f32 {
        assert_eq!(out.len(), x.len());
        let mut lanes = [0.0f32; LANES];
        let mut outs = out.chunks_exact_mut(LANES);
        let mut xs = x.chunks_exact(LANES);
        for (o, c) in (&mut outs).zip(&mut xs) {
            for i in 0..LANES {
                o[i] = exp_or_zero((c[i] - shift) * scale);
                lanes[i] += o[i];
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for (o, &v) in outs.into_remainder().iter_mut().zip(xs.remainder()) {
            *o = exp_or_zero((v - shift) * scale);
            sum += *o;
        }
        sum
    }
}

dispatch! {
    /// Sum of `e^(x[i] - shift)`, leaving `x` as it is.
    pub fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
        let mut lanes = [0.0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                lanes[i] += exp(c[i] - shift);
            }
        }
        lanes.iter().sum::<f32>() + tail.iter().map(|&v| exp(v - shift)).sum::<f32>()
    }
}

dispatch! {
    /// `x[i] *= s`.
    pub fn scale(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

dispatch! {
    /// Sum of `a[i] * b[i]`.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let mut lanes = [0.0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ta, tb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                lanes[i] += x[i] * y[i];
            }
        }
        lanes.iter().sum::<f32>() + ta.iter().zip(tb).map(|(x, y)| x * y).sum::<f32>()
    }
}

dispatch! {
    /// `ds[i] = p[i] * (ds[i] - c)`: the softmax backward for one row.
    pub fn softmax_grad(ds: &mut [f32], p: &[f32], c: f32) {
        assert_eq!(ds.len(), p.len());
        for (d, &p) in ds.iter_mut().zip(p) {
            *d = p * (*d - c);
        }
    }
}

dispatch! {
    /// `acc[i] += x[i]`.
    pub fn add_assign(acc: &mut [f32], x: &[f32]) {
        assert_eq!(acc.len(), x.len());
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
}

dispatch! {
    /// For each of `rows` output rows i (`out[i * out_stride..][..width]`):
    /// `out_i += sum_r x[i * k + r] * w[r * w_stride..][..width]`, r < k. Each row of `w` is
    /// read once, front to back, for all output rows (which stay in the L1 cache).
    pub fn rows_times_mat(out: &mut [f32], out_stride: usize, rows: usize, width: usize, x: &[f32], k: usize, w: &[f32], w_stride: usize) {
        for r in 0..k {
            let wr = &w[r * w_stride..r * w_stride + width];
            for i in 0..rows {
                let xv = x[i * k + r];
                let o = &mut out[i * out_stride..i * out_stride + width];
                for (o, &v) in o.iter_mut().zip(wr) {
                    *o += xv * v;
                }
            }
        }
    }
}

/// Attention of one query: `scores[j] = q . key_j` for `j < len`, `p = softmax(scale *
/// scores)`, `out = sum_j p_j values[j]`. Keys are stored in blocks of 16 positions,
/// `[ceil(len / 16)][head_dim][16]`; values as `[len, head_dim]`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn attend_stored<E: Stored>(
    out: &mut [f32],
    q: &[f32],
    keys_t: &[E],
    values: &[E],
    scores: &mut [f32],
    len: usize,
    scale: f32,
) {
    let hd = q.len();
    let s = &mut scores[..len];
    // Scores, 16 keys at a time with the sums in one register; the keys are stored in
    // blocks of 16 positions (`[len / 16][head_dim][16]`), so this reads them in order. Four
    // blocks go together, so four independent sums are in flight.
    let blocks = len.div_ceil(LANES);
    let mut blk = 0;
    while blk + 4 <= blocks {
        let base = &keys_t[blk * LANES * hd..(blk + 4) * LANES * hd];
        let (mut a0, mut a1, mut a2, mut a3) = (
            [0.0f32; LANES],
            [0.0f32; LANES],
            [0.0f32; LANES],
            [0.0f32; LANES],
        );
        for (c, &qc) in q.iter().enumerate() {
            let k0: &[E; LANES] = base[c * LANES..(c + 1) * LANES].try_into().unwrap();
            let k1: &[E; LANES] = base[(hd + c) * LANES..(hd + c + 1) * LANES]
                .try_into()
                .unwrap();
            let k2: &[E; LANES] = base[(2 * hd + c) * LANES..(2 * hd + c + 1) * LANES]
                .try_into()
                .unwrap();
            let k3: &[E; LANES] = base[(3 * hd + c) * LANES..(3 * hd + c + 1) * LANES]
                .try_into()
                .unwrap();
            for l in 0..LANES {
                a0[l] += qc * k0[l].load();
                a1[l] += qc * k1[l].load();
                a2[l] += qc * k2[l].load();
                a3[l] += qc * k3[l].load();
            }
        }
        for (i, acc) in [a0, a1, a2, a3].iter().enumerate() {
            let j0 = (blk + i) * LANES;
            let n = LANES.min(len - j0);
            s[j0..j0 + n].copy_from_slice(&acc[..n]);
        }
        blk += 4;
    }
    while blk < blocks {
        let j0 = blk * LANES;
        let block: &[E] = &keys_t[j0 * hd..(j0 + LANES) * hd];
        let mut acc = [0.0f32; LANES];
        for (c, &qc) in q.iter().enumerate() {
            let kc: &[E; LANES] = block[c * LANES..(c + 1) * LANES].try_into().unwrap();
            for l in 0..LANES {
                acc[l] += qc * kc[l].load();
            }
        }
        let n = LANES.min(len - j0);
        s[j0..j0 + n].copy_from_slice(&acc[..n]);
        blk += 1;
    }
    // Softmax, 16 lanes at a time (a running scalar sum would not vectorise).
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.into_remainder().iter()) {
        max = if v > max { v } else { max };
    }
    let mut sums = [0.0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp((c[l] - max) * scale);
            sums[l] += c[l];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp((*v - max) * scale);
        sum += *v;
    }
    let inv = 1.0 / sum;
    // Weighted values, 16 columns of the head at a time, four keys per round so four
    // independent sums are in flight (a last partial group of columns goes one by one).
    let full = hd / LANES * LANES;
    for c0 in (0..full).step_by(LANES) {
        let (mut a0, mut a1, mut a2, mut a3) = (
            [0.0f32; LANES],
            [0.0f32; LANES],
            [0.0f32; LANES],
            [0.0f32; LANES],
        );
        let mut j = 0;
        while j + 4 <= len {
            let v0: &[E; LANES] = values[j * hd + c0..j * hd + c0 + LANES].try_into().unwrap();
            let v1: &[E; LANES] = values[(j + 1) * hd + c0..(j + 1) * hd + c0 + LANES]
                .try_into()
                .unwrap();
            let v2: &[E; LANES] = values[(j + 2) * hd + c0..(j + 2) * hd + c0 + LANES]
                .try_into()
                .unwrap();
            let v3: &[E; LANES] = values[(j + 3) * hd + c0..(j + 3) * hd + c0 + LANES]
                .try_into()
                .unwrap();
            let (p0, p1, p2, p3) = (s[j], s[j + 1], s[j + 2], s[j + 3]);
            for l in 0..LANES {
                a0[l] += p0 * v0[l].load();
                a1[l] += p1 * v1[l].load();
                a2[l] += p2 * v2[l].load();
                a3[l] += p3 * v3[l].load();
            }
            j += 4;
        }
        while j < len {
            let v0: &[E; LANES] = values[j * hd + c0..j * hd + c0 + LANES].try_into().unwrap();
            let p0 = s[j];
            for l in 0..LANES {
                a0[l] += p0 * v0[l].load();
            }
            j += 1;
        }
        for l in 0..LANES {
            out[c0 + l] = (a0[l] + a1[l] + a2[l] + a3[l]) * inv;
        }
    }
    for c in full..hd {
        out[c] = s
            .iter()
            .enumerate()
            .map(|(j, &p)| p * values[j * hd + c].load())
            .sum::<f32>()
            * inv;
    }
}

dispatch! {
    /// Attention of one query over an f32 cache (see [`attend_stored`]).
    pub fn attend(out: &mut [f32], q: &[f32], keys_t: &[f32], values: &[f32], scores: &mut [f32], len: usize, scale: f32) {
        attend_stored(out, q, keys_t, values, scores, len, scale)
    }
}

dispatch! {
    /// Attention of one query over a bfloat16 cache (see [`attend_stored`]).
    pub fn attend_bf16(out: &mut [f32], q: &[f32], keys_t: &[u16], values: &[u16], scores: &mut [f32], len: usize, scale: f32) {
        attend_stored(out, q, keys_t, values, scores, len, scale)
    }
}

dispatch! {
    /// Index and squared distance of the centre nearest to `p` (`channels` values), with the
    /// centres stored channel-major (`soa[ch * stride + k]`, `stride` a multiple of 16; padding
    /// centres must be far away). Ties go to the lowest index.
    pub fn nearest_center(soa: &[f32], stride: usize, p: &[f32]) -> (usize, f32) {
        let mut best_d = [f32::INFINITY; LANES];
        let mut best_i = [0usize; LANES];
        for k0 in (0..stride).step_by(LANES) {
            let mut d = [0.0f32; LANES];
            for (ch, &pv) in p.iter().enumerate() {
                let row: &[f32; LANES] = soa[ch * stride + k0..ch * stride + k0 + LANES].try_into().unwrap();
                for l in 0..LANES {
                    let t = row[l] - pv;
                    d[l] += t * t;
                }
            }
            for l in 0..LANES {
                if d[l] < best_d[l] {
                    best_d[l] = d[l];
                    best_i[l] = k0 + l;
                }
            }
        }
        let mut best = (best_i[0], best_d[0]);
        for l in 1..LANES {
            if best_d[l] < best.1 || (best_d[l] == best.1 && best_i[l] < best.0) {
                best = (best_i[l], best_d[l]);
            }
        }
        best
    }
}

dispatch! {
    /// `acc[i] += x[i] * y[i] * s`.
    pub fn add_product(acc: &mut [f32], x: &[f32], y: &[f32], s: f32) {
        assert!(acc.len() == x.len() && x.len() == y.len());
        for ((a, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *a += u * v * s;
        }
    }
}

dispatch! {
    /// `out[i] = a[i] + b[i]`.
    pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
        assert!(out.len() == a.len() && a.len() == b.len());
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

dispatch! {
    /// `out[i] = x[i] * s * g[i]`.
    pub fn scale_mul(out: &mut [f32], x: &[f32], s: f32, g: &[f32]) {
        assert!(out.len() == x.len() && x.len() == g.len());
        for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
            *o = v * s * gv;
        }
    }
}

dispatch! {
    /// RMS-norm input gradient for one row: `dx += s * (dy*g - x*s*mean)`.
    pub fn rmsnorm_dx(dx: &mut [f32], dy: &[f32], x: &[f32], g: &[f32], s: f32, mean: f32) {
        let n = dx.len();
        assert!(dy.len() == n && x.len() == n && g.len() == n);
        for i in 0..n {
            dx[i] += s * (dy[i] * g[i] - x[i] * s * mean);
        }
    }
}

dispatch! {
    /// Sum of `a[i] * b[i] * c[i]`.
    pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
        let n = a.len();
        assert!(b.len() == n && c.len() == n);
        let mut lanes = [0.0f32; LANES];
        let full = n / LANES * LANES;
        for k in (0..full).step_by(LANES) {
            for i in 0..LANES {
                lanes[i] += a[k + i] * b[k + i] * c[k + i];
            }
        }
        lanes.iter().sum::<f32>() + (full..n).map(|i| a[i] * b[i] * c[i]).sum::<f32>()
    }
}

dispatch! {
    /// Quick GELU: `out = x * sigmoid(1.702 x)`.
    pub fn quick_gelu(out: &mut [f32], x: &[f32]) {
        assert_eq!(out.len(), x.len());
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * sigmoid(1.702 * v);
        }
    }
}

dispatch! {
    /// Quick GELU backward: `d *= s + 1.702 x s (1 - s)` with `s = sigmoid(1.702 x)`.
    pub fn quick_gelu_grad(d: &mut [f32], x: &[f32]) {
        assert_eq!(d.len(), x.len());
        for (d, &v) in d.iter_mut().zip(x) {
            let s = sigmoid(1.702 * v);
            *d *= s + 1.702 * v * s * (1.0 - s);
        }
    }
}

dispatch! {
    /// AdamW on one chunk (see `optim::adamw` for the meaning of the constants).
    pub fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &[f32; 8]) {
        let [lr, b1, b2, eps, wd, gs, bc1, bc2] = *k;
        let n = p.len();
        assert!(g.len() == n && m.len() == n && v.len() == n);
        for i in 0..n {
            let gi = g[i] * gs;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let mhat = m[i] / bc1;
            let vhat = v[i] / bc2;
            p[i] -= lr * (mhat / (vhat.sqrt() + eps) + wd * p[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Host sampling draws from these weights, so an image must not depend on the machine:
    /// the dispatched copy (AVX-512 or AVX2 where the CPU has them) gives the bits of the same
    /// arithmetic written out here and built for plain x86-64.
    #[test]
    fn exp_scaled_gives_the_baseline_bits() {
        for n in [0, 1, 15, 16, 17, 37, 512, 1000] {
            let mut x: Vec<f32> = (0..n)
                .map(|i| (i * 7919 % 1000) as f32 * 0.07 - 40.0)
                .collect();
            if n > 3 {
                x[3] = f32::NEG_INFINITY;
            }
            let (shift, scale) = (30.0, 1.3);
            let mut got = vec![0.0; n];
            let sum = super::exp_scaled(&mut got, &x, shift, scale);
            let mut want = vec![0.0f32; n];
            let mut lanes = [0.0f32; super::LANES];
            let whole = n / super::LANES * super::LANES;
            for i in 0..n {
                let y = (x[i] - shift) * scale;
                want[i] = if y < -87.0 { 0.0 } else { super::exp(y) };
            }
            for i in 0..whole {
                lanes[i % super::LANES] += want[i];
            }
            let mut want_sum: f32 = lanes.iter().sum();
            for &w in &want[whole..] {
                want_sum += w;
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "n {n}");
            assert_eq!(
                sum.to_bits(),
                want_sum.to_bits(),
                "n {n}: {sum} vs {want_sum}"
            );
            // Some weights underflow to exactly 0 (the -inf among them), others do not.
            if n > 3 {
                assert_eq!(got[3], 0.0);
                assert!(got.iter().any(|&w| w > 0.0));
            }
        }
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((super::exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(super::exp(-200.0), super::exp(-87.0));
        assert!(super::exp(-200.0) < 1e-37);
    }

    #[test]
    fn reductions_match_naive() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let y: Vec<f32> = (0..37)
            .map(|i| ((i * 31) % 17) as f32 / 3.0 - 2.0)
            .collect();
        assert_eq!(
            super::max(&x),
            x.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
        );
        let naive: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((super::dot(&x, &y) - naive).abs() < 1e-4);
        let mut e = x.clone();
        let s = super::exp_shifted(&mut e, 1.0);
        let naive: f32 = x.iter().map(|v| (v - 1.0).exp()).sum();
        assert!((s - naive).abs() / naive < 1e-5);
    }
}
