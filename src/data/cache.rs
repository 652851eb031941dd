//! Token sets: images already quantised by a palette, kept on disk and memory-mapped so
//! training never re-quantises.
//!
//! File layout (little-endian): `IGPTTOK1`, a u64 header length, a JSON header
//! ([`TokenHeader`]), zero padding to a multiple of 8, `u16` tokens `[n, t]`, zero padding to a
//! multiple of 4, then `u32` labels `[n]` when the set is labelled.

use super::ImageSet;
use crate::palette::Palette;
use anyhow::{Context, Result, ensure};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::path::Path;

const MAGIC: &[u8; 8] = b"IGPTTOK1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenHeader {
    pub n: usize,
    /// Tokens per image.
    pub t: usize,
    pub n_vocab: usize,
    pub labelled: bool,
    /// Identifies the source, size and palette the tokens came from.
    pub fingerprint: String,
}

enum Storage {
    Memory {
        tokens: Vec<u16>,
        labels: Vec<u32>,
    },
    Mapped {
        map: Mmap,
        tokens_at: usize,
        labels_at: usize,
    },
}

/// A quantised data set.
pub struct TokenSet {
    pub header: TokenHeader,
    storage: Storage,
}

/// A fingerprint of the palette, to detect caches made with another one.
pub fn palette_fingerprint(p: &Palette) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for v in &p.centers {
        for b in v.to_bits().to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    format!("{}x{}:{h:016x}", p.len(), p.channels)
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl TokenSet {
    /// Quantises `images` (already at the model's side and channel count) with `palette`.
    pub fn quantise(images: &ImageSet, palette: &Palette, source: &str) -> Result<Self> {
        ensure!(
            images.channels == palette.channels,
            "the images have {} channel(s) but the palette has {}",
            images.channels,
            palette.channels
        );
        let tokens = palette.encode(&images.pixels);
        let header = TokenHeader {
            n: images.len(),
            t: images.height * images.width,
            n_vocab: palette.len(),
            labelled: images.labels.is_some(),
            fingerprint: format!(
                "{source}|{}x{}|{}",
                images.height,
                images.width,
                palette_fingerprint(palette)
            ),
        };
        Ok(Self {
            header,
            storage: Storage::Memory {
                tokens,
                labels: images.labels.clone().unwrap_or_default(),
            },
        })
    }

    /// A set from tokens already made (`[n, t]`).
    pub fn from_tokens(
        tokens: Vec<u16>,
        t: usize,
        n_vocab: usize,
        labels: Option<Vec<u32>>,
    ) -> Result<Self> {
        ensure!(
            t > 0 && tokens.len().is_multiple_of(t),
            "token array is not a whole number of {t}-token images"
        );
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= n_vocab) {
            anyhow::bail!("token id {bad} is outside the palette of {n_vocab} colours");
        }
        let n = tokens.len() / t;
        if let Some(l) = &labels {
            ensure!(l.len() == n, "{} labels for {n} images", l.len());
        }
        let header = TokenHeader {
            n,
            t,
            n_vocab,
            labelled: labels.is_some(),
            fingerprint: "tokens".into(),
        };
        Ok(Self {
            header,
            storage: Storage::Memory {
                tokens,
                labels: labels.unwrap_or_default(),
            },
        })
    }

    pub fn len(&self) -> usize {
        self.header.n
    }

    pub fn is_empty(&self) -> bool {
        self.header.n == 0
    }

    /// Copies image `i`'s tokens into `dst` (length `t`).
    pub fn copy_image(&self, i: usize, dst: &mut [u16]) {
        let t = self.header.t;
        assert!(i < self.header.n && dst.len() == t);
        match &self.storage {
            Storage::Memory { tokens, .. } => dst.copy_from_slice(&tokens[i * t..(i + 1) * t]),
            Storage::Mapped { map, tokens_at, .. } => {
                let src = &map[tokens_at + i * t * 2..tokens_at + (i + 1) * t * 2];
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = u16::from_le_bytes([b[0], b[1]]);
                }
            }
        }
    }

    pub fn label(&self, i: usize) -> Option<u32> {
        if !self.header.labelled {
            return None;
        }
        Some(match &self.storage {
            Storage::Memory { labels, .. } => labels[i],
            Storage::Mapped { map, labels_at, .. } => u32::from_le_bytes(
                map[labels_at + 4 * i..labels_at + 4 * i + 4]
                    .try_into()
                    .unwrap(),
            ),
        })
    }

    /// Where the tokens and the labels start, or `None` if a size overflows.
    fn layout(header_len: usize, n: usize, t: usize) -> Option<(usize, usize)> {
        let tokens_at = 16usize
            .checked_add(header_len)?
            .checked_next_multiple_of(8)?;
        let bytes = n.checked_mul(t)?.checked_mul(2)?;
        let labels_at = tokens_at.checked_add(bytes)?.checked_next_multiple_of(4)?;
        Some((tokens_at, labels_at))
    }

    /// Writes the set to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let header = serde_json::to_vec(&self.header)?;
        let (n, t) = (self.header.n, self.header.t);
        let (tokens_at, labels_at) =
            Self::layout(header.len(), n, t).context("the token set is too large to save")?;
        let mut out = Vec::with_capacity(labels_at + 4 * n);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.resize(tokens_at, 0);
        let mut buf = vec![0u16; t];
        for i in 0..n {
            self.copy_image(i, &mut buf);
            out.extend(buf.iter().flat_map(|v| v.to_le_bytes()));
        }
        out.resize(labels_at, 0);
        if self.header.labelled {
            for i in 0..n {
                out.extend_from_slice(&self.label(i).unwrap().to_le_bytes());
            }
        }
        crate::fsutil::write_atomic(path, &out)
    }

    /// Memory-maps a token file, checking its header and size.
    pub fn open(path: &Path) -> Result<Self> {
        crate::fsutil::ensure_regular_file(path)?;
        let f = std::fs::File::open(path)
            .with_context(|| format!("cannot open token file {}", path.display()))?;
        // SAFETY: the map is read-only; igpt replaces token files only by atomic rename, so the
        // mapped inode is never modified in place while mapped.
        let map =
            unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
        let bad =
            |why: &str| anyhow::anyhow!("{} is not a valid igpt token file: {why}", path.display());
        if map.len() < 16 || &map[..8] != MAGIC {
            return Err(bad("wrong magic"));
        }
        let hl = u64::from_le_bytes(map[8..16].try_into().unwrap());
        if (map.len() as u64 - 16) < hl {
            return Err(bad("truncated header"));
        }
        let hl = hl as usize;
        let header: TokenHeader = serde_json::from_slice(&map[16..16 + hl])
            .map_err(|e| bad(&format!("bad header: {e}")))?;
        if header.t == 0 {
            return Err(bad("images of 0 tokens"));
        }
        // Every size from the header is checked against the file's length before it is used.
        let end = Self::layout(hl, header.n, header.t).and_then(|(tokens_at, labels_at)| {
            let labels = if header.labelled {
                header.n.checked_mul(4)?
            } else {
                0
            };
            Some((tokens_at, labels_at, labels_at.checked_add(labels)?))
        });
        let (tokens_at, labels_at) = match end {
            Some((tokens_at, labels_at, end)) if end <= map.len() => (tokens_at, labels_at),
            _ => {
                return Err(bad(&format!(
                    "truncated: {} bytes, fewer than its header describes",
                    map.len()
                )));
            }
        };
        if let Some(id) = map[tokens_at..tokens_at + header.n * header.t * 2]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .find(|&v| v as usize >= header.n_vocab)
        {
            return Err(bad(&format!(
                "token id {id} is outside the palette of {} colours",
                header.n_vocab
            )));
        }
        Ok(Self {
            header,
            storage: Storage::Mapped {
                map,
                tokens_at,
                labels_at,
            },
        })
    }
}

impl TokenSet {
    /// Every image's label, when the set has them.
    pub fn labels(&self) -> Option<Vec<u32>> {
        self.header
            .labelled
            .then(|| (0..self.len()).filter_map(|i| self.label(i)).collect())
    }

    /// The images at `indices` (in that order), with their labels, in memory.
    pub fn select(&self, indices: &[usize]) -> Result<TokenSet> {
        let t = self.header.t;
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            anyhow::bail!("image {bad} does not exist: the set has {}", self.len());
        }
        let mut tokens = vec![0u16; indices.len() * t];
        for (dst, &i) in tokens.chunks_exact_mut(t).zip(indices) {
            self.copy_image(i, dst);
        }
        let labels = self
            .header
            .labelled
            .then(|| indices.iter().filter_map(|&i| self.label(i)).collect());
        TokenSet::from_tokens(tokens, t, self.header.n_vocab, labels)
    }
}
