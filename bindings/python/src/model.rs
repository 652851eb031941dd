//! `igpt.Model`: a loaded model, its palette, and the engine (or sampler) that holds its
//! parameters between calls.

use crate::run::{self, Job};
use anyhow::{Context, Result, bail, ensure};
use igpt::backend::{Device, Precision};
use igpt::checkpoint::RunConfig;
use igpt::data::TokenSet;
use igpt::inference::{self, Convention};
use igpt::model::{Decoder, Engine, Output};
use igpt::palette::Palette;
use igpt::preprocess::{self, ImageRef};
use igpt::sample::{self, SampleOptions};
use igpt::stop::Fallible;
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{Element, IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::{Mutex, TryLockError};

/// Where the model's parameters are between calls: one copy, held by whatever computed last
/// (an engine for logits, features and scores; a decoder for sampling), handed from one to the
/// other without a copy.
enum Compute {
    Params(Vec<f32>),
    Engine(Engine),
    Decoder(Decoder),
    /// Only after a panic part-way through a hand-over.
    Lost,
}

impl Compute {
    fn take_params(&mut self) -> Result<Vec<f32>> {
        Ok(match std::mem::replace(self, Compute::Lost) {
            Compute::Params(p) => p,
            Compute::Engine(e) => e.into_params(),
            Compute::Decoder(d) => d.into_params(),
            Compute::Lost => {
                bail!(
                    "the model's parameters were lost to an earlier internal error: load it again"
                )
            }
        })
    }

    /// An inference engine for `batch` sequences at `precision`, reused when it has that shape.
    fn engine(&mut self, m: &Model, batch: usize, precision: Precision) -> Result<&mut Engine> {
        let reuse =
            matches!(self, Compute::Engine(e) if e.batch == batch && e.precision == precision);
        if !reuse {
            let mut p = self.take_params()?;
            match Engine::adopting(&m.config.model, batch, &m.device, &mut p, precision) {
                Ok(e) => *self = Compute::Engine(e),
                Err(err) => {
                    *self = Compute::Params(p);
                    return Err(err);
                }
            }
        }
        match self {
            Compute::Engine(e) => Ok(e),
            _ => unreachable!("an engine was just made"),
        }
    }

    /// A decoder for `batch` images at the model's precision, reused when it has that batch.
    fn decoder(&mut self, m: &Model, batch: usize) -> Result<&mut Decoder> {
        let reuse =
            matches!(self, Compute::Decoder(d) if d.batch == batch && d.precision == m.precision);
        if !reuse {
            let mut p = self.take_params()?;
            match Decoder::adopting(&m.config.model, batch, &m.device, &mut p, m.precision) {
                Ok(d) => *self = Compute::Decoder(d),
                Err(err) => {
                    *self = Compute::Params(p);
                    return Err(err);
                }
            }
        }
        match self {
            Compute::Decoder(d) => Ok(d),
            _ => unreachable!("a decoder was just made"),
        }
    }
}

/// An Image GPT model: an igpt run directory, a Hugging Face ImageGPT directory, an OpenAI
/// TensorFlow checkpoint, or a hub name. See `igpt/__init__.pyi` for the documented API.
#[pyclass(module = "igpt", name = "Model", frozen)]
pub struct Model {
    name: String,
    config: RunConfig,
    palette: Palette,
    device: Device,
    /// Of sampling, completion and scores (logits, hidden states and features are f32).
    precision: Precision,
    compute: Mutex<Compute>,
}

/// One image as numpy holds it: `[h, w, c]` bytes.
struct Pixels<'a> {
    data: &'a [u8],
    h: usize,
    w: usize,
    c: usize,
}

/// The images of `obj` (PIL images, uint8 arrays, or one stacked array) as `igpt._inputs`
/// normalises them: C-contiguous uint8 arrays of 2 or 3 dimensions.
fn image_arrays<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<PyReadonlyArrayDyn<'py, u8>>> {
    let py = obj.py();
    let list = PyModule::import(py, "igpt._inputs")?
        .getattr("images")?
        .call1((obj,))?;
    let mut out = Vec::new();
    for item in list.try_iter()? {
        out.push(item?.extract::<PyReadonlyArrayDyn<'py, u8>>()?);
    }
    Ok(out)
}

fn pixel_views<'a>(arrays: &'a [PyReadonlyArrayDyn<'_, u8>]) -> PyResult<Vec<Pixels<'a>>> {
    arrays
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let shape = a.shape();
            let (h, w, c) = match *shape {
                [h, w] => (h, w, 1),
                [h, w, c] => (h, w, c),
                _ => {
                    return Err(PyValueError::new_err(format!(
                        "image {i}: expected (H, W) or (H, W, C) pixels, got shape {shape:?}"
                    )));
                }
            };
            Ok(Pixels {
                data: a.as_slice()?,
                h,
                w,
                c,
            })
        })
        .collect()
}

/// Token ids of one image for a model of side `side`: alpha dropped (as the file decoder
/// drops it), then the library's one image-to-tokens path.
fn image_ids(p: &Pixels, side: usize, palette: &Palette) -> Result<Vec<u16>> {
    ensure!(
        (1..=4).contains(&p.c),
        "images must have 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels, not {}",
        p.c
    );
    let opaque: Vec<u8>;
    let (pixels, channels) = if matches!(p.c, 2 | 4) {
        let keep = p.c - 1;
        opaque = p
            .data
            .chunks_exact(p.c)
            .flat_map(|px| px[..keep].iter().copied())
            .collect();
        (&opaque[..], keep)
    } else {
        (p.data, p.c)
    };
    preprocess::image_tokens(
        ImageRef {
            pixels,
            width: p.w,
            height: p.h,
            channels,
        },
        side,
        palette,
    )
}

fn images_ids(images: &[Pixels], side: usize, palette: &Palette) -> Result<Vec<u16>> {
    let per: Vec<Vec<u16>> = images
        .par_iter()
        .enumerate()
        .map(|(i, p)| image_ids(p, side, palette).with_context(|| format!("image {i}")))
        .collect::<Result<_>>()?;
    Ok(per.concat())
}

/// An int64 array `[N, T]` as `igpt._inputs.ids` normalises it.
fn id_array<'py>(obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, i64>> {
    PyModule::import(obj.py(), "igpt._inputs")?
        .getattr("ids")?
        .call1((obj,))?
        .extract()
}

fn is_ids(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    PyModule::import(obj.py(), "igpt._inputs")?
        .getattr("is_ids")?
        .call1((obj,))?
        .extract()
}

/// `[n, t]` ids and their shape.
fn ids_of<'a>(a: &'a PyReadonlyArrayDyn<'_, i64>) -> PyResult<(&'a [i64], usize, usize)> {
    let shape = a.shape().to_vec();
    let [n, t] = shape[..] else {
        return Err(PyValueError::new_err(format!(
            "token ids must be [N, T], got shape {shape:?}"
        )));
    };
    Ok((a.as_slice()?, n, t))
}

fn nd<'py, T: Element>(py: Python<'py>, v: Vec<T>, shape: &[usize]) -> Bound<'py, PyArrayDyn<T>> {
    // The vector becomes the array's buffer: no copy.
    ArrayD::from_shape_vec(IxDyn(shape), v)
        .expect("the output has its shape's length")
        .into_pyarray(py)
}

fn sample_options(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Result<SampleOptions> {
    let o = SampleOptions {
        temperature,
        top_k,
        top_p,
        seed,
    };
    o.validate()?;
    Ok(o)
}

impl Model {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Compute>> {
        match self.compute.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(PyRuntimeError::new_err(
                "this model is computing in another thread: one call at a time per model",
            )),
        }
    }

    fn t(&self) -> usize {
        self.config.model.n_ctx()
    }

    /// Ids `[n, t]` checked against the palette, as u16 for the library.
    fn pixel_ids(&self, ids: &[i64]) -> Result<Vec<u16>> {
        let v = self.config.model.n_vocab;
        if let Some(pos) = ids.iter().position(|&x| x < 0 || x >= v as i64) {
            bail!(
                "token id {} at position {pos} is outside the palette of {v} colours",
                ids[pos]
            );
        }
        Ok(ids.iter().map(|&x| x as u16).collect())
    }

    /// Tokens of images or ids (`[n, T]`, T = side * side).
    fn tokens_of(&self, obj: &Bound<'_, PyAny>) -> PyResult<(Vec<u16>, usize)> {
        let py = obj.py();
        let (side, t) = (self.config.model.side, self.t());
        if is_ids(obj)? {
            let a = id_array(obj)?;
            let (ids, n, tt) = ids_of(&a)?;
            if tt != t {
                return Err(PyValueError::new_err(format!(
                    "token ids must be [N, {t}] for this {side}x{side} model, got [{n}, {tt}]"
                )));
            }
            let v = run::here(self.pixel_ids(ids))?;
            return Ok((v, n));
        }
        let arrays = image_arrays(obj)?;
        let views = pixel_views(&arrays)?;
        let n = views.len();
        let ids = py.detach(|| images_ids(&views, side, &self.palette));
        Ok((run::here(ids)?, n))
    }

    fn raw_output<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        output: Output,
        raw: bool,
        batch: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let a = id_array(ids)?;
        let (ids, n, t) = ids_of(&a)?;
        let convention = if raw {
            Convention::Raw
        } else {
            Convention::Pixels
        };
        let mut c = self.lock()?;
        let c = &mut *c;
        let out = run::run(py, |job: &Job| {
            ensure!(n > 0, "no ids to run");
            let engine = c.engine(self, batch.clamp(1, n), Precision::F32)?;
            inference::run_with(
                engine,
                ids,
                n,
                t,
                convention,
                output,
                Fallible(|_| job.check()),
            )
        })?;
        let width = out.len() / (n * t).max(1);
        Ok(nd(py, out, &[n, t, width]))
    }

    /// Generates one image per prefix; `[prefixes.len(), T]` tokens.
    fn generate(
        &self,
        py: Python<'_>,
        prefixes: Vec<Vec<u16>>,
        opts: SampleOptions,
        batch: usize,
    ) -> PyResult<Vec<u16>> {
        let mut c = self.lock()?;
        let c = &mut *c;
        run::run(py, |job: &Job| {
            let n = prefixes.len();
            let dec = c.decoder(self, batch.clamp(1, n.max(1)))?;
            sample::generate_all(dec, &prefixes, &opts, Fallible(|_| job.check()))
        })
    }

    /// Images `[n, side, side, channels]` (uint8) of tokens `[n, T]`.
    fn images_of<'py>(
        &self,
        py: Python<'py>,
        tokens: &[u16],
        lead: &[usize],
    ) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        let m = &self.config.model;
        let pixels = run::here(self.palette.decode(tokens))?;
        let mut shape = lead.to_vec();
        shape.extend([m.side, m.side, m.channels]);
        Ok(nd(py, pixels, &shape))
    }
}

fn ids_i64(tokens: &[u16]) -> Vec<i64> {
    tokens.iter().map(|&x| x as i64).collect()
}

#[pymethods]
impl Model {
    /// Loads a model (see the stub for the accepted sources).
    #[staticmethod]
    #[pyo3(signature = (path_or_name, device = "cpu", precision = None))]
    fn load(
        py: Python<'_>,
        path_or_name: PathBuf,
        device: &str,
        precision: Option<&str>,
    ) -> PyResult<Self> {
        let name = path_or_name.to_string_lossy().into_owned();
        let device: Device = run::here(device.parse().map_err(anyhow::Error::from))?;
        let precision = match precision {
            Some(p) => run::here(
                p.parse::<Precision>()
                    .map_err(|e| anyhow::anyhow!("precision {p:?}: {e}")),
            )?,
            None => device.inference_precision(),
        };
        let spec = name.clone();
        let m = run::run(py, move |_| igpt::formats::load_model(&spec))?;
        Ok(Self {
            name,
            config: m.config,
            palette: m.palette,
            device,
            precision,
            compute: Mutex::new(Compute::Params(m.params)),
        })
    }

    /// Image side in pixels (the model reads side x side images).
    #[getter]
    fn side(&self) -> usize {
        self.config.model.side
    }

    /// Colour channels: 1 (gray) or 3 (RGB).
    #[getter]
    fn channels(&self) -> usize {
        self.config.model.channels
    }

    /// Palette size: the number of token ids.
    #[getter]
    fn colours(&self) -> usize {
        self.config.model.n_vocab
    }

    #[getter]
    fn layers(&self) -> usize {
        self.config.model.n_layer
    }

    /// Embedding width d.
    #[getter]
    fn width(&self) -> usize {
        self.config.model.n_embd
    }

    #[getter]
    fn heads(&self) -> usize {
        self.config.model.n_head
    }

    /// "autoregressive" or "bert".
    #[getter]
    fn objective(&self) -> String {
        self.config.model.objective.to_string()
    }

    #[getter]
    fn n_params(&self) -> usize {
        self.config.model.n_params()
    }

    /// Precision of sampling, completion and scores ("bf16" or "f32").
    #[getter]
    fn precision(&self) -> String {
        self.precision.to_string()
    }

    #[getter]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// The palette's colours in [-1, 1], float32 [colours, channels].
    #[getter]
    fn palette<'py>(&self, py: Python<'py>) -> Bound<'py, PyArrayDyn<f32>> {
        let p = &self.palette;
        let v: Vec<f32> = (0..p.len()).flat_map(|i| p.center(i).to_vec()).collect();
        nd(py, v, &[p.len(), p.channels])
    }

    fn __repr__(&self) -> String {
        let m = &self.config.model;
        format!(
            "igpt.Model({:?}: {} layers, d={}, {} heads, {}x{}x{} images, {} colours, {})",
            self.name,
            m.n_layer,
            m.n_embd,
            m.n_head,
            m.side,
            m.side,
            m.channels,
            m.n_vocab,
            m.objective
        )
    }

    /// Images to token ids, int64 [N, side * side].
    fn encode<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
        let arrays = image_arrays(images)?;
        let views = pixel_views(&arrays)?;
        let side = self.config.model.side;
        let ids = run::here(py.detach(|| images_ids(&views, side, &self.palette)))?;
        Ok(nd(py, ids_i64(&ids), &[views.len(), self.t()]))
    }

    /// Token ids [N, side * side] to images, uint8 [N, side, side, channels].
    fn decode<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        let a = id_array(ids)?;
        let (ids, n, t) = ids_of(&a)?;
        if t != self.t() {
            return Err(PyValueError::new_err(format!(
                "token ids must be [N, {}], got [{n}, {t}]",
                self.t()
            )));
        }
        let tokens = run::here(self.pixel_ids(ids))?;
        self.images_of(py, &tokens, &[n])
    }

    /// Logits over the palette, float32 [N, T, colours].
    #[pyo3(signature = (ids, raw = false, batch = 8))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        raw: bool,
        batch: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.raw_output(py, ids, Output::Logits, raw, batch)
    }

    /// A hidden state, float32 [N, T, width].
    #[pyo3(signature = (ids, layer, raw = false, batch = 8))]
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        layer: usize,
        raw: bool,
        batch: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.raw_output(py, ids, Output::Hidden(layer), raw, batch)
    }

    /// Linear-probe features, float32 [N, len(layers) * width].
    #[pyo3(signature = (images_or_ids, layers = None, masks = None, batch = 32))]
    fn features<'py>(
        &self,
        py: Python<'py>,
        images_or_ids: &Bound<'py, PyAny>,
        layers: Option<Vec<usize>>,
        masks: Option<usize>,
        batch: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let m = self.config.model.clone();
        let layers = layers.unwrap_or_else(|| (0..=m.n_layer).collect());
        if let Some(&l) = layers.iter().find(|&&l| l > m.n_layer) {
            return Err(PyValueError::new_err(format!(
                "layer {l} does not exist: this model has layers 0..={} (0..{} are the blocks' \
                 normalised inputs, {} the final norm's output)",
                m.n_layer, m.n_layer, m.n_layer
            )));
        }
        if layers.is_empty() {
            return Err(PyValueError::new_err("no layers asked for"));
        }
        let (tokens, n) = self.tokens_of(images_or_ids)?;
        let mut c = self.lock()?;
        let c = &mut *c;
        let f = run::run(py, |job: &Job| {
            ensure!(n > 0, "no images");
            let masks = igpt::bert::masks_for(&m, masks)?;
            let tokens = TokenSet::from_tokens(tokens, m.n_ctx(), m.n_vocab, None)?;
            // As `igpt features`: an engine of `batch` images, in f32.
            let engine = c.engine(self, batch.max(1), Precision::F32)?;
            igpt::probe::extract_features(
                engine,
                &tokens,
                &layers,
                masks,
                Fallible(|_| job.check()),
            )
        })?;
        let width = layers.len() * m.n_embd;
        Ok(nd(py, f, &[n, width]))
    }

    /// Mean negative log-likelihood of each image, nats per token, float64 [N].
    #[pyo3(signature = (images_or_ids, batch = 16))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        images_or_ids: &Bound<'py, PyAny>,
        batch: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
        let m = self.config.model.clone();
        let (tokens, n) = self.tokens_of(images_or_ids)?;
        let mut c = self.lock()?;
        let c = &mut *c;
        let scores = run::run(py, |job: &Job| {
            ensure!(n > 0, "no images to score");
            let tokens = TokenSet::from_tokens(tokens, m.n_ctx(), m.n_vocab, None)?;
            let engine = c.engine(self, batch.clamp(1, n), self.precision)?;
            igpt::eval::score_images(engine, &tokens, Fallible(|_| job.check()))
        })?;
        Ok(nd(py, scores, &[n]))
    }

    /// Generates n images, uint8 [n, side, side, channels] (and their ids [n, side * side]).
    #[pyo3(signature = (n = 16, temperature = 1.0, top_k = 0, top_p = 1.0, seed = 0, batch = 16, return_tokens = false))]
    #[allow(clippy::too_many_arguments)]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        batch: usize,
        return_tokens: bool,
    ) -> PyResult<Py<PyAny>> {
        if n == 0 {
            return Err(PyValueError::new_err("n must be at least 1"));
        }
        let opts = run::here(sample_options(temperature, top_k, top_p, seed))?;
        let tokens = self.generate(py, vec![Vec::new(); n], opts, batch)?;
        let images = self.images_of(py, &tokens, &[n])?;
        if return_tokens {
            let ids = nd(py, ids_i64(&tokens), &[n, self.t()]);
            return Ok((images, ids).into_pyobject(py)?.into_any().unbind());
        }
        Ok(images.into_any().unbind())
    }

    /// Completes each image from its top rows, k times: uint8 [n, k, side, side, channels].
    #[pyo3(signature = (images, rows = None, prefix_pixels = None, k = 4, temperature = 1.0, top_k = 0, top_p = 1.0, seed = 0, batch = 16, return_tokens = false))]
    #[allow(clippy::too_many_arguments)]
    fn complete<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        rows: Option<usize>,
        prefix_pixels: Option<usize>,
        k: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        batch: usize,
        return_tokens: bool,
    ) -> PyResult<Py<PyAny>> {
        let (side, t) = (self.config.model.side, self.t());
        if k == 0 {
            return Err(PyValueError::new_err("k must be at least 1"));
        }
        let keep = match (prefix_pixels, rows) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "give rows or prefix_pixels, not both",
                ));
            }
            (Some(p), None) => p,
            (None, Some(r)) => r.saturating_mul(side),
            (None, None) => side / 2 * side,
        };
        if keep > t {
            return Err(PyValueError::new_err(format!(
                "the prefix ({keep} pixels) is longer than the image ({t} pixels = {side} rows)"
            )));
        }
        let opts = run::here(sample_options(temperature, top_k, top_p, seed))?;
        let (originals, n) = self.tokens_of(images)?;
        if n == 0 {
            return Err(PyValueError::new_err("no images to complete"));
        }
        let prefixes = sample::completion_prefixes(&originals, t, keep, k);
        let tokens = self.generate(py, prefixes, opts, batch)?;
        let out = self.images_of(py, &tokens, &[n, k])?;
        if return_tokens {
            let ids = nd(py, ids_i64(&tokens), &[n, k, t]);
            return Ok((out, ids).into_pyobject(py)?.into_any().unbind());
        }
        Ok(out.into_any().unbind())
    }
}
