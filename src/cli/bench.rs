//! `igpt bench`: igpt against the PyTorch baseline (scripts/torch_baseline.py), same model,
//! same threads, same machine, in one invocation.

use anyhow::{Context, Result, ensure};
use clap::{Args, Subcommand};
use igpt::backend::Device;
use igpt::config::ModelConfig;
use igpt::data::TokenSet;
use igpt::train::{TrainConfig, Trainer};
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Training throughput and peak memory: igpt, then PyTorch eager (SDPA), and the ratio.
    Train(TrainBench),
    /// Generation speed (tokens/s) at batch 1 and 8: igpt, a PyTorch loop with its own KV cache,
    /// and Hugging Face `generate()`, with the ratios.
    Generate(GenerateBench),
}

/// The model both benchmarks use (iGPT-tiny by default, 512 RGB colours).
#[derive(Args)]
pub struct BenchModel {
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 256)]
    embd: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    /// Image side (context = side^2 tokens).
    #[arg(long, default_value_t = 32)]
    side: usize,
}

impl BenchModel {
    fn config(&self) -> Result<ModelConfig> {
        let cfg = ModelConfig {
            n_layer: self.layers,
            n_embd: self.embd,
            n_head: self.heads,
            n_vocab: self.vocab,
            side: self.side,
            channels: 3,
            objective: Default::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same shape as arguments of the Python baselines.
    fn python_args(&self) -> Vec<String> {
        let pairs = [
            ("--layers", self.layers),
            ("--embd", self.embd),
            ("--heads", self.heads),
            ("--vocab", self.vocab),
            ("--ctx", self.side * self.side),
        ];
        pairs
            .iter()
            .flat_map(|(k, v)| [k.to_string(), v.to_string()])
            .collect()
    }
}

#[derive(Args)]
pub struct GenerateBench {
    #[command(flatten)]
    model: BenchModel,
    /// Batch sizes to measure.
    #[arg(long, num_args = 1.., default_values_t = vec![1, 8])]
    batches: Vec<usize>,
    #[arg(long, default_value = "python3")]
    python: String,
    /// Only measure igpt.
    #[arg(long)]
    no_python: bool,
}

#[derive(Args)]
pub struct TrainBench {
    #[command(flatten)]
    model: BenchModel,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Python interpreter with torch installed.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Only measure igpt.
    #[arg(long)]
    no_torch: bool,
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
    }
}

fn generate(b: GenerateBench, dev: &Device) -> Result<()> {
    use igpt::model::Decoder;
    use igpt::sample::{self, SampleOptions};
    let threads = rayon::current_num_threads();
    let model = b.model.config()?;
    let t = model.n_ctx();
    println!(
        "model: {} layers, d={}, {} heads, vocab {}, {} tokens per image, fp32, {} threads",
        b.model.layers, b.model.embd, b.model.heads, b.model.vocab, t, threads
    );
    // A random model with a non-zero head, so sampling is not uniform.
    let mut params = igpt::model::init_params(&model, 0);
    let layout = igpt::model::ParamLayout::new(&model);
    for (i, p) in params[layout.wtet..layout.wtet + b.model.vocab * b.model.embd]
        .iter_mut()
        .enumerate()
    {
        *p = ((i * 2654435761) % 1000) as f32 / 1000.0 * 0.04 - 0.02;
    }
    let mut ours = Vec::new();
    for &batch in &b.batches {
        let mut dec = Decoder::new(&model, batch, dev)?;
        dec.set_params(&params)?;
        let prefixes = vec![&[][..]; batch];
        let opts = SampleOptions::default();
        let secs = rayon::scope(|_| -> Result<f64> {
            let t0 = Instant::now();
            sample::generate(&mut dec, &prefixes, &opts, 0, |_, _| {})?;
            Ok(t0.elapsed().as_secs_f64())
        })?;
        let tps = (batch * t) as f64 / secs;
        println!(
            "igpt           batch {batch:>2}: {tps:>8.0} tokens/s ({secs:.2} s for {batch} x {t} tokens)"
        );
        ours.push((batch, tps));
    }
    if b.no_python {
        return Ok(());
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/torch_generate_baseline.py");
    let batches: Vec<String> = b.batches.iter().map(|x| x.to_string()).collect();
    let out = std::process::Command::new(&b.python)
        .arg(&script)
        .args(b.model.python_args())
        .args(["--threads", &threads.to_string()])
        .arg("--batches")
        .args(&batches)
        .output()
        .with_context(|| format!("cannot run {} {}", b.python, script.display()))?;
    ensure!(
        out.status.success(),
        "the PyTorch baseline failed (pip install torch transformers):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(batch), Some(tps)) = (
            v["impl"].as_str(),
            v["batch"].as_u64(),
            v["tokens_per_s"].as_f64(),
        ) else {
            continue;
        };
        let mine = ours
            .iter()
            .find(|o| o.0 == batch as usize)
            .map_or(f64::NAN, |o| o.1);
        println!(
            "{name:<14} batch {batch:>2}: {tps:>8.0} tokens/s   igpt is {:.1}x",
            mine / tps
        );
    }
    Ok(())
}

fn train(b: TrainBench, dev: &Device) -> Result<()> {
    let threads = rayon::current_num_threads();
    let model = b.model.config()?;
    let t = model.n_ctx();
    println!(
        "model: {} layers, d={}, {} heads, vocab {}, context {}, batch {}, fp32, {} threads",
        b.model.layers, b.model.embd, b.model.heads, b.model.vocab, t, b.batch, threads
    );
    let cfg = TrainConfig {
        steps: 1000,
        batch: b.batch,
        micro_batch: b.batch,
        warmup: 10,
        ..TrainConfig::default()
    };
    let params = igpt::model::init_params(&model, 0);
    let mut trainer = Trainer::new(&model, cfg, &params, dev)?;
    let tokens: Vec<u16> = (0..b.batch * t)
        .map(|i| ((i as u64 * 2654435761) % b.model.vocab as u64) as u16)
        .collect();
    let data = TokenSet::from_tokens(tokens, t, b.model.vocab, None)?;
    trainer.step(&data)?;
    let t0 = Instant::now();
    for _ in 0..b.steps {
        trainer.step(&data)?;
    }
    let ours = t0.elapsed().as_secs_f64() / b.steps as f64;
    let ours_tps = (b.batch * t) as f64 / ours;
    let ours_rss = peak_rss_mb().unwrap_or(f64::NAN);
    println!("igpt:    {ours:.3} s/step  {ours_tps:>8.0} tokens/s  peak RSS {ours_rss:.0} MB");
    if b.no_torch {
        return Ok(());
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/torch_baseline.py");
    let out = std::process::Command::new(&b.python)
        .arg(&script)
        .args(b.model.python_args())
        .args(["--batch", &b.batch.to_string()])
        .args([
            "--threads",
            &threads.to_string(),
            "--steps",
            &b.steps.to_string(),
            "--warmup",
            "1",
        ])
        .output()
        .with_context(|| format!("cannot run {} {}", b.python, script.display()))?;
    ensure!(
        out.status.success(),
        "the PyTorch baseline failed (is torch installed? pip install torch):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or(""))
        .with_context(|| format!("unexpected output from the baseline: {line}"))?;
    let torch_s = v["step_s"].as_f64().context("baseline gave no step_s")?;
    let torch_rss = v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    println!(
        "pytorch: {torch_s:.3} s/step  {:>8.0} tokens/s  peak RSS {torch_rss:.0} MB  (torch {}, eager, scaled_dot_product_attention)",
        (b.batch * t) as f64 / torch_s,
        v["torch"].as_str().unwrap_or("?")
    );
    println!(
        "ratio:   igpt is {:.2}x the PyTorch throughput with {:.2}x its peak memory",
        torch_s / ours,
        ours_rss / torch_rss
    );
    Ok(())
}
