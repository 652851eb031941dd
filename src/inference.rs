//! Raw model outputs for arrays of token ids: logits or hidden states, batched.

use crate::backend::Device;
use crate::checkpoint::LoadedModel;
use crate::model::{Engine, Output};
use crate::stop::Report;
use anyhow::{Result, bail, ensure};

/// How the given ids become the model's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    /// The ids are pixels; the start token goes in front and the last pixel is not fed, so
    /// position i predicts pixel i (REFERENCE.md §3). For BERT models: ids as given, with
    /// -1 marking a masked pixel.
    Pixels,
    /// The ids are fed exactly as given, as Hugging Face's model takes them: position i
    /// predicts the id at i + 1, and id `n_vocab` is the start token.
    Raw,
}

/// An inference engine for one model, reused across calls.
pub struct Runner {
    engine: Engine,
}

impl Runner {
    /// Takes the model's parameters (held once, not copied).
    pub fn new(m: LoadedModel, batch: usize, device: &Device) -> Result<Self> {
        let engine = Engine::with_params(&m.config.model, batch.max(1), device, m.params)?;
        Ok(Self { engine })
    }

    /// See [`run`].
    pub fn run(
        &mut self,
        ids: &[i64],
        n: usize,
        t: usize,
        convention: Convention,
        output: Output,
        on_batch: impl Report<usize>,
    ) -> Result<Vec<f32>> {
        run_with(&mut self.engine, ids, n, t, convention, output, on_batch)
    }
}

/// Outputs `[n, t, width]` for `ids: [n, t]` (width `n_vocab` for logits, `n_embd` for a
/// hidden state). `t` may be shorter than the model's context for autoregressive models: the
/// causal mask makes the missing tail irrelevant. `on_batch` sees the count done so far (and
/// may stop the job: [`crate::stop`]).
#[allow(clippy::too_many_arguments)]
pub fn run(
    m: &LoadedModel,
    ids: &[i64],
    n: usize,
    t: usize,
    convention: Convention,
    output: Output,
    batch: usize,
    device: &Device,
    on_batch: impl Report<usize>,
) -> Result<Vec<f32>> {
    let mut engine = Engine::new(m.model(), batch.clamp(1, n.max(1)), false, device)?;
    engine.set_params(&m.params)?;
    run_with(&mut engine, ids, n, t, convention, output, on_batch)
}

/// [`run`] on an engine already holding the model (of any batch size; its own precision).
pub fn run_with(
    engine: &mut Engine,
    ids: &[i64],
    n: usize,
    t: usize,
    convention: Convention,
    output: Output,
    mut on_batch: impl Report<usize>,
) -> Result<Vec<f32>> {
    let cfg = &engine.cfg.clone();
    let (ctx, v) = (cfg.n_ctx(), cfg.n_vocab);
    ensure!(
        ids.len() == n * t,
        "expected {n} x {t} ids, got {}",
        ids.len()
    );
    ensure!(n > 0 && t > 0, "no ids to run");
    ensure!(
        t <= ctx,
        "sequences of {t} ids are longer than the model's context of {ctx} pixels"
    );
    if !cfg.causal() {
        ensure!(
            t == ctx,
            "a BERT model sees whole images: sequences must have exactly {ctx} ids (got {t})"
        );
    }
    // The largest id each convention accepts, and what -1 means.
    let (lo, hi) = match (convention, cfg.causal()) {
        (Convention::Pixels, true) => (0, v as i64 - 1),
        (Convention::Raw, true) => (0, v as i64),
        (_, false) => (-1, v as i64 - 1),
    };
    if let Some(pos) = ids.iter().position(|&x| x < lo || x > hi) {
        let what = match (convention, cfg.causal()) {
            (Convention::Pixels, true) => format!("pixel ids must be in 0..{v}"),
            (Convention::Raw, true) => format!("raw ids must be in 0..={v} ({v} = start token)"),
            _ => format!("BERT inputs must be in 0..{v}, or -1 for a masked pixel"),
        };
        bail!(
            "id {} at sequence {}, position {}: {what}",
            ids[pos],
            pos / t,
            pos % t
        );
    }
    let width = match output {
        Output::Logits => v,
        Output::Hidden(_) => cfg.n_embd,
    };
    let batch = engine.batch;
    let mut input = vec![0u16; batch * ctx];
    let mut out = vec![0.0f32; n * t * width];
    let mut host = Vec::new();
    rayon::scope(|_| -> Result<()> {
        for start in (0..n).step_by(batch) {
            let b = batch.min(n - start);
            input.fill(0);
            for i in 0..b {
                let seq = &ids[(start + i) * t..(start + i + 1) * t];
                let dst = &mut input[i * ctx..i * ctx + t];
                match (convention, cfg.causal()) {
                    (Convention::Pixels, true) => {
                        dst[0] = v as u16;
                        for (d, &x) in dst[1..].iter_mut().zip(seq) {
                            *d = x as u16;
                        }
                    }
                    (Convention::Raw, true) => {
                        for (d, &x) in dst.iter_mut().zip(seq) {
                            *d = x as u16;
                        }
                    }
                    (_, false) => {
                        for (d, &x) in dst.iter_mut().zip(seq) {
                            *d = if x < 0 { v as u16 + 1 } else { x as u16 };
                        }
                    }
                }
            }
            engine.infer(&input[..b * ctx], output, &mut host)?;
            for i in 0..b {
                let src = &host[i * ctx * width..(i * ctx + t) * width];
                out[(start + i) * t * width..(start + i + 1) * t * width].copy_from_slice(src);
            }
            on_batch.report(start + b)?;
        }
        Ok(())
    })?;
    Ok(out)
}
