//! The optimizer step shared by pre-training and fine-tuning: after every pass of a step has
//! added its gradients, [`finish_step`] combines them across processes, clips and updates.

use crate::backend::{AdamStep, Update, adamw_host};
use crate::model::Engine;
use crate::parallel::reduce::Reducer;
use serde::{Deserialize, Serialize};

/// AdamW's settings (Loshchilov and Hutter; the paper's betas are 0.9 and 0.95).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied to weight matrices only.
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamW {
    /// The step `step` (from 1) at rate `lr`, its gradient multiplied by `grad_scale` first.
    pub fn at(&self, lr: f32, step: u64, grad_scale: f32) -> AdamStep {
        AdamStep {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step,
            grad_scale,
        }
    }

    /// Steps parameters held in host memory (a classification head) by the same update the
    /// model gets; `rows` says how they are laid out.
    pub fn update_host(
        &self,
        params: &mut [f32],
        grads: &[f32],
        moments: &mut HostMoments,
        lr: f32,
        step: u64,
        rows: HostRows,
    ) {
        let n = params.len();
        assert!(grads.len() == n && moments.m.len() == n && moments.v.len() == n);
        if rows.lr_scale.is_empty() {
            let h = self.at(lr, step, 1.0);
            adamw_host(params, grads, &mut moments.m, &mut moments.v, h, rows.decay);
            return;
        }
        assert_eq!(rows.lr_scale.len() * rows.len, n, "one rate factor per row");
        let each = params
            .chunks_exact_mut(rows.len)
            .zip(grads.chunks_exact(rows.len))
            .zip(moments.m.chunks_exact_mut(rows.len))
            .zip(moments.v.chunks_exact_mut(rows.len))
            .zip(rows.lr_scale);
        for ((((p, g), m), v), &f) in each {
            adamw_host(p, g, m, v, self.at(lr * f, step, 1.0), rows.decay);
        }
    }
}

/// The layout of host-held parameters for [`AdamW::update_host`].
#[derive(Debug, Clone, Copy)]
pub struct HostRows<'a> {
    /// Elements per row.
    pub len: usize,
    /// A factor on the rate for each row (empty: 1 for all).
    pub lr_scale: &'a [f32],
    /// Whether weight decay applies (matrices, not biases or gains).
    pub decay: bool,
}

/// Adam's two moments for host-held parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostMoments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl HostMoments {
    pub fn zeros(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// What [`finish_step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    /// The step's summed loss over every process.
    pub loss_sum: f64,
    /// Global gradient norm of the model before clipping.
    pub grad_norm: f64,
}

/// The end of every optimizer step, once each pass has added its gradients to `engine` (and
/// the caller's host-held parameters theirs to `host_grads`): the loss and the gradients are
/// summed over `reducer`'s team (reduce), the model's global gradient norm is clipped to `clip`
/// (0: no clipping), and the model takes one AdamW step at `lr` (update). Host-held parameters
/// are then the caller's to update with [`AdamW::update_host`]. Every rank ends the step with
/// the same sums, so the same parameters.
#[allow(clippy::too_many_arguments)]
pub fn finish_step(
    engine: &mut Engine,
    reducer: &mut Reducer,
    host_grads: &mut [&mut [f32]],
    mut loss_sum: f64,
    adamw: &AdamW,
    lr: f32,
    step: u64,
    clip: f32,
) -> anyhow::Result<Finished> {
    reducer.finish(engine, host_grads, &mut loss_sum)?;
    let grad_norm = engine.update(Update {
        adam: adamw.at(lr, step, 1.0),
        clip,
    });
    Ok(Finished {
        loss_sum,
        grad_norm,
    })
}
