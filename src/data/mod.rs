//! Image data sets: readers for common formats, resizing, splitting, and the token cache.

pub mod cache;
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod npyimages;

pub use cache::TokenSet;

use anyhow::{Context, Result, bail, ensure};
use std::path::PathBuf;

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

    /// Converts to `channels` (RGB to gray by luma, gray to RGB by copying).
    pub fn with_channels(self, channels: usize) -> Result<ImageSet> {
        ensure!(
            channels == 1 || channels == 3,
            "images must have 1 or 3 channels (got {channels})"
        );
        if channels == self.channels {
            return Ok(self);
        }
        let pixels: Vec<u8> = match (self.channels, channels) {
            (1, 3) => self.pixels.iter().flat_map(|&v| [v, v, v]).collect(),
            (3, 1) => self
                .pixels
                .chunks_exact(3)
                .map(|p| {
                    ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8
                })
                .collect(),
            (a, b) => bail!("cannot convert {a}-channel images to {b} channels"),
        };
        Ok(ImageSet {
            pixels,
            channels,
            ..self
        })
    }

    /// Resizes every image to `side x side` (whole image, aspect ratio not kept), with an
    /// antialiased bilinear filter when shrinking.
    pub fn resized(self, side: usize) -> ImageSet {
        if self.height == side && self.width == side {
            return self;
        }
        use image::imageops::{FilterType, resize};
        let (h, w, c) = (self.height, self.width, self.channels);
        let mut pixels = Vec::with_capacity(self.len() * side * side * c);
        for i in 0..self.len() {
            let src = self.image(i).to_vec();
            if c == 1 {
                let img = image::GrayImage::from_raw(w as u32, h as u32, src).expect("image size");
                pixels.extend_from_slice(
                    resize(&img, side as u32, side as u32, FilterType::Triangle).as_raw(),
                );
            } else {
                let img = image::RgbImage::from_raw(w as u32, h as u32, src).expect("image size");
                pixels.extend_from_slice(
                    resize(&img, side as u32, side as u32, FilterType::Triangle).as_raw(),
                );
            }
        }
        ImageSet {
            height: side,
            width: side,
            pixels,
            ..self
        }
    }

    /// Splits off a validation part: a fixed shuffle by `seed`, the last `fraction` held out.
    pub fn split(&self, fraction: f64, seed: u64) -> (ImageSet, ImageSet) {
        let order = shuffled(self.len(), seed);
        let n_val = ((self.len() as f64) * fraction).round() as usize;
        let (train, val) = order.split_at(self.len() - n_val);
        (self.select(train), self.select(val))
    }
}

/// A permutation of `0..n` from `seed`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    v
}

/// Formats igpt reads. `Auto` decides by the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Auto,
    Idx,
    Cifar10,
    Cifar100,
    Folder,
    Npy,
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

/// Reads a data set from `spec`: a path, or `fashion-mnist` for the shipped split.
pub fn load(spec: &str, format: Format) -> Result<ImageSet> {
    if spec == BUILTIN_FASHION {
        return builtin_fashion();
    }
    let path = PathBuf::from(spec);
    ensure!(path.exists(), "data set {} does not exist", path.display());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let format = match format {
        Format::Auto if path.is_dir() => Format::Folder,
        Format::Auto if name.ends_with(".npy") => Format::Npy,
        Format::Auto if name.contains("idx3") || name.contains("-ubyte") => Format::Idx,
        Format::Auto if name.ends_with(".bin") => cifar::guess_variant(&path)?,
        Format::Auto => bail!(
            "cannot tell the format of {}: pass --format (idx, cifar10, cifar100, folder or npy)",
            path.display()
        ),
        f => f,
    };
    let set = match format {
        Format::Idx => idx::load(&path),
        Format::Cifar10 => cifar::load(&path, false),
        Format::Cifar100 => cifar::load(&path, true),
        Format::Folder => folder::load(&path),
        Format::Npy => npyimages::load(&path),
        Format::Auto => unreachable!("resolved above"),
    }
    .with_context(|| format!("cannot load data set {}", path.display()))?;
    ensure!(
        !set.is_empty(),
        "data set {} holds no images",
        path.display()
    );
    Ok(set)
}
