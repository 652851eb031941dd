//! `igpt serve`: a web page and a JSON API that complete, sample and score images with one
//! model, decoded in shared batches by one scheduler thread ([`scheduler`]); the HTTP side
//! ([`api`]) only checks requests, turns uploads into tokens and streams what the scheduler
//! sends.

mod api;
mod scheduler;

pub use scheduler::Stats;

use crate::backend::{Device, Precision};
use crate::checkpoint::LoadedModel;
use crate::model::Decoder;
use anyhow::{Context, Result, ensure};
use std::time::Duration;

/// What one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of an uploaded image file.
    pub max_upload_bytes: usize,
    /// Width or height of an uploaded image, in pixels.
    pub max_image_side: u32,
    /// Completions or samples in one request.
    pub max_images: usize,
    /// Pixels generated per image in one request (a completion keeping more rows needs fewer).
    pub max_steps: usize,
    /// Requests waiting for the model; past this a request is answered "busy" at once.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 8 << 20,
            max_image_side: 4096,
            max_images: 8,
            max_steps: usize::MAX,
            queue: 16,
        }
    }
}

/// How the server runs its model.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub limits: Limits,
    /// Images decoded together in one round (requests share it).
    pub batch: usize,
    /// How long the first request of a round that is not full waits for others to join.
    pub gather: Duration,
    pub precision: Precision,
    /// What the page calls the model.
    pub model_name: String,
}

/// Serves `model` on `listener` until the process ends. The decoder (and its memory for
/// `opts.batch` images) is set up before the first request is taken, so a model or batch
/// that does not fit fails here, not on a request; `on_ready` is called once it is.
pub fn serve(
    model: LoadedModel,
    device: &Device,
    opts: ServeOptions,
    listener: std::net::TcpListener,
    on_ready: impl FnOnce(),
) -> Result<()> {
    let cfg = model.model().clone();
    ensure!(opts.batch >= 1, "the batch must hold at least one image");
    ensure!(
        opts.limits.max_images >= 1 && opts.limits.max_images <= opts.batch,
        "a request may ask for {} images but a round holds only {}: the per-request limit must \
         be between 1 and the batch",
        opts.limits.max_images,
        opts.batch
    );
    ensure!(
        opts.limits.queue >= 1,
        "the queue must hold at least one request"
    );
    let LoadedModel {
        config,
        palette,
        params,
    } = model;
    let decoder = Decoder::with_precision(&cfg, opts.batch, device, params, opts.precision)?;
    let queue = scheduler::Queue::new(opts.limits.queue);
    let worker_queue = queue.clone();
    let gather = opts.gather;
    std::thread::Builder::new()
        .name("igpt-scheduler".into())
        .spawn(move || scheduler::run(worker_queue, decoder, gather))
        .context("cannot start the scheduler thread")?;
    let state = api::AppState::new(config, palette, device, opts, queue);
    listener
        .set_nonblocking(true)
        .context("cannot set up the listening socket")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("cannot set up the listening socket")?;
        on_ready();
        axum::serve(listener, api::router(state))
            .await
            .context("the HTTP server stopped")
    })
}
