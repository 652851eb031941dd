//! Other tools' checkpoint formats: Hugging Face model directories (safetensors or PyTorch
//! pickles), OpenAI's TensorFlow checkpoints, and downloads of both.
//!
//! Every command that takes `--model` accepts any of them; [`load_model`] tells them apart.

pub mod hf;
pub mod hub;
pub mod pickle;
pub mod tf;

use crate::checkpoint::LoadedModel;
use anyhow::{Context, Result, bail, ensure};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::Metadata;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Element types a foreign checkpoint may store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// One little-endian element as f32.
    pub fn to_f32(self, b: &[u8]) -> f32 {
        match self {
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            DType::F64 => f64::from_le_bytes(b[..8].try_into().unwrap()) as f32,
            DType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap()) as f32,
            DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            DType::U8 | DType::Bool => b[0] as f32,
        }
    }

    /// Converts `dst.len()` packed elements.
    pub fn convert(self, bytes: &[u8], dst: &mut [f32]) {
        let size = self.size();
        assert_eq!(bytes.len(), dst.len() * size);
        for (o, b) in dst.iter_mut().zip(bytes.chunks_exact(size)) {
            *o = self.to_f32(b);
        }
    }
}

/// File contents: memory-mapped from disk, or owned (tests and fuzzing).
pub enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl Bytes {
    /// Maps a file read-only.
    pub fn map(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is opened read-only and only read through the map. If another
        // process changes it while we read, we read wrong numbers (caught by the checksums
        // where the format has them), never memory outside the map.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Ok(Bytes::Mapped(map))
    }
}

/// Named tensors in some file format, read one at a time into f32.
pub trait TensorSource {
    /// The file(s), for messages.
    fn describe(&self) -> String;
    fn names(&self) -> Vec<String>;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Copies the tensor, converted to f32, into `dst` (exactly its element count).
    fn read_into(&self, name: &str, dst: &mut [f32]) -> Result<()>;

    /// Reads a tensor after checking its shape.
    fn read_checked(&self, name: &str, expected: &[usize], dst: &mut [f32]) -> Result<()> {
        let shape = self
            .shape(name)
            .with_context(|| format!("{}: missing tensor {name}", self.describe()))?;
        ensure!(
            shape == expected,
            "{}: tensor {name} has shape {shape:?}, the model's config needs {expected:?}",
            self.describe()
        );
        self.read_into(name, dst)
    }

    fn read_vec(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let mut v = vec![0.0; expected.iter().product()];
        self.read_checked(name, expected, &mut v)?;
        Ok(v)
    }
}

/// A memory-mapped `.safetensors` file (the header is validated by the safetensors crate).
pub struct SafetensorsFile {
    path: PathBuf,
    map: Bytes,
    meta: Metadata,
    data_start: usize,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_bytes(path, Bytes::map(path)?)
    }

    /// Parses contents already in memory; `path` names them in messages.
    pub fn from_bytes(path: &Path, map: Bytes) -> Result<Self> {
        SafeTensors::deserialize(&map)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        let (n, meta) = SafeTensors::read_metadata(&map)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            meta,
            data_start: 8 + n,
        })
    }

    pub fn metadata(&self, key: &str) -> Option<&String> {
        self.meta.metadata().as_ref().and_then(|m| m.get(key))
    }
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        _ => return None,
    })
}

impl TensorSource for SafetensorsFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.meta.tensors().keys().cloned().collect();
        n.sort();
        n
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.meta.info(name).map(|i| i.shape.clone())
    }

    fn read_into(&self, name: &str, dst: &mut [f32]) -> Result<()> {
        let info = self
            .meta
            .info(name)
            .with_context(|| format!("{}: no tensor {name}", self.describe()))?;
        let dtype = st_dtype(info.dtype).with_context(|| {
            format!(
                "{}: tensor {name} has type {:?}, which igpt cannot read",
                self.describe(),
                info.dtype
            )
        })?;
        let (a, b) = info.data_offsets;
        let bytes = &self.map[self.data_start + a..self.data_start + b];
        ensure!(
            bytes.len() == dst.len() * dtype.size(),
            "{}: tensor {name} holds {} bytes, expected {}",
            self.describe(),
            bytes.len(),
            dst.len() * dtype.size()
        );
        dtype.convert(bytes, dst);
        Ok(())
    }
}

/// What a `--model` argument names.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// An igpt run directory.
    Run(PathBuf),
    /// A Hugging Face ImageGPT directory.
    Hf(PathBuf),
    /// An OpenAI TensorFlow checkpoint, by prefix (`.../model.ckpt-N`).
    Tf(PathBuf),
}

/// Works out what kind of model a local path holds.
pub fn detect(path: &Path) -> Result<ModelSource> {
    if path.is_dir() {
        let cfg = path.join("config.json");
        if cfg.exists() {
            let text = std::fs::read_to_string(&cfg)
                .with_context(|| format!("cannot read {}", cfg.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", cfg.display()))?;
            if v.get("model").is_some() && v.get("igpt_version").is_some() {
                return Ok(ModelSource::Run(path.to_path_buf()));
            }
            if v.get("model_type").and_then(|t| t.as_str()) == Some("imagegpt")
                || v.get("n_embd").is_some()
            {
                return Ok(ModelSource::Hf(path.to_path_buf()));
            }
            bail!(
                "{} has a config.json that is neither an igpt run's nor a Hugging Face \
                 ImageGPT's",
                path.display()
            );
        }
        if let Some(prefix) = tf::latest_checkpoint(path)? {
            return Ok(ModelSource::Tf(prefix));
        }
        bail!(
            "{} holds no model: expected an igpt run directory, a Hugging Face ImageGPT \
             directory (config.json + weights) or a TensorFlow checkpoint (model.ckpt-N.index)",
            path.display()
        );
    }
    let s = path.to_string_lossy();
    if let Some(prefix) = s.strip_suffix(".index") {
        return Ok(ModelSource::Tf(PathBuf::from(prefix)));
    }
    if Path::new(&format!("{s}.index")).exists() {
        return Ok(ModelSource::Tf(path.to_path_buf()));
    }
    Err(crate::fsutil::NotFound::new("", path, "").into())
}

/// Loads any model a `--model` argument can name: a local igpt run, Hugging Face directory or
/// TensorFlow checkpoint, or (when not a local path) a hub name such as
/// `openai/imagegpt-small` or `openai-tf/igpt-s-bert@524000`, downloaded once into the cache.
pub fn load_model(spec: &str) -> Result<LoadedModel> {
    let path = resolve(spec)?;
    match detect(&path)? {
        ModelSource::Run(p) => LoadedModel::open(&p),
        ModelSource::Hf(p) => hf::load_dir(&p),
        ModelSource::Tf(p) => tf::load_checkpoint(&p, None),
    }
}

/// A local path for `spec`, downloading it first when it names a remote model.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let local = PathBuf::from(spec);
    if local.exists() || Path::new(&format!("{spec}.index")).exists() {
        return Ok(local);
    }
    if let Some(name) = spec.strip_prefix("openai-tf/") {
        return hub::fetch_tf(name);
    }
    let looks_remote = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && !spec.contains('\\');
    if looks_remote {
        return hub::fetch_hf(spec);
    }
    Err(crate::fsutil::NotFound::new(
        "",
        &local,
        " (and is not a hub name like openai/imagegpt-small)",
    )
    .into())
}
