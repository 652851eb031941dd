//! Images stored as a NumPy array: uint8 `[n, h, w]` or `[n, h, w, c]`, with optional labels in
//! a sibling file named `<stem>_labels.npy` (integer `[n]`).

use super::ImageSet;
use crate::npy;
use anyhow::{Result, bail, ensure};
use std::path::Path;

pub fn load(path: &Path) -> Result<ImageSet> {
    let a = npy::read(path)?;
    ensure!(
        a.dtype == npy::DType::U8,
        "{}: image arrays must be uint8 (found {:?}); convert with arr.astype(np.uint8)",
        path.display(),
        a.dtype
    );
    let (n, h, w, c) = match a.shape[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] if c == 1 || c == 3 => (n, h, w, c),
        _ => bail!(
            "{}: expected shape [n, h, w] or [n, h, w, 1|3], found {:?}",
            path.display(),
            a.shape
        ),
    };
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let lp = path.with_file_name(format!("{stem}_labels.npy"));
    let labels = if lp.exists() {
        let l = npy::read(&lp)?;
        ensure!(
            l.shape == [n],
            "{}: expected {n} labels, found shape {:?}",
            lp.display(),
            l.shape
        );
        let vals = l.to_i64()?;
        ensure!(
            vals.iter().all(|&v| (0..=u32::MAX as i64).contains(&v)),
            "{}: labels must be non-negative",
            lp.display()
        );
        Some(vals.into_iter().map(|v| v as u32).collect())
    } else {
        None
    };
    Ok(ImageSet {
        height: h,
        width: w,
        channels: c,
        pixels: a.data,
        labels,
        class_names: vec![],
    })
}
