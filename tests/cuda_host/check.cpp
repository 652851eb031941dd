// Runs every kernel of src/backend/cuda/kernels.cu on the host (through shim.h) with the
// launch configuration src/backend/cuda/mod.rs uses, and compares it with a plain reference
// written from the CPU backend's semantics (src/backend/cpu). Prints one line per kernel and
// exits non-zero if any kernel fails.
//
//   g++ -std=c++17 -O2 -pthread -fno-extern-tls-init tests/cuda_host/check.cpp -o check
//   ./check
//
// (tests/cuda_kernels_on_host.rs does this; see shim.h for -fno-extern-tls-init.)
//
// Shapes are small and deliberately not multiples of 16 or 32, so idle threads, partial
// warps of work and grid-stride loops are all exercised. Outputs start as NaN (or a NaN
// bfloat16 pattern), so an element a kernel forgets to write fails. Each check runs twice,
// with the block's threads scheduled in ascending and in descending order (see shim.h).
// Launches mirror mod.rs: per_row = one block of 256 threads per row, per_warp_row = one warp
// per row in blocks of 256, elementwise = blocks of 256 (plus a 3-block grid for the
// grid-stride loops), and the special grids of
// embed_backward_positions, rmsnorm_backward, sum_squares and attention_step. The
// flash attention kernels run with the launch configurations documented above them in
// kernels.cu, which mod.rs's flash_launch gives.
//
// References compute in double where a kernel reduces; "error" is |got - want| relative to
// |want|, with a floor of 1e-2 of the largest |want| of the output (entries that cancel to
// almost nothing are judged against the output's scale). Kernels that only move or round
// values must match bit for bit (tolerance 0).

#include "shim.h"

// -DKERNELS_CU='"path"' checks another copy of the kernels (a mutated one, to see a check fail).
#ifdef KERNELS_CU
#include KERNELS_CU
#else
#include "../../src/backend/cuda/kernels.cu"
#endif

#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <string>

using cuda_host::launch;
using std::vector;

namespace {

// ---------------------------------------------------------------------------------------
// Tolerances. f32 rounding is 6e-8 of a value; with the 1% floor an ulp of the output's
// scale reads as 6e-6. A wrong formula, index or missing term gives errors of order 1.

// A few operations per element (GELU, AdamW, a sum over a handful of rows).
constexpr double kElementwise = 1e-5;
// Sums over a row in f32 (norms, softmax, cross-entropy).
constexpr double kRow = 1e-4;
// Decoding attention: f32 dot products of up to 300 terms feed expf, whose relative error
// is the absolute error of the score.
constexpr double kDecode = 5e-4;

// ---------------------------------------------------------------------------------------
// Results

struct Outcome {
    double worst = 0.0;  // largest error seen
    double tol = 0.0;    // its tolerance (the loosest of the kernel's checks)
    bool pass = true;
    std::string note;    // where the first failure was
};

std::map<std::string, Outcome> outcomes;
vector<std::string> order;

void record(const std::string& kernel, double err, double tol, const std::string& note = "") {
    if (!outcomes.count(kernel)) order.push_back(kernel);
    Outcome& o = outcomes[kernel];
    if (!(err <= tol)) {
        if (o.pass) o.note = note;
        o.pass = false;
    }
    if (!(err <= o.worst)) o.worst = err;  // NaN sticks
    o.tol = std::max(o.tol, tol);
}

// Largest relative error of `got` against `want`; a non-finite value where a finite one is
// wanted is an infinite error. `where` gets the index of the worst element.
double rel_err(const float* got, const double* want, size_t n, size_t* where = nullptr) {
    double scale = 0.0;
    for (size_t i = 0; i < n; i++) scale = std::max(scale, std::fabs(want[i]));
    double floor = std::max(scale * 1e-2, 1e-30), worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = std::isfinite(got[i])
                       ? std::fabs(got[i] - want[i]) / std::max(std::fabs(want[i]), floor)
                       : INFINITY;
        if (!(e <= worst)) {
            worst = e;
            if (where) *where = i;
        }
    }
    return worst;
}

void check(const std::string& kernel, const std::string& what, const vector<float>& got,
           const vector<double>& want, double tol) {
    if (got.size() != want.size()) {
        record(kernel, INFINITY, tol, what + ": size mismatch");
        return;
    }
    size_t i = 0;
    double e = rel_err(got.data(), want.data(), got.size(), &i);
    char note[256];
    snprintf(note, sizeof note, "%s: element %zu is %.9g, want %.9g", what.c_str(), i,
             got.empty() ? 0.0 : got[i], want.empty() ? 0.0 : want[i]);
    record(kernel, e, tol, note);
}

// Bit-exact comparison (error 0 or 1).
template <typename T>
void check_bits(const std::string& kernel, const std::string& what, const vector<T>& got,
                const vector<T>& want) {
    for (size_t i = 0; i < want.size(); i++) {
        if (i >= got.size() || memcmp(&got[i], &want[i], sizeof(T)) != 0) {
            char note[256];
            unsigned long long g = 0, w = 0;
            if (i < got.size()) memcpy(&g, &got[i], sizeof(T));
            memcpy(&w, &want[i], sizeof(T));
            snprintf(note, sizeof note, "%s: element %zu has bits %#llx, want %#llx",
                     what.c_str(), i, g, w);
            record(kernel, 1.0, 0.0, note);
            return;
        }
    }
    record(kernel, 0.0, 0.0);
}

// ---------------------------------------------------------------------------------------
// Inputs

std::mt19937 rng(20240611);

// Values in ±[lo, hi]: never zero, of both signs.
vector<float> random(size_t n, float lo = 0.1f, float hi = 1.0f) {
    std::uniform_real_distribution<float> u(lo, hi);
    std::bernoulli_distribution neg(0.5);
    vector<float> v(n);
    for (float& x : v) x = neg(rng) ? -u(rng) : u(rng);
    return v;
}

vector<float> positive(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> u(lo, hi);
    vector<float> v(n);
    for (float& x : v) x = u(rng);
    return v;
}

vector<uint16_t> ids(size_t n, int below) {
    std::uniform_int_distribution<int> u(0, below - 1);
    vector<uint16_t> v(n);
    for (uint16_t& x : v) x = (uint16_t)u(rng);
    return v;
}

vector<float> nan_f32(size_t n) { return vector<float>(n, NAN); }

// A NaN no rounding produces (to_bf16 sets bit 6 of a NaN), so it marks unwritten elements.
constexpr uint16_t kPoisonBf16 = 0x7f81;

vector<double> widen(const vector<float>& v) { return vector<double>(v.begin(), v.end()); }

// ---------------------------------------------------------------------------------------
// Launch configurations of src/backend/cuda/mod.rs

constexpr unsigned kRowThreads = 256;  // ROW_THREADS

dim3 elementwise_grid(size_t n) {
    return dim3((unsigned)std::min<size_t>(std::max<size_t>((n + 255) / 256, 1), 65535));
}

// With `strided`, three blocks instead: grids cap at 65,535 (1,024 for sum_squares) blocks,
// so large tensors go through the grid-stride loops, which the small shapes here would not.
template <typename... P, typename... A>
void elementwise(bool strided, void (*k)(P...), size_t n, A... args) {
    launch(k, strided ? dim3(3) : elementwise_grid(n), dim3(256), 0, args...);
}

const char* grid_name(bool strided) { return strided ? " (3 blocks)" : ""; }

// The elementwise cases: (elements, strided).
const std::pair<int, bool> kElementwiseCases[] = {{1000, false}, {5001, false}, {5001, true}};

template <typename... P, typename... A>
void per_row(void (*k)(P...), size_t rows, A... args) {
    launch(k, dim3((unsigned)rows), dim3(kRowThreads), 0, args...);
}

// One warp per row, blocks of kRowThreads (the RMS norm's forward kernels).
template <typename... P, typename... A>
void per_warp_row(void (*k)(P...), size_t rows, A... args) {
    const size_t rows_per_block = kRowThreads / 32;
    per_row(k, (rows + rows_per_block - 1) / rows_per_block, args...);
}

// ---------------------------------------------------------------------------------------
// bfloat16 reference: round to nearest, ties to even, decided by comparing the distances to
// the two neighbours exactly (in double) rather than by the kernel's carry trick; a NaN keeps
// its top bits with the quiet bit set, as the `half` crate does.

uint16_t ref_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    if (std::isnan(f)) return (uint16_t)((u >> 16) | 0x40);
    uint32_t down = u & 0xffff0000u;  // toward zero
    if (down == u) return (uint16_t)(u >> 16);
    uint32_t up = down + 0x10000u;    // away from zero (may become infinity: correct)
    double lo = std::fabs((double)__uint_as_float(down));
    double hi = (up & 0x7fffffffu) >= 0x7f800000u ? std::ldexp(1.0, 128)
                                                   : std::fabs((double)__uint_as_float(up));
    double x = std::fabs((double)f);
    if (x - lo < hi - x) return (uint16_t)(down >> 16);
    if (x - lo > hi - x) return (uint16_t)(up >> 16);
    return (uint16_t)(((down >> 16) & 1) ? up >> 16 : down >> 16);
}

// Each value rounded to bfloat16 as the reference rounds (what a _bf16 kernel must store).
vector<uint16_t> rounded(const vector<float>& x) {
    vector<uint16_t> out(x.size());
    for (size_t i = 0; i < x.size(); i++) out[i] = ref_bf16(x[i]);
    return out;
}

double ref_from_bf16(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

// bf16 values as the f32 they hold exactly.
vector<float> widened(const vector<uint16_t>& h) {
    vector<float> out(h.size());
    for (size_t i = 0; i < h.size(); i++) out[i] = (float)ref_from_bf16(h[i]);
    return out;
}

// Values that probe the rounding: ties both ways, negatives, specials, extremes.
vector<float> bf16_probes() {
    vector<uint32_t> bits = {0x3f808000u, 0x3f818000u, 0xbf808000u, 0xbf818000u, 0x3f807fffu,
                             0x3f808001u, 0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x00000001u,
                             0x80000001u, 0x00008000u, 0x00018000u, 0x7f800000u, 0xff800000u,
                             0x7fc00000u, 0x7f800001u, 0xffa12345u, 0x80000000u, 0x00000000u};
    vector<float> v;
    for (uint32_t b : bits) v.push_back(__uint_as_float(b));
    return v;
}

// ---------------------------------------------------------------------------------------
// Memory kernels

void check_memory() {
    for (auto [n, strided] : kElementwiseCases) {
        std::string what = "n " + std::to_string(n) + grid_name(strided);
        // fill: whole buffer, one value.
        vector<float> x = nan_f32(n);
        elementwise(strided, fill_f32, n, x.data(), 0.3f, (size_t)n);
        check_bits("fill_f32", what, x, vector<float>(n, 0.3f));
        vector<uint16_t> h(n, kPoisonBf16);
        elementwise(strided, fill_bf16, n, h.data(), -1.7f, (size_t)n);
        check_bits("fill_bf16", what, h, vector<uint16_t>(n, ref_bf16(-1.7f)));

        // round_bf16: random values plus the probes.
        vector<float> src = random(n, 1e-3f, 1e3f);
        vector<float> probes = bf16_probes();
        std::copy(probes.begin(), probes.end(), src.begin());
        vector<uint16_t> out(n, kPoisonBf16), want(n);
        for (int i = 0; i < n; i++) want[i] = ref_bf16(src[i]);
        elementwise(strided, round_bf16, n, out.data(), (const float*)src.data(), (size_t)n);
        check_bits("round_bf16", what, out, want);
    }
    // pack_weight: [k, n] row-major bf16 from [k, n] (Op::N) or [n, k] (Op::T).
    for (auto [k, n] : {std::pair{50, 37}, std::pair{13, 300}}) {
        vector<float> w = random((size_t)k * n, 1e-2f, 10.0f);
        vector<float> probes = bf16_probes();
        std::copy(probes.begin(), probes.end(), w.begin() + 3);
        for (int transposed : {0, 1}) {
            vector<uint16_t> out((size_t)k * n, kPoisonBf16), want((size_t)k * n);
            for (int r = 0; r < k; r++)
                for (int c = 0; c < n; c++)
                    want[(size_t)r * n + c] =
                        ref_bf16(transposed ? w[(size_t)c * k + r] : w[(size_t)r * n + c]);
            elementwise(false, pack_weight, (size_t)k * n, out.data(), (const float*)w.data(),
                        transposed, k, n);
            check_bits("pack_weight",
                       "k " + std::to_string(k) + " n " + std::to_string(n) +
                           (transposed ? " T" : " N"),
                       out, want);
        }
    }
}

// `run()` again with blocks and threads started in the other order must give `got`'s bits:
// kernels that sum do so in a fixed order (no atomic adds), so a run gives the same bits
// every time.
template <typename F>
void check_order_independent(const std::string& kernel, const std::string& what,
                             const vector<float>& got, F run) {
    bool reverse = cuda_host::reverse_order;
    cuda_host::set_reverse_order(!reverse);
    vector<float> again = run();
    cuda_host::set_reverse_order(reverse);
    check_bits(kernel, what + " same bits in the other order", again, got);
}

// ---------------------------------------------------------------------------------------
// Embedding (embedding.rs): shifted and direct inputs, their gradients, decoding steps.

void check_embedding() {
    const int n_vocab = 37, t_len = 20, batch = 3, rows = batch * t_len;
    for (int d : {50, 300}) {
        vector<float> wte = random((size_t)n_vocab * d), wpe = random((size_t)t_len * d),
                      sos = random(d);
        // Third case: one common colour (as a background is), two rows in three, so a
        // warp's 32 rows hold more matches than the content gradient reads at once.
        for (int direct : {0, 1, 2}) {
            bool common = direct == 2;
            if (common) direct = 0;
            // Direct ids include the start token (n_vocab) and the mask (n_vocab + 1).
            vector<uint16_t> tok = ids(rows, direct ? n_vocab + 2 : n_vocab);
            if (direct) tok[0] = n_vocab, tok[1] = n_vocab + 1, tok[25] = n_vocab;
            if (common)
                for (int r = 0; r < rows; r++)
                    if (r % 3) tok[r] = 3;
            // The content row of output row r, or null for none.
            auto content = [&](int r) -> const float* {
                int t = r % t_len;
                int id = direct ? tok[r] : (t == 0 ? n_vocab : tok[r - 1]);
                if (id < n_vocab) return &wte[(size_t)id * d];
                return id == n_vocab ? sos.data() : nullptr;
            };
            std::string what = std::string(direct ? "direct" : "shifted") +
                               (common ? ", one common colour" : "") + " d " +
                               std::to_string(d);

            vector<float> out = nan_f32((size_t)rows * d), want((size_t)rows * d);
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < d; c++) {
                    const float* ct = content(r);
                    float p = wpe[(size_t)(r % t_len) * d + c];
                    want[(size_t)r * d + c] = ct ? ct[c] + p : p;
                }
            per_row(embed_forward, rows, out.data(), (const uint16_t*)tok.data(),
                    (const float*)wte.data(), (const float*)wpe.data(),
                    (const float*)sos.data(), t_len, d, n_vocab, direct);
            check_bits("embed_forward", what, out, want);

            // Backward adds into existing gradients.
            vector<float> dout = random((size_t)rows * d);
            vector<float> dwte = random((size_t)n_vocab * d), dwpe = random((size_t)t_len * d),
                          dsos = random(d);
            vector<double> want_dwte = widen(dwte), want_dwpe = widen(dwpe),
                           want_dsos = widen(dsos);
            for (int r = 0; r < rows; r++) {
                int t = r % t_len;
                int id = direct ? tok[r] : (t == 0 ? n_vocab : tok[r - 1]);
                for (int c = 0; c < d; c++) {
                    double g = dout[(size_t)r * d + c];
                    want_dwpe[(size_t)t * d + c] += g;
                    if (id < n_vocab) want_dwte[(size_t)id * d + c] += g;
                    else if (id == n_vocab) want_dsos[c] += g;
                }
            }
            launch(embed_backward_positions, dim3(t_len, (d + 255) / 256), dim3(256), 0,
                   dwpe.data(), (const float*)dout.data(), batch, t_len, d);
            // Content: grid (n_vocab + 1, ceil(d / 256), chunks), then the chunks' sums; dwte
            // and dsos as one buffer, so the order check covers both. Chunks of all the rows,
            // of 32 and of 7 (a colour's rows split unevenly, chunks with none of a colour).
            vector<float> start = dwte;
            start.insert(start.end(), dsos.begin(), dsos.end());
            for (int chunk_rows : {rows, 32, 7}) {
                int chunks = (rows + chunk_rows - 1) / chunk_rows;
                size_t slots = (size_t)chunks * (n_vocab + 1);
                vector<float> partials;
                vector<unsigned char> found;
                auto content_grads = [&](const vector<float>& from) {
                    vector<float> g = from;
                    partials = nan_f32(slots * d);
                    found.assign(slots, 0xcd);
                    launch(embed_backward_content, dim3(n_vocab + 1, (d + 255) / 256, chunks),
                           dim3(256), 0, partials.data(), found.data(),
                           (const float*)dout.data(), (const uint16_t*)tok.data(), rows,
                           chunk_rows, t_len, d, n_vocab, direct);
                    launch(embed_content_sums, dim3(n_vocab + 1, (d + 255) / 256), dim3(256), 0,
                           g.data(), g.data() + (size_t)n_vocab * d,
                           (const float*)partials.data(), (const unsigned char*)found.data(),
                           chunks, d, n_vocab);
                    return g;
                };
                vector<float> grads = content_grads(start);
                std::string how = what + ", chunks of " + std::to_string(chunk_rows) + " rows";
                // The first kernel: each chunk's sum for each content row, where it had one.
                vector<double> want_partials(slots * d, 0.0);
                vector<unsigned char> want_found(slots, 0);
                for (int r = 0; r < rows; r++) {
                    int t = r % t_len;
                    int id = direct ? tok[r] : (t == 0 ? n_vocab : tok[r - 1]);
                    if (id > n_vocab) continue;
                    size_t slot = (size_t)(r / chunk_rows) * (n_vocab + 1) + id;
                    want_found[slot] = 1;
                    for (int c = 0; c < d; c++) want_partials[slot * d + c] += dout[(size_t)r * d + c];
                }
                vector<float> got_partials(slots * d, 0.0f);
                for (size_t slot = 0; slot < slots; slot++)
                    if (want_found[slot])
                        for (int c = 0; c < d; c++)
                            got_partials[slot * d + c] = partials[slot * d + c];
                record("embed_backward_content", found == want_found ? 0.0 : 1.0, 0.0,
                       how + ": which chunks hold which content rows");
                check("embed_backward_content", how + " partial sums", got_partials,
                      want_partials, kRow);
                // Then the chunks added in order into the gradients, which started from dwte
                // and dsos: sums over up to two thirds of the rows, judged as row reductions.
                vector<float> got_dwte(grads.begin(), grads.begin() + (size_t)n_vocab * d),
                    got_dsos(grads.begin() + (size_t)n_vocab * d, grads.end());
                check("embed_content_sums", how + " dwte", got_dwte, want_dwte, kRow);
                check("embed_content_sums", how + " dsos", got_dsos, want_dsos, kRow);
                // The order of the additions, bit for bit: each chunk's rows in row order from
                // zero, then a row's chunks in chunk order, the first taken as it is (so one
                // chunk adds exactly the sum of all the rows in order).
                vector<float> chunk_sum(slots * d, 0.0f), in_order = start;
                for (int r = 0; r < rows; r++) {
                    int t = r % t_len;
                    int id = direct ? tok[r] : (t == 0 ? n_vocab : tok[r - 1]);
                    if (id > n_vocab) continue;
                    size_t slot = (size_t)(r / chunk_rows) * (n_vocab + 1) + id;
                    for (int c = 0; c < d; c++) chunk_sum[slot * d + c] += dout[(size_t)r * d + c];
                }
                for (int v = 0; v <= n_vocab; v++)
                    for (int c = 0; c < d; c++) {
                        float sum = 0.0f;
                        bool any = false;
                        for (int z = 0; z < chunks; z++) {
                            size_t slot = (size_t)z * (n_vocab + 1) + v;
                            if (!want_found[slot]) continue;
                            sum = any ? sum + chunk_sum[slot * d + c] : chunk_sum[slot * d + c];
                            any = true;
                        }
                        if (any) in_order[(size_t)v * d + c] += sum;
                    }
                check_bits("embed_content_sums", how + " in row and chunk order", grads, in_order);
                check_order_independent("embed_content_sums", how, grads,
                                        [&] { return content_grads(start); });
            }
            check("embed_backward_positions", what + " dwpe", dwpe, want_dwpe, kElementwise);
        }

        // Decoding: a prefill from position 0 (its first row is the start token), then a step.
        for (auto [pos, len] : {std::pair{0, 5}, std::pair{7, 1}, std::pair{12, 8}}) {
            int n = batch * len;
            vector<uint16_t> prev = ids(n, n_vocab);
            vector<float> out = nan_f32((size_t)n * d), want((size_t)n * d);
            for (int r = 0; r < n; r++) {
                int p = pos + r % len;
                const float* ct = p == 0 ? sos.data() : &wte[(size_t)prev[r] * d];
                for (int c = 0; c < d; c++)
                    want[(size_t)r * d + c] = ct[c] + wpe[(size_t)p * d + c];
            }
            // The position as an argument, then read from memory (a replayed graph's way)
            // with a wrong argument beside it.
            for (bool from_memory : {false, true}) {
                int at = pos;
                std::fill(out.begin(), out.end(), NAN);
                per_row(embed_step, n, out.data(), (const uint16_t*)prev.data(),
                        (const float*)wte.data(), (const float*)wpe.data(),
                        (const float*)sos.data(), from_memory ? -1000 : pos,
                        from_memory ? (const int*)&at : nullptr, len, d, n_vocab);
                check_bits("embed_step",
                           "pos " + std::to_string(pos) + " len " + std::to_string(len) +
                               (from_memory ? " (position read from memory)" : ""),
                           out, want);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// RMS norm (norm.rs), eps 1e-5.

void check_rmsnorm() {
    const float eps = 1e-5f;
    // 150 rows: several blocks of rows; 2,100 columns: two blocks of columns; 20 columns:
    // lanes of a warp with none.
    for (auto [rows, d] : {std::pair{13, 48}, std::pair{150, 50}, std::pair{7, 300},
                           std::pair{5, 2100}, std::pair{9, 20}}) {
        std::string what = std::to_string(rows) + "x" + std::to_string(d);
        vector<float> x = random((size_t)rows * d), g = random(d, 0.5f, 1.5f);
        vector<double> want((size_t)rows * d), want_rstd(rows);
        for (int r = 0; r < rows; r++) {
            double ss = 0;
            for (int c = 0; c < d; c++) ss += (double)x[(size_t)r * d + c] * x[(size_t)r * d + c];
            want_rstd[r] = 1.0 / std::sqrt(ss / d + eps);
            for (int c = 0; c < d; c++)
                want[(size_t)r * d + c] = x[(size_t)r * d + c] * want_rstd[r] * g[c];
        }
        vector<float> out = nan_f32((size_t)rows * d), rstd = nan_f32(rows);
        per_warp_row(rmsnorm_forward, rows, out.data(), rstd.data(), (const float*)x.data(),
                     (const float*)g.data(), rows, d, eps);
        check("rmsnorm_forward", what + " out", out, want, kRow);
        check("rmsnorm_forward", what + " rstd", rstd, want_rstd, kRow);
        // Stored as bfloat16: the f32 kernel's values rounded, and the same rstd.
        vector<uint16_t> out16((size_t)rows * d, kPoisonBf16);
        vector<float> rstd16 = nan_f32(rows);
        per_warp_row(rmsnorm_forward_bf16, rows, out16.data(), rstd16.data(),
                     (const float*)x.data(), (const float*)g.data(), rows, d, eps);
        check_bits("rmsnorm_forward_bf16", what + " out", out16, rounded(out));
        check_bits("rmsnorm_forward_bf16", what + " rstd", rstd16, rstd);

        // Backward from the reference rstd (as f32), adding into existing gradients:
        // dx += rstd (dout g - xhat mean(dout g xhat)), dg += sum_rows dout xhat.
        vector<float> rs(want_rstd.begin(), want_rstd.end());
        vector<float> dout = random((size_t)rows * d), dx = random((size_t)rows * d),
                      dg = random(d);
        vector<double> want_dx = widen(dx), want_dg = widen(dg);
        for (int r = 0; r < rows; r++) {
            const float* xr = &x[(size_t)r * d];
            const float* dr = &dout[(size_t)r * d];
            double s = rs[r], dot = 0;
            for (int c = 0; c < d; c++) dot += (double)dr[c] * g[c] * xr[c];
            double mean = dot * s / d;
            for (int c = 0; c < d; c++) {
                want_dx[(size_t)r * d + c] += s * (dr[c] * g[c] - xr[c] * s * mean);
                want_dg[c] += (double)dr[c] * xr[c] * s;
            }
        }
        // One pass for dx and the gain's partial sums (32 rows a block, columns by 2048),
        // then add_column_sums (1,024 threads), as mod.rs launches them.
        const int rows_per_block = 32, count = (rows + rows_per_block - 1) / rows_per_block;
        vector<uint16_t> rounded_dx((size_t)rows * d, kPoisonBf16);
        auto backward = [&] {
            vector<float> partials = nan_f32((size_t)count * d), out_dx = dx, out_dg = dg;
            launch(rmsnorm_backward, dim3(count, (d + 2047) / 2048), dim3(kRowThreads), 0,
                   out_dx.data(), rounded_dx.data(), partials.data(), (const float*)dout.data(),
                   (const float*)x.data(), (const float*)rs.data(), (const float*)g.data(),
                   rows, d, rows_per_block);
            launch(add_column_sums, dim3((d + 31) / 32), dim3(1024), 0, out_dg.data(),
                   (const float*)partials.data(), count, d);
            out_dx.insert(out_dx.end(), out_dg.begin(), out_dg.end());
            return out_dx;
        };
        vector<float> both = backward();
        vector<float> dx_out(both.begin(), both.begin() + (size_t)rows * d),
            dg_out(both.begin() + (size_t)rows * d, both.end());
        check("rmsnorm_backward", what + " dx", dx_out, want_dx, kRow);
        check("rmsnorm_backward", what + " dg", dg_out, want_dg, kRow);
        check_bits("rmsnorm_backward", what + " dx stored rounded too", rounded_dx,
                   rounded(dx_out));
        check_order_independent("rmsnorm_backward", what + " dx and dg", both, backward);
        // Without a rounded copy (null), the same dx and dg.
        vector<float> partials = nan_f32((size_t)count * d), plain_dx = dx, plain_dg = dg;
        launch(rmsnorm_backward, dim3(count, (d + 2047) / 2048), dim3(kRowThreads), 0,
               plain_dx.data(), (uint16_t*)nullptr, partials.data(), (const float*)dout.data(),
               (const float*)x.data(), (const float*)rs.data(), (const float*)g.data(), rows, d,
               rows_per_block);
        check_bits("rmsnorm_backward", what + " dx without the rounded copy", plain_dx, dx_out);

        // From a bf16 dout (bf16 training's products store it so): the f32 kernel's dx, its
        // rounded copy and dg from the same values, bit for bit.
        vector<uint16_t> dout16 = rounded(dout);
        vector<float> dout_w = widened(dout16);
        auto from = [&](auto kernel, const auto* grad) {
            vector<float> parts = nan_f32((size_t)count * d), out_dx = dx, out_dg = dg;
            vector<uint16_t> copy((size_t)rows * d, kPoisonBf16);
            launch(kernel, dim3(count, (d + 2047) / 2048), dim3(kRowThreads), 0, out_dx.data(),
                   copy.data(), parts.data(), grad, (const float*)x.data(),
                   (const float*)rs.data(), (const float*)g.data(), rows, d, rows_per_block);
            launch(add_column_sums, dim3((d + 31) / 32), dim3(1024), 0, out_dg.data(),
                   (const float*)parts.data(), count, d);
            out_dx.insert(out_dx.end(), out_dg.begin(), out_dg.end());
            return std::make_pair(out_dx, copy);
        };
        auto [want16, want_copy] = from(rmsnorm_backward, (const float*)dout_w.data());
        auto [got16, got_copy] =
            from(rmsnorm_backward_from_bf16, (const uint16_t*)dout16.data());
        check_bits("rmsnorm_backward_from_bf16", what + " dx and dg", got16, want16);
        check_bits("rmsnorm_backward_from_bf16", what + " dx rounded", got_copy, want_copy);
    }
}

// ---------------------------------------------------------------------------------------
// Quick GELU (activation.rs): x sigmoid(1.702 x) and its derivative.

void check_gelu() {
    for (auto [n, strided] : kElementwiseCases) {
        std::string what = "n " + std::to_string(n) + grid_name(strided);
        vector<float> x = random(n, 0.01f, 6.0f), out = nan_f32(n), dout = random(n);
        vector<double> want(n), want_d(n);
        for (int i = 0; i < n; i++) {
            double v = x[i], s = 1.0 / (1.0 + std::exp(-1.702 * v));
            want[i] = v * s;
            want_d[i] = dout[i] * (s + 1.702 * v * s * (1.0 - s));
        }
        elementwise(strided, gelu_forward, n, out.data(), (const float*)x.data(), (size_t)n);
        vector<float> dx = nan_f32(n);
        vector<uint16_t> dx16(n, kPoisonBf16);
        elementwise(strided, gelu_backward, n, dx.data(), (const float*)dout.data(),
                    (const float*)x.data(), (size_t)n);
        elementwise(strided, gelu_backward_bf16, n, dx16.data(), (const float*)dout.data(),
                    (const float*)x.data(), (size_t)n);
        // In place, as an f32 training pass runs it.
        elementwise(strided, gelu_backward, n, dout.data(), (const float*)dout.data(),
                    (const float*)x.data(), (size_t)n);
        check("gelu_forward", what, out, want, kElementwise);
        vector<uint16_t> out16(n, kPoisonBf16);
        elementwise(strided, gelu_forward_bf16, n, out16.data(), (const float*)x.data(),
                    (size_t)n);
        check_bits("gelu_forward_bf16", what + " stored as bf16", out16, rounded(out));
        check("gelu_backward", what, dx, want_d, kElementwise);
        check_bits("gelu_backward_bf16", what + " stored as bf16", dx16, rounded(dx));
        check("gelu_backward in place", what, dout, want_d, kElementwise);

        // From bf16 inputs (a bf16 training pass's pre-activation and activation gradient):
        // the f32 kernels' results from the same values, rounded.
        vector<uint16_t> x16 = rounded(x), dout16 = rounded(random(n));
        vector<float> xw = widened(x16), doutw = widened(dout16);
        vector<float> out_w = nan_f32(n), dx_w = nan_f32(n);
        elementwise(strided, gelu_forward, n, out_w.data(), (const float*)xw.data(), (size_t)n);
        elementwise(strided, gelu_backward, n, dx_w.data(), (const float*)doutw.data(),
                    (const float*)xw.data(), (size_t)n);
        vector<uint16_t> from16(n, kPoisonBf16), dfrom16(n, kPoisonBf16);
        elementwise(strided, gelu_forward_from_bf16, n, from16.data(),
                    (const uint16_t*)x16.data(), (size_t)n);
        elementwise(strided, gelu_backward_from_bf16, n, dfrom16.data(),
                    (const uint16_t*)dout16.data(), (const uint16_t*)x16.data(), (size_t)n);
        check_bits("gelu_forward_from_bf16", what, from16, rounded(out_w));
        check_bits("gelu_backward_from_bf16", what, dfrom16, rounded(dx_w));
    }
}

// ---------------------------------------------------------------------------------------
// Softmax cross-entropy (loss.rs): loss = (logsumexp - z_target) w; with a gradient, the
// logits become grad_scale w (softmax - onehot), and without one they stay as they were.

void check_cross_entropy() {
    const int rows = 13;
    for (int v : {37, 529}) {
        for (int weighted : {0, 1}) {
            for (int with_grad : {0, 1}) {
                vector<float> z = random((size_t)rows * v, 0.1f, 4.0f);
                const vector<float> logits_in = z;
                vector<uint16_t> tgt = ids(rows, v);
                vector<float> w = positive(rows, 0.2f, 2.0f);
                w[3] = 0.0f, w[5] = 1.0f;  // BERT weights: 0 and 1 occur
                float scale = 1.0f / rows;
                vector<double> want_loss(rows), want_z = widen(z);
                for (int r = 0; r < rows; r++) {
                    const float* zr = &z[(size_t)r * v];
                    double m = -INFINITY, s = 0;
                    for (int c = 0; c < v; c++) m = std::max(m, (double)zr[c]);
                    for (int c = 0; c < v; c++) s += std::exp(zr[c] - m);
                    double wr = weighted ? w[r] : 1.0;
                    want_loss[r] = (m + std::log(s) - zr[tgt[r]]) * wr;
                    if (with_grad)
                        for (int c = 0; c < v; c++)
                            want_z[(size_t)r * v + c] =
                                scale * wr * (std::exp(zr[c] - m) / s - (c == tgt[r]));
                }
                const float* weights = weighted ? w.data() : nullptr;
                const uint16_t* targets = (const uint16_t*)tgt.data();
                // The _bf16 kernel reads a copy of the logits: the f32 one writes over z.
                vector<float> logits = logits_in;
                vector<float> loss16 = nan_f32(rows);
                vector<uint16_t> grad16((size_t)rows * v, kPoisonBf16);
                if (with_grad)
                    per_row(cross_entropy_bf16, rows, (const float*)logits.data(), loss16.data(),
                            targets, weights, v, grad16.data(), scale);
                vector<float> loss = nan_f32(rows);
                per_row(cross_entropy, rows, (const float*)z.data(), loss.data(), targets,
                        weights, v, with_grad ? z.data() : nullptr, scale);
                std::string what = "v " + std::to_string(v) + (weighted ? " weighted" : "") +
                                   (with_grad ? " grad" : "");
                check("cross_entropy", what + " loss", loss, want_loss, kRow);
                check("cross_entropy", what + " logits", z, want_z, kRow);
                if (with_grad) {
                    // The f32 kernel's gradient rounded, its losses, and the logits untouched.
                    check_bits("cross_entropy_bf16", what + " stored as bf16", grad16,
                               rounded(z));
                    check_bits("cross_entropy_bf16", what + " loss", loss16, loss);
                    check_bits("cross_entropy_bf16", what + " logits kept", logits, logits_in);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// AdamW (simd.rs adamw_chunk) and the sum of squares (optim.rs, in f64).

void check_optimizer() {
    // adamw_tensors: three tensors of one arena (decay, none, decay) and a gap no tensor
    // names, which must stay as it was. Grid (ceil(longest/256) clamped to 1..4096, count), as
    // mod.rs launches it, and a 2-block grid that makes the x blocks stride. The step comes
    // from device memory, the gradient clipped to the global norm given (clip 1: clipped;
    // 1e4: within it; 0: off), as Update::clip_factor does.
    for (unsigned blocks : {0u, 2u})
    for (float clip : {1.0f, 1e4f, 0.0f}) {
        const int n = 1000;
        struct Range {
            size_t start, len;
            bool decay;
        };
        const Range ranges[] = {{0, 300, true}, {300, 1, false}, {360, 640, true}};
        vector<float> p = random(n), g = random(n), m = random(n, 1e-3f, 0.1f),
                      v = positive(n, 1e-4f, 1e-2f);
        const float lr = 1e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
        const int step = 3;
        const float bc1 = 1.0f - std::pow(b1, step), bc2 = 1.0f - std::pow(b2, step);
        const UpdateStep h{lr, b1, b2, eps, wd, gs, bc1, bc2, clip};
        double norm_squared = 0.0;
        for (float x : g) norm_squared += (double)x * x;
        const double norm = std::sqrt(norm_squared);
        const float factor = clip > 0.0f && norm > clip ? (float)(clip / norm) : 1.0f;
        const float scale = gs * factor;
        vector<double> want_p(p.begin(), p.end()), want_m(m.begin(), m.end()),
            want_v(v.begin(), v.end());
        AdamTable table{};
        size_t longest = 0;
        for (const Range& r : ranges) {
            table.start[table.count] = r.start;
            table.len[table.count] = r.len;
            table.decay[table.count] = r.decay ? 1.0f : 0.0f;
            table.count++;
            longest = std::max(longest, r.len);
            for (size_t i = r.start; i < r.start + r.len; i++) {
                double gi = (double)g[i] * scale;
                want_m[i] = b1 * (double)m[i] + (1.0 - b1) * gi;
                want_v[i] = b2 * (double)v[i] + (1.0 - b2) * gi * gi;
                want_p[i] = p[i] - lr * ((want_m[i] / bc1) / (std::sqrt(want_v[i] / bc2) + eps) +
                                         (r.decay ? wd : 0.0) * (double)p[i]);
            }
        }
        unsigned x = blocks ? blocks : std::min<unsigned>(std::max<size_t>((longest + 255) / 256, 1), 4096);
        launch(adamw_tensors, dim3(x, table.count), dim3(256), 0, p.data(), (const float*)g.data(),
               m.data(), v.data(), table, &h, (const double*)&norm_squared);
        std::string what = std::string("3 tensors and a gap, ") + std::to_string(x) +
                           " x blocks, clip " + std::to_string(clip) + " of norm " +
                           std::to_string(norm);
        check("adamw_tensors", what + " p", p, want_p, kElementwise);
        check("adamw_tensors", what + " m", m, want_m, kElementwise);
        check("adamw_tensors", what + " v", v, want_v, kElementwise);
    }
    // sum_squares: grid ceil(n/256) clamped to 1..1024 blocks, one partial each, then
    // sum_partials (one block of 32 threads).
    for (auto [n, strided] : kElementwiseCases) {
        vector<float> x = random(n, 0.01f, 3.0f);
        double want = 0;
        for (float v : x) want += (double)v * v;
        unsigned blocks = strided ? 3 : std::min(std::max((n + 255) / 256, 1), 1024);
        auto total = [&] {
            vector<double> partials(blocks, NAN);
            double out = NAN;
            launch(sum_squares, dim3(blocks), dim3(256), 0, partials.data(),
                   (const float*)x.data(), (size_t)n);
            launch(sum_partials, dim3(1), dim3(32), 0, &out, (const double*)partials.data(),
                   (int)blocks);
            return out;
        };
        double out = total();
        double e = std::fabs(out - want) / want;
        char note[128];
        snprintf(note, sizeof note, "n %d%s: %.17g, want %.17g", n, grid_name(strided), out, want);
        record("sum_squares", e, 1e-12, note);
        record("sum_partials", e, 1e-12, note);
        bool reverse = cuda_host::reverse_order;
        cuda_host::set_reverse_order(!reverse);
        double again = total();
        cuda_host::set_reverse_order(reverse);
        record("sum_partials", memcmp(&again, &out, sizeof out) == 0 ? 0.0 : 1.0, 0.0,
               std::string("n ") + std::to_string(n) + ": the same bits in the other order");
    }
}

// add_column_sums alone: counts around its 32 slices, widths around its 32 columns.
void check_column_sums() {
    for (int count : {1, 31, 32, 70})
        for (int n : {5, 37, 300}) {
            vector<float> partials = random((size_t)count * n), dst = random(n);
            vector<double> want = widen(dst);
            for (int k = 0; k < count; k++)
                for (int c = 0; c < n; c++) want[c] += partials[(size_t)k * n + c];
            launch(add_column_sums, dim3((n + 31) / 32), dim3(1024), 0, dst.data(),
                   (const float*)partials.data(), count, n);
            check("add_column_sums",
                  std::to_string(count) + " rows of " + std::to_string(n), dst, want, kRow);
        }
}

// ---------------------------------------------------------------------------------------
// Attention over score matrices (attention.rs): rows (h, i) of [n_head * t, t]; visible
// keys j <= i when causal, all otherwise.

void check_attention() {
    struct Shape {
        int n_head, t, head_dim;
    };
    for (Shape s : {Shape{4, 20, 12}, Shape{1, 260, 50}}) {
        int rows = s.n_head * s.t, t = s.t, hd = s.head_dim, d = s.n_head * hd;
        for (int causal : {0, 1}) {
            std::string what = std::to_string(s.n_head) + " heads t " + std::to_string(t) +
                               (causal ? " causal" : "");
            vector<float> scores = random((size_t)rows * t, 0.01f, 3.0f);
            auto visible = [&](int row) { return causal ? row % t + 1 : t; };
            vector<double> want_p((size_t)rows * t), want_lse(rows);
            for (int r = 0; r < rows; r++) {
                const float* sr = &scores[(size_t)r * t];
                double m = -INFINITY, sum = 0;
                for (int j = 0; j < visible(r); j++) m = std::max(m, (double)sr[j]);
                for (int j = 0; j < visible(r); j++) sum += std::exp(sr[j] - m);
                want_lse[r] = m + std::log(sum);
                for (int j = 0; j < t; j++)
                    want_p[(size_t)r * t + j] =
                        j < visible(r) ? std::exp(sr[j] - want_lse[r]) : 0.0;
            }

            vector<float> p = scores, lse = nan_f32(rows);
            per_row(attention_softmax, rows, p.data(), lse.data(), t, causal);
            check("attention_softmax", what + " probabilities", p, want_p, kRow);
            check("attention_softmax", what + " lse", lse, want_lse, kRow);

            // From the scores and the reference log-sum-exp (as f32).
            vector<float> lse32(want_lse.begin(), want_lse.end()), p2 = scores;
            per_row(attention_probs, rows, p2.data(), (const float*)lse32.data(), t, causal);
            check("attention_probs", what, p2, want_p, kRow);

            // dS = P (dP - D_i), D_i = sum_c dout[i, h hd + c] out[i, h hd + c].
            vector<float> pf(want_p.begin(), want_p.end());
            vector<float> dp = random((size_t)rows * t), dout = random((size_t)t * d),
                          out = random((size_t)t * d);
            vector<double> want_ds((size_t)rows * t);
            for (int r = 0; r < rows; r++) {
                size_t at = (size_t)(r % t) * d + (r / t) * hd, row = (size_t)r * t;
                double di = 0;
                for (int c = 0; c < hd; c++) di += (double)dout[at + c] * out[at + c];
                for (int j = 0; j < t; j++) want_ds[row + j] = pf[row + j] * (dp[row + j] - di);
            }
            per_row(attention_dscores, rows, dp.data(), (const float*)pf.data(),
                    (const float*)dout.data(), (const float*)out.data(), t, d, hd);
            check("attention_dscores", what, dp, want_ds, kRow);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Decoding with caches [batch, n_head, n_ctx, head_dim]: a prefill of several positions,
// then a single step, as attention_step launches them: kv_store then attend for the prefill,
// attend alone for the step (it stores its own position's key and value).

float stored_value(float x, float*) { return x; }
uint16_t stored_value(float x, uint16_t*) { return ref_bf16(x); }
double loaded(float x) { return x; }
double loaded(uint16_t h) { return ref_from_bf16(h); }
float poison_of(float*) { return NAN; }
uint16_t poison_of(uint16_t*) { return kPoisonBf16; }

template <typename E>
void check_decoding(void (*store)(E*, E*, const float*, int, int, int, int, const int*, int),
                    void (*attend)(float*, float*, E*, E*, const float*, int, int, int, int,
                                   const int*, int),
                    void (*attend_to_bf16)(uint16_t*, float*, E*, E*, const float*, int, int, int,
                                           int, const int*, int),
                    const std::string& store_name, const std::string& attend_name,
                    const std::string& to_bf16_name) {
    struct Shape {
        int batch, n_head, head_dim, n_ctx, prefill;
    };
    // Rows are read in pieces of 8 columns: 12 and 300 end in a partial piece (read column by
    // column), 64, 96 and 128 do not (16-byte loads, where the caches start on 16 bytes: each
    // shape runs again with caches one element further on). The values split among 64, 16, 10,
    // 8 and 3 groups of threads; contexts of up to 200 take several rounds of 128 keys.
    for (Shape s : {Shape{2, 4, 12, 20, 7}, Shape{2, 2, 64, 40, 33}, Shape{1, 2, 128, 24, 5},
                    Shape{1, 1, 300, 150, 140}, Shape{2, 2, 96, 200, 170}})
    for (int offset : {0, 1}) {
        int nh = s.n_head, hd = s.head_dim, n_ctx = s.n_ctx, d = nh * hd;
        size_t cache_len = (size_t)s.batch * nh * n_ctx * hd;
        // The caches start `offset` elements into their buffers.
        vector<E> k_buf(cache_len + offset, poison_of((E*)nullptr)), v_buf = k_buf;
        vector<E> want_k(cache_len, poison_of((E*)nullptr)), want_v = want_k;
        E *k_cache = k_buf.data() + offset, *v_cache = v_buf.data() + offset;
        std::string shape = std::to_string(s.batch) + "x" + std::to_string(nh) + " heads hd " +
                            std::to_string(hd) + " ctx " + std::to_string(n_ctx) +
                            (offset ? " caches off 16 bytes" : "");

        for (auto [pos, len] : {std::pair{0, s.prefill}, std::pair{s.prefill, 1}}) {
            int n = s.batch * len;
            vector<float> qkv = random((size_t)n * 3 * d, 0.05f, 2.0f);
            vector<float> out = nan_f32((size_t)n * d);
            // Reference cache: row r = (b, i) stores position pos + i.
            for (int r = 0; r < n; r++) {
                int b = r / len, p = pos + r % len;
                for (int h = 0; h < nh; h++)
                    for (int c = 0; c < hd; c++) {
                        size_t at = (((size_t)b * nh + h) * n_ctx + p) * hd + c;
                        const float* row = &qkv[(size_t)r * 3 * d + h * hd + c];
                        want_k[at] = stored_value(row[d], (E*)nullptr);
                        want_v[at] = stored_value(row[2 * d], (E*)nullptr);
                    }
            }
            // Reference attention of each row over positions 0..=its own, from the reference
            // cache.
            vector<double> want((size_t)n * d);
            double scale = 1.0 / std::sqrt((double)hd);
            for (int r = 0; r < n; r++) {
                int b = r / len, upto = pos + r % len + 1;
                for (int h = 0; h < nh; h++) {
                    size_t base = ((size_t)b * nh + h) * n_ctx * hd;
                    const float* q = &qkv[(size_t)r * 3 * d + h * hd];
                    vector<double> sc(upto);
                    double m = -INFINITY, sum = 0;
                    for (int j = 0; j < upto; j++) {
                        double acc = 0;
                        for (int c = 0; c < hd; c++)
                            acc += q[c] * loaded(want_k[base + (size_t)j * hd + c]);
                        sc[j] = acc * scale;
                        m = std::max(m, sc[j]);
                    }
                    for (int j = 0; j < upto; j++) sum += (sc[j] = std::exp(sc[j] - m));
                    for (int c = 0; c < hd; c++) {
                        double acc = 0;
                        for (int j = 0; j < upto; j++)
                            acc += sc[j] * loaded(want_v[base + (size_t)j * hd + c]);
                        want[(size_t)r * d + h * hd + c] = acc / sum;
                    }
                }
            }

            dim3 grid(n, nh);
            unsigned store_threads = std::min((hd + 31) / 32 * 32, 256);
            size_t shared = decode_shared_bytes(n_ctx, hd);
            // The prefill takes its position as an argument; the step reads it from memory,
            // as a replayed graph does, beside a wrong argument.
            bool from_memory = len == 1;
            int at = pos, arg = from_memory ? -1000 : pos;
            const int* pos_at = from_memory ? &at : nullptr;
            if (len > 1)
                launch(store, grid, dim3(store_threads), 0, k_cache, v_cache,
                       (const float*)qkv.data(), nh, hd, n_ctx, arg, pos_at, len);
            launch(attend, grid, dim3(kDecodeThreads), shared, out.data(), (float*)nullptr,
                   k_cache, v_cache, (const float*)qkv.data(), nh, hd, n_ctx, arg, pos_at, len);
            std::string what = shape + " pos " + std::to_string(pos) + " len " +
                               std::to_string(len) +
                               (from_memory ? " (position read from memory)" : "");
            // Every stored position matches (the step's stored by attend itself), and positions
            // not stored yet are untouched.
            const std::string& stored_by = len > 1 ? store_name : attend_name;
            check_bits(stored_by, what + " keys", vector<E>(k_cache, k_cache + cache_len),
                       want_k);
            check_bits(stored_by, what + " values", vector<E>(v_cache, v_cache + cache_len),
                       want_v);
            check(attend_name, what, out, want, kDecode);
            // The output stored as bfloat16: the f32 kernel's values rounded.
            vector<uint16_t> out16((size_t)n * d, kPoisonBf16);
            launch(attend_to_bf16, grid, dim3(kDecodeThreads), shared, out16.data(),
                   (float*)nullptr, k_cache, v_cache, (const float*)qkv.data(), nh, hd, n_ctx,
                   arg, pos_at, len);
            check_bits(to_bf16_name, what, out16, rounded(out));
            if (len > 1) continue;

            // The step again with its keys split among blocks: runs of several keys, of one
            // key and none (more runs than keys). The new row is poisoned first: the block
            // whose run holds it must store it.
            for (int splits : {2, 3, 5, 64}) {
                std::string split_what = what + ", keys in " + std::to_string(splits) + " runs";
                for (int b = 0; b < s.batch; b++)
                    for (int h = 0; h < nh; h++) {
                        size_t at = (((size_t)b * nh + h) * n_ctx + pos) * hd;
                        std::fill(k_cache + at, k_cache + at + hd, poison_of((E*)nullptr));
                        std::fill(v_cache + at, v_cache + at + hd, poison_of((E*)nullptr));
                    }
                vector<float> partials = nan_f32((size_t)n * nh * splits * (hd + 2));
                std::fill(out.begin(), out.end(), NAN);
                launch(attend, dim3(n, nh, splits), dim3(kDecodeThreads), shared, out.data(),
                       partials.data(), k_cache, v_cache, (const float*)qkv.data(), nh, hd,
                       n_ctx, arg, pos_at, len);
                check_bits(attend_name, split_what + " keys",
                           vector<E>(k_cache, k_cache + cache_len), want_k);
                check_bits(attend_name, split_what + " values",
                           vector<E>(v_cache, v_cache + cache_len), want_v);
                launch(attend_combine_f32, grid, dim3(kDecodeThreads), 0, out.data(),
                       (const float*)partials.data(), nh, hd, splits);
                check("attend_combine_f32", split_what, out, want, kDecode);
                std::fill(out16.begin(), out16.end(), kPoisonBf16);
                launch(attend_combine_to_bf16, grid, dim3(kDecodeThreads), 0, out16.data(),
                       (const float*)partials.data(), nh, hd, splits);
                check_bits("attend_combine_to_bf16", split_what, out16, rounded(out));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Flash attention (attention.rs semantics, the whole [batch * t, 3d] qkv at once) against a
// float64 reference computed straightforwardly from the f32 inputs. The kernels multiply
// bf16 tiles (8 significant bits, 2^-9 = 2e-3 relative rounding), so each output is judged
// by its largest error relative to its own scale (max |want|), not element by element.
// Two kinds of inputs:
// - bf16 values (exact in bf16): only the kernels' own roundings (P and dS to bf16, f32
//   sums) remain, about 2e-3 of the scale, so a wrong mask or a lost term shows clearly;
//   lse (f32 arithmetic on exact products) is held to kRow.
// - any f32 values: the rounding of Q, K, V and dout adds to that, up to about 1e-2 (seen
//   with other random inputs: 1.1e-2 on dk of a 5-key causal head, where few terms average
//   it out). The backward runs from the reference out and lse, then chained on the kernel's.
constexpr double kFlashExact = 5e-3;
constexpr double kFlash = 2e-2;

// max |got - want| / max |want|; a non-finite value is an infinite error.
void check_scaled(const std::string& kernel, const std::string& what, const vector<float>& got,
                  const vector<double>& want, double tol) {
    double scale = 1e-30, worst = 0.0;
    size_t at = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < want.size(); i++) {
        double e = std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) / scale : INFINITY;
        if (!(e <= worst)) worst = e, at = i;
    }
    char note[256];
    snprintf(note, sizeof note, "%s: element %zu is %.9g, want %.9g (scale %.3g)", what.c_str(),
             at, want.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at], scale);
    record(kernel, worst, tol, note);
    // CUDA_HOST_VERBOSE=1: every case's error, not only each kernel's worst.
    if (getenv("CUDA_HOST_VERBOSE"))
        printf("  %s %s: %.3e (tolerance %.0e)\n", kernel.c_str(), what.c_str(), worst, tol);
}

struct FlashRef {
    vector<double> out, lse, delta, dq, dk, dv;  // dq, dk, dv: [batch * t, d]
};

// Straightforward attention and its gradients, per sequence and head, in double.
FlashRef flash_reference(const vector<float>& qkv, const vector<float>& dout, int batch, int t,
                         int nh, int hd, bool causal) {
    int d = nh * hd;
    FlashRef f;
    f.out.assign((size_t)batch * t * d, 0.0);
    f.dq = f.dk = f.dv = f.out;
    f.lse.assign((size_t)batch * nh * t, 0.0);
    f.delta = f.lse;
    double scale = 1.0 / std::sqrt((double)hd);
    auto q = [&](int b, int i, int h, int c) { return (double)qkv[((size_t)b * t + i) * 3 * d + h * hd + c]; };
    auto k = [&](int b, int j, int h, int c) { return q(b, j, h, c + d); };
    auto v = [&](int b, int j, int h, int c) { return q(b, j, h, c + 2 * d); };
    auto go = [&](int b, int i, int h, int c) { return (double)dout[((size_t)b * t + i) * d + h * hd + c]; };
    vector<double> p(t), dp(t);
    for (int b = 0; b < batch; b++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < t; i++) {
                int n = causal ? i + 1 : t;
                double m = -INFINITY, sum = 0;
                for (int j = 0; j < n; j++) {
                    double s = 0;
                    for (int c = 0; c < hd; c++) s += q(b, i, h, c) * k(b, j, h, c);
                    p[j] = s * scale;
                    m = std::max(m, p[j]);
                }
                for (int j = 0; j < n; j++) sum += std::exp(p[j] - m);
                double lse = m + std::log(sum);
                for (int j = 0; j < n; j++) p[j] = std::exp(p[j] - lse);
                size_t row = ((size_t)b * t + i) * d + h * hd, stat = ((size_t)b * nh + h) * t + i;
                f.lse[stat] = lse;
                double delta = 0;
                for (int c = 0; c < hd; c++) {
                    double o = 0;
                    for (int j = 0; j < n; j++) o += p[j] * v(b, j, h, c);
                    f.out[row + c] = o;
                    delta += go(b, i, h, c) * o;
                }
                f.delta[stat] = delta;
                for (int j = 0; j < n; j++) {
                    double s = 0;
                    for (int c = 0; c < hd; c++) s += go(b, i, h, c) * v(b, j, h, c);
                    dp[j] = p[j] * (s - delta);  // dS
                }
                for (int j = 0; j < n; j++) {
                    size_t kr = ((size_t)b * t + j) * d + h * hd;
                    for (int c = 0; c < hd; c++) {
                        f.dq[row + c] += scale * dp[j] * k(b, j, h, c);
                        f.dk[kr + c] += scale * dp[j] * q(b, i, h, c);
                        f.dv[kr + c] += p[j] * go(b, i, h, c);
                    }
                }
            }
    return f;
}

// The flash attention kernels for heads up to one width (kernels.cu's _64 and _128).
using FlashForward = void (*)(float*, float*, const float*, int, int, int, int);
using FlashGradient = void (*)(float*, const float*, const float*, const float*, const float*,
                               int, int, int, int);
// The _bf16 kernels, which read Q, K, V and the output's gradient as bf16 and store the
// output or gradient rounded.
using FlashForward16 = void (*)(uint16_t*, float*, const uint16_t*, int, int, int, int);
using FlashGradient16 = void (*)(uint16_t*, const uint16_t*, const uint16_t*, const float*,
                                 const float*, int, int, int, int);
struct FlashKernels {
    int width;
    FlashForward forward;
    FlashGradient kv, q;
    FlashForward16 forward_bf16;
    FlashGradient16 kv_bf16, q_bf16;
    // Width 128: the bf16 gradient kernels in one stage of tiles.
    FlashGradient16 kv_one_stage = nullptr, q_one_stage = nullptr;
    std::string name(const char* kernel) const { return kernel + std::to_string(width); }
    // What mod.rs's flash_launch gives the forward kernel and the two gradient kernels, f32
    // or bf16.
    size_t shared(bool forward, bool bf16 = false) const {
        return flash_shared_bytes(width, flash::stages(width, bf16, forward), forward);
    }
};

// The launch of every flash kernel (mod.rs's flash_launch): a block per 64 query rows (or
// keys) of each sequence and head.
dim3 flash_grid(int t, int nh, int batch) {
    return dim3((t + flash::kRows - 1) / flash::kRows, nh, batch);
}
const dim3 kFlashBlock(flash::kThreads);

// dqkv from the two gradient kernels, launched as mod.rs launches them; dqkv starts as NaN.
vector<float> flash_backward(const FlashKernels& k, const vector<float>& dout,
                             const vector<float>& qkv, const vector<float>& lse,
                             const vector<float>& delta, int batch, int t, int nh, int hd,
                             int causal) {
    vector<float> dqkv = nan_f32((size_t)batch * t * 3 * nh * hd);
    dim3 grid = flash_grid(t, nh, batch);
    launch(k.kv, grid, kFlashBlock, k.shared(false), dqkv.data(), dout.data(),
           qkv.data(), lse.data(), delta.data(), t, nh, hd, causal);
    launch(k.q, grid, kFlashBlock, k.shared(false), dqkv.data(), dout.data(),
           qkv.data(), lse.data(), delta.data(), t, nh, hd, causal);
    return dqkv;
}

// dQ, dK and dV (the column groups of dqkv) against the reference, recorded under the kernels'
// names (and `variant`: "_bf16" for the bf16 kernels).
void check_flash_gradients(const FlashKernels& k, const vector<float>& dqkv,
                           const FlashRef& ref, size_t rows, int d, const std::string& what,
                           double tol, const std::string& variant = "") {
    vector<float> dq(rows * d), dk(rows * d), dv(rows * d);
    for (size_t r = 0; r < rows; r++)
        for (int c = 0; c < d; c++) {
            dq[r * d + c] = dqkv[r * 3 * d + c];
            dk[r * d + c] = dqkv[r * 3 * d + d + c];
            dv[r * d + c] = dqkv[r * 3 * d + 2 * d + c];
        }
    check_scaled(k.name("flash_attention_backward_q_") + variant, what + " dq", dq, ref.dq, tol);
    check_scaled(k.name("flash_attention_backward_kv_") + variant, what + " dk", dk, ref.dk, tol);
    check_scaled(k.name("flash_attention_backward_kv_") + variant, what + " dv", dv, ref.dv, tol);
}

// Every shape runs through each width of kernel that takes its heads (the _128 kernels with
// narrow heads too).
void check_flash_attention(bool bf16_inputs) {
    const double tol = bf16_inputs ? kFlashExact : kFlash;
    const FlashKernels widths[] = {
        {64, flash_attention_forward_64, flash_attention_backward_kv_64,
         flash_attention_backward_q_64, flash_attention_forward_64_bf16,
         flash_attention_backward_kv_64_bf16, flash_attention_backward_q_64_bf16},
        {128, flash_attention_forward_128, flash_attention_backward_kv_128,
         flash_attention_backward_q_128, flash_attention_forward_128_bf16,
         flash_attention_backward_kv_128_bf16, flash_attention_backward_q_128_bf16,
         flash_attention_backward_kv_128_bf16_one_stage,
         flash_attention_backward_q_128_bf16_one_stage},
    };
    struct Shape {
        int batch, n_head, t, head_dim;
    };
    // Blocks own 64 rows (or keys) and loop over steps of 32 or 64: contexts of one partial
    // block, exactly one, and several with a partial last.
    for (Shape s : {Shape{2, 3, 37, 16}, Shape{2, 3, 37, 64}, Shape{1, 2, 64, 32},
                    Shape{1, 2, 33, 16}, Shape{1, 1, 5, 16}, Shape{1, 1, 20, 128},
                    Shape{1, 2, 35, 96}, Shape{2, 1, 150, 64}, Shape{1, 1, 131, 128},
                    Shape{1, 2, 97, 48}}) {
        int batch = s.batch, nh = s.n_head, t = s.t, hd = s.head_dim, d = nh * hd;
        size_t rows = (size_t)batch * t, stats = (size_t)batch * nh * t;
        for (int causal : {0, 1}) {
            std::string what = std::to_string(batch) + "x" + std::to_string(nh) + " heads t " +
                               std::to_string(t) + " hd " + std::to_string(hd) +
                               (causal ? " causal" : "") +
                               (bf16_inputs ? " bf16 inputs" : "");
            vector<float> qkv = random(rows * 3 * d, 0.05f, 1.5f), dout = random(rows * d);
            if (bf16_inputs) {
                for (float& x : qkv) x = (float)ref_from_bf16(ref_bf16(x));
                for (float& x : dout) x = (float)ref_from_bf16(ref_bf16(x));
            }
            FlashRef ref = flash_reference(qkv, dout, batch, t, nh, hd, causal);
            vector<float> out32(ref.out.begin(), ref.out.end()),
                lse32(ref.lse.begin(), ref.lse.end());

            // The first backward pass computes delta (the same for every width).
            vector<float> delta = nan_f32(stats);
            launch(flash_attention_backward_prepare, dim3((unsigned)rows), dim3(128), 0,
                   delta.data(), (const float*)dout.data(), (const float*)out32.data(), t, nh,
                   hd);
            check("flash_attention_backward_prepare", what + " delta", delta, ref.delta, kRow);
            // From dout and out stored as bf16: the f32 kernel's sums over the same values.
            vector<uint16_t> out_bits = rounded(out32), dout_bits = rounded(dout);
            vector<float> out_widened = widened(out_bits), dout_widened = widened(dout_bits),
                          delta_widened = nan_f32(stats), delta16 = nan_f32(stats);
            launch(flash_attention_backward_prepare, dim3((unsigned)rows), dim3(128), 0,
                   delta_widened.data(), (const float*)dout_widened.data(),
                   (const float*)out_widened.data(), t, nh, hd);
            launch(flash_attention_backward_prepare_bf16, dim3((unsigned)rows), dim3(128), 0,
                   delta16.data(), (const uint16_t*)dout_bits.data(),
                   (const uint16_t*)out_bits.data(), t, nh, hd);
            check_bits("flash_attention_backward_prepare_bf16",
                       what + " delta from bf16 dout and out", delta16, delta_widened);

            for (const FlashKernels& k : widths) {
                if (hd > k.width) continue;
                vector<float> out = nan_f32(rows * d), lse = nan_f32(stats);
                dim3 fwd_grid = flash_grid(t, nh, batch);
                launch(k.forward, fwd_grid, kFlashBlock, k.shared(true),
                       out.data(), lse.data(), (const float*)qkv.data(), t, nh, hd, causal);
                std::string fwd = k.name("flash_attention_forward_");
                check_scaled(fwd, what + " out", out, ref.out, tol);
                if (bf16_inputs) check(fwd, what + " lse", lse, ref.lse, kRow);
                else check_scaled(fwd, what + " lse", lse, ref.lse, kFlash);

                // Backward from the reference out and lse (as f32): the two kernels write
                // every column of dqkv (which starts as NaN).
                vector<float> dqkv =
                    flash_backward(k, dout, qkv, lse32, delta, batch, t, nh, hd, causal);
                check_flash_gradients(k, dqkv, ref, rows, d, what, tol);
                // The same bits whatever order the blocks and threads run in (no atomic
                // adds).
                bool reverse = cuda_host::reverse_order;
                cuda_host::set_reverse_order(!reverse);
                vector<float> again =
                    flash_backward(k, dout, qkv, lse32, delta, batch, t, nh, hd, causal);
                cuda_host::set_reverse_order(reverse);
                check_bits(k.name("flash_attention_backward_") + "_bits",
                           what + " same bits in the other order", again, dqkv);

                // Inputs that do not start on 16 bytes are read float by float, with the same
                // results.
                vector<float> qkv_buf(qkv.size() + 1), dout_buf(dout.size() + 1);
                std::copy(qkv.begin(), qkv.end(), qkv_buf.begin() + 1);
                std::copy(dout.begin(), dout.end(), dout_buf.begin() + 1);
                const float *qkv1 = qkv_buf.data() + 1, *dout1 = dout_buf.data() + 1;
                vector<float> out1 = nan_f32(rows * d), lse1 = nan_f32(stats);
                launch(k.forward, fwd_grid, kFlashBlock, k.shared(true),
                       out1.data(), lse1.data(), qkv1, t, nh, hd, causal);
                check_bits(fwd + "_bits", what + " out from unaligned rows", out1, out);
                // Warps that read a tile another warp overwrites show in the other order.
                cuda_host::set_reverse_order(!reverse);
                launch(k.forward, fwd_grid, kFlashBlock, k.shared(true), out1.data(), lse1.data(),
                       (const float*)qkv.data(), t, nh, hd, causal);
                cuda_host::set_reverse_order(reverse);
                check_bits(fwd + "_bits", what + " out in the other order", out1, out);
                vector<float> dqkv1 = nan_f32(rows * 3 * d);
                for (FlashGradient g : {k.kv, k.q})
                    launch(g, flash_grid(t, nh, batch), kFlashBlock, k.shared(false), dqkv1.data(),
                           dout1, qkv1, lse32.data(), delta.data(), t, nh, hd, causal);
                check_bits(k.name("flash_attention_backward_") + "_bits",
                           what + " dqkv from unaligned rows", dqkv1, dqkv);

                // From Q, K, V and dout that bf16 holds exactly, the _bf16 kernels (reading
                // them as bf16) store what the f32 ones compute, rounded, and nothing else
                // (the buffers start as bf16 NaNs); so too from rows that do not start on
                // 16 bytes, which they read value by value.
                if (bf16_inputs) {
                    vector<uint16_t> qkv_bits = rounded(qkv), dout16 = rounded(dout);
                    vector<uint16_t> qkv_buf16(qkv_bits.size() + 1), dout_buf16(dout16.size() + 1);
                    std::copy(qkv_bits.begin(), qkv_bits.end(), qkv_buf16.begin() + 1);
                    std::copy(dout16.begin(), dout16.end(), dout_buf16.begin() + 1);
                    for (bool aligned : {true, false}) {
                        const uint16_t* qkv16 = aligned ? qkv_bits.data() : qkv_buf16.data() + 1;
                        const uint16_t* d16 = aligned ? dout16.data() : dout_buf16.data() + 1;
                        const std::string how = aligned ? "" : " from unaligned rows";
                        vector<uint16_t> out16(rows * d, kPoisonBf16),
                            dqkv16(rows * 3 * d, kPoisonBf16);
                        vector<float> lse16 = nan_f32(stats);
                        launch(k.forward_bf16, fwd_grid, kFlashBlock, k.shared(true, true),
                               out16.data(), lse16.data(), qkv16, t, nh, hd, causal);
                        check_bits(fwd + "_bf16", what + " out stored as bf16" + how, out16,
                                   rounded(out));
                        check_bits(fwd + "_bf16", what + " lse beside a bf16 out" + how, lse16,
                                   lse);
                        // Each gradient kernel alone: its own columns (Q's; K's and V's), and
                        // no other.
                        vector<uint16_t> dqkv_bits = rounded(dqkv);
                        for (bool q_columns : {true, false}) {
                            std::fill(dqkv16.begin(), dqkv16.end(), kPoisonBf16);
                            launch(q_columns ? k.q_bf16 : k.kv_bf16, fwd_grid, kFlashBlock,
                                   k.shared(false, true), dqkv16.data(), d16, qkv16,
                                   (const float*)lse32.data(), (const float*)delta.data(), t, nh,
                                   hd, causal);
                            vector<uint16_t> want = dqkv_bits;
                            for (size_t i = 0; i < want.size(); i++)
                                if (((int)(i % (3 * d)) < d) != q_columns) want[i] = kPoisonBf16;
                            check_bits(k.name(q_columns ? "flash_attention_backward_q_"
                                                        : "flash_attention_backward_kv_") +
                                           "_bf16",
                                       what + " stored as bf16" + how, dqkv16, want);
                            // In one stage of tiles: the same bits.
                            FlashGradient16 one = q_columns ? k.q_one_stage : k.kv_one_stage;
                            if (!one) continue;
                            std::fill(dqkv16.begin(), dqkv16.end(), kPoisonBf16);
                            launch(one, fwd_grid, kFlashBlock,
                                   flash_shared_bytes(k.width, 1, false), dqkv16.data(), d16,
                                   qkv16, (const float*)lse32.data(),
                                   (const float*)delta.data(), t, nh, hd, causal);
                            check_bits(k.name(q_columns ? "flash_attention_backward_q_"
                                                        : "flash_attention_backward_kv_") +
                                           "_bf16_one_stage",
                                       what + " in one stage" + how, dqkv16, want);
                        }
                    }
                }

                // As the backend will chain them: backward from the kernel's own out and lse.
                if (bf16_inputs) continue;
                vector<float> own_delta = nan_f32(stats);
                launch(flash_attention_backward_prepare, dim3((unsigned)rows), dim3(128), 0,
                       own_delta.data(), (const float*)dout.data(), (const float*)out.data(),
                       t, nh, hd);
                dqkv = flash_backward(k, dout, qkv, lse, own_delta, batch, t, nh, hd, causal);
                check_flash_gradients(k, dqkv, ref, rows, d, what + " chained", tol);
            }
        }
    }
}


// ---------------------------------------------------------------------------------------
// Drawing tokens (src/sample.rs, choose_token): written here as the CPU does it, one colour
// after another, with the whole palette sorted by std::sort; the kernel reduces and sorts in
// parallel. The same logits and number must give the same colour, so tolerance 0.

// The CPU backend's exponential (simd::exp, then exp_or_zero), in plain f32 operations.
float cpu_exp_or_zero(float x) {
    float c = x;
    if (c < -87.0f) c = -87.0f;
    if (c > 88.0f) c = 88.0f;
    float shifted = c * 1.44269504088896340736f + 12582912.0f;
    float n = shifted - 12582912.0f;
    float r = c - n * 0.6933594f - n * -2.1219444e-4f;
    float p = 1.9875691e-4f;
    p = p * r + 1.3981999e-3f;
    p = p * r + 8.333452e-3f;
    p = p * r + 4.1665796e-2f;
    p = p * r + 0.16666666f;
    p = p * r + 0.5f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;
    float sh = shifted;
    memcpy(&bits, &sh, 4);
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < -87.0f ? 0.0f : p * scale;
}

// Each colour's weight into `w`, and their sum: 16 lane sums over whole chunks of 16, then
// the lanes and the tail in order.
float ref_weights(const float* z, int v, float temperature, float* w) {
    float max = -INFINITY;
    for (int i = 0; i < v; i++)
        if (z[i] > max) max = z[i];
    float inv_t = 1.0f / temperature;
    float lanes[16] = {};
    int chunks = v / 16;
    for (int i = 0; i < v; i++) w[i] = cpu_exp_or_zero((z[i] - max) * inv_t);
    for (int j = 0; j < chunks; j++)
        for (int l = 0; l < 16; l++) lanes[l] += w[j * 16 + l];
    float total = 0.0f;
    for (float l : lanes) total += l;
    for (int i = chunks * 16; i < v; i++) total += w[i];
    return total;
}

// Draws that rounded past the last colour (the checks below must include some).
int ref_past_end = 0;

uint16_t ref_draw(const float* z, int v, float temperature, int top_k, float top_p, float u) {
    int argmax = 0;
    float best = -INFINITY;
    for (int i = 0; i < v; i++)
        if (z[i] > best) best = z[i], argmax = i;
    if (temperature == 0.0f || top_k == 1) return argmax;
    vector<float> w(v);
    float total = ref_weights(z, v, temperature, w.data());
    // (weight, colour) pairs in the order drawn from.
    vector<std::pair<float, int>> order;
    bool cut_k = top_k > 0 && top_k < v;
    if (!cut_k && top_p >= 1.0f) {
        for (int i = 0; i < v; i++) order.push_back({w[i], i});
    } else {
        // f32 total order, heaviest first; equal weights in colour order.
        auto key = [](float f) {
            int32_t b;
            if (std::isnan(f)) f = std::numeric_limits<float>::quiet_NaN();
            memcpy(&b, &f, 4);
            return b ^ (int32_t)((uint32_t)(b >> 31) >> 1);
        };
        vector<int> idx(v);
        for (int i = 0; i < v; i++) idx[i] = i;
        std::sort(idx.begin(), idx.end(), [&](int a, int b) {
            return key(w[a]) != key(w[b]) ? key(w[a]) > key(w[b]) : a < b;
        });
        int kept = cut_k ? top_k : v;
        for (int i = 0; i < kept; i++) order.push_back({w[idx[i]], idx[i]});
        if (top_p < 1.0f) {
            float sum = 0.0f, acc = 0.0f;
            for (auto& o : order) sum += o.first;
            for (size_t i = 0; i < order.size(); i++) {
                acc += order[i].first / sum;
                if (acc >= top_p) {
                    order.resize(i + 1);
                    break;
                }
            }
        }
        total = 0.0f;
        for (auto& o : order) total += o.first;
    }
    if (!(total > 0.0f && std::isfinite(total))) return argmax;
    float left = u * total;
    for (auto& o : order) {
        if (left < o.first) return o.second;
        left -= o.first;
    }
    for (size_t i = order.size(); i-- > 0;)
        if (order[i].first > 0.0f) {
            ref_past_end++;
            return order[i].second;
        }
    return argmax;
}

struct DrawOptionsHost {
    float temperature;
    int top_k;
    float top_p;
    int unused;
};

void check_draw_tokens() {
    const int positions = 6;
    int edges = 0;
    // Palettes under a SIMD chunk, of a chunk, with a tail, the paper's, wider than a block,
    // and sorted over more keys than threads. The paper's palette draws for 256 images at once,
    // the largest batch sampling runs at; the others for 24.
    for (int v : {5, 16, 37, 512, 300, 1000}) {
        const int rows = v == 512 ? 256 : 24;
        int keys_len = 1;
        while (keys_len < v) keys_len <<= 1;
        vector<DrawOptionsHost> options(rows);
        for (int r = 0; r < rows; r++)
            options[r] = {std::array<float, 4>{1.0f, 0.0f, 0.6f, 2.5f}[r % 4],
                          std::array<int, 6>{0, 1, 3, v - 1, v, v + 9}[r % 6],
                          std::array<float, 3>{1.0f, 0.8f, 0.2f}[(r / 6) % 3], 0};
        // Row 23 sees equal logits only, each colour 1/v of the mass: a top-p equal to three
        // of them added in f32 keeps exactly three colours (a strict comparison keeps four).
        float three = 0.0f;
        for (int i = 0; i < 3; i++) three += 1.0f / (float)v;
        options[23].top_p = three;
        std::uniform_real_distribution<float> unit(0.0f, 1.0f);
        vector<float> numbers((size_t)rows * positions);
        for (float& x : numbers) x = unit(rng);
        numbers[0] = 0.0f;
        numbers[positions + 1] = 0.99999994f;
        vector<uint16_t> tokens(rows, 0xFFFF), drawn((size_t)positions * rows, 0xFFFF);
        vector<uint16_t> want_drawn((size_t)positions * rows);
        vector<float> weights((size_t)rows * v, NAN);
        vector<unsigned long long> keys((size_t)rows * keys_len);
        for (int pos = 0; pos < positions; pos++) {
            vector<float> z = random((size_t)rows * v, 0.1f, 6.0f);
            for (int r = 0; r < rows; r++) {
                float* row = &z[(size_t)r * v];
                row[v - 1] = row[0];             // a tie for the most likely
                row[v / 2] = -INFINITY;          // a masked colour
                // Logits that are not numbers, of either sign (x86 keeps a NaN's sign
                // through arithmetic; a GPU makes its own).
                if (r == 2 || r == 5) row[1] = NAN;
                if (r == 3 || r == 8) row[2] = -NAN;
                if (r == 7 && pos == 2)          // nothing can be drawn: the argmax
                    for (int c = 0; c < v; c++) row[c] = -INFINITY;
                if (r == 9) row[2] = INFINITY;   // an infinite logit
                if (r == 11 && pos == 3) std::fill(row, row + v, 1.5f);  // all equal
                // Nothing to draw after the last colour: a number just under 1 can round
                // past the end, and then draws the last colour that has a weight.
                if (r % 12 == 0) {
                    row[v - 1] = -INFINITY;
                    numbers[(size_t)r * positions + pos] = 0.99999994f;
                }
                if (r == 23) {
                    std::fill(row, row + v, 0.25f);
                    numbers[(size_t)r * positions + pos] = 0.9f;
                }
            }
            // Rows 4 and 18 draw from the whole palette with a number that lands exactly on
            // the first colour's upper edge (u * total == w[0]), so a total off by one
            // rounding (added in another order) draws colour 0 instead of the next.
            for (int r : {4, 18}) {
                vector<float> w(v);
                float total = ref_weights(&z[(size_t)r * v], v, options[r].temperature, w.data());
                float u = w[0] / total;
                for (int step = -3; step <= 3; step++) {
                    float c = u;
                    for (int k = 0; k < std::abs(step); k++)
                        c = std::nextafter(c, step < 0 ? 0.0f : 1.0f);
                    if (c * total == w[0] && c < 1.0f) {
                        numbers[(size_t)r * positions + pos] = c;
                        edges++;
                        break;
                    }
                }
            }
            for (int r = 0; r < rows; r++) {
                const DrawOptionsHost& o = options[r];
                want_drawn[(size_t)pos * rows + r] =
                    ref_draw(&z[(size_t)r * v], v, o.temperature, o.top_k, o.top_p,
                             numbers[(size_t)r * positions + pos]);
            }
            // The position from memory on odd positions (a replayed graph's way).
            int at = pos;
            bool from_memory = pos % 2 == 1;
            launch(draw_tokens, dim3(rows), dim3(256), 0, (const float*)z.data(), v,
                   (const DrawOptions*)options.data(), (const float*)numbers.data(),
                   positions, from_memory ? -1000 : pos, from_memory ? (const int*)&at : nullptr,
                   weights.data(), keys.data(), keys_len, tokens.data(), drawn.data());
            // Each colour's weight, left in the scratch, bit for bit (rows that draw the
            // argmax compute none).
            vector<float> got_w, want_w;
            for (int r = 0; r < rows; r++) {
                if (options[r].temperature == 0.0f || options[r].top_k == 1) continue;
                vector<float> w(v);
                ref_weights(&z[(size_t)r * v], v, options[r].temperature, w.data());
                want_w.insert(want_w.end(), w.begin(), w.end());
                got_w.insert(got_w.end(), weights.begin() + (size_t)r * v,
                             weights.begin() + (size_t)(r + 1) * v);
            }
            check_bits("draw_tokens", "v " + std::to_string(v) + " position " +
                                          std::to_string(pos) + ": the weights",
                       got_w, want_w);
            vector<uint16_t> want_tokens(want_drawn.begin() + (size_t)pos * rows,
                                         want_drawn.begin() + (size_t)(pos + 1) * rows);
            check_bits("draw_tokens", "v " + std::to_string(v) + " position " +
                                          std::to_string(pos) + ": the next inputs",
                       tokens, want_tokens);
        }
        check_bits("draw_tokens", "v " + std::to_string(v) + ": every position drawn", drawn,
                   want_drawn);
    }
    // The edge cases must have been set up (a number exactly on an edge exists for most rows).
    record("draw_tokens", edges >= 24 ? 0.0 : 1.0, 0.0,
           "only " + std::to_string(edges) + " numbers on a colour's edge");
    record("draw_tokens", ref_past_end > 0 ? 0.0 : 1.0, 0.0, "no draw rounded past the end");
}

}  // namespace

int main() {
    for (bool reverse : {false, true}) {
        cuda_host::set_reverse_order(reverse);
        check_memory();
        check_embedding();
        check_rmsnorm();
        check_gelu();
        check_cross_entropy();
        check_optimizer();
        check_column_sums();
        check_attention();
        check_decoding<float>(kv_store_f32, attend_f32, attend_f32_to_bf16, "kv_store_f32",
                              "attend_f32", "attend_f32_to_bf16");
        check_decoding<uint16_t>(kv_store_bf16, attend_bf16, attend_bf16_to_bf16,
                                 "kv_store_bf16", "attend_bf16", "attend_bf16_to_bf16");
        // The bf16 kernels' tile copies landing as late, then as early, as they may.
        for (bool late : {true, false}) {
            cuda_host::set_late_async_copies(late);
            check_flash_attention(true);
        }
        check_flash_attention(false);
        check_draw_tokens();
    }
    bool all = true;
    printf("%-32s %12s %9s  %s\n", "kernel", "max error", "tolerance", "result");
    for (const std::string& k : order) {
        const Outcome& o = outcomes[k];
        all &= o.pass;
        printf("%-32s %12.3e %9.0e  %s%s%s\n", k.c_str(), o.worst, o.tol, o.pass ? "PASS" : "FAIL",
               o.pass ? "" : "  ", o.note.c_str());
    }
    return all ? 0 : 1;
}
