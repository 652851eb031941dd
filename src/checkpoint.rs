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
use crate::fsutil::{DirLock, write_atomic, write_atomic_with};
use crate::model::ParamLayout;
use crate::palette::Palette;
use crate::train::{TrainConfig, TrainState};
use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
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

/// A directory without a run's settings (`config.json`).
#[derive(Debug, thiserror::Error)]
#[error("{} is not an igpt run directory (no config.json)", .path.display())]
pub struct NotARun {
    pub path: PathBuf,
}

impl NotARun {
    /// Whether a run was being prepared there (its data folder exists) and stopped before its
    /// settings were written.
    pub fn stopped_before_training(&self) -> bool {
        self.path.join("data").is_dir()
    }
}

pub struct RunDir {
    pub path: PathBuf,
    /// The directory's exclusive lock, once this process writes to it ([`RunDir::lock`]).
    lock: std::sync::OnceLock<DirLock>,
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Writes named f32 tensors with metadata, atomically, with their checksums ([`CHECKSUMS`]).
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    meta: HashMap<String, String>,
) -> Result<()> {
    let specs: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s, _)| (n.clone(), s.clone()))
        .collect();
    write_f32_streaming(path, &specs, meta, |i, buf| {
        buf.clear();
        buf.extend_from_slice(&tensors[i].2);
    })
}

/// The metadata entry holding a CRC-32C of every tensor's bytes (by name) and, under
/// `__metadata__`, of the other metadata values (sorted by key). Files written before it
/// existed load without it.
pub const CHECKSUMS: &str = "crc32c";

fn metadata_crc(meta: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = meta.iter().filter(|(k, _)| *k != CHECKSUMS).collect();
    let mut crc = 0u32;
    for (k, v) in sorted {
        crc = crc32c::crc32c_append(crc, k.as_bytes());
        crc = crc32c::crc32c_append(crc, &[0]);
        crc = crc32c::crc32c_append(crc, v.as_bytes());
        crc = crc32c::crc32c_append(crc, &[0]);
    }
    format!("{crc:08x}")
}

fn checksum_json(sums: &BTreeMap<&str, String>, meta: &HashMap<String, String>) -> Result<String> {
    let mut all: BTreeMap<&str, String> = sums.clone();
    all.insert("__metadata__", metadata_crc(meta));
    Ok(serde_json::to_string(&all)?)
}

/// Checks the tensors and metadata of a safetensors file against its [`CHECKSUMS`] entry, when
/// it has one, naming the file and the first part that differs.
pub fn verify_checksums(path: &Path, bytes: &[u8]) -> Result<()> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let Some(meta) = header.metadata().as_ref() else {
        return Ok(());
    };
    let Some(json) = meta.get(CHECKSUMS) else {
        return Ok(());
    };
    let corrupt = |what: &str| {
        anyhow::anyhow!(
            "{} is corrupt: {what} does not match its checksum (a damaged file; restore it or \
             train again)",
            path.display()
        )
    };
    let sums: BTreeMap<String, String> =
        serde_json::from_str(json).map_err(|_| corrupt("the checksum table"))?;
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    for (name, want) in &sums {
        let got = if name == "__metadata__" {
            metadata_crc(meta)
        } else {
            let t = st
                .tensor(name)
                .map_err(|_| corrupt(&format!("tensor {name}")))?;
            format!("{:08x}", crc32c::crc32c(t.data()))
        };
        if &got != want {
            return Err(corrupt(&if name == "__metadata__" {
                "its metadata".to_string()
            } else {
                format!("tensor {name}")
            }));
        }
    }
    // Every tensor must be covered: a name missing from the table is a damaged table.
    for name in st.names() {
        if !sums.contains_key(name as &str) {
            return Err(corrupt(&format!("tensor {name} (absent from the table)")));
        }
    }
    Ok(())
}

/// Writes f32 tensors as a safetensors file with checksums, streaming: `data(i, buf)` fills
/// tensor i (twice: once for its checksum, once to write it), so the file never exists in
/// memory as a whole.
fn write_f32_streaming(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    mut meta: HashMap<String, String>,
    mut data: impl FnMut(usize, &mut Vec<f32>),
) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = Vec::with_capacity(1 << 16);
    let mut sums = BTreeMap::new();
    let le = |v: &[f32], chunk: &mut Vec<u8>| {
        chunk.clear();
        chunk.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    };
    for (i, (name, shape)) in specs.iter().enumerate() {
        data(i, &mut buf);
        ensure!(
            buf.len() == shape.iter().product::<usize>(),
            "tensor {name}: {} values for shape {shape:?}",
            buf.len()
        );
        let mut crc = 0;
        for c in buf.chunks(1 << 14) {
            le(c, &mut chunk);
            crc = crc32c::crc32c_append(crc, &chunk);
        }
        sums.insert(name.as_str(), format!("{crc:08x}"));
    }
    meta.insert(CHECKSUMS.to_string(), checksum_json(&sums, &meta)?);
    // The header: metadata first, then the tensors in order, data offsets contiguous.
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(meta.iter().collect::<BTreeMap<_, _>>())?,
    );
    let mut at = 0usize;
    for (name, shape) in specs {
        let n = 4 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [at, at + n]}),
        );
        at += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    write_atomic_with(path, |w| {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for i in 0..specs.len() {
            data(i, &mut buf);
            for c in buf.chunks(1 << 14) {
                le(c, &mut chunk);
                w.write_all(&chunk)?;
            }
        }
        Ok(())
    })
}

/// A run's `metrics.jsonl`: one JSON object per line, each line one append to the file (no
/// buffer), so a killed run keeps every line it logged, and only a full disk can cut the last
/// one short.
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        use std::io::Write;
        self.file
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| {
                format!(
                    "cannot append to {} (is the disk full?)",
                    self.path.display()
                )
            })
    }
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
        let run = Self {
            path: path.to_path_buf(),
            lock: Default::default(),
        };
        run.lock()?;
        Ok(run)
    }

    pub fn open(path: &Path) -> Result<Self> {
        if !path.join("config.json").exists() {
            return Err(NotARun {
                path: path.to_path_buf(),
            }
            .into());
        }
        Ok(Self {
            path: path.to_path_buf(),
            lock: Default::default(),
        })
    }

    /// A run directory another process is writing (rank 0 of a data-parallel run), to read its
    /// files as they appear: never locked, and its config need not exist yet.
    pub fn written_by_another(path: &Path) -> Result<Self> {
        ensure!(
            path.is_dir(),
            "{} is not a directory this process can see",
            path.display()
        );
        Ok(Self {
            path: path.to_path_buf(),
            lock: Default::default(),
        })
    }

    /// Takes the directory's exclusive lock for this process (once; later calls do nothing),
    /// so that two processes never write one run. Another holder is a [`crate::fsutil::Locked`]
    /// error naming it.
    pub fn lock(&self) -> Result<()> {
        if self.lock.get().is_none() {
            let l = DirLock::acquire(&self.path)?;
            let _ = self.lock.set(l);
        }
        Ok(())
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The run's `metrics.jsonl`, opened for appending.
    pub fn metrics_log(&self) -> Result<MetricsLog> {
        let path = self.file("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write metrics to {}", path.display()))?;
        Ok(MetricsLog { file, path })
    }

    /// Removes the run's `metrics.jsonl`, for a new run into this directory.
    pub fn clear_metrics(&self) -> Result<()> {
        let path = self.file("metrics.jsonl");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    pub fn save_config(&self, cfg: &RunConfig) -> Result<()> {
        write_atomic(&self.file("config.json"), &serde_json::to_vec_pretty(cfg)?)
    }

    pub fn load_config(&self) -> Result<RunConfig> {
        let p = self.file("config.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let cfg: RunConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid igpt config", p.display()))?;
        // Said as a value of the file, not of a flag: the file is what must change.
        cfg.model.validate().map_err(|e| {
            anyhow::anyhow!("{} describes a model igpt cannot build: {e}", p.display())
        })?;
        cfg.train.validate().map_err(|e| {
            anyhow::anyhow!(
                "{} holds training settings that cannot work: {e}",
                p.display()
            )
        })?;
        Ok(cfg)
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
        ensure!(
            params.len() == layout.total,
            "{} parameters for a model of {}",
            params.len(),
            layout.total
        );
        let specs: Vec<_> = layout
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        // One metadata entry besides the checksums: the same model always gives the same bytes.
        let meta = HashMap::from([("config".to_string(), serde_json::to_string(cfg)?)]);
        write_f32_streaming(&self.file("model.safetensors"), &specs, meta, |i, buf| {
            buf.clear();
            buf.extend_from_slice(&params[layout.tensors[i].range()]);
        })
    }

    /// Reads `model.safetensors`, checking every tensor's name and shape against `cfg`.
    pub fn load_model(&self, cfg: &ModelConfig) -> Result<Vec<f32>> {
        load_model_file(&self.file("model.safetensors"), cfg)
    }

    /// Writes the full training state: `data(i, buf)` fills the parameters (0), then Adam's
    /// first (1) and second (2) moments, each `n` floats.
    pub fn save_trainer(
        &self,
        state: &TrainState,
        n: usize,
        data: impl FnMut(usize, &mut Vec<f32>),
    ) -> Result<()> {
        let specs: Vec<_> = ["params", "adam_m", "adam_v"]
            .iter()
            .map(|name| (name.to_string(), vec![n]))
            .collect();
        let meta = HashMap::from([("state".to_string(), serde_json::to_string(state)?)]);
        write_f32_streaming(&self.file("trainer.safetensors"), &specs, meta, data)
    }

    /// Reads the training state: (state, params, adam_m, adam_v).
    pub fn load_trainer(&self, n_params: usize) -> Result<TrainerCheckpoint> {
        let p = self.file("trainer.safetensors");
        let bytes = std::fs::read(&p).with_context(|| {
            format!("cannot read {} (no checkpoint to resume from)", p.display())
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is corrupt", p.display()))?;
        verify_checksums(&p, &bytes)?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)?;
        let state_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("state"))
            .with_context(|| format!("{} lacks its training state", p.display()))?;
        let state: TrainState = serde_json::from_str(state_json)
            .with_context(|| format!("{}: its training state is unreadable", p.display()))?;
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
    cfg.validate()
        .with_context(|| format!("the model {} is read for", path.display()))?;
    crate::memory::Estimate::new()
        .add(
            "parameters",
            4 * crate::memory::param_count(cfg),
            crate::memory::Scale::Model,
        )
        .check(&format!("loading {}", path.display()))?;
    let bytes = crate::fsutil::read_regular(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    verify_checksums(path, &bytes)?;
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
