//! Run directories: everything needed to use a model or to continue training it.
//!
//! ```text
//! RUN/config.json          model shape and training settings
//! RUN/palette.json         the palette, [k][channels] in [-1, 1]
//! RUN/model.safetensors    parameters by name (see README: "Checkpoint format")
//! RUN/trainer.safetensors  parameters, Adam moments, step and data position (for --resume)
//! RUN/metrics.jsonl        one JSON object per logged step
//! RUN/loss.png             the loss curve
//! RUN/data/*.tokens        the quantised training and validation sets
//! ```
//! Every file is written atomically, so a kill at any moment leaves the last good checkpoint.

use crate::config::ModelConfig;
use crate::fsutil::write_atomic;
use crate::model::ParamLayout;
use crate::palette::Palette;
use crate::train::{TrainConfig, TrainState};
use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The contents of `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// Where the data came from (for the record).
    pub data: String,
    pub igpt_version: String,
}

/// A training checkpoint: state, parameters and both Adam moments.
pub type TrainerCheckpoint = (TrainState, Vec<f32>, Vec<f32>, Vec<f32>);

pub struct RunDir {
    pub path: PathBuf,
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Serialises named f32 tensors with metadata, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_atomic(path, &bytes)
}

impl RunDir {
    /// Creates the directory (and `data/`), checking that it is writable.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path.join("data"))
            .with_context(|| format!("cannot create run directory {}", path.display()))?;
        let probe = path.join(".write-test");
        std::fs::write(&probe, b"ok")
            .with_context(|| format!("run directory {} is not writable", path.display()))?;
        let _ = std::fs::remove_file(probe);
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn open(path: &Path) -> Result<Self> {
        ensure!(
            path.join("config.json").exists(),
            "{} is not an igpt run directory (no config.json)",
            path.display()
        );
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn save_config(&self, cfg: &RunConfig) -> Result<()> {
        write_atomic(&self.file("config.json"), &serde_json::to_vec_pretty(cfg)?)
    }

    pub fn load_config(&self) -> Result<RunConfig> {
        let p = self.file("config.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid igpt config", p.display()))
    }

    pub fn save_palette(&self, p: &Palette) -> Result<()> {
        p.save(&self.file("palette.json"))
    }

    pub fn load_palette(&self) -> Result<Palette> {
        let p = self.file("palette.json");
        ensure!(
            p.exists(),
            "{} has no palette.json: the model cannot turn pixels into tokens without it",
            self.path.display()
        );
        Palette::load(&p)
    }

    /// Writes `model.safetensors`: one tensor per parameter, named as in [`ParamLayout`].
    pub fn save_model(&self, cfg: &ModelConfig, params: &[f32]) -> Result<()> {
        let layout = ParamLayout::new(cfg);
        let tensors: Vec<_> = layout
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.shape.clone(),
                    f32_bytes(&params[t.range()]),
                )
            })
            .collect();
        // One metadata entry: a map of several would be written in a random order, and the
        // same model should always give the same bytes.
        let meta = HashMap::from([("config".to_string(), serde_json::to_string(cfg)?)]);
        write_tensors(&self.file("model.safetensors"), &tensors, meta)
    }

    /// Reads `model.safetensors`, checking every tensor's name and shape against `cfg`.
    pub fn load_model(&self, cfg: &ModelConfig) -> Result<Vec<f32>> {
        load_model_file(&self.file("model.safetensors"), cfg)
    }

    /// Writes the full training state.
    pub fn save_trainer(
        &self,
        state: &TrainState,
        params: &[f32],
        m: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let n = params.len();
        let tensors = vec![
            ("params".to_string(), vec![n], f32_bytes(params)),
            ("adam_m".to_string(), vec![n], f32_bytes(m)),
            ("adam_v".to_string(), vec![n], f32_bytes(v)),
        ];
        let meta = HashMap::from([("state".to_string(), serde_json::to_string(state)?)]);
        write_tensors(&self.file("trainer.safetensors"), &tensors, meta)
    }

    /// Reads the training state: (state, params, adam_m, adam_v).
    pub fn load_trainer(&self, n_params: usize) -> Result<TrainerCheckpoint> {
        let p = self.file("trainer.safetensors");
        let bytes = std::fs::read(&p).with_context(|| {
            format!("cannot read {} (no checkpoint to resume from)", p.display())
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is corrupt", p.display()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)?;
        let state_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("state"))
            .with_context(|| format!("{} lacks its training state", p.display()))?;
        let state: TrainState = serde_json::from_str(state_json)?;
        let get = |name: &str| -> Result<Vec<f32>> {
            let t = st
                .tensor(name)
                .with_context(|| format!("{} lacks tensor {name}", p.display()))?;
            ensure!(
                t.dtype() == Dtype::F32 && t.shape() == [n_params],
                "{}: tensor {name} has shape {:?}, the model needs [{n_params}]",
                p.display(),
                t.shape()
            );
            Ok(bytes_f32(t.data()))
        };
        Ok((state, get("params")?, get("adam_m")?, get("adam_v")?))
    }
}

/// Reads an igpt `model.safetensors`, checking names, dtypes and shapes against `cfg`.
pub fn load_model_file(path: &Path, cfg: &ModelConfig) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let layout = ParamLayout::new(cfg);
    let mut params = vec![0.0f32; layout.total];
    for t in &layout.tensors {
        let v = st
            .tensor(&t.name)
            .with_context(|| format!("{}: missing tensor {}", path.display(), t.name))?;
        if v.dtype() != Dtype::F32 {
            bail!(
                "{}: tensor {} is {:?}, expected F32",
                path.display(),
                t.name,
                v.dtype()
            );
        }
        ensure!(
            v.shape() == t.shape.as_slice(),
            "{}: tensor {} has shape {:?}, the config needs {:?}",
            path.display(),
            t.name,
            v.shape(),
            t.shape
        );
        params[t.range()].copy_from_slice(&bytes_f32(v.data()));
    }
    Ok(params)
}

/// Everything needed to run a trained model: its shape, palette and parameters.
#[derive(Clone)]
pub struct LoadedModel {
    pub config: RunConfig,
    /// The palette, with its centres as the source stores them (f64 in Hugging Face configs).
    pub palette: Palette,
    pub params: Vec<f32>,
}

impl LoadedModel {
    /// Loads a run directory's model, checking that its palette fits it.
    pub fn open(path: &Path) -> Result<Self> {
        let run = RunDir::open(path)?;
        let config = run.load_config()?;
        let m = &config.model;
        ensure!(
            run.file("model.safetensors").exists(),
            "{} has no model.safetensors yet (training has not written a checkpoint)",
            path.display()
        );
        let params = run.load_model(m)?;
        let palette = run.load_palette()?;
        ensure!(
            palette.len() == m.n_vocab && palette.channels == m.channels,
            "{}: the palette has {} colours x {} channel(s) but the model expects {} x {}",
            path.display(),
            palette.len(),
            palette.channels,
            m.n_vocab,
            m.channels
        );
        Ok(Self {
            config,
            palette,
            params,
        })
    }

    pub fn model(&self) -> &ModelConfig {
        &self.config.model
    }
}
