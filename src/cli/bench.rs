//! `igpt bench`: igpt against the PyTorch baseline (scripts/torch_baseline.py), same model,
//! same threads, same machine, in one invocation. With `--device cuda` both sides run on the
//! same GPU.

use anyhow::{Context, Result, ensure};
use clap::{Args, Subcommand};
use igpt::backend::{Device, Precision};
use igpt::checkpoint::LoadedModel;
use igpt::config::ModelConfig;
use igpt::data::TokenSet;
use igpt::train::{TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The rate MFU is measured against: an H100 SXM's dense bf16 tensor-core peak, as llm.c's
/// mfu.h counts it (an H200 has the same compute; only its memory differs).
pub const PEAK_FLOPS: f64 = 989e12;

/// Training FLOPs per token as llm.c counts them: 6 per parameter (2 forward, 4 backward), and
/// 6·L·d·T for attention's two products over the context (the causal half of 12·L·d·T).
pub fn train_flops_per_token(cfg: &ModelConfig) -> f64 {
    let n = igpt::model::ParamLayout::new(cfg).total as f64;
    6.0 * n + 6.0 * (cfg.n_layer * cfg.n_embd * cfg.n_ctx()) as f64
}

/// Model FLOPs utilisation of a training run at `tokens_per_s`, as a fraction of [`PEAK_FLOPS`].
pub fn mfu(cfg: &ModelConfig, tokens_per_s: f64) -> f64 {
    tokens_per_s * train_flops_per_token(cfg) / PEAK_FLOPS
}

/// A Python baseline script: where this source tree was built, else the first `scripts/`
/// found walking up from the executable (a binary built elsewhere and carried to a GPU machine
/// as `<repo>/gpu/igpt`), else `IGPT_SCRIPTS` names the folder.
fn script_path(name: &str) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("IGPT_SCRIPTS") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts"));
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.ancestors().skip(1).map(|d| d.join("scripts")));
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "cannot find scripts/{name} (looked in {}); set IGPT_SCRIPTS to the folder",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The GPU `dev` is, if it is one.
fn gpu_ordinal(dev: &Device) -> Option<usize> {
    match dev {
        Device::Cuda(gpu) => Some(gpu.ordinal),
        _ => None,
    }
}

/// The host clock, once `dev` has finished everything queued on it: GPU work runs
/// asynchronously, and the last kernels of a step (the optimizer's) come after its last
/// download.
fn clock(dev: &Device) -> Result<Instant> {
    if let Some(ordinal) = gpu_ordinal(dev) {
        igpt::backend::cuda::synchronize(ordinal)?;
    }
    Ok(Instant::now())
}

/// Bytes of memory a run took: on a GPU, the device's memory in use now (the driver's count,
/// read while the run's engine is alive); on the CPU, the process's peak resident memory.
fn memory_bytes(dev: &Device) -> Option<f64> {
    match gpu_ordinal(dev) {
        Some(ordinal) => igpt::backend::cuda::memory_in_use(ordinal).map(|b| b as f64),
        None => peak_rss_mb().map(|mb| mb * 1024.0 * 1024.0),
    }
}

/// Writes a benchmark's numbers to `path` (when asked for); called after each stage, so a run
/// cut short still leaves what it measured. Written whole, then renamed into place, so a reader
/// (scripts/gpu_check.sh, after a time limit) never sees half a file.
fn write_json(path: Option<&Path>, v: &serde_json::Value) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(v)? + "\n";
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Training throughput and peak memory: igpt, then PyTorch eager (SDPA), and the ratio.
    Train(TrainBench),
    /// Generation speed (tokens/s) at batch 1 and 8: igpt, a PyTorch loop with its own KV cache,
    /// and Hugging Face `generate()`, with the ratios, bytes read per token and bandwidth.
    Generate(GenerateBench),
    /// `igpt complete` end to end (loading included) on a random model saved to disk, against
    /// Hugging Face `generate()` completing the same number of pixels.
    Complete(CompleteBench),
    /// `igpt serve` under load: many clients completing at once, answered one request at a
    /// time against shared rounds, on a random model.
    Serve(ServeBench),
}

/// Model shapes with their usual names.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Shape {
    /// iGPT-tiny: 8 layers, d=256, 8 heads.
    Tiny,
    /// iGPT-S: 24 layers, d=512, 8 heads (76 M parameters).
    Small,
    /// iGPT-M: 36 layers, d=1024, 8 heads (455 M parameters).
    Medium,
    /// iGPT-L: 48 layers, d=1536, 16 heads (1.36 B parameters).
    Large,
}

/// The model the benchmarks use (a shape, 512 RGB colours, 32x32), any part overridden.
#[derive(Args)]
pub struct BenchModel {
    #[arg(long, value_enum, default_value = "tiny")]
    shape: Shape,
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    embd: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    /// Image side (context = side^2 tokens).
    #[arg(long, default_value_t = 32)]
    side: usize,
}

impl BenchModel {
    fn config(&self) -> Result<ModelConfig> {
        let (layers, embd, heads) = match self.shape {
            Shape::Tiny => (8, 256, 8),
            Shape::Small => (24, 512, 8),
            Shape::Medium => (36, 1024, 8),
            Shape::Large => (48, 1536, 16),
        };
        let cfg = ModelConfig {
            n_layer: self.layers.unwrap_or(layers),
            n_embd: self.embd.unwrap_or(embd),
            n_head: self.heads.unwrap_or(heads),
            n_vocab: self.vocab,
            side: self.side,
            channels: 3,
            objective: Default::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The shape, for a JSON report.
    fn json(&self) -> Result<serde_json::Value> {
        let c = self.config()?;
        Ok(serde_json::json!({
            "layers": c.n_layer,
            "embd": c.n_embd,
            "heads": c.n_head,
            "vocab": c.n_vocab,
            "ctx": c.n_ctx(),
            "params": igpt::model::ParamLayout::new(&c).total,
        }))
    }

    /// The same shape as arguments of the Python baselines.
    fn python_args(&self) -> Result<Vec<String>> {
        let c = self.config()?;
        let pairs = [
            ("--layers", c.n_layer),
            ("--embd", c.n_embd),
            ("--heads", c.n_head),
            ("--vocab", c.n_vocab),
            ("--ctx", c.n_ctx()),
        ];
        Ok(pairs
            .iter()
            .flat_map(|(k, v)| [k.to_string(), v.to_string()])
            .collect())
    }
}

/// What the generation benchmarks run: igpt at these precisions, then the Python baselines.
#[derive(Args)]
pub struct Runs {
    /// Precisions igpt runs at.
    #[arg(long, num_args = 1.., default_values_t = vec![Precision::F32, Precision::Bf16])]
    precisions: Vec<Precision>,
    #[arg(long, default_value = "python3")]
    python: String,
    /// Only measure igpt.
    #[arg(long)]
    no_python: bool,
}

/// A random model of `cfg`'s shape, with a head that is not zero (so sampling is not uniform).
fn random_params(cfg: &ModelConfig) -> Vec<f32> {
    let mut params = igpt::model::init_params(cfg, 0);
    let layout = igpt::model::ParamLayout::new(cfg);
    for (i, p) in params[layout.wtet..layout.wtet + cfg.n_vocab * cfg.n_embd]
        .iter_mut()
        .enumerate()
    {
        *p = ((i * 2654435761) % 1000) as f32 / 1000.0 * 0.04 - 0.02;
    }
    params
}

/// A random RGB model of `cfg`'s shape with a random palette.
fn random_model(cfg: &ModelConfig) -> Result<LoadedModel> {
    let centers: Vec<f32> = (0..cfg.n_vocab * 3)
        .map(|i| ((i * 2654435761) % 255) as f32 / 127.5 - 1.0)
        .collect();
    Ok(LoadedModel {
        config: igpt::checkpoint::RunConfig {
            model: cfg.clone(),
            train: Default::default(),
            data: "random weights (igpt bench)".into(),
            igpt_version: env!("CARGO_PKG_VERSION").into(),
        },
        palette: igpt::palette::Palette::new(3, centers)?,
        params: random_params(cfg),
    })
}

#[derive(Args)]
pub struct GenerateBench {
    #[command(flatten)]
    model: BenchModel,
    /// Batch sizes to measure.
    #[arg(long, num_args = 1.., default_values_t = vec![1, 8])]
    batches: Vec<usize>,
    #[command(flatten)]
    runs: Runs,
    /// Also write the numbers here, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct CompleteBench {
    #[command(flatten)]
    model: BenchModel,
    /// The image to complete (the top half is kept).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/chelsea-rgb-131x97.png"))]
    image: PathBuf,
    /// Completions.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Write the random model here and keep it (default: a temporary folder, removed after).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    #[command(flatten)]
    runs: Runs,
}

#[derive(Args)]
pub struct ServeBench {
    #[command(flatten)]
    model: BenchModel,
    /// The image every client completes (the top half is kept).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/chelsea-rgb-131x97.png"))]
    image: PathBuf,
    /// Clients sending a request at the same moment.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Completions each client asks for.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long)]
    precision: Option<Precision>,
}

#[derive(Args)]
pub struct TrainBench {
    #[command(flatten)]
    model: BenchModel,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed steps (after the untimed warm-up steps).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first, each side (default: 1 on the CPU; 3 on a GPU, where the first
    /// steps also load kernels, pick cuBLAS algorithms and, for torch.compile, compile).
    #[arg(long)]
    warmup: Option<usize>,
    /// Precision of igpt's training products: bf16 (tensor cores, f32 accumulation; GPU only)
    /// or f32 (default: bf16 on a GPU, f32 on the CPU).
    #[arg(long)]
    precision: Option<Precision>,
    /// Python interpreter with torch installed.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Only measure igpt.
    #[arg(long)]
    no_torch: bool,
    /// Also write the numbers here, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Then run --steps more steps with every kernel call timed (each waited for) and print
    /// each kernel's share of the step.
    #[arg(long)]
    profile: bool,
}

/// Peak resident memory of this process so far, in MB (Linux).
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(cmd: BenchCmd, dev: &Device) -> Result<()> {
    match cmd {
        BenchCmd::Train(b) => train(b, dev),
        BenchCmd::Generate(b) => generate(b, dev),
        BenchCmd::Complete(b) => complete(b, dev),
        BenchCmd::Serve(b) => serve(b, dev),
    }
}

/// Runs a Python baseline script and returns its JSON lines.
fn python_baseline(python: &str, script: &str, args: &[String]) -> Result<Vec<serde_json::Value>> {
    let script = script_path(script)?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {python} {}", script.display()))?;
    if !out.status.success() {
        // A failed torch.compile prints pages; the end says why.
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = {
            let chars: Vec<char> = err.chars().collect();
            chars[chars.len().saturating_sub(4000)..].iter().collect()
        };
        anyhow::bail!(
            "the PyTorch baseline {} failed ({}; pip install torch transformers):\n{tail}",
            script.display(),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Best-of-five streaming read bandwidth (GB/s) over `bytes` bytes on the current thread pool.
fn stream_read_gbs(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let buf = vec![1.0f32; bytes / 4];
    let mut best = f64::INFINITY;
    let mut sink = 0.0;
    for _ in 0..5 {
        let t0 = Instant::now();
        // A vectorised dot product of each chunk with itself reads it once.
        sink += buf
            .par_chunks(1 << 16)
            .map(|c| igpt::backend::cpu::simd::dot(c, c))
            .sum::<f32>();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    bytes as f64 / best / 1e9
}

/// Bytes one decoding step reads on average over a whole image: every weight matrix once
/// (at the precision's width; gains, embeddings and the head's bias-free rows in f32), and
/// each sequence's keys and values for every position so far.
fn bytes_per_step(cfg: &ModelConfig, batch: usize, precision: Precision) -> f64 {
    let (d, l, v, t) = (
        cfg.n_embd as f64,
        cfg.n_layer as f64,
        cfg.n_vocab as f64,
        cfg.n_ctx() as f64,
    );
    let width = match precision {
        Precision::F32 => 4.0,
        Precision::Bf16 => 2.0,
    };
    let matrices = l * 12.0 * d * d + v * d;
    let cache = batch as f64 * l * 2.0 * d * (t + 1.0) / 2.0;
    width * (matrices + cache)
}

/// One timed generation of a whole image per sequence.
struct TimedGeneration {
    secs: f64,
    /// Device memory in use while the decoder was alive (a GPU's).
    memory: Option<f64>,
    /// Whether steps were replayed from recordings (CUDA graphs), and why not where recording
    /// failed.
    replayed: bool,
    replay_failure: Option<String>,
}

fn time_generation(
    model: &ModelConfig,
    batch: usize,
    dev: &Device,
    params: &[f32],
    precision: Precision,
    replay: bool,
) -> Result<TimedGeneration> {
    use igpt::model::Decoder;
    use igpt::sample::{self, SampleOptions};
    let mut dec = Decoder::with_precision(model, batch, dev, params.to_vec(), precision)?;
    dec.set_replay(replay);
    let prefixes = vec![&[][..]; batch];
    let opts = SampleOptions::default();
    let secs = rayon::scope(|_| -> Result<f64> {
        // Warm-up: the first positions of one image, drawn as generation draws them (pages
        // touched, threads awake, kernels loaded, steps recorded).
        let numbers = vec![0.5; batch * model.n_ctx()];
        dec.set_draws(&vec![opts; batch], &numbers)?;
        dec.step_drawing(Some(&vec![0; batch]))?;
        for _ in 1..16 {
            dec.step_drawing(None)?;
        }
        let t0 = clock(dev)?;
        sample::generate(&mut dec, &prefixes, &opts, 0, |_, _| {})?;
        Ok(clock(dev)?.duration_since(t0).as_secs_f64())
    })?;
    Ok(TimedGeneration {
        secs,
        // Read while the decoder (its weights and caches) is still on the device.
        memory: memory_bytes(dev),
        replayed: dec.replaying(),
        replay_failure: dec.replay_failure().map(str::to_string),
    })
}

/// The CPU's draws of a generation step (a GPU draws on the device once no image has a known
/// pixel left; steps that still have one draw on the host): every image's next colour from its logits
/// (random logits of the model's palette), per batch size, on one thread and on every thread,
/// at temperature 1 and with top-k 40 and top-p 0.9. Prints a line per batch; returns the
/// numbers for the JSON report.
fn time_sampling(model: &ModelConfig, batches: &[usize]) -> Result<serde_json::Value> {
    use igpt::sample::{ImageSpec, SampleOptions, draw_numbers, next_tokens};
    use rand::{Rng, SeedableRng};
    let threads = rayon::current_num_threads();
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .context("cannot start a thread pool")?;
    let plain = SampleOptions::default();
    let restricted = SampleOptions {
        top_k: 40,
        top_p: 0.9,
        ..plain
    };
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut out = Vec::new();
    for &batch in batches {
        let logits: Vec<f32> = (0..batch * model.n_vocab)
            .map(|_| r.random::<f32>() * 8.0)
            .collect();
        let live: Vec<usize> = (0..batch).collect();
        let per_step = |opts: SampleOptions, pool: Option<&rayon::ThreadPool>| {
            let specs: Vec<ImageSpec> = (0..batch as u64)
                .map(|stream| ImageSpec {
                    prefix: &[],
                    opts,
                    stream,
                })
                .collect();
            let steps = 200;
            let mut numbers = vec![0.0; batch * steps];
            for (spec, row) in specs.iter().zip(numbers.chunks_mut(steps)) {
                draw_numbers(spec, row);
            }
            let mut drawn = Vec::with_capacity(batch);
            let mut run = || {
                let t0 = Instant::now();
                for pos in 0..steps {
                    next_tokens(&logits, &live, &specs, pos, &numbers, &mut drawn);
                    std::hint::black_box(&drawn);
                }
                t0.elapsed().as_secs_f64() / steps as f64 * 1e6
            };
            match pool {
                Some(p) => p.install(run),
                None => run(),
            }
        };
        let row = serde_json::json!({
            "batch": batch,
            "us_per_step_one_thread": per_step(plain, Some(&one_thread)),
            "us_per_step_all_threads": per_step(plain, None),
            "top_k_top_p_us_per_step_one_thread": per_step(restricted, Some(&one_thread)),
            "top_k_top_p_us_per_step_all_threads": per_step(restricted, None),
        });
        let us = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "host sampling, batch {batch:>3}: {:.1} us per step on 1 thread, {:.1} on {threads}; \
             with top-k 40 and top-p 0.9: {:.1} and {:.1}",
            us("us_per_step_one_thread"),
            us("us_per_step_all_threads"),
            us("top_k_top_p_us_per_step_one_thread"),
            us("top_k_top_p_us_per_step_all_threads"),
        );
        out.push(row);
    }
    Ok(serde_json::Value::Array(out))
}

fn generate(b: GenerateBench, dev: &Device) -> Result<()> {
    use serde_json::json;
    let threads = rayon::current_num_threads();
    let model = b.model.config()?;
    let t = model.n_ctx();
    let on_gpu = gpu_ordinal(dev).is_some();
    println!(
        "model: {} layers, d={}, {} heads, vocab {}, {} tokens per image, on {dev}, {} threads",
        model.n_layer, model.n_embd, model.n_head, model.n_vocab, t, threads
    );
    let params = random_params(&model);
    let mut report = json!({
        "bench": "generate",
        "device": dev.to_string(),
        "model": b.model.json()?,
        "threads": threads,
        "runs": [],
    });
    let mut ours = Vec::new();
    // On a GPU each step is replayed from a CUDA graph; the same steps issued call by call
    // show what the graphs save.
    let replays: &[bool] = if on_gpu { &[true, false] } else { &[true] };
    for &precision in &b.runs.precisions {
        for &batch in &b.batches {
            for &replay in replays {
                let TimedGeneration {
                    secs,
                    memory,
                    replayed,
                    replay_failure,
                } = time_generation(&model, batch, dev, &params, precision, replay)?;
                let tps = (batch * t) as f64 / secs;
                let step_bytes = bytes_per_step(&model, batch, precision);
                let gbs = step_bytes * t as f64 / secs / 1e9;
                let name = if replay {
                    format!("igpt-{precision}")
                } else {
                    format!("igpt-{precision}-calls")
                };
                if let Some(why) = &replay_failure {
                    println!("{name}: steps issued call by call, recording failed: {why}");
                }
                if on_gpu {
                    // The CPU's streaming read is no bound for a GPU's memory.
                    println!(
                        "{name:<14} batch {batch:>2}: {tps:>8.0} tokens/s ({secs:.2} s); reads {:.1} MB \
                     per token, {gbs:.1} GB/s; device memory in use {:.2} GB",
                        step_bytes / batch as f64 / 1e6,
                        memory.unwrap_or(f64::NAN) / 1e9
                    );
                } else {
                    let limit = stream_read_gbs(step_bytes as usize);
                    println!(
                        "igpt {precision:<4}      batch {batch:>2}: {tps:>8.0} tokens/s ({secs:.2} s); reads \
                     {:.1} MB per token, {gbs:.1} GB/s against a {limit:.1} GB/s streaming read \
                     of the same size ({:.0}%)",
                        step_bytes / batch as f64 / 1e6,
                        100.0 * gbs / limit
                    );
                }
                report["runs"].as_array_mut().expect("runs").push(json!({
                    "impl": name,
                    "batch": batch,
                    "tokens_per_s": tps,
                    "seconds": secs,
                    "read_gb_per_s": gbs,
                    "memory_bytes": memory,
                    "replayed": replayed,
                    "replay_failure": replay_failure,
                }));
                write_json(b.json.as_deref(), &report)?;
                if replay {
                    ours.push((precision, batch, tps));
                }
            }
        }
    }
    report["sampling"] = time_sampling(&model, &b.batches)?;
    write_json(b.json.as_deref(), &report)?;
    if b.runs.no_python {
        return Ok(());
    }
    let mut args = b.model.python_args()?;
    args.extend(["--threads".into(), threads.to_string(), "--batches".into()]);
    args.extend(b.batches.iter().map(|x| x.to_string()));
    if on_gpu {
        args.extend(["--device".into(), "cuda".into()]);
    }
    let lines = match python_baseline(&b.runs.python, "torch_generate_baseline.py", &args) {
        Ok(lines) => lines,
        Err(e) => {
            // igpt's numbers are already written; the report says what failed.
            report["baseline_error"] = json!(format!("{e:#}"));
            write_json(b.json.as_deref(), &report)?;
            return Err(e);
        }
    };
    for v in lines {
        let (Some(name), Some(batch), Some(tps)) = (
            v["impl"].as_str(),
            v["batch"].as_u64(),
            v["tokens_per_s"].as_f64(),
        ) else {
            if let Some(note) = v["note"].as_str() {
                println!("note: {note}");
                match report["notes"].as_array_mut() {
                    Some(notes) => notes.push(json!(note)),
                    None => report["notes"] = json!([note]),
                }
            }
            continue;
        };
        let mine: Vec<_> = ours.iter().filter(|o| o.1 == batch as usize).collect();
        let ratios: Vec<String> = mine
            .iter()
            .map(|o| format!("igpt {} is {:.1}x", o.0, o.2 / tps))
            .collect();
        println!(
            "{name:<14} batch {batch:>2}: {tps:>8.0} tokens/s   {}",
            ratios.join(", ")
        );
        let mut run = v.clone();
        run["igpt_over_this"] = mine
            .iter()
            .map(|o| (format!("igpt-{}", o.0), json!(o.2 / tps)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        report["runs"].as_array_mut().expect("runs").push(run);
    }
    write_json(b.json.as_deref(), &report)
}

fn complete(b: CompleteBench, dev: &Device) -> Result<()> {
    let threads = rayon::current_num_threads();
    let model = b.model.config()?;
    let (t, side) = (model.n_ctx(), model.side);
    let keep = side / 2 * side;
    println!(
        "model: {} layers, d={}, {} heads, vocab {}, {side}x{side}; {} completions of {} from \
         its top {} rows; {threads} threads",
        model.n_layer,
        model.n_embd,
        model.n_head,
        model.n_vocab,
        b.k,
        b.image.display(),
        side / 2
    );
    let dir = b.model_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("igpt-bench-complete-{}", std::process::id()))
    });
    let run = igpt::checkpoint::RunDir::create(&dir)?;
    let random = random_model(&model)?;
    run.save_config(&random.config)?;
    run.save_palette(&random.palette)?;
    run.save_model(&model, &random.params)?;
    let exe = std::env::current_exe().context("cannot find the igpt executable")?;
    let mut ours = Vec::new();
    for &precision in &b.runs.precisions {
        let t0 = Instant::now();
        let out = std::process::Command::new(&exe)
            .args([
                "--threads",
                &threads.to_string(),
                "--device",
                &dev.to_string(),
            ])
            .arg("complete")
            .arg("--model")
            .arg(&dir)
            .arg("--images")
            .arg(&b.image)
            .args([
                "--k",
                &b.k.to_string(),
                "--precision",
                &precision.to_string(),
            ])
            .arg("--out")
            .arg(dir.join("completions.png"))
            .output()
            .context("cannot run igpt complete")?;
        let secs = t0.elapsed().as_secs_f64();
        ensure!(
            out.status.success(),
            "igpt complete failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("igpt complete {precision:<4}: {secs:>6.2} s end to end (loading included)");
        ours.push((precision, secs));
    }
    if b.model_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if b.runs.no_python {
        return Ok(());
    }
    let mut args = b.model.python_args()?;
    args.extend([
        "--threads".into(),
        threads.to_string(),
        "--mode".into(),
        "complete".into(),
        "--keep".into(),
        keep.to_string(),
        "--k".into(),
        b.k.to_string(),
    ]);
    for v in python_baseline(&b.runs.python, "torch_generate_baseline.py", &args)? {
        let (Some(name), Some(secs)) = (v["impl"].as_str(), v["seconds"].as_f64()) else {
            continue;
        };
        let ratios: Vec<String> = ours
            .iter()
            .map(|o| format!("igpt {} is {:.1}x", o.0, secs / o.1))
            .collect();
        println!(
            "{name} (generation only, {} new pixels): {secs:>6.2} s   {}",
            b.k * (t - keep),
            ratios.join(", ")
        );
    }
    Ok(())
}

/// One training run's numbers, igpt's or a baseline's.
struct TrainRun {
    name: String,
    step_s: f64,
    memory_bytes: Option<f64>,
}

/// A trainer of `model` at `batch` images of random tokens, and its one batch.
fn bench_trainer(model: &ModelConfig, batch: usize, dev: &Device) -> Result<(Trainer, TokenSet)> {
    let cfg = TrainConfig {
        steps: 1000,
        batch,
        micro_batch: batch,
        warmup: 10,
        ..TrainConfig::default()
    };
    let params = igpt::model::init_params(model, 0);
    let trainer = Trainer::new(model, cfg, &params, dev)?;
    let t = model.n_ctx();
    let tokens: Vec<u16> = (0..batch * t)
        .map(|i| ((i as u64 * 2654435761) % model.n_vocab as u64) as u16)
        .collect();
    let data = TokenSet::from_tokens(tokens, t, model.n_vocab, None)?;
    Ok((trainer, data))
}

/// `steps` training steps with every kernel call timed: prints each kernel's time per step
/// and share, and returns them as JSON.
fn profile_training(
    model: &ModelConfig,
    batch: usize,
    dev: &Device,
    steps: usize,
) -> Result<serde_json::Value> {
    let profile = igpt::backend::profile::Profile::start();
    let (mut trainer, data) = bench_trainer(model, batch, dev)?;
    trainer.step(&data)?;
    profile.reset();
    let t0 = clock(dev)?;
    for _ in 0..steps {
        trainer.step(&data)?;
    }
    let step_s = clock(dev)?.duration_since(t0).as_secs_f64() / steps as f64;
    let kernels = profile.kernels();
    println!(
        "profile: {steps} steps, each kernel call waited for ({:.3} s/step profiled)",
        step_s
    );
    println!(
        "{:<24} {:>10} {:>11} {:>7}",
        "kernel", "calls/step", "ms/step", "share"
    );
    let mut in_kernels = 0.0;
    for k in &kernels {
        let per_step = k.seconds / steps as f64;
        in_kernels += per_step;
        println!(
            "{:<24} {:>10.0} {:>11.3} {:>6.1}%",
            k.kernel,
            k.calls as f64 / steps as f64,
            1e3 * per_step,
            100.0 * per_step / step_s
        );
    }
    let outside = (step_s - in_kernels).max(0.0);
    println!(
        "{:<24} {:>10} {:>11.3} {:>6.1}%",
        "(outside kernels)",
        "",
        1e3 * outside,
        100.0 * outside / step_s
    );
    Ok(serde_json::json!({
        "steps": steps,
        "step_s": step_s,
        "kernels": kernels,
        "outside_kernels_s": outside,
    }))
}

fn train(b: TrainBench, dev: &Device) -> Result<()> {
    use serde_json::json;
    let on_gpu = gpu_ordinal(dev).is_some();
    let precision = b.precision.unwrap_or(if on_gpu {
        Precision::Bf16
    } else {
        Precision::F32
    });
    let dev = &dev.with_training_precision(precision)?;
    let warmup = b.warmup.unwrap_or(if on_gpu { 3 } else { 1 });
    ensure!(b.steps >= 1, "--steps must be at least 1");
    let threads = rayon::current_num_threads();
    let model = b.model.config()?;
    let t = model.n_ctx();
    let tokens_per_step = (b.batch * t) as f64;
    println!(
        "model: {} layers, d={}, {} heads, vocab {}, context {}, batch {}, {precision} products, \
         on {dev}, {} threads",
        model.n_layer, model.n_embd, model.n_head, model.n_vocab, t, b.batch, threads
    );
    let mut report = json!({
        "bench": "train",
        "device": dev.to_string(),
        "precision": precision.to_string(),
        "model": b.model.json()?,
        "batch": b.batch,
        "tokens_per_step": tokens_per_step,
        "steps": b.steps,
        "warmup": warmup,
        "flops_per_token": train_flops_per_token(&model),
        "peak_flops": PEAK_FLOPS,
        "memory": if on_gpu {
            "igpt: the GPU's memory in use after the timed steps, engine alive (driver's count, \
             CUDA context included); PyTorch: torch.cuda.max_memory_allocated, and \
             device_in_use_bytes counted as igpt's"
        } else {
            "peak resident memory of each process"
        },
        "runs": [],
    });
    // Each run's line and JSON entry, with MFU on a GPU (against a CPU it says nothing).
    let record = |report: &mut serde_json::Value, run: &TrainRun, extra: serde_json::Value| {
        let tps = tokens_per_step / run.step_s;
        let mem = run.memory_bytes.unwrap_or(f64::NAN);
        if on_gpu {
            println!(
                "{:<16} {:.3} s/step  {tps:>9.0} tokens/s  MFU {:>5.1}%  memory {:.2} GB",
                run.name,
                run.step_s,
                100.0 * mfu(&model, tps),
                mem / 1e9
            );
        } else {
            println!(
                "{:<16} {:.3} s/step  {tps:>9.0} tokens/s  peak RSS {:.0} MB",
                run.name,
                run.step_s,
                mem / (1024.0 * 1024.0)
            );
        }
        let mut v = json!({
            "impl": run.name,
            "step_s": run.step_s,
            "tokens_per_s": tps,
            "mfu": on_gpu.then(|| mfu(&model, tps)),
            "memory_bytes": run.memory_bytes,
        });
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        report["runs"].as_array_mut().expect("runs").push(v);
    };

    // igpt; on a GPU also with every call issued one by one instead of replaying the passes'
    // and the update's recordings (CUDA graphs), to show what the graphs save.
    let time_igpt = |replay: bool| -> Result<(TrainRun, Option<String>, bool)> {
        let (mut trainer, data) = bench_trainer(&model, b.batch, dev)?;
        trainer.engine.set_replay(replay);
        for _ in 0..warmup {
            trainer.step(&data)?;
        }
        let t0 = clock(dev)?;
        for _ in 0..b.steps {
            trainer.step(&data)?;
        }
        let step_s = clock(dev)?.duration_since(t0).as_secs_f64() / b.steps as f64;
        let failure = trainer.engine.replay_failure().map(str::to_string);
        let replayed = trainer.engine.replaying();
        // Read before the trainer is dropped: its arenas are the memory in question, and they
        // are freed before PyTorch runs on the same GPU.
        let run = TrainRun {
            name: if replay { "igpt" } else { "igpt-calls" }.into(),
            step_s,
            memory_bytes: memory_bytes(dev),
        };
        Ok((run, failure, replayed))
    };
    let (ours, failure, replayed) = time_igpt(true)?;
    record(
        &mut report,
        &ours,
        json!({ "replayed": replayed, "replay_failure": failure }),
    );
    if let Some(why) = &failure {
        println!("note: igpt's passes or updates ran call by call, not as CUDA graphs: {why}");
    }
    if on_gpu {
        let (calls, _, replayed) = time_igpt(false)?;
        record(&mut report, &calls, json!({ "replayed": replayed }));
    }
    write_json(b.json.as_deref(), &report)?;
    if b.profile {
        report["profile"] = profile_training(&model, b.batch, dev, b.steps)?;
        write_json(b.json.as_deref(), &report)?;
    }
    if b.no_torch {
        return Ok(());
    }

    // PyTorch eager, and on a GPU also torch.compile (the stronger baseline there).
    let variants: &[bool] = if on_gpu { &[false, true] } else { &[false] };
    let mut failures = Vec::new();
    for &compile in variants {
        let name = if compile {
            "pytorch-compile"
        } else {
            "pytorch-eager"
        };
        let mut args = b.model.python_args()?;
        args.extend(
            [
                "--batch",
                &b.batch.to_string(),
                "--threads",
                &threads.to_string(),
                "--steps",
                &b.steps.to_string(),
                "--warmup",
                &warmup.to_string(),
            ]
            .map(String::from),
        );
        if on_gpu {
            args.extend(["--device".into(), "cuda".into()]);
        }
        if compile {
            args.push("--compile".into());
        }
        let result = python_baseline(&b.python, "torch_baseline.py", &args).and_then(|lines| {
            let v = lines
                .last()
                .cloned()
                .context("the baseline printed no JSON line")?;
            let step_s = v["step_s"].as_f64().context("baseline gave no step_s")?;
            Ok((v, step_s))
        });
        let (v, step_s) = match result {
            Ok(r) => r,
            Err(e) => {
                println!("{name:<16} failed: {e:#}");
                report["runs"]
                    .as_array_mut()
                    .expect("runs")
                    .push(json!({"impl": name, "error": format!("{e:#}")}));
                write_json(b.json.as_deref(), &report)?;
                failures.push(name);
                continue;
            }
        };
        // Against igpt's count: the driver's, where the baseline reports it; else the peak
        // of what it allocated (GPU) or its peak RSS (CPU).
        let memory_bytes = v["device_in_use_bytes"]
            .as_f64()
            .or_else(|| v["peak_rss_mb"].as_f64().map(|mb| mb * 1024.0 * 1024.0));
        let run = TrainRun {
            name: name.into(),
            step_s,
            memory_bytes,
        };
        let ratio = json!({
            "igpt_over_this_throughput": step_s / ours.step_s,
            "igpt_over_this_memory": ours.memory_bytes.zip(memory_bytes).map(|(a, b)| a / b),
        });
        let mut extra = v.clone();
        if let (Some(e), Some(r)) = (extra.as_object_mut(), ratio.as_object()) {
            e.extend(r.clone());
        }
        record(&mut report, &run, extra);
        if let Some(peak) = v["peak_memory_bytes"].as_f64() {
            println!(
                "{:<16} max_memory_allocated {:.2} GB (torch {}{})",
                "",
                peak / 1e9,
                v["torch"].as_str().unwrap_or("?"),
                v["gpu"]
                    .as_str()
                    .map(|g| format!(", {g}"))
                    .unwrap_or_default()
            );
        }
        println!(
            "ratio:           igpt is {:.2}x the {name} throughput with {:.2}x its memory",
            step_s / ours.step_s,
            ours.memory_bytes.unwrap_or(f64::NAN) / memory_bytes.unwrap_or(f64::NAN)
        );
        write_json(b.json.as_deref(), &report)?;
    }
    ensure!(
        failures.is_empty(),
        "baseline(s) failed: {} (see above; igpt's numbers were measured)",
        failures.join(", ")
    );
    Ok(())
}

/// One client's request: when its first generated row and its last event arrived.
struct ClientTimes {
    first_row: f64,
    done: f64,
}

/// Sends `/api/complete` and reads the stream to its end.
fn serve_client(url: &str, png: &[u8], start: Instant) -> Result<ClientTimes> {
    use std::io::BufRead;
    let r = ureq::post(url)
        .send_bytes(png)
        .with_context(|| format!("POST {url}"))?;
    let mut first_row = None;
    let mut saw_done = false;
    for line in std::io::BufReader::new(r.into_reader()).lines() {
        let line = line.context("reading the event stream")?;
        if line == "event: row" && first_row.is_none() {
            first_row = Some(start.elapsed().as_secs_f64());
        }
        if line == "event: done" {
            saw_done = true;
        }
        ensure!(line != "event: error", "the server answered an error");
    }
    ensure!(saw_done, "the stream ended without its images");
    Ok(ClientTimes {
        first_row: first_row.context("no row was streamed")?,
        done: start.elapsed().as_secs_f64(),
    })
}

fn serve(b: ServeBench, dev: &Device) -> Result<()> {
    ensure!(
        b.clients >= 1 && b.n >= 1,
        "--clients and --n must be at least 1"
    );
    let model = b.model.config()?;
    let (t, side) = (model.n_ctx(), model.side);
    let keep = side / 2 * side;
    let png =
        std::fs::read(&b.image).with_context(|| format!("cannot read {}", b.image.display()))?;
    let precision = b.precision.unwrap_or_else(|| dev.inference_precision());
    println!(
        "model: {} layers, d={}, {} heads, vocab {}, {side}x{side}, {precision}; {} clients at \
         once, {} completion(s) each of {} from its top {} rows; {} threads",
        model.n_layer,
        model.n_embd,
        model.n_head,
        model.n_vocab,
        b.clients,
        b.n,
        b.image.display(),
        side / 2,
        rayon::current_num_threads()
    );
    let tokens = (b.clients * b.n * (t - keep)) as f64;
    let mut walls = Vec::new();
    for (name, batch, gather_ms) in [
        ("one request at a time", b.n, 0),
        ("shared rounds", b.clients * b.n, 30),
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let opts = igpt::serve::ServeOptions {
            limits: igpt::serve::Limits {
                max_images: b.n,
                queue: b.clients,
                ..Default::default()
            },
            batch,
            gather: std::time::Duration::from_millis(gather_ms),
            precision,
            model_name: "random".into(),
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let m = random_model(&model)?;
        let device = *dev;
        // The server runs until the process ends.
        std::thread::spawn(move || {
            let r = igpt::serve::serve(m, &device, opts, listener, || {
                let _ = ready_tx.send(Ok(()));
            });
            if let Err(e) = r {
                let _ = ready_tx.send(Err(e));
            }
        });
        ready_rx.recv().context("the server did not start")??;
        let start = Instant::now();
        let times: Vec<ClientTimes> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..b.clients)
                .map(|i| {
                    let url = format!(
                        "http://{addr}/api/complete?rows={}&n={}&seed={i}",
                        side / 2,
                        b.n
                    );
                    let png = &png;
                    sc.spawn(move || serve_client(&url, png, start))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect::<Result<Vec<_>>>()
        })?;
        let wall = times.iter().map(|c| c.done).fold(0.0, f64::max);
        let mean =
            |f: fn(&ClientTimes) -> f64| times.iter().map(f).sum::<f64>() / times.len() as f64;
        let status: serde_json::Value = ureq::get(&format!("http://{addr}/api/status"))
            .call()?
            .into_json()?;
        println!(
            "{name:<22} (batch {batch:>3}): {wall:>6.2} s, {:>7.0} tokens/s; first row after \
             {:.2} s, images after {:.2} s on average; {} rounds",
            tokens / wall,
            mean(|c| c.first_row),
            mean(|c| c.done),
            status["rounds"]
        );
        walls.push(wall);
    }
    println!("shared rounds: {:.2}x the throughput", walls[0] / walls[1]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ModelConfig {
        BenchModel {
            shape: Shape::Small,
            layers: None,
            embd: None,
            heads: None,
            vocab: 512,
            side: 32,
        }
        .config()
        .unwrap()
    }

    #[test]
    fn mfu_counts_igpt_s_as_llm_c_does() {
        // iGPT-S by hand: per layer two gains (2·512) and 12·512² of matrices; then wte and
        // wtet (512·512 each), wpe (1024·512), the start vector and the final gain (512 each).
        let per_layer = 2 * 512 + 12 * 512 * 512;
        let n = 24 * per_layer + 2 * 512 * 512 + 1024 * 512 + 2 * 512;
        assert_eq!(n, 76_571_648);
        assert_eq!(igpt::model::ParamLayout::new(&small()).total, n);
        // 6N + 6·L·d·T = 459,429,888 + 75,497,472.
        assert_eq!(train_flops_per_token(&small()), 534_927_360.0);
        // A million tokens a second is 534.9 TFLOP/s, 54.09% of 989.
        let m = mfu(&small(), 1e6);
        assert!((m - 0.540_877_007_077_856_5).abs() < 1e-12, "{m}");
    }

    #[test]
    fn baseline_scripts_are_found_from_the_source_tree() {
        for name in ["torch_baseline.py", "torch_generate_baseline.py"] {
            assert!(
                script_path(name)
                    .unwrap()
                    .ends_with(format!("scripts/{name}"))
            );
        }
        let err = format!("{:#}", script_path("no_such_script.py").unwrap_err());
        assert!(err.contains("IGPT_SCRIPTS"), "{err}");
    }
}
