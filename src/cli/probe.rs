//! `igpt features` and `igpt probe`: the paper's linear-probe protocol on the user's data.

use super::Source;
use super::generate::{pixel_bar, share_bar};
use anyhow::{Context, Result, ensure};
use clap::Args;
use igpt::backend::Device;
use igpt::checkpoint::LoadedModel;
use igpt::data::{self, Format, ImageSet, TokenSet};
use igpt::model::Engine;
use igpt::parallel::Team;
use igpt::plot::{Series, xy_chart};
use igpt::probe::{self, ProbeResult};
use plotters::style::RGBColor;
use safetensors::{Dtype, tensor::TensorView};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Args)]
pub struct FeaturesArgs {
    /// The model (any format `--model` takes elsewhere).
    #[arg(long)]
    model: String,
    /// Labelled images (a path, or `fashion-mnist`).
    #[arg(long)]
    data: String,
    /// Labels of IDX --data, when they are not beside the images under MNIST's names.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    limit: Option<usize>,
    /// Layers: `all`, or a list like `0,3,6`. Layer l is the normalised input of block l; the
    /// last, n_layer, is the final norm's output.
    #[arg(long, default_value = "all")]
    layers: String,
    /// Where to write the features: safetensors with `layer_L` `[N, d]` float32 tensors (and
    /// `features`, all of them concatenated) and `labels` `[N]` int64 when the data has them;
    /// or, for a `.npy` path, the concatenated features there and the labels in `NAME.labels.npy`.
    #[arg(long)]
    out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// BERT models: average the features over this many random masks per image (each hiding
    /// 15% of the pixels, as in training); 0 reads whole images. Default: `igpt::bert::EVAL_MASKS` for BERT
    /// models, 0 (the only choice) for autoregressive ones.
    #[arg(long)]
    masks: Option<usize>,
}

#[derive(Args)]
pub struct ProbeArgs {
    /// The model; give several (checkpoints of one run) to chart probe accuracy against
    /// held-out likelihood.
    #[arg(long, required = true)]
    model: Vec<String>,
    /// Labelled training images (a path, or `fashion-mnist`); the L2 strength is chosen on a
    /// validation split carved from them.
    #[arg(long)]
    data: String,
    /// Labels of IDX --data, when they are not beside the images under MNIST's names.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Labelled test images, used only for the final accuracy.
    #[arg(long)]
    test_data: String,
    /// Labels of IDX --test-data, when they are not beside the images.
    #[arg(long)]
    test_labels: Option<PathBuf>,
    /// Use only the first N training images.
    #[arg(long)]
    limit: Option<usize>,
    /// Use only the first N test images.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Layers to probe: `all` or a list like `2,3,4`.
    #[arg(long, default_value = "all")]
    layers: String,
    /// Also probe all the listed layers concatenated.
    #[arg(long)]
    concat: bool,
    /// Fraction of the training images held out to choose the L2 strength.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Chart of accuracy against depth.
    #[arg(long, default_value = "probe.png")]
    chart: PathBuf,
    /// With several models: chart of best probe accuracy against held-out NLL.
    #[arg(long, default_value = "probe-vs-nll.png")]
    nll_chart: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// BERT models: average the features over this many random masks per image (each hiding
    /// 15% of the pixels, as in training); 0 reads whole images. Default: `igpt::bert::EVAL_MASKS` for BERT
    /// models, 0 (the only choice) for autoregressive ones.
    #[arg(long)]
    masks: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_layers(spec: &str, n_layer: usize) -> Result<Vec<usize>> {
    if spec == "all" {
        return Ok((0..=n_layer).collect());
    }
    let mut v = Vec::new();
    for part in spec.split(',') {
        let l: usize = part
            .trim()
            .parse()
            .with_context(|| format!("--layers: {part:?} is not a layer number"))?;
        ensure!(
            l <= n_layer,
            "layer {l} does not exist: this model has layers 0..={n_layer} (0..{n_layer} are the \
             blocks' normalised inputs, {n_layer} the final norm's output)"
        );
        v.push(l);
    }
    Ok(v)
}

/// A labelled data set shaped for the model, and its labels.
fn labelled(src: &Source, limit: Option<usize>, m: &LoadedModel) -> Result<(ImageSet, Vec<u32>)> {
    src.load_labelled(
        limit,
        m,
        "a probe needs them (IDX images with their labels file, CIFAR binaries, or a folder \
         with one sub-folder per class)",
    )
}

fn engine_for(m: &LoadedModel, batch: usize, dev: &Device) -> Result<Engine> {
    let mut e = Engine::new(m.model(), batch.max(1), false, dev)?;
    e.set_params(&m.params)?;
    Ok(e)
}

pub fn features(a: FeaturesArgs, dev: &Device, mut team: Team) -> Result<()> {
    let m = igpt::formats::load_model(&a.model)?;
    let layers = parse_layers(&a.layers, m.model().n_layer)?;
    let src = Source {
        spec: &a.data,
        labels: a.labels.as_deref(),
        labels_flag: "--labels",
    };
    let set = src.load_shaped(a.limit, &m)?;
    let labels = set.labels.clone();
    let mut engine = engine_for(&m, a.batch, dev)?;
    let masks = igpt::bert::masks_for(m.model(), a.masks)?;
    // Each rank extracts its share of the images; rank 0 gathers them and writes the file.
    let tokens = TokenSet::quantise(&set, &m.palette, "feature")?;
    let bar = share_bar(&*team, tokens.len(), engine.batch, "feature images");
    let f =
        probe::extract_features_shared(&mut *team, &mut engine, &tokens, &layers, masks, |k| {
            bar.set_position(k as u64)
        })?;
    bar.finish_and_clear();
    let Some(f) = f else { return Ok(()) };
    let (n, d) = (set.len(), m.model().n_embd);
    if a.out.extension().is_some_and(|e| e == "npy") {
        return write_npy_features(&a.out, &f, n, layers.len() * d, labels.as_deref());
    }
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    for (j, &l) in layers.iter().enumerate() {
        let one = probe::select_groups(&f, layers.len(), d, &[j]);
        tensors.push((format!("layer_{l}"), vec![n, d], bytes(&one)));
    }
    tensors.push(("features".into(), vec![n, layers.len() * d], bytes(&f)));
    if let Some(l) = &labels {
        let b: Vec<u8> = l.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
        tensors.push(("labels".into(), vec![n], b));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, s, b)| {
            let dt = if name == "labels" {
                Dtype::I64
            } else {
                Dtype::F32
            };
            Ok((name.clone(), TensorView::new(dt, s.clone(), b)?))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("layers".to_string(), serde_json::to_string(&layers)?)]);
    igpt::fsutil::write_atomic(&a.out, &safetensors::serialize(views, Some(meta))?)?;
    println!(
        "{}: {n} images x {} layer(s) x {d} features{}",
        a.out.display(),
        layers.len(),
        if labels.is_some() {
            ", with labels"
        } else {
            ", no labels in the data"
        }
    );
    Ok(())
}

/// `.npy` output: the features `[n, width]` (the layers side by side) at `out`, and the labels
/// (int64) beside it as `NAME.labels.npy`.
fn write_npy_features(
    out: &std::path::Path,
    f: &[f32],
    n: usize,
    width: usize,
    labels: Option<&[u32]>,
) -> Result<()> {
    igpt::fsutil::write_atomic(out, &igpt::npy::encode_f32(&[n, width], f))?;
    print!("{}: {n} images x {width} features", out.display());
    if let Some(l) = labels {
        let path = out.with_extension("labels.npy");
        let b: Vec<u8> = l.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
        igpt::fsutil::write_atomic(&path, &igpt::npy::encode(&[n], igpt::npy::DType::I64, &b))?;
        println!(", labels in {}", path.display());
    } else {
        println!(", no labels in the data");
    }
    Ok(())
}

fn row(name: &str, r: &ProbeResult) {
    println!(
        "{name:>10}  {:>8.2}%  {:>8.2}%  {:>8.2}%  {:>8.0e}  {}",
        100.0 * r.test_accuracy,
        100.0 * r.val_accuracy,
        100.0 * r.train_accuracy,
        r.l2,
        if r.report.converged {
            format!("converged ({} it.)", r.report.iterations)
        } else {
            format!("NOT converged after {} it.", r.report.iterations)
        }
    );
}

fn header() {
    println!(
        "{:>10}  {:>9}  {:>9}  {:>9}  {:>8}  L-BFGS",
        "features", "test", "val", "train", "L2"
    );
}

pub fn probe(a: ProbeArgs, dev: &Device) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&a.val_fraction) && a.val_fraction > 0.0,
        "--val-fraction must be between 0 and 1"
    );
    let first = igpt::formats::load_model(&a.model[0])?;
    let train_src = Source {
        spec: &a.data,
        labels: a.labels.as_deref(),
        labels_flag: "--labels",
    };
    let test_src = Source {
        spec: &a.test_data,
        labels: a.test_labels.as_deref(),
        labels_flag: "--test-labels",
    };
    let (train_set, train_y) = labelled(&train_src, a.limit, &first)?;
    let (test_set, test_y) = labelled(&test_src, a.test_limit, &first)?;
    let classes = probe::classes_of(&train_y, &test_y)?;

    // The raw-pixel baseline: the same protocol on the pixels at the data's own resolution.
    let raw = |src: &Source, limit: Option<usize>| -> Result<ImageSet> {
        let set = src.flag_context(data::load_labelled(src.spec, Format::Auto, src.labels))?;
        match limit {
            Some(l) => set.take(0..l),
            None => Ok(set),
        }
    };
    let (raw_train, raw_test) = (raw(&train_src, a.limit)?, raw(&test_src, a.test_limit)?);
    println!(
        "{} training images ({:.0}% held out to choose L2), {} test images, {classes} classes",
        train_y.len(),
        100.0 * a.val_fraction,
        test_y.len()
    );
    header();
    let baseline = probe::pixel_probe(&raw_train, &raw_test, a.val_fraction, a.seed)?;
    row("pixels", &baseline);

    let mut best_per_model = Vec::new();
    for (mi, spec) in a.model.iter().enumerate() {
        let m = if mi == 0 {
            first.clone()
        } else {
            igpt::formats::load_model(spec)?
        };
        ensure!(
            m.model() == first.model() || (m.model().side == first.model().side),
            "{spec}: all models of one probe must read images of the same size"
        );
        let opts = probe::ProbeOptions {
            layers: parse_layers(&a.layers, m.model().n_layer)?,
            concat: a.concat,
            masks: igpt::bert::masks_for(m.model(), a.masks)?,
            val_fraction: a.val_fraction,
            seed: a.seed,
        };
        let masks = opts.masks;
        let mut engine = engine_for(&m, a.batch, dev)?;
        if masks > 0 {
            let views = if masks == 1 {
                "one mask".to_string()
            } else {
                format!("{masks} masks")
            };
            println!("{spec}: BERT features averaged over {views} per image");
        }
        let train_tokens = TokenSet::quantise(&train_set, &m.palette, "training")?;
        let test_tokens = TokenSet::quantise(&test_set, &m.palette, "test")?;
        let bar = pixel_bar((train_y.len() + test_y.len()) as u64, "images");
        let mut printed = a.model.len() == 1;
        let probes = probe::probe_model(
            &mut engine,
            &train_tokens,
            &test_tokens,
            &opts,
            |is_test, k| {
                let before = if is_test { train_y.len() } else { 0 };
                bar.set_position((before + k) as u64)
            },
            |name, r| {
                bar.finish_and_clear();
                if !printed {
                    println!("model {spec}:");
                    printed = true;
                }
                row(name, r)
            },
        )?;
        let (best_l, best) = probes.best();
        println!(
            "best layer by validation: {best_l} ({:.2}% test; raw pixels {:.2}%, {:+.2} points)",
            100.0 * best.test_accuracy,
            100.0 * baseline.test_accuracy,
            100.0 * (best.test_accuracy - baseline.test_accuracy)
        );
        let per_layer = &probes.layers;
        if mi == 0 && per_layer.len() > 1 {
            let points: Vec<(f64, f64)> = per_layer
                .iter()
                .map(|(l, r)| (*l as f64, 100.0 * r.test_accuracy))
                .collect();
            xy_chart(
                &a.chart,
                "linear probe: test accuracy by layer",
                "layer (normalised input of block l; last = final norm)",
                "test accuracy (%)",
                &[Series {
                    label: "linear probe",
                    points,
                    color: RGBColor(30, 90, 200),
                }],
                Some(("raw pixels", 100.0 * baseline.test_accuracy)),
                Some((best_l as f64, 100.0 * best.test_accuracy)),
            )?;
            println!("chart: {}", a.chart.display());
        }
        if a.model.len() > 1 {
            // BERT models: nats per hidden pixel, averaged over fixed masks (as many as the
            // features use, or the default when those read whole images).
            let nll_masks = if masks > 0 {
                masks
            } else {
                igpt::bert::EVAL_MASKS
            };
            let nll = igpt::eval::evaluate_masks(
                &mut engine,
                &test_tokens,
                0,
                nll_masks,
                &mut Vec::new(),
            )?;
            println!("held-out NLL: {nll:.4} nats/token");
            best_per_model.push((nll, 100.0 * best.test_accuracy));
        }
    }
    if best_per_model.len() > 1 {
        xy_chart(
            &a.nll_chart,
            "best-layer linear probe against held-out NLL",
            "held-out NLL (nats/token)",
            "test accuracy (%)",
            &[Series {
                label: "checkpoints",
                points: best_per_model,
                color: RGBColor(30, 90, 200),
            }],
            Some(("raw pixels", 100.0 * baseline.test_accuracy)),
            None,
        )?;
        println!("chart: {}", a.nll_chart.display());
    }
    Ok(())
}

/// The demo's last step: a linear probe of its model on its own images, `n_train` training
/// images against the held-out ones, beside a probe of the (palette-quantised) pixels.
pub fn demo_probe(
    run: &std::path::Path,
    train: &TokenSet,
    val: &TokenSet,
    n_train: usize,
    dev: &Device,
) -> Result<()> {
    let m = igpt::formats::load_model(&run.display().to_string())?;
    let bar = pixel_bar((n_train.min(train.len()) + val.len()) as u64, "images");
    let mut printed_header = false;
    let q = probe::quick_probe(
        &m,
        train,
        val,
        n_train,
        dev,
        |k| bar.set_position(k as u64),
        |name, r| {
            if !printed_header {
                bar.finish_and_clear();
                header();
                printed_header = true;
            }
            row(name, r)
        },
    )?;
    let (base, probes) = (&q.pixels, &q.layers);
    let (best_l, best) = probes.best();
    println!(
        "best layer (by validation): {best_l}, {:.1}% on the {} held-out images; \
         palette pixels {:.1}%",
        100.0 * best.test_accuracy,
        val.len(),
        100.0 * base.test_accuracy
    );
    let points = probes
        .layers
        .iter()
        .map(|(l, r)| (*l as f64, 100.0 * r.test_accuracy))
        .collect();
    xy_chart(
        &run.join("probe.png"),
        "demo: linear probe accuracy by layer",
        "layer (normalised input of block l; last = final norm)",
        "held-out accuracy (%)",
        &[Series {
            label: "linear probe",
            points,
            color: RGBColor(30, 90, 200),
        }],
        Some(("palette pixels", 100.0 * base.test_accuracy)),
        Some((best_l as f64, 100.0 * best.test_accuracy)),
    )
}
