//! A folder of PNG/JPEG images; each sub-folder is a class (sorted by name). Images directly in
//! the folder, with no sub-folders, form an unlabelled set.

use super::ImageSet;
use crate::preprocess;
use anyhow::{Context, Result, ensure};
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

/// The image files directly in `dir`, sorted by path.
pub fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    v.sort();
    Ok(v)
}

/// A folder's image files in order, with their labels when it has class sub-folders.
struct Listing {
    files: Vec<PathBuf>,
    labels: Option<Vec<u32>>,
    class_names: Vec<String>,
}

fn list(dir: &Path) -> Result<Listing> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut listing = Listing {
        files: Vec::new(),
        labels: None,
        class_names: Vec::new(),
    };
    if classes.is_empty() {
        listing.files = images_in(dir)?;
    } else {
        let mut labels = Vec::new();
        for (c, cdir) in classes.iter().enumerate() {
            let files = images_in(cdir)?;
            labels.extend(std::iter::repeat_n(c as u32, files.len()));
            listing.files.extend(files);
            let name = cdir.file_name().unwrap_or_default().to_string_lossy();
            listing.class_names.push(name.to_string());
        }
        listing.labels = Some(labels);
    }
    ensure!(
        !listing.files.is_empty(),
        "{} holds no .png or .jpg images",
        dir.display()
    );
    Ok(listing)
}

/// Loads the images `range` (all when `None`), each shaped from its own size by
/// [`preprocess::shape`] to `side` (default: the first image's larger side) and `channels`.
pub fn load_shaped(
    dir: &Path,
    range: Option<Range<usize>>,
    side: Option<usize>,
    channels: usize,
) -> Result<ImageSet> {
    let mut listing = list(dir)?;
    let n = listing.files.len();
    let range = range.unwrap_or(0..n);
    ensure!(
        range.start < n && range.start < range.end,
        "images {}..{} are not among the {n} images of {}",
        range.start,
        range.end,
        dir.display()
    );
    let range = range.start..range.end.min(n);
    let files = &listing.files[range.clone()];
    let side = match side {
        Some(s) => s,
        None => {
            let first = preprocess::decode_file(&files[0])?;
            first.width.max(first.height)
        }
    };
    super::check_shape(files.len(), side, channels)?;
    let images: Vec<Vec<u8>> = files
        .par_iter()
        .map(|f| {
            let img = preprocess::decode_file(f)?;
            preprocess::shape(img.image(), side, channels)
                .with_context(|| format!("cannot shape {}", f.display()))
        })
        .collect::<Result<_>>()?;
    let labels = listing.labels.take().map(|l| l[range].to_vec());
    Ok(ImageSet {
        height: side,
        width: side,
        channels,
        pixels: images.concat(),
        labels,
        class_names: listing.class_names,
    })
}

/// Loads the folder as RGB at the size of its first image (its larger side, square); images of
/// other sizes are resized to it.
pub fn load(dir: &Path) -> Result<ImageSet> {
    load_shaped(dir, None, None, 3)
}
