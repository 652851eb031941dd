// igpt's CUDA kernels: everything of the backend trait but the matrix products (cuBLAS).
// Compiled to PTX by scripts/build_ptx.sh; the PTX is committed and embedded in the binary.
// Every kernel but flash attention is plain f32 arithmetic, with bfloat16 only as storage
// (u16 bits); flash attention multiplies bf16 tiles on the tensor cores (nvcuda::wmma).
// Under g++ (tests/cuda_host) the shim stands in for the CUDA headers.

#include <stdint.h>
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <mma.h>
#endif

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
// RMS norm: out = x * rsqrt(mean(x^2) + eps) * g, one block per row.

extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* x,
                                           const float* g, int d, float eps) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    const float* xr = x + row * d;
    float s = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) s += xr[c] * xr[c];
    s = block_sum(s, shared);
    float r = rsqrtf(s / d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) out[row * d + c] = xr[c] * r * g[c];
    if (threadIdx.x == 0) rstd[row] = r;
}

// The backward pass in one read of dout and x: dx += rstd * (dout*g - xhat * mean(dout*g*xhat)),
// xhat = x * rstd, and the gain's gradient as partial sums, partials[y, c] = the sum over the
// block's rows of dout * x * rstd, which add_column_sums adds into dg in order (no atomic
// adds). Grid (ceil(rows / rows_per_block), ceil(d / 2048)), 256 threads: block (x, y) takes
// rows x * rows_per_block on, one at a time, and columns 2048 y .. 2048 y + 2047 of them
// (eight a thread, their gain sums in registers); each row's mean needs the whole row, which
// every column block reads.
extern "C" __global__ void rmsnorm_backward(float* dx, float* partials, const float* dout,
                                            const float* x, const float* rstd, const float* g,
                                            int rows, int d, int rows_per_block) {
    constexpr int kCols = 8;
    __shared__ float shared[32];
    const int c0 = blockIdx.y * kCols * blockDim.x + threadIdx.x;
    const int r0 = blockIdx.x * rows_per_block, r1 = min(rows, r0 + rows_per_block);
    float gain[kCols];
#pragma unroll
    for (int k = 0; k < kCols; k++) gain[k] = 0.0f;
    for (int row = r0; row < r1; row++) {
        const float *xr = x + (size_t)row * d, *dr = dout + (size_t)row * d;
        float r = rstd[row];
        float s = 0.0f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) s += dr[c] * g[c] * xr[c];
        float mean = block_sum(s, shared) * r / d;
#pragma unroll
        for (int k = 0; k < kCols; k++) {
            int c = c0 + k * blockDim.x;
            if (c < d) {
                dx[(size_t)row * d + c] += r * (dr[c] * g[c] - xr[c] * r * mean);
                gain[k] += dr[c] * xr[c] * r;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < kCols; k++) {
        int c = c0 + k * blockDim.x;
        if (c < d) partials[(size_t)blockIdx.x * d + c] = gain[k];
    }
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
// Quick GELU: x * sigmoid(1.702 x).

extern "C" __global__ void gelu_forward(float* out, const float* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i];
        out[i] = v / (1.0f + expf(-1.702f * v));
    }
}

extern "C" __global__ void gelu_backward_inplace(float* dout, const float* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i], s = 1.0f / (1.0f + expf(-1.702f * v));
        dout[i] *= s + 1.702f * v * s * (1.0f - s);
    }
}

// ---------------------------------------------------------------------------------------
// Softmax cross-entropy over the palette, one block per row. With `with_grad`, the logits
// become grad_scale * weight * (softmax - onehot). `weights` may be null (weight 1).

extern "C" __global__ void cross_entropy(float* logits, float* losses, const uint16_t* targets,
                                         const float* weights, int v, int with_grad,
                                         float grad_scale) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    float* z = logits + row * v;
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
    if (with_grad) {
        float k = grad_scale * w;
        for (int c = threadIdx.x; c < v; c += blockDim.x)
            z[c] = k * (expf(z[c] - m) / s - (c == target ? 1.0f : 0.0f));
    }
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
// (batch * len, n_head), 128 threads; dynamic shared memory: (n_ctx + head_dim +
// max(128, head_dim)) floats.
// Scores: one warp per key, its lanes across head_dim, so each key row is read in whole
// contiguous pieces. Values: the threads split into groups of head_dim, each group summing
// every groups-th key, then the groups' partial sums are added.
template <typename E>
__device__ void attend(float* out, const E* k_cache, const E* v_cache, const float* qkv,
                       int n_head, int head_dim, int n_ctx, int pos, const int* pos_at, int len) {
    extern __shared__ float dynamic[];
    __shared__ float shared[32];
    float *scores = dynamic, *q = dynamic + n_ctx, *partial = q + head_dim;
    int r = blockIdx.x, h = blockIdx.y, b = r / len;
    int n = first_position(pos, pos_at) + r % len + 1;
    int d = n_head * head_dim;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float* row = qkv + (size_t)r * 3 * d;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) q[c] = row[h * head_dim + c];
    __syncthreads();
    size_t base = ((size_t)b * n_head + h) * n_ctx * head_dim;
    float scale = rsqrtf((float)head_dim), m = -INFINITY;
    for (int j = warp; j < n; j += warps) {
        size_t key = base + (size_t)j * head_dim;
        float s = 0.0f;
        for (int c = lane; c < head_dim; c += 32) s += q[c] * load(k_cache, key + c);
        s = warp_sum(s) * scale;
        if (lane == 0) scores[j] = s;
        m = fmaxf(m, s);
    }
    // block_max's barriers also publish the scores.
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = expf(scores[j] - m);
        scores[j] = e;
        sum += e;
    }
    sum = block_sum(sum, shared);
    __syncthreads();
    int groups = max(1, (int)blockDim.x / head_dim);
    int group = threadIdx.x / head_dim, c0 = threadIdx.x % head_dim;
    if (groups == 1) {
        // head_dim >= blockDim: every thread takes whole columns, over every key.
        for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < n; j++) acc += scores[j] * load(v_cache, base + (size_t)j * head_dim + c);
            partial[c] = acc;
        }
    } else if (group < groups) {
        float acc = 0.0f;
        for (int j = group; j < n; j += groups)
            acc += scores[j] * load(v_cache, base + (size_t)j * head_dim + c0);
        partial[group * head_dim + c0] = acc;
    }
    __syncthreads();
    float inv = 1.0f / sum;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
        float acc = 0.0f;
        for (int g = 0; g < groups; g++) acc += partial[g * head_dim + c];
        out[(size_t)r * d + h * head_dim + c] = acc * inv;
    }
}

extern "C" __global__ void attend_f32(float* out, const float* k, const float* v,
                                      const float* qkv, int n_head, int head_dim, int n_ctx,
                                      int pos, const int* pos_at, int len) {
    attend(out, k, v, qkv, n_head, head_dim, n_ctx, pos, pos_at, len);
}

extern "C" __global__ void attend_bf16(float* out, const bf16_bits* k, const bf16_bits* v,
                                       const float* qkv, int n_head, int head_dim, int n_ctx,
                                       int pos, const int* pos_at, int len) {
    attend(out, k, v, qkv, n_head, head_dim, n_ctx, pos, pos_at, len);
}

// ---------------------------------------------------------------------------------------
// Flash attention (training and full forward passes): the attention of every sequence and
// head without the T x T scores in global memory, FlashAttention-2 style. Products are bf16
// 16x16x16 tensor-core tiles (nvcuda::wmma) with f32 accumulation: Q, K, V (and dout) are
// read from their f32 rows and rounded to bf16 into shared memory; softmax statistics,
// rescaling and the outputs stay f32. No kernel adds into global memory with atomics, so a
// pass gives the same bits every time it runs.
//
// Shapes as AttnShape: qkv [batch * t, 3d] (columns Q | K | V, each n_head groups of
// head_dim), out and dout [batch * t, d], lse and delta [batch, n_head, t]; causal masks
// keys j > i. head_dim: a multiple of 16 from 16 to 128; t: any (the last tile is padded
// with zeros and masked). Dynamic shared memory only, under 48 KiB (no opt-in), laid out
// from `dynamic`; every wmma pointer is 32-byte aligned.

typedef __nv_bfloat16 bf16;

// The dynamic shared memory, declared as attend<E> declares it (C++ linkage: a declaration
// inside an extern "C" kernel would conflict with it). The flash kernels have no static
// shared memory, so it starts at the window's base, aligned for every wmma pointer.
__device__ __forceinline__ float* flash_dynamic() {
    extern __shared__ float dynamic[];
    return dynamic;
}

namespace flash {
constexpr int kTile = 16;                   // wmma tile edge
constexpr int kWarps = 2;                   // warps per block, 16 rows (or keys) each
constexpr int kRows = kTile * kWarps;       // query rows (or keys) a block owns
constexpr int kStep = 32;                   // keys (or query rows) per step of the loop
using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
using RowA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16,
                                    nvcuda::wmma::row_major>;
using RowB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16,
                                    nvcuda::wmma::row_major>;
using ColB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16,
                                    nvcuda::wmma::col_major>;

// `tile` [16, 32] (f32, row stride 32) = a [16, hd] times b^T, b [32, hd] (both bf16, row
// stride hd): 16 rows against 32 others, in two 16-column halves.
__device__ __forceinline__ void product_nt(float* tile, const bf16* a, const bf16* b, int hd) {
    using namespace nvcuda;
    for (int n = 0; n < kStep / kTile; n++) {
        Accumulator acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < hd; kk += kTile) {
            RowA x;
            ColB y;
            wmma::load_matrix_sync(x, a + kk, hd);
            wmma::load_matrix_sync(y, b + n * kTile * hd + kk, hd);
            wmma::mma_sync(acc, x, y, acc);
        }
        wmma::store_matrix_sync(tile + n * kTile, acc, kStep, wmma::mem_row_major);
    }
}

// acc[n] += a [16, 32] (bf16, row stride 32) times columns 16n .. 16n + 15 of b [32, hd]
// (bf16, row stride hd), for every 16-column tile of the head (hd <= 16 kTiles). Unrolled
// to kTiles, so the accumulators stay in registers.
template <int kTiles>
__device__ __forceinline__ void accumulate_nn(Accumulator (&acc)[kTiles], const bf16* a,
                                              const bf16* b, int hd) {
    using namespace nvcuda;
#pragma unroll
    for (int n = 0; n < kTiles; n++) {
        if (n * kTile >= hd) break;
#pragma unroll
        for (int kk = 0; kk < kStep; kk += kTile) {
            RowA x;
            RowB y;
            wmma::load_matrix_sync(x, a + kk, kStep);
            wmma::load_matrix_sync(y, b + kk * hd + n * kTile, hd);
            wmma::mma_sync(acc[n], x, y, acc[n]);
        }
    }
}

// Writes the warp's [16, hd] accumulators to `rows` (f32, row stride `stride`) for the
// first `valid` of the 16 rows, through `scratch` ([16, 16] f32, 32-byte aligned).
template <int kTiles>
__device__ __forceinline__ void write_rows(float* rows, size_t stride, int valid,
                                           const Accumulator (&acc)[kTiles], float* scratch,
                                           int hd) {
    using namespace nvcuda;
    const int lane = threadIdx.x & 31;
    __syncwarp();  // every lane is done reading `scratch` (the dK, dV kernel's last P tile)
#pragma unroll
    for (int n = 0; n < kTiles; n++) {
        if (n * kTile >= hd) break;
        wmma::store_matrix_sync(scratch, acc[n], kTile, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < kTile * kTile; e += 32) {
            int r = e / kTile, c = e % kTile;
            if (r < valid) rows[(size_t)r * stride + n * kTile + c] = scratch[e];
        }
        __syncwarp();
    }
}

// Rounds `rows` rows of one head (from `first`, `hd` columns at `src` + row * stride) into
// `dst` [rows, hd] bf16; rows from `limit` on are zeros. All the block's threads take part,
// each reading four columns at once where the rows start on 16 bytes (always, for the
// engine's buffers: they are 64-byte aligned and heads are 16 columns wide).
__device__ __forceinline__ void load_rows(bf16* dst, const float* src, size_t stride,
                                          int first, int limit, int rows, int hd) {
    if ((uintptr_t)src % 16 == 0 && stride % 4 == 0) {
        const int pieces = hd / 4, per_pass = blockDim.x / pieces, c = threadIdx.x % pieces * 4;
        if (threadIdx.x >= per_pass * pieces) return;
        for (int r = threadIdx.x / pieces; r < rows; r += per_pass) {
            int i = first + r;
            float4 v = i < limit ? *(const float4*)(src + (size_t)i * stride + c)
                                 : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            bf16* o = dst + r * hd + c;
            o[0] = __float2bfloat16(v.x);
            o[1] = __float2bfloat16(v.y);
            o[2] = __float2bfloat16(v.z);
            o[3] = __float2bfloat16(v.w);
        }
        return;
    }
    for (int e = threadIdx.x; e < rows * hd; e += blockDim.x) {
        int i = first + e / hd, c = e % hd;
        dst[e] = __float2bfloat16(i < limit ? src[(size_t)i * stride + c] : 0.0f);
    }
}
}  // namespace flash

// Dynamic shared bytes of flash_attention_forward: Q, K, V tiles (bf16) [32, head_dim] each,
// the output's scratch (f32) [32, head_dim], and per warp scores (f32) and probabilities
// (bf16) [16, 32]. 320 * head_dim + 6144: 47,104 bytes at head_dim 128.
__host__ __device__ constexpr size_t flash_forward_shared_bytes(int head_dim) {
    return (size_t)head_dim * (flash::kRows * 2 + 2 * flash::kStep * 2 + flash::kRows * 4) +
           (size_t)flash::kWarps * flash::kTile * flash::kStep * (4 + 2);
}

// Dynamic shared bytes of each backward kernel (flash_attention_backward_kv and _q): four
// [32, head_dim] bf16 tiles (the block's own rows of two inputs, a step's rows of two
// others), per warp two [16, 32] f32 tiles (scores and their gradient, overwritten by their
// bf16 roundings), and lse and delta of 32 rows. 256 * head_dim + 8448: 41,216 bytes at 128.
__host__ __device__ constexpr size_t flash_backward_shared_bytes(int head_dim) {
    return (size_t)head_dim * 4 * flash::kRows * 2 +
           (size_t)flash::kWarps * 2 * flash::kTile * flash::kStep * 4 + flash::kStep * 8;
}

// Forward (flash_attention_forward_64 and _128): out (f32) and lse. Launch: grid
// (ceil(t / 32), n_head, batch), block 64 threads (2 warps), dynamic shared memory
// flash_forward_shared_bytes(head_dim).
//
// Block (x, h, b) owns query rows 32x .. 32x + 31 of sequence b, head h; warp w the 16 rows
// from 32x + 16w. Per step of 32 keys (causal: only up to the block's last row) the block
// loads K and V; each warp with a visible key in the step computes S = Q K^T (f32), updates
// its rows' running max m and sum l (a row is two lanes, 16 columns each) and adds P V, P
// rounded to bf16, into its output tiles. Those stay in registers; they go through shared
// memory to be rescaled by exp(m_old - m_new) only at steps where a row's maximum grew.
template <int kTiles>
__device__ void flash_forward(float* out, float* lse, const float* qkv, int t, int n_head,
                              int head_dim, int causal) {
    using namespace nvcuda;
    using namespace flash;
    float* dynamic = flash_dynamic();
    const int hd = head_dim, d = n_head * hd;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kRows;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    bf16* qs = (bf16*)dynamic;                            // [32, hd]
    bf16* ks = qs + kRows * hd;                           // [32, hd]
    bf16* vs = ks + kStep * hd;                           // [32, hd]
    float* os = (float*)(vs + kStep * hd);                // [32, hd]
    float* ss = os + kRows * hd;                          // [warps][16, 32]
    bf16* ps = (bf16*)(ss + kWarps * kTile * kStep);      // [warps][16, 32]
    const float* seq = qkv + (size_t)b * t * 3 * d + h * hd;

    load_rows(qs, seq, 3 * d, q0, t, kRows, hd);
    bf16* qw = qs + warp * kTile * hd;
    float* ow = os + warp * kTile * hd;
    float* sw = ss + warp * kTile * kStep;
    bf16* pw = ps + warp * kTile * kStep;
    Accumulator o[kTiles];
#pragma unroll
    for (int n = 0; n < kTiles; n++) wmma::fill_fragment(o[n], 0.0f);
    // This lane's row (r, query i) and half of the step's columns.
    const int r = lane >> 1, half = lane & 1, i = q0 + warp * kTile + r;
    const int warp_first = q0 + warp * kTile, warp_last = min(warp_first + kTile, t) - 1;
    const float scale = rsqrtf((float)hd);
    float m = -INFINITY, l = 0.0f;
    const int key_end = causal ? min(t, q0 + kRows) : t;
    for (int k0 = 0; k0 < key_end; k0 += kStep) {
        __syncthreads();  // the previous step's K and V are used up
        load_rows(ks, seq + d, 3 * d, k0, t, kStep, hd);
        load_rows(vs, seq + 2 * d, 3 * d, k0, t, kStep, hd);
        __syncthreads();
        // Warp-uniform: the warp has rows, and (causal) one of them sees a key of the step.
        if (warp_first >= t || (causal && k0 > warp_last)) continue;

        product_nt(sw, qw, ks, hd);
        __syncwarp();

        float s[16], mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < 16; c++) {
            int col = half * 16 + c, j = k0 + col;
            bool visible = i < t && j < t && (!causal || j <= i);
            s[c] = visible ? sw[r * kStep + col] * scale : -INFINITY;
            mx = fmaxf(mx, s[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        float m_new = fmaxf(m, mx);
        float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
        float alpha = expf(m - m_use), sum = 0.0f;
#pragma unroll
        for (int c = 0; c < 16; c++) {
            float p = expf(s[c] - m_use);
            sum += p;
            pw[r * kStep + half * 16 + c] = __float2bfloat16(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        // A row that has summed nothing yet has an output of zeros: nothing to rescale.
        const bool rescale = alpha != 1.0f && l != 0.0f;
        l = l * alpha + sum;
        m = m_new;
        if (warp_max(rescale ? 1.0f : 0.0f) != 0.0f) {
#pragma unroll
            for (int n = 0; n < kTiles; n++)
                if (n * kTile < hd)
                    wmma::store_matrix_sync(ow + n * kTile, o[n], hd, wmma::mem_row_major);
            __syncwarp();
            if (rescale)
                for (int c = half; c < hd; c += 2) ow[r * hd + c] *= alpha;
            __syncwarp();
#pragma unroll
            for (int n = 0; n < kTiles; n++)
                if (n * kTile < hd)
                    wmma::load_matrix_sync(o[n], ow + n * kTile, hd, wmma::mem_row_major);
        }
        __syncwarp();  // every lane's probabilities are in pw
        accumulate_nn(o, pw, vs, hd);
    }
#pragma unroll
    for (int n = 0; n < kTiles; n++)
        if (n * kTile < hd) wmma::store_matrix_sync(ow + n * kTile, o[n], hd, wmma::mem_row_major);
    __syncwarp();
    if (i < t) {
        float inv = 1.0f / l;
        float* orow = out + ((size_t)b * t + i) * d + h * hd;
        for (int c = half; c < hd; c += 2) orow[c] = ow[r * hd + c] * inv;
        if (half == 0) lse[((size_t)b * n_head + h) * t + i] = m + logf(l);
    }
}

// Backward, first pass: delta[b, h, i] = sum over head h's columns of dout * out. Launch:
// grid (batch * t), block 128 threads, no dynamic shared memory.
extern "C" __global__ void flash_attention_backward_prepare(float* delta, const float* dout,
                                                            const float* out, int t,
                                                            int n_head, int head_dim) {
    size_t row = blockIdx.x;
    int d = n_head * head_dim, b = row / t, i = row % t;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int h = warp; h < n_head; h += warps) {
        const float *dr = dout + row * d + h * head_dim, *orow = out + row * d + h * head_dim;
        float s = 0.0f;
        for (int c = lane; c < head_dim; c += 32) s += dr[c] * orow[c];
        s = warp_sum(s);
        if (lane == 0) delta[((size_t)b * n_head + h) * t + i] = s;
    }
}

// The backward's two products of a tile pair, as both backward kernels need them: the warp's
// 16 rows of `own` ([16, hd] bf16: Q for dQ, K for dK and dV) against the step's 32 rows of
// `other` (K or Q), and of `own_grad` (dout or V) against `other_grad` (V or dout), into
// `s` and `dp` ([16, 32] f32 each). Each lane then turns 16 of the 512 entries into the
// probability p = exp(scale s - lse) (0 where masked) and dS = p (dp - delta), and after
// every lane has read, writes scale * dS (bf16) over the start of `dp` and, where `p_out`,
// p (bf16) over the start of `s`. `query_of(e)` and `key_of(e)` give entry e's query row
// and key; `stat_of(e)` its row in lse_s and delta_s.
template <typename Query, typename Key, typename Stat>
__device__ __forceinline__ void flash_scores(float* s, float* dp, const bf16* own,
                                             const bf16* other, const bf16* own_grad,
                                             const bf16* other_grad, const float* lse_s,
                                             const float* delta_s, int hd, int t, int causal,
                                             bool p_out, Query query_of, Key key_of,
                                             Stat stat_of) {
    using namespace flash;
    const int lane = threadIdx.x & 31;
    const float scale = rsqrtf((float)hd);
    product_nt(s, own, other, hd);
    product_nt(dp, own_grad, other_grad, hd);
    __syncwarp();
    constexpr int kPerLane = kTile * kStep / 32;
    float p[kPerLane], ds[kPerLane];
#pragma unroll
    for (int u = 0; u < kPerLane; u++) {
        int e = lane + 32 * u, i = query_of(e), j = key_of(e), st = stat_of(e);
        bool visible = i < t && j < t && (!causal || j <= i);
        p[u] = visible ? expf(s[e] * scale - lse_s[st]) : 0.0f;
        ds[u] = p[u] * (dp[e] - delta_s[st]) * scale;
    }
    __syncwarp();  // every lane has read s and dp
    bf16 *pb = (bf16*)s, *dsb = (bf16*)dp;
#pragma unroll
    for (int u = 0; u < kPerLane; u++) {
        int e = lane + 32 * u;
        if (p_out) pb[e] = __float2bfloat16(p[u]);
        dsb[e] = __float2bfloat16(ds[u]);
    }
    __syncwarp();
}

// Backward, dK and dV (flash_attention_backward_kv_64 and _128), written into dqkv's K and V
// columns, from dout, qkv, lse and delta. Launch: grid (ceil(t / 32), n_head, batch), block
// 64 threads (2 warps), dynamic shared memory flash_backward_shared_bytes(head_dim).
//
// Block (x, h, b) owns keys 32x .. 32x + 31, warp w the 16 from 32x + 16w, and loops over the
// steps of 32 query rows that see them (causal: from row 32x on). Per step, each warp with a
// visible pair: S^T = K Q^T and dP^T = V dout^T, P^T = exp(scale S^T - lse) (masked: 0),
// dS^T = P^T (dP^T - delta); then dV += P^T dout and dK += scale dS^T Q, in registers.
template <int kTiles>
__device__ void flash_backward_kv(float* dqkv, const float* dout, const float* qkv,
                                  const float* lse, const float* delta, int t, int n_head,
                                  int head_dim, int causal) {
    using namespace nvcuda;
    using namespace flash;
    float* dynamic = flash_dynamic();
    const int hd = head_dim, d = n_head * hd;
    const int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * kRows;
    const int warp = threadIdx.x >> 5;
    bf16* ks = (bf16*)dynamic;                     // [32 keys, hd]
    bf16* vs = ks + kRows * hd;                    // [32 keys, hd]
    bf16* qs = vs + kRows * hd;                    // [32 rows, hd]
    bf16* dos = qs + kStep * hd;                   // [32 rows, hd]
    float* sw = (float*)(dos + kStep * hd) + warp * 2 * kTile * kStep;  // [16, 32]
    float* dpw = sw + kTile * kStep;                                     // [16, 32]
    float* lse_s = (float*)(dos + kStep * hd) + kWarps * 2 * kTile * kStep;  // [32]
    float* delta_s = lse_s + kStep;                                           // [32]
    const float* seq = qkv + (size_t)b * t * 3 * d + h * hd;
    const float* dseq = dout + (size_t)b * t * d + h * hd;
    const size_t stats = ((size_t)b * n_head + h) * t;

    load_rows(ks, seq + d, 3 * d, k0, t, kRows, hd);
    load_rows(vs, seq + 2 * d, 3 * d, k0, t, kRows, hd);
    Accumulator dk[kTiles], dv[kTiles];
#pragma unroll
    for (int n = 0; n < kTiles; n++) {
        wmma::fill_fragment(dk[n], 0.0f);
        wmma::fill_fragment(dv[n], 0.0f);
    }
    const int kw = k0 + warp * kTile;  // the warp's first key
    const bf16 *kw_s = ks + warp * kTile * hd, *vw_s = vs + warp * kTile * hd;
    for (int q0 = causal ? k0 : 0; q0 < t; q0 += kStep) {
        __syncthreads();  // the previous step's Q and dout are used up
        load_rows(qs, seq, 3 * d, q0, t, kStep, hd);
        load_rows(dos, dseq, d, q0, t, kStep, hd);
        for (int r = threadIdx.x; r < kStep; r += blockDim.x) {
            lse_s[r] = q0 + r < t ? lse[stats + q0 + r] : 0.0f;
            delta_s[r] = q0 + r < t ? delta[stats + q0 + r] : 0.0f;
        }
        __syncthreads();
        // Warp-uniform: the warp has keys, and (causal) a row of the step sees one.
        if (kw >= t || (causal && q0 + kStep - 1 < kw)) continue;
        // Entry e of the [16 keys, 32 rows] tiles: key kw + e / 32, query row q0 + e % 32.
        flash_scores(
            sw, dpw, kw_s, qs, vw_s, dos, lse_s, delta_s, hd, t, causal, true,
            [&](int e) { return q0 + e % kStep; }, [&](int e) { return kw + e / kStep; },
            [&](int e) { return e % kStep; });
        accumulate_nn(dv, (const bf16*)sw, dos, hd);
        accumulate_nn(dk, (const bf16*)dpw, qs, hd);
    }
    const int valid = max(0, min(kTile, t - kw));
    float* rows = dqkv + ((size_t)b * t + kw) * 3 * d + h * hd;
    write_rows(rows + d, 3 * d, valid, dk, sw, hd);
    write_rows(rows + 2 * d, 3 * d, valid, dv, sw, hd);
}

// Backward, dQ (flash_attention_backward_q_64 and _128), written into dqkv's Q columns, from
// dout, qkv, lse and delta. Launch: as the dK and dV kernel.
//
// Block (x, h, b) owns query rows 32x .. 32x + 31, warp w the 16 from 32x + 16w, and loops
// over the steps of 32 keys they see (causal: up to the block's last row). Per step, each
// warp with a visible pair recomputes S = Q K^T, dP = dout V^T, P and dS as the dK, dV
// kernel does, and adds scale dS K into its dQ, in registers. Recomputing costs two
// products per tile pair; it buys dQ without atomic adds from many blocks.
template <int kTiles>
__device__ void flash_backward_q(float* dqkv, const float* dout, const float* qkv,
                                 const float* lse, const float* delta, int t, int n_head,
                                 int head_dim, int causal) {
    using namespace nvcuda;
    using namespace flash;
    float* dynamic = flash_dynamic();
    const int hd = head_dim, d = n_head * hd;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kRows;
    const int warp = threadIdx.x >> 5;
    bf16* qs = (bf16*)dynamic;                     // [32 rows, hd]
    bf16* dos = qs + kRows * hd;                   // [32 rows, hd]
    bf16* ks = dos + kRows * hd;                   // [32 keys, hd]
    bf16* vs = ks + kStep * hd;                    // [32 keys, hd]
    float* sw = (float*)(vs + kStep * hd) + warp * 2 * kTile * kStep;  // [16, 32]
    float* dpw = sw + kTile * kStep;                                    // [16, 32]
    float* lse_s = (float*)(vs + kStep * hd) + kWarps * 2 * kTile * kStep;  // [32]
    float* delta_s = lse_s + kRows;                                          // [32]
    const float* seq = qkv + (size_t)b * t * 3 * d + h * hd;
    const float* dseq = dout + (size_t)b * t * d + h * hd;
    const size_t stats = ((size_t)b * n_head + h) * t;

    load_rows(qs, seq, 3 * d, q0, t, kRows, hd);
    load_rows(dos, dseq, d, q0, t, kRows, hd);
    for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
        lse_s[r] = q0 + r < t ? lse[stats + q0 + r] : 0.0f;
        delta_s[r] = q0 + r < t ? delta[stats + q0 + r] : 0.0f;
    }
    Accumulator dq[kTiles];
#pragma unroll
    for (int n = 0; n < kTiles; n++) wmma::fill_fragment(dq[n], 0.0f);
    const int qw = q0 + warp * kTile;  // the warp's first row
    const int warp_last = min(qw + kTile, t) - 1;
    const bf16 *qw_s = qs + warp * kTile * hd, *dow_s = dos + warp * kTile * hd;
    const int key_end = causal ? min(t, q0 + kRows) : t;
    for (int k0 = 0; k0 < key_end; k0 += kStep) {
        __syncthreads();  // the previous step's K and V are used up (and, first, Q is in)
        load_rows(ks, seq + d, 3 * d, k0, t, kStep, hd);
        load_rows(vs, seq + 2 * d, 3 * d, k0, t, kStep, hd);
        __syncthreads();
        // Warp-uniform: the warp has rows, and (causal) one of them sees a key of the step.
        if (qw >= t || (causal && k0 > warp_last)) continue;
        // Entry e of the [16 rows, 32 keys] tiles: query row qw + e / 32, key k0 + e % 32.
        flash_scores(
            sw, dpw, qw_s, ks, dow_s, vs, lse_s, delta_s, hd, t, causal, false,
            [&](int e) { return qw + e / kStep; }, [&](int e) { return k0 + e % kStep; },
            [&](int e) { return warp * kTile + e / kStep; });
        accumulate_nn(dq, (const bf16*)dpw, ks, hd);
    }
    const int valid = max(0, min(kTile, t - qw));
    write_rows(dqkv + ((size_t)b * t + qw) * 3 * d + h * hd, 3 * d, valid, dq, sw, hd);
}

// The kernels, one for each widest head they serve (_64: heads up to 64 columns, _128: up to
// 128): fewer accumulator tiles take fewer registers, so more blocks fit on a multiprocessor.
extern "C" __global__ void flash_attention_forward_64(float* out, float* lse, const float* qkv,
                                                      int t, int n_head, int head_dim,
                                                      int causal) {
    flash_forward<64 / flash::kTile>(out, lse, qkv, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_forward_128(float* out, float* lse,
                                                       const float* qkv, int t, int n_head,
                                                       int head_dim, int causal) {
    flash_forward<128 / flash::kTile>(out, lse, qkv, t, n_head, head_dim, causal);
}
extern "C" __global__ void flash_attention_backward_kv_64(float* dqkv, const float* dout,
                                                          const float* qkv, const float* lse,
                                                          const float* delta, int t,
                                                          int n_head, int head_dim,
                                                          int causal) {
    flash_backward_kv<64 / flash::kTile>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim,
                                         causal);
}
extern "C" __global__ void flash_attention_backward_kv_128(float* dqkv, const float* dout,
                                                           const float* qkv, const float* lse,
                                                           const float* delta, int t,
                                                           int n_head, int head_dim,
                                                           int causal) {
    flash_backward_kv<128 / flash::kTile>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim,
                                          causal);
}
extern "C" __global__ void flash_attention_backward_q_64(float* dqkv, const float* dout,
                                                         const float* qkv, const float* lse,
                                                         const float* delta, int t,
                                                         int n_head, int head_dim,
                                                         int causal) {
    flash_backward_q<64 / flash::kTile>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim,
                                        causal);
}
extern "C" __global__ void flash_attention_backward_q_128(float* dqkv, const float* dout,
                                                          const float* qkv, const float* lse,
                                                          const float* delta, int t,
                                                          int n_head, int head_dim,
                                                          int causal) {
    flash_backward_q<128 / flash::kTile>(dqkv, dout, qkv, lse, delta, t, n_head, head_dim,
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
