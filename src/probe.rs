//! Linear probes: multinomial logistic regression with an L2 penalty, fitted by L-BFGS on
//! standardised features, the penalty chosen on a validation split of the training set only.

use crate::backend::Op;
use crate::backend::cpu::matmul::matmul;
use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::VecDeque;

/// Per-feature mean and scale learned on training features.
#[derive(Debug, Clone)]
pub struct Standardiser {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
}

impl Standardiser {
    pub fn fit(x: &[f32], f: usize) -> Self {
        let n = (x.len() / f).max(1) as f64;
        let mut mean = vec![0.0; f];
        let mut sq = vec![0.0; f];
        for row in x.chunks_exact(f) {
            for (j, &v) in row.iter().enumerate() {
                mean[j] += v as f64;
                sq[j] += v as f64 * v as f64;
            }
        }
        let inv_std = mean
            .iter_mut()
            .zip(&sq)
            .map(|(m, s)| {
                *m /= n;
                let var = (s / n - *m * *m).max(0.0);
                // Constant features carry nothing; leave them at zero rather than blow up.
                if var > 1e-12 { 1.0 / var.sqrt() } else { 0.0 }
            })
            .collect();
        Self { mean, inv_std }
    }

    /// One over each feature's standard deviation (0 for constant features).
    pub fn inv_std(&self) -> &[f64] {
        &self.inv_std
    }

    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let f = self.mean.len();
        x.chunks_exact(f)
            .flat_map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(j, &v)| ((v as f64 - self.mean[j]) * self.inv_std[j]) as f32)
            })
            .collect()
    }
}

/// A fitted classifier on standardised features: `w` is `[f + 1, classes]`, the last row the bias.
#[derive(Debug, Clone)]
pub struct Logistic {
    pub features: usize,
    pub classes: usize,
    pub w: Vec<f64>,
}

/// How a fit ended.
#[derive(Debug, Clone, Copy)]
pub struct FitReport {
    pub iterations: usize,
    pub converged: bool,
    pub loss: f64,
}

impl Logistic {
    /// Scores `[n, classes]` of standardised features `x: [n, f]`.
    pub fn scores(&self, x: &[f32]) -> Vec<f32> {
        let (f, c) = (self.features, self.classes);
        let n = x.len() / f;
        let w: Vec<f32> = self.w[..f * c].iter().map(|&v| v as f32).collect();
        let mut z = vec![0.0f32; n * c];
        matmul(&mut z, x, Op::N, &w, Op::N, n, f, c, false);
        for row in z.chunks_exact_mut(c) {
            for (zk, bk) in row.iter_mut().zip(&self.w[f * c..]) {
                *zk += *bk as f32;
            }
        }
        z
    }

    /// The same classifier on raw (unstandardised) features: `(w [f, classes], b [classes])`
    /// with `w^T x + b` equal to this model's scores of `st.apply(x)`.
    pub fn unstandardised(&self, st: &Standardiser) -> (Vec<f32>, Vec<f32>) {
        let (f, c) = (self.features, self.classes);
        let mut w = vec![0.0f32; f * c];
        let mut b: Vec<f64> = self.w[f * c..].to_vec();
        for j in 0..f {
            for k in 0..c {
                let wj = self.w[j * c + k] * st.inv_std[j];
                w[j * c + k] = wj as f32;
                b[k] -= wj * st.mean[j];
            }
        }
        (w, b.into_iter().map(|v| v as f32).collect())
    }

    pub fn predict(&self, x: &[f32]) -> Vec<u32> {
        self.scores(x)
            .chunks_exact(self.classes)
            .map(argmax)
            .collect()
    }
}

/// Index of the largest score (the first among ties).
pub fn argmax(scores: &[f32]) -> u32 {
    scores
        .iter()
        .enumerate()
        .fold((0u32, f32::NEG_INFINITY), |b, (k, &v)| {
            if v > b.1 { (k as u32, v) } else { b }
        })
        .0
}

/// Fraction of `pred` equal to `truth`.
pub fn accuracy(pred: &[u32], truth: &[u32]) -> f64 {
    let hits = pred.iter().zip(truth).filter(|(a, b)| a == b).count();
    hits as f64 / truth.len().max(1) as f64
}

/// Mean cross-entropy plus `l2 / 2 * |W|^2` (bias not penalised), and its gradient. The
/// products with the data run in f32 through the engine's matrix kernel; sums are in f64.
fn objective(
    x: &[f32],
    y: &[u32],
    f: usize,
    c: usize,
    l2: f64,
    w: &[f64],
    grad: &mut [f64],
) -> f64 {
    let n = y.len();
    let model = Logistic {
        features: f,
        classes: c,
        w: w.to_vec(),
    };
    let mut z = model.scores(x);
    let loss: f64 = z
        .par_chunks_mut(c)
        .zip(y.par_iter())
        .map(|(row, &label)| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let loss = max + sum.ln() - row[label as usize] as f64;
            // The row becomes d loss / d scores: softmax minus the one-hot label.
            for (k, v) in row.iter_mut().enumerate() {
                let p = (*v as f64 - max).exp() / sum;
                *v = (p - if k == label as usize { 1.0 } else { 0.0 }) as f32;
            }
            loss
        })
        .sum();
    let mut gw = vec![0.0f32; f * c];
    matmul(&mut gw, x, Op::T, &z, Op::N, f, n, c, false);
    let inv_n = 1.0 / n as f64;
    let mut penalty = 0.0;
    for i in 0..f * c {
        grad[i] = gw[i] as f64 * inv_n + l2 * w[i];
        penalty += w[i] * w[i];
    }
    for k in 0..c {
        grad[f * c + k] = z.iter().skip(k).step_by(c).map(|&v| v as f64).sum::<f64>() * inv_n;
    }
    loss * inv_n + 0.5 * l2 * penalty
}

/// Limits of an L-BFGS run.
#[derive(Debug, Clone, Copy)]
pub struct LbfgsOptions {
    pub max_iterations: usize,
    /// Converged when the gradient's largest entry falls below this.
    pub gradient_tolerance: f64,
    pub memory: usize,
}

impl Default for LbfgsOptions {
    fn default() -> Self {
        Self {
            max_iterations: 3000,
            gradient_tolerance: 1e-4,
            memory: 10,
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimises a smooth function with L-BFGS (two-loop recursion, backtracking Armijo search).
pub fn lbfgs(
    mut fun: impl FnMut(&[f64], &mut [f64]) -> f64,
    x0: Vec<f64>,
    opts: LbfgsOptions,
) -> (Vec<f64>, FitReport) {
    let n = x0.len();
    let mut x = x0;
    let mut g = vec![0.0; n];
    let mut fx = fun(&x, &mut g);
    let mut history: VecDeque<(Vec<f64>, Vec<f64>, f64)> = VecDeque::new();
    let mut xn = vec![0.0; n];
    let mut gn = vec![0.0; n];
    let mut alpha = vec![0.0; opts.memory];
    for it in 0..opts.max_iterations {
        let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if gmax <= opts.gradient_tolerance {
            return (
                x,
                FitReport {
                    iterations: it,
                    converged: true,
                    loss: fx,
                },
            );
        }
        // Search direction: -H g.
        let mut d = g.clone();
        for (i, (s, y, rho)) in history.iter().enumerate().rev() {
            alpha[i] = rho * dot(s, &d);
            d.iter_mut().zip(y).for_each(|(q, yv)| *q -= alpha[i] * yv);
        }
        let gamma = match history.back() {
            Some((s, y, _)) => dot(s, y) / dot(y, y),
            None => 1.0 / gmax.max(1e-12),
        };
        d.iter_mut().for_each(|v| *v *= gamma);
        for (i, (s, y, rho)) in history.iter().enumerate() {
            let beta = rho * dot(y, &d);
            d.iter_mut()
                .zip(s)
                .for_each(|(r, sv)| *r += sv * (alpha[i] - beta));
        }
        d.iter_mut().for_each(|v| *v = -*v);
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            history.clear();
            d.iter_mut().zip(&g).for_each(|(dv, gv)| *dv = -gv / gmax);
            slope = dot(&g, &d);
        }
        let mut step = 1.0;
        let mut accepted = false;
        for _ in 0..50 {
            xn.iter_mut()
                .zip(&x)
                .zip(&d)
                .for_each(|((o, xv), dv)| *o = xv + step * dv);
            let f_new = fun(&xn, &mut gn);
            if f_new.is_finite() && f_new <= fx + 1e-4 * step * slope {
                let s: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
                let y: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
                let sy = dot(&s, &y);
                if sy > 1e-12 {
                    if history.len() == opts.memory {
                        history.pop_front();
                    }
                    history.push_back((s, y, 1.0 / sy));
                }
                let decrease = fx - f_new;
                std::mem::swap(&mut x, &mut xn);
                std::mem::swap(&mut g, &mut gn);
                fx = f_new;
                accepted = true;
                // scipy's criterion (its default factr): the relative decrease is negligible.
                if decrease <= 2.2e-9 * fx.abs().max(1.0) {
                    return (
                        x,
                        FitReport {
                            iterations: it + 1,
                            converged: true,
                            loss: fx,
                        },
                    );
                }
                break;
            }
            step *= 0.5;
        }
        if !accepted {
            // No step decreases the function: as close to the minimum as f64 resolves.
            return (
                x,
                FitReport {
                    iterations: it + 1,
                    converged: true,
                    loss: fx,
                },
            );
        }
    }
    (
        x,
        FitReport {
            iterations: opts.max_iterations,
            converged: false,
            loss: fx,
        },
    )
}

/// Fits a classifier on standardised features `x: [n, f]` with labels `y < classes`,
/// starting from `start` when given.
pub fn fit(
    x: &[f32],
    y: &[u32],
    f: usize,
    classes: usize,
    l2: f64,
    start: Option<&Logistic>,
    opts: LbfgsOptions,
) -> (Logistic, FitReport) {
    let w0 = start
        .map(|s| s.w.clone())
        .unwrap_or_else(|| vec![0.0; (f + 1) * classes]);
    let (w, report) = lbfgs(|w, g| objective(x, y, f, classes, l2, w, g), w0, opts);
    (
        Logistic {
            features: f,
            classes,
            w,
        },
        report,
    )
}

/// The penalties tried first, strongest last. When the best lies at either end, the sweep goes on
/// past that end (see [`sweep_l2`]).
pub const L2_GRID: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// Most extra decades the sweep tries past either end of [`L2_GRID`].
pub const L2_EXTRA_DECADES: usize = 3;

/// Scores every strength in [`L2_GRID`], strongest first, then, while the best score sits at an
/// end of what was tried, one decade further past that end (at most [`L2_EXTRA_DECADES`]),
/// stopping at the first that does not score strictly higher: a best strength at the grid's edge
/// means the grid did not bracket the optimum. Returns the chosen strength (among ties the
/// stronger) and every (strength, score) tried, weakest first.
pub fn sweep_l2(mut score: impl FnMut(f64) -> f64) -> (f64, L2Sweep) {
    let mut sweep: L2Sweep = L2_GRID.iter().rev().map(|&l2| (l2, score(l2))).collect();
    let best_of = |sweep: &L2Sweep| {
        let mut best = 0;
        for (i, s) in sweep.iter().enumerate() {
            let stronger = s.0 > sweep[best].0;
            if s.1 > sweep[best].1 || (s.1 == sweep[best].1 && stronger) {
                best = i;
            }
        }
        sweep[best]
    };
    for _ in 0..L2_EXTRA_DECADES {
        let (l2, acc) = best_of(&sweep);
        let weakest = sweep.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
        let strongest = sweep.iter().map(|s| s.0).fold(0.0, f64::max);
        let decade = l2.log10().round() as i32;
        let next = if l2 == weakest {
            power_of_ten(decade - 1)
        } else if l2 == strongest {
            power_of_ten(decade + 1)
        } else {
            break;
        };
        let s = score(next);
        sweep.push((next, s));
        if s <= acc {
            break;
        }
    }
    sweep.sort_by(|a, b| a.0.total_cmp(&b.0));
    (best_of(&sweep).0, sweep)
}

/// `10^e` as the nearest double, the value the literal `1e{e}` has (so that tables print `1e-7`,
/// not `9.999999999999999e-8`).
fn power_of_ten(e: i32) -> f64 {
    if e < 0 {
        1.0 / 10f64.powi(-e)
    } else {
        10f64.powi(e)
    }
}

/// The L2 strength with the best validation accuracy, using only the training set: a fixed
/// shuffle by `seed` holds out `val_fraction` of it. Returns it and every (l2, accuracy) tried.
pub fn select_l2(
    x: &[f32],
    y: &[u32],
    f: usize,
    classes: usize,
    val_fraction: f64,
    seed: u64,
    opts: LbfgsOptions,
) -> Result<(f64, L2Sweep)> {
    select_l2_and_fit(x, y, f, classes, val_fraction, seed, opts).map(|(l2, sweep, _)| (l2, sweep))
}

/// Each L2 strength tried and the validation accuracy it gave, weakest first.
type L2Sweep = Vec<(f64, f64)>;

/// [`select_l2`], also returning the classifier fitted (on the split's other part) at the
/// chosen strength: a close starting point for the fit on the whole training set.
fn select_l2_and_fit(
    x: &[f32],
    y: &[u32],
    f: usize,
    classes: usize,
    val_fraction: f64,
    seed: u64,
    opts: LbfgsOptions,
) -> Result<(f64, L2Sweep, Logistic)> {
    let n = y.len();
    let n_val = ((n as f64 * val_fraction).round() as usize).clamp(1, n.saturating_sub(1));
    ensure!(
        n >= 4 && n_val < n,
        "too few training examples ({n}) to hold out a validation split"
    );
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let (val_idx, fit_idx) = order.split_at(n_val);
    let gather = |idx: &[usize]| -> (Vec<f32>, Vec<u32>) {
        let mut xs = Vec::with_capacity(idx.len() * f);
        for &i in idx {
            xs.extend_from_slice(&x[i * f..(i + 1) * f]);
        }
        (xs, idx.iter().map(|&i| y[i]).collect())
    };
    let (fx, fy) = gather(fit_idx);
    let (vx, vy) = gather(val_idx);
    let st = Standardiser::fit(&fx, f);
    let (fx, vx) = (st.apply(&fx), st.apply(&vx));
    let mut fitted: Vec<(f64, Logistic)> = Vec::new();
    let (l2, sweep) = sweep_l2(|l2| {
        // Each fit starts from the nearest strength's solution: the grid runs from strong to
        // weak, so that is the previous, smoother one.
        let start = fitted
            .iter()
            .min_by(|a, b| (a.0 / l2).ln().abs().total_cmp(&(b.0 / l2).ln().abs()))
            .map(|(_, m)| m);
        let (m, _) = fit(&fx, &fy, f, classes, l2, start, opts);
        let acc = accuracy(&m.predict(&vx), &vy);
        fitted.push((l2, m));
        acc
    });
    let model = fitted
        .into_iter()
        .find(|(s, _)| *s == l2)
        .map(|(_, m)| m)
        .expect("the chosen strength was fitted");
    Ok((l2, sweep, model))
}

/// A classifier fitted on a whole training set at the L2 strength its validation split chose.
pub struct ChosenFit {
    pub standardiser: Standardiser,
    /// Reads features standardised by `standardiser`.
    pub model: Logistic,
    pub l2: f64,
    pub val_accuracy: f64,
    pub report: FitReport,
}

/// Chooses the L2 strength on a `val_fraction` split of `(x, y)` ([`select_l2`]), then fits on
/// all of it, starting from the split's fit at that strength (the problem is convex, so the
/// start changes only how soon the fit gets there).
pub fn fit_chosen_l2(
    x: &[f32],
    y: &[u32],
    f: usize,
    classes: usize,
    val_fraction: f64,
    seed: u64,
) -> Result<ChosenFit> {
    let opts = LbfgsOptions::default();
    let (l2, sweep, start) = select_l2_and_fit(x, y, f, classes, val_fraction, seed, opts)?;
    let val_accuracy = sweep.iter().find(|s| s.0 == l2).map_or(0.0, |s| s.1);
    let standardiser = Standardiser::fit(x, f);
    let (model, report) = fit(
        &standardiser.apply(x),
        y,
        f,
        classes,
        l2,
        Some(&start),
        opts,
    );
    Ok(ChosenFit {
        standardiser,
        model,
        l2,
        val_accuracy,
        report,
    })
}

/// A whole probe: penalty chosen on the training set's validation split, then a fit on the
/// whole training set and its test accuracy.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub l2: f64,
    pub val_accuracy: f64,
    pub train_accuracy: f64,
    pub test_accuracy: f64,
    pub report: FitReport,
}

#[allow(clippy::too_many_arguments)]
pub fn probe(
    train_x: &[f32],
    train_y: &[u32],
    test_x: &[f32],
    test_y: &[u32],
    f: usize,
    classes: usize,
    val_fraction: f64,
    seed: u64,
) -> Result<ProbeResult> {
    ensure!(f > 0, "no features");
    ensure!(
        train_x.len() == train_y.len() * f && test_x.len() == test_y.len() * f,
        "features and labels disagree in count"
    );
    if let Some(&bad) = train_y
        .iter()
        .chain(test_y)
        .find(|&&l| l as usize >= classes)
    {
        anyhow::bail!("label {bad} is outside the {classes} classes");
    }
    let fitted = fit_chosen_l2(train_x, train_y, f, classes, val_fraction, seed)?;
    let (st, m) = (&fitted.standardiser, &fitted.model);
    let tx = st.apply(train_x);
    let train_accuracy = accuracy(&m.predict(&tx), train_y);
    let test_accuracy = accuracy(&m.predict(&st.apply(test_x)), test_y);
    Ok(ProbeResult {
        l2: fitted.l2,
        val_accuracy: fitted.val_accuracy,
        train_accuracy,
        test_accuracy,
        report: fitted.report,
    })
}

/// Probe features of every image of `tokens` for `layers` (see
/// [`crate::model::Engine::probe_features`]): `[n, layers.len(), d]`, batch by batch. For a
/// BERT model, `masks > 0` averages the features over that many fixed random masks per image
/// (each hiding 15% of the pixels, as in training); `masks = 0` reads the whole image.
/// `on_batch` sees how many images are done (and may stop the job: [`crate::stop`]).
pub fn extract_features(
    engine: &mut crate::model::Engine,
    tokens: &crate::data::TokenSet,
    layers: &[usize],
    masks: usize,
    on_batch: impl crate::stop::Report<usize>,
) -> Result<Vec<f32>> {
    let alone = &mut crate::parallel::Single::default();
    let f = extract_features_shared(alone, engine, tokens, layers, masks, on_batch)?;
    Ok(f.expect("a process alone leads"))
}

/// [`extract_features`] with the images split over `team` (whole batches each, see
/// [`crate::parallel::TeamExt::share`]): on rank 0 the features of all of them, the same to
/// the last bit as one process's; `None` on the other ranks. `on_batch` counts this rank's
/// images.
pub fn extract_features_shared(
    team: &mut dyn crate::parallel::Collective,
    engine: &mut crate::model::Engine,
    tokens: &crate::data::TokenSet,
    layers: &[usize],
    masks: usize,
    mut on_batch: impl crate::stop::Report<usize>,
) -> Result<Option<Vec<f32>>> {
    use crate::parallel::TeamExt;
    ensure!(
        masks == 0 || !engine.cfg.causal(),
        "evaluation masks are for BERT models; this one is autoregressive"
    );
    let (t, d, batch) = (engine.cfg.n_ctx(), engine.cfg.n_embd, engine.batch);
    ensure!(
        tokens.header.t == t,
        "the images have {} tokens but the model reads {t}",
        tokens.header.t
    );
    let n = tokens.len();
    let mine = team.share(n, batch);
    let mut out = Vec::with_capacity(mine.len() * layers.len() * d);
    let mut buf = vec![0u16; batch * t];
    let mut part = Vec::new();
    let mut mask = vec![false; batch * t];
    let mut perm = Vec::new();
    rayon::scope(|_| -> Result<()> {
        for start in mine.clone().step_by(batch) {
            let b = batch.min(n - start);
            for i in 0..b {
                tokens.copy_image(start + i, &mut buf[i * t..(i + 1) * t]);
            }
            if masks == 0 {
                engine.probe_features(&buf[..b * t], None, layers, &mut part)?;
                out.extend_from_slice(&part);
            } else {
                let at = out.len();
                out.resize(at + b * layers.len() * d, 0.0);
                for k in 0..masks {
                    crate::bert::eval_masks(start, b, t, masks, k, &mut perm, &mut mask);
                    engine.probe_features(
                        &buf[..b * t],
                        Some(&mask[..b * t]),
                        layers,
                        &mut part,
                    )?;
                    for (o, x) in out[at..].iter_mut().zip(&part) {
                        *o += x / masks as f32;
                    }
                }
            }
            on_batch.report(start + b - mine.start)?;
        }
        Ok(())
    })?;
    team.gather_values(&out)
}

/// Columns `j` of `[n, groups, d]` features as `[n, d]` (one layer), or several concatenated.
pub fn select_groups(x: &[f32], groups: usize, d: usize, pick: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / groups * pick.len());
    for row in x.chunks_exact(groups * d) {
        for &j in pick {
            out.extend_from_slice(&row[j * d..(j + 1) * d]);
        }
    }
    out
}

/// Probes of each layer's features (and of all of them concatenated, when asked), with the best
/// layer chosen by validation accuracy, never by test accuracy.
#[derive(Debug, Clone)]
pub struct LayerProbes {
    /// Each probed layer and its result, in the order given.
    pub layers: Vec<(usize, ProbeResult)>,
    pub concat: Option<ProbeResult>,
    /// Index into `layers` of the best layer by validation accuracy.
    pub best: usize,
}

impl LayerProbes {
    pub fn best(&self) -> (usize, &ProbeResult) {
        let (l, r) = &self.layers[self.best];
        (*l, r)
    }
}

/// The paper's protocol on features `[n, layers.len(), d]` of training and test images (as
/// [`extract_features`] gives them): [`probe`] on each layer, then on their concatenation when
/// `concat` (and there are several). `on_result(name, result)` sees each as it is done
/// (`"layer L"` or `"concat"`).
#[allow(clippy::too_many_arguments)]
pub fn probe_layers(
    train_f: &[f32],
    train_y: &[u32],
    test_f: &[f32],
    test_y: &[u32],
    layers: &[usize],
    d: usize,
    classes: usize,
    concat: bool,
    val_fraction: f64,
    seed: u64,
    mut on_result: impl FnMut(&str, &ProbeResult),
) -> Result<LayerProbes> {
    ensure!(!layers.is_empty(), "no layers to probe");
    let g = layers.len();
    let mut per_layer = Vec::with_capacity(g);
    for (j, &l) in layers.iter().enumerate() {
        let tr = select_groups(train_f, g, d, &[j]);
        let te = select_groups(test_f, g, d, &[j]);
        let r = probe(&tr, train_y, &te, test_y, d, classes, val_fraction, seed)?;
        on_result(&format!("layer {l}"), &r);
        per_layer.push((l, r));
    }
    let concat = if concat && g > 1 {
        let all: Vec<usize> = (0..g).collect();
        let tr = select_groups(train_f, g, d, &all);
        let te = select_groups(test_f, g, d, &all);
        let r = probe(
            &tr,
            train_y,
            &te,
            test_y,
            d * g,
            classes,
            val_fraction,
            seed,
        )?;
        on_result("concat", &r);
        Some(r)
    } else {
        None
    };
    // Of equally good layers, the deepest listed wins.
    let best = per_layer
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.1.val_accuracy.total_cmp(&y.1.1.val_accuracy))
        .map_or(0, |(i, _)| i);
    Ok(LayerProbes {
        layers: per_layer,
        concat,
        best,
    })
}

/// What [`quick_probe`] found.
#[derive(Debug, Clone)]
pub struct QuickProbe {
    /// The probe of the palette-quantised pixels (the baseline).
    pub pixels: ProbeResult,
    pub layers: LayerProbes,
}

/// A small linear probe of an autoregressive model on labelled token sets (the demo's last
/// step): every layer's features of the first `n_train` images of `train` against all of
/// `test`, beside a probe of the same images' palette-quantised pixels; a tenth of the training
/// images chooses L2. `on_images(done)` counts images whose features are done; `on_result`
/// sees each probe (`"pixels"`, then `"layer L"`).
pub fn quick_probe(
    model: &crate::checkpoint::LoadedModel,
    train: &crate::data::TokenSet,
    test: &crate::data::TokenSet,
    n_train: usize,
    device: &crate::backend::Device,
    mut on_images: impl FnMut(usize) + Send,
    mut on_result: impl FnMut(&str, &ProbeResult),
) -> Result<QuickProbe> {
    let mc = model.model();
    let (t, d) = (mc.n_ctx(), mc.n_embd);
    let first: Vec<usize> = (0..n_train.min(train.len())).collect();
    let tr = train.select(&first)?;
    let labels = |set: &crate::data::TokenSet| {
        set.labels()
            .ok_or_else(|| anyhow::anyhow!("a probe needs labelled images"))
    };
    let (tr_y, te_y) = (labels(&tr)?, labels(test)?);
    let classes = classes_of(&tr_y, &te_y)?;
    let layers: Vec<usize> = (0..=mc.n_layer).collect();
    let mut engine = crate::model::Engine::new(mc, 16, false, device)?;
    engine.set_params(&model.params)?;
    let ftr = extract_features(&mut engine, &tr, &layers, 0, &mut on_images)?;
    let n_tr = tr.len();
    let fte = extract_features(&mut engine, test, &layers, 0, |k| on_images(n_tr + k))?;
    let pixels = |set: &crate::data::TokenSet| -> Result<Vec<f32>> {
        let mut tok = vec![0u16; t];
        let mut out = Vec::with_capacity(set.len() * t);
        for i in 0..set.len() {
            set.copy_image(i, &mut tok);
            out.extend(
                model
                    .palette
                    .decode(&tok)?
                    .iter()
                    .map(|&p| p as f32 / 255.0),
            );
        }
        Ok(out)
    };
    let f_pix = t * mc.channels;
    let base = probe(
        &pixels(&tr)?,
        &tr_y,
        &pixels(test)?,
        &te_y,
        f_pix,
        classes,
        0.1,
        0,
    )?;
    on_result("pixels", &base);
    let layers = probe_layers(
        &ftr, &tr_y, &fte, &te_y, &layers, d, classes, false, 0.1, 0, on_result,
    )?;
    Ok(QuickProbe {
        pixels: base,
        layers,
    })
}

/// Which features one model's probe reads, and how it chooses its penalty.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Layers as [`crate::model::Engine::probe_features`] numbers them.
    pub layers: Vec<usize>,
    /// Also probe all of them concatenated.
    pub concat: bool,
    /// BERT models: evaluation masks the features average over ([`crate::bert::masks_for`]).
    pub masks: usize,
    /// Fraction of the training images held out to choose the L2 strength.
    pub val_fraction: f64,
    pub seed: u64,
}

/// The number of classes labels name (the largest label plus one), refusing fewer than two.
pub fn classes_of(train_y: &[u32], test_y: &[u32]) -> Result<usize> {
    let classes = train_y
        .iter()
        .chain(test_y)
        .max()
        .map_or(0, |&c| c as usize + 1);
    ensure!(classes >= 2, "the labels name fewer than two classes");
    Ok(classes)
}

/// The raw-pixel baseline of the probe protocol: [`probe`] on labelled images' pixels (each value
/// scaled to [0, 1]), at whatever size they come.
pub fn pixel_probe(
    train: &crate::data::ImageSet,
    test: &crate::data::ImageSet,
    val_fraction: f64,
    seed: u64,
) -> Result<ProbeResult> {
    let labels = |set: &crate::data::ImageSet| {
        set.labels
            .clone()
            .ok_or_else(|| anyhow::anyhow!("a probe needs labelled images"))
    };
    let (train_y, test_y) = (labels(train)?, labels(test)?);
    let f = train.image_bytes();
    ensure!(
        f == test.image_bytes(),
        "training and test images differ in size ({f} vs {} values)",
        test.image_bytes()
    );
    let scaled = |set: &crate::data::ImageSet| -> Vec<f32> {
        set.pixels.iter().map(|&p| p as f32 / 255.0).collect()
    };
    let classes = classes_of(&train_y, &test_y)?;
    probe(
        &scaled(train),
        &train_y,
        &scaled(test),
        &test_y,
        f,
        classes,
        val_fraction,
        seed,
    )
}

/// One model's probe: features of `opts.layers` for labelled training and test token sets, then
/// [`probe_layers`]. `on_images(is_test, done)` counts images whose features are done.
pub fn probe_model(
    engine: &mut crate::model::Engine,
    train: &crate::data::TokenSet,
    test: &crate::data::TokenSet,
    opts: &ProbeOptions,
    mut on_images: impl FnMut(bool, usize) + Send,
    on_result: impl FnMut(&str, &ProbeResult),
) -> Result<LayerProbes> {
    let labels = |set: &crate::data::TokenSet| {
        set.labels()
            .ok_or_else(|| anyhow::anyhow!("a probe needs labelled images"))
    };
    let (train_y, test_y) = (labels(train)?, labels(test)?);
    let classes = classes_of(&train_y, &test_y)?;
    let (layers, masks) = (&opts.layers, opts.masks);
    let ftrain = extract_features(engine, train, layers, masks, |k| on_images(false, k))?;
    let ftest = extract_features(engine, test, layers, masks, |k| on_images(true, k))?;
    probe_layers(
        &ftrain,
        &train_y,
        &ftest,
        &test_y,
        layers,
        engine.cfg.n_embd,
        classes,
        opts.concat,
        opts.val_fraction,
        opts.seed,
        on_result,
    )
}
