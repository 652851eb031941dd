//! Matrix products through the `gemm` crate, split over rows across the rayon pool.

use super::simd;
use crate::backend::Op;
use rayon::prelude::*;
use std::cell::Cell;

thread_local! {
    static IN_GEMM: Cell<bool> = const { Cell::new(false) };
}

/// True while the current thread is inside a `gemm` call. `gemm` allocates its own packing
/// scratch on every call; the allocation tests use this to tell that scratch apart from the
/// engine's own allocations (which must be none).
pub fn inside_gemm() -> bool {
    IN_GEMM.with(|f| f.get())
}

/// A matrix in memory: base pointer plus row and column strides (in elements).
#[derive(Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// `dst[m, n] (+)= scale * lhs[m, k] @ rhs[k, n]` on the calling thread.
///
/// # Safety
/// Every element addressed through the strides must lie inside live allocations, `dst` must not
/// alias `lhs` or `rhs`, and no other thread may touch the addressed part of `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    lhs: Strided,
    rhs: Strided,
    accumulate: bool,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside dst by the caller's contract.
                    unsafe { *dst.offset(i as isize * dst_rs + j as isize) = 0.0 };
                }
            }
        }
        return;
    }
    IN_GEMM.with(|f| f.set(true));
    // SAFETY: forwarded from the caller's contract; gemm reads lhs/rhs and writes dst only.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    };
    IN_GEMM.with(|f| f.set(false));
}

/// Rows per parallel task: enough tasks to keep every thread busy, few enough that each
/// task's product stays efficient. Depends only on the thread count, so results are
/// reproducible for a given `--threads`.
fn rows_per_task(m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tasks = if threads == 1 { 1 } else { threads * 2 };
    m.div_ceil(tasks).next_multiple_of(16).max(16)
}

/// `out[m, n] (+)= a @ b` where `a` is `[m, k]` (or `[k, m]` with `Op::T`) and `b` is
/// `[k, n]` (or `[n, k]` with `Op::T`), all contiguous row-major.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    ta: Op,
    b: &[f32],
    tb: Op,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert_eq!(out.len(), m * n, "matmul: output has the wrong size");
    assert_eq!(a.len(), m * k, "matmul: left operand has the wrong size");
    assert_eq!(b.len(), k * n, "matmul: right operand has the wrong size");
    if m == 0 || n == 0 {
        return;
    }
    let (a_rs, a_cs) = match ta {
        Op::N => (k as isize, 1),
        Op::T => (1, m as isize),
    };
    let (b_rs, b_cs) = match tb {
        Op::N => (n as isize, 1),
        Op::T => (1, k as isize),
    };
    if m <= SMALL_M && matches!(ta, Op::N) {
        small_m(out, a, b, tb, m, k, n, accumulate);
        return;
    }
    let a_ptr = SendPtr(a.as_ptr() as *mut f32);
    let b_ptr = SendPtr(b.as_ptr() as *mut f32);
    if m < n {
        // Few output rows (weight gradients): split the columns instead, so each task packs
        // only its own slice of the right operand rather than all of it.
        let cols = rows_per_task(n);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..n.div_ceil(cols)).into_par_iter().for_each(|t| {
            let c0 = t * cols;
            let nc = cols.min(n - c0);
            let lhs = Strided {
                ptr: a_ptr.get(),
                rs: a_rs,
                cs: a_cs,
            };
            let rhs = Strided {
                ptr: b_ptr.get().wrapping_offset(c0 as isize * b_cs),
                rs: b_rs,
                cs: b_cs,
            };
            // SAFETY: columns c0..c0+nc of `out` belong to this task alone; operands are in
            // bounds by the size checks above and do not alias `out`.
            unsafe {
                gemm_serial(
                    m,
                    nc,
                    k,
                    out_ptr.get().add(c0),
                    n as isize,
                    lhs,
                    rhs,
                    accumulate,
                    1.0,
                )
            };
        });
        return;
    }
    let rows = rows_per_task(m);
    out.par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(t, chunk)| {
            let r0 = t * rows;
            let mr = chunk.len() / n;
            let lhs = Strided {
                ptr: a_ptr.get().wrapping_offset(r0 as isize * a_rs),
                rs: a_rs,
                cs: a_cs,
            };
            let rhs = Strided {
                ptr: b_ptr.get(),
                rs: b_rs,
                cs: b_cs,
            };
            // SAFETY: rows r0..r0+mr of `a` and all of `b` are in bounds (sizes asserted above);
            // `chunk` is this task's own part of `out`, which aliases neither input.
            unsafe {
                gemm_serial(
                    mr,
                    n,
                    k,
                    chunk.as_mut_ptr(),
                    n as isize,
                    lhs,
                    rhs,
                    accumulate,
                    1.0,
                )
            };
        });
}

/// Products with at most this many rows (one decoding step) bypass `gemm`, which would pack
/// the whole weight matrix for every call.
const SMALL_M: usize = 2;

/// Output columns per parallel task in [`small_m`].
const SMALL_COLS: usize = 256;

/// `out[m, n] (+)= a[m, k] @ b` for a few rows: streams each row of `b` once for all `m`
/// rows (`b` as written), or takes dot products with its rows (`b` transposed).
#[allow(clippy::too_many_arguments)]
fn small_m(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    tb: Op,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    let out_p = SendPtr(out.as_mut_ptr());
    let tasks = n.div_ceil(SMALL_COLS);
    (0..tasks).into_par_iter().for_each(|task| {
        let c0 = task * SMALL_COLS;
        let nc = SMALL_COLS.min(n - c0);
        // SAFETY: columns c0..c0+nc of every output row belong to this task alone; the slice
        // spans from the first of them to the last, and only those columns are touched.
        let rows = unsafe { std::slice::from_raw_parts_mut(out_p.get().add(c0), (m - 1) * n + nc) };
        match tb {
            Op::N => {
                if !accumulate {
                    for i in 0..m {
                        rows[i * n..i * n + nc].fill(0.0);
                    }
                }
                simd::rows_times_mat(rows, n, m, nc, a, k, &b[c0..], n);
            }
            Op::T => {
                for i in 0..m {
                    let x = &a[i * k..(i + 1) * k];
                    for j in 0..nc {
                        let d = simd::dot(x, &b[(c0 + j) * k..(c0 + j + 1) * k]);
                        let o = &mut rows[i * n + j];
                        *o = if accumulate { *o + d } else { d };
                    }
                }
            }
        }
    });
}

/// A raw pointer that may cross threads; each user states why its accesses are disjoint.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: only a number is shared; every dereference site justifies its own exclusivity.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub fn get(self) -> *mut f32 {
        self.0
    }
}
