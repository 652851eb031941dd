//! `igpt serve`: flags to [`igpt::serve::ServeOptions`], then the library's server.

use anyhow::{Context, Result, ensure};
use clap::Args;
use igpt::backend::{Device, Precision};
use igpt::serve::{Limits, ServeOptions};
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// The model: an igpt run directory, a Hugging Face ImageGPT directory, an OpenAI
    /// TensorFlow checkpoint, or a hub name (openai/imagegpt-small, openai-tf/igpt-s-bert).
    #[arg(long)]
    model: String,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Images decoded together: requests that arrive together share one batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// How long a request waits for others to share its batch, in milliseconds.
    #[arg(long, default_value_t = 30)]
    gather_ms: u64,
    /// Requests that may wait for the model; more are answered "busy" (HTTP 503).
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Completions or samples one request may ask for (at most --batch).
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Pixels one request may generate per image (default: the whole image).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Largest upload, in megabytes.
    #[arg(long, default_value_t = 8.0)]
    max_upload_mb: f64,
    /// Largest width or height of an uploaded image, in pixels.
    #[arg(long, default_value_t = 4096)]
    max_image_side: u32,
    /// Weights and key/value caches in bf16 or f32 (default: bf16 where the CPU multiplies
    /// bf16 natively, AVX-512 BF16; f32 elsewhere).
    #[arg(long)]
    precision: Option<Precision>,
}

pub fn serve(a: ServeArgs, dev: &Device) -> Result<()> {
    ensure!(
        a.max_upload_mb > 0.0 && a.max_upload_mb <= 1024.0,
        "--max-upload-mb must be in (0, 1024] (got {})",
        a.max_upload_mb
    );
    ensure!(a.batch >= 1, "--batch must be at least 1");
    ensure!(a.queue >= 1, "--queue must be at least 1");
    ensure!(
        (1..=a.batch).contains(&a.max_images),
        "--max-images ({}) must be between 1 and --batch ({})",
        a.max_images,
        a.batch
    );
    ensure!(
        a.max_steps != Some(0),
        "--max-steps must be at least 1 (one pixel per image)"
    );
    ensure!(a.max_image_side >= 1, "--max-image-side must be at least 1");
    ensure!(
        a.gather_ms <= 10_000,
        "--gather-ms must be at most 10000 (got {})",
        a.gather_ms
    );
    let opts = ServeOptions {
        limits: Limits {
            max_upload_bytes: ((a.max_upload_mb * (1u64 << 20) as f64) as usize).max(1),
            max_image_side: a.max_image_side,
            max_images: a.max_images,
            max_steps: a.max_steps.unwrap_or(usize::MAX),
            queue: a.queue,
        },
        batch: a.batch,
        gather: Duration::from_millis(a.gather_ms),
        precision: a.precision.unwrap_or_else(|| dev.inference_precision()),
        model_name: a.model.clone(),
    };
    let model = igpt::formats::load_model(&a.model)?;
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("cannot listen on {}:{} (--host, --port)", a.host, a.port))?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let m = model.model();
    let ready = format!(
        "serving {} ({} layers, d={}, {}x{}, {} colours, {}) on http://{addr}/ (Ctrl-C stops)",
        a.model, m.n_layer, m.n_embd, m.side, m.side, m.n_vocab, opts.precision
    );
    igpt::serve::serve(model, dev, opts, listener, || println!("{ready}"))
}
