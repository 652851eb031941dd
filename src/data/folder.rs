//! A folder of PNG/JPEG images; each sub-folder is a class (sorted by name). Images directly in
//! the folder, with no sub-folders, form an unlabelled set.

use super::ImageSet;
use anyhow::{Context, Result, ensure};
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

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    v.sort();
    Ok(v)
}

/// Decodes one image file to RGB8, naming the file in any error.
pub fn decode_rgb(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let img =
        image::open(path).with_context(|| format!("cannot decode image {}", path.display()))?;
    let rgb = img.to_rgb8();
    Ok((rgb.height() as usize, rgb.width() as usize, rgb.into_raw()))
}

/// Loads every image, resized to `side` (images in a folder may differ in size).
pub fn load_resized(dir: &Path, side: usize) -> Result<ImageSet> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut files: Vec<(PathBuf, Option<u32>)> = Vec::new();
    if classes.is_empty() {
        files.extend(images_in(dir)?.into_iter().map(|p| (p, None)));
    } else {
        for (c, cdir) in classes.iter().enumerate() {
            files.extend(images_in(cdir)?.into_iter().map(|p| (p, Some(c as u32))));
        }
    }
    ensure!(
        !files.is_empty(),
        "{} holds no .png or .jpg images",
        dir.display()
    );
    let mut pixels = Vec::with_capacity(files.len() * side * side * 3);
    for (p, _) in &files {
        let (h, w, px) = decode_rgb(p)?;
        let one = ImageSet {
            height: h,
            width: w,
            channels: 3,
            pixels: px,
            labels: None,
            class_names: vec![],
        };
        pixels.extend_from_slice(&one.resized(side).pixels);
    }
    let labels = if classes.is_empty() {
        None
    } else {
        Some(files.iter().map(|(_, l)| l.unwrap()).collect())
    };
    let class_names = classes
        .iter()
        .map(|c| c.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    Ok(ImageSet {
        height: side,
        width: side,
        channels: 3,
        pixels,
        labels,
        class_names,
    })
}

/// Loads the folder at the size of its first image (the caller resizes later); images of
/// other sizes are resized to that first size.
pub fn load(dir: &Path) -> Result<ImageSet> {
    let first = {
        let mut any = images_in(dir)?;
        if any.is_empty() {
            let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            subs.sort();
            for s in subs {
                any = images_in(&s)?;
                if !any.is_empty() {
                    break;
                }
            }
        }
        any.into_iter()
            .next()
            .with_context(|| format!("{} holds no .png or .jpg images", dir.display()))?
    };
    let (h, w, _) = decode_rgb(&first)?;
    let set = load_resized(dir, h.max(w))?;
    Ok(set)
}
