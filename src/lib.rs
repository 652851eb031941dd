//! igpt: Image GPT (Chen et al., 2020) with its own small engine.
//!
//! Tour: [`config`] (model shape), [`model`] (parameters and the forward/backward engine),
//! [`backend`] (the kernel interface and [`backend::Device`]; [`backend::cpu`] today),
//! [`train`] (the step, AdamW, schedule, loop), [`bert`] (the masked objective), [`finetune`]
//! (classification head and loop), [`probe`] (linear probes), [`sample`] (generation), [`selftest`] (a device's kernels proved against the CPU's),
//! [`eval`] (likelihoods), [`preprocess`] (images to pixels), [`palette`] (colour palettes),
//! [`data`] (readers, token cache), [`stop`] (stopping long jobs part-way), [`parallel`] (several processes as one), [`checkpoint`] (run directories), [`formats`] (Hugging Face
//! and TensorFlow checkpoints), [`plot`] (charts).

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
pub mod memory;
pub mod model;
pub mod npy;
pub mod palette;
pub mod parallel;
pub mod plot;
pub mod preprocess;
pub mod probe;
pub mod sample;
pub mod selftest;
pub mod serve;
pub mod stop;
pub mod train;
