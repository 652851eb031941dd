// The rules of the host CUDA driver (driver.cpp) hold: each call a GPU's driver or cuBLAS
// would refuse is refused here too, and graphs record instead of running. Without these,
// igpt's backend passing on that driver would prove less than it says.
//
//   g++ -std=c++17 -O2 -pthread -fno-extern-tls-init -I DIR tests/cuda_host/driver_rules.cpp
//
// (DIR holds kernel_list.inc; tests/cuda_on_host.rs builds and runs this.) Prints one line per
// rule and exits non-zero if any does not hold.

#include "driver.cpp"

#include <signal.h>
#include <sys/wait.h>

#include <cmath>

namespace {

int failures = 0;

void expect(bool holds, const char* rule) {
    printf("%-78s %s\n", rule, holds ? "PASS" : "FAIL");
    if (!holds) failures++;
}

// Launches fill_f32(x, value, n) with one block of `threads` on `stream`.
CUresult fill(CUfunction f, float* x, float value, size_t n, CUstream stream,
              unsigned threads = 256, unsigned shared = 0) {
    void* args[] = {&x, &value, &n};
    return cuLaunchKernel(f, 1, 1, 1, threads, 1, 1, shared, stream, args, nullptr);
}

bool all_equal(const float* x, size_t n, float value) {
    for (size_t i = 0; i < n; i++)
        if (!(x[i] == value)) return false;
    return true;
}

}  // namespace

int main() {
    cuInit(0);
    const char* ptx =
        ".version 8.0\n.target sm_90\n.visible .entry fill_f32(\n.param .u64 x,\n"
        ".param .f32 value,\n.param .u64 n\n)\n";
    CUmodule module;
    expect(cuModuleLoadData(&module, ptx) == CUDA_ERROR_INVALID_CONTEXT,
           "without a current context, loading a module is refused");
    CUcontext ctx;
    cuDevicePrimaryCtxRetain(&ctx, 0);
    cuCtxSetCurrent(ctx);
    expect(cuModuleLoadData(&module, ptx) == CUDA_SUCCESS, "PTX text loads");
    CUmodule bad;
    expect(cuModuleLoadData(&bad, "not ptx") == CUDA_ERROR_INVALID_PTX,
           "an image that is not PTX is refused");
    CUfunction f;
    expect(cuModuleGetFunction(&f, module, "fill_f32") == CUDA_SUCCESS,
           "a kernel the PTX has is found");
    CUfunction missing;
    expect(cuModuleGetFunction(&missing, module, "adamw") == CUDA_ERROR_NOT_FOUND,
           "a kernel of kernels.cu that the PTX lacks is not found");
    CUmodule stale;
    cuModuleLoadData(&stale,
                     ".version 8.0\n.target sm_90\n.visible .entry fill_f32(\n.param .u64 x,\n"
                     ".param .f32 value,\n.param .u32 n\n)\n");
    CUfunction stale_fill;
    expect(cuModuleGetFunction(&stale_fill, stale, "fill_f32") == CUDA_ERROR_INVALID_IMAGE,
           "a PTX entry whose parameters differ from kernels.cu's is refused");

    // Memory.
    const size_t n = 1000;
    CUdeviceptr dev;
    expect(cuMemAlloc_v2(&dev, n * 4) == CUDA_SUCCESS, "allocation");
    std::vector<float> host(n + 1, 3.0f);
    expect(cuMemcpyHtoD_v2(dev, host.data(), n * 4) == CUDA_SUCCESS, "a copy of the whole allocation");
    expect(cuMemcpyHtoD_v2(dev, host.data(), n * 4 + 4) == CUDA_ERROR_INVALID_VALUE,
           "a copy one element past the allocation is refused");
    expect(cuMemcpyHtoD_v2(dev - 4, host.data(), 4) == CUDA_ERROR_INVALID_VALUE,
           "a copy before the allocation is refused");
    size_t free_bytes, total;
    cuMemGetInfo_v2(&free_bytes, &total);
    CUdeviceptr huge;
    expect(cuMemAlloc_v2(&huge, total) == CUDA_ERROR_OUT_OF_MEMORY,
           "an allocation beyond the free memory fails");
    {
        // Reading past the end faults (the allocation ends at an unmapped page).
        pid_t child = fork();
        if (child == 0) {
            volatile float past = ((float*)dev)[(n * 4 + 255) / 256 * 64];
            (void)past;
            _exit(0);
        }
        int status = 0;
        waitpid(child, &status, 0);
        expect(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV,
               "a read past the end of an allocation faults");
    }

    // Launches.
    float* x = (float*)dev;
    expect(fill(f, x, 1.0f, n, nullptr) == CUDA_SUCCESS && all_equal(x, n, 1.0f),
           "a launch on the default stream runs at once");
    expect(fill(f, (float*)host.data(), 1.0f, n, nullptr) == CUDA_ERROR_ILLEGAL_ADDRESS,
           "a pointer argument outside device memory is refused");
    expect(fill(f, x, 1.0f, n, nullptr, 2048) == CUDA_ERROR_INVALID_VALUE,
           "a block of 2048 threads is refused");
    expect(fill(f, x, 1.0f, n, nullptr, 256, 64 * 1024) == CUDA_ERROR_INVALID_VALUE,
           "64 KiB of dynamic shared memory without opting in is refused");
    {
        float value = 0.0f;
        void* args[] = {&x, &value, (void*)&n};
        expect(cuLaunchKernel(f, 1, 70000, 1, 32, 1, 1, 0, nullptr, args, nullptr) ==
                   CUDA_ERROR_INVALID_VALUE,
               "a grid of 70000 in y is refused");
    }

    // Capture and replay.
    CUstream side;
    cuStreamCreate(&side, 1);
    expect(cuStreamBeginCapture_v2(nullptr, 1) != CUDA_SUCCESS,
           "the legacy default stream cannot capture");
    cuStreamBeginCapture_v2(side, 1);
    fill(f, x, 2.0f, n, side);
    expect(all_equal(x, n, 1.0f), "a launch on a capturing stream does not run");
    expect(cuMemcpyDtoH_v2(host.data(), dev, 4) == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
           "a synchronous copy while capturing is refused");
    CUgraph graph;
    expect(cuStreamEndCapture(side, &graph) == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
           "that copy invalidates the capture");
    {
        cuStreamBeginCapture_v2(side, 1);
        CUdeviceptr more;
        expect(cuMemAlloc_v2(&more, 64) == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
               "an allocation while capturing is refused");
        CUgraph g;
        expect(cuStreamEndCapture(side, &g) == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
               "and invalidates the capture");
        cuStreamBeginCapture_v2(side, 1);
        expect(cuCtxSynchronize() == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
               "a wait for the device while capturing is refused");
        expect(cuStreamEndCapture(side, &g) == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
               "and invalidates the capture too");
    }

    cuStreamBeginCapture_v2(side, 1);
    float value = 4.0f;
    {
        void* args[] = {&x, &value, (void*)&n};
        cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, side, args, nullptr);
    }
    value = 5.0f;  // a launch's arguments are copied when it is recorded
    CUresult other_thread = CUDA_ERROR_INVALID_VALUE;
    std::thread([&] {
        cuCtxSetCurrent(ctx);
        other_thread = cuMemcpyHtoD_v2(dev, host.data(), 4);
    }).join();
    expect(other_thread == CUDA_SUCCESS,
           "thread-local capture: another thread's synchronous copy is allowed");
    expect(cuStreamEndCapture(side, &graph) == CUDA_SUCCESS, "a capture of launches ends");
    CUgraphExec exec;
    cuGraphInstantiateWithFlags(&exec, graph, 0);
    fill(f, x, 1.0f, n, nullptr);
    expect(cuGraphLaunch(exec, nullptr) == CUDA_SUCCESS && all_equal(x, n, 4.0f),
           "replaying the graph runs its launch with the recorded arguments");
    fill(f, x, 1.0f, n, nullptr);
    cuGraphLaunch(exec, nullptr);
    expect(all_equal(x, n, 4.0f), "and again");

    {
        CUresult other = CUDA_SUCCESS;
        std::thread([&] { other = fill(f, x, 1.0f, n, nullptr); }).join();
        expect(other == CUDA_ERROR_INVALID_CONTEXT,
               "a launch from a thread with no current context is refused");
    }
    {
        // A graph whose buffer was freed after recording: refused at replay.
        CUdeviceptr scratch;
        cuMemAlloc_v2(&scratch, 64);
        cuStreamBeginCapture_v2(side, 1);
        fill(f, (float*)scratch, 1.0f, 16, side);
        CUgraph g;
        cuStreamEndCapture(side, &g);
        CUgraphExec e;
        cuGraphInstantiateWithFlags(&e, g, 0);
        cuMemFree_v2(scratch);
        expect(cuGraphLaunch(e, nullptr) == CUDA_ERROR_ILLEGAL_ADDRESS,
               "replaying a graph whose memory was freed is refused");
    }
    {
        // A kernel writing one element past its allocation (into the 256-byte rounding).
        pid_t child = fork();
        if (child == 0) {
            CUdeviceptr small;
            cuMemAlloc_v2(&small, 40);
            fill(f, (float*)small, 0.0f, 11, nullptr);
            _exit(0);
        }
        int status = 0;
        waitpid(child, &status, 0);
        expect(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT,
               "a kernel that writes past an allocation's end is caught");
    }

    // cuBLASLt: C (2x2) = A (2x3) B (3x2), column-major, C starting as NaN with beta 0.
    void* lt;
    cublasLtCreate(&lt);
    CUdeviceptr a, b, c, workspace;
    cuMemAlloc_v2(&a, 6 * 4 + 256);
    cuMemAlloc_v2(&b, 6 * 4);
    cuMemAlloc_v2(&c, 4 * 4);
    cuMemAlloc_v2(&workspace, 1 << 20);
    float ha[6] = {1, 4, 2, 5, 3, 6};  // [[1 2 3] [4 5 6]]
    float hb[6] = {1, 0, 1, 0, 1, 1};  // [[1 0] [0 1] [1 1]]
    float hc[4] = {NAN, NAN, NAN, NAN};
    cuMemcpyHtoD_v2(a, ha, sizeof ha);
    cuMemcpyHtoD_v2(a + 132, ha, sizeof ha);  // the same A, aligned to 4 bytes only
    cuMemcpyHtoD_v2(b, hb, sizeof hb);
    cuMemcpyHtoD_v2(c, hc, sizeof hc);
    void *desc, *la, *lb, *lc, *pref;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, 2, 3, 2);
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, 3, 2, 3);
    cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, 2, 2, 2);
    cublasLtMatmulPreferenceCreate(&pref);
    unsigned long long ws_bytes = 1 << 20;
    expect(cublasLtMatmulPreferenceSetAttribute(pref, 1, &ws_bytes, 8) == CUBLAS_STATUS_SUCCESS,
           "cuBLASLt: a preference's workspace, 8 bytes");
    int op_t = 1;
    expect(cublasLtMatmulDescSetAttribute(desc, 3, &op_t, 8) == CUBLAS_STATUS_INVALID_VALUE,
           "an attribute of the wrong size is refused");
    LtHeuristicResult found[1];
    int returned = 0;
    auto choose = [&](void* layout_a) {
        return cublasLtMatmulAlgoGetHeuristic(lt, desc, layout_a, lb, lc, lc, pref, 1, found,
                                              &returned);
    };
    // B's and C's columns start every 12 and 8 bytes: chosen for 4. A's stays at the default,
    // 256, first.
    unsigned four = 4, eight = 8;
    for (int attr : {6, 7, 8}) cublasLtMatmulPreferenceSetAttribute(pref, attr, &four, 4);
    expect(choose(la) == CUBLAS_STATUS_SUCCESS && returned == 1 &&
               found[0].workspaceSize <= ws_bytes,
           "the heuristic returns an algorithm within the workspace");
    LtAlgo for_256 = found[0].algo;
    float one = 1.0f, zero = 0.0f;
    auto product = [&](CUdeviceptr at_a, const LtAlgo* with, size_t ws, CUstream s) {
        return cublasLtMatmul(lt, desc, &one, (void*)at_a, la, (void*)b, lb, &zero, (void*)c, lc,
                              (void*)c, lc, with, (void*)workspace, ws, s);
    };
    expect(product(a, &for_256, ws_bytes, nullptr) == CUBLAS_STATUS_NOT_SUPPORTED,
           "columns less aligned (ld 2) than the algorithm was chosen for are refused");
    cublasLtMatmulPreferenceSetAttribute(pref, 5, &eight, 4);
    choose(la);
    LtAlgo algo = found[0].algo;
    expect(product(a, &algo, ws_bytes, nullptr) == CUBLAS_STATUS_SUCCESS, "a product");
    cuMemcpyDtoH_v2(hc, c, sizeof hc);
    expect(hc[0] == 4 && hc[1] == 10 && hc[2] == 5 && hc[3] == 11,
           "its column-major result, C never read when beta is 0");
    // D = A B + C into another buffer: C is read, not written.
    CUdeviceptr d;
    cuMemAlloc_v2(&d, 8 * 4);
    float addend[4] = {1, 2, 3, 4}, hd[4];
    cuMemcpyHtoD_v2(c, addend, sizeof addend);
    auto onto = [&](CUdeviceptr out) {
        return cublasLtMatmul(lt, desc, &one, (void*)a, la, (void*)b, lb, &one, (void*)c, lc,
                              (void*)out, lc, &algo, (void*)workspace, ws_bytes, nullptr);
    };
    expect(onto(d) == CUBLAS_STATUS_SUCCESS, "a product onto another buffer");
    cuMemcpyDtoH_v2(hd, d, sizeof hd);
    cuMemcpyDtoH_v2(hc, c, sizeof hc);
    expect(hd[0] == 5 && hd[1] == 12 && hd[2] == 8 && hd[3] == 15 && hc[0] == 1 && hc[3] == 4,
           "D = A B + C, C unchanged");
    expect(onto(c + 8) == CUBLAS_STATUS_INVALID_VALUE,
           "a D that overlaps C without being it is refused");
    expect(product(a + 132, &algo, ws_bytes, nullptr) == CUBLAS_STATUS_NOT_SUPPORTED,
           "an operand less aligned than its algorithm was chosen for is refused");
    cublasLtMatmulPreferenceSetAttribute(pref, 5, &four, 4);
    choose(la);
    expect(product(a + 132, &found[0].algo, ws_bytes, nullptr) == CUBLAS_STATUS_SUCCESS,
           "one chosen for 4-byte alignment runs there");
    expect(product(a, &algo, found[0].workspaceSize - 1, nullptr) == CUBLAS_STATUS_INVALID_VALUE,
           "less workspace than the algorithm asked for is refused");
    expect(product(a, nullptr, ws_bytes, nullptr) == CUBLAS_STATUS_INVALID_VALUE,
           "a product without a chosen algorithm is refused");
    void* la_wide;
    cublasLtMatrixLayoutCreate(&la_wide, CUDA_R_32F, 2, 3, 3);
    expect(cublasLtMatmul(lt, desc, &one, (void*)a, la_wide, (void*)b, lb, &zero, (void*)c, lc,
                          (void*)c, lc, &algo, (void*)workspace, ws_bytes,
                          nullptr) == CUBLAS_STATUS_INVALID_VALUE,
           "an algorithm chosen for another layout is refused");
    void* la_short;
    cublasLtMatrixLayoutCreate(&la_short, CUDA_R_32F, 2, 3, 1);
    expect(choose(la_short) == CUBLAS_STATUS_NOT_SUPPORTED,
           "a leading dimension below its matrix's rows is refused");
    void* fast_desc;
    cublasLtMatmulDescCreate(&fast_desc, CUBLAS_COMPUTE_32F_FAST_16BF, CUDA_R_32F);
    void *la16, *lb16;
    cublasLtMatrixLayoutCreate(&la16, CUDA_R_16BF, 2, 3, 2);
    cublasLtMatrixLayoutCreate(&lb16, CUDA_R_16BF, 3, 2, 3);
    expect(cublasLtMatmulAlgoGetHeuristic(lt, fast_desc, la16, lb16, lc, lc, pref, 1, found,
                                          &returned) == CUBLAS_STATUS_NOT_SUPPORTED,
           "bf16 operands with a FAST_16BF compute type are refused");
    // A bf16 result: from bf16 operands only, C and D of one type, the f32 sum rounded.
    void *lc16, *desc16;
    cublasLtMatrixLayoutCreate(&lc16, CUDA_R_16BF, 2, 2, 2);
    cublasLtMatmulDescCreate(&desc16, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    expect(cublasLtMatmulAlgoGetHeuristic(lt, desc16, la, lb, lc16, lc16, pref, 1, found,
                                          &returned) == CUBLAS_STATUS_NOT_SUPPORTED,
           "a bf16 result from f32 operands is refused");
    expect(cublasLtMatmulAlgoGetHeuristic(lt, desc16, la16, lb16, lc, lc16, pref, 1, found,
                                          &returned) == CUBLAS_STATUS_NOT_SUPPORTED,
           "C and D of two types are refused");
    // bf16 columns 2 elements apart start on 4 bytes, 3 apart on 2: chosen for 2.
    void* pref16;
    cublasLtMatmulPreferenceCreate(&pref16);
    cublasLtMatmulPreferenceSetAttribute(pref16, 1, &ws_bytes, 8);
    unsigned two = 2;
    for (int attr : {5, 6, 7, 8}) cublasLtMatmulPreferenceSetAttribute(pref16, attr, &two, 4);
    expect(cublasLtMatmulAlgoGetHeuristic(lt, desc16, la16, lb16, lc16, lc16, pref16, 1, found,
                                          &returned) == CUBLAS_STATUS_SUCCESS,
           "a bf16 result from bf16 operands is chosen");
    {
        // A = [[1 2 3] [4 5 6]] and B = [[1 0] [0 1] [1 1]] in bf16 (exact), C = A B / 3:
        // 4/3, 10/3, 5/3, 11/3, each rounded once to bf16.
        CUdeviceptr a16, b16, c16;
        cuMemAlloc_v2(&a16, 6 * 2);
        cuMemAlloc_v2(&b16, 6 * 2);
        cuMemAlloc_v2(&c16, 4 * 2);
        uint16_t ha16[6], hb16[6], hc16[4] = {0x7f81, 0x7f81, 0x7f81, 0x7f81};
        for (int i = 0; i < 6; i++) {
            ha16[i] = (uint16_t)(__float_as_uint(ha[i]) >> 16);
            hb16[i] = (uint16_t)(__float_as_uint(hb[i]) >> 16);
        }
        cuMemcpyHtoD_v2(a16, ha16, sizeof ha16);
        cuMemcpyHtoD_v2(b16, hb16, sizeof hb16);
        cuMemcpyHtoD_v2(c16, hc16, sizeof hc16);
        float third = 1.0f / 3.0f;
        expect(cublasLtMatmul(lt, desc16, &third, (void*)a16, la16, (void*)b16, lb16, &zero,
                              (void*)c16, lc16, (void*)c16, lc16, &found[0].algo,
                              (void*)workspace, ws_bytes, nullptr) == CUBLAS_STATUS_SUCCESS,
               "a product with a bf16 result");
        cuMemcpyDtoH_v2(hc16, c16, sizeof hc16);
        const float sums[4] = {4, 10, 5, 11};
        bool rounded = true;
        for (int i = 0; i < 4; i++)
            rounded &= hc16[i] == __float2bfloat16((float)(sums[i] * (double)third)).bits;
        expect(rounded, "its result is the f32 one rounded to bf16 (C unread with beta 0)");
    }
    hc[0] = NAN;
    cuMemcpyHtoD_v2(c, hc, 4);
    cuStreamBeginCapture_v2(side, 1);
    expect(product(a, &algo, ws_bytes, side) == CUBLAS_STATUS_SUCCESS,
           "a product on a capturing stream is recorded");
    expect(cuStreamEndCapture(side, &graph) == CUDA_SUCCESS, "and the capture ends");
    cuMemcpyDtoH_v2(hc, c, 4);
    expect(std::isnan(hc[0]), "recorded, it has not run");
    CUgraphExec recorded;
    cuGraphInstantiateWithFlags(&recorded, graph, 0);
    cuGraphLaunch(recorded, nullptr);
    cuMemcpyDtoH_v2(hc, c, 4);
    expect(hc[0] == 4, "replayed, it has");

    printf("%d rule(s) broken\n", failures);
    return failures == 0 ? 0 : 1;
}
