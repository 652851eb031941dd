//! Hugging Face ImageGPT directories: `config.json`, `preprocessor_config.json` (the palette
//! as `clusters`) and `model.safetensors` or `pytorch_model.bin` (REFERENCE.md §4).
//!
//! Hugging Face stores the start token as row `n_vocab` of `wte` and the head as `lm_head`;
//! its Conv1D weights are `[in, out]` like ours, so only the start token and head move.

use super::pickle::TorchZip;
use super::{SafetensorsFile, TensorSource};
use crate::checkpoint::{LoadedModel, RunConfig, write_tensors};
use crate::config::{ModelConfig, Objective};
use crate::fsutil::write_atomic;
use crate::model::ParamLayout;
use crate::palette::Palette;
use crate::train::TrainConfig;
use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The fields of Hugging Face's `ImageGPTConfig` that decide the computation.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default)]
    pub activation_function: Option<String>,
    #[serde(default)]
    pub layer_norm_epsilon: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub scale_attn_weights: Option<bool>,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct HfPreprocessor {
    clusters: Vec<Vec<f64>>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not as expected", path.display()))
}

impl HfConfig {
    /// Our config, after checking that every setting is one the model family uses.
    pub fn to_model(&self, path: &Path) -> Result<ModelConfig> {
        let p = path.display();
        let act = self.activation_function.as_deref().unwrap_or("quick_gelu");
        ensure!(
            act == "quick_gelu",
            "{p}: activation_function is {act:?}; Image GPT uses \"quick_gelu\""
        );
        let eps = self.layer_norm_epsilon.unwrap_or(1e-5);
        ensure!(
            (eps - 1e-5).abs() < 1e-12,
            "{p}: layer_norm_epsilon is {eps}; igpt's norm uses 1e-5"
        );
        ensure!(
            self.n_inner.is_none_or(|n| n == 4 * self.n_embd),
            "{p}: n_inner must be 4 * n_embd"
        );
        ensure!(
            self.tie_word_embeddings != Some(true),
            "{p}: tied embeddings are not Image GPT's (its head is untied)"
        );
        ensure!(
            self.scale_attn_weights != Some(false)
                && self.scale_attn_by_inverse_layer_idx != Some(true),
            "{p}: attention must be scaled by 1/sqrt(head_dim) only"
        );
        let side = (self.n_positions as f64).sqrt().round() as usize;
        ensure!(
            side * side == self.n_positions,
            "{p}: n_positions = {} is not a square image",
            self.n_positions
        );
        ensure!(
            self.vocab_size >= 3,
            "{p}: vocab_size = {} leaves no palette",
            self.vocab_size
        );
        let cfg = ModelConfig {
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_head: self.n_head,
            n_vocab: self.vocab_size - 1,
            side,
            channels: 3,
            objective: Objective::Autoregressive,
        };
        cfg.validate().with_context(|| p.to_string())?;
        Ok(cfg)
    }
}

/// Opens whichever weights file the directory has (safetensors first).
pub fn open_weights(dir: &Path) -> Result<Box<dyn TensorSource>> {
    let st = dir.join("model.safetensors");
    if st.exists() {
        return Ok(Box::new(SafetensorsFile::open(&st)?));
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        return Ok(Box::new(TorchZip::open(&bin)?));
    }
    if dir.join("model.safetensors.index.json").exists()
        || dir.join("pytorch_model.bin.index.json").exists()
    {
        bail!(
            "{}: sharded checkpoints are not supported yet; merge the shards first",
            dir.display()
        );
    }
    bail!(
        "{} has no model.safetensors or pytorch_model.bin",
        dir.display()
    )
}

/// Reads the palette of `preprocessor_config.json`, its f64 centres kept exactly.
pub fn load_clusters(dir: &Path, n_vocab: usize) -> Result<Palette> {
    let path = dir.join("preprocessor_config.json");
    ensure!(
        path.exists(),
        "{} has no preprocessor_config.json: its palette (\"clusters\") is needed to turn \
         pixels into tokens",
        dir.display()
    );
    let pre: HfPreprocessor = read_json(&path)?;
    ensure!(
        pre.clusters.len() == n_vocab,
        "{}: {} clusters, but the model predicts {} colours (vocab_size - 1)",
        path.display(),
        pre.clusters.len(),
        n_vocab
    );
    ensure!(
        pre.clusters.iter().all(|c| c.len() == 3),
        "{}: every cluster must be an RGB triple",
        path.display()
    );
    let exact: Vec<f64> = pre.clusters.into_iter().flatten().collect();
    Palette::from_exact(3, exact).with_context(|| path.display().to_string())
}

/// Copies a Hugging Face state dict into our flat parameter buffer.
pub fn map_weights(src: &dyn TensorSource, cfg: &ModelConfig) -> Result<Vec<f32>> {
    let names = src.names();
    let prefix = if names.iter().any(|n| n == "transformer.wte.weight") {
        "transformer."
    } else if names.iter().any(|n| n == "wte.weight") {
        ""
    } else {
        bail!(
            "{}: no transformer.wte.weight: not an ImageGPT state dict",
            src.describe()
        );
    };
    ensure!(
        names.iter().any(|n| n == "lm_head.weight"),
        "{}: no lm_head.weight; igpt needs the generative head \
         (ImageGPTForCausalImageModeling), not the bare ImageGPTModel",
        src.describe()
    );
    let (d, v, t) = (cfg.n_embd, cfg.n_vocab, cfg.n_ctx());
    let layout = ParamLayout::new(cfg);
    let mut params = vec![0.0f32; layout.total];
    let mut used: Vec<String> = Vec::new();
    let mut read = |name: String, shape: &[usize], dst: &mut [f32]| -> Result<()> {
        src.read_checked(&name, shape, dst)?;
        used.push(name);
        Ok(())
    };

    let wte = {
        let mut w = vec![0.0; (v + 1) * d];
        read(format!("{prefix}wte.weight"), &[v + 1, d], &mut w)?;
        w
    };
    params[layout.wte..layout.wte + v * d].copy_from_slice(&wte[..v * d]);
    params[layout.sos..layout.sos + d].copy_from_slice(&wte[v * d..]);
    read(
        format!("{prefix}wpe.weight"),
        &[t, d],
        &mut params[layout.wpe..layout.wpe + t * d],
    )?;
    for (i, b) in layout.blocks.iter().enumerate() {
        let h = format!("{prefix}h.{i}.");
        let parts: [(&str, usize, Vec<usize>); 6] = [
            ("ln_1.weight", b.ln_1, vec![d]),
            ("attn.c_attn.weight", b.c_attn, vec![d, 3 * d]),
            ("attn.c_proj.weight", b.attn_proj, vec![d, d]),
            ("ln_2.weight", b.ln_2, vec![d]),
            ("mlp.c_fc.weight", b.c_fc, vec![d, 4 * d]),
            ("mlp.c_proj.weight", b.mlp_proj, vec![4 * d, d]),
        ];
        for (name, off, shape) in parts {
            let n: usize = shape.iter().product();
            read(format!("{h}{name}"), &shape, &mut params[off..off + n])?;
        }
        for (name, n) in [
            ("attn.c_attn.bias", 3 * d),
            ("attn.c_proj.bias", d),
            ("mlp.c_fc.bias", 4 * d),
            ("mlp.c_proj.bias", d),
        ] {
            let full = format!("{h}{name}");
            if names.contains(&full) {
                let mut bias = vec![0.0; n];
                read(full.clone(), &[n], &mut bias)?;
                ensure!(
                    bias.iter().all(|&x| x == 0.0),
                    "{}: {full} is not zero; Image GPT has no biases, so igpt cannot \
                     reproduce this model",
                    src.describe()
                );
            }
        }
    }
    read(
        format!("{prefix}ln_f.weight"),
        &[d],
        &mut params[layout.ln_f..layout.ln_f + d],
    )?;
    read(
        "lm_head.weight".to_string(),
        &[v, d],
        &mut params[layout.wtet..layout.wtet + v * d],
    )?;

    // The causal-mask buffers are recomputed, never read; anything else is a model we do not know.
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| {
            !used.contains(n) && !n.ends_with(".attn.bias") && !n.ends_with(".attn.masked_bias")
        })
        .collect();
    ensure!(
        unknown.is_empty(),
        "{}: unexpected tensor(s) {:?}: not an ImageGPTForCausalImageModeling state dict",
        src.describe(),
        unknown
    );
    if let Some(bad) = params.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: parameter {bad} is not finite (corrupt weights)",
            src.describe()
        );
    }
    Ok(params)
}

/// Loads a Hugging Face ImageGPT directory.
pub fn load_dir(dir: &Path) -> Result<LoadedModel> {
    let hf: HfConfig = read_json(&dir.join("config.json"))?;
    let model = hf.to_model(&dir.join("config.json"))?;
    let palette = load_clusters(dir, model.n_vocab)?;
    let src = open_weights(dir)?;
    let params = map_weights(src.as_ref(), &model)?;
    Ok(LoadedModel {
        config: RunConfig {
            model,
            train: TrainConfig::default(),
            data: format!("Hugging Face model {}", dir.display()),
            igpt_version: env!("CARGO_PKG_VERSION").to_string(),
        },
        palette,
        params,
    })
}

/// Writes a model as a Hugging Face ImageGPT directory that `transformers` loads with
/// `ImageGPTForCausalImageModeling.from_pretrained` and `ImageGPTImageProcessor`.
///
/// A grayscale palette is written as gray RGB triples: on an image converted to RGB, the
/// nearest triple is the nearest gray level, so the processor still gives the right ids.
pub fn export(m: &LoadedModel, out: &Path) -> Result<()> {
    let cfg = m.model();
    ensure!(
        cfg.objective == Objective::Autoregressive,
        "Hugging Face's ImageGPT is autoregressive; a BERT model cannot be exported to it \
         (write it as an igpt run directory instead)"
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (d, v, t) = (cfg.n_embd, cfg.n_vocab, cfg.n_ctx());
    let layout = ParamLayout::new(cfg);
    let p = &m.params;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut wte = p[layout.wte..layout.wte + v * d].to_vec();
    wte.extend_from_slice(&p[layout.sos..layout.sos + d]);
    tensors.push(("transformer.wte.weight".into(), vec![v + 1, d], wte));
    tensors.push((
        "transformer.wpe.weight".into(),
        vec![t, d],
        p[layout.wpe..layout.wpe + t * d].to_vec(),
    ));
    for (i, b) in layout.blocks.iter().enumerate() {
        let h = format!("transformer.h.{i}.");
        let parts: [(&str, usize, Vec<usize>); 6] = [
            ("ln_1.weight", b.ln_1, vec![d]),
            ("attn.c_attn.weight", b.c_attn, vec![d, 3 * d]),
            ("attn.c_proj.weight", b.attn_proj, vec![d, d]),
            ("ln_2.weight", b.ln_2, vec![d]),
            ("mlp.c_fc.weight", b.c_fc, vec![d, 4 * d]),
            ("mlp.c_proj.weight", b.mlp_proj, vec![4 * d, d]),
        ];
        for (name, off, shape) in parts {
            let n: usize = shape.iter().product();
            tensors.push((format!("{h}{name}"), shape, p[off..off + n].to_vec()));
        }
        for (name, n) in [
            ("attn.c_attn.bias", 3 * d),
            ("attn.c_proj.bias", d),
            ("mlp.c_fc.bias", 4 * d),
            ("mlp.c_proj.bias", d),
        ] {
            tensors.push((format!("{h}{name}"), vec![n], vec![0.0; n]));
        }
    }
    tensors.push((
        "transformer.ln_f.weight".into(),
        vec![d],
        p[layout.ln_f..layout.ln_f + d].to_vec(),
    ));
    tensors.push((
        "lm_head.weight".into(),
        vec![v, d],
        p[layout.wtet..layout.wtet + v * d].to_vec(),
    ));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_tensors(&out.join("model.safetensors"), &tensors, meta)?;

    let config = json!({
        "architectures": ["ImageGPTForCausalImageModeling"],
        "model_type": "imagegpt",
        "vocab_size": v + 1,
        "n_positions": t,
        "n_embd": d,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": null,
        "activation_function": "quick_gelu",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": false,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
    });
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let clusters: Vec<Vec<f64>> = (0..v)
        .map(|i| {
            let c = &m.palette.exact_centers()[i * cfg.channels..(i + 1) * cfg.channels];
            if cfg.channels == 1 {
                vec![c[0]; 3]
            } else {
                c.to_vec()
            }
        })
        .collect();
    let pre = json!({
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": clusters,
        "do_resize": true,
        "size": {"height": cfg.side, "width": cfg.side},
        "resample": 2,
        "do_normalize": true,
        "do_color_quantize": true,
    });
    write_atomic(
        &out.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&pre)?.as_bytes(),
    )
}
