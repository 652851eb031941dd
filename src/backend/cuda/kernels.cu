// igpt's CUDA kernels: everything of the backend trait but the matrix products (cuBLAS).
// Compiled to PTX by scripts/build_ptx.sh; the PTX is committed and embedded in the binary.
// Every kernel but flash attention is plain f32 arithmetic, with bfloat16 only as storage
// (u16 bits); flash attention multiplies bf16 tiles on the tensor cores (mma.sync, in inline
// PTX). Under g++ (tests/cuda_host) the shim stands in for CUDA's built-ins and emulates the
// inline PTX.

#include <stdint.h>

typedef unsigned short bf16_bits;

// Round to nearest even, as the CPU backend rounds; NaN stays NaN.
__device__ __forceinline__ bf16_bits to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_bits)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_bits)(u >> 16);
}

__device__ __forceinline__ float from_bf16(bf16_bits h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Storage-type conversions for the kernels templated on the cache type.
__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16_bits* p, size_t i) { return from_bf16(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16_bits* p, size_t i, float v) { p[i] = to_bf16(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `shared` holds 32 floats; the leading barrier lets a caller reuse it back to back.
__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : -INFINITY;
    return warp_max(v);
}

// ---------------------------------------------------------------------------------------
// Memory

extern "C" __global__ void fill_f32(float* x, float value, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = value;
}

extern "C" __global__ void fill_bf16(bf16_bits* x, float value, size_t n) {
    bf16_bits v = to_bf16(value);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = v;
}

// Rounds `n` floats to bfloat16 (the input of a product with packed weights).
extern "C" __global__ void round_bf16(bf16_bits* out, const float* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = to_bf16(x[i]);
}

// A `[k, n]` weight (or `[n, k]` when `transposed`) as row-major `[k, n]` bfloat16.
extern "C" __global__ void pack_weight(bf16_bits* out, const float* w, int transposed, int k,
                                       int n) {
    size_t total = (size_t)k * n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / n, c = i % n;
        out[i] = to_bf16(transposed ? w[c * k + r] : w[i]);
    }
}

// ---------------------------------------------------------------------------------------
// Embedding. One block per output row; ids outside the table give a zero content row (the
// host checks ids before they get here).

__device__ __forceinline__ const float* content_row(int id, int n_vocab, const float* wte,
                                                    const float* sos, int d) {
    if (id >= 0 && id < n_vocab) return wte + (size_t)id * d;
    if (id == n_vocab) return sos;
    return nullptr;
}

// Shifted (autoregressive): position 0 is the start token, position t the id at t - 1.
// Direct: the ids as given (n_vocab: start token, n_vocab + 1: masked, no content).
extern "C" __global__ void embed_forward(float* out, const uint16_t* ids, const float* wte,
                                         const float* wpe, const float* sos, int t_len, int d,
                                         int n_vocab, int direct) {
    int row = blockIdx.x, t = row % t_len;
    const float* content;
    if (direct) content = content_row(ids[row], n_vocab, wte, sos, d);
    else content = t == 0 ? sos : content_row(ids[row - 1], n_vocab, wte, sos, d);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = wpe[(size_t)t * d + c];
        if (content) v += content[c];
        out[(size_t)row * d + c] = v;
    }
}

// Position gradients: dwpe[t] += sum over the batch of dout[b, t]. Grid (t_len, ceil(d/256)).
extern "C" __global__ void embed_backward_positions(float* dwpe, const float* dout, int batch,
                                                    int t_len, int d) {
    int t = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float s = 0.0f;
    for (int b = 0; b < batch; b++) s += dout[((size_t)b * t_len + t) * d + c];
    dwpe[(size_t)t * d + c] += s;
}

// The content row a row of the batch takes its gradient to: an id of the table, n_vocab for
// the start token, -1 for none. Shifted: position 0 is the start token, position t the id
// at t - 1; direct: the ids as given (n_vocab + 1, masked, and ids past it: none).
__device__ __forceinline__ int content_of(const uint16_t* ids, int row, int t_len, int n_vocab,
                                          int direct) {
    int id;
    if (direct) {
        id = ids[row];
        return id <= n_vocab ? id : -1;
    }
    if (row % t_len == 0) return n_vocab;
    id = ids[row - 1];
    return id < n_vocab ? id : -1;
}

// Content gradients, in two kernels so that a common colour (a background) is summed by many
// blocks, and without atomic adds, so the sum is the same on every run. First, block (v, y, z)
// sums, in row order, the dout rows of chunk z (rows z * chunk_rows onwards) that take their
// content from row v (n_vocab: the start token), over 256 columns, into partials[z][v], and
// found[z][v] says whether any row did. Grid (n_vocab + 1, ceil(d / 256), chunks), block 256
// threads, one column each. Each warp tests 32 rows at once and reads the matching ones up to 8
// at a time before adding them in order, so matches are not read one memory latency after
// another.
extern "C" __global__ void embed_backward_content(float* partials, unsigned char* found,
                                                  const float* dout, const uint16_t* ids,
                                                  int rows, int chunk_rows, int t_len, int d,
                                                  int n_vocab, int direct) {
    const int v = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31;
    const int first = blockIdx.z * chunk_rows, end = min(rows, first + chunk_rows);
    float s = 0.0f;
    bool any = false;
    for (int base = first; base < end; base += 32) {
        int row = base + lane;
        bool match = row < end && content_of(ids, row, t_len, n_vocab, direct) == v;
        unsigned hits = __ballot_sync(0xffffffffu, match);
        any = any || hits != 0;
        while (hits) {
            int r[8];
            float g[8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                r[k] = hits ? base + __ffs(hits) - 1 : -1;
                hits &= hits - 1;
            }
#pragma unroll
            for (int k = 0; k < 8; k++) g[k] = r[k] >= 0 && c < d ? dout[(size_t)r[k] * d + c] : 0.0f;
#pragma unroll
            for (int k = 0; k < 8; k++)
                if (r[k] >= 0) s += g[k];
        }
    }
    size_t slot = (size_t)blockIdx.z * (n_vocab + 1) + v;
    if (any && c < d) partials[slot * d + c] = s;
    if (blockIdx.y == 0 && threadIdx.x == 0) found[slot] = any;
}

// Then each content row adds its chunks' sums in chunk order into its gradient (dwte's row v,
// or dsos), leaving rows no token took untouched. Grid (n_vocab + 1, ceil(d / 256)), 256
// threads. With one chunk the sum is the first kernel's, bit for bit.
extern "C" __global__ void embed_content_sums(float* dwte, float* dsos, const float* partials,
                                              const unsigned char* found, int chunks, int d,
                                              int n_vocab) {
    const int v = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float s = 0.0f;
    bool any = false;
    for (int z = 0; z < chunks; z++) {
        size_t slot = (size_t)z * (n_vocab + 1) + v;
        if (!found[slot]) continue;
        float p = partials[slot * d + c];
        s = any ? s + p : p;
        any = true;
    }
    if (any) (v < n_vocab ? dwte + (size_t)v * d : dsos)[c] += s;
}

// The first position a decoding kernel handles: `pos`, or, where `pos_at` is set, the int
// there, read when the kernel runs. A step recorded once as a CUDA graph and replayed at every
// position takes its position from device memory this way; its launch arguments are frozen.
__device__ __forceinline__ int first_position(int pos, const int* pos_at) {
    return pos_at ? *pos_at : pos;
}

// Decoding inputs of positions pos..pos+len: row r is (p == 0 ? sos : wte[prev[r]]) + wpe[p]
// with p = pos + r % len (pos: see first_position).
extern "C" __global__ void embed_step(float* out, const uint16_t* prev, const float* wte,
                                      const float* wpe, const float* sos, int pos,
                                      const int* pos_at, int len, int d, int n_vocab) {
    int row = blockIdx.x, p = first_position(pos, pos_at) + row % len;
    const float* content = p == 0 ? sos : content_row(prev[row], n_vocab, wte, sos, d);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = wpe[(size_t)p * d + c];
        if (content) v += content[c];
        out[(size_t)row * d + c] = v;
    }
}

// ---------------------------------------------------------------------------------------
// RMS norm: out = x * rsqrt(mean(x^2) + eps) * g, one warp per row, blockDim.x / 32 rows a
// block: a row's sum needs only the warp's shuffles, no block barrier, and a block of one row
// (at d = 512, two values a thread) would wait on its loads with most of its threads idle.
// Each lane loads a chunk of its columns (kNormChunk, 32 apart) into registers before using
// any, so that their loads can be in flight together (a row of 512 is one chunk). Columns
// past d add 0 to the sum of squares: the bits are those of a lane's loop over its columns
// alone.
// The _bf16 kernel stores out rounded to bfloat16 (for a product that would round it anyway).
// The pointers are restricted: the engine never normalizes in place.
constexpr int kNormChunk = 16;

template <typename O>
__device__ void rmsnorm_rows(O* __restrict__ out, float* __restrict__ rstd,
                             const float* __restrict__ x, const float* __restrict__ g, int rows,
                             int d, float eps) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // A whole warp leaves together, and no barrier follows.
    if (row >= (size_t)rows) return;
    const float* xr = x + row * d;
    float s = 0.0f;
    for (int base = lane; base < d; base += 32 * kNormChunk) {
        float v[kNormChunk];
#pragma unroll
        for (int k = 0; k < kNormChunk; k++) {
            const int c = base + 32 * k;
            v[k] = c < d ? xr[c] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kNormChunk; k++) s += v[k] * v[k];
    }
    s = warp_sum(s);
    const float r = rsqrtf(s / d + eps);
    for (int base = lane; base < d; base += 32 * kNormChunk) {
        float v[kNormChunk], gain[kNormChunk];
#pragma unroll
        for (int k = 0; k < kNormChunk; k++) {
            const int c = base + 32 * k;
            v[k] = c < d ? xr[c] : 0.0f;
            gain[k] = c < d ? g[c] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kNormChunk; k++) {
            const int c = base + 32 * k;
            if (c < d) store(out, row * d + c, v[k] * r * gain[k]);
        }
    }
    if (lane == 0) rstd[row] = r;
}

extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* x,
                                           const float* g, int rows, int d, float eps) {
    rmsnorm_rows(out, rstd, x, g, rows, d, eps);
}

extern "C" __global__ void rmsnorm_forward_bf16(bf16_bits* out, float* rstd, const float* x,
                                                const float* g, int rows, int d, float eps) {
    rmsnorm_rows(out, rstd, x, g, rows, d, eps);
}

// The backward pass in one read of dout and x: dx += rstd * (dout*g - xhat * mean(dout*g*xhat)),
// xhat = x * rstd, and the gain's gradient as partial sums, partials[y, c] = the sum over the
// block's rows of dout * x * rstd, which add_column_sums adds into dg in order (no atomic
// adds). Grid (ceil(rows / rows_per_block), ceil(d / 2048)), 256 threads: block (x, y) takes
// rows x * rows_per_block on, one at a time, and columns 2048 y .. 2048 y + 2047 of them
// (eight a thread, their gain sums in registers); each row's mean needs the whole row, which
// every column block reads.
// With `rounded` (else null), each final dx is also stored there rounded to bf16, for the
// bf16 products that read the residual stream's gradient next. The _from_bf16 kernel reads a
// bf16 dout (bf16 training's products store the norm output's gradient so).
// The block the backward kernels are launched with (mod.rs: ROW_THREADS). A constant, so that
// a thread's columns lie at fixed offsets from one address. The kernels are bounded to 64
// registers, four blocks a multiprocessor (1,024 threads, as before the columns were loaded
// ahead): nvcc would take 84 and 104, two blocks, half the loads in flight. In the SASS the
// f32 kernel then spills 132 bytes; the bf16-reading one, which bf16 training runs for every
// block norm, spills none.
constexpr int kNormBackwardThreads = 256;

template <typename D>
__device__ void rmsnorm_gradient(float* dx, bf16_bits* rounded, float* partials, const D* dout,
                                 const float* x, const float* rstd, const float* g, int rows,
                                 int d, int rows_per_block) {
    constexpr int kCols = 8;
    __shared__ float shared[32];
    const int c0 = blockIdx.y * kCols * kNormBackwardThreads + threadIdx.x;
    const int r0 = blockIdx.x * rows_per_block, r1 = min(rows, r0 + rows_per_block);
    float gain[kCols];
#pragma unroll
    for (int k = 0; k < kCols; k++) gain[k] = 0.0f;
    for (int row = r0; row < r1; row++) {
        const float* xr = x + (size_t)row * d;
        const D* dr = dout + (size_t)row * d;
        // The thread's columns of the row, all loaded before any is used, so that their loads
        // wait on memory together rather than one column after another and after the block's
        // barriers.
        float dv[kCols], gv[kCols], xv[kCols], before[kCols];
#pragma unroll
        for (int k = 0; k < kCols; k++) {
            const int c = c0 + k * kNormBackwardThreads;
            const bool in = c < d;
            dv[k] = in ? load(dr, c) : 0.0f;
            gv[k] = in ? g[c] : 0.0f;
            xv[k] = in ? xr[c] : 0.0f;
            before[k] = in ? dx[(size_t)row * d + c] : 0.0f;
        }
        float r = rstd[row];
        float s = 0.0f;
        if (blockIdx.y == 0 && kCols * kNormBackwardThreads >= d) {
            // The row fits one block's columns: the thread's are then all of its columns of
            // the row, added in the order the loop below takes them.
#pragma unroll
            for (int k = 0; k < kCols; k++)
                if (c0 + k * kNormBackwardThreads < d) s += dv[k] * gv[k] * xv[k];
        } else {
            for (int c = threadIdx.x; c < d; c += kNormBackwardThreads)
                s += load(dr, c) * g[c] * xr[c];
        }
        float mean = block_sum(s, shared) * r / d;
#pragma unroll
        for (int k = 0; k < kCols; k++) {
            int c = c0 + k * kNormBackwardThreads;
            if (c < d) {
                const size_t i = (size_t)row * d + c;
                const float sum = before[k] + r * (dv[k] * gv[k] - xv[k] * r * mean);
                dx[i] = sum;
                if (rounded) rounded[i] = to_bf16(sum);
                gain[k] += dv[k] * xv[k] * r;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < kCols; k++) {
        int c = c0 + k * kNormBackwardThreads;
        if (c < d) partials[(size_t)blockIdx.x * d + c] = gain[k];
    }
}

extern "C" __global__ void __launch_bounds__(kNormBackwardThreads, 4) rmsnorm_backward(
    float* dx, bf16_bits* rounded, float* partials, const float* dout, const float* x,
    const float* rstd, const float* g, int rows, int d, int rows_per_block) {
    rmsnorm_gradient(dx, rounded, partials, dout, x, rstd, g, rows, d, rows_per_block);
}

extern "C" __global__ void __launch_bounds__(kNormBackwardThreads, 4) rmsnorm_backward_from_bf16(
    float* dx, bf16_bits* rounded, float* partials, const bf16_bits* dout, const float* x,
    const float* rstd, const float* g, int rows, int d, int rows_per_block) {
    rmsnorm_gradient(dx, rounded, partials, dout, x, rstd, g, rows, d, rows_per_block);
}

// dst[c] += the sum over k of partials[k, c] (`count` rows of `n` columns), added in the same
// order on every run. Grid ceil(n / 32), block 1024 threads: 32 slices of the rows for each of
// 32 columns, whose sums are added in slice order.
extern "C" __global__ void add_column_sums(float* dst, const float* partials, int count, int n) {
    __shared__ float slices[32][33];  // padded: a column's slices sit in different banks
    const int col = threadIdx.x & 31, slice = threadIdx.x >> 5, slices_n = blockDim.x >> 5;
    const int c = blockIdx.x * 32 + col;
    float s = 0.0f;
    if (c < n) {
#pragma unroll 8
        for (int k = slice; k < count; k += slices_n) s += partials[(size_t)k * n + c];
    }
    slices[slice][col] = s;
    __syncthreads();
    if (slice == 0 && c < n) {
        float total = slices[0][col];
        for (int k = 1; k < slices_n; k++) total += slices[k][col];
        dst[c] += total;
    }
}

// ---------------------------------------------------------------------------------------
// Quick GELU: x * sigmoid(1.702 x). The _bf16 kernel stores it rounded to bfloat16; the
// _from_bf16 kernel reads a bf16 pre-activation too (bf16 training stores it so).

template <typename O, typename I>
__device__ void gelu_elements(O* out, const I* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = load(x, i);
        store(out, i, v / (1.0f + expf(-1.702f * v)));
    }
}

extern "C" __global__ void gelu_forward(float* out, const float* x, size_t n) {
    gelu_elements(out, x, n);
}

extern "C" __global__ void gelu_forward_bf16(bf16_bits* out, const float* x, size_t n) {
    gelu_elements(out, x, n);
}

extern "C" __global__ void gelu_forward_from_bf16(bf16_bits* out, const bf16_bits* x,
                                                  size_t n) {
    gelu_elements(out, x, n);
}

// dx = dout * gelu'(x). The f32 kernel may write over dout (each element is read, then
// written, by one thread); the _bf16 kernel stores the gradient rounded for bf16 products,
// and the _from_bf16 kernel does so from a bf16 dout and x.
template <typename O, typename I>
__device__ void gelu_gradient(O* dx, const I* dout, const I* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = load(x, i), s = 1.0f / (1.0f + expf(-1.702f * v));
        store(dx, i, load(dout, i) * (s + 1.702f * v * s * (1.0f - s)));
    }
}

extern "C" __global__ void gelu_backward(float* dx, const float* dout, const float* x,
                                         size_t n) {
    gelu_gradient(dx, dout, x, n);
}

extern "C" __global__ void gelu_backward_bf16(bf16_bits* dx, const float* dout, const float* x,
                                              size_t n) {
    gelu_gradient(dx, dout, x, n);
}

extern "C" __global__ void gelu_backward_from_bf16(bf16_bits* dx, const bf16_bits* dout,
                                                   const bf16_bits* x, size_t n) {
    gelu_gradient(dx, dout, x, n);
}

// ---------------------------------------------------------------------------------------
// Softmax cross-entropy over the palette, one block per row. With a `grad` buffer, it
// receives grad_scale * weight * (softmax - onehot): the f32 kernel's is `logits` itself or
// null (no gradient); the _bf16 kernel's is apart from the logits, stored rounded for the
// head's bf16 products. `weights` may be null (weight 1).
template <typename G>
__device__ void softmax_loss_row(const float* logits, float* losses, const uint16_t* targets,
                                 const float* weights, int v, G* grad, float grad_scale) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    const float* z = logits + row * v;
    int target = targets[row];
    float m = -INFINITY;
    for (int c = threadIdx.x; c < v; c += blockDim.x) m = fmaxf(m, z[c]);
    m = block_max(m, shared);
    float s = 0.0f;
    for (int c = threadIdx.x; c < v; c += blockDim.x) s += expf(z[c] - m);
    s = block_sum(s, shared);
    float w = weights ? weights[row] : 1.0f;
    float zt = target < v ? z[target] : 0.0f;
    __syncthreads();
    if (threadIdx.x == 0) losses[row] = (m + logf(s) - zt) * w;
    if (grad) {
        float k = grad_scale * w;
        // Each element is read, then written, by one thread: in place is safe.
        for (int c = threadIdx.x; c < v; c += blockDim.x)
            store(grad, row * v + c, k * (expf(z[c] - m) / s - (c == target ? 1.0f : 0.0f)));
    }
}

extern "C" __global__ void cross_entropy(const float* logits, float* losses,
                                         const uint16_t* targets, const float* weights, int v,
                                         float* grad, float grad_scale) {
    softmax_loss_row(logits, losses, targets, weights, v, grad, grad_scale);
}

extern "C" __global__ void cross_entropy_bf16(const float* logits, float* losses,
                                              const uint16_t* targets, const float* weights,
                                              int v, bf16_bits* grad, float grad_scale) {
    softmax_loss_row(logits, losses, targets, weights, v, grad, grad_scale);
}

// ---------------------------------------------------------------------------------------
// Optimizer and norms

// Up to 64 parameter tensors updated by one launch: element ranges of the arenas, and
// whether weight decay applies. Passed by value (1,288 bytes of kernel parameters).
#define ADAM_TABLE 64
struct AdamTable {
    unsigned long long start[ADAM_TABLE];
    unsigned long long len[ADAM_TABLE];
    float decay[ADAM_TABLE];
    int count;
};

// The step an update takes, read from device memory when the kernel runs (so a recorded
// update replays with each step's values). Written by the host before each update.
struct UpdateStep {
    float lr, beta1, beta2, eps, wd, grad_scale, bc1, bc2;
    // Largest global gradient norm; 0: no clipping.
    float clip;
};

// AdamW on every tensor of `table`, the gradient multiplied by grad_scale and by the factor
// that clips the global norm sqrt(*norm_squared) to `clip` (the host's clip_factor). Grid
// (blocks, table.count): blockIdx.y picks the tensor, the x blocks stride over it.
extern "C" __global__ void adamw_tensors(float* p, const float* g, float* m, float* v,
                                         AdamTable table, const UpdateStep* step,
                                         const double* norm_squared) {
    int t = blockIdx.y;
    if (t >= table.count) return;
    const UpdateStep h = *step;
    float clip_factor = 1.0f;
    double norm = sqrt(*norm_squared);
    if (h.clip > 0.0f && norm > (double)h.clip) clip_factor = (float)((double)h.clip / norm);
    float scale = h.grad_scale * clip_factor;
    size_t start = table.start[t], n = table.len[t];
    float decay = table.decay[t] * h.wd;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t k = start + i;
        float gi = g[k] * scale;
        float mi = h.beta1 * m[k] + (1.0f - h.beta1) * gi;
        float vi = h.beta2 * v[k] + (1.0f - h.beta2) * gi * gi;
        m[k] = mi;
        v[k] = vi;
        p[k] -= h.lr * ((mi / h.bc1) / (sqrtf(vi / h.bc2) + h.eps) + decay * p[k]);
    }
}

// The sum of squares of x in f64, first pass: partials[block] = the block's share (a grid
// stride loop). sum_partials then adds them in order (no atomic adds).
extern "C" __global__ void sum_squares(double* partials, const float* x, size_t n) {
    __shared__ double shared[32];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (blockDim.x >> 5) ? shared[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) partials[blockIdx.x] = s;
    }
}

// *out = the sum of `count` partials, in the same order on every run. One block of 32 threads.
extern "C" __global__ void sum_partials(double* out, const double* partials, int count) {
    double s = 0.0;
    for (int k = threadIdx.x; k < count; k += 32) s += partials[k];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) *out = s;
}

// ---------------------------------------------------------------------------------------
// Attention (training and full forward passes): the products run on cuBLAS, one sequence at
// a time over all heads; these kernels turn scores `[n_head * t, t]` into probabilities.

// Row (h, i) of scores -> probabilities in place (masked entries 0); lse[h * t + i] keeps
// the row's log-sum-exp. One block per row.
extern "C" __global__ void attention_softmax(float* scores, float* lse, int t, int causal) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    int i = row % t, visible = causal ? i + 1 : t;
    float* s = scores + row * t;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, s[j]);
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) sum += expf(s[j] - m);
    sum = block_sum(sum, shared);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        s[j] = j < visible ? expf(s[j] - m) * inv : 0.0f;
    if (threadIdx.x == 0) lse[row] = m + logf(sum);
}

// The probabilities again, from the scores and the saved log-sum-exp (backward pass).
extern "C" __global__ void attention_probs(float* scores, const float* lse, int t, int causal) {
    size_t row = blockIdx.x;
    int i = row % t, visible = causal ? i + 1 : t;
    float* s = scores + row * t;
    float l = lse[row];
    for (int j = threadIdx.x; j < t; j += blockDim.x) s[j] = j < visible ? expf(s[j] - l) : 0.0f;
}

// dS = P * (dP - D_i) in place of dP, D_i = sum_c dout[i, c] * out[i, c] over head h's
// columns. Rows (h, i) of one sequence; `dout`, `out` point at that sequence (`[t, d]`).
extern "C" __global__ void attention_dscores(float* dp, const float* p, const float* dout,
                                             const float* out, int t, int d, int head_dim) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    int h = row / t, i = row % t;
    const float *dor = dout + (size_t)i * d + h * head_dim, *orow = out + (size_t)i * d + h * head_dim;
    float s = 0.0f;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) s += dor[c] * orow[c];
    float di = block_sum(s, shared);
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        dp[row * t + j] = p[row * t + j] * (dp[row * t + j] - di);
}

// ---------------------------------------------------------------------------------------
// Decoding with key/value caches, laid out per (sequence, head) as [n_ctx, head_dim].

// Stores the keys and values of positions pos..pos+len (pos: see first_position). Grid
// (batch * len, n_head).
template <typename E>
__device__ void kv_store(E* k_cache, E* v_cache, const float* qkv, int n_head, int head_dim,
                         int n_ctx, int pos, const int* pos_at, int len) {
    int r = blockIdx.x, h = blockIdx.y, b = r / len, p = first_position(pos, pos_at) + r % len;
    int d = n_head * head_dim;
    const float* row = qkv + (size_t)r * 3 * d;
    size_t base = (((size_t)b * n_head + h) * n_ctx + p) * head_dim;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
        store(k_cache, base + c, row[d + h * head_dim + c]);
        store(v_cache, base + c, row[2 * d + h * head_dim + c]);
    }
}

extern "C" __global__ void kv_store_f32(float* k, float* v, const float* qkv, int n_head,
                                        int head_dim, int n_ctx, int pos, const int* pos_at,
                                        int len) {
    kv_store(k, v, qkv, n_head, head_dim, n_ctx, pos, pos_at, len);
}

extern "C" __global__ void kv_store_bf16(bf16_bits* k, bf16_bits* v, const float* qkv,
                                         int n_head, int head_dim, int n_ctx, int pos,
                                         const int* pos_at, int len) {
    kv_store(k, v, qkv, n_head, head_dim, n_ctx, pos, pos_at, len);
}

// Attention of each new position over the cached positions up to itself. Grid
// (batch * len, n_head), 128 threads; dynamic shared memory decode_shared_bytes(n_ctx,
// head_dim): the scores [n_ctx], q [head_dim rounded up to 8] and the value sums' partials.
// With len > 1 (a prefill) kv_store has stored the new keys and values before; with len == 1
// (a decoding step) the block whose keys include the new position stores its key and value
// first: it is the only block that reads that cache row, so no other launch is needed.
//
// Splitting the keys (len == 1 only): with few images, (batch, n_head) blocks leave most of
// a GPU idle while each reads its whole cache, so a launch of gridDim.z > 1 gives block z the
// z-th of gridDim.z equal runs of keys (n, the keys up to the new position, is known only
// here: a replayed step reads it from memory). Such a block leaves its partial in `partials`
// [rows, n_head, gridDim.z, head_dim + 2]: the max m of its scores, the sum of exp(s - m), then
// the values weighted by exp(s - m); attend_combine then writes `out`. A block without keys
// leaves m = -inf, sum 0 and zeros, which weigh nothing.
//
// At batch 64 a step's attention reads about 1.6 GB of keys and values (iGPT-S, position 512
// on average), so the kernel is written to keep many reads in flight: rows are read in
// 16-byte pieces of 8 columns (whole rows at once across a warp's lanes) and each thread
// issues the loads of four keys before it needs any of them. Scores: four lanes per key,
// eight keys per warp per round; values: each thread owns 8 columns of every groups-th key,
// then the groups' partial sums are added in order.
constexpr int kDecodeThreads = 128;
constexpr int kDecodeRounds = 4;  // keys (scores) or rows (values) whose loads a thread issues together

__host__ __device__ constexpr int decode_pieces(int head_dim) { return (head_dim + 7) / 8; }

// Threads that share one key's (or value row's) pieces, and how many keys they take at once.
__host__ __device__ constexpr int decode_row_threads(int head_dim) {
    return decode_pieces(head_dim) < kDecodeThreads ? decode_pieces(head_dim) : kDecodeThreads;
}

// Floats of the partial value sums: one 8-column piece per thread, or every piece once.
__host__ __device__ constexpr int decode_partials(int head_dim) {
    return kDecodeThreads / decode_row_threads(head_dim) * decode_pieces(head_dim) * 8;
}

__host__ __device__ constexpr size_t decode_shared_bytes(int n_ctx, int head_dim) {
    return ((size_t)n_ctx + decode_pieces(head_dim) * 8 + decode_partials(head_dim)) * 4;
}

// Columns c .. c + 7 of a cache row as floats, one at a time, zeros from `hd` on: for rows
// that do not start on 16 bytes or do not hold whole pieces.
template <typename E>
__device__ __forceinline__ void load_columns(float (&v)[8], const E* row, int c, int hd) {
    for (int u = 0; u < 8; u++) v[u] = c + u < hd ? load(row, (size_t)(c + u)) : 0.0f;
}

// A piece's 16 or 32 bytes as loaded, unpacked only where used: issuing the loads of several
// pieces before unpacking any keeps them in flight together.
struct RawPiece {
    float4 a, b;
};

__device__ __forceinline__ RawPiece load_raw(const float* row, int c) {
    return {*(const float4*)(row + c), *(const float4*)(row + c + 4)};
}

__device__ __forceinline__ RawPiece load_raw(const bf16_bits* row, int c) {
    return {*(const float4*)(row + c), make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
}

__device__ __forceinline__ void unpack(float (&v)[8], const RawPiece& r, const float*) {
    v[0] = r.a.x, v[1] = r.a.y, v[2] = r.a.z, v[3] = r.a.w;
    v[4] = r.b.x, v[5] = r.b.y, v[6] = r.b.z, v[7] = r.b.w;
}

__device__ __forceinline__ void unpack(float (&v)[8], const RawPiece& r, const bf16_bits*) {
    const unsigned int words[4] = {__float_as_uint(r.a.x), __float_as_uint(r.a.y),
                                   __float_as_uint(r.a.z), __float_as_uint(r.a.w)};
    for (int u = 0; u < 4; u++) {
        v[2 * u] = __uint_as_float(words[u] << 16);
        v[2 * u + 1] = __uint_as_float(words[u] & 0xffff0000u);
    }
}

template <typename E, typename O>
__device__ void attend(O* out, float* partials, E* k_cache, E* v_cache, const float* qkv,
                       int n_head, int head_dim, int n_ctx, int pos, const int* pos_at, int len) {
    extern __shared__ float dynamic[];
    __shared__ float shared[32];
    const int hd = head_dim, pieces = decode_pieces(hd), row_threads = decode_row_threads(hd);
    float *scores = dynamic, *q = dynamic + n_ctx, *partial = q + pieces * 8;
    const int r = blockIdx.x, h = blockIdx.y, b = r / len;
    const int n = first_position(pos, pos_at) + r % len + 1;
    // This block's keys lo..hi: all n, or its run of them.
    const int splits = gridDim.z, run = (n + splits - 1) / splits;
    const int lo = min(n, (int)blockIdx.z * run), hi = min(n, lo + run);
    const int d = n_head * hd;
    const float* row = qkv + (size_t)r * 3 * d;
    const size_t base = ((size_t)b * n_head + h) * n_ctx * hd;
    for (int c = threadIdx.x; c < pieces * 8; c += kDecodeThreads)
        q[c] = c < hd ? row[h * hd + c] : 0.0f;
    if (len == 1 && lo < hi && hi == n) {
        const size_t at = base + (size_t)(n - 1) * hd;
        for (int c = threadIdx.x; c < hd; c += kDecodeThreads) {
            store(k_cache, at + c, row[d + h * hd + c]);
            store(v_cache, at + c, row[2 * d + h * hd + c]);
        }
    }
    // Also makes the stored row visible to every thread of the block.
    __syncthreads();
    // Plain (coherent) loads: a step's block reads back the row it stored above, which
    // __restrict__ or __ldg on the caches would allow to come from the non-coherent path.
    const E *keys = k_cache + base, *values = v_cache + base;
    // Every row starts on 16 bytes where the cache does and a row is whole pieces.
    const bool vectors = hd % 8 == 0 && (uintptr_t)keys % 16 == 0 && (uintptr_t)values % 16 == 0;
    const float scale = rsqrtf((float)hd);

    // Scores: lane group (lane / 4) of warp w takes key 8 (w + 4 i) + lane / 4 of round i,
    // its four lanes the pieces p = lane % 4, p + 4, ... of it. Each lane loads
    // kLanePieces pieces of each of kDecodeRounds keys before it uses any (one batch for heads
    // of up to 64 columns, two up to 128).
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, quad = lane & 3;
    constexpr int kPerRound = kDecodeThreads / 4;  // keys a round takes across the block
    constexpr int kLanePieces = 2;
    float m = -INFINITY;
    // The loop's bound is warp-uniform: every lane reaches the shuffles.
    for (int first = lo + warp * 8; first < hi; first += kPerRound * kDecodeRounds) {
        const int j0 = first + (lane >> 2);
        float s[kDecodeRounds];
#pragma unroll
        for (int k = 0; k < kDecodeRounds; k++) s[k] = 0.0f;
        for (int p0 = quad; p0 < pieces; p0 += 4 * kLanePieces) {
            RawPiece raw[kDecodeRounds][kLanePieces];
            if (vectors) {
#pragma unroll
                for (int k = 0; k < kDecodeRounds; k++)
#pragma unroll
                    for (int pp = 0; pp < kLanePieces; pp++) {
                        const int j = j0 + k * kPerRound, p = p0 + 4 * pp;
                        if (j < hi && p < pieces) raw[k][pp] = load_raw(keys + (size_t)j * hd, p * 8);
                    }
            }
#pragma unroll
            for (int k = 0; k < kDecodeRounds; k++)
#pragma unroll
                for (int pp = 0; pp < kLanePieces; pp++) {
                    const int j = j0 + k * kPerRound, p = p0 + 4 * pp;
                    if (j >= hi || p >= pieces) continue;
                    float v[8];
                    if (vectors) unpack(v, raw[k][pp], keys);
                    else load_columns(v, keys + (size_t)j * hd, p * 8, hd);
#pragma unroll
                    for (int u = 0; u < 8; u++) s[k] += q[p * 8 + u] * v[u];
                }
        }
#pragma unroll
        for (int k = 0; k < kDecodeRounds; k++) {
            const int j = j0 + k * kPerRound;
            s[k] += __shfl_xor_sync(0xffffffffu, s[k], 1);
            s[k] += __shfl_xor_sync(0xffffffffu, s[k], 2);
            s[k] *= scale;
            if (j < hi) {
                if (quad == 0) scores[j] = s[k];
                m = fmaxf(m, s[k]);
            }
        }
    }
    // block_max's barriers also publish the scores.
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j < hi; j += kDecodeThreads) {
        float e = expf(scores[j] - m);
        scores[j] = e;
        sum += e;
    }
    sum = block_sum(sum, shared);
    __syncthreads();

    // Values: thread t takes pieces t % row_threads (+ row_threads, ...) of rows
    // t / row_threads, + groups, ...; kDecodeRounds rows at once.
    const int groups = kDecodeThreads / row_threads, group = threadIdx.x / row_threads;
    const int first_piece = threadIdx.x % row_threads;
    if (group < groups) {
        for (int p = first_piece; p < pieces; p += row_threads) {
            float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            for (int j0 = lo + group; j0 < hi; j0 += groups * kDecodeRounds) {
                RawPiece raw[kDecodeRounds];
                if (vectors) {
#pragma unroll
                    for (int k = 0; k < kDecodeRounds; k++) {
                        const int j = j0 + k * groups;
                        if (j < hi) raw[k] = load_raw(values + (size_t)j * hd, p * 8);
                    }
                }
#pragma unroll
                for (int k = 0; k < kDecodeRounds; k++) {
                    const int j = j0 + k * groups;
                    if (j >= hi) break;
                    float v[8];
                    if (vectors) unpack(v, raw[k], values);
                    else load_columns(v, values + (size_t)j * hd, p * 8, hd);
#pragma unroll
                    for (int u = 0; u < 8; u++) acc[u] += scores[j] * v[u];
                }
            }
            for (int u = 0; u < 8; u++) partial[group * pieces * 8 + p * 8 + u] = acc[u];
        }
    }
    __syncthreads();
    if (splits > 1) {
        float* mine = partials + (((size_t)r * n_head + h) * splits + blockIdx.z) * (hd + 2);
        if (threadIdx.x == 0) mine[0] = m, mine[1] = sum;
        for (int c = threadIdx.x; c < hd; c += kDecodeThreads) {
            float acc = 0.0f;
            for (int g = 0; g < groups; g++) acc += partial[g * pieces * 8 + c];
            mine[2 + c] = acc;
        }
        return;
    }
    const float inv = 1.0f / sum;
    for (int c = threadIdx.x; c < hd; c += kDecodeThreads) {
        float acc = 0.0f;
        for (int g = 0; g < groups; g++) acc += partial[g * pieces * 8 + c];
        store(out, (size_t)r * d + h * hd + c, acc * inv);
    }
}

extern "C" __global__ void attend_f32(float* out, float* partials, float* k, float* v,
                                      const float* qkv, int n_head, int head_dim, int n_ctx,
                                      int pos, const int* pos_at, int len) {
    attend(out, partials, k, v, qkv, n_head, head_dim, n_ctx, pos, pos_at, len);
}

extern "C" __global__ void attend_bf16(float* out, float* partials, bf16_bits* k, bf16_bits* v,
                                       const float* qkv, int n_head, int head_dim, int n_ctx,
                                       int pos, const int* pos_at, int len) {
    attend(out, partials, k, v, qkv, n_head, head_dim, n_ctx, pos, pos_at, len);
}

// The same, the output stored rounded to bfloat16 (for a product that would round it anyway).
extern "C" __global__ void attend_f32_to_bf16(bf16_bits* out, float* partials, float* k, float* v,
                                              const float* qkv, int n_head, int head_dim, int n_ctx,
                                              int pos, const int* pos_at, int len) {
    attend(out, partials, k, v, qkv, n_head, head_dim, n_ctx, pos, pos_at, len);
}

extern "C" __global__ void attend_bf16_to_bf16(bf16_bits* out, float* partials, bf16_bits* k,
                                               bf16_bits* v, const float* qkv, int n_head,
                                               int head_dim, int n_ctx, int pos, const int* pos_at,
                                               int len) {
    attend(out, partials, k, v, qkv, n_head, head_dim, n_ctx, pos, pos_at, len);
}

// Most runs of keys a decoding step's attention is split into (attend_combine's shared
// memory holds a weight for each).
constexpr int kMaxDecodeSplits = 64;

// Each (row, head)'s output from the partials of attend's split blocks: every partial
// rescaled to the largest max, added in split order. Grid (rows, n_head), 128 threads.
template <typename O>
__device__ void attend_combine(O* out, const float* partials, int n_head, int head_dim,
                               int splits) {
    __shared__ float weight[kMaxDecodeSplits];
    __shared__ float total;
    const int r = blockIdx.x, h = blockIdx.y, hd = head_dim;
    const float* part = partials + ((size_t)r * n_head + h) * splits * (hd + 2);
    if (threadIdx.x == 0) {
        float m = -INFINITY, sum = 0.0f;
        for (int z = 0; z < splits; z++) m = fmaxf(m, part[z * (hd + 2)]);
        for (int z = 0; z < splits; z++) {
            weight[z] = expf(part[z * (hd + 2)] - m);
            sum += weight[z] * part[z * (hd + 2) + 1];
        }
        total = sum;
    }
    __syncthreads();
    const float inv = 1.0f / total;
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float acc = 0.0f;
        for (int z = 0; z < splits; z++) acc += weight[z] * part[z * (hd + 2) + 2 + c];
        store(out, (size_t)r * n_head * hd + h * hd + c, acc * inv);
    }
}

extern "C" __global__ void attend_combine_f32(float* out, const float* partials, int n_head,
                                              int head_dim, int splits) {
    attend_combine(out, partials, n_head, head_dim, splits);
}

extern "C" __global__ void attend_combine_to_bf16(bf16_bits* out, const float* partials,
                                                  int n_head, int head_dim, int splits) {
    attend_combine(out, partials, n_head, head_dim, splits);
}

// ---------------------------------------------------------------------------------------
// Flash attention (training and full forward passes): the attention of every sequence and
// head without the T x T scores in global memory, FlashAttention-2 style. Products run on the
// tensor cores as mma.sync m16n8k16 (bf16 operands, f32 accumulation), their operands read
// from shared memory by ldmatrix; scores, probabilities and outputs stay in registers. Q, K,
// V (and dout) are read from their f32 rows and rounded to bf16 into shared memory; softmax
// statistics, rescaling and the outputs stay f32. No kernel adds into global memory with
// atomics, so a pass gives the same bits every time it runs.
//
// Shapes as AttnShape: qkv [batch * t, 3d] (columns Q | K | V, each n_head groups of
// head_dim), out and dout [batch * t, d], lse and delta [batch, n_head, t]; causal masks
// keys j > i. head_dim: a multiple of 16 up to the kernel's width (64 or 128); t: any (the
// last tile is padded with zeros and masked). Dynamic shared memory only (flash_shared_bytes).

// The dynamic shared memory, declared as attend<E> declares it (C++ linkage: a declaration
// inside an extern "C" kernel would conflict with it). The flash kernels have no static
// shared memory, so it starts at the window's base, aligned for ldmatrix's 16-byte rows.
__device__ __forceinline__ float* flash_dynamic() {
    extern __shared__ float dynamic[];
    return dynamic;
}

// The warp-level tensor-core instructions, in inline PTX (sm_80 and later). Under g++ the
// shim emulates them lane by lane with the PTX ISA's fragment layouts: groupID g = lane / 4,
// tig = lane % 4.
#ifdef __CUDACC__
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// Four 8x8 b16 matrices from shared memory: lanes 8i .. 8i + 7 give the addresses of matrix
// i's eight rows (16 bytes each, 16-byte aligned); r[i] receives row g, columns 2 tig and
// 2 tig + 1 of matrix i (the lower column in the low half).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16_bits* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}

// The same, each matrix transposed: r[i] receives rows 2 tig and 2 tig + 1 of column g.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16_bits* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}

// 16 bytes from global memory (`src`) to shared memory (`dst`), both 16-byte aligned, without
// passing through registers (sm_80 and later): the copy lands by the copy_async_wait that
// covers its group, not before any other instruction.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :
                 : "r"(shared_address(dst)), "l"(src)
                 : "memory");
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void copy_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `kPending` of this thread's committed groups are still in flight (the
// latest ones); other threads' copies need a barrier after it.
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// d [16, 8] (f32) += a [16, 16] times b [16, 8] (bf16). a: rows g and g + 8 in a[0] and
// a[1] (columns 2 tig, 2 tig + 1), the same 8 columns on in a[2] and a[3]; b: rows 2 tig,
// 2 tig + 1 of column g in b0, rows 8 on in b1; d: row g in d[0], d[1] (columns 2 tig,
// 2 tig + 1), row g + 8 in d[2], d[3].
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, "
        "%7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

namespace flash {
constexpr int kWarps = 4;              // warps per block, 16 query rows (or keys) each
constexpr int kThreads = 32 * kWarps;  // threads per block
constexpr int kRows = 16 * kWarps;     // query rows (or keys) a block owns
constexpr int kKeys = 64;              // keys per step of the forward loop
constexpr int kStep = 32;              // rows (dK, dV) or keys (dQ) per step of the backward loops

// Buffers of each loop's tiles: two where the rows are bf16, so that the next step's copies
// (asynchronous: fill_rows) run while this step's products do; one for the forward kernel of
// width 128, whose two (80 KiB) would leave room for fewer blocks on a multiprocessor than its
// registers do (and for the _one_stage gradient kernels, for GPUs with less shared memory).
__host__ __device__ constexpr int stages(int width, bool bf16, bool forward) {
    return bf16 && !(forward && width == 128) ? 2 : 1;
}

// Two f32 values as one register of bf16 (the first in the low half), as an mma operand.
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return (uint32_t)to_bf16(lo) | ((uint32_t)to_bf16(hi) << 16);
}

// A tile of bf16 rows in shared memory, `width` (a multiple of 64) elements a row. The 16-byte
// pieces of row r are permuted (piece c stored at c ^ (r % 8)), so the eight rows that an
// ldmatrix reads at the same column sit in eight different groups of banks.
struct Tile {
    bf16_bits* base;
    int width;
    __device__ __forceinline__ bf16_bits* at(int r, int c) const {
        return base + r * width + (((c >> 3) ^ (r & 7)) << 3) + (c & 7);
    }
};

// Fills `dst` with `rows` rows of one head (from `first`, `hd` columns at `src` + row *
// stride); rows from `limit` on are zeros. All the block's threads take part, eight columns
// each, whole where the rows start on 16 bytes (always, for the engine's buffers: they are
// 64-byte aligned and heads are 16 columns wide), else value by value. f32 rows are rounded
// on the way; bf16 rows starting on 16 bytes are copied asynchronously, to be waited for
// (commit_rows, wait_rows, then a barrier).
__device__ __forceinline__ bool rows_in_vectors(const float* src, size_t stride) {
    return (uintptr_t)src % 16 == 0 && stride % 4 == 0;
}
__device__ __forceinline__ bool rows_in_vectors(const bf16_bits* src, size_t stride) {
    return (uintptr_t)src % 16 == 0 && stride % 8 == 0;
}

template <typename S>
__device__ __forceinline__ void fill_rows(Tile dst, const S* src, size_t stride, int first,
                                          int limit, int rows, int hd) {
    const bool vectors = rows_in_vectors(src, stride);
    const int pieces = hd / 8;
    for (int e = threadIdx.x; e < rows * pieces; e += kThreads) {
        const int r = e / pieces, c = e % pieces * 8, i = first + r;
        const S* at = src + (size_t)i * stride + c;
        uint4 piece;
        if (i >= limit) {
            piece = make_uint4(0u, 0u, 0u, 0u);
        } else if (vectors) {
            if constexpr (sizeof(S) == 2) {
                copy_async_16(dst.at(r, c), at);
                continue;
            } else {
                float4 x = ((const float4*)at)[0], y = ((const float4*)at)[1];
                piece = make_uint4(pack(x.x, x.y), pack(x.z, x.w), pack(y.x, y.y),
                                   pack(y.z, y.w));
            }
        } else {
            float v[8];
            for (int u = 0; u < 8; u++) v[u] = load(at, u);
            piece = make_uint4(pack(v[0], v[1]), pack(v[2], v[3]), pack(v[4], v[5]),
                               pack(v[6], v[7]));
        }
        *(uint4*)dst.at(r, c) = piece;
    }
}

// Closes the group of the copies fill_rows started for rows of storage type S (bf16:
// asynchronous), and waits for all but the latest `kPending` groups; the barrier after is the
// caller's.
template <typename S>
__device__ __forceinline__ void commit_rows() {
    if (sizeof(S) == 2) copy_async_commit();
}
template <typename S, int kPending>
__device__ __forceinline__ void wait_rows() {
    if (sizeof(S) == 2) copy_async_wait<kPending>();
}

// The top of step `step` of a kernel's loop over tiles of `rows` rows, this step's from `first`
// (`last`: no step follows), with stage 0 filled before the loop: returns once this step's
// tiles are in shared memory for every thread, having started the next step's copies where
// there are two stages. `fill(stage, from)` fills a stage's tiles with the rows from `from`.
template <int kStages, typename S, typename Fill>
__device__ __forceinline__ void step_tiles(int step, int first, int rows, bool last, Fill fill) {
    __syncthreads();  // the previous step's tiles are used up
    if (kStages == 1 && step > 0) {
        fill(0, first);
        commit_rows<S>();
    }
    if (kStages == 2 && !last) {
        fill((step + 1) % 2, first + rows);
        commit_rows<S>();
        wait_rows<S, 1>();  // this step's group has landed, the next one's may not
    } else {
        wait_rows<S, 0>();
    }
    __syncthreads();  // every thread's copies of this step (and, first, the fixed tiles) are in
}

// acc [16, 8 kN] += rows `a_row` .. + 15 of `a` times the transpose of rows `b_row` ..
// + 8 kN - 1 of `b`, over the first `k` columns of both (S = Q K^T). kN even.
template <int kN>
__device__ __forceinline__ void product_nt(float (&acc)[kN][4], Tile a, int a_row, Tile b,
                                           int b_row, int k) {
    const int lane = threadIdx.x & 31;
    for (int kk = 0; kk < k; kk += 16) {
        uint32_t x[4];
        ldmatrix_x4(x, a.at(a_row + (lane & 15), kk + (lane >> 4) * 8));
#pragma unroll
        for (int n = 0; n < kN; n += 2) {
            uint32_t y[4];
            ldmatrix_x4(y, b.at(b_row + n * 8 + (lane & 7) + (lane >> 4) * 8,
                                kk + ((lane >> 3) & 1) * 8));
            mma_bf16(acc[n], x, y[0], y[1]);
            mma_bf16(acc[n + 1], x, y[2], y[3]);
        }
    }
}

// acc [16, n] += a [16, 16 kK] (bf16 operands in registers, as pack_operands gives them)
// times rows `b_row` .. + 16 kK - 1 of `b`, its first n columns (n <= 8 kN, a multiple of 16):
// O += P V.
template <int kN, int kK>
__device__ __forceinline__ void product_nn(float (&acc)[kN][4], const uint32_t (&a)[kK][4],
                                           Tile b, int b_row, int n) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < kK; kk++) {
#pragma unroll
        for (int c = 0; c < kN; c += 2) {
            if (c * 8 >= n) break;
            uint32_t y[4];
            ldmatrix_x4_trans(y, b.at(b_row + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                      c * 8 + (lane >> 4) * 8));
            mma_bf16(acc[c], a[kk], y[0], y[1]);
            mma_bf16(acc[c + 1], a[kk], y[2], y[3]);
        }
    }
}

// An accumulator [16, 16 kK] (f32) as the left operand of product_nn (bf16): the layouts
// match register for register.
template <int kK>
__device__ __forceinline__ void pack_operands(uint32_t (&a)[kK][4], const float (&acc)[2 * kK][4]) {
#pragma unroll
    for (int kk = 0; kk < kK; kk++) {
        a[kk][0] = pack(acc[2 * kk][0], acc[2 * kk][1]);
        a[kk][1] = pack(acc[2 * kk][2], acc[2 * kk][3]);
        a[kk][2] = pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
        a[kk][3] = pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
    }
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
    for (int n = 0; n < kN; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// Writes rows `row0` (this lane's g) and `row0 + 8` of an accumulator [16, hd] to `rows` (f32,
// or bf16 rounded; row stride `stride`, the warp's first row at `rows`), those below `valid`
// only.
template <int kN, typename O>
__device__ __forceinline__ void write_rows(O* rows, size_t stride, int valid,
                                           const float (&acc)[kN][4], int hd) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c0 = (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < kN; n++) {
        if (n * 8 >= hd) break;
        for (int half = 0; half < 2; half++) {
            const int r = g + 8 * half;
            if (r >= valid) continue;
            O* p = rows + (size_t)r * stride + n * 8 + c0;
            store(p, 0, acc[n][2 * half]);
            store(p, 1, acc[n][2 * half + 1]);
        }
    }
}
}  // namespace flash

// Dynamic shared bytes of a flash kernel of width `width` (64 or 128) with `stages` buffers of
// its loop's tiles (flash::stages), in bf16 rows of the tile width: forward, Q 64, then K 64
// and V 64 per stage; dK and dV, K 64 and V 64, then Q 32 and dout 32 per stage; dQ, Q 64 and
// dout 64, then K 32 and V 32 per stage. Above 48 KiB (the backward kernels of width 128 with
// two stages: 64 KiB) the function must be allowed more first (cuFuncSetAttribute).
__host__ __device__ constexpr size_t flash_shared_bytes(int width, int stages, bool forward) {
    return (size_t)(forward ? flash::kRows + 2 * flash::kKeys * stages
                            : 2 * flash::kRows + 2 * flash::kStep * stages) *
           width * 2;
}

// Forward (flash_attention_forward_64 and _128): out and lse (out and qkv f32, or both bf16).
// Launch: grid (ceil(t / 64), n_head, batch), block 128 threads (4 warps), dynamic shared
// memory flash_shared_bytes(width, flash::stages(width, bf16, true), true).
//
// Block (x, h, b) owns query rows 64x .. 64x + 63 of sequence b, head h; warp w the 16 rows
// from 64x + 16w. Per step of 64 keys (causal: only up to the block's last row) the block
// loads K and V (with two stages, the next step's while this one's products run); each warp
// with a visible key in the step computes S = Q K^T in registers, updates its rows' running
// maximum m and (per lane, partial) sum l, rescales its output by exp(m_old - m_new) and adds
// P V, P rounded to bf16 straight from the scores' registers.
template <int kWidth, typename S>
__device__ void flash_forward(S* out, float* lse, const S* qkv, int t, int n_head,
                              int head_dim, int causal) {
    using namespace flash;
    constexpr int kN = kWidth / 8;  // 8-column tiles of the output
    const int hd = head_dim, d = n_head * hd;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kRows;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int kStages = stages(kWidth, sizeof(S) == 2, true);
    const Tile qs{(bf16_bits*)flash_dynamic(), kWidth};
    // Stage st's K and V tiles (computed, not indexed from an array, which would live in
    // local memory).
    const auto ks = [&](int st) {
        return Tile{qs.base + (kRows + 2 * kKeys * st) * kWidth, kWidth};
    };
    const auto vs = [&](int st) { return Tile{ks(st).base + kKeys * kWidth, kWidth}; };
    const S* seq = qkv + (size_t)b * t * 3 * d + h * hd;

    fill_rows(qs, seq, 3 * d, q0, t, kRows, hd);
    fill_rows(ks(0), seq + d, 3 * d, 0, t, kKeys, hd);
    fill_rows(vs(0), seq + 2 * d, 3 * d, 0, t, kKeys, hd);
    commit_rows<S>();
    float o[kN][4];
    zero(o);
    // This lane's rows (g and g + 8 of the warp's 16) and columns (2 tig, 2 tig + 1 of each
    // 8-column tile).
    const int g = lane >> 2, c0 = (lane & 3) * 2;
    const int warp_first = q0 + warp * 16, warp_last = min(warp_first + 16, t) - 1;
    const int rows[2] = {warp_first + g, warp_first + g + 8};
    const float scale = rsqrtf((float)hd);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int key_end = causal ? min(t, q0 + kRows) : t;
    for (int k0 = 0, step = 0; k0 < key_end; k0 += kKeys, step++) {
        const Tile kt = ks(step % kStages), vt = vs(step % kStages);
        step_tiles<kStages, S>(step, k0, kKeys, k0 + kKeys >= key_end, [&](int st, int from) {
            fill_rows(ks(st), seq + d, 3 * d, from, t, kKeys, hd);
            fill_rows(vs(st), seq + 2 * d, 3 * d, from, t, kKeys, hd);
        });
        // Warp-uniform: the warp has rows, and (causal) one of them sees a key of the step.
        if (warp_first >= t || (causal && k0 > warp_last)) continue;

        float s[kKeys / 8][4];
        zero(s);
        product_nt(s, qs, warp * 16, kt, 0, hd);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = rows[e >> 1], j = k0 + n * 8 + c0 + (e & 1);
                const bool visible = j < t && (!causal || j <= i);
                s[n][e] = visible ? s[n][e] * scale : -INFINITY;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        float m_use[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            // A row's four lanes hold its 64 scores between them.
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);
            m_use[r] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
            const float alpha = expf(m[r] - m_use[r]);
            l[r] *= alpha;
            m[r] = m_new;
#pragma unroll
            for (int n = 0; n < kN; n++) {
                o[n][2 * r] *= alpha;
                o[n][2 * r + 1] *= alpha;
            }
        }
#pragma unroll
        for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[n][e] = expf(s[n][e] - m_use[e >> 1]);
                l[e >> 1] += s[n][e];
            }
        uint32_t p[kKeys / 16][4];
        pack_operands(p, s);
        product_nn(o, p, vt, 0, hd);
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.0f / l[r];
#pragma unroll
        for (int n = 0; n < kN; n++) {
            o[n][2 * r] *= inv[r];
            o[n][2 * r + 1] *= inv[r];
        }
        if ((lane & 3) == 0 && rows[r] < t)
            lse[((size_t)b * n_head + h) * t + rows[r]] = m[r] + logf(l[r]);
    }
    if (warp_first < t)
        write_rows(out + ((size_t)b * t + warp_first) * d + h * hd, d, t - warp_first, o, hd);
}

// Backward, first pass: delta[b, h, i] = sum over head h's columns of dout * out (both f32,
// or both bf16 as training stores them: _bf16). Launch: grid (batch * t), block 128 threads,
// no dynamic shared memory.
template <typename S>
__device__ void flash_prepare(float* delta, const S* dout, const S* out, int t, int n_head,
                              int head_dim) {
    size_t row = blockIdx.x;
    int d = n_head * head_dim, b = row / t, i = row % t;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int h = warp; h < n_head; h += warps) {
        const S* dr = dout + row * d + h * head_dim;
        const S* orow = out + row * d + h * head_dim;
        float s = 0.0f;
        for (int c = lane; c < head_dim; c += 32) s += load(dr, c) * load(orow, c);
        s = warp_sum(s);
        if (lane == 0) delta[((size_t)b * n_head + h) * t + i] = s;
    }
}

extern "C" __global__ void flash_attention_backward_prepare(float* delta, const float* dout,
                                                            const float* out, int t,
                                                            int n_head, int head_dim) {
    flash_prepare(delta, dout, out, t, n_head, head_dim);
}

extern "C" __global__ void flash_attention_backward_prepare_bf16(float* delta,
                                                                 const bf16_bits* dout,
                                                                 const bf16_bits* out, int t,
                                                                 int n_head, int head_dim) {
    flash_prepare(delta, dout, out, t, n_head, head_dim);
}

// The backward's scores of a tile pair, as both backward kernels need them: the warp's 16 rows
// (from `row`) of `own` against the step's 32 rows of `other` give S, and of `own_grad`
// against `other_grad` give dP (Q K^T and dout V^T for dQ; K Q^T and V dout^T for dK, dV);
// then the probability p = exp(scale s - lse) (0 where masked) and dS = p (dp - delta) scale,
// each as bf16 operands for product_nn (`p_out` and `ds_out`). `visible(n, e)` says whether
// element e of tile n is a visible pair; `stat(n, e)` gives its row's lse and delta.
template <typename Visible, typename Stat>
__device__ __forceinline__ void flash_scores(uint32_t (&p_out)[2][4], uint32_t (&ds_out)[2][4],
                                             flash::Tile own, flash::Tile other,
                                             flash::Tile own_grad, flash::Tile other_grad,
                                             int row, int hd, Visible visible, Stat stat) {
    const float scale = rsqrtf((float)hd);
    float s[4][4], dp[4][4];
    flash::zero(s);
    flash::zero(dp);
    flash::product_nt(s, own, row, other, 0, hd);
    flash::product_nt(dp, own_grad, row, other_grad, 0, hd);
#pragma unroll
    for (int n = 0; n < 4; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float lse_i, delta_i;
            stat(n, e, lse_i, delta_i);
            const float p = visible(n, e) ? expf(s[n][e] * scale - lse_i) : 0.0f;
            s[n][e] = p;
            dp[n][e] = p * (dp[n][e] - delta_i) * scale;
        }
    flash::pack_operands(p_out, s);
    flash::pack_operands(ds_out, dp);
}

// Backward, dK and dV (flash_attention_backward_kv_64 and _128), written into dqkv's K and V
// columns, from dout, qkv, lse and delta. Launch: grid (ceil(t / 64), n_head, batch), block
// 128 threads (4 warps), dynamic shared memory
// flash_shared_bytes(width, flash::stages(width, bf16, false), false).
//
// Block (x, h, b) owns keys 64x .. 64x + 63, warp w the 16 from 64x + 16w, and loops over the
// steps of 32 query rows that see them (causal: from row 64x on). Per step, each warp with a
// visible pair: S^T = K Q^T and dP^T = V dout^T, P^T = exp(scale S^T - lse) (masked: 0),
// dS^T = P^T (dP^T - delta); then dV += P^T dout and dK += scale dS^T Q, in registers.
template <int kWidth, typename S, int kStages = flash::stages(kWidth, sizeof(S) == 2, false)>
__device__ void flash_backward_kv(S* dqkv, const S* dout, const S* qkv,
                                  const float* lse, const float* delta, int t, int n_head,
                                  int head_dim, int causal) {
    using namespace flash;
    constexpr int kN = kWidth / 8;
    const int hd = head_dim, d = n_head * hd;
    const int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * kRows;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const Tile ks{(bf16_bits*)flash_dynamic(), kWidth};
    const Tile vs{ks.base + kRows * kWidth, kWidth};
    // Stage st's Q and dout tiles.
    const auto qs = [&](int st) {
        return Tile{vs.base + (kRows + 2 * kStep * st) * kWidth, kWidth};
    };
    const auto dos = [&](int st) { return Tile{qs(st).base + kStep * kWidth, kWidth}; };
    const S* seq = qkv + (size_t)b * t * 3 * d + h * hd;
    const S* dseq = dout + (size_t)b * t * d + h * hd;
    const size_t stats = ((size_t)b * n_head + h) * t;
    const int q_first = causal ? k0 : 0;

    fill_rows(ks, seq + d, 3 * d, k0, t, kRows, hd);
    fill_rows(vs, seq + 2 * d, 3 * d, k0, t, kRows, hd);
    fill_rows(qs(0), seq, 3 * d, q_first, t, kStep, hd);
    fill_rows(dos(0), dseq, d, q_first, t, kStep, hd);
    commit_rows<S>();
    float dk[kN][4], dv[kN][4];
    zero(dk);
    zero(dv);
    const int g = lane >> 2, c0 = (lane & 3) * 2;
    const int kw = k0 + warp * 16;  // the warp's first key
    const int keys[2] = {kw + g, kw + g + 8};
    for (int q0 = q_first, step = 0; q0 < t; q0 += kStep, step++) {
        const Tile qt = qs(step % kStages), dot = dos(step % kStages);
        step_tiles<kStages, S>(step, q0, kStep, q0 + kStep >= t, [&](int st, int from) {
            fill_rows(qs(st), seq, 3 * d, from, t, kStep, hd);
            fill_rows(dos(st), dseq, d, from, t, kStep, hd);
        });
        // Warp-uniform: the warp has keys, and (causal) a row of the step sees one.
        if (kw >= t || (causal && q0 + kStep - 1 < kw)) continue;
        // Element e of tile n of the [16 keys, 32 rows] scores: key keys[e / 2], query row
        // q0 + 8n + c0 + e % 2, whose lse and delta this lane reads (0 past the end).
        float row_lse[4][2], row_delta[4][2];
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int i = q0 + n * 8 + c0 + u;
                row_lse[n][u] = i < t ? lse[stats + i] : 0.0f;
                row_delta[n][u] = i < t ? delta[stats + i] : 0.0f;
            }
        uint32_t p[2][4], ds[2][4];
        flash_scores(
            p, ds, ks, qt, vs, dot, warp * 16, hd,
            [&](int n, int e) {
                const int i = q0 + n * 8 + c0 + (e & 1), j = keys[e >> 1];
                return i < t && j < t && (!causal || j <= i);
            },
            [&](int n, int e, float& lse_i, float& delta_i) {
                lse_i = row_lse[n][e & 1];
                delta_i = row_delta[n][e & 1];
            });
        product_nn(dv, p, dot, 0, hd);
        product_nn(dk, ds, qt, 0, hd);
    }
    if (kw < t) {
        S* rows = dqkv + ((size_t)b * t + kw) * 3 * d + h * hd;
        write_rows(rows + d, 3 * d, t - kw, dk, hd);
        write_rows(rows + 2 * d, 3 * d, t - kw, dv, hd);
    }
}

// Backward, dQ (flash_attention_backward_q_64 and _128), written into dqkv's Q columns, from
// dout, qkv, lse and delta. Launch: as the dK and dV kernel.
//
// Block (x, h, b) owns query rows 64x .. 64x + 63, warp w the 16 from 64x + 16w, and loops
// over the steps of 32 keys they see (causal: up to the block's last row). Per step, each
// warp with a visible pair recomputes S = Q K^T, dP = dout V^T, P and dS as the dK, dV
// kernel does, and adds scale dS K into its dQ, in registers. Recomputing costs two
// products per tile pair; it buys dQ without atomic adds from many blocks.
template <int kWidth, typename S, int kStages = flash::stages(kWidth, sizeof(S) == 2, false)>
__device__ void flash_backward_q(S* dqkv, const S* dout, const S* qkv,
                                 const float* lse, const float* delta, int t, int n_head,
                                 int head_dim, int causal) {
    using namespace flash;
    constexpr int kN = kWidth / 8;
    const int hd = head_dim, d = n_head * hd;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kRows;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const Tile qs{(bf16_bits*)flash_dynamic(), kWidth};
    const Tile dos{qs.base + kRows * kWidth, kWidth};
    // Stage st's K and V tiles.
    const auto ks = [&](int st) {
        return Tile{dos.base + (kRows + 2 * kStep * st) * kWidth, kWidth};
    };
    const auto vs = [&](int st) { return Tile{ks(st).base + kStep * kWidth, kWidth}; };
    const S* seq = qkv + (size_t)b * t * 3 * d + h * hd;
    const S* dseq = dout + (size_t)b * t * d + h * hd;
    const size_t stats = ((size_t)b * n_head + h) * t;

    fill_rows(qs, seq, 3 * d, q0, t, kRows, hd);
    fill_rows(dos, dseq, d, q0, t, kRows, hd);
    fill_rows(ks(0), seq + d, 3 * d, 0, t, kStep, hd);
    fill_rows(vs(0), seq + 2 * d, 3 * d, 0, t, kStep, hd);
    commit_rows<S>();
    float dq[kN][4];
    zero(dq);
    const int g = lane >> 2, c0 = (lane & 3) * 2;
    const int qw = q0 + warp * 16;  // the warp's first row
    const int warp_last = min(qw + 16, t) - 1;
    const int rows[2] = {qw + g, qw + g + 8};
    float row_lse[2], row_delta[2];
    for (int r = 0; r < 2; r++) {
        row_lse[r] = rows[r] < t ? lse[stats + rows[r]] : 0.0f;
        row_delta[r] = rows[r] < t ? delta[stats + rows[r]] : 0.0f;
    }
    const int key_end = causal ? min(t, q0 + kRows) : t;
    for (int k0 = 0, step = 0; k0 < key_end; k0 += kStep, step++) {
        const Tile kt = ks(step % kStages), vt = vs(step % kStages);
        step_tiles<kStages, S>(step, k0, kStep, k0 + kStep >= key_end, [&](int st, int from) {
            fill_rows(ks(st), seq + d, 3 * d, from, t, kStep, hd);
            fill_rows(vs(st), seq + 2 * d, 3 * d, from, t, kStep, hd);
        });
        // Warp-uniform: the warp has rows, and (causal) one of them sees a key of the step.
        if (qw >= t || (causal && k0 > warp_last)) continue;
        // Element e of tile n of the [16 rows, 32 keys] scores: row rows[e / 2], key
        // k0 + 8n + c0 + e % 2.
        uint32_t p[2][4], ds[2][4];
        flash_scores(
            p, ds, qs, kt, dos, vt, warp * 16, hd,
            [&](int n, int e) {
                const int i = rows[e >> 1], j = k0 + n * 8 + c0 + (e & 1);
                return i < t && j < t && (!causal || j <= i);
            },
            [&](int, int e, float& lse_i, float& delta_i) {
                lse_i = row_lse[e >> 1];
                delta_i = row_delta[e >> 1];
            });
        product_nn(dq, ds, kt, 0, hd);
    }
    if (qw < t) write_rows(dqkv + ((size_t)b * t + qw) * 3 * d + h * hd, 3 * d, t - qw, dq, hd);
}

// The kernels, one for each widest head they serve (_64: heads up to 64 columns, _128: up to
// 128): fewer accumulator tiles take fewer registers, so more blocks fit on a multiprocessor.
// The _bf16 ones read Q, K, V and the output's gradient as bf16 (as a GPU's bf16 training
// stores them; the tiles are bf16 anyway) and store their output (forward) or gradient
// (backward) rounded to bf16, for the products that read it. Written out rather than generated by a macro: the
// tests and the host driver read each kernel's name from its `extern "C"` line.
extern "C" __global__ void flash_attention_forward_64(
    float* out, float* lse, const float* qkv, int t, int n_head, int head_dim, int causal) {
    flash_forward<64>(out, lse, qkv, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_forward_64_bf16(
    bf16_bits* out, float* lse, const bf16_bits* qkv, int t, int n_head, int head_dim,
    int causal) {
    flash_forward<64>(out, lse, qkv, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_forward_128(
    float* out, float* lse, const float* qkv, int t, int n_head, int head_dim, int causal) {
    flash_forward<128>(out, lse, qkv, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_forward_128_bf16(
    bf16_bits* out, float* lse, const bf16_bits* qkv, int t, int n_head, int head_dim,
    int causal) {
    flash_forward<128>(out, lse, qkv, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_kv_64(
    float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta,
    int t, int n_head, int head_dim, int causal) {
    flash_backward_kv<64>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_kv_64_bf16(
    bf16_bits* dqkv, const bf16_bits* dout, const bf16_bits* qkv, const float* lse,
    const float* delta, int t, int n_head, int head_dim, int causal) {
    flash_backward_kv<64>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_kv_128(
    float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta,
    int t, int n_head, int head_dim, int causal) {
    flash_backward_kv<128>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_kv_128_bf16(
    bf16_bits* dqkv, const bf16_bits* dout, const bf16_bits* qkv, const float* lse,
    const float* delta, int t, int n_head, int head_dim, int causal) {
    flash_backward_kv<128>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_q_64(
    float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta,
    int t, int n_head, int head_dim, int causal) {
    flash_backward_q<64>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_q_64_bf16(
    bf16_bits* dqkv, const bf16_bits* dout, const bf16_bits* qkv, const float* lse,
    const float* delta, int t, int n_head, int head_dim, int causal) {
    flash_backward_q<64>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_q_128(
    float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta,
    int t, int n_head, int head_dim, int causal) {
    flash_backward_q<128>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_q_128_bf16(
    bf16_bits* dqkv, const bf16_bits* dout, const bf16_bits* qkv, const float* lse,
    const float* delta, int t, int n_head, int head_dim, int causal) {
    flash_backward_q<128>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim, causal);
}
// The bf16 gradient kernels of width 128 in one stage of tiles (48 KiB), for GPUs whose
// multiprocessors cannot hold two blocks of the two-stage kernels' 64 KiB (100 KiB a
// multiprocessor: sm_86, sm_89, sm_120), where one stage keeps two blocks resident.
extern "C" __global__ void flash_attention_backward_kv_128_bf16_one_stage(
    bf16_bits* dqkv, const bf16_bits* dout, const bf16_bits* qkv, const float* lse,
    const float* delta, int t, int n_head, int head_dim, int causal) {
    flash_backward_kv<128, bf16_bits, 1>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim,
                                         causal);
}
extern "C" __global__ void flash_attention_backward_q_128_bf16_one_stage(
    bf16_bits* dqkv, const bf16_bits* dout, const bf16_bits* qkv, const float* lse,
    const float* delta, int t, int n_head, int head_dim, int causal) {
    flash_backward_q<128, bf16_bits, 1>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim,
                                        causal);
}

// ---------------------------------------------------------------------------------------
// Drawing the next tokens on the GPU, as the CPU draws them (src/sample.rs, choose_token):
// the same float operations in the same order, so the same logits and number give the same
// colour. The _rn intrinsics keep nvcc from fusing a product and a sum into one rounding,
// which the CPU does not do. One block of 256 threads per row.

struct DrawOptions {
    float temperature;
    int top_k;
    float top_p;
    int unused;
};

// The CPU backend's vectorised exponential (simd::exp), operation for operation: e^x to
// about 2 ulp, clamped to [-87, 88]; NaN stays NaN.
__device__ __forceinline__ float sampling_exp(float x) {
    if (x < -87.0f) x = -87.0f;
    if (x > 88.0f) x = 88.0f;
    float shifted = __fadd_rn(__fmul_rn(x, 1.44269504088896340736f), 12582912.0f);
    float n = __fsub_rn(shifted, 12582912.0f);
    float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, 0.6933594f)), __fmul_rn(n, -2.1219444e-4f));
    float p = 1.9875691e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 0.16666666f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
    unsigned int bits = (__float_as_uint(shifted) - 0x4B400000u + 127u) << 23;
    return __fmul_rn(p, __uint_as_float(bits));
}

// A colour's rank key: ascending keys are descending weights (f32 total order), equal
// weights in colour order. Every NaN ranks as the CPU's positive quiet NaN: a NaN's sign
// and payload depend on the machine that made it.
__device__ __forceinline__ unsigned long long rank_key(float w, int colour) {
    int bits = w != w ? 0x7fc00000 : (int)__float_as_uint(w);
    unsigned int ordered = (unsigned int)(bits ^ (int)(((unsigned int)(bits >> 31)) >> 1)) ^
                           0x80000000u;
    return ((unsigned long long)(~ordered) << 16) | (unsigned int)colour;
}

// The sequential parts of a draw run on one warp, every lane computing the same values: each
// lane loads one of 32 consecutive colours, and every lane then takes them in order through
// shuffles, so the loads overlap while the additions keep the CPU's order.

// `start` plus weight(0), ..., weight(count - 1), added in that order.
template <typename Weight>
__device__ float ordered_sum(Weight weight, int count, float start) {
    const int lane = threadIdx.x & 31;
    float s = start;
    for (int base = 0; base < count; base += 32) {
        float w = base + lane < count ? weight(base + lane) : 0.0f;
        const int n = min(32, count - base);
        for (int j = 0; j < n; j++) s = __fadd_rn(s, __shfl_sync(0xffffffffu, w, j));
    }
    return s;
}

// The first colour whose weight the remaining draw falls under, walking `count` colours
// (colour(i), with weight weights[colour(i)]) in order; -1 when the total cannot be drawn
// from. Past the end (rounding), the last colour that can be drawn.
template <typename Colour>
__device__ int walk_draw(const float* weights, Colour colour, int count, float total, float u) {
    if (!(total > 0.0f && total <= 3.40282347e38f)) return -1;
    const int lane = threadIdx.x & 31;
    float left = __fmul_rn(u, total);
    int last_drawable = -1;
    for (int base = 0; base < count; base += 32) {
        const bool in = base + lane < count;
        const int c = in ? colour(base + lane) : 0;
        const float w = in ? weights[c] : 0.0f;
        const int n = min(32, count - base);
        const unsigned drawable = __ballot_sync(0xffffffffu, in && w > 0.0f);
        if (drawable) last_drawable = __shfl_sync(0xffffffffu, c, 31 - __clz((int)drawable));
        for (int j = 0; j < n; j++) {
            const float wj = __shfl_sync(0xffffffffu, w, j);
            // Every lane holds the same `left`: the warp leaves together.
            if (left < wj) return __shfl_sync(0xffffffffu, c, j);
            left = __fsub_rn(left, wj);
        }
    }
    return last_drawable;
}

// How many of the ranked colours top-p keeps: the first i + 1 whose shares
// (weight(i) / sum, each rounded, added in order) reach top_p; all `count` if none does.
template <typename Weight>
__device__ int top_p_count(Weight weight, int count, float sum, float top_p) {
    const int lane = threadIdx.x & 31;
    float acc = 0.0f;
    for (int base = 0; base < count; base += 32) {
        const float share = base + lane < count ? __fdiv_rn(weight(base + lane), sum) : 0.0f;
        const int n = min(32, count - base);
        for (int j = 0; j < n; j++) {
            acc = __fadd_rn(acc, __shfl_sync(0xffffffffu, share, j));
            if (acc >= top_p) return base + j + 1;
        }
    }
    return count;
}

// Row blockIdx.x of `logits` ([rows, v]) draws with options[row] and its number at the
// position (numbers: [rows, positions]); the token goes to tokens[row] (the next step's input)
// and drawn[position * rows + row]. weights ([rows, v]) and keys ([rows, keys_len], keys_len a
// power of two >= v) are scratch.
extern "C" __global__ void draw_tokens(const float* logits, int v, const DrawOptions* options,
                                       const float* numbers, int positions, int pos,
                                       const int* pos_at, float* weights,
                                       unsigned long long* keys, int keys_len,
                                       uint16_t* tokens, uint16_t* drawn) {
    __shared__ float best_z[256];
    __shared__ int best_i[256];
    __shared__ float lanes[16];
    __shared__ int chosen;
    const int row = blockIdx.x, rows = gridDim.x, tid = threadIdx.x;
    const int p = first_position(pos, pos_at);
    const float* z = logits + (size_t)row * v;
    float* w = weights + (size_t)row * v;
    unsigned long long* k = keys + (size_t)row * keys_len;
    const DrawOptions o = options[row];
    const float u = numbers[(size_t)row * positions + p];

    // The first most likely colour (a NaN never wins), which is also the largest logit.
    float bz = -INFINITY;
    int bi = 0;
    for (int c = tid; c < v; c += blockDim.x)
        if (z[c] > bz) bz = z[c], bi = c;
    best_z[tid] = bz;
    best_i[tid] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) {
            float oz = best_z[tid + s];
            int oi = best_i[tid + s];
            if (oz > best_z[tid] || (oz == best_z[tid] && oi < best_i[tid]))
                best_z[tid] = oz, best_i[tid] = oi;
        }
        __syncthreads();
    }
    const int argmax = best_i[0];
    const float max = best_z[0];
    if (tid == 0) chosen = argmax;

    const bool greedy = o.temperature == 0.0f || o.top_k == 1;
    const bool cut_k = o.top_k > 0 && o.top_k < v;
    if (!greedy) {
        const float inv_t = __fdiv_rn(1.0f, o.temperature);
        for (int c = tid; c < v; c += blockDim.x) {
            float x = __fmul_rn(__fsub_rn(z[c], max), inv_t);
            float e = sampling_exp(x);
            w[c] = x < -87.0f ? 0.0f : e;
        }
        __syncthreads();
        // The CPU's 16 lane sums over whole chunks of 16, then the lanes and the tail in order.
        const int chunks = v / 16;
        if (tid < 16) {
            float s = 0.0f;
            for (int j = 0; j < chunks; j++) s = __fadd_rn(s, w[j * 16 + tid]);
            lanes[tid] = s;
        }
        if (cut_k || o.top_p < 1.0f) {
            // Every colour ranked, most likely first (a bitonic sort; padding sorts last).
            for (int c = tid; c < keys_len; c += blockDim.x)
                k[c] = c < v ? rank_key(w[c], c) : ~0ull;
            __syncthreads();
            for (int size = 2; size <= keys_len; size <<= 1) {
                for (int stride = size >> 1; stride > 0; stride >>= 1) {
                    for (int i = tid; i < keys_len; i += blockDim.x) {
                        int j = i ^ stride;
                        if (j > i) {
                            bool ascending = (i & size) == 0;
                            unsigned long long a = k[i], b = k[j];
                            if ((a > b) == ascending) k[i] = b, k[j] = a;
                        }
                    }
                    __syncthreads();
                }
            }
        }
        __syncthreads();
        if (tid < 32) {
            float total = 0.0f;
            for (int l = 0; l < 16; l++) total = __fadd_rn(total, lanes[l]);
            for (int c = chunks * 16; c < v; c++) total = __fadd_rn(total, w[c]);
            int got;
            if (!cut_k && o.top_p >= 1.0f) {
                got = walk_draw(w, [](int i) { return i; }, v, total, u);
            } else {
                auto ranked = [k](int i) { return (int)(k[i] & 0xFFFFu); };
                auto weight = [w, k](int i) { return w[k[i] & 0xFFFFu]; };
                int kept = cut_k ? o.top_k : v;
                if (o.top_p < 1.0f)
                    kept = top_p_count(weight, kept, ordered_sum(weight, kept, 0.0f), o.top_p);
                got = walk_draw(w, ranked, kept, ordered_sum(weight, kept, 0.0f), u);
            }
            if (tid == 0 && got >= 0) chosen = got;
        }
    }
    __syncthreads();
    if (tid == 0) {
        tokens[row] = (uint16_t)chosen;
        drawn[(size_t)p * rows + row] = (uint16_t)chosen;
    }
}
