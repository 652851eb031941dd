//! The CUDA backend: device arenas, cuBLASLt products, and igpt's own kernels (`kernels.cu`,
//! embedded as PTX).
//!
//! The CUDA libraries are loaded when first used, so a build runs on machines without them;
//! [`probe`] checks for them first, because `cudarc` panics where a library is missing. All
//! work goes to the context's default stream in order, so a copy back to the host sees every
//! kernel before it. Recordings ([`Backend::begin_recording`]) are CUDA graphs: captured on a
//! side stream (the default stream cannot be captured), replayed on the default stream.

mod gemm;
mod memory;
pub use memory::{memory_in_use, synchronize};

use super::{
    Arena, ArenaSizes, AttnShape, Backend, DType, LogitGradient, Op, Precision, Recording, Update,
    View,
};
use crate::backend::device::Gpu;
use crate::sample::SampleOptions;
use anyhow::{Result, anyhow, bail};
use cudarc::driver::result as driver;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
    sys as driver_sys,
};
use gemm::{Operands, Products, RowMajor};
use std::cell::{Cell, RefCell};
use std::sync::{Arc, OnceLock};

/// The kernels as PTX for compute capability 8.0 (A100) and 9.0 (H100, H200); built from
/// `kernels.cu` by `scripts/build_ptx.sh`.
const PTX_SM80: &str = include_str!("ptx/kernels.sm_80.ptx");
const PTX_SM90: &str = include_str!("ptx/kernels.sm_90.ptx");

/// Threads per block of the row kernels. The RMS norm's backward kernels are compiled for
/// exactly this many (kernels.cu: kNormBackwardThreads).
const ROW_THREADS: u32 = 256;

/// The products' workspace, passed with every call so that recorded products allocate nothing
/// while being captured and run the algorithm the direct calls run.
const PRODUCTS_WORKSPACE_BYTES: usize = 32 << 20;

/// Whether this machine can run the CUDA backend: a driver, cuBLASLt and at least one GPU.
/// Checked once; the error says what is missing.
pub fn probe() -> Result<usize> {
    static PROBED: OnceLock<Result<usize, String>> = OnceLock::new();
    PROBED
        .get_or_init(|| probe_once().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn loadable(lib: &str) -> bool {
    cudarc::get_lib_name_candidates(lib).iter().any(|name| {
        // SAFETY: loading a CUDA library runs only its initialisers, which have no
        // preconditions; it is closed again at once.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

fn probe_once() -> Result<usize> {
    if !loadable("cuda") {
        bail!(
            "no CUDA driver found (libcuda.so.1 could not be loaded): --device cuda needs an \
             NVIDIA GPU and its driver"
        );
    }
    if !loadable("cublasLt") {
        bail!(
            "the CUDA driver is here but cuBLAS is not (libcublasLt.so.13): \
             install CUDA 13's cuBLAS (for example `pip install nvidia-cublas`) and add its lib \
             folder to LD_LIBRARY_PATH"
        );
    }
    // An older cuBLASLt may load under another name; its descriptors are not the ones the
    // bindings describe.
    // SAFETY: a query without arguments or preconditions, of a library that loads.
    let version = unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() };
    if version / 10_000 < 13 {
        bail!(
            "the cuBLASLt found is version {}.{} but igpt needs CUDA 13's (libcublasLt.so.13): \
             install it (for example `pip install nvidia-cublas`) and put its lib folder first \
             on LD_LIBRARY_PATH",
            version / 10_000,
            version / 100 % 100
        );
    }
    // The libraries load, so cudarc will not panic on them; a driver that fails to start
    // still might, so the call is fenced.
    let count = std::panic::catch_unwind(CudaContext::device_count)
        .map_err(|_| anyhow!("the CUDA driver could not be started"))?
        .map_err(|e| anyhow!("the CUDA driver could not be started: {e:?}"))?;
    if count < 1 {
        bail!("the CUDA driver found no GPU on this machine");
    }
    Ok(count as usize)
}

/// Panics with the failing call's name: a CUDA error inside a step is a broken device or a
/// bug, never bad input (inputs are checked before they reach the device).
fn ok<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("CUDA error in {what}: {e:?}"),
    }
}

/// A block of device memory, freed on drop.
struct Buffer {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl Buffer {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> std::result::Result<Self, driver::DriverError> {
        let bytes = bytes.max(16);
        ctx.bind_to_thread()?;
        // SAFETY: plain device allocation; the pointer is freed once, in drop, and every use
        // checks its bounds against `bytes`.
        let ptr = unsafe { driver::malloc_sync(bytes)? };
        // SAFETY: `ptr` points at `bytes` bytes just allocated.
        unsafe { driver::memset_d8_sync(ptr, 0, bytes)? };
        Ok(Self {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by `malloc_sync` in `Buffer::new` and freed only here. The context
        // synchronises first, so no queued kernel still uses it.
        unsafe {
            let _ = self.ctx.synchronize();
            let _ = driver::free_sync(self.ptr);
        }
    }
}

/// The kernels of `kernels.cu`, looked up once.
struct Kernels {
    _module: Arc<CudaModule>,
    fill_f32: CudaFunction,
    fill_bf16: CudaFunction,
    round_bf16: CudaFunction,
    pack_weight: CudaFunction,
    embed_forward: CudaFunction,
    embed_backward_positions: CudaFunction,
    embed_backward_content: CudaFunction,
    embed_content_sums: CudaFunction,
    embed_step: CudaFunction,
    draw_tokens: CudaFunction,
    /// RMS norm forward, storing f32 ([0]) or bfloat16 ([1]; see `stored`); quick-GELU's
    /// forward likewise.
    rmsnorm_forward: [CudaFunction; 2],
    /// By `dout`'s type: f32, bf16.
    rmsnorm_backward: [CudaFunction; 2],
    add_column_sums: CudaFunction,
    /// By [`gelu_variant`]: f32 to f32, f32 to bf16, bf16 to bf16.
    gelu_forward: [CudaFunction; 3],
    gelu_backward: [CudaFunction; 3],
    cross_entropy: [CudaFunction; 2],
    adamw_tensors: CudaFunction,
    sum_squares: CudaFunction,
    sum_partials: CudaFunction,
    attention_softmax: CudaFunction,
    attention_probs: CudaFunction,
    attention_dscores: CudaFunction,
    /// By the stored type of the forward pass's output it reads: f32, bf16.
    flash_backward_prepare: [CudaFunction; 2],
    /// Flash attention for heads up to 64 columns, and up to 128.
    flash: [FlashKernels; 2],
    kv_store_f32: CudaFunction,
    kv_store_bf16: CudaFunction,
    /// Decoding attention by cache type (f32, bf16) and output type (f32, bf16).
    attend: [[CudaFunction; 2]; 2],
    /// The outputs of decoding attention split among blocks, by output type.
    attend_combine: [CudaFunction; 2],
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>, ptx: &str) -> Result<Self> {
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| {
                anyhow!(
                    "cannot load igpt's CUDA kernels: {e:?} (the driver compiles them from PTX: it \
                     must support CUDA 13.0 or newer and have its PTX compiler, \
                     libnvidia-ptxjitcompiler)"
                )
            })?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| anyhow!("kernel {name} is missing from the PTX: {e:?}"))
        };
        // A kernel that takes more than the 48 KiB of shared memory every launch may have is
        // allowed its bytes first (a block may opt into 99 KiB or more on every GPU from sm_80
        // on: 163 KiB on sm_80, 227 KiB on sm_90, 99 KiB on sm_86 and sm_89).
        let allow_shared = |function: &CudaFunction, bytes: usize| -> Result<()> {
            if bytes > 48 * 1024 {
                use cudarc::driver::sys::CUfunction_attribute_enum as Attribute;
                let attribute = Attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                function.set_attribute(attribute, bytes as i32).map_err(|e| {
                    anyhow!("cannot give a flash attention kernel {bytes} bytes of shared memory: {e:?}")
                })?;
            }
            Ok(())
        };
        let flash = |width: usize| -> Result<FlashKernels> {
            let both = |kernel: &str| -> Result<[CudaFunction; 2]> {
                let name = format!("flash_attention_{kernel}_{width}");
                let pair = [f(&name)?, f(&format!("{name}_bf16"))?];
                let forward = kernel == "forward";
                for (function, bf16) in pair.iter().zip([false, true]) {
                    let stages = flash_stages(width, bf16, forward, false);
                    allow_shared(function, flash_shared_bytes(width, stages, forward))?;
                }
                Ok(pair)
            };
            let one_stage = match width {
                128 => Some([
                    f("flash_attention_backward_kv_128_bf16_one_stage")?,
                    f("flash_attention_backward_q_128_bf16_one_stage")?,
                ]),
                _ => None,
            };
            Ok(FlashKernels {
                width,
                forward: both("forward")?,
                backward_kv: both("backward_kv")?,
                backward_q: both("backward_q")?,
                backward_one_stage: one_stage,
            })
        };
        Ok(Self {
            fill_f32: f("fill_f32")?,
            fill_bf16: f("fill_bf16")?,
            round_bf16: f("round_bf16")?,
            pack_weight: f("pack_weight")?,
            embed_forward: f("embed_forward")?,
            embed_backward_positions: f("embed_backward_positions")?,
            embed_backward_content: f("embed_backward_content")?,
            embed_content_sums: f("embed_content_sums")?,
            embed_step: f("embed_step")?,
            draw_tokens: f("draw_tokens")?,
            rmsnorm_forward: [f("rmsnorm_forward")?, f("rmsnorm_forward_bf16")?],
            rmsnorm_backward: [f("rmsnorm_backward")?, f("rmsnorm_backward_from_bf16")?],
            add_column_sums: f("add_column_sums")?,
            gelu_forward: [
                f("gelu_forward")?,
                f("gelu_forward_bf16")?,
                f("gelu_forward_from_bf16")?,
            ],
            gelu_backward: [
                f("gelu_backward")?,
                f("gelu_backward_bf16")?,
                f("gelu_backward_from_bf16")?,
            ],
            cross_entropy: [f("cross_entropy")?, f("cross_entropy_bf16")?],
            adamw_tensors: f("adamw_tensors")?,
            sum_squares: f("sum_squares")?,
            sum_partials: f("sum_partials")?,
            attention_softmax: f("attention_softmax")?,
            attention_probs: f("attention_probs")?,
            attention_dscores: f("attention_dscores")?,
            flash_backward_prepare: [
                f("flash_attention_backward_prepare")?,
                f("flash_attention_backward_prepare_bf16")?,
            ],
            flash: [flash(64)?, flash(128)?],
            kv_store_f32: f("kv_store_f32")?,
            kv_store_bf16: f("kv_store_bf16")?,
            attend: [
                [f("attend_f32")?, f("attend_f32_to_bf16")?],
                [f("attend_bf16")?, f("attend_bf16_to_bf16")?],
            ],
            attend_combine: [f("attend_combine_f32")?, f("attend_combine_to_bf16")?],
            _module: module,
        })
    }
}

/// The flash attention kernels for heads up to one width (kernels.cu: the `_64` and `_128`
/// kernels, which differ in how many accumulator tiles they hold in registers and in the
/// width of their shared tiles).
struct FlashKernels {
    width: usize,
    /// Each by the type attention stores (Q, K, V, the output and their gradients): f32, bf16.
    forward: [CudaFunction; 2],
    backward_kv: [CudaFunction; 2],
    backward_q: [CudaFunction; 2],
    /// Width 128: the bf16 gradient kernels (dK and dV, dQ) in one stage of tiles, for GPUs
    /// where [`wide_gradients_in_two_stages`] is false.
    backward_one_stage: Option<[CudaFunction; 2]>,
}

/// Device arenas, allocated together by [`Backend::allocate`].
struct Arenas {
    params: Buffer,
    grads: Buffer,
    adam_m: Buffer,
    adam_v: Buffer,
    acts: Buffer,
    half: Buffer,
    /// The bfloat16 copy of a packed product's input.
    packed_input: Buffer,
    tokens: Buffer,
    targets: Buffer,
    weights: Buffer,
    /// One f64: the sum of squares' result.
    sum: Buffer,
    /// The sum of squares' per-block partial sums (f64, [`SUM_BLOCKS`]).
    sum_partials: Buffer,
    /// The RMS norm gain gradient's partial sums (f32, [`gain_partial_rows`] rows of
    /// `max_width`).
    column_partials: Buffer,
    /// The content gradient's sums per chunk of rows (f32, [`max_content_chunks`] x
    /// `embedding_rows` rows of `max_width`) and whether each chunk had each row (one byte
    /// each).
    content_partials: Buffer,
    content_found: Buffer,
    /// The step the next update takes ([`UpdateStep`]), and the squared gradient norm the
    /// update measures (one f64).
    update_step: Buffer,
    norm_squared: Buffer,
    /// One i32: the position a replayed recording decodes.
    position: Buffer,
    products_workspace: Buffer,
    /// [`Backend::set_draws`]'s options (four 4-byte fields per row: temperature, top-k,
    /// top-p, unused) and numbers (`[rows, positions]` f32), the tokens drawn
    /// (`[positions, rows]` u16), and the draw's scratch: per row a weight per colour and a
    /// sort key per colour, padded to a power of two.
    draw_options: Buffer,
    draw_numbers: Buffer,
    drawn: Buffer,
    draw_weights: Buffer,
    draw_keys: Buffer,
}

/// One GPU: its context, kernels, cuBLASLt plans and arenas.
pub struct CudaBackend {
    /// First, so that it is dropped (after `drop` runs) while the context still lives.
    products: Products,
    gpu: Gpu,
    ctx: Arc<CudaContext>,
    /// Where calls go: the default stream, or the side stream while recording.
    stream: Arc<CudaStream>,
    default_stream: Arc<CudaStream>,
    /// The stream recordings are captured on, made by the first recording.
    side_stream: Option<Arc<CudaStream>>,
    kernels: Kernels,
    arenas: Option<Arenas>,
    recording: bool,
    /// The first error of a call while recording (which must not panic half-captured).
    recording_error: RefCell<Option<String>>,
    /// Recordings (and their ids) by index; `allocate` drops them all.
    graphs: Vec<Option<(u64, CudaGraph, bool)>>,
    /// Whether a call of the recording under way reads the replayed position (a replay of
    /// one that does not, a training pass, skips setting it and so waits for nothing).
    recording_reads_position: Cell<bool>,
    /// The id of the next recording.
    next_recording: u64,
    n_tokens: usize,
    weighted: bool,
    /// The draw buffers' sizes, and the rows [`Backend::set_draws`] last set.
    draws: crate::backend::DrawSizes,
    draw_rows: usize,
    /// Whether [`Backend::set_update`] has written the update's step since the arenas were
    /// allocated.
    update_set: bool,
    /// The GPU's multiprocessors: how many blocks a decoding step's attention should spread
    /// over.
    multiprocessors: usize,
    /// Whether the bf16 gradient kernels of width 128 run in two stages of tiles (see
    /// [`wide_gradients_in_two_stages`]).
    wide_gradients_in_two_stages: bool,
}

// SAFETY: the cuBLASLt handle and plans are used only by the thread that owns the backend
// (they are not `Sync`: `Products` holds a `RefCell`, so no `&CudaBackend` crosses threads);
// the context is made current on the calling thread before every call (`bind`).
unsafe impl Send for CudaBackend {}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Never panic here: this may run while unwinding from a CUDA error.
        let _ = self.ctx.bind_to_thread();
        if self.recording {
            let _ = self
                .stream
                .end_capture(driver_sys::CUgraphInstantiate_flags(0));
        }
        self.graphs.clear();
        self.arenas = None;
    }
}

/// A launch over `n` elements with a grid-stride loop.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What a product onto another buffer needs of its sum and addend: the same f32 shape, and
/// no overlap (cuBLASLt leaves a partial one undefined).
fn check_onto(out: View, addend: View, what: &str) {
    assert!(
        out.len == addend.len && out.dtype == DType::F32 && addend.dtype == DType::F32,
        "{what}: {addend:?} and {out:?} are not f32 sums of one shape"
    );
    assert!(!addend.overlaps(&out), "{what}: overlapping");
}

/// The index of a kernel's variant for `out`'s element type (0: f32, 1: bf16): the type it
/// stores, or for a kernel with variants by input, the type it reads.
fn stored(out: View) -> usize {
    usize::from(out.dtype == DType::Bf16)
}

/// Which of the quick-GELU kernels writes `out` from inputs of type `input`: f32 to f32, f32
/// to bf16, or bf16 to bf16 (a bf16 input's result is stored as bf16 too).
fn gelu_variant(out: View, input: DType, what: &str) -> usize {
    match (input, out.dtype) {
        (DType::F32, DType::F32) => 0,
        (DType::F32, DType::Bf16) => 1,
        (DType::Bf16, DType::Bf16) => 2,
        (DType::Bf16, DType::F32) => panic!("{what}: bf16 inputs give a bf16 result, not {out:?}"),
    }
}

/// How a product of `operands` writes `out`: f32 as they say, or a bf16 `out` rounded once
/// from the f32 sums (bf16 operands only, and not added to: the sum would be rounded twice).
fn bf16_result(operands: Operands, out: View, accumulate: bool, what: &str) -> Operands {
    match (out.dtype, operands) {
        (DType::F32, _) => operands,
        (DType::Bf16, Operands::Bf16) if !accumulate => Operands::Bf16ToBf16,
        _ => panic!("{what}: a bf16 {out:?} from {operands:?} operands (accumulate {accumulate})"),
    }
}

/// Stages of a flash attention kernel's loop tiles (kernels.cu's flash::stages): two for the
/// `bf16` kernels but the forward one of width 128 and the gradient ones' `_one_stage`
/// variants, one for the others.
fn flash_stages(width: usize, bf16: bool, forward: bool, one_stage: bool) -> usize {
    if bf16 && !one_stage && !(forward && width == 128) {
        2
    } else {
        1
    }
}

/// Dynamic shared bytes of a flash attention kernel of `width` with `stages` (kernels.cu's
/// flash_shared_bytes): bf16 rows of the kernel's width, 64 + 128 a stage for the forward
/// kernel, 128 + 64 a stage for the gradient kernels.
fn flash_shared_bytes(width: usize, stages: usize, forward: bool) -> usize {
    let rows = if forward {
        64 + 128 * stages
    } else {
        128 + 64 * stages
    };
    rows * width * 2
}

/// Whether a GPU with `per_multiprocessor` bytes of shared memory should run the two-stage
/// gradient kernels of width 128: where two of their blocks (64 KiB each, and the 1 KiB the
/// GPU reserves for each) fit a multiprocessor, as many as their registers allow; elsewhere
/// (100 KiB: sm_86, sm_89, sm_120) the `_one_stage` ones keep two blocks resident.
fn wide_gradients_in_two_stages(per_multiprocessor: usize) -> bool {
    per_multiprocessor >= 2 * (flash_shared_bytes(128, 2, false) + 1024)
}

/// The launch of a flash attention kernel of `width` (kernels.cu): a block of 4 warps per 64
/// query rows (forward, dQ) or 64 keys (dK and dV) of each sequence and head, with the shared
/// memory of its `stages`.
fn flash_launch(s: AttnShape, width: usize, stages: usize, forward: bool) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.t.div_ceil(64) as u32, s.n_head as u32, s.batch as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: flash_shared_bytes(width, stages, forward) as u32,
    }
}

/// Blocks of the sum of squares (each adds a share of the tensor into its own partial sum).
const SUM_BLOCKS: usize = 1024;

/// Rows each block of the RMS norm's backward pass takes, one after the other: few enough that
/// a batch of 32 images of 1,024 positions gives about as many blocks as an H200 holds at once
/// (1,024), many enough that adding the blocks' partial sums of the gain is cheap.
const NORM_ROWS_PER_BLOCK: usize = 32;

/// Columns each block of the RMS norm's backward pass takes: eight a thread (kernels.cu,
/// rmsnorm_backward's kCols).
const NORM_COLUMNS_PER_BLOCK: usize = 8 * ROW_THREADS as usize;

/// The most chunks of rows the content gradient is summed in: a colour's rows are shared
/// among this many blocks (a background colour can hold half of a batch's rows).
const CONTENT_CHUNKS: usize = 16;

/// The chunks the content gradient of `rows` rows is summed in: (rows a chunk, chunks), at
/// most [`CONTENT_CHUNKS`] of 256 rows or more, the last possibly shorter (fewer rows are not
/// worth a second pass over partial sums).
fn content_chunks(rows: usize) -> (usize, usize) {
    let chunk_rows = rows.div_ceil(CONTENT_CHUNKS).max(256);
    (chunk_rows, rows.div_ceil(chunk_rows).max(1))
}

/// The most chunks [`content_chunks`] makes of up to `max_rows` rows: what the scratch holds.
fn max_content_chunks(max_rows: usize) -> usize {
    max_rows.div_ceil(256).clamp(1, CONTENT_CHUNKS)
}

/// Partial-sum rows of the gain's gradient for up to `max_rows` rows (at least one).
fn gain_partial_rows(max_rows: usize) -> usize {
    max_rows.div_ceil(NORM_ROWS_PER_BLOCK).max(1)
}

/// Floats of the decoding kernels' (attend_*) query and partial value sums, besides the
/// scores: the query rounded up to pieces of 8 columns, and one piece per thread of the 128
/// (or every piece once, for heads of more than 128 pieces). kernels.cu: decode_shared_bytes.
fn decode_scratch_floats(head_dim: usize) -> usize {
    let pieces = head_dim.div_ceil(8);
    let row_threads = pieces.min(128);
    pieces * 8 + 128 / row_threads * pieces * 8
}

/// Dynamic shared bytes of the decoding kernels: the scores, then decode_scratch_floats.
fn decode_shared_bytes(n_ctx: usize, head_dim: usize) -> usize {
    (n_ctx + decode_scratch_floats(head_dim)) * 4
}

/// The longest context the decoding kernels take: 48 KiB of shared memory per block without
/// opting in, less the kernel's 32 floats of static scratch.
fn decode_context_limit(head_dim: usize) -> usize {
    (48 * 1024 - 128) / 4 - decode_scratch_floats(head_dim)
}

/// The fewest keys of a full context a run of split decoding attention holds: a block's
/// fixed costs (loading the query, its reductions and barriers) take about as long as reading
/// that many keys, so shorter runs gain little (a prediction, for a GPU run to check).
const MIN_SPLIT_KEYS: usize = 64;

/// kernels.cu: kMaxDecodeSplits.
const MAX_DECODE_SPLITS: usize = 64;

/// How many runs a decoding step's attention splits each (image, head)'s keys into, where its
/// `blocks` (images x heads) are fewer than two per multiprocessor (one block keeps about half
/// the reads in flight that a multiprocessor needs to stream at full bandwidth; predicted):
/// enough for about two blocks per multiprocessor, as far as every run holds
/// [`MIN_SPLIT_KEYS`] keys of a full context of `n_ctx` and the partials (`head_dim + 2`
/// floats per block) fit in `scratch_floats`.
fn decode_splits(
    blocks: usize,
    multiprocessors: usize,
    n_ctx: usize,
    head_dim: usize,
    scratch_floats: usize,
) -> usize {
    if blocks == 0 || blocks >= 2 * multiprocessors {
        return 1;
    }
    (2 * multiprocessors)
        .div_ceil(blocks)
        .min(n_ctx / MIN_SPLIT_KEYS)
        .min(scratch_floats / (blocks * (head_dim + 2)))
        .clamp(1, MAX_DECODE_SPLITS)
}

/// One block per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            u32::try_from(rows).expect("more rows than one launch takes"),
            1,
            1,
        ),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, blocks of `ROW_THREADS` (the RMS norm's forward kernels).
fn per_warp_row(rows: usize) -> LaunchConfig {
    per_row(rows.div_ceil(ROW_THREADS as usize / 32))
}

impl CudaBackend {
    /// Opens `gpu`: a context, the kernels for its compute capability and a cuBLASLt handle.
    pub fn open(gpu: Gpu) -> Result<Self> {
        super::Device::Cuda(gpu).check()?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(gpu.ordinal))
            .map_err(|_| anyhow!("cannot start cuda:{}", gpu.ordinal))?
            .map_err(|e| anyhow!("cannot start cuda:{}: {e:?}", gpu.ordinal))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow!("cannot query cuda:{}: {e:?}", gpu.ordinal))?;
        let ptx = match major {
            9.. => PTX_SM90,
            8 => PTX_SM80,
            _ => bail!(
                "cuda:{} has compute capability {major}.{minor}; igpt's kernels need 8.0 or newer \
                 (A100, H100 and later)",
                gpu.ordinal
            ),
        };
        let multiprocessors = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| anyhow!("cannot query cuda:{}: {e:?}", gpu.ordinal))?;
        let shared_per_multiprocessor = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )
            .map_err(|e| anyhow!("cannot query cuda:{}: {e:?}", gpu.ordinal))?;
        let kernels = Kernels::load(&ctx, ptx)?;
        let stream = ctx.default_stream();
        ctx.bind_to_thread()
            .map_err(|e| anyhow!("cannot start cuda:{}: {e:?}", gpu.ordinal))?;
        let products = Products::new().map_err(|e| anyhow!("cannot start cuBLASLt: {e}"))?;
        Ok(Self {
            products,
            gpu,
            ctx,
            stream: stream.clone(),
            default_stream: stream,
            side_stream: None,
            kernels,
            arenas: None,
            recording: false,
            recording_error: RefCell::new(None),
            graphs: Vec::new(),
            recording_reads_position: Cell::new(false),
            next_recording: 0,
            n_tokens: 0,
            weighted: false,
            draws: Default::default(),
            draw_rows: 0,
            update_set: false,
            multiprocessors: usize::try_from(multiprocessors).unwrap_or(1).max(1),
            wide_gradients_in_two_stages: wide_gradients_in_two_stages(
                usize::try_from(shared_per_multiprocessor).unwrap_or(0),
            ),
        })
    }

    /// The GPU's name and free and total memory in bytes.
    pub fn describe(&self) -> (String, usize, usize) {
        self.bind();
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
        (name, free, total)
    }

    fn bind(&self) {
        ok(self.ctx.bind_to_thread(), "binding the context");
    }

    fn arenas(&self) -> &Arenas {
        self.arenas
            .as_ref()
            .expect("a CUDA kernel ran before the backend was allocated")
    }

    /// The device address of a view, after checking it lies in its arena with its type.
    fn ptr(&self, v: View) -> u64 {
        let a = self.arenas();
        let (buf, dtype) = match v.arena {
            Arena::Params => (&a.params, DType::F32),
            Arena::Grads => (&a.grads, DType::F32),
            Arena::AdamM => (&a.adam_m, DType::F32),
            Arena::AdamV => (&a.adam_v, DType::F32),
            Arena::Acts => (&a.acts, DType::F32),
            Arena::Half => (&a.half, DType::Bf16),
        };
        assert_eq!(
            v.dtype, dtype,
            "view {v:?} has the wrong element type for its arena"
        );
        let size = match dtype {
            DType::F32 => 4,
            DType::Bf16 => 2,
        };
        assert!(
            (v.offset + v.len) * size <= buf.bytes,
            "view {v:?} is outside its arena of {} bytes",
            buf.bytes
        );
        buf.ptr + (v.offset * size) as u64
    }

    fn launch(&self, f: &CudaFunction, cfg: LaunchConfig, what: &str, args: &[&dyn Arg]) {
        // Nothing to do (an empty batch); the driver refuses an empty grid.
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 {
            return;
        }
        let mut b = self.stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: every pointer argument is a checked view or a buffer of this backend, sized
        // for the launch by the caller; the argument list matches the kernel's signature.
        self.check(unsafe { b.launch(cfg) }, what);
    }

    /// A call's result: an error panics, as CUDA errors do here, except while recording,
    /// where the first is kept for `end_recording` to return (the capture must still end).
    fn check<T, E: std::fmt::Debug>(&self, r: std::result::Result<T, E>, what: &str) {
        if let Err(e) = r {
            if !self.recording {
                panic!("CUDA error in {what}: {e:?}");
            }
            self.recording_error
                .borrow_mut()
                .get_or_insert_with(|| format!("{what}: {e:?}"));
        }
    }

    /// Refuses a call that cannot be recorded (a transfer to or from the host, a wait)
    /// while recording: a bug in the caller, not bad input.
    fn not_recording(&self, what: &str) {
        assert!(
            !self.recording,
            "{what} cannot be recorded: only kernels can"
        );
    }

    /// The position arguments of a decoding kernel: `pos` itself, or while recording the
    /// address the replays write their position to.
    fn position_args(&self, pos: usize) -> (i32, u64) {
        let at = if self.recording {
            self.recording_reads_position.set(true);
            self.arenas().position.ptr
        } else {
            0
        };
        (int(pos), at)
    }

    /// Queues the sum of squares of `x`, in f64, into the one-f64 buffer at `out`: per-block
    /// partial sums, then their sum in a fixed order, both recordable.
    fn sum_squares_into(&self, out: u64, x: View, what: &str) {
        let (xp, n) = (self.ptr(x), x.len);
        let partials = self.arenas().sum_partials.ptr;
        let blocks = n.div_ceil(256).clamp(1, SUM_BLOCKS);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(&self.kernels.sum_squares, cfg, what, &[&partials, &xp, &n]);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let count = int(blocks);
        self.launch(
            &self.kernels.sum_partials,
            cfg,
            what,
            &[&out, &partials, &count],
        );
    }

    /// The bf16 input of a product with a packed weight (for the call `what`): a bf16 view as
    /// it is, an f32 one rounded into the planned scratch first.
    fn packed_input(&self, a: View, what: &str) -> u64 {
        let a_p = self.ptr(a);
        if a.dtype == DType::Bf16 {
            return a_p;
        }
        let scratch = &self.arenas().packed_input;
        assert!(
            2 * a.len <= scratch.bytes,
            "{what}: input larger than planned"
        );
        self.round(scratch.ptr, a_p, a.len, what);
        scratch.ptr
    }

    /// Stores `len` f32 values from `src` at `dst` rounded to bfloat16.
    fn round(&self, dst: u64, src: u64, len: usize, what: &str) {
        self.launch(
            &self.kernels.round_bf16,
            elementwise(len),
            what,
            &[&dst, &src, &len],
        );
    }

    /// How products of f32 operands multiply: exactly, or rounded to bfloat16 for the tensor
    /// cores.
    fn f32_operands(&self) -> Operands {
        match self.gpu.products {
            Precision::F32 => Operands::F32,
            Precision::Bf16 => Operands::F32ViaBf16,
        }
    }

    /// How a product of the views `a` and `b` multiplies: as [`Self::f32_operands`] says for
    /// f32 views, from bfloat16 as stored for bfloat16 ones.
    fn operands_of(&self, a: View, b: View, what: &str) -> Operands {
        match (a.dtype, b.dtype) {
            (DType::F32, DType::F32) => self.f32_operands(),
            (DType::Bf16, DType::Bf16) => Operands::Bf16,
            _ => panic!("{what}: operands of two types ({a:?}, {b:?})"),
        }
    }

    /// `C = alpha op(A) op(B) + beta C`, row-major, operands of element type `operands`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, p: RowMajor, a: u64, b: u64, c: u64, alpha: f32, beta: f32, operands: Operands) {
        self.product(p, a, b, c, c, alpha, beta, operands);
    }

    /// `out = addend + op(A) op(B)`, row-major: the sum goes to another buffer than the one
    /// added to (`addend` and `out` must not overlap).
    #[allow(clippy::too_many_arguments)]
    fn gemm_onto(&self, p: RowMajor, a: u64, b: u64, addend: u64, out: u64, operands: Operands) {
        self.product(p, a, b, addend, out, 1.0, 1.0, operands);
    }

    /// `D = alpha op(A) op(B) + beta C`: [`CudaBackend::gemm`] and [`CudaBackend::gemm_onto`].
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        p: RowMajor,
        a: u64,
        b: u64,
        c: u64,
        d: u64,
        alpha: f32,
        beta: f32,
        operands: Operands,
    ) {
        self.bind();
        let workspace = &self.arenas().products_workspace;
        // SAFETY: the pointers are checked views sized for this product by the caller, of
        // `operands`' types; the workspace is this backend's, used by one product at a time
        // (every product goes to `self.stream`, in order).
        let r = unsafe {
            self.products.run(
                self.stream.cu_stream() as _,
                (workspace.ptr, workspace.bytes),
                &p,
                a,
                b,
                c,
                d,
                alpha,
                beta,
                operands,
            )
        };
        if let Err(e) = r {
            self.check(Err::<(), _>(e), &format!("a product ({p:?}, {operands:?})"));
        }
    }

    fn f32_gemm(&self, p: RowMajor, a: u64, b: u64, c: u64, alpha: f32, beta: f32) {
        self.gemm(p, a, b, c, alpha, beta, self.f32_operands());
    }

    /// Whether attention of `shape` runs on the tensor cores (flash attention in kernels.cu):
    /// with bf16 products, for head sizes that are whole 16-column tiles up to 128. Exact f32
    /// products keep the cuBLASLt path, which stores the scores.
    fn flash(&self, shape: AttnShape) -> bool {
        self.gpu.products == Precision::Bf16
            && shape.head_dim.is_multiple_of(16)
            && (16..=128).contains(&shape.head_dim)
    }

    /// The flash attention kernels for heads of `head_dim` columns: the narrower kernels hold
    /// fewer accumulators, so more blocks fit on a multiprocessor.
    fn flash_kernels(&self, head_dim: usize) -> &FlashKernels {
        &self.kernels.flash[usize::from(head_dim > 64)]
    }

    /// The product `scale * Q K^T` of sequence `b` for every head into `scores`
    /// (`[n_head, t, t]`).
    fn attention_scores(&self, qkv: u64, scores: u64, s: AttnShape, b: usize) {
        let (t, hd) = (s.t, s.head_dim);
        let d = s.n_head * hd;
        let seq = qkv + (b * t * 3 * d * 4) as u64;
        let p = RowMajor {
            ta: Op::N,
            tb: Op::T,
            m: t,
            n: t,
            k: hd,
            lda: 3 * d,
            ldb: 3 * d,
            ldc: t,
            stride_a: hd,
            stride_b: hd,
            stride_c: t * t,
            batch: s.n_head,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        self.f32_gemm(p, seq, seq + (d * 4) as u64, scores, scale, 0.0);
    }
}

/// Tensors per `adamw_tensors` launch (`ADAM_TABLE` in kernels.cu).
const ADAM_TABLE: usize = 64;

/// `AdamTable` of kernels.cu, field for field: the tensors one launch updates.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamTable {
    start: [u64; ADAM_TABLE],
    len: [u64; ADAM_TABLE],
    decay: [f32; ADAM_TABLE],
    count: i32,
}

// SAFETY: a plain `repr(C)` struct of integers and floats, laid out as the C struct the
// kernel takes by value.
unsafe impl cudarc::driver::DeviceRepr for AdamTable {}

/// `UpdateStep` of kernels.cu, field for field: the step `adamw_tensors` reads from device
/// memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct UpdateStep {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    grad_scale: f32,
    bc1: f32,
    bc2: f32,
    clip: f32,
}

// SAFETY: nine f32s, laid out as the C struct; copied to the device as plain bytes.
unsafe impl cudarc::driver::DeviceRepr for UpdateStep {}

impl UpdateStep {
    fn of(u: Update) -> Self {
        let h = u.adam;
        let (bc1, bc2) = h.bias_corrections();
        Self {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            wd: h.weight_decay,
            grad_scale: h.grad_scale,
            bc1,
            bc2,
            clip: u.clip,
        }
    }
}

/// A kernel argument: device addresses are passed as `u64`.
trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
arg!(u64, i32, f32, usize, AdamTable);

/// An `i32` kernel argument from a size the planner keeps small.
fn int(n: usize) -> i32 {
    i32::try_from(n).expect("a kernel size exceeds i32")
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn attention_scratch_len(&self, shape: AttnShape) -> usize {
        if self.flash(shape) {
            // Each query row's sum of dout * out, for the backward pass.
            shape.batch * shape.n_head * shape.t
        } else {
            // The scores of one sequence's heads, and their gradient in the backward pass.
            2 * shape.n_head * shape.t * shape.t
        }
    }

    fn decode_cache_len(&self, n_ctx: usize) -> usize {
        n_ctx
    }

    fn native_bf16(&self) -> bool {
        true
    }

    fn rounds_packed_inputs(&self) -> bool {
        true
    }

    fn packed_len(&self, k: usize, n: usize) -> usize {
        k * n
    }

    fn attention_stores_bf16(&self, shape: AttnShape) -> bool {
        self.flash(shape)
    }

    fn synchronize(&self) {
        self.not_recording("synchronize");
        self.bind();
        ok(self.ctx.synchronize(), "synchronize");
    }

    fn decode_context_limit(&self, head_dim: usize) -> usize {
        decode_context_limit(head_dim)
    }

    fn device_memory_free(&self) -> Option<u128> {
        self.bind();
        self.ctx.mem_get_info().ok().map(|(free, _)| free as u128)
    }

    fn allocate(&mut self, s: ArenaSizes) -> Result<()> {
        self.not_recording("allocate");
        self.bind();
        // Recordings point into the old arenas. Free those first, so re-planning does not
        // need both at once.
        self.graphs.clear();
        self.arenas = None;
        let sizes = [
            ("parameters", 4 * s.params),
            ("gradients", 4 * s.grads),
            ("optimizer moments", 4 * s.grads),
            ("optimizer moments", 4 * s.grads),
            ("activations", 4 * s.acts),
            ("16-bit weights and caches", 2 * s.half),
            ("scratch", 2 * s.max_packed_input),
            ("tokens", 2 * s.tokens),
            ("targets", 2 * s.tokens),
            ("loss weights", 4 * s.tokens),
            ("scratch", 8),
            ("scratch", 8 * SUM_BLOCKS),
            ("scratch", 4 * gain_partial_rows(s.max_rows) * s.max_width),
            (
                "scratch",
                4 * max_content_chunks(s.max_rows) * s.embedding_rows * s.max_width,
            ),
            ("scratch", max_content_chunks(s.max_rows) * s.embedding_rows),
            ("scratch", std::mem::size_of::<UpdateStep>()),
            ("scratch", 8),
            ("scratch", 4),
            ("cuBLASLt workspace", PRODUCTS_WORKSPACE_BYTES),
            ("sampling options", 16 * s.draws.rows),
            ("sampling numbers", 4 * s.draws.rows * s.draws.positions),
            ("drawn tokens", 2 * s.draws.positions * s.draws.rows),
            ("scratch", 4 * s.draws.rows * s.draws.width),
            (
                "scratch",
                8 * s.draws.rows * s.draws.width.next_power_of_two(),
            ),
        ];
        let total: usize = sizes.iter().map(|(_, b)| b).sum();
        let (free, all) = self
            .ctx
            .mem_get_info()
            .map_err(|e| anyhow!("cannot query cuda:{}'s memory: {e:?}", self.gpu.ordinal))?;
        let too_big = |what: &str| {
            anyhow!(
                "this model and batch need {:.2} GB on cuda:{} but only {:.2} GB of its {:.2} GB \
                 are free{what}: use fewer images per forward pass (--micro-batch) or a smaller \
                 model",
                total as f64 * 1e-9,
                self.gpu.ordinal,
                free as f64 * 1e-9,
                all as f64 * 1e-9
            )
        };
        if total > free {
            return Err(too_big(""));
        }
        let mut bufs = Vec::with_capacity(sizes.len());
        for (what, bytes) in sizes {
            let buf = Buffer::new(&self.ctx, bytes)
                .map_err(|e| too_big(&format!(" (allocating {what} failed: {e:?})")))?;
            bufs.push(buf);
        }
        let mut it = bufs.into_iter();
        let mut next = || it.next().expect("one buffer per arena");
        self.arenas = Some(Arenas {
            params: next(),
            grads: next(),
            adam_m: next(),
            adam_v: next(),
            acts: next(),
            half: next(),
            packed_input: next(),
            tokens: next(),
            targets: next(),
            weights: next(),
            sum: next(),
            sum_partials: next(),
            column_partials: next(),
            content_partials: next(),
            content_found: next(),
            update_step: next(),
            norm_squared: next(),
            position: next(),
            products_workspace: next(),
            draw_options: next(),
            draw_numbers: next(),
            drawn: next(),
            draw_weights: next(),
            draw_keys: next(),
        });
        self.draws = s.draws;
        self.draw_rows = 0;
        self.n_tokens = 0;
        self.weighted = false;
        self.update_set = false;
        Ok(())
    }

    fn upload(&mut self, dst: View, src: &[f32]) {
        assert!(
            dst.len == src.len(),
            "upload: {dst:?} does not take {} floats",
            src.len()
        );
        self.not_recording("upload");
        let ptr = self.ptr(dst);
        self.bind();
        if dst.dtype == DType::Bf16 {
            // Not on any step's path (tests write bf16 views): rounded on the host first.
            let bits: Vec<u16> = src
                .iter()
                .map(|&x| crate::backend::cpu::bf16::to_bf16(x))
                .collect();
            // SAFETY: as below, from a host buffer of the view's own length and type.
            ok(unsafe { driver::memcpy_htod_sync(ptr, &bits) }, "upload");
            return;
        }
        // SAFETY: `ptr` is a checked f32 view of `src.len()` elements; the synchronous copy
        // follows the work queued on the default stream.
        ok(unsafe { driver::memcpy_htod_sync(ptr, src) }, "upload");
    }

    fn adopt_params(&mut self, params: Vec<f32>) -> Result<()> {
        self.not_recording("adopt_params");
        self.bind();
        let bytes = 4 * params.len();
        let ordinal = self.gpu.ordinal;
        let arenas = self
            .arenas
            .as_mut()
            .ok_or_else(|| anyhow!("parameters given before the arenas were allocated"))?;
        // `allocate` was told the parameters come here, so it made no room for them.
        if arenas.params.bytes < bytes {
            // Recordings would point at the buffer being replaced.
            self.graphs.clear();
            arenas.params = Buffer::new(&self.ctx, bytes).map_err(|e| {
                anyhow!(
                    "cannot allocate {:.2} GB for the model's parameters on cuda:{ordinal} \
                     ({e:?}): use a smaller model or free the GPU",
                    bytes as f64 * 1e-9
                )
            })?;
        }
        self.upload(View::new(Arena::Params, 0, params.len()), &params);
        Ok(())
    }

    fn download(&self, src: View, dst: &mut [f32]) {
        assert!(
            src.len == dst.len(),
            "download: {src:?} does not give {} floats",
            dst.len()
        );
        self.not_recording("download");
        let ptr = self.ptr(src);
        self.bind();
        if src.dtype == DType::Bf16 {
            // Not on any step's path (tests and inspection read bf16 views): a host copy of
            // the bits, widened.
            let mut bits = vec![0u16; src.len];
            // SAFETY: as below, into a host buffer of the view's own length and type.
            ok(
                unsafe { driver::memcpy_dtoh_sync(&mut bits, ptr) },
                "download",
            );
            for (x, h) in dst.iter_mut().zip(bits) {
                *x = f32::from_bits(u32::from(h) << 16);
            }
            return;
        }
        // SAFETY: as in `upload`, the other way; the copy waits for the queued kernels.
        ok(unsafe { driver::memcpy_dtoh_sync(dst, ptr) }, "download");
    }

    fn fill(&mut self, dst: View, value: f32) {
        let (ptr, n) = (self.ptr(dst), dst.len);
        let k = match dst.dtype {
            DType::F32 => &self.kernels.fill_f32,
            DType::Bf16 => &self.kernels.fill_bf16,
        };
        self.launch(k, elementwise(n), "fill", &[&ptr, &value, &n]);
    }

    fn copy(&mut self, dst: View, src: View) {
        assert!(
            dst.len == src.len && dst.dtype == src.dtype && !dst.overlaps(&src),
            "copy: {src:?} does not fit {dst:?}"
        );
        let (d, s) = (self.ptr(dst), self.ptr(src));
        let bytes = dst.len * if dst.dtype == DType::F32 { 4 } else { 2 };
        self.bind();
        // SAFETY: both are checked views of `bytes` bytes that do not overlap.
        self.check(
            unsafe { driver::memcpy_dtod_async(d, s, bytes, self.stream.cu_stream()) },
            "copy",
        );
    }

    fn round_to_bf16(&mut self, dst: View, src: View) {
        assert!(
            dst.len == src.len && dst.dtype == DType::Bf16 && src.dtype == DType::F32,
            "round_to_bf16: {src:?} does not fit {dst:?}"
        );
        self.round(self.ptr(dst), self.ptr(src), src.len, "round_to_bf16");
    }

    fn set_tokens(&mut self, tokens: &[u16]) {
        self.not_recording("set_tokens");
        let a = self.arenas();
        assert!(
            tokens.len() * 2 <= a.tokens.bytes,
            "batch of {} tokens exceeds the planned {}",
            tokens.len(),
            a.tokens.bytes / 2
        );
        let ptr = a.tokens.ptr;
        self.bind();
        // SAFETY: the token buffer holds at least `tokens.len()` ids (checked above).
        ok(
            unsafe { driver::memcpy_htod_sync(ptr, tokens) },
            "set_tokens",
        );
        self.n_tokens = tokens.len();
        self.weighted = false;
    }

    fn set_draws(&mut self, options: &[SampleOptions], numbers: &[f32]) {
        self.not_recording("set_draws");
        self.draws.check_fits(options.len(), numbers.len());
        // The kernel's DrawOptions: top-k as an i32's bits (0 and any k at or past the
        // palette keep every colour, as on the CPU).
        let fields: Vec<f32> = options
            .iter()
            .flat_map(|o| {
                let k = o.top_k.min(i32::MAX as usize) as u32;
                [o.temperature, f32::from_bits(k), o.top_p, 0.0]
            })
            .collect();
        let a = self.arenas();
        let (at_options, at_numbers) = (a.draw_options.ptr, a.draw_numbers.ptr);
        self.bind();
        // SAFETY: the buffers hold `draws.rows` options and `draws.rows * positions` numbers,
        // at least what is copied (checked above).
        unsafe {
            ok(driver::memcpy_htod_sync(at_options, &fields), "set_draws");
            ok(driver::memcpy_htod_sync(at_numbers, numbers), "set_draws");
        }
        self.draw_rows = options.len();
    }

    fn draw_tokens(&mut self, logits: View, v: usize, pos: usize) {
        let rows = self.draw_rows;
        assert!(
            logits.len == rows * v
                && logits.dtype == DType::F32
                && v <= self.draws.width
                && pos < self.draws.positions,
            "draw_tokens: {logits:?} is not {rows} rows of {v} at a planned position ({pos})"
        );
        let a = self.arenas();
        assert!(
            rows * 2 <= a.tokens.bytes,
            "draw_tokens: more rows than tokens"
        );
        let p = (
            self.ptr(logits),
            a.draw_options.ptr,
            a.draw_numbers.ptr,
            a.draw_weights.ptr,
            a.draw_keys.ptr,
            a.tokens.ptr,
            a.drawn.ptr,
        );
        let (posi, pos_at) = self.position_args(pos);
        let (vi, positions, keys) = (
            int(v),
            int(self.draws.positions),
            int(v.next_power_of_two()),
        );
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(rows).expect("rows fit a grid"), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            &self.kernels.draw_tokens,
            cfg,
            "draw_tokens",
            &[
                &p.0, &vi, &p.1, &p.2, &positions, &posi, &pos_at, &p.3, &p.4, &keys, &p.5, &p.6,
            ],
        );
        self.n_tokens = rows;
        self.weighted = false;
    }

    fn drawn_tokens(&self, from: usize, to: usize, out: &mut [u16]) {
        self.not_recording("drawn_tokens");
        let range = self.draws.drawn_range(self.draw_rows, from, to, out.len());
        if range.is_empty() {
            return;
        }
        let at = self.arenas().drawn.ptr + (2 * range.start) as u64;
        self.bind();
        // SAFETY: positions `from..to` of `rows` rows lie inside the drawn tokens' buffer
        // (checked above); the copy waits for the queued kernels.
        ok(unsafe { driver::memcpy_dtoh_sync(out, at) }, "drawn_tokens");
    }

    fn embed_forward(
        &mut self,
        out: View,
        wte: View,
        wpe: View,
        sos: View,
        t: usize,
        d: usize,
        direct: bool,
    ) {
        let rows = self.n_tokens;
        assert_eq!(out.len, rows * d, "embed_forward: output size");
        let args = (
            self.ptr(out),
            self.arenas().tokens.ptr,
            self.ptr(wte),
            self.ptr(wpe),
            self.ptr(sos),
        );
        let (t, d, v, direct) = (int(t), int(d), int(wte.len / d), direct as i32);
        self.launch(
            &self.kernels.embed_forward,
            per_row(rows),
            "embed_forward",
            &[
                &args.0, &args.1, &args.2, &args.3, &args.4, &t, &d, &v, &direct,
            ],
        );
    }

    fn embed_backward(
        &mut self,
        dwte: View,
        dwpe: View,
        dsos: View,
        dout: View,
        t: usize,
        d: usize,
        direct: bool,
    ) {
        let rows = self.n_tokens;
        let batch = int(rows / t);
        let (dwte_p, dwpe_p, dsos_p, dout_p) = (
            self.ptr(dwte),
            self.ptr(dwpe),
            self.ptr(dsos),
            self.ptr(dout),
        );
        let ids = self.arenas().tokens.ptr;
        let (ti, di, v, direct) = (int(t), int(d), int(dwte.len / d), direct as i32);
        let cfg = LaunchConfig {
            grid_dim: (t as u32, d.div_ceil(256) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            &self.kernels.embed_backward_positions,
            cfg,
            "embed_backward",
            &[&dwpe_p, &dout_p, &batch, &ti, &di],
        );
        // Block (content row, 256 columns, chunk of rows): the table's rows and the start
        // token's; then each row adds its chunks in order.
        let (chunk_rows, chunks) = content_chunks(rows);
        let (partials, found) = (
            &self.arenas().content_partials,
            &self.arenas().content_found,
        );
        assert!(
            chunks * (v as usize + 1) <= found.bytes
                && chunks * (v as usize + 1) * d * 4 <= partials.bytes,
            "embed_backward: the content gradient's scratch was planned for fewer rows"
        );
        let (partials, found) = (partials.ptr, found.ptr);
        let cfg = LaunchConfig {
            grid_dim: (v as u32 + 1, d.div_ceil(256) as u32, chunks as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, chunk_rows, chunks) = (int(rows), int(chunk_rows), int(chunks));
        self.launch(
            &self.kernels.embed_backward_content,
            cfg,
            "embed_backward",
            &[
                &partials,
                &found,
                &dout_p,
                &ids,
                &rows_i,
                &chunk_rows,
                &ti,
                &di,
                &v,
                &direct,
            ],
        );
        let cfg = LaunchConfig {
            grid_dim: (v as u32 + 1, d.div_ceil(256) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            &self.kernels.embed_content_sums,
            cfg,
            "embed_backward",
            &[&dwte_p, &dsos_p, &partials, &found, &chunks, &di, &v],
        );
    }

    fn set_targets(&mut self, targets: &[u16], weights: &[f32]) {
        self.not_recording("set_targets");
        assert!(targets.len() == self.n_tokens && weights.len() == self.n_tokens);
        let (t, w) = (self.arenas().targets.ptr, self.arenas().weights.ptr);
        self.bind();
        // SAFETY: both buffers hold the planned token count, at least `n_tokens`.
        unsafe {
            ok(driver::memcpy_htod_sync(t, targets), "set_targets");
            ok(driver::memcpy_htod_sync(w, weights), "set_targets");
        }
        self.weighted = true;
    }

    fn rmsnorm_forward(&mut self, out: View, rstd: View, x: View, g: View, d: usize) {
        let rows = x.len / d;
        let p = (self.ptr(out), self.ptr(rstd), self.ptr(x), self.ptr(g));
        let (ri, di, eps) = (int(rows), int(d), 1e-5f32);
        self.launch(
            &self.kernels.rmsnorm_forward[stored(out)],
            per_warp_row(rows),
            "rmsnorm_forward",
            &[&p.0, &p.1, &p.2, &p.3, &ri, &di, &eps],
        );
    }

    fn rmsnorm_backward(
        &mut self,
        dx: View,
        dx_rounded: Option<View>,
        dg: View,
        dout: View,
        x: View,
        rstd: View,
        g: View,
        d: usize,
    ) {
        let rows = x.len / d;
        let p = (
            self.ptr(dx),
            self.ptr(dg),
            self.ptr(dout),
            self.ptr(x),
            self.ptr(rstd),
            self.ptr(g),
        );
        // dx and the gain's partial sums over blocks of rows in one pass, then the partial
        // sums added in order.
        let rows_per_block = NORM_ROWS_PER_BLOCK;
        let count = rows.div_ceil(rows_per_block);
        let (partials, capacity) = {
            let b = &self.arenas().column_partials;
            (b.ptr, b.bytes)
        };
        assert!(
            count * d * 4 <= capacity,
            "rmsnorm_backward: {rows} rows of {d} exceed the planned rows and width"
        );
        let cfg = LaunchConfig {
            grid_dim: (count as u32, d.div_ceil(NORM_COLUMNS_PER_BLOCK) as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ri, di, per, ci) = (int(rows), int(d), int(rows_per_block), int(count));
        // Null: no rounded copy.
        let rounded = dx_rounded.map_or(0, |r| {
            assert!(
                r.len == dx.len && r.dtype == DType::Bf16,
                "rmsnorm_backward: {r:?} does not take {dx:?} rounded"
            );
            self.ptr(r)
        });
        let kernel = &self.kernels.rmsnorm_backward[stored(dout)];
        self.launch(
            kernel,
            cfg,
            "rmsnorm_backward",
            &[
                &p.0, &rounded, &partials, &p.2, &p.3, &p.4, &p.5, &ri, &di, &per,
            ],
        );
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(32) as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            &self.kernels.add_column_sums,
            cfg,
            "rmsnorm_backward",
            &[&p.1, &partials, &ci, &di],
        );
    }

    fn pack_weight(&mut self, dst: View, w: View, op: Op, k: usize, n: usize) {
        assert!(dst.len == k * n && w.len == k * n, "pack_weight: sizes");
        let (d, s) = (self.ptr(dst), self.ptr(w));
        let (tr, ki, ni) = ((op == Op::T) as i32, int(k), int(n));
        self.launch(
            &self.kernels.pack_weight,
            elementwise(k * n),
            "pack_weight",
            &[&d, &s, &tr, &ki, &ni],
        );
    }

    fn matmul_packed(
        &mut self,
        out: View,
        a: View,
        w: View,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) {
        assert!(
            out.len == m * n && a.len == m * k && w.len == k * n,
            "matmul_packed: sizes"
        );
        assert!(
            out.dtype == DType::F32 || a.dtype == DType::Bf16,
            "matmul_packed: a bf16 {out:?} from an f32 input would be rounded twice"
        );
        let operands = bf16_result(Operands::Bf16, out, accumulate, "matmul_packed");
        let input = self.packed_input(a, "matmul_packed");
        let (w, o) = (self.ptr(w), self.ptr(out));
        let beta = if accumulate { 1.0 } else { 0.0 };
        let p = RowMajor::plain(Op::N, Op::N, m, k, n);
        self.gemm(p, input, w, o, 1.0, beta, operands);
    }

    fn matmul_packed_onto(
        &mut self,
        out: View,
        addend: View,
        a: View,
        w: View,
        m: usize,
        k: usize,
        n: usize,
    ) {
        if addend == out {
            return self.matmul_packed(out, a, w, m, k, n, true);
        }
        assert!(
            out.len == m * n && a.len == m * k && w.len == k * n,
            "matmul_packed_onto: sizes"
        );
        check_onto(out, addend, "matmul_packed_onto");
        let input = self.packed_input(a, "matmul_packed_onto");
        let (w, sum, o) = (self.ptr(w), self.ptr(addend), self.ptr(out));
        let p = RowMajor::plain(Op::N, Op::N, m, k, n);
        self.gemm_onto(p, input, w, sum, o, Operands::Bf16);
    }

    fn matmul(
        &mut self,
        out: View,
        a: View,
        ta: Op,
        b: View,
        tb: Op,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) {
        assert!(
            out.len == m * n && a.len == m * k && b.len == k * n,
            "matmul: sizes do not match {m}x{k}x{n}"
        );
        let operands = bf16_result(self.operands_of(a, b, "matmul"), out, accumulate, "matmul");
        let (o, a, b) = (self.ptr(out), self.ptr(a), self.ptr(b));
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.gemm(
            RowMajor::plain(ta, tb, m, k, n),
            a,
            b,
            o,
            1.0,
            beta,
            operands,
        );
    }

    fn matmul_onto(
        &mut self,
        out: View,
        addend: View,
        a: View,
        ta: Op,
        b: View,
        tb: Op,
        m: usize,
        k: usize,
        n: usize,
    ) {
        if addend == out {
            return self.matmul(out, a, ta, b, tb, m, k, n, true);
        }
        assert!(
            out.len == m * n && a.len == m * k && b.len == k * n,
            "matmul_onto: sizes do not match {m}x{k}x{n}"
        );
        check_onto(out, addend, "matmul_onto");
        let operands = self.operands_of(a, b, "matmul_onto");
        let (sum, o, a, b) = (self.ptr(addend), self.ptr(out), self.ptr(a), self.ptr(b));
        let p = RowMajor::plain(ta, tb, m, k, n);
        self.gemm_onto(p, a, b, sum, o, operands);
    }

    fn attention_forward(&mut self, out: View, lse: View, qkv: View, scratch: View, s: AttnShape) {
        let (t, hd, nh) = (s.t, s.head_dim, s.n_head);
        let d = nh * hd;
        assert!(qkv.len == s.batch * t * 3 * d && out.len == s.batch * t * d);
        assert!(lse.len >= s.batch * nh * t && scratch.len >= self.attention_scratch_len(s));
        assert!(
            out.dtype == qkv.dtype && (out.dtype == DType::F32 || self.flash(s)),
            "attention_forward: bf16 storage ({qkv:?}, {out:?}) needs both bf16 and flash \
             attention ({s:?})"
        );
        if self.flash(s) {
            let (out_p, lse_p, qkv_p) = (self.ptr(out), self.ptr(lse), self.ptr(qkv));
            let (ti, nhi, hdi, causal) = (int(t), int(nh), int(hd), s.causal as i32);
            let kernels = self.flash_kernels(hd);
            self.launch(
                &kernels.forward[stored(out)],
                flash_launch(
                    s,
                    kernels.width,
                    flash_stages(kernels.width, out.dtype == DType::Bf16, true, false),
                    true,
                ),
                "attention_forward",
                &[&out_p, &lse_p, &qkv_p, &ti, &nhi, &hdi, &causal],
            );
            return;
        }
        let (out_p, lse_p, qkv_p, scores) = (
            self.ptr(out),
            self.ptr(lse),
            self.ptr(qkv),
            self.ptr(scratch),
        );
        let (ti, causal) = (int(t), s.causal as i32);
        for b in 0..s.batch {
            self.attention_scores(qkv_p, scores, s, b);
            let lse_b = lse_p + (b * nh * t * 4) as u64;
            self.launch(
                &self.kernels.attention_softmax,
                per_row(nh * t),
                "attention_forward",
                &[&scores, &lse_b, &ti, &causal],
            );
            // out_h = P_h V_h, written into head h's columns of the sequence's rows.
            let p = RowMajor {
                ta: Op::N,
                tb: Op::N,
                m: t,
                n: hd,
                k: t,
                lda: t,
                ldb: 3 * d,
                ldc: d,
                stride_a: t * t,
                stride_b: hd,
                stride_c: hd,
                batch: nh,
            };
            let v = qkv_p + ((b * t * 3 * d + 2 * d) * 4) as u64;
            self.f32_gemm(p, scores, v, out_p + (b * t * d * 4) as u64, 1.0, 0.0);
        }
    }

    fn attention_backward(
        &mut self,
        dqkv: View,
        dout: View,
        out: View,
        lse: View,
        qkv: View,
        scratch: View,
        s: AttnShape,
    ) {
        let (t, hd, nh) = (s.t, s.head_dim, s.n_head);
        let d = nh * hd;
        assert!(
            qkv.len == dqkv.len
                && dout.len == out.len
                && scratch.len >= self.attention_scratch_len(s)
        );
        let types = [dqkv.dtype, dout.dtype, out.dtype, qkv.dtype];
        assert!(
            types.iter().all(|&t| t == out.dtype) && (out.dtype == DType::F32 || self.flash(s)),
            "attention_backward: bf16 storage ({types:?}) needs all four bf16 and flash \
             attention ({s:?})"
        );
        if self.flash(s) {
            let p = (
                self.ptr(dqkv),
                self.ptr(dout),
                self.ptr(out),
                self.ptr(lse),
                self.ptr(qkv),
                self.ptr(scratch),
            );
            let (dqkv_p, dout_p, out_p, lse_p, qkv_p, delta) = p;
            let (ti, nhi, hdi, causal) = (int(t), int(nh), int(hd), s.causal as i32);
            // Each row's sum of dout * out, then dK and dV by blocks of keys, and dQ by
            // blocks of query rows (kernels.cu: flash_attention_backward_kv, _q).
            self.launch(
                &self.kernels.flash_backward_prepare[stored(out)],
                LaunchConfig {
                    grid_dim: (u32::try_from(s.batch * t).expect("rows fit a grid"), 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                },
                "attention_backward",
                &[&delta, &dout_p, &out_p, &ti, &nhi, &hdi],
            );
            let args: [&dyn Arg; 9] = [
                &dqkv_p, &dout_p, &qkv_p, &lse_p, &delta, &ti, &nhi, &hdi, &causal,
            ];
            let kernels = self.flash_kernels(hd);
            let by_type = stored(out);
            let (kv, q, stages) = match &kernels.backward_one_stage {
                Some([kv, q]) if by_type == 1 && !self.wide_gradients_in_two_stages => (kv, q, 1),
                _ => (
                    &kernels.backward_kv[by_type],
                    &kernels.backward_q[by_type],
                    flash_stages(kernels.width, by_type == 1, false, false),
                ),
            };
            let cfg = flash_launch(s, kernels.width, stages, false);
            self.launch(kv, cfg, "attention_backward", &args);
            self.launch(q, cfg, "attention_backward", &args);
            return;
        }
        let p = (
            self.ptr(dqkv),
            self.ptr(dout),
            self.ptr(out),
            self.ptr(lse),
            self.ptr(qkv),
            self.ptr(scratch),
        );
        let (dqkv_p, dout_p, out_p, lse_p, qkv_p, probs) = p;
        let dprobs = probs + (nh * t * t * 4) as u64;
        let (ti, di, hdi, causal) = (int(t), int(d), int(hd), s.causal as i32);
        let scale = 1.0 / (hd as f32).sqrt();
        let f = 4u64;
        for b in 0..s.batch {
            let seq = qkv_p + (b * t * 3 * d) as u64 * f;
            let dseq = dqkv_p + (b * t * 3 * d) as u64 * f;
            let dout_b = dout_p + (b * t * d) as u64 * f;
            let out_b = out_p + (b * t * d) as u64 * f;
            let (q, k, v) = (seq, seq + d as u64 * f, seq + 2 * d as u64 * f);
            let (dq, dk, dv) = (dseq, dseq + d as u64 * f, dseq + 2 * d as u64 * f);
            // P again, from the scores and the saved log-sum-exp.
            self.attention_scores(qkv_p, probs, s, b);
            let lse_b = lse_p + (b * nh * t) as u64 * f;
            self.launch(
                &self.kernels.attention_probs,
                per_row(nh * t),
                "attention_backward",
                &[&probs, &lse_b, &ti, &causal],
            );
            let heads = |ta, tb, m, n, k, lda, ldb, ldc, sa, sb, sc| RowMajor {
                ta,
                tb,
                m,
                n,
                k,
                lda,
                ldb,
                ldc,
                stride_a: sa,
                stride_b: sb,
                stride_c: sc,
                batch: nh,
            };
            // dP = dout V^T
            let g = heads(Op::N, Op::T, t, t, hd, d, 3 * d, t, hd, hd, t * t);
            self.f32_gemm(g, dout_b, v, dprobs, 1.0, 0.0);
            // dV = P^T dout
            let g = heads(Op::T, Op::N, t, hd, t, t, d, 3 * d, t * t, hd, hd);
            self.f32_gemm(g, probs, dout_b, dv, 1.0, 0.0);
            // dS = P (dP - rowsum(dout * out)), in place of dP
            self.launch(
                &self.kernels.attention_dscores,
                per_row(nh * t),
                "attention_backward",
                &[&dprobs, &probs, &dout_b, &out_b, &ti, &di, &hdi],
            );
            // dQ = scale dS K; dK = scale dS^T Q
            let g = heads(Op::N, Op::N, t, hd, t, t, 3 * d, 3 * d, t * t, hd, hd);
            self.f32_gemm(g, dprobs, k, dq, scale, 0.0);
            let g = heads(Op::T, Op::N, t, hd, t, t, 3 * d, 3 * d, t * t, hd, hd);
            self.f32_gemm(g, dprobs, q, dk, scale, 0.0);
        }
    }

    fn embed_step(
        &mut self,
        out: View,
        wte: View,
        wpe: View,
        sos: View,
        pos: usize,
        len: usize,
        d: usize,
    ) {
        let rows = self.n_tokens;
        assert!(
            len >= 1 && rows.is_multiple_of(len) && out.len == rows * d,
            "embed_step: sizes"
        );
        assert!(
            (pos + len) * d <= wpe.len,
            "embed_step: positions beyond the context"
        );
        let p = (
            self.ptr(out),
            self.arenas().tokens.ptr,
            self.ptr(wte),
            self.ptr(wpe),
            self.ptr(sos),
        );
        let (posi, pos_at) = self.position_args(pos);
        let (leni, di, v) = (int(len), int(d), int(wte.len / d));
        self.launch(
            &self.kernels.embed_step,
            per_row(rows),
            "embed_step",
            &[&p.0, &p.1, &p.2, &p.3, &p.4, &posi, &pos_at, &leni, &di, &v],
        );
    }

    fn attention_step(
        &mut self,
        out: View,
        k_cache: View,
        v_cache: View,
        qkv: View,
        scores: View,
        s: AttnShape,
        pos: usize,
        len: usize,
    ) {
        let (nh, hd, n_ctx) = (s.n_head, s.head_dim, s.t);
        let d = nh * hd;
        assert!(
            len >= 1 && pos + len <= n_ctx,
            "positions {pos}..{} are outside the context of {n_ctx}",
            pos + len
        );
        assert!(qkv.len == s.batch * len * 3 * d && out.len == s.batch * len * d);
        assert!(k_cache.len == s.batch * nh * n_ctx * hd && v_cache.len == k_cache.len);
        // Decoders check the context against this when they are built.
        assert!(
            n_ctx <= decode_context_limit(hd),
            "a context of {n_ctx} positions is beyond the decoding kernel"
        );
        let shared = decode_shared_bytes(n_ctx, hd);
        let p = (
            self.ptr(out),
            self.ptr(k_cache),
            self.ptr(v_cache),
            self.ptr(qkv),
        );
        // A single step of few images splits each head's keys among blocks, their partials in
        // the scores' scratch (kernels.cu: attend).
        let splits = if len == 1 {
            decode_splits(s.batch * nh, self.multiprocessors, n_ctx, hd, scores.len)
        } else {
            1
        };
        assert!(
            splits == 1 || scores.dtype == DType::F32,
            "partials are f32"
        );
        let partials = if splits > 1 { self.ptr(scores) } else { 0 };
        let cache = usize::from(k_cache.dtype == DType::Bf16);
        let attend = &self.kernels.attend[cache][stored(out)];
        let grid = ((s.batch * len) as u32, nh as u32, 1);
        let (nhi, hdi, ctx, leni) = (int(nh), int(hd), int(n_ctx), int(len));
        let (posi, pos_at) = self.position_args(pos);
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (hd.next_multiple_of(32).min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // A prefill stores every new key and value first, then attends; a single step's
        // attention stores its own position's (kernels.cu: attend), one launch fewer a layer.
        if len > 1 {
            let store = [&self.kernels.kv_store_f32, &self.kernels.kv_store_bf16][cache];
            self.launch(
                store,
                cfg,
                "attention_step",
                &[&p.1, &p.2, &p.3, &nhi, &hdi, &ctx, &posi, &pos_at, &leni],
            );
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.0, grid.1, splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        self.launch(
            attend,
            cfg,
            "attention_step",
            &[
                &p.0, &partials, &p.1, &p.2, &p.3, &nhi, &hdi, &ctx, &posi, &pos_at, &leni,
            ],
        );
        if splits > 1 {
            let cfg = LaunchConfig {
                grid_dim: grid,
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let splits = int(splits);
            self.launch(
                &self.kernels.attend_combine[stored(out)],
                cfg,
                "attention_step",
                &[&p.0, &partials, &nhi, &hdi, &splits],
            );
        }
    }

    fn gelu_forward(&mut self, out: View, x: View) {
        assert_eq!(out.len, x.len);
        let (o, xp, n) = (self.ptr(out), self.ptr(x), x.len);
        self.launch(
            &self.kernels.gelu_forward[gelu_variant(out, x.dtype, "gelu_forward")],
            elementwise(n),
            "gelu_forward",
            &[&o, &xp, &n],
        );
    }

    fn gelu_backward(&mut self, dx: View, dout: View, x: View) {
        assert!(
            dx.len == x.len && dout.len == x.len && dout.dtype == x.dtype,
            "gelu_backward: sizes or types ({dx:?}, {dout:?}, {x:?})"
        );
        assert!(
            dx == dout || !dx.overlaps(&dout),
            "gelu_backward: overlapping"
        );
        let (g, d, xp, n) = (self.ptr(dx), self.ptr(dout), self.ptr(x), x.len);
        self.launch(
            &self.kernels.gelu_backward[gelu_variant(dx, x.dtype, "gelu_backward")],
            elementwise(n),
            "gelu_backward",
            &[&g, &d, &xp, &n],
        );
    }

    fn cross_entropy(
        &mut self,
        logits: View,
        losses: View,
        v: usize,
        gradient: Option<LogitGradient>,
    ) {
        let rows = self.n_tokens;
        assert!(
            logits.len == rows * v && losses.len == rows,
            "cross_entropy: sizes"
        );
        if let Some(g) = gradient {
            assert!(
                g.out == logits || (g.out.dtype == DType::Bf16 && g.out.len == logits.len),
                "cross_entropy: the gradient goes over {logits:?} or to bf16 of its length, \
                 not {:?}",
                g.out
            );
        }
        let a = self.arenas();
        let (targets, weights) = if self.weighted {
            (a.targets.ptr, a.weights.ptr)
        } else {
            (a.tokens.ptr, 0u64)
        };
        let (z, l) = (self.ptr(logits), self.ptr(losses));
        let vi = int(v);
        let (grad, scale) = gradient.map_or((0u64, 0.0f32), |g| (self.ptr(g.out), g.scale));
        let kernel = &self.kernels.cross_entropy[gradient.map_or(0, |g| stored(g.out))];
        self.launch(
            kernel,
            per_row(rows),
            "cross_entropy",
            &[&z, &l, &targets, &weights, &vi, &grad, &scale],
        );
    }

    fn sum_squares(&self, x: View) -> f64 {
        self.not_recording("sum_squares");
        let sum = self.arenas().sum.ptr;
        self.sum_squares_into(sum, x, "sum_squares");
        let mut out = [0f64];
        // SAFETY: one f64 from the sum buffer; the copy waits for the kernel.
        ok(
            unsafe { driver::memcpy_dtoh_sync(&mut out, sum) },
            "sum_squares",
        );
        out[0]
    }

    fn set_update(&mut self, update: Update) {
        self.not_recording("set_update");
        let at = self.arenas().update_step.ptr;
        self.bind();
        // SAFETY: the buffer holds one UpdateStep. The copy is synchronous, on the default
        // stream, so an update already queued reads the step it was given.
        ok(
            unsafe { driver::memcpy_htod_sync(at, &[UpdateStep::of(update)]) },
            "set_update",
        );
        self.update_set = true;
    }

    fn clipped_update(&mut self, tensors: &[(View, bool)], grads: View) {
        assert!(self.update_set, "set_update before clipped_update");
        assert_eq!(grads.arena, Arena::Grads);
        let (norm_squared, step) = (
            self.arenas().norm_squared.ptr,
            self.arenas().update_step.ptr,
        );
        self.sum_squares_into(norm_squared, grads, "clipped_update (norm)");
        let (p, g, m, v) = {
            let a = self.arenas();
            (a.params.ptr, a.grads.ptr, a.adam_m.ptr, a.adam_v.ptr)
        };
        for chunk in tensors.chunks(ADAM_TABLE) {
            let mut table = AdamTable {
                start: [0; ADAM_TABLE],
                len: [0; ADAM_TABLE],
                decay: [0.0; ADAM_TABLE],
                count: chunk.len() as i32,
            };
            for (i, &(view, decay)) in chunk.iter().enumerate() {
                assert_eq!(view.arena, Arena::Params);
                // The same range of all four arenas: checked against the parameters'.
                self.ptr(view);
                table.start[i] = view.offset as u64;
                table.len[i] = view.len as u64;
                table.decay[i] = if decay { 1.0 } else { 0.0 };
            }
            let longest = chunk.iter().map(|(v, _)| v.len).max().unwrap_or(0);
            let cfg = LaunchConfig {
                grid_dim: (
                    longest.div_ceil(256).clamp(1, 4096) as u32,
                    chunk.len() as u32,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                &self.kernels.adamw_tensors,
                cfg,
                "clipped_update (adamw_tensors)",
                &[&p, &g, &m, &v, &table, &step, &norm_squared],
            );
        }
    }

    fn update_grad_norm(&self) -> f64 {
        self.not_recording("update_grad_norm");
        let at = self.arenas().norm_squared.ptr;
        self.bind();
        let mut out = [0f64];
        // SAFETY: one f64 from the norm buffer; the copy waits for the update.
        ok(
            unsafe { driver::memcpy_dtoh_sync(&mut out, at) },
            "update_grad_norm",
        );
        out[0].sqrt()
    }

    fn begin_recording(&mut self) -> Result<bool> {
        self.not_recording("begin_recording");
        anyhow::ensure!(
            self.arenas.is_some(),
            "a recording needs the arenas allocated first"
        );
        self.bind();
        let side = match &self.side_stream {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .ctx
                    .new_stream()
                    .map_err(|e| anyhow!("cannot make a stream to record on: {e:?}"))?;
                self.side_stream = Some(s.clone());
                s
            }
        };
        // Thread-local: only this thread's calls are captured or checked.
        let mode = driver_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        if let Err(e) = side.begin_capture(mode) {
            bail!("cannot start capturing a CUDA graph: {e:?}");
        }
        self.stream = side;
        self.recording = true;
        *self.recording_error.borrow_mut() = None;
        self.recording_reads_position.set(false);
        Ok(true)
    }

    fn end_recording(&mut self) -> Result<Recording> {
        anyhow::ensure!(self.recording, "end_recording without begin_recording");
        self.bind();
        let side = std::mem::replace(&mut self.stream, self.default_stream.clone());
        self.recording = false;
        let ended = side.end_capture(driver_sys::CUgraphInstantiate_flags(0));
        if let Some(e) = self.recording_error.borrow_mut().take() {
            bail!("a call could not be recorded: {e}");
        }
        let graph = ended
            .map_err(|e| anyhow!("capturing a CUDA graph failed: {e:?}"))?
            .ok_or_else(|| anyhow!("the recording is empty"))?;
        let index = match self.graphs.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.graphs.push(None);
                self.graphs.len() - 1
            }
        };
        let id = self.next_recording;
        self.next_recording += 1;
        self.graphs[index] = Some((id, graph, self.recording_reads_position.get()));
        Ok(Recording { index, id })
    }

    fn replay(&mut self, recording: Recording, pos: usize) -> Result<()> {
        self.not_recording("replay");
        let (_, graph, reads_position) = self
            .graphs
            .get(recording.index)
            .and_then(Option::as_ref)
            .filter(|(id, _, _)| *id == recording.id)
            .ok_or_else(|| anyhow!("recording {recording:?} is gone (forgotten or re-planned)"))?;
        let pos = i32::try_from(pos).map_err(|_| anyhow!("position {pos} is beyond i32"))?;
        let at = self.arenas().position.ptr;
        self.bind();
        // SAFETY: the position buffer holds one i32. The write is ordered on the default
        // stream before the graph, launched there; the graph's kernels read only this
        // backend's arenas, alive while the graph is (`allocate` drops graphs first).
        unsafe {
            // Written by the stream itself, with the value given now: the host waits for
            // nothing, so steps that draw their own tokens queue back to back.
            if *reads_position {
                driver_sys::cuMemsetD32Async(at, pos as u32, 1, self.default_stream.cu_stream())
                    .result()
                    .map_err(|e| anyhow!("cannot set the replayed position: {e:?}"))?;
            }
            driver::graph::launch(graph.cu_graph_exec(), self.default_stream.cu_stream())
                .map_err(|e| anyhow!("replaying a CUDA graph failed: {e:?}"))?;
        }
        Ok(())
    }

    fn forget(&mut self, recording: Recording) {
        let kept = self.graphs.get(recording.index).and_then(Option::as_ref);
        if kept.is_some_and(|(id, _, _)| *id == recording.id) {
            self.bind();
            self.graphs[recording.index] = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_without_a_driver_is_an_error_that_says_what_is_missing() {
        let gpu = Gpu {
            ordinal: 0,
            products: Precision::F32,
        };
        match probe() {
            Ok(_) => assert!(CudaBackend::open(gpu).is_ok()),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("CUDA") || e.contains("cuBLAS"), "{e}");
                let opened = CudaBackend::open(gpu).err().expect("no driver, no backend");
                assert_eq!(opened.to_string(), e);
            }
        }
    }

    #[test]
    fn the_content_gradients_chunks_cover_the_rows_within_the_planned_scratch() {
        for rows in (1..=20_000).chain([32_768, 65_536, 1 << 20]) {
            let (chunk_rows, chunks) = content_chunks(rows);
            assert!(chunk_rows >= 256, "{rows} rows: chunks of {chunk_rows}");
            assert!(
                (chunks - 1) * chunk_rows < rows && rows <= chunks * chunk_rows,
                "{rows}"
            );
            assert!(
                chunks <= max_content_chunks(rows),
                "{rows} rows: {chunks} chunks"
            );
            // The scratch is planned for the most rows; any fewer fit in it.
            assert!(chunks <= max_content_chunks(rows + 1000), "{rows}");
        }
        assert_eq!(content_chunks(32_768), (2_048, 16));
        assert_eq!(content_chunks(512), (256, 2));
        assert_eq!(max_content_chunks(100), 1);
    }

    #[test]
    fn the_adam_table_has_the_kernels_layout() {
        // Passed by value: the PTX parameter's size and alignment must be the struct's.
        let size = std::mem::size_of::<AdamTable>();
        assert_eq!((size, std::mem::align_of::<AdamTable>()), (1288, 8));
        for ptx in [PTX_SM80, PTX_SM90] {
            assert!(ptx.contains(&format!(
                ".param .align 8 .b8 adamw_tensors_param_4[{size}]"
            )));
        }
    }

    /// The instructions of `ptx`, one a line, a guarding predicate (`@%p1 `) removed.
    fn instructions(ptx: &str) -> impl Iterator<Item = &str> {
        ptx.lines()
            .map(str::trim)
            .map(|l| match l.strip_prefix('@') {
                Some(guarded) => guarded.split_once(char::is_whitespace).map_or("", |x| x.1),
                None => l,
            })
    }

    /// Floating-point atomic adds of `ptx` (`atom` or `red` of any float type: f16, bf16 and
    /// their pairs, f32, f64), as lines.
    fn float_atomics(ptx: &str) -> Vec<&str> {
        instructions(ptx)
            .filter(|l| l.starts_with("atom.") || l.starts_with("red."))
            .filter(|l| {
                [".f16", ".bf16", ".f32", ".f64"]
                    .iter()
                    .any(|t| l.contains(t))
            })
            .collect()
    }

    #[test]
    fn the_decoding_context_limit_is_the_longest_that_fits_shared_memory() {
        for head_dim in [12, 16, 64, 96, 128, 256, 300, 1100] {
            let limit = decode_context_limit(head_dim);
            // The kernel's dynamic shared memory plus its 32 floats of static scratch.
            assert!(decode_shared_bytes(limit, head_dim) + 128 <= 48 * 1024);
            assert!(decode_shared_bytes(limit + 1, head_dim) + 128 > 48 * 1024);
            assert!(limit >= 64 * 64, "iGPT's longest context, 64x64, decodes");
        }
    }

    #[test]
    fn a_decoding_step_of_few_images_splits_its_keys_as_far_as_runs_and_scratch_allow() {
        // iGPT-S (8 heads of 64, 1024 positions) on an H200's 132 multiprocessors, the scratch
        // the decoder plans (images x heads x positions floats).
        let splits = |images: usize| decode_splits(images * 8, 132, 1024, 64, images * 8 * 1024);
        // One image: 33 runs would give two blocks per multiprocessor; 15 partials of 66
        // floats fill the scratch of 1024.
        assert_eq!(splits(1), 15);
        assert_eq!(splits(4), 9);
        assert_eq!(splits(16), 3);
        assert_eq!(splits(17), 2);
        assert_eq!(splits(32), 2);
        // 33 images and more: enough blocks without splitting.
        assert_eq!(splits(33), 1);
        assert_eq!(splits(64), 1);
        // Runs of at least 64 keys of the full context: none for 64 positions, 2 for 128.
        assert_eq!(decode_splits(2, 132, 64, 16, 1 << 20), 1);
        assert_eq!(decode_splits(2, 132, 128, 16, 1 << 20), 2);
        // The kernels' bound.
        assert_eq!(
            decode_splits(1, 132, 1 << 16, 16, 1 << 30),
            MAX_DECODE_SPLITS
        );
        let kernels = include_str!("kernels.cu");
        assert!(kernels.contains(&format!("kMaxDecodeSplits = {MAX_DECODE_SPLITS};")));
    }

    #[test]
    fn no_kernel_adds_floats_with_atomics() {
        // Sums across blocks are written as parts and added in a fixed order, so a training
        // step gives the same bits on every run (README, "The same bits on every run").
        for ptx in [PTX_SM80, PTX_SM90] {
            assert_eq!(float_atomics(ptx), Vec::<&str>::new());
        }
        // What the build before that looked like, guarded or not, and a 16-bit pair.
        let before = "\tatom.global.add.f32 \t%f2, [%rd32], %f1;\n\
                      \t@%p3 red.global.add.f64 \t[%rd15], %fd7;\n\
                      \tatom.global.cas.b32 \t%r1, [%rd2], %r3, %r4;\n\
                      \tred.global.add.noftz.bf16x2 \t[%rd9], %r5;\n\
                      \tld.shared.f32 \t%f41, [%r36];\n";
        assert_eq!(
            float_atomics(before).len(),
            3,
            "{:?}",
            float_atomics(before)
        );
    }

    #[test]
    fn the_embedded_ptx_has_every_kernel_for_both_targets() {
        for (ptx, target) in [(PTX_SM80, ".target sm_80"), (PTX_SM90, ".target sm_90")] {
            assert!(ptx.contains(target));
            assert!(ptx.contains(".version 9.0"), "PTX must come from nvcc 13.0");
            for name in [
                "fill_f32",
                "fill_bf16",
                "round_bf16",
                "pack_weight",
                "embed_forward",
                "embed_backward_positions",
                "embed_backward_content",
                "embed_content_sums",
                "embed_step",
                "rmsnorm_forward",
                "rmsnorm_forward_bf16",
                "rmsnorm_backward",
                "rmsnorm_backward_from_bf16",
                "gelu_forward",
                "gelu_forward_bf16",
                "gelu_backward",
                "gelu_backward_bf16",
                "gelu_forward_from_bf16",
                "gelu_backward_from_bf16",
                "cross_entropy",
                "cross_entropy_bf16",
                "sum_squares",
                "sum_partials",
                "add_column_sums",
                "adamw_tensors",
                "attention_softmax",
                "attention_probs",
                "attention_dscores",
                "kv_store_f32",
                "kv_store_bf16",
                "attend_f32",
                "attend_bf16",
                "attend_f32_to_bf16",
                "attend_bf16_to_bf16",
                "attend_combine_f32",
                "attend_combine_to_bf16",
                "flash_attention_forward_64",
                "flash_attention_forward_128",
                "flash_attention_forward_64_bf16",
                "flash_attention_forward_128_bf16",
                "flash_attention_backward_prepare",
                "flash_attention_backward_prepare_bf16",
                "flash_attention_backward_kv_64",
                "flash_attention_backward_kv_128",
                "flash_attention_backward_kv_64_bf16",
                "flash_attention_backward_kv_128_bf16",
                "flash_attention_backward_q_64",
                "flash_attention_backward_q_128",
                "flash_attention_backward_q_64_bf16",
                "flash_attention_backward_q_128_bf16",
                "flash_attention_backward_kv_128_bf16_one_stage",
                "flash_attention_backward_q_128_bf16_one_stage",
                "draw_tokens",
            ] {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{target}: {name} missing"
                );
            }
        }
    }

    /// The PTX of kernel `name`, from its `.entry` to its closing brace.
    fn kernel_body<'a>(ptx: &'a str, name: &str) -> &'a str {
        let start = ptx
            .find(&format!(".entry {name}("))
            .unwrap_or_else(|| panic!("{name} missing"));
        let body = &ptx[start..];
        &body[..body.find("\n}").map_or(body.len(), |e| e + 2)]
    }

    /// Instructions of kernel `name` in `ptx` that would make its float arithmetic differ from
    /// the CPU's: a fused multiply-add (`fma`, `mad`: one rounding for two operations), a float
    /// min or max (which return the other operand for a NaN, where the CPU's comparisons keep
    /// it), predicated or not; and any call, whose callee this does not read.
    fn unlike_the_cpu<'a>(ptx: &'a str, name: &str) -> Vec<&'a str> {
        instructions(kernel_body(ptx, name))
            .filter(|l| {
                let float = [".f16", ".bf16", ".f32", ".f64"]
                    .iter()
                    .any(|t| l.contains(t));
                l.starts_with("fma.")
                    || (l.starts_with("mad.") && float)
                    || ((l.starts_with("max.") || l.starts_with("min.")) && float)
                    || l.starts_with("call")
            })
            .collect()
    }

    #[test]
    fn the_draw_kernel_rounds_each_operation_as_the_cpu_does() {
        // README, "Tokens drawn on the device": the same colour as the CPU for the same logits.
        for ptx in [PTX_SM80, PTX_SM90] {
            assert_eq!(unlike_the_cpu(ptx, "draw_tokens"), Vec::<&str>::new());
        }
        let fused = ".entry draw_tokens(\n\tmul.rn.f32 \t%f1, %f2, %f3;\n\tfma.rn.f32 \t%f4, %f1, \
                     %f5, %f6;\n\tmax.f32 \t%f7, %f4, %f8;\n\t@%p1 mad.rn.f32 \t%f1;\n\
                     \tmax.NaN.f32 \t%f2;\n\tmax.s32 \t%r1, %r2, %r3;\n\tmad.lo.s32 \t%r4;\n\
                     \tcall.uni (retval0), walk, (param0);\n}\n.entry other(\n\tfma.rn.f32 \t%f9;\n}";
        assert_eq!(unlike_the_cpu(fused, "draw_tokens").len(), 5);
    }

    #[test]
    fn wide_gradient_kernels_run_in_two_stages_where_two_blocks_of_them_fit() {
        // 64 KiB a block in two stages, 48 KiB in one; 1 KiB reserved per block.
        assert_eq!(flash_shared_bytes(128, 2, false), 64 * 1024);
        assert_eq!(flash_shared_bytes(128, 1, false), 48 * 1024);
        // H100 and H200 (228 KiB a multiprocessor), A100 (164 KiB): two blocks of 65 KiB fit.
        assert!(wide_gradients_in_two_stages(228 * 1024));
        assert!(wide_gradients_in_two_stages(164 * 1024));
        // sm_86, sm_89 and sm_120 (100 KiB): one would, so one stage (two blocks of 49 KiB).
        assert!(!wide_gradients_in_two_stages(100 * 1024));
        assert!(2 * (flash_shared_bytes(128, 1, false) + 1024) <= 100 * 1024);
    }

    #[test]
    fn the_flash_kernels_read_shared_memory_only_through_ldmatrix() {
        // README, "Kernels": operands read from shared memory by `ldmatrix`, products on
        // `mma.sync`, scores and probabilities in registers (no other shared load, and shared
        // stores only the 16-byte stores that fill the tiles, and the bf16 kernels' copies).
        for ptx in [PTX_SM80, PTX_SM90] {
            for kernel in ["forward", "backward_kv", "backward_q"] {
                let one_stage = (kernel != "forward").then_some("128_bf16_one_stage");
                let widths = ["64", "128", "64_bf16", "128_bf16"]
                    .into_iter()
                    .chain(one_stage);
                for width in widths {
                    let name = format!("flash_attention_{kernel}_{width}");
                    let ops: Vec<&str> = instructions(kernel_body(ptx, &name)).collect();
                    let count = |prefix: &str| ops.iter().filter(|l| l.starts_with(prefix)).count();
                    assert!(count("ldmatrix.sync.aligned.m8n8.x4") > 0, "{name}");
                    assert!(count("mma.sync.aligned.m16n8k16") > 0, "{name}");
                    assert_eq!(count("ld.shared"), 0, "{name}");
                    assert_eq!(count("st.shared"), count("st.shared.v4"), "{name}");
                    assert_eq!(count("wmma"), 0, "{name}");
                    // bf16 tiles are copied without passing through registers, f32 ones
                    // rounded on the way.
                    let bf16 = width.contains("bf16");
                    let copies = count("cp.async.cg.shared.global") > 0;
                    assert_eq!(copies, bf16, "{name}");
                    assert_eq!(count("cp.async.wait_group") > 0, bf16, "{name}");
                    // Nothing in local memory (a tile chosen by indexing an array would be).
                    assert_eq!(count("ld.local") + count("st.local"), 0, "{name}");
                    // Two stages (flash_shared_bytes) wait for all but the next step's copies.
                    let two_stages = bf16
                        && !(kernel == "forward" && width.starts_with("128"))
                        && !width.ends_with("one_stage");
                    assert_eq!(count("cp.async.wait_group 1") > 0, two_stages, "{name}");
                }
            }
            // The decoding kernels read rows 16 bytes at a time, and never through the
            // non-coherent path: a single step's block reads back the row it stored.
            for name in [
                "attend_f32",
                "attend_bf16",
                "attend_f32_to_bf16",
                "attend_bf16_to_bf16",
            ] {
                let loads: Vec<&str> = instructions(kernel_body(ptx, name))
                    .filter(|l| l.starts_with("ld.global"))
                    .collect();
                assert!(
                    loads.iter().any(|l| l.starts_with("ld.global.v4")),
                    "{name}"
                );
                assert!(!loads.iter().any(|l| l.contains(".nc")), "{name}");
            }
        }
    }
}
