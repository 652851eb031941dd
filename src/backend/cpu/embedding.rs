//! Input embedding: `[sos, wte[x_0], ..., wte[x_{n-2}]] + wpe` (REFERENCE.md §3).

use super::simd;
use rayon::prelude::*;

/// `out[b, t] = (t == 0 ? sos : wte[tokens[b, t-1]]) + wpe[t]` for `tokens: [batch, t_len]`.
pub fn embed_forward(
    out: &mut [f32],
    tokens: &[u16],
    wte: &[f32],
    wpe: &[f32],
    sos: &[f32],
    t_len: usize,
    d: usize,
) {
    let n_vocab = wte.len() / d;
    assert_eq!(out.len(), tokens.len() * d);
    out.par_chunks_mut(t_len * d)
        .zip(tokens.par_chunks(t_len))
        .for_each(|(o, toks)| {
            for (t, row) in o.chunks_mut(d).enumerate() {
                let content = if t == 0 {
                    sos
                } else {
                    let id = toks[t - 1] as usize;
                    assert!(
                        id < n_vocab,
                        "token id {id} is outside the palette of {n_vocab} colours"
                    );
                    &wte[id * d..(id + 1) * d]
                };
                let pos = &wpe[t * d..(t + 1) * d];
                simd::add(row, content, pos);
            }
        });
}

/// Backward of [`embed_forward`]: adds into `dwte`, `dwpe` and `dsos`.
pub fn embed_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dsos: &mut [f32],
    dout: &[f32],
    tokens: &[u16],
    t_len: usize,
    d: usize,
) {
    let batch = tokens.len() / t_len;
    position_grads(dwpe, dout, batch, t_len, d);
    for b in 0..batch {
        simd::add_assign(dsos, &dout[b * t_len * d..b * t_len * d + d]);
    }
    // Token rows scatter; a serial pass keeps the sum order fixed and costs little.
    for b in 0..batch {
        for t in 1..t_len {
            let id = tokens[b * t_len + t - 1] as usize;
            let src = &dout[(b * t_len + t) * d..(b * t_len + t + 1) * d];
            simd::add_assign(&mut dwte[id * d..(id + 1) * d], src);
        }
    }
}

/// The inputs of positions `pos..pos + len` for each sequence: row `(b, i)` of `out` is
/// `(p == 0 ? sos : wte[prev[b * len + i]]) + wpe[p]` with `p = pos + i`, `prev` holding each
/// position's previous token.
#[allow(clippy::too_many_arguments)]
pub fn embed_step(
    out: &mut [f32],
    prev: &[u16],
    wte: &[f32],
    wpe: &[f32],
    sos: &[f32],
    pos: usize,
    len: usize,
    d: usize,
) {
    let n_vocab = wte.len() / d;
    assert_eq!(out.len(), prev.len() * d);
    assert!(len >= 1 && prev.len().is_multiple_of(len));
    for (r, (row, &id)) in out.chunks_mut(d).zip(prev).enumerate() {
        let p = pos + r % len;
        let content = if p == 0 {
            sos
        } else {
            let id = id as usize;
            assert!(
                id < n_vocab,
                "token id {id} is outside the palette of {n_vocab} colours"
            );
            &wte[id * d..(id + 1) * d]
        };
        simd::add(row, content, &wpe[p * d..(p + 1) * d]);
    }
}

/// Ids fed as they are, without the shift of [`embed_forward`]: `out[b, t] = content(ids[b, t]) +
/// wpe[t]`, where content is `wte[id]` for a colour, `sos` for id `n_vocab` (the start token,
/// as Hugging Face numbers it) and zero for id `n_vocab + 1` (a masked position of a BERT model).
pub fn embed_direct(
    out: &mut [f32],
    ids: &[u16],
    wte: &[f32],
    wpe: &[f32],
    sos: &[f32],
    t_len: usize,
    d: usize,
) {
    let n_vocab = wte.len() / d;
    assert_eq!(out.len(), ids.len() * d);
    out.par_chunks_mut(t_len * d)
        .zip(ids.par_chunks(t_len))
        .for_each(|(o, ids)| {
            for (t, (row, &id)) in o.chunks_mut(d).zip(ids).enumerate() {
                let id = id as usize;
                let pos = &wpe[t * d..(t + 1) * d];
                if id < n_vocab {
                    simd::add(row, &wte[id * d..(id + 1) * d], pos);
                } else if id == n_vocab {
                    simd::add(row, sos, pos);
                } else {
                    assert!(id == n_vocab + 1, "input id {id} is beyond the mask id");
                    row.copy_from_slice(pos);
                }
            }
        });
}

/// Backward of [`embed_direct`]: adds into `dwte` (colour ids), `dsos` (start ids) and `dwpe`;
/// masked positions feed no content embedding and get no content gradient.
pub fn embed_direct_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dsos: &mut [f32],
    dout: &[f32],
    ids: &[u16],
    t_len: usize,
    d: usize,
) {
    let n_vocab = dwte.len() / d;
    position_grads(dwpe, dout, ids.len() / t_len, t_len, d);
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let src = &dout[i * d..(i + 1) * d];
        if id < n_vocab {
            simd::add_assign(&mut dwte[id * d..(id + 1) * d], src);
        } else if id == n_vocab {
            simd::add_assign(dsos, src);
        }
    }
}

/// Adds each position's gradient, summed over the batch, into `dwpe`. Rows are disjoint, so
/// positions run in parallel.
fn position_grads(dwpe: &mut [f32], dout: &[f32], batch: usize, t_len: usize, d: usize) {
    dwpe[..t_len * d]
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(t, row)| {
            for b in 0..batch {
                simd::add_assign(row, &dout[(b * t_len + t) * d..(b * t_len + t + 1) * d]);
            }
        });
}
