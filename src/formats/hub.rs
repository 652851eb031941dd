//! Downloads: Hugging Face hub repositories (through the `hf-hub` crate, so the cache is the
//! one Python's `huggingface_hub` uses: `HF_HOME`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`) and
//! OpenAI's TensorFlow checkpoints by their published URL pattern.

use anyhow::{Context, Result, bail, ensure};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where OpenAI publishes the Image GPT checkpoints; `IGPT_TF_ENDPOINT` overrides it.
pub const OPENAI_TF_ENDPOINT: &str = "https://openaipublic.blob.core.windows.net/image-gpt";

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
        .unwrap_or(false)
}

/// Fetches `owner/name[@revision]` from the Hugging Face hub (or finds it in the cache) and
/// returns the local directory that holds its files.
pub fn fetch_hf(spec: &str) -> Result<PathBuf> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev.to_string()),
        None => (spec, "main".to_string()),
    };
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision);
    let needed = ["config.json", "preprocessor_config.json"];
    let weights = ["model.safetensors", "pytorch_model.bin"];
    if offline() {
        let cache = Cache::from_env();
        let cached = cache.repo(repo.clone());
        let mut dir = None;
        for f in needed {
            let p = cached.get(f).with_context(|| {
                format!(
                    "{spec}: {f} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                    cache.path().display()
                )
            })?;
            dir = p.parent().map(Path::to_path_buf);
        }
        ensure!(
            weights.iter().any(|w| cached.get(w).is_some()),
            "{spec}: no weights in the Hugging Face cache and HF_HUB_OFFLINE is set"
        );
        return dir.context("cache path without a parent");
    }
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let remote = api.repo(repo);
    let mut dir = None;
    for f in needed {
        let p = remote.get(f).with_context(|| {
            format!(
                "{spec} is not a local path, and fetching {f} from the Hugging Face hub failed \
                 (offline? set HF_HUB_OFFLINE=1 to use only the cache)"
            )
        })?;
        dir = p.parent().map(Path::to_path_buf);
    }
    let mut last_err = None;
    for w in weights {
        match remote.get(w) {
            Ok(_) => return dir.context("cache path without a parent"),
            Err(e) => last_err = Some(e),
        }
    }
    bail!(
        "{spec}: neither model.safetensors nor pytorch_model.bin could be fetched: {}",
        last_err.map(|e| e.to_string()).unwrap_or_default()
    )
}

/// igpt's own cache: `IGPT_CACHE`, else `$XDG_CACHE_HOME/igpt`, else `~/.cache/igpt`.
pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("IGPT_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("igpt");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache").join("igpt")
}

/// `igpt-{s,m,l}[-bert][@step]` (step 1000000 by default, as OpenAI's download script).
pub fn parse_tf_name(name: &str) -> Result<(String, u64)> {
    let (model, step) = match name.split_once('@') {
        Some((m, s)) => (
            m,
            s.parse::<u64>()
                .with_context(|| format!("checkpoint step {s:?} is not a number"))?,
        ),
        None => (name, 1_000_000),
    };
    let ok = ["igpt-s", "igpt-m", "igpt-l"]
        .iter()
        .any(|base| model == *base || model == format!("{base}-bert"));
    ensure!(
        ok,
        "unknown OpenAI checkpoint {model:?}: choose igpt-s, igpt-m or igpt-l, optionally \
         with -bert, and @STEP (131000, 262000, 524000 or 1000000)"
    );
    Ok((model.to_string(), step))
}

/// Downloads `url` to `dest` through a temporary file, so an interrupted download leaves
/// nothing that looks complete.
fn download(agent: &ureq::Agent, url: &str, dest: &Path) -> Result<()> {
    if dest.exists() {
        return Ok(());
    }
    if offline() {
        bail!("{} is not cached and HF_HUB_OFFLINE is set", dest.display());
    }
    let resp = agent
        .get(url)
        .call()
        .with_context(|| format!("cannot download {url}"))?;
    let tmp = dest.with_extension("part");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let name = dest
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let bar = match resp
        .header("Content-Length")
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_message(name);
    let mut reader = bar.wrap_read(resp.into_reader());
    std::io::copy(&mut reader, &mut file)
        .and_then(|_| file.flush())
        .with_context(|| format!("download of {url} failed part-way (disk full?)"))?;
    bar.finish_and_clear();
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(())
}

/// Fetches an OpenAI TensorFlow checkpoint and the palette into igpt's cache; returns the
/// checkpoint prefix. The shard count is read from the index, so only what exists is asked for.
pub fn fetch_tf(name: &str) -> Result<PathBuf> {
    let (model, step) = parse_tf_name(name)?;
    let base = std::env::var("IGPT_TF_ENDPOINT").unwrap_or_else(|_| OPENAI_TF_ENDPOINT.into());
    let base = base.trim_end_matches('/');
    let dir = cache_dir()
        .join("openai")
        .join(&model)
        .join(step.to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let agent = ureq::AgentBuilder::new().build();
    let remote = format!("{base}/checkpoints/{model}/{step}");
    let stem = format!("model.ckpt-{step}");
    download(
        &agent,
        &format!("{remote}/{stem}.index"),
        &dir.join(format!("{stem}.index")),
    )?;
    let index = std::fs::read(dir.join(format!("{stem}.index")))?;
    let (n_shards, _) = super::tf::parse_index(&index)
        .with_context(|| format!("{remote}/{stem}.index is not a checkpoint index"))?;
    for s in 0..n_shards {
        let file = format!("{stem}.data-{s:05}-of-{n_shards:05}");
        download(&agent, &format!("{remote}/{file}"), &dir.join(&file))?;
    }
    download(
        &agent,
        &format!("{base}/color-clusters/kmeans_centers.npy"),
        &dir.join("kmeans_centers.npy"),
    )?;
    Ok(dir.join(stem))
}
