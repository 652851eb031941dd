//! Image data sets: readers for common formats, resizing, splitting, and the token cache.

pub mod cache;
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod npyimages;

pub use cache::TokenSet;

use crate::preprocess;
use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Decoded images, all the same size: `pixels` is `[n, height, width, channels]` u8.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
    pub labels: Option<Vec<u32>>,
    /// Class names by label, where the source has them (folders).
    pub class_names: Vec<String>,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.pixels.len() / self.image_bytes().max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn image_bytes(&self) -> usize {
        self.height * self.width * self.channels
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * self.image_bytes()..(i + 1) * self.image_bytes()]
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_bytes());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        ImageSet {
            pixels,
            labels: self
                .labels
                .as_ref()
                .map(|l| indices.iter().map(|&i| l[i]).collect()),
            class_names: self.class_names.clone(),
            ..*self
        }
    }

    /// Converts to `channels` ([`preprocess::convert_channels`]: RGB to gray by Pillow's
    /// luma, gray to RGB by copying), at the images' own size.
    pub fn with_channels(self, channels: usize) -> Result<ImageSet> {
        if channels == self.channels {
            return Ok(self);
        }
        let pixels = preprocess::convert_channels(&self.pixels, self.channels, channels)?;
        Ok(ImageSet {
            pixels,
            channels,
            ..self
        })
    }

    /// Every image as a model of side `side` with `channels` sees it: [`preprocess::shape`],
    /// the same path as image files take.
    pub fn shaped(self, side: usize, channels: usize) -> Result<ImageSet> {
        if (self.height, self.width, self.channels) == (side, side, channels) {
            return Ok(self);
        }
        check_shape(self.len(), side, channels)?;
        let images: Vec<Vec<u8>> = (0..self.len())
            .into_par_iter()
            .map(|i| {
                let img = preprocess::ImageRef {
                    pixels: self.image(i),
                    width: self.width,
                    height: self.height,
                    channels: self.channels,
                };
                preprocess::shape(img, side, channels)
            })
            .collect::<Result<_>>()?;
        Ok(ImageSet {
            height: side,
            width: side,
            channels,
            pixels: images.concat(),
            ..self
        })
    }

    /// The images in `range` (its end clamped to the set), refusing a start past the end.
    pub fn take(self, range: Range<usize>) -> Result<ImageSet> {
        ensure!(
            range.start < range.end,
            "images {}..{} is an empty selection",
            range.start,
            range.end
        );
        ensure!(
            range.start < self.len(),
            "image {} is past the {} images of the data set",
            range.start,
            self.len()
        );
        if range == (0..self.len()) {
            return Ok(self);
        }
        let end = range.end.min(self.len());
        Ok(self.select(&(range.start..end).collect::<Vec<_>>()))
    }

    /// Splits off a validation part: a fixed shuffle by `seed`, the last `fraction` held out.
    pub fn split(&self, fraction: f64, seed: u64) -> (ImageSet, ImageSet) {
        let order = shuffled(self.len(), seed);
        let n_val = ((self.len() as f64) * fraction).round() as usize;
        let (train, val) = order.split_at(self.len() - n_val);
        (self.select(train), self.select(val))
    }
}

/// Refuses to shape `n` images to `side` when the side is not one a model can have or the
/// shaped images would not fit in memory, before any of them is made.
pub fn check_shape(n: usize, side: usize, channels: usize) -> Result<()> {
    crate::config::check_side(side)?;
    crate::memory::Estimate::new()
        .add(
            "the images at the model's side",
            n as u128 * (side * side * channels) as u128,
            crate::memory::Scale::Model,
        )
        .check(&format!("shaping {n} images to {side}x{side}"))?;
    Ok(())
}

/// For a message about missing labels: the label files looked for beside IDX images.
pub fn labels_tried(spec: &str) -> String {
    let tried = idx::label_candidates(Path::new(spec));
    if tried.is_empty() {
        return String::new();
    }
    let names: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    format!("; looked for {}", names.join(", "))
}

/// A permutation of `0..n` from `seed`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    v
}

/// A data path whose format its name does not tell.
#[derive(Debug, thiserror::Error)]
#[error("cannot tell the format of {}: name it (idx, cifar10, cifar100, folder or npy)", .0.display())]
pub struct UnknownFormat(pub PathBuf);

/// A selection of no images from a data set.
#[derive(Debug, thiserror::Error)]
#[error("images {}..{} of {data} select nothing: ask for at least one image", .range.start, .range.end)]
pub struct EmptySelection {
    pub data: String,
    pub range: Range<usize>,
}

/// Images that are not square, given to a model without a chosen side.
#[derive(Debug, thiserror::Error)]
#[error("the images of {data} are {height}x{width}, not square: choose the model's image side")]
pub struct NotSquare {
    pub data: String,
    pub height: usize,
    pub width: usize,
}

/// Formats igpt reads. `Auto` decides by the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Auto,
    Idx,
    Cifar10,
    Cifar100,
    Folder,
    Npy,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Format::Auto,
            "idx" => Format::Idx,
            "cifar10" => Format::Cifar10,
            "cifar100" => Format::Cifar100,
            "folder" => Format::Folder,
            "npy" => Format::Npy,
            _ => bail!("unknown data format '{s}': auto, idx, cifar10, cifar100, folder or npy"),
        })
    }
}

/// The Fashion-MNIST test split shipped in the repository (REFERENCE.md §9).
pub const BUILTIN_FASHION: &str = "fashion-mnist";

/// The shipped split, compiled into the binary so `igpt demo` works from any directory.
const FASHION_IMAGES: &[u8] = include_bytes!("../../data/fashion-mnist/t10k-images-idx3-ubyte.gz");
const FASHION_LABELS: &[u8] = include_bytes!("../../data/fashion-mnist/t10k-labels-idx1-ubyte.gz");

/// The shipped Fashion-MNIST test split: 10,000 28x28 grayscale images with labels.
pub fn builtin_fashion() -> Result<ImageSet> {
    let mut set = idx::load_bytes(
        FASHION_IMAGES,
        "the built-in Fashion-MNIST split",
        Some(FASHION_LABELS),
    )?;
    set.class_names = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Ok(set)
}

/// The path behind `spec` and its format, decided by the path when `Auto`.
fn resolve(spec: &str, format: Format) -> Result<(PathBuf, Format)> {
    let path = PathBuf::from(spec);
    if !path.exists() {
        return Err(crate::fsutil::NotFound::new("data set ", &path, "").into());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let format = match format {
        Format::Auto if path.is_dir() => Format::Folder,
        Format::Auto if name.ends_with(".npy") => Format::Npy,
        Format::Auto if name.contains("idx3") || name.contains("-ubyte") => Format::Idx,
        Format::Auto if name.ends_with(".bin") => cifar::guess_variant(&path)?,
        Format::Auto => return Err(UnknownFormat(path).into()),
        f => f,
    };
    Ok((path, format))
}

fn ensure_some(set: ImageSet, path: &Path) -> Result<ImageSet> {
    ensure!(
        !set.is_empty(),
        "data set {} holds no images",
        path.display()
    );
    Ok(set)
}

/// Reads a data set from `spec`: a path, or `fashion-mnist` for the shipped split. A folder
/// of images of several sizes comes at its first image's size (square); [`load_shaped`] reads
/// each image from its own size instead.
pub fn load(spec: &str, format: Format) -> Result<ImageSet> {
    load_labelled(spec, format, None)
}

/// [`load`] with the labels of IDX images read from `labels` rather than looked for beside
/// them. Other formats carry their own labels, so naming a file for them is refused.
pub fn load_labelled(spec: &str, format: Format, labels: Option<&Path>) -> Result<ImageSet> {
    if spec == BUILTIN_FASHION {
        if let Some(l) = labels {
            bail!(
                "a labels file ({}) goes with IDX images; the built-in {BUILTIN_FASHION} split \
                 has its own labels",
                l.display()
            );
        }
        return builtin_fashion();
    }
    let (path, format) = resolve(spec, format)?;
    labels_fit(labels, &path, format)?;
    let set = match format {
        Format::Idx => idx::load(&path, labels),
        Format::Cifar10 => cifar::load(&path, false),
        Format::Cifar100 => cifar::load(&path, true),
        Format::Folder => folder::load(&path),
        Format::Npy => npyimages::load(&path),
        Format::Auto => unreachable!("resolved above"),
    }
    .with_context(|| format!("cannot load data set {}", path.display()))?;
    ensure_some(set, &path)
}

/// Refuses a labels file for data other than IDX images, whose labels come with them.
fn labels_fit(labels: Option<&Path>, path: &Path, format: Format) -> Result<()> {
    if let Some(l) = labels {
        ensure!(
            format == Format::Idx,
            "a labels file ({}) goes with IDX images; {} is read as {}, whose labels come \
             with its images",
            l.display(),
            path.display(),
            format!("{format:?}").to_lowercase()
        );
    }
    Ok(())
}

/// Reads image files shaped for a model of side `side` with `channels`, in order, by the same
/// path as [`load_shaped`]; `note` hears what was converted or resized in each file.
pub fn read_files(
    files: &[PathBuf],
    side: usize,
    channels: usize,
    mut note: impl FnMut(&Path, &str),
) -> Result<ImageSet> {
    let mut pixels = Vec::with_capacity(files.len() * side * side * channels);
    for f in files {
        let img = preprocess::decode_file(f)?;
        if let Some(n) = img.conversion_note(channels) {
            note(f, n);
        }
        if (img.width, img.height) != (side, side) {
            note(
                f,
                &format!("{}x{}; resized to {side}x{side}", img.width, img.height),
            );
        }
        pixels.extend(
            preprocess::shape(img.image(), side, channels)
                .with_context(|| format!("cannot shape {}", f.display()))?,
        );
    }
    Ok(ImageSet {
        height: side,
        width: side,
        channels,
        pixels,
        labels: None,
        class_names: vec![],
    })
}

/// Reads the images `range` of a data set (all when `None`) shaped for a model: `side` (default:
/// the images' own, which must be square; a folder's first image's larger side) and `channels`
/// (default: the data's). Each image goes through [`preprocess::shape`] once from its decoded
/// pixels, so a folder gives the same pixels as its files given one by one.
pub fn load_shaped(
    spec: &str,
    format: Format,
    range: Option<Range<usize>>,
    side: Option<usize>,
    channels: Option<usize>,
) -> Result<ImageSet> {
    load_shaped_labelled(spec, format, None, range, side, channels)
}

/// [`load_shaped`] with the labels of IDX images read from `labels` ([`load_labelled`]).
pub fn load_shaped_labelled(
    spec: &str,
    format: Format,
    labels: Option<&Path>,
    range: Option<Range<usize>>,
    side: Option<usize>,
    channels: Option<usize>,
) -> Result<ImageSet> {
    if let Some(r) = &range
        && r.start >= r.end
    {
        return Err(EmptySelection {
            data: spec.to_string(),
            range: r.clone(),
        }
        .into());
    }
    if spec != BUILTIN_FASHION {
        let (path, format) = resolve(spec, format)?;
        labels_fit(labels, &path, format)?;
        if format == Format::Folder {
            let set = folder::load_shaped(&path, range, side, channels.unwrap_or(3))
                .with_context(|| format!("cannot load data set {}", path.display()))?;
            return ensure_some(set, &path);
        }
    }
    let mut set = load_labelled(spec, format, labels)?;
    if let Some(r) = range {
        set = set.take(r).with_context(|| format!("data set {spec}"))?;
    }
    let side = match side {
        Some(s) => s,
        None => {
            if set.height != set.width {
                return Err(NotSquare {
                    data: spec.to_string(),
                    height: set.height,
                    width: set.width,
                }
                .into());
            }
            set.height
        }
    };
    let channels = channels.unwrap_or(set.channels);
    set.shaped(side, channels)
}
