//! The IDX format of MNIST and Fashion-MNIST, raw or gzip-compressed.

use super::ImageSet;
use anyhow::{Context, Result, bail, ensure};
use std::io::Read;
use std::path::{Path, PathBuf};

/// File contents, gunzipped when they start with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = crate::fsutil::read_regular(path)?;
    gunzip_if_needed(raw, &path.display().to_string())
}

/// `raw` itself, or its gunzipped contents when it starts with the gzip magic.
fn gunzip_if_needed(raw: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{what} is not a valid gzip file (truncated or corrupt)"))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX array of u8: returns its dimensions and data.
pub fn parse(bytes: &[u8], what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    ensure!(bytes.len() >= 4, "{what}: too short to be an IDX file");
    ensure!(
        bytes[0] == 0 && bytes[1] == 0,
        "{what}: wrong magic number (not an IDX file)"
    );
    ensure!(
        bytes[2] == 0x08,
        "{what}: IDX element type 0x{:02x} is not unsigned bytes",
        bytes[2]
    );
    let ndim = bytes[3] as usize;
    ensure!(
        (1..=4).contains(&ndim),
        "{what}: IDX with {ndim} dimensions is not supported"
    );
    ensure!(bytes.len() >= 4 + 4 * ndim, "{what}: truncated IDX header");
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .with_context(|| format!("{what}: IDX dimensions {dims:?} are larger than any file"))?;
    let body = &bytes[4 + 4 * ndim..];
    ensure!(
        body.len() >= n,
        "{what}: truncated IDX data: dimensions {dims:?} need {n} bytes, found {}",
        body.len()
    );
    Ok((dims, body[..n].to_vec()))
}

/// The names a labels file beside `images` may have: MNIST's own (`*-labels-idx1-ubyte`) and
/// the dotted one it is often distributed under (`*-labels.idx1-ubyte`), raw or `.gz`.
pub fn label_candidates(images: &Path) -> Vec<PathBuf> {
    let Some(name) = images.file_name().map(|n| n.to_string_lossy().to_string()) else {
        return vec![];
    };
    let mut out: Vec<PathBuf> = Vec::new();
    for (from, to) in [
        ("images-idx3", "labels-idx1"),
        ("images.idx3", "labels.idx1"),
        ("images-idx3", "labels.idx1"),
        ("images.idx3", "labels-idx1"),
    ] {
        if !name.contains(from) {
            continue;
        }
        let base = name.replace(from, to);
        let stem = base.strip_suffix(".gz").unwrap_or(&base).to_string();
        for cand in [stem.clone(), format!("{stem}.gz")] {
            let p = images.with_file_name(cand);
            if p != images && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Reads an IDX image file (`[n, h, w]`) and its labels: `labels` when given, else the first
/// of [`label_candidates`] that exists.
pub fn load(path: &Path, labels: Option<&Path>) -> Result<ImageSet> {
    let images = read_maybe_gz(path)?;
    let lp = match labels {
        Some(l) => Some(l.to_path_buf()),
        None => label_candidates(path).into_iter().find(|p| p.exists()),
    };
    let labels = match lp {
        Some(lp) => Some((
            read_maybe_gz(&lp).with_context(|| format!("labels file {}", lp.display()))?,
            lp.display().to_string(),
        )),
        None => None,
    };
    from_bytes(
        &images,
        &path.display().to_string(),
        labels.as_ref().map(|(b, w)| (&b[..], w.as_str())),
    )
}

/// Builds a set from IDX images and optional labels already in memory (raw or gzip).
pub fn load_bytes(images: &[u8], what: &str, labels: Option<&[u8]>) -> Result<ImageSet> {
    let images = gunzip_if_needed(images.to_vec(), what)?;
    let labels = labels
        .map(|l| gunzip_if_needed(l.to_vec(), &format!("{what} labels")))
        .transpose()?;
    let lw = format!("{what} labels");
    from_bytes(&images, what, labels.as_deref().map(|l| (l, lw.as_str())))
}

fn from_bytes(images: &[u8], what: &str, labels: Option<(&[u8], &str)>) -> Result<ImageSet> {
    let (dims, pixels) = parse(images, what)?;
    if dims.len() != 3 {
        bail!("{what}: expected images of shape [n, height, width], found {dims:?}");
    }
    let labels = match labels {
        Some((bytes, lw)) => {
            let (ldims, l) = parse(bytes, lw)?;
            ensure!(
                ldims.len() == 1,
                "{lw}: an IDX array of shape {ldims:?} is not a labels file (one value per image)"
            );
            ensure!(
                ldims[0] == dims[0],
                "{lw}: {} labels for the {} images of {what}",
                ldims[0],
                dims[0]
            );
            Some(l.into_iter().map(u32::from).collect())
        }
        None => None,
    };
    Ok(ImageSet {
        height: dims[1],
        width: dims[2],
        channels: 1,
        pixels,
        labels,
        class_names: vec![],
    })
}
