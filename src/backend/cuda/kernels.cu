// igpt's CUDA kernels: everything of the backend trait but the matrix products (cuBLAS).
// Compiled to PTX by scripts/build_ptx.sh; the PTX is committed and embedded in the binary.
// Every kernel is plain f32 arithmetic; bfloat16 appears only as storage (u16 bits).

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

// Content gradients, scattered with atomics (rows sharing an id add in any order).
extern "C" __global__ void embed_backward_content(float* dwte, float* dsos, const float* dout,
                                                  const uint16_t* ids, int t_len, int d,
                                                  int n_vocab, int direct) {
    int row = blockIdx.x, t = row % t_len;
    float* target;
    if (direct) {
        int id = ids[row];
        target = id < n_vocab ? dwte + (size_t)id * d : (id == n_vocab ? dsos : nullptr);
    } else if (t == 0) {
        target = dsos;
    } else {
        int id = ids[row - 1];
        target = id < n_vocab ? dwte + (size_t)id * d : nullptr;
    }
    if (!target) return;
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        atomicAdd(target + c, dout[(size_t)row * d + c]);
}

// Decoding inputs of positions pos..pos+len: row r is (p == 0 ? sos : wte[prev[r]]) + wpe[p]
// with p = pos + r % len.
extern "C" __global__ void embed_step(float* out, const uint16_t* prev, const float* wte,
                                      const float* wpe, const float* sos, int pos, int len,
                                      int d, int n_vocab) {
    int row = blockIdx.x, p = pos + row % len;
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

// dx += rstd * (dout*g - xhat * mean(dout*g*xhat)), xhat = x * rstd; one block per row.
extern "C" __global__ void rmsnorm_backward_input(float* dx, const float* dout, const float* x,
                                                  const float* rstd, const float* g, int d) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    const float *xr = x + row * d, *dr = dout + row * d;
    float r = rstd[row];
    float s = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) s += dr[c] * g[c] * xr[c];
    float mean = block_sum(s, shared) * r / d;
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        dx[row * d + c] += r * (dr[c] * g[c] - xr[c] * r * mean);
}

// dg += sum over rows of dout * x * rstd. Grid (ceil(d/256), ceil(rows/rows_per_block)).
extern "C" __global__ void rmsnorm_backward_gain(float* dg, const float* dout, const float* x,
                                                 const float* rstd, int rows, int d,
                                                 int rows_per_block) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    int r0 = blockIdx.y * rows_per_block, r1 = min(rows, r0 + rows_per_block);
    float s = 0.0f;
    for (int r = r0; r < r1; r++) s += dout[(size_t)r * d + c] * x[(size_t)r * d + c] * rstd[r];
    atomicAdd(dg + c, s);
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

extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, size_t n,
                                 float lr, float beta1, float beta2, float eps, float wd,
                                 float grad_scale, float bc1, float bc2) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p[i]);
    }
}

// Up to 64 parameter tensors updated by one launch: element ranges of the arenas, and
// whether weight decay applies. Passed by value (1,288 bytes of kernel parameters).
#define ADAM_TABLE 64
struct AdamTable {
    unsigned long long start[ADAM_TABLE];
    unsigned long long len[ADAM_TABLE];
    float decay[ADAM_TABLE];
    int count;
};

// AdamW on every tensor of `table`. Grid (blocks, table.count): blockIdx.y picks the tensor,
// the x blocks stride over it.
extern "C" __global__ void adamw_tensors(float* p, const float* g, float* m, float* v,
                                         AdamTable table, float lr, float beta1, float beta2,
                                         float eps, float wd, float grad_scale, float bc1,
                                         float bc2) {
    int t = blockIdx.y;
    if (t >= table.count) return;
    size_t start = table.start[t], n = table.len[t];
    float decay = table.decay[t] * wd;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t k = start + i;
        float gi = g[k] * grad_scale;
        float mi = beta1 * m[k] + (1.0f - beta1) * gi;
        float vi = beta2 * v[k] + (1.0f - beta2) * gi * gi;
        m[k] = mi;
        v[k] = vi;
        p[k] -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + decay * p[k]);
    }
}

// Adds the sum of squares of x, in f64, into *out (zeroed by the caller).
extern "C" __global__ void sum_squares(double* out, const float* x, size_t n) {
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
        if (lane == 0) atomicAdd(out, s);
    }
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

// Stores the keys and values of positions pos..pos+len. Grid (batch * len, n_head).
template <typename E>
__device__ void kv_store(E* k_cache, E* v_cache, const float* qkv, int n_head, int head_dim,
                         int n_ctx, int pos, int len) {
    int r = blockIdx.x, h = blockIdx.y, b = r / len, p = pos + r % len;
    int d = n_head * head_dim;
    const float* row = qkv + (size_t)r * 3 * d;
    size_t base = (((size_t)b * n_head + h) * n_ctx + p) * head_dim;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
        store(k_cache, base + c, row[d + h * head_dim + c]);
        store(v_cache, base + c, row[2 * d + h * head_dim + c]);
    }
}

extern "C" __global__ void kv_store_f32(float* k, float* v, const float* qkv, int n_head,
                                        int head_dim, int n_ctx, int pos, int len) {
    kv_store(k, v, qkv, n_head, head_dim, n_ctx, pos, len);
}

extern "C" __global__ void kv_store_bf16(bf16_bits* k, bf16_bits* v, const float* qkv,
                                         int n_head, int head_dim, int n_ctx, int pos, int len) {
    kv_store(k, v, qkv, n_head, head_dim, n_ctx, pos, len);
}

// Attention of each new position over the cached positions up to itself. Grid
// (batch * len, n_head), 128 threads; dynamic shared memory: (n_ctx + head_dim +
// max(128, head_dim)) floats.
// Scores: one warp per key, its lanes across head_dim, so each key row is read in whole
// contiguous pieces. Values: the threads split into groups of head_dim, each group summing
// every groups-th key, then the groups' partial sums are added.
template <typename E>
__device__ void attend(float* out, const E* k_cache, const E* v_cache, const float* qkv,
                       int n_head, int head_dim, int n_ctx, int pos, int len) {
    extern __shared__ float dynamic[];
    __shared__ float shared[32];
    float *scores = dynamic, *q = dynamic + n_ctx, *partial = q + head_dim;
    int r = blockIdx.x, h = blockIdx.y, b = r / len, n = pos + r % len + 1;
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
                                      int pos, int len) {
    attend(out, k, v, qkv, n_head, head_dim, n_ctx, pos, len);
}

extern "C" __global__ void attend_bf16(float* out, const bf16_bits* k, const bf16_bits* v,
                                       const float* qkv, int n_head, int head_dim, int n_ctx,
                                       int pos, int len) {
    attend(out, k, v, qkv, n_head, head_dim, n_ctx, pos, len);
}
