//! OpenAI's TensorFlow checkpoints: TensorFlow's tensor-bundle format, read without TensorFlow.
//!
//! `PREFIX.index` is a sorted string table (the LevelDB table layout: data blocks, an index
//! block, a 48-byte footer) mapping each variable name to a small protobuf entry (type, shape,
//! shard, offset, size, CRC-32C of the bytes). The bytes sit in `PREFIX.data-SSSSS-of-NNNNN`.
//! Every block and every tensor is checked against its CRC-32C.

use super::Bytes;
use super::{DType, TensorSource};
use crate::checkpoint::{LoadedModel, RunConfig};
use crate::config::{ModelConfig, Objective};
use crate::model::ParamLayout;
use crate::palette::Palette;
use crate::train::TrainConfig;
use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const TABLE_MAGIC: u64 = 0xdb47_7524_8b80_fb57;
const FOOTER_LEN: usize = 48;

fn unmask_crc(masked: u32) -> u32 {
    let rot = masked.wrapping_sub(0xa282_ead8);
    rot.rotate_left(15)
}

/// A varint at `*pos`, advancing it.
fn varint(buf: &[u8], pos: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).context("truncated varint")?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint longer than 10 bytes")
}

/// `(offset, size)` of a block.
fn block_handle(buf: &[u8], pos: &mut usize) -> Result<(usize, usize)> {
    let off = usize::try_from(varint(buf, pos)?)?;
    let size = usize::try_from(varint(buf, pos)?)?;
    Ok((off, size))
}

/// The contents of the block at `handle`, after checking its trailer (type and CRC).
fn read_block(file: &[u8], (off, size): (usize, usize)) -> Result<&[u8]> {
    let end = off.checked_add(size).context("block handle overflows")?;
    ensure!(
        end.checked_add(5).is_some_and(|e| e <= file.len()),
        "a block runs past the end of the index (truncated file)"
    );
    let contents = &file[off..end];
    let kind = file[end];
    let stored = u32::from_le_bytes(file[end + 1..end + 5].try_into()?);
    let actual = crc32c::crc32c_append(crc32c::crc32c(contents), &[kind]);
    ensure!(
        unmask_crc(stored) == actual,
        "a block of the index fails its CRC-32C check (corrupt file)"
    );
    ensure!(
        kind == 0,
        "the index uses block compression {kind}; only uncompressed tables (what TensorFlow \
         writes for checkpoints) are supported"
    );
    Ok(contents)
}

/// Every key/value of one block (keys are prefix-compressed against the previous key).
fn block_entries(block: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    ensure!(block.len() >= 4, "block too short");
    let n_restarts = u32::from_le_bytes(block[block.len() - 4..].try_into()?) as usize;
    let restarts_len = n_restarts
        .checked_mul(4)
        .and_then(|x| x.checked_add(4))
        .context("restart count overflows")?;
    ensure!(restarts_len <= block.len(), "block restart array too long");
    let data = &block[..block.len() - restarts_len];
    let mut out = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let shared = usize::try_from(varint(data, &mut pos)?)?;
        let unshared = usize::try_from(varint(data, &mut pos)?)?;
        let vlen = usize::try_from(varint(data, &mut pos)?)?;
        ensure!(
            shared <= key.len(),
            "block entry shares more than the previous key"
        );
        let end = pos
            .checked_add(unshared)
            .and_then(|x| x.checked_add(vlen))
            .context("block entry overflows")?;
        ensure!(end <= data.len(), "block entry runs past its block");
        key.truncate(shared);
        key.extend_from_slice(&data[pos..pos + unshared]);
        out.push((key.clone(), data[pos + unshared..end].to_vec()));
        pos = end;
    }
    Ok(out)
}

/// Every key/value of a table file.
pub fn read_table(file: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    ensure!(
        file.len() >= FOOTER_LEN,
        "too short to be a TensorFlow index ({} bytes)",
        file.len()
    );
    let footer = &file[file.len() - FOOTER_LEN..];
    let magic = u64::from_le_bytes(footer[40..].try_into()?);
    ensure!(
        magic == TABLE_MAGIC,
        "not a TensorFlow checkpoint index (wrong magic number)"
    );
    let mut pos = 0;
    let _meta_index = block_handle(&footer[..40], &mut pos)?;
    let index = block_handle(&footer[..40], &mut pos)?;
    let mut out = Vec::new();
    for (_, handle) in block_entries(read_block(file, index)?)? {
        let mut p = 0;
        let h = block_handle(&handle, &mut p)?;
        out.extend(block_entries(read_block(file, h)?)?);
    }
    ensure!(
        out.windows(2).all(|w| w[0].0 < w[1].0),
        "index keys are not sorted (corrupt file)"
    );
    Ok(out)
}

enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64(#[allow(dead_code)] u64),
    Bytes(&'a [u8]),
}

/// The fields of one protobuf message, in order.
fn proto_fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let field = match tag & 7 {
            0 => Field::Varint(varint(buf, &mut pos)?),
            1 => {
                ensure!(pos + 8 <= buf.len(), "truncated protobuf field");
                pos += 8;
                Field::Fixed64(u64::from_le_bytes(buf[pos - 8..pos].try_into()?))
            }
            2 => {
                let n = usize::try_from(varint(buf, &mut pos)?)?;
                ensure!(n <= buf.len() - pos, "truncated protobuf field");
                pos += n;
                Field::Bytes(&buf[pos - n..pos])
            }
            5 => {
                ensure!(pos + 4 <= buf.len(), "truncated protobuf field");
                pos += 4;
                Field::Fixed32(u32::from_le_bytes(buf[pos - 4..pos].try_into()?))
            }
            w => bail!("protobuf wire type {w} is not supported"),
        };
        out.push((tag >> 3, field));
    }
    Ok(out)
}

/// One tensor's entry in the index (TensorFlow's `BundleEntryProto`).
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub dtype: u64,
    pub shape: Vec<i64>,
    pub shard: usize,
    pub offset: u64,
    pub size: u64,
    pub masked_crc: Option<u32>,
    pub sliced: bool,
}

fn parse_entry(buf: &[u8]) -> Result<Entry> {
    let mut e = Entry::default();
    for (num, f) in proto_fields(buf)? {
        match (num, f) {
            (1, Field::Varint(v)) => e.dtype = v,
            (2, Field::Bytes(b)) => {
                for (n, f) in proto_fields(b)? {
                    if let (2, Field::Bytes(dim)) = (n, f) {
                        let mut size = 0i64;
                        for (n, f) in proto_fields(dim)? {
                            if let (1, Field::Varint(v)) = (n, f) {
                                size = v as i64;
                            }
                        }
                        e.shape.push(size);
                    }
                }
            }
            (3, Field::Varint(v)) => e.shard = usize::try_from(v)?,
            (4, Field::Varint(v)) => e.offset = v,
            (5, Field::Varint(v)) => e.size = v,
            (6, Field::Fixed32(v)) => e.masked_crc = Some(v),
            (7, _) => e.sliced = true,
            _ => {}
        }
    }
    Ok(e)
}

fn tf_dtype(code: u64) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        2 => DType::F64,
        3 => DType::I32,
        4 => DType::U8,
        9 => DType::I64,
        14 => DType::BF16,
        19 => DType::F16,
        _ => return None,
    })
}

/// A TensorFlow checkpoint: its index, parsed, and its data shards, memory-mapped.
pub struct Bundle {
    prefix: PathBuf,
    entries: BTreeMap<String, Entry>,
    shards: Vec<Bytes>,
}

impl Bundle {
    pub fn open(prefix: &Path) -> Result<Self> {
        let index_path = PathBuf::from(format!("{}.index", prefix.display()));
        let index = Bytes::map(&index_path)?;
        let (n_shards, entries) =
            parse_index(&index).with_context(|| index_path.display().to_string())?;
        let mut shards = Vec::with_capacity(n_shards);
        for s in 0..n_shards {
            let p = PathBuf::from(format!("{}.data-{s:05}-of-{n_shards:05}", prefix.display()));
            ensure!(
                p.exists(),
                "{} is missing: a checkpoint needs all {n_shards} data shards next to its index",
                p.display()
            );
            shards.push(Bytes::map(&p)?);
        }
        Ok(Self::from_parts(prefix, entries, shards))
    }

    /// A bundle from a parsed index and its shards' contents.
    pub fn from_parts(prefix: &Path, entries: BTreeMap<String, Entry>, shards: Vec<Bytes>) -> Self {
        Self {
            prefix: prefix.to_path_buf(),
            entries,
            shards,
        }
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }
}

/// The shard count and the entries of an index file.
pub fn parse_index(index: &[u8]) -> Result<(usize, BTreeMap<String, Entry>)> {
    {
        let table = read_table(index)?;
        let mut n_shards = 1usize;
        let mut entries = BTreeMap::new();
        for (k, v) in table {
            if k.is_empty() {
                for (n, f) in proto_fields(&v)? {
                    match (n, f) {
                        (1, Field::Varint(s)) => n_shards = usize::try_from(s)?,
                        (2, Field::Varint(1)) => {
                            bail!("a big-endian checkpoint; igpt reads little-endian ones")
                        }
                        _ => {}
                    }
                }
                continue;
            }
            let name = String::from_utf8(k).context("variable name is not UTF-8")?;
            let e = parse_entry(&v).with_context(|| format!("entry of {name}"))?;
            entries.insert(name, e);
        }
        ensure!(
            (1..=100_000).contains(&n_shards),
            "implausible shard count {n_shards}"
        );
        Ok((n_shards, entries))
    }
}

impl TensorSource for Bundle {
    fn describe(&self) -> String {
        format!("{}", self.prefix.display())
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries
            .get(name)
            .map(|e| e.shape.iter().map(|&x| x.max(0) as usize).collect())
    }

    fn read_into(&self, name: &str, dst: &mut [f32]) -> Result<()> {
        let here = self.describe();
        let e = self
            .entries
            .get(name)
            .with_context(|| format!("{here}: no variable {name}"))?;
        ensure!(!e.sliced, "{here}: {name} is a partitioned variable");
        let dtype = tf_dtype(e.dtype)
            .with_context(|| format!("{here}: {name} has TensorFlow type {}", e.dtype))?;
        ensure!(
            e.size == (dst.len() * dtype.size()) as u64,
            "{here}: {name} holds {} bytes, its shape needs {}",
            e.size,
            dst.len() * dtype.size()
        );
        let shard = self
            .shards
            .get(e.shard)
            .with_context(|| format!("{here}: {name} names shard {}", e.shard))?;
        let start = usize::try_from(e.offset)?;
        let end = start
            .checked_add(e.size as usize)
            .filter(|&end| end <= shard.len())
            .with_context(|| {
                format!("{here}: {name} runs past the end of its data shard (truncated file?)")
            })?;
        let bytes = &shard[start..end];
        if let Some(masked) = e.masked_crc {
            ensure!(
                crc32c::crc32c(bytes) == unmask_crc(masked),
                "{here}: {name} fails its CRC-32C check (corrupt data shard)"
            );
        }
        dtype.convert(bytes, dst);
        Ok(())
    }
}

/// The newest `model.ckpt-N` in a directory, if any.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".index") {
            let step = stem
                .rsplit_once('-')
                .and_then(|(_, n)| n.parse::<u64>().ok())
                .unwrap_or(0);
            if best.as_ref().is_none_or(|b| step >= b.0) {
                best = Some((step, dir.join(stem)));
            }
        }
    }
    Ok(best.map(|b| b.1))
}

/// `kmeans_centers.npy` next to the checkpoint or up to three directories above it.
fn find_centers(prefix: &Path) -> Option<PathBuf> {
    let mut dir = prefix.parent();
    for _ in 0..4 {
        let d = dir?;
        let p = d.join("kmeans_centers.npy");
        if p.exists() {
            return Some(p);
        }
        dir = d.parent();
    }
    None
}

/// OpenAI names its masked-objective checkpoints `igpt-{s,m,l}-bert`.
fn looks_bert(prefix: &Path) -> bool {
    prefix.components().any(|c| {
        c.as_os_str()
            .to_string_lossy()
            .to_lowercase()
            .contains("bert")
    })
}

/// Loads an OpenAI checkpoint onto our model. The palette comes from `centers` or from a
/// `kmeans_centers.npy` found near the checkpoint. BERT checkpoints are recognised by `bert`
/// in their path, as OpenAI names them.
pub fn load_checkpoint(prefix: &Path, centers: Option<&Path>) -> Result<LoadedModel> {
    let bundle = Bundle::open(prefix)?;
    let here = bundle.describe();
    let shape = |n: &str| -> Result<Vec<usize>> {
        bundle.shape(n).with_context(|| {
            format!("{here}: no variable {n}: not an Image GPT checkpoint (REFERENCE.md §4)")
        })
    };
    let wte = shape("model/wte")?;
    ensure!(wte.len() == 2, "{here}: model/wte has shape {wte:?}");
    let (n_vocab, d) = (wte[0], wte[1]);
    let n_ctx = shape("model/wpe")?[0];
    let mut n_layer = 0;
    while bundle.entry(&format!("model/h{n_layer}/ln_1/g")).is_some() {
        n_layer += 1;
    }
    ensure!(n_layer > 0, "{here}: no blocks (model/h0/...)");
    let q = shape("model/h0/attn/q_proj")?;
    ensure!(
        q.len() == 3,
        "{here}: model/h0/attn/q_proj has shape {q:?}, expected [n_head, head_dim, d]"
    );
    let side = (n_ctx as f64).sqrt().round() as usize;
    ensure!(
        side * side == n_ctx,
        "{here}: {n_ctx} positions is not a square image"
    );

    let centers_path = match centers {
        Some(p) => p.to_path_buf(),
        None => find_centers(prefix).with_context(|| {
            format!(
                "{here}: no kmeans_centers.npy found next to the checkpoint or above it; it \
                 holds the palette (download it with the checkpoint)"
            )
        })?,
    };
    let arr = crate::npy::read(&centers_path)?;
    ensure!(
        arr.shape.len() == 2 && arr.shape[0] == n_vocab && (arr.shape[1] == 3 || arr.shape[1] == 1),
        "{}: shape {:?}, but the checkpoint predicts {n_vocab} colours (expected [{n_vocab}, 3])",
        centers_path.display(),
        arr.shape
    );
    let palette = Palette::from_exact(arr.shape[1], arr.to_f64())
        .with_context(|| centers_path.display().to_string())?;

    let model = ModelConfig {
        n_layer,
        n_embd: d,
        n_head: q[0],
        n_vocab,
        side,
        channels: arr.shape[1],
        objective: if looks_bert(prefix) {
            Objective::Bert
        } else {
            Objective::Autoregressive
        },
    };
    model.validate().with_context(|| here.clone())?;
    let params = map_weights(&bundle, &model)?;
    Ok(LoadedModel {
        config: RunConfig {
            model,
            train: TrainConfig::default(),
            data: format!("OpenAI TensorFlow checkpoint {here}"),
            igpt_version: env!("CARGO_PKG_VERSION").to_string(),
        },
        palette,
        params,
    })
}

/// Copies the `model/...` variables into our layout (REFERENCE.md §4); optimizer slots and
/// other variables are ignored.
pub fn map_weights(src: &dyn TensorSource, cfg: &ModelConfig) -> Result<Vec<f32>> {
    let (d, v, t, h) = (cfg.n_embd, cfg.n_vocab, cfg.n_ctx(), cfg.n_head);
    let hd = cfg.head_dim();
    let layout = ParamLayout::new(cfg);
    let mut p = vec![0.0f32; layout.total];
    src.read_checked("model/wte", &[v, d], &mut p[layout.wte..layout.wte + v * d])?;
    src.read_checked(
        "model/wtet",
        &[v, d],
        &mut p[layout.wtet..layout.wtet + v * d],
    )?;
    src.read_checked("model/wpe", &[t, d], &mut p[layout.wpe..layout.wpe + t * d])?;
    if src.shape("model/sos").is_some() {
        src.read_checked("model/sos", &[d], &mut p[layout.sos..layout.sos + d])?;
    } else {
        ensure!(
            cfg.objective == Objective::Bert,
            "{}: no model/sos, which an autoregressive model needs",
            src.describe()
        );
    }
    src.read_checked("model/ln_f/g", &[d], &mut p[layout.ln_f..layout.ln_f + d])?;
    for (i, b) in layout.blocks.iter().enumerate() {
        let n = |s: &str| format!("model/h{i}/{s}");
        src.read_checked(&n("ln_1/g"), &[d], &mut p[b.ln_1..b.ln_1 + d])?;
        src.read_checked(&n("ln_2/g"), &[d], &mut p[b.ln_2..b.ln_2 + d])?;
        src.read_checked(
            &n("mlp/c_fc/w"),
            &[d, 4 * d],
            &mut p[b.c_fc..b.c_fc + 4 * d * d],
        )?;
        src.read_checked(
            &n("mlp/c_proj/w"),
            &[4 * d, d],
            &mut p[b.mlp_proj..b.mlp_proj + 4 * d * d],
        )?;
        // q/k/v: [h, hd, d] is [out, in]; our c_attn is [in, 3 * out] with Q, K, V side by side.
        for (j, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let w = src.read_vec(&n(&format!("attn/{part}")), &[h, hd, d])?;
            for out in 0..d {
                for inp in 0..d {
                    p[b.c_attn + inp * 3 * d + j * d + out] = w[out * d + inp];
                }
            }
        }
        // c_proj: [h, hd, d] is already [in, out].
        src.read_checked(
            &n("attn/c_proj"),
            &[h, hd, d],
            &mut p[b.attn_proj..b.attn_proj + d * d],
        )?;
    }
    if let Some(bad) = p.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: parameter {bad} is not finite (corrupt weights)",
            src.describe()
        );
    }
    Ok(p)
}
