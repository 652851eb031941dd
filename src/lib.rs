//! igpt: Image GPT (Chen et al., 2020) with its own small engine.
//!
//! Tour: [`config`] (model shape), [`model`] (parameters and the forward/backward engine),
//! [`backend`] (kernels; [`backend::cpu`] today), [`train`] (optimizer, schedule, loop),
//! [`palette`] (colour palettes), [`data`] (readers, token cache), [`checkpoint`] (run
//! directories), [`formats`] (Hugging Face and TensorFlow checkpoints), [`eval`] (held-out likelihood), [`plot`] (charts).

pub mod backend;
pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod eval;
pub mod finetune;
pub mod formats;
pub mod fsutil;
pub mod grid;
pub mod inference;
pub mod model;
pub mod npy;
pub mod palette;
pub mod plot;
pub mod preprocess;
pub mod probe;
pub mod sample;
pub mod train;
