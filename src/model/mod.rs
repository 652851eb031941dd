//! The Image GPT model: parameter layout, initialisation and the engine that runs it.

mod block;
mod decoder;
mod engine;
mod layout;
mod replay;

pub use decoder::Decoder;
pub use engine::{ActPlan, Engine, FinishedGrads, Output};
pub use layout::{BlockOffsets, Init, ParamLayout, TensorSpec};

use crate::config::ModelConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A fresh parameter buffer with the official initialisation (REFERENCE.md §3).
pub fn init_params(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut params = vec![0.0f32; layout.total];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for t in &layout.tensors {
        let dst = &mut params[t.range()];
        match t.init {
            Init::Ones => dst.fill(1.0),
            Init::Zeros => dst.fill(0.0),
            Init::Normal(std) => {
                for v in dst.iter_mut() {
                    *v = std * standard_normal(&mut rng);
                }
            }
        }
    }
    params
}

/// One N(0, 1) draw by the Box-Muller transform.
pub fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
