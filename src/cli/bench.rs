//! `igpt bench`: igpt against the PyTorch baseline (scripts/torch_baseline.py), same model,
//! same threads, same machine, in one invocation.

use anyhow::{Context, Result, ensure};
use clap::{Args, Subcommand};
use igpt::backend::{Device, Precision};
use igpt::checkpoint::LoadedModel;
use igpt::config::ModelConfig;
use igpt::data::TokenSet;
use igpt::train::{TrainConfig, Trainer};
use std::path::PathBuf;
use std::time::Instant;

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
        BenchCmd::Complete(b) => complete(b, dev),
        BenchCmd::Serve(b) => serve(b, dev),
    }
}

/// Runs a Python baseline script and returns its JSON lines.
fn python_baseline(python: &str, script: &str, args: &[String]) -> Result<Vec<serde_json::Value>> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {python} {}", script.display()))?;
    ensure!(
        out.status.success(),
        "the PyTorch baseline failed (pip install torch transformers):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

fn generate(b: GenerateBench, dev: &Device) -> Result<()> {
    use igpt::model::Decoder;
    use igpt::sample::{self, SampleOptions};
    let threads = rayon::current_num_threads();
    let model = b.model.config()?;
    let t = model.n_ctx();
    println!(
        "model: {} layers, d={}, {} heads, vocab {}, {} tokens per image, {} threads",
        model.n_layer, model.n_embd, model.n_head, model.n_vocab, t, threads
    );
    let params = random_params(&model);
    let mut ours = Vec::new();
    for &precision in &b.runs.precisions {
        for &batch in &b.batches {
            let mut dec = Decoder::with_precision(&model, batch, dev, params.clone(), precision)?;
            let prefixes = vec![&[][..]; batch];
            let opts = SampleOptions::default();
            let secs = rayon::scope(|_| -> Result<f64> {
                // Warm-up: the first positions of one image (pages touched, threads awake).
                for _ in 0..16 {
                    dec.step(&vec![0; batch])?;
                }
                let t0 = Instant::now();
                sample::generate(&mut dec, &prefixes, &opts, 0, |_, _| {})?;
                Ok(t0.elapsed().as_secs_f64())
            })?;
            let tps = (batch * t) as f64 / secs;
            let step_bytes = bytes_per_step(&model, batch, precision);
            let gbs = step_bytes * t as f64 / secs / 1e9;
            let limit = stream_read_gbs(step_bytes as usize);
            println!(
                "igpt {precision:<4}      batch {batch:>2}: {tps:>8.0} tokens/s ({secs:.2} s); reads \
                 {:.1} MB per token, {gbs:.1} GB/s against a {limit:.1} GB/s streaming read \
                 of the same size ({:.0}%)",
                step_bytes / batch as f64 / 1e6,
                100.0 * gbs / limit
            );
            ours.push((precision, batch, tps));
        }
    }
    if b.runs.no_python {
        return Ok(());
    }
    let mut args = b.model.python_args()?;
    args.extend(["--threads".into(), threads.to_string(), "--batches".into()]);
    args.extend(b.batches.iter().map(|x| x.to_string()));
    for v in python_baseline(&b.runs.python, "scripts/torch_generate_baseline.py", &args)? {
        let (Some(name), Some(batch), Some(tps)) = (
            v["impl"].as_str(),
            v["batch"].as_u64(),
            v["tokens_per_s"].as_f64(),
        ) else {
            if let Some(note) = v["note"].as_str() {
                println!("note: {note}");
            }
            continue;
        };
        let ratios: Vec<String> = ours
            .iter()
            .filter(|o| o.1 == batch as usize)
            .map(|o| format!("igpt {} is {:.1}x", o.0, o.2 / tps))
            .collect();
        println!(
            "{name:<14} batch {batch:>2}: {tps:>8.0} tokens/s   {}",
            ratios.join(", ")
        );
    }
    Ok(())
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
    for v in python_baseline(&b.runs.python, "scripts/torch_generate_baseline.py", &args)? {
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

fn train(b: TrainBench, dev: &Device) -> Result<()> {
    let threads = rayon::current_num_threads();
    let model = b.model.config()?;
    let t = model.n_ctx();
    println!(
        "model: {} layers, d={}, {} heads, vocab {}, context {}, batch {}, fp32, {} threads",
        model.n_layer, model.n_embd, model.n_head, model.n_vocab, t, b.batch, threads
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
        .args(b.model.python_args()?)
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
