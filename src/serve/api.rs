//! The HTTP side of `igpt serve`: the page, and the JSON API under `/api/` that it uses.
//! Every answer that is not a stream is JSON; every error is `{"error": "..."}` with a 4xx or
//! 5xx status.

use super::scheduler::{Event, Job, Queue};
use super::{Limits, ServeOptions};
use crate::backend::Device;
use crate::checkpoint::RunConfig;
use crate::data::ImageSet;
use crate::palette::Palette;
use crate::preprocess::{self, DecodeLimits, TooLarge};
use crate::sample::SampleOptions;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::{Arc, OnceLock};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE_CSS: &str = include_str!("page/style.css");

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

struct Inner {
    config: RunConfig,
    palette: Palette,
    device: String,
    opts: ServeOptions,
    queue: Arc<Queue>,
    examples: OnceLock<Result<ImageSet, String>>,
    /// Uploads decoded at once: each may take up to 8 bytes a pixel of the largest image
    /// allowed, so they wait their turn here rather than all allocate together.
    decoding: tokio::sync::Semaphore,
}

impl AppState {
    pub fn new(
        config: RunConfig,
        palette: Palette,
        device: &Device,
        opts: ServeOptions,
        queue: Arc<Queue>,
    ) -> Self {
        Self(Arc::new(Inner {
            config,
            palette,
            device: device.to_string(),
            opts,
            queue,
            examples: OnceLock::new(),
            decoding: tokio::sync::Semaphore::new(2),
        }))
    }
}

pub(crate) fn router(state: AppState) -> Router {
    let upload = state.0.opts.limits.max_upload_bytes;
    Router::new()
        .route(
            "/",
            get(|| async { static_file("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { static_file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { static_file("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/api/model", get(model_info))
        .route("/api/status", get(status))
        .route("/api/examples", get(examples))
        .route("/api/examples/{index}", get(example))
        .route("/api/encode", post(encode))
        .route("/api/score", post(score))
        .route("/api/complete", post(complete))
        .route("/api/sample", post(sample))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page or API route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route takes another method: GET for /api/model, /api/status and \
                 /api/examples, POST for /api/encode, /api/score, /api/complete and /api/sample",
            )
        })
        .layer(DefaultBodyLimit::max(upload))
        .with_state(state)
}

fn static_file(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// A refused request: its status and a message for the person who sent it.
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self(status, msg.into())
    }
    fn bad(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn model_info(State(st): State<AppState>) -> Json<serde_json::Value> {
    let s = &st.0;
    let m = &s.config.model;
    let ids: Vec<u16> = (0..s.palette.len() as u16).collect();
    let colours: Vec<[u8; 3]> = match s.palette.decode(&ids) {
        Ok(px) if s.palette.channels == 1 => px.iter().map(|&v| [v, v, v]).collect(),
        Ok(px) => px.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
        Err(_) => Vec::new(),
    };
    let l: &Limits = &s.opts.limits;
    Json(json!({
        "name": s.opts.model_name,
        "side": m.side,
        "channels": m.channels,
        "colours": m.n_vocab,
        "layers": m.n_layer,
        "width": m.n_embd,
        "heads": m.n_head,
        "palette": colours,
        "device": s.device,
        "precision": s.opts.precision.to_string(),
        "batch": s.opts.batch,
        "limits": {
            "max_upload_bytes": l.max_upload_bytes,
            "max_image_side": l.max_image_side,
            "max_images": l.max_images,
            "max_steps": l.max_steps.min(m.n_ctx()),
            "queue": l.queue,
        },
    }))
}

async fn status(State(st): State<AppState>) -> Json<super::Stats> {
    Json(st.0.queue.stats())
}

fn example_set(st: &AppState) -> ApiResult<&ImageSet> {
    st.0.examples
        .get_or_init(|| crate::data::builtin_fashion().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.clone()))
}

async fn examples(State(st): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let set = example_set(&st)?;
    Ok(Json(json!({
        "name": "Fashion-MNIST (the shipped test split)",
        "count": set.len(),
        "classes": set.class_names,
        "labels": set.labels.as_ref().map(|l| &l[..l.len().min(100)]),
    })))
}

/// Image `index` of the shipped Fashion-MNIST split, as a PNG at its own size.
async fn example(
    State(st): State<AppState>,
    index: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let Path(index) =
        index.map_err(|e| ApiError::bad(format!("bad address: {}", e.body_text())))?;
    let set = example_set(&st)?;
    let i: usize = index.parse().map_err(|_| {
        ApiError::bad(format!(
            "example index {index:?} is not a non-negative number"
        ))
    })?;
    if i >= set.len() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "there is no example {i}: the split holds {} (0 to {})",
                set.len(),
                set.len() - 1
            ),
        ));
    }
    let color = match set.channels {
        1 => image::ExtendedColorType::L8,
        _ => image::ExtendedColorType::Rgb8,
    };
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        set.image(i),
        set.width as u32,
        set.height as u32,
        color,
    )
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write example {i} as PNG: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// An uploaded image as the model sees it.
struct Upload {
    tokens: Vec<u16>,
    width: usize,
    height: usize,
}

/// Decodes an uploaded PNG or JPEG (off the async threads) and shapes it for the model.
async fn read_upload(st: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Upload> {
    let limits = st.0.opts.limits;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the upload is larger than this server's limit of {} bytes",
                    limits.max_upload_bytes
                ),
            )
        } else {
            ApiError::bad(format!("cannot read the request body: {}", e.body_text()))
        }
    })?;
    if body.is_empty() {
        return Err(ApiError::bad(
            "no image in the request: send the PNG or JPEG file as the request body",
        ));
    }
    if !matches!(
        image::guess_format(&body),
        Ok(image::ImageFormat::Png | image::ImageFormat::Jpeg)
    ) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the upload is not a PNG or JPEG image",
        ));
    }
    let _turn = st.0.decoding.acquire().await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot decode: {e}"),
        )
    })?;
    let st = st.clone();
    tokio::task::spawn_blocking(move || {
        let side = st.0.config.model.side;
        let max_side = limits.max_image_side;
        // Room for the largest image allowed at 16 bits a channel with alpha.
        let decode_limits = DecodeLimits {
            max_side,
            max_bytes: (max_side as u64)
                .saturating_mul(max_side as u64)
                .saturating_mul(8),
        };
        let img =
            preprocess::decode_bytes(&body, "the upload", decode_limits).map_err(|e| match e
                .downcast_ref::<TooLarge>(
            ) {
                Some(big) => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the image is larger than this server takes ({} pixels a side, {} MB \
                         decoded)",
                        big.limits.max_side,
                        big.limits.max_bytes >> 20
                    ),
                ),
                None => ApiError::bad(format!("{e:#}")),
            })?;
        let tokens = preprocess::image_tokens(img.image(), side, &st.0.palette)
            .map_err(|e| ApiError::bad(format!("cannot shape the upload: {e:#}")))?;
        Ok(Upload {
            tokens,
            width: img.width,
            height: img.height,
        })
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("decoding the upload failed: {e}"),
        )
    })?
}

async fn encode(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let up = read_upload(&st, body).await?;
    let m = &st.0.config.model;
    Ok(Json(json!({
        "side": m.side,
        "channels": m.channels,
        "width": up.width,
        "height": up.height,
        "tokens": up.tokens,
    })))
}

/// The negative log-likelihood of an uploaded image under the model.
async fn score(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    check_steps(&st, st.0.config.model.n_ctx(), "")?;
    let up = read_upload(&st, body).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    submit(
        &st,
        Job {
            prefix: up.tokens.clone(),
            images: 1,
            opts: SampleOptions::default(),
            prefill: 0,
            events: tx,
        },
    )?;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Done { nats, scored, .. } if scored > 0 => {
                let per = nats / scored as f64;
                return Ok(Json(json!({
                    "nats_per_token": per,
                    "bits_per_token": per / std::f64::consts::LN_2,
                    "tokens": up.tokens,
                })));
            }
            Event::Failed(msg) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg));
            }
            _ => {}
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the scheduler stopped before scoring the image",
    ))
}

fn submit(st: &AppState, job: Job) -> ApiResult<()> {
    st.0.queue
        .submit(job)
        .map_err(|busy| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, busy.to_string()))
}

/// Sampling settings of `/api/complete` and `/api/sample`; missing ones take the defaults
/// of `igpt complete` and `igpt sample`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GenerateQuery {
    /// Rows of the image kept (completions only; default: half).
    rows: Option<usize>,
    /// Images to generate (default 4).
    n: Option<usize>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    seed: Option<u64>,
}

impl GenerateQuery {
    fn parse(q: Result<Query<GenerateQuery>, QueryRejection>) -> ApiResult<Self> {
        q.map(|Query(q)| q)
            .map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))
    }

    fn options(&self) -> ApiResult<SampleOptions> {
        let d = SampleOptions::default();
        let opts = SampleOptions {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            seed: self.seed.unwrap_or(d.seed),
        };
        opts.validate().map_err(|e| ApiError::bad(e.to_string()))?;
        Ok(opts)
    }

    fn images(&self, limits: &Limits) -> ApiResult<usize> {
        let n = self.n.unwrap_or(4.min(limits.max_images));
        if n == 0 || n > limits.max_images {
            return Err(ApiError::bad(format!(
                "n = {n}: this server makes 1 to {} images per request",
                limits.max_images
            )));
        }
        Ok(n)
    }
}

async fn complete(
    State(st): State<AppState>,
    q: Result<Query<GenerateQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let q = GenerateQuery::parse(q)?;
    let side = st.0.config.model.side;
    let rows = q.rows.unwrap_or(side / 2);
    if rows >= side {
        return Err(ApiError::bad(format!(
            "rows = {rows}: keep 0 to {} of the image's {side} rows (at least one is generated)",
            side - 1
        )));
    }
    let opts = q.options()?;
    let n = q.images(&st.0.opts.limits)?;
    check_steps(&st, (side - rows) * side, " (keep more rows)")?;
    let up = read_upload(&st, body).await?;
    let keep = rows * side;
    stream(&st, up.tokens[..keep].to_vec(), n, opts, rows)
}

async fn sample(
    State(st): State<AppState>,
    q: Result<Query<GenerateQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = GenerateQuery::parse(q)?;
    if q.rows.is_some_and(|r| r > 0) {
        return Err(ApiError::bad(
            "rows: unconditional samples keep no rows; complete an image with /api/complete",
        ));
    }
    let opts = q.options()?;
    let n = q.images(&st.0.opts.limits)?;
    check_steps(&st, st.0.config.model.n_ctx(), "")?;
    stream(&st, Vec::new(), n, opts, 0)
}

/// Refuses a request that would run the model over more than the allowed pixels per image;
/// `hint` says how to ask for less.
fn check_steps(st: &AppState, steps: usize, hint: &str) -> ApiResult<()> {
    let max = st.0.opts.limits.max_steps;
    if steps > max {
        return Err(ApiError::bad(format!(
            "this request runs the model over {steps} pixels per image; this server allows at \
             most {max}{hint}"
        )));
    }
    Ok(())
}

/// Queues the generation of `n` images from `prefix` and answers with its event stream:
/// `start`, one `row` per generated row, then `done` (or `error`).
fn stream(
    st: &AppState,
    prefix: Vec<u16>,
    n: usize,
    opts: SampleOptions,
    rows_kept: usize,
) -> ApiResult<Response> {
    let side = st.0.config.model.side;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let prefill = prefix.len();
    submit(
        st,
        Job {
            prefix: prefix.clone(),
            images: n,
            opts,
            prefill,
            events: tx,
        },
    )?;
    let t = side * side;
    let events = UnboundedReceiverStream::new(rx).map(move |ev| {
        let (name, data) = match ev {
            Event::Start {
                round,
                round_requests,
                round_images,
                waited,
            } => (
                "start",
                json!({
                    "side": side,
                    "images": n,
                    "rows_kept": rows_kept,
                    "kept": prefix,
                    "round": round,
                    "round_requests": round_requests,
                    "round_images": round_images,
                    "waited_ms": waited.as_millis() as u64,
                }),
            ),
            Event::Row { row, tokens } => (
                "row",
                json!({
                    "row": row,
                    "tokens": tokens.chunks(side).map(|c| c.to_vec()).collect::<Vec<_>>(),
                }),
            ),
            Event::Done {
                tokens, seconds, ..
            } => (
                "done",
                json!({
                    "tokens": tokens.chunks(t).map(|c| c.to_vec()).collect::<Vec<_>>(),
                    "seconds": seconds,
                    "tokens_per_second": (n * (t - prefill)) as f64 / seconds.max(1e-9),
                }),
            ),
            Event::Failed(msg) => ("error", json!({ "error": msg })),
        };
        Ok::<_, std::convert::Infallible>(SseEvent::default().event(name).data(data.to_string()))
    });
    Ok(Sse::new(events)
        // A comment every second: a client that has gone is noticed even while nothing else is sent.
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(1)))
        .into_response())
}
