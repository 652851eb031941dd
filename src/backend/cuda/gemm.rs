//! Row-major products as cuBLASLt calls, each shape's algorithm chosen once.
//!
//! igpt stores matrices row-major; cuBLAS reads them column-major. A row-major `[m, n]` matrix
//! is the column-major `[n, m]` one, its transpose, so `C = op(A) op(B)` is computed as
//! `C^T = op(B)^T op(A)^T`: the operands swap places and keep their transpose flags.
//!
//! [`Products`] keeps one [`Plan`] per distinct product: its descriptors and the algorithm
//! cuBLASLt's heuristic ranks first for it, asked once, the first time the product runs. The
//! key holds everything the choice depends on: shape, leading dimensions, batch strides, types
//! and how far each operand's address is aligned (an algorithm chosen for 256-byte aligned
//! operands may not run on less aligned ones). The workspace is passed with every call, so a
//! product recorded into a CUDA graph allocates nothing and uses the algorithm the direct calls
//! use.

use crate::backend::Op;
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

/// A (batched) row-major product `C[m, n] = alpha * op(A) op(B) + beta * C`. Leading
/// dimensions count elements between consecutive stored rows; strides, elements between
/// consecutive matrices of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMajor {
    pub ta: Op,
    pub tb: Op,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
}

impl RowMajor {
    /// A single product of contiguous matrices.
    pub fn plain(ta: Op, tb: Op, m: usize, k: usize, n: usize) -> Self {
        Self {
            ta,
            tb,
            m,
            n,
            k,
            lda: if ta == Op::N { k } else { m },
            ldb: if tb == Op::N { n } else { k },
            ldc: n,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            batch: 1,
        }
    }
}

/// The same product as cuBLAS's column-major arguments. `first` and `second` say which
/// row-major operand cuBLAS reads as its A and B: always (B, A).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ColumnMajor {
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ld_first: usize,
    pub ld_second: usize,
    pub ldc: usize,
    pub stride_first: usize,
    pub stride_second: usize,
    pub stride_c: usize,
    pub batch: usize,
}

/// cuBLAS arguments for a row-major product; the caller passes `B` as cuBLAS's A and `A` as
/// its B.
pub fn column_major(p: &RowMajor) -> ColumnMajor {
    ColumnMajor {
        trans_first: p.tb == Op::T,
        trans_second: p.ta == Op::T,
        m: p.n,
        n: p.m,
        k: p.k,
        ld_first: p.ldb,
        ld_second: p.lda,
        ldc: p.ldc,
        stride_first: p.stride_b,
        stride_second: p.stride_a,
        stride_c: p.stride_c,
        batch: p.batch,
    }
}

/// The element types of a product's operands and result, and how it multiplies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operands {
    /// f32 operands, f32 products.
    F32,
    /// f32 operands that cuBLASLt may round to bfloat16 inside the product, for the tensor
    /// cores (`COMPUTE_32F_FAST_16BF`), f32 sums.
    F32ViaBf16,
    /// bfloat16 operands, f32 sums.
    Bf16,
    /// bfloat16 operands, f32 sums, C and D bfloat16 (the f32 result rounded once).
    Bf16ToBf16,
}

impl Operands {
    /// Bytes of an operand's element.
    fn bytes(self) -> usize {
        match self {
            Operands::F32 | Operands::F32ViaBf16 => 4,
            Operands::Bf16 | Operands::Bf16ToBf16 => 2,
        }
    }

    /// Bytes of an element of C and D.
    fn result_bytes(self) -> usize {
        match self {
            Operands::Bf16ToBf16 => 2,
            _ => 4,
        }
    }

    /// The operands' element type, C's and D's, and the compute type.
    fn types(
        self,
    ) -> (
        lt_sys::cudaDataType,
        lt_sys::cudaDataType,
        lt_sys::cublasComputeType_t,
    ) {
        use lt_sys::cublasComputeType_t::*;
        use lt_sys::cudaDataType::*;
        match self {
            Operands::F32 => (CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F),
            Operands::F32ViaBf16 => (CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF),
            Operands::Bf16 => (CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F),
            Operands::Bf16ToBf16 => (CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F),
        }
    }
}

/// The largest power of two (at most 256, cuBLASLt's default assumption) dividing `address`.
pub fn alignment(address: u64) -> u32 {
    if address == 0 {
        256
    } else {
        1 << address.trailing_zeros().min(8)
    }
}

/// What a product's algorithm is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    call: ColumnMajor,
    operands: Operands,
    /// Alignments of cuBLAS's A, B and C and D (the smaller of the two) in bytes: of every
    /// column's and batch matrix's start.
    alignment: [u32; 3],
}

/// The descriptors of one product and its chosen algorithm; destroyed with it.
struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    /// cuBLAS's A, B and C, which is also D's (in place, or apart with the same layout).
    layouts: [lt_sys::cublasLtMatrixLayout_t; 3],
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created for this plan alone and is destroyed
        // once, here; no call in flight holds it (cuBLASLt reads descriptors when called).
        unsafe {
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
        }
    }
}

/// A matrix layout of `rows x cols` with leading dimension `ld`, batched with `stride`.
fn layout(
    element: lt_sys::cudaDataType,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
    stride: usize,
) -> Result<lt_sys::cublasLtMatrixLayout_t, String> {
    use lt_sys::cublasLtMatrixLayoutAttribute_t::*;
    let made = lt::create_matrix_layout(element, rows as u64, cols as u64, ld as i64)
        .map_err(|e| format!("cublasLtMatrixLayoutCreate: {e:?}"))?;
    if batch > 1 {
        let count = i32::try_from(batch).map_err(|_| format!("a batch of {batch} products"))?;
        let stride = stride as i64;
        // SAFETY: a layout just made; each buffer is of the type and size the attribute takes
        // (int32 for the count, int64 for the offset) and outlives the call.
        let set = unsafe {
            lt::set_matrix_layout_attribute(
                made,
                CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const i32).cast(),
                4,
            )
            .and_then(|()| {
                lt::set_matrix_layout_attribute(
                    made,
                    CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    (&stride as *const i64).cast(),
                    8,
                )
            })
        };
        if let Err(e) = set {
            // SAFETY: made above and not handed out.
            let _ = unsafe { lt::destroy_matrix_layout(made) };
            return Err(format!("cublasLtMatrixLayoutSetAttribute: {e:?}"));
        }
    }
    Ok(made)
}

impl Plan {
    /// The descriptors of `key` and the algorithm cuBLASLt ranks first for it within
    /// `workspace_bytes` of workspace.
    fn choose(
        handle: lt_sys::cublasLtHandle_t,
        key: &PlanKey,
        workspace_bytes: usize,
    ) -> Result<Self, String> {
        use lt_sys::cublasLtMatmulDescAttributes_t::*;
        use lt_sys::cublasLtMatmulPreferenceAttributes_t::*;
        let c = &key.call;
        let (element, result, compute) = key.operands.types();
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            layouts: [std::ptr::null_mut(); 3],
            // SAFETY: the algorithm is plain data (eight u64), all-zero until the heuristic
            // fills it.
            algo: unsafe { std::mem::zeroed() },
        };
        plan.desc = lt::create_matmul_desc(compute, lt_sys::cudaDataType::CUDA_R_32F)
            .map_err(|e| format!("cublasLtMatmulDescCreate: {e:?}"))?;
        for (attr, transposed) in [
            (CUBLASLT_MATMUL_DESC_TRANSA, c.trans_first),
            (CUBLASLT_MATMUL_DESC_TRANSB, c.trans_second),
        ] {
            // A cublasOperation_t (an int): CUBLAS_OP_N is 0, CUBLAS_OP_T is 1.
            let value = transposed as i32;
            // SAFETY: the descriptor is this plan's; the attribute takes 4 bytes, which live
            // across the call.
            unsafe {
                lt::set_matmul_desc_attribute(plan.desc, attr, (&value as *const i32).cast(), 4)
            }
            .map_err(|e| format!("cublasLtMatmulDescSetAttribute: {e:?}"))?;
        }
        let (a_rows, a_cols) = if c.trans_first {
            (c.k, c.m)
        } else {
            (c.m, c.k)
        };
        let (b_rows, b_cols) = if c.trans_second {
            (c.n, c.k)
        } else {
            (c.k, c.n)
        };
        plan.layouts[0] = layout(element, a_rows, a_cols, c.ld_first, c.batch, c.stride_first)?;
        plan.layouts[1] = layout(
            element,
            b_rows,
            b_cols,
            c.ld_second,
            c.batch,
            c.stride_second,
        )?;
        plan.layouts[2] = layout(result, c.m, c.n, c.ldc, c.batch, c.stride_c)?;

        let pref = lt::create_matmul_pref()
            .map_err(|e| format!("cublasLtMatmulPreferenceCreate: {e:?}"))?;
        let workspace = workspace_bytes as u64;
        let [align_a, align_b, align_c] = key.alignment;
        let prefs: [(
            lt_sys::cublasLtMatmulPreferenceAttributes_t,
            *const c_void,
            usize,
        ); 5] = [
            (
                CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const u64).cast(),
                8,
            ),
            (
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                (&align_a as *const u32).cast(),
                4,
            ),
            (
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                (&align_b as *const u32).cast(),
                4,
            ),
            (
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                (&align_c as *const u32).cast(),
                4,
            ),
            (
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                (&align_c as *const u32).cast(),
                4,
            ),
        ];
        // SAFETY: the preference is made here and destroyed below; each buffer has the type
        // and size its attribute takes (uint64 workspace, uint32 alignments) and outlives the
        // calls; the descriptors are this plan's, complete.
        let chosen = unsafe {
            let set = prefs.iter().try_for_each(|&(attr, buf, size)| {
                lt::set_matmul_pref_attribute(pref, attr, buf, size)
            });
            let chosen = set.and_then(|()| {
                lt::get_matmul_algo_heuristic(
                    handle,
                    plan.desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                )
            });
            let _ = lt::destroy_matmul_pref(pref);
            chosen
        };
        let chosen = chosen.map_err(|e| {
            format!("cuBLASLt has no algorithm for it ({e:?}, cublasLtMatmulAlgoGetHeuristic)")
        })?;
        if chosen.workspaceSize > workspace_bytes {
            return Err(format!(
                "its algorithm wants {} bytes of workspace, more than the {workspace_bytes} \
                 asked for",
                chosen.workspaceSize
            ));
        }
        plan.algo = chosen.algo;
        Ok(plan)
    }
}

/// A cuBLASLt handle and the plan of every product it has run.
pub struct Products {
    handle: lt_sys::cublasLtHandle_t,
    plans: RefCell<HashMap<PlanKey, Plan>>,
}

impl Drop for Products {
    fn drop(&mut self) {
        self.plans.get_mut().clear();
        // SAFETY: the handle was made in `new` and is destroyed once, here, after the plans.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl Products {
    /// A handle on the current context's device.
    pub fn new() -> Result<Self, String> {
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        Ok(Self {
            handle,
            plans: RefCell::new(HashMap::new()),
        })
    }

    /// `D = alpha op(A) op(B) + beta C` (row-major `p`, device addresses `a`, `b`, `c`, `d`; `c`
    /// and `d` share a layout, and are one address for a product in place or do not overlap),
    /// queued on `stream` with `workspace` (address, bytes). The error names the cuBLASLt call.
    ///
    /// # Safety
    /// The addresses must hold the operands `p` describes, of `operands`' types, for as long as
    /// the queued product runs; the workspace must be device memory of that many bytes that no
    /// concurrent call uses.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        stream: lt_sys::cudaStream_t,
        workspace: (u64, usize),
        p: &RowMajor,
        a: u64,
        b: u64,
        c: u64,
        d: u64,
        alpha: f32,
        beta: f32,
        operands: Operands,
    ) -> Result<(), String> {
        let call = column_major(p);
        if call.m == 0 || call.n == 0 || call.batch == 0 {
            return Ok(());
        }
        // cuBLAS's A is the row-major B, and its B the row-major A.
        let (first, second) = (b, a);
        // Each column (and each matrix of a batch) starts where its operand does, a multiple
        // of the leading dimension (and stride) further on: promise cuBLASLt only the
        // alignment every one of those starts has.
        let bytes = operands.bytes() as u64;
        let starts = |at: u64, ld: usize, stride: usize, bytes: u64| {
            let stride = if call.batch > 1 { stride as u64 } else { 0 };
            alignment(at | (ld as u64 * bytes) | (stride * bytes))
        };
        let key = PlanKey {
            call,
            operands,
            alignment: [
                starts(first, call.ld_first, call.stride_first, bytes),
                starts(second, call.ld_second, call.stride_second, bytes),
                starts(
                    c | d,
                    call.ldc,
                    call.stride_c,
                    operands.result_bytes() as u64,
                ),
            ],
        };
        let mut plans = self.plans.borrow_mut();
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Plan::choose(self.handle, &key, workspace.1)?)
            }
        };
        // SAFETY: the plan's descriptors describe these operands (the key holds their shape,
        // types and alignment); the caller guarantees the memory; alpha and beta are host
        // scalars read when the call is queued.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                first as *const c_void,
                plan.layouts[0],
                second as *const c_void,
                plan.layouts[1],
                c as *const c_void,
                plan.layouts[2],
                d as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                workspace.0 as *mut c_void,
                workspace.1,
                stream,
            )
        }
        .map_err(|e| format!("cublasLtMatmul: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's gemm, as its documentation defines it, on host memory: column-major, `ld`s
    /// between columns.
    #[allow(clippy::too_many_arguments)]
    fn cublas_reference(
        c: &ColumnMajor,
        a: &[f32],
        b: &[f32],
        out: &mut [f32],
        alpha: f32,
        beta: f32,
    ) {
        for batch in 0..c.batch {
            let (a0, b0, c0) = (
                batch * c.stride_first,
                batch * c.stride_second,
                batch * c.stride_c,
            );
            for i in 0..c.m {
                for j in 0..c.n {
                    let mut s = 0.0;
                    for l in 0..c.k {
                        let av = if c.trans_first {
                            a[a0 + i * c.ld_first + l]
                        } else {
                            a[a0 + l * c.ld_first + i]
                        };
                        let bv = if c.trans_second {
                            b[b0 + l * c.ld_second + j]
                        } else {
                            b[b0 + j * c.ld_second + l]
                        };
                        s += av * bv;
                    }
                    let o = &mut out[c0 + j * c.ldc + i];
                    *o = alpha * s + beta * *o;
                }
            }
        }
    }

    /// The row-major product computed directly.
    fn row_major_reference(
        p: &RowMajor,
        a: &[f32],
        b: &[f32],
        out: &mut [f32],
        alpha: f32,
        beta: f32,
    ) {
        for batch in 0..p.batch {
            let (a0, b0, c0) = (batch * p.stride_a, batch * p.stride_b, batch * p.stride_c);
            for i in 0..p.m {
                for j in 0..p.n {
                    let mut s = 0.0;
                    for l in 0..p.k {
                        let av = if p.ta == Op::N {
                            a[a0 + i * p.lda + l]
                        } else {
                            a[a0 + l * p.lda + i]
                        };
                        let bv = if p.tb == Op::N {
                            b[b0 + l * p.ldb + j]
                        } else {
                            b[b0 + j * p.ldb + l]
                        };
                        s += av * bv;
                    }
                    let o = &mut out[c0 + i * p.ldc + j];
                    *o = alpha * s + beta * *o;
                }
            }
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed)) % 97) as f32 / 13.0 - 3.5)
            .collect()
    }

    #[test]
    fn the_swapped_call_computes_the_row_major_product() {
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                for &(m, k, n) in &[(3, 4, 5), (1, 7, 2), (6, 1, 6)] {
                    // Padded leading dimensions and batches, as the attention products use.
                    let mut p = RowMajor::plain(ta, tb, m, k, n);
                    p.lda += 2;
                    p.ldb += 3;
                    p.ldc += 1;
                    p.batch = 3;
                    p.stride_a = 100;
                    p.stride_b = 90;
                    p.stride_c = 80;
                    let (a, b) = (values(400, 1), values(400, 7));
                    let (mut want, mut got) = (values(300, 3), values(300, 3));
                    row_major_reference(&p, &a, &b, &mut want, 0.5, 1.0);
                    cublas_reference(&column_major(&p), &b, &a, &mut got, 0.5, 1.0);
                    assert_eq!(want, got, "{ta:?} {tb:?} {m}x{k}x{n}");
                }
            }
        }
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_dividing_the_address_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0080), 128);
        assert_eq!(alignment(0x7f00_0000_0104), 4);
        assert_eq!(alignment(0x7f00_0000_0102), 2);
        assert_eq!(alignment(0x7f00_0000_0c00), 256);
    }

    #[test]
    fn plain_products_have_contiguous_leading_dimensions() {
        let p = RowMajor::plain(Op::T, Op::N, 3, 4, 5);
        assert_eq!((p.lda, p.ldb, p.ldc), (3, 5, 5));
        let p = RowMajor::plain(Op::N, Op::T, 3, 4, 5);
        assert_eq!((p.lda, p.ldb, p.ldc), (4, 4, 5));
    }
}
