//! The CIFAR-10 / CIFAR-100 binary format: one record per image, label byte(s) then
//! 3072 bytes of 32x32 planar RGB (all R, then G, then B).

use super::{Format, ImageSet};
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

const PLANE: usize = 32 * 32;

pub fn guess_variant(path: &Path) -> Result<Format> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len() as usize;
    match (
        len.is_multiple_of(3 * PLANE + 1),
        len.is_multiple_of(3 * PLANE + 2),
    ) {
        (true, false) => Ok(Format::Cifar10),
        (false, true) => Ok(Format::Cifar100),
        (true, true) => Err(super::UnknownFormat(path.to_path_buf())).with_context(|| {
            format!(
                "{}: its size fits both CIFAR-10 and CIFAR-100 records",
                path.display()
            )
        }),
        (false, false) => bail!(
            "{}: size {len} is not a whole number of CIFAR records (3073 or 3074 bytes); the file is truncated or not CIFAR",
            path.display()
        ),
    }
}

/// Reads a CIFAR binary batch; CIFAR-100 records carry (coarse, fine) labels and the fine one is kept.
pub fn load(path: &Path, cifar100: bool) -> Result<ImageSet> {
    let bytes = crate::fsutil::read_regular(path)?;
    from_bytes(&bytes, cifar100, &path.display().to_string())
}

/// Parses CIFAR records held in memory; `what` names them in errors.
pub fn from_bytes(bytes: &[u8], cifar100: bool, what: &str) -> Result<ImageSet> {
    let label_bytes = if cifar100 { 2 } else { 1 };
    let rec = label_bytes + 3 * PLANE;
    ensure!(
        !bytes.is_empty() && bytes.len().is_multiple_of(rec),
        "{what}: {} bytes is not a whole number of {rec}-byte CIFAR records (a truncated file, or not this CIFAR variant)",
        bytes.len()
    );
    let n = bytes.len() / rec;
    let mut pixels = Vec::with_capacity(n * 3 * PLANE);
    let mut labels = Vec::with_capacity(n);
    for r in bytes.chunks_exact(rec) {
        labels.push(r[label_bytes - 1] as u32);
        let img = &r[label_bytes..];
        for p in 0..PLANE {
            pixels.extend_from_slice(&[img[p], img[PLANE + p], img[2 * PLANE + p]]);
        }
    }
    Ok(ImageSet {
        height: 32,
        width: 32,
        channels: 3,
        pixels,
        labels: Some(labels),
        class_names: vec![],
    })
}
