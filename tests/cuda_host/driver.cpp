// A CUDA driver and cuBLASLt for a machine without a GPU: the parts of libcuda and libcublasLt
// that igpt's CUDA backend (src/backend/cuda) calls through cudarc, with igpt's kernels
// (kernels.cu, compiled for the CPU through shim.h) standing in for the PTX. Built as one
// shared library that answers to the names cudarc looks for (libcuda.so, libcublasLt.so), it
// lets the real `igpt --device cuda` run here: every launch, argument
// list, grid, copy, cuBLASLt product and CUDA graph of the Rust side, checked where a GPU
// would fail or misbehave.
//
//   g++ -std=c++17 -O2 -pthread -fPIC -shared -fno-extern-tls-init -I DIR \
//       tests/cuda_host/driver.cpp -o DIR/libcuda.so
//
// DIR holds kernel_list.inc, one KERNEL(name) per kernel of kernels.cu
// (tests/cuda_on_host.rs writes it from the source).
//
// What it checks, as a GPU or its driver would:
//   - device memory, as compute-sanitizer would: every pointer a launch, copy or product is
//     given must lie in a live allocation (or be null), with the bytes a copy or product
//     touches, when it is issued and again at each replay of a graph that recorded it; an
//     allocation's end, rounded up to 256 bytes, meets an unmapped page, so a read or write
//     beyond that faults, and a write into the rounding is caught after the call that made it;
//   - a context is current on the thread that launches, allocates or copies;
//   - launches: the function was loaded from the PTX the backend gave (its `.entry` is in the
//     module, with parameters of the sizes kernels.cu's signature has), grids and blocks within the limits of compute capability 9.0, dynamic shared
//     memory within the 48 KiB a kernel has unless cuFuncSetAttribute raised it;
//   - products: cuBLASLt's argument rules (attribute sizes, leading dimensions, operand and
//     compute types, layouts that make one product), the column-major definition of a strided
//     batched product, beta = 0 never reading C, FAST_16BF rounding its operands to bfloat16,
//     and an algorithm's needs: operands aligned as the heuristic was told they would be (every
//     column's and batch matrix's start, conservatively), and the workspace it asked for, in
//     device memory;
//   - CUDA graphs: while a stream captures, its launches, products and asynchronous copies
//     are recorded with their arguments' values, not run; a call that would synchronise or
//     allocate (a synchronous copy, cuMemAlloc, cuCtxSynchronize) from the capturing thread
//     fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates the capture, as in
//     CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
//   - igpt's own rule, stricter than cuBLASLt (which runs its heuristic itself when given no
//     algorithm): every product passes the algorithm the heuristic chose for exactly its
//     descriptor and layouts.
// What it does not check: timing; the order of work between streams (everything runs when it
// is issued, so a missing wait between two streams goes unseen); reads of `__shared__` arrays
// no thread of the block wrote; reads into an allocation's rounding.
//
// Environment: CUDA_HOST_MEMORY_BYTES sets the device's memory (default 8 GiB);
// CUDA_HOST_REFUSE_CAPTURE refuses every stream capture (to test the callers' fallback);
// CUDA_HOST_REVERSE_ORDER starts blocks, and the threads of each, in descending order (a
// result that depends on the order of additions then changes); CUDA_HOST_HEURISTICS_LOG names a
// file to which each heuristic query appends the product it was asked for;
// CUDA_HOST_CUBLASLT_VERSION sets the version cublasLtGetVersion reports (default 130000);
// CUDA_HOST_SHARED_PER_SM, the shared memory a multiprocessor has (default 228 KiB).

#include "shim.h"

#ifdef KERNELS_CU
#include KERNELS_CU
#else
#include "../../src/backend/cuda/kernels.cu"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace fake {

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_UNMATCHED = 903,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
};

// Says why a call failed, on stderr, so a failing run names the rule it broke.
CUresult refuse(CUresult code, const char* call, const std::string& why) {
    fprintf(stderr, "cuda_host driver: %s fails (%d): %s\n", call, code, why.c_str());
    return code;
}

std::recursive_mutex lock;
#define GUARD std::lock_guard<std::recursive_mutex> guard(lock)

// ---------------------------------------------------------------------------------------
// Device memory: host pages, each allocation ending where an unmapped page begins.

struct Allocation {
    void* map;
    size_t map_bytes;
    size_t bytes;
};
std::map<uintptr_t, Allocation> allocations;  // by start address
size_t allocated = 0;

size_t memory_bytes() {
    const char* s = getenv("CUDA_HOST_MEMORY_BYTES");
    return s ? strtoull(s, nullptr, 10) : (size_t)8 << 30;
}

// Whether [p, p + bytes) lies inside one live allocation.
bool in_allocation(uintptr_t p, size_t bytes) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p >= it->first && p + bytes <= it->first + it->second.bytes;
}

std::string hex(uintptr_t p) {
    char s[32];
    snprintf(s, sizeof s, "%#llx", (unsigned long long)p);
    return s;
}

// ---------------------------------------------------------------------------------------
// Streams, capture and graphs. Work runs as it is issued, except on a capturing stream,
// where it is recorded.

// A unit of work, and the device bytes it uses (checked again when a graph replays it).
struct Job {
    std::function<void()> run;
    std::vector<std::pair<uintptr_t, size_t>> uses;
};

struct Stream {
    bool capturing = false;
    bool invalidated = false;
    int mode = 0;  // CUstreamCaptureMode: 0 global, 1 thread-local, 2 relaxed
    std::thread::id owner;
    std::vector<Job> jobs;
};
Stream legacy_stream;  // the null stream
std::set<Stream*> streams;

Stream* stream_of(void* s) { return s ? static_cast<Stream*>(s) : &legacy_stream; }

struct Graph {
    std::vector<Job> jobs;
};

// The stream capturing in a mode that forbids `call` from this thread, if any: it is
// invalidated and the call fails.
CUresult forbidden_while_capturing(const char* call) {
    for (Stream* s : streams) {
        if (!s->capturing) continue;
        bool applies = s->mode == 0 || (s->mode == 1 && s->owner == std::this_thread::get_id());
        if (applies) {
            s->invalidated = true;
            return refuse(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, call,
                          "not allowed while a stream captures a graph (it would synchronise "
                          "or allocate); the capture is now invalid");
        }
    }
    return CUDA_SUCCESS;
}

// Aborts if a call wrote into an allocation's rounding (past its end): on a GPU the write
// would land in memory nothing owns, or another buffer's.
void check_rounding(const char* what) {
    for (const auto& [start, a] : allocations) {
        size_t padded = (a.bytes + 255) / 256 * 256;
        for (size_t i = a.bytes; i < padded; i++)
            if (((const unsigned char*)start)[i] != 0xff) {
                fprintf(stderr,
                        "cuda_host driver: %s wrote past the end of the %zu-byte allocation at "
                        "%s (byte %zu)\n",
                        what, a.bytes, hex(start).c_str(), i);
                abort();
            }
    }
}

void run_job(const Job& job, const char* what) {
    job.run();
    check_rounding(what);
}

// Runs `job` now, or records it if `stream` captures.
void issue(Stream* stream, Job job, const char* what) {
    if (stream->capturing)
        stream->jobs.push_back(std::move(job));
    else
        run_job(job, what);
}

// ---------------------------------------------------------------------------------------
// Kernels: each kernel of kernels.cu by name, bound to a launch's argument values.

// Checks a pointer argument: null, or inside a live allocation.
template <typename T>
bool pointer_ok(const T&, std::string&, Job&) {
    return true;
}
template <typename T>
bool pointer_ok(T* const& p, std::string& why, Job& job) {
    if (p == nullptr) return true;
    if (in_allocation((uintptr_t)p, 1)) {
        job.uses.push_back({(uintptr_t)p, 1});
        return true;
    }
    why = "pointer argument " + hex((uintptr_t)p) + " is in no device allocation";
    return false;
}

using Binder = CUresult (*)(void** args, dim3 grid, dim3 block, size_t shared, Job* job,
                            std::string* why);

template <typename... P, size_t... I>
CUresult bind_args(void (*kernel)(P...), void** args, dim3 grid, dim3 block, size_t shared,
                   Job* job, std::string* why, std::index_sequence<I...>) {
    // The values are copied now, as the driver copies a launch's parameters when it is
    // issued (or recorded).
    std::tuple<std::decay_t<P>...> values(*static_cast<std::decay_t<P>*>(args[I])...);
    bool ok = true;
    ((ok = ok && pointer_ok(std::get<I>(values), *why, *job)), ...);
    if (!ok) return CUDA_ERROR_ILLEGAL_ADDRESS;
    job->run = [=] {
        std::apply([&](auto... v) { cuda_host::launch(kernel, grid, block, shared, v...); },
                   values);
    };
    return CUDA_SUCCESS;
}

template <typename... P>
CUresult bind_kernel(void (*kernel)(P...), void** args, dim3 grid, dim3 block, size_t shared,
                     Job* job, std::string* why) {
    return bind_args(kernel, args, grid, block, shared, job, why,
                     std::index_sequence_for<P...>{});
}

// The bytes of each parameter of a kernel's signature.
template <typename... P>
std::vector<size_t> param_sizes(void (*)(P...)) {
    return {sizeof(std::decay_t<P>)...};
}

struct Kernel {
    Binder bind;
    std::vector<size_t> params;
};

#define KERNEL(name)                                                                       \
    {#name, Kernel{[](void** a, dim3 g, dim3 b, size_t s, Job* j, std::string* w) {        \
                       return bind_kernel(::name, a, g, b, s, j, w);                       \
                   },                                                                      \
                   param_sizes(::name)}},
const std::map<std::string, Kernel> kernels = {
#include "kernel_list.inc"
};
#undef KERNEL

struct Module {
    // The `.entry` names of its PTX, with the bytes of each parameter.
    std::map<std::string, std::vector<size_t>> entries;
};

// Bytes of a PTX parameter declaration: `.param .u64 name`, `.param .align 8 .b8 name[1288]`.
size_t ptx_param_bytes(const std::string& decl) {
    size_t open = decl.find('[');
    if (open != std::string::npos) return strtoull(decl.c_str() + open + 1, nullptr, 10);
    for (const char* t : {".u64", ".s64", ".b64", ".f64"})
        if (decl.find(t) != std::string::npos) return 8;
    for (const char* t : {".u32", ".s32", ".b32", ".f32"})
        if (decl.find(t) != std::string::npos) return 4;
    for (const char* t : {".u16", ".s16", ".b16", ".f16"})
        if (decl.find(t) != std::string::npos) return 2;
    return 1;
}

struct Function {
    std::string name;
    Binder bind;
    int max_dynamic_shared = 48 * 1024;
};

constexpr int kMaxOptInShared = 227 * 1024;  // compute capability 9.0

}  // namespace fake

using namespace fake;

// ---------------------------------------------------------------------------------------
// The driver API (libcuda), as far as cudarc and igpt call it.

extern "C" {

typedef int CUdevice;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUevent;
typedef void* CUgraph;
typedef void* CUgraphExec;

static int initialised = 0;
static int context_token = 0;  // a primary context's handle points here
static thread_local CUcontext current_context = nullptr;

// A call that needs the context current on this thread, as the driver's do.
static CUresult no_context(const char* call) {
    if (current_context) return CUDA_SUCCESS;
    return refuse(CUDA_ERROR_INVALID_CONTEXT, call, "no context is current on this thread");
}

CUresult cuInit(unsigned int) {
    initialised = 1;
    if (getenv("CUDA_HOST_REVERSE_ORDER")) cuda_host::set_reverse_order(true);
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* count) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    *count = 1;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *device = 0;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, len, "igpt host emulation of a CUDA device");
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = memory_bytes();
    return CUDA_SUCCESS;
}

// Shared memory a multiprocessor has: an H200's 228 KiB, or CUDA_HOST_SHARED_PER_SM bytes (to
// stand for a GPU with less, as sm_86 and sm_89 have 100 KiB).
static int shared_per_multiprocessor() {
    const char* v = getenv("CUDA_HOST_SHARED_PER_SM");
    return v ? atoi(v) : 228 * 1024;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *value = 1024; break;        // max threads per block
        case 8: *value = 48 * 1024; break;   // shared memory per block
        case 16: *value = 132; break;        // multiprocessors (an H200's)
        case 75: *value = 9; break;          // compute capability major
        case 76: *value = 0; break;          // minor
        case 97: *value = kMaxOptInShared; break;  // shared memory per block, opt-in
        case 81: *value = shared_per_multiprocessor(); break;
        default: *value = 0;
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice) {
    *ctx = &context_token;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }

CUresult cuCtxGetCurrent(CUcontext* ctx) {
    *ctx = current_context;
    return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    current_context = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice* device) {
    *device = 0;
    return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize() {
    GUARD;
    if (CUresult e = no_context("cuCtxSynchronize")) return e;
    return forbidden_while_capturing("cuCtxSynchronize");
}

CUresult cuGetErrorString(CUresult, const char** s) {
    *s = "error (igpt host emulation: see the message on stderr)";
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult, const char** s) {
    *s = "CUDA_ERROR (host emulation)";
    return CUDA_SUCCESS;
}

// --- memory

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    GUARD;
    *total = memory_bytes();
    *free_bytes = *total - std::min(allocated, *total);
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* ptr, size_t bytes) {
    GUARD;
    if (CUresult e = no_context("cuMemAlloc")) return e;
    if (CUresult e = forbidden_while_capturing("cuMemAlloc")) return e;
    if (bytes == 0) return refuse(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc", "0 bytes");
    if (allocated + bytes > memory_bytes())
        return refuse(CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc",
                      std::to_string(bytes) + " bytes do not fit");
    size_t page = sysconf(_SC_PAGESIZE);
    size_t padded = (bytes + 255) / 256 * 256;  // the driver aligns to 256 bytes at least
    size_t data_pages = (padded + page - 1) / page * page;
    size_t map_bytes = data_pages + page;
    void* map = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (map == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* guard_page = (char*)map + data_pages;
    mprotect(guard_page, page, PROT_NONE);
    // The end of the (256-aligned) allocation meets the guard page.
    uintptr_t start = (uintptr_t)guard_page - padded;
    // Fresh device memory holds whatever was there: not zeros.
    memset((void*)start, 0xff, padded);
    allocations[start] = {map, map_bytes, bytes};
    allocated += bytes;
    *ptr = start;
    return CUDA_SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr ptr) {
    GUARD;
    if (CUresult e = forbidden_while_capturing("cuMemFree")) return e;
    auto it = allocations.find(ptr);
    if (it == allocations.end())
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuMemFree", hex(ptr) + " was not allocated");
    munmap(it->second.map, it->second.map_bytes);
    allocated -= it->second.bytes;
    allocations.erase(it);
    return CUDA_SUCCESS;
}

// For tests that need to know which kernels and products were issued (recorded into a graph
// or run at once), and on what grid or shape: one line each in CUDA_HOST_LAUNCH_LOG.
static void log_launch(const std::string& what, const std::string& how) {
    if (const char* log = getenv("CUDA_HOST_LAUNCH_LOG")) {
        if (FILE* f = fopen(log, "a")) {
            fprintf(f, "%s %s\n", what.c_str(), how.c_str());
            fclose(f);
        }
    }
}

static CUresult check_range(const char* call, CUdeviceptr p, size_t bytes) {
    if (in_allocation(p, bytes)) return CUDA_SUCCESS;
    return refuse(CUDA_ERROR_INVALID_VALUE, call,
                  std::to_string(bytes) + " bytes at " + hex(p) + " are not all device memory");
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
    GUARD;
    if (CUresult e = no_context("cuMemsetD8")) return e;
    if (CUresult e = forbidden_while_capturing("cuMemsetD8")) return e;
    if (CUresult e = check_range("cuMemsetD8", dst, n)) return e;
    memset((void*)dst, value, n);
    return CUDA_SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream s) {
    GUARD;
    if (CUresult e = no_context("cuMemsetD8Async")) return e;
    if (CUresult e = check_range("cuMemsetD8Async", dst, n)) return e;
    issue(stream_of(s), Job{[=] { memset((void*)dst, value, n); }, {{dst, n}}},
          "cuMemsetD8Async");
    return CUDA_SUCCESS;
}

CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int value, size_t n, CUstream s) {
    GUARD;
    if (CUresult e = no_context("cuMemsetD32Async")) return e;
    if (dst % 4 != 0)
        return refuse(CUDA_ERROR_INVALID_VALUE, "cuMemsetD32Async", "the address is not 4-byte aligned");
    if (CUresult e = check_range("cuMemsetD32Async", dst, 4 * n)) return e;
    issue(stream_of(s),
          Job{[=] {
                  uint32_t* p = (uint32_t*)dst;
                  for (size_t i = 0; i < n; i++) p[i] = value;
              },
              {{dst, 4 * n}}},
          "cuMemsetD32Async");
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    GUARD;
    if (CUresult e = no_context("cuMemcpyHtoD")) return e;
    if (CUresult e = forbidden_while_capturing("cuMemcpyHtoD")) return e;
    if (CUresult e = check_range("cuMemcpyHtoD", dst, n)) return e;
    memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    GUARD;
    if (CUresult e = no_context("cuMemcpyDtoH")) return e;
    if (CUresult e = forbidden_while_capturing("cuMemcpyDtoH")) return e;
    if (CUresult e = check_range("cuMemcpyDtoH", src, n)) return e;
    memcpy(dst, (const void*)src, n);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    GUARD;
    if (CUresult e = check_range("cuMemcpyDtoDAsync", dst, n)) return e;
    if (CUresult e = check_range("cuMemcpyDtoDAsync", src, n)) return e;
    if (CUresult e = no_context("cuMemcpyDtoDAsync")) return e;
    log_launch("cuMemcpyDtoDAsync", "bytes " + std::to_string(n));
    issue(stream_of(s),
          Job{[=] { memmove((void*)dst, (const void*)src, n); }, {{dst, n}, {src, n}}},
          "cuMemcpyDtoDAsync");
    return CUDA_SUCCESS;
}

// --- modules and launches

CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    GUARD;
    const char* ptx = static_cast<const char*>(image);
    if (!strstr(ptx, ".version") || !strstr(ptx, ".target"))
        return refuse(CUDA_ERROR_INVALID_PTX, "cuModuleLoadData", "the image is not PTX text");
    if (CUresult e = no_context("cuModuleLoadData")) return e;
    auto* m = new Module;
    for (const char* p = ptx; (p = strstr(p, ".entry ")); p += 7) {
        const char* name = p + 7;
        size_t len = strcspn(name, "( \t\n");
        std::vector<size_t>& params = m->entries[std::string(name, len)];
        const char* open = strchr(name, '(');
        const char* close = open ? strchr(open, ')') : nullptr;
        if (!close) continue;
        std::string list(open + 1, close);
        for (size_t at = 0; (at = list.find(".param", at)) != std::string::npos;) {
            size_t end = std::min(list.find(',', at), list.size());
            params.push_back(ptx_param_bytes(list.substr(at, end - at)));
            at = end;
        }
    }
    *module = m;
    return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule module) {
    delete static_cast<Module*>(module);
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction* f, CUmodule module, const char* name) {
    GUARD;
    auto* m = static_cast<Module*>(module);
    auto entry = m->entries.find(name);
    if (entry == m->entries.end())
        return refuse(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction",
                      std::string("the PTX has no .entry ") + name);
    auto k = kernels.find(name);
    if (k == kernels.end())
        return refuse(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction",
                      std::string("kernels.cu defines no kernel ") + name);
    if (entry->second != k->second.params)
        return refuse(CUDA_ERROR_INVALID_IMAGE, "cuModuleGetFunction",
                      std::string("the PTX's parameters of ") + name +
                          " differ from kernels.cu's (is the PTX stale?)");
    *f = new Function{name, k->second.bind};
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(CUfunction f, int attribute, int value) {
    GUARD;
    auto* fn = static_cast<Function*>(f);
    if (attribute == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > kMaxOptInShared)
            return refuse(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute",
                          "dynamic shared memory beyond the device's opt-in limit");
        fn->max_dynamic_shared = value;
    }
    return CUDA_SUCCESS;
}

CUresult cuFuncGetAttribute(int* value, int attribute, CUfunction f) {
    auto* fn = static_cast<Function*>(f);
    *value = attribute == 8 ? fn->max_dynamic_shared : attribute == 0 ? 1024 : 0;
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream s, void** params,
                        void** extra) {
    GUARD;
    auto* fn = static_cast<Function*>(f);
    std::string call = "cuLaunchKernel(" + fn->name + ")";
    if (CUresult e = no_context(call.c_str())) return e;
    if (extra) return refuse(CUDA_ERROR_INVALID_VALUE, call.c_str(), "`extra` is not emulated");
    if (!params) return refuse(CUDA_ERROR_INVALID_VALUE, call.c_str(), "no parameters");
    if (gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu || gy > 65535 || gz > 65535)
        return refuse(CUDA_ERROR_INVALID_VALUE, call.c_str(),
                      "grid " + std::to_string(gx) + "x" + std::to_string(gy) + "x" +
                          std::to_string(gz) + " is outside the device's limits");
    if (bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64 ||
        (size_t)bx * by * bz > 1024)
        return refuse(CUDA_ERROR_INVALID_VALUE, call.c_str(), "block shape is not launchable");
    if ((int)shared > fn->max_dynamic_shared)
        return refuse(CUDA_ERROR_INVALID_VALUE, call.c_str(),
                      std::to_string(shared) + " bytes of dynamic shared memory exceed the " +
                          std::to_string(fn->max_dynamic_shared) + " the function allows");
    Job job;
    std::string why;
    if (CUresult e = fn->bind(params, dim3(gx, gy, gz), dim3(bx, by, bz), shared, &job, &why))
        return refuse(e, call.c_str(), why);
    log_launch(fn->name, "grid " + std::to_string(gx) + " " + std::to_string(gy) + " " +
                             std::to_string(gz));
    issue(stream_of(s), std::move(job), call.c_str());
    return CUDA_SUCCESS;
}

// --- streams and events

CUresult cuStreamCreate(CUstream* s, unsigned int) {
    GUARD;
    if (CUresult e = no_context("cuStreamCreate")) return e;
    auto* stream = new Stream;
    streams.insert(stream);
    *s = stream;
    return CUDA_SUCCESS;
}

CUresult cuStreamDestroy_v2(CUstream s) {
    GUARD;
    auto* stream = static_cast<Stream*>(s);
    if (stream->capturing)
        return refuse(CUDA_ERROR_ILLEGAL_STATE, "cuStreamDestroy", "the stream is capturing");
    streams.erase(stream);
    delete stream;
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream s) {
    GUARD;
    if (stream_of(s)->capturing) {
        stream_of(s)->invalidated = true;
        return refuse(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize",
                      "the stream is capturing; the capture is now invalid");
    }
    return forbidden_while_capturing("cuStreamSynchronize");
}

CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned int) { return CUDA_SUCCESS; }

CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    GUARD;
    if (!s)
        return refuse(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture",
                      "the legacy default stream cannot capture");
    auto* stream = static_cast<Stream*>(s);
    if (stream->capturing)
        return refuse(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture", "already capturing");
    if (getenv("CUDA_HOST_REFUSE_CAPTURE"))
        return refuse(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture",
                      "refused on request (CUDA_HOST_REFUSE_CAPTURE), to test the fallback");
    stream->capturing = true;
    stream->invalidated = false;
    stream->mode = mode;
    stream->owner = std::this_thread::get_id();
    stream->jobs.clear();
    return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(CUstream s, CUgraph* graph) {
    GUARD;
    Stream* stream = stream_of(s);
    if (!stream->capturing)
        return refuse(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture", "the stream is not capturing");
    if (stream->mode != 2 && stream->owner != std::this_thread::get_id())
        return refuse(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "cuStreamEndCapture",
                      "ended on another thread than the one that began it");
    stream->capturing = false;
    *graph = nullptr;
    if (stream->invalidated) {
        stream->jobs.clear();
        return refuse(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "cuStreamEndCapture",
                      "a forbidden call during the capture invalidated it");
    }
    *graph = new Graph{std::move(stream->jobs)};
    stream->jobs.clear();
    return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(CUstream s, int* status) {
    GUARD;
    Stream* stream = stream_of(s);
    *status = !stream->capturing ? 0 : stream->invalidated ? 2 : 1;
    return CUDA_SUCCESS;
}

struct Event {
    std::chrono::steady_clock::time_point at;
};

CUresult cuEventCreate(CUevent* e, unsigned int) {
    *e = new Event{std::chrono::steady_clock::now()};
    return CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(CUevent e) {
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}

CUresult cuEventRecord(CUevent e, CUstream s) {
    GUARD;
    auto* ev = static_cast<Event*>(e);
    issue(stream_of(s), Job{[ev] { ev->at = std::chrono::steady_clock::now(); }, {}},
          "cuEventRecord");
    return CUDA_SUCCESS;
}

CUresult cuEventSynchronize(CUevent) {
    GUARD;
    return forbidden_while_capturing("cuEventSynchronize");
}

CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }

CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    auto d = static_cast<Event*>(end)->at - static_cast<Event*>(start)->at;
    *ms = std::chrono::duration<float, std::milli>(d).count();
    return CUDA_SUCCESS;
}

CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    return cuEventElapsedTime_v2(ms, start, end);
}

// --- graphs

CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long) {
    GUARD;
    *exec = new Graph{static_cast<Graph*>(graph)->jobs};
    return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) {
    GUARD;
    Stream* stream = stream_of(s);
    if (stream->capturing)
        return refuse(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuGraphLaunch",
                      "launching a graph into a capture is not emulated");
    const std::vector<Job>& jobs = static_cast<Graph*>(exec)->jobs;
    for (const Job& job : jobs)
        for (auto [p, bytes] : job.uses)
            if (!in_allocation(p, bytes))
                return refuse(CUDA_ERROR_ILLEGAL_ADDRESS, "cuGraphLaunch",
                              "the graph uses " + std::to_string(bytes) + " bytes at " +
                                  hex(p) + ", freed since it was recorded");
    for (const Job& job : jobs) run_job(job, "a replayed graph");
    return CUDA_SUCCESS;
}

CUresult cuGraphUpload(CUgraphExec, CUstream) { return CUDA_SUCCESS; }

CUresult cuGraphExecDestroy(CUgraphExec exec) {
    delete static_cast<Graph*>(exec);
    return CUDA_SUCCESS;
}

CUresult cuGraphDestroy(CUgraph graph) {
    delete static_cast<Graph*>(graph);
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------
// cuBLASLt: descriptors, the heuristic, and products.

typedef int cublasStatus_t;
enum : cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};

enum : int { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum : int { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_16BF = 75 };

struct LtLayout {
    int type;
    unsigned long long rows, cols;
    long long ld;
    int batch = 1;
    long long stride = 0;
};

struct LtDesc {
    int compute, scale;
    int trans[2] = {0, 0};
};

struct LtPreference {
    unsigned long long workspace = 0;
    // A, B, C, D, as cuBLASLt assumes unless told otherwise.
    unsigned align[4] = {256, 256, 256, 256};
};

// The opaque cublasLtMatmulAlgo_t (eight u64) as this driver fills it: what the algorithm
// was chosen for, which a product using it must match, and what it needs.
struct LtAlgo {
    unsigned long long tag;
    unsigned long long product;  // a digest of the descriptor and layouts
    unsigned align[4];
    unsigned long long workspace;
    unsigned long long unused[3];
};
static_assert(sizeof(LtAlgo) == 64, "cublasLtMatmulAlgo_t is 64 bytes");
const unsigned long long ALGO_TAG = 0x6c74616c676f2121ULL;

struct LtHeuristicResult {
    LtAlgo algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
};

static cublasStatus_t lt_refuse(const char* call, cublasStatus_t code, const std::string& why) {
    fprintf(stderr, "cuda_host cuBLASLt: %s fails (%d): %s\n", call, code, why.c_str());
    return code;
}

// Copies an attribute's value after checking its size, as cuBLASLt does.
static bool set_value(void* into, size_t size, const void* buf, size_t bytes) {
    if (bytes != size || buf == nullptr) return false;
    memcpy(into, buf, size);
    return true;
}
#define attribute(into, buf, bytes) set_value(&(into), sizeof(into), buf, bytes)

// What a SetAttribute call returns: success, or the attribute and size it refused.
static cublasStatus_t attribute_set(const char* call, bool ok, int attr, size_t bytes) {
    if (ok) return CUBLAS_STATUS_SUCCESS;
    return lt_refuse(call, CUBLAS_STATUS_INVALID_VALUE,
                     "attribute " + std::to_string(attr) + " with " + std::to_string(bytes) +
                         " bytes");
}

static unsigned long long digest(const LtDesc& d, const LtLayout* l[3]) {
    unsigned long long h = 1469598103934665603ULL;
    auto mix = [&](unsigned long long v) { h = (h ^ v) * 1099511628211ULL; };
    mix(d.compute), mix(d.scale), mix(d.trans[0]), mix(d.trans[1]);
    for (int i = 0; i < 3; i++)
        mix(l[i]->type), mix(l[i]->rows), mix(l[i]->cols), mix(l[i]->ld), mix(l[i]->batch),
            mix(l[i]->stride);
    return h;
}

// The shape a descriptor and its layouts give, or why they are not one product igpt's driver
// emulates.
struct LtShape {
    long long m, n, k;
    bool fast_bf16;
    bool bf16_result;  // C and D bf16
};
static std::string lt_shape(const LtDesc& d, const LtLayout& a, const LtLayout& b,
                            const LtLayout& c, const LtLayout& dd, LtShape& out) {
    if (d.scale != CUDA_R_32F) return "the scale type must be CUDA_R_32F";
    if (a.type != b.type) return "A and B differ in type";
    if (c.type != dd.type) return "C and D differ in type";
    out.bf16_result = c.type == CUDA_R_16BF;
    if (c.type != CUDA_R_32F && !(out.bf16_result && a.type == CUDA_R_16BF))
        return "C and D must be CUDA_R_32F, or CUDA_R_16BF with bf16 operands";
    if (c.rows != dd.rows || c.cols != dd.cols || c.ld != dd.ld || c.batch != dd.batch ||
        c.stride != dd.stride)
        return "D must be laid out as C";
    if (a.type == CUDA_R_32F && d.compute == CUBLAS_COMPUTE_32F)
        out.fast_bf16 = false;
    else if (a.type == CUDA_R_32F && d.compute == CUBLAS_COMPUTE_32F_FAST_16BF)
        out.fast_bf16 = true;
    else if (a.type == CUDA_R_16BF && d.compute == CUBLAS_COMPUTE_32F)
        out.fast_bf16 = false;
    else
        return "operand type " + std::to_string(a.type) + " with compute type " +
               std::to_string(d.compute) + " is not a combination igpt uses";
    bool ta = d.trans[0] == 1, tb = d.trans[1] == 1;
    long long m = (long long)c.rows, n = (long long)c.cols;
    long long k = ta ? (long long)a.rows : (long long)a.cols;
    if ((long long)(ta ? a.cols : a.rows) != m || (long long)(tb ? b.rows : b.cols) != n ||
        (long long)(tb ? b.cols : b.rows) != k)
        return "the layouts' shapes do not make one product";
    for (const LtLayout* l : {&a, &b, &c})
        if (l->ld < std::max(1LL, (long long)l->rows))
            return "a leading dimension (" + std::to_string(l->ld) +
                   ") is smaller than its matrix's rows (" + std::to_string(l->rows) + ")";
    if (a.batch != c.batch || b.batch != c.batch) return "the layouts' batch counts differ";
    out.m = m, out.n = n, out.k = k;
    return "";
}

static float to_bf16_and_back(float f) {
    return __bfloat162float(__float2bfloat16(f));
}

// Element (row, col) of a column-major operand, op applied: op N reads ptr[row + col * ld],
// op T reads ptr[col + row * ld].
static double element(const void* base, int type, bool transposed, long long ld, long long row,
                      long long col, bool fast_bf16) {
    long long at = transposed ? col + row * ld : row + col * ld;
    if (type == 14) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[at]);
    float v = static_cast<const float*>(base)[at];
    return fast_bf16 ? to_bf16_and_back(v) : v;
}

// Bytes a column-major operand of `rows` x `cols` (as stored) with leading dimension `ld`
// spans, batch included.
static size_t extent(long long rows, long long cols, long long ld, long long stride,
                     int batch, size_t element_bytes) {
    if (rows == 0 || cols == 0 || batch == 0) return 0;
    long long last = (long long)(batch - 1) * stride + (cols - 1) * ld + rows;
    return (size_t)last * element_bytes;
}

// CUDA 13.0's, or CUDA_HOST_CUBLASLT_VERSION's (to test igpt's refusal of an older one).
size_t cublasLtGetVersion() {
    const char* v = getenv("CUDA_HOST_CUBLASLT_VERSION");
    return v ? strtoull(v, nullptr, 10) : 130000;
}

cublasStatus_t cublasLtCreate(void** handle) {
    *handle = new int(0);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(void* handle) {
    delete static_cast<int*>(handle);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutCreate(void** layout, int type, unsigned long long rows,
                                          unsigned long long cols, long long ld) {
    *layout = new LtLayout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(void* layout) {
    delete static_cast<LtLayout*>(layout);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(void* layout, int attr, const void* buf,
                                                size_t bytes) {
    auto* l = static_cast<LtLayout*>(layout);
    bool ok = attr == 5 ? attribute(l->batch, buf, bytes)      // BATCH_COUNT, int32
              : attr == 6 ? attribute(l->stride, buf, bytes)   // STRIDED_BATCH_OFFSET, int64
                          : false;
    return attribute_set("cublasLtMatrixLayoutSetAttribute", ok, attr, bytes);
}

cublasStatus_t cublasLtMatmulDescCreate(void** desc, int compute, int scale) {
    *desc = new LtDesc{compute, scale};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(void* desc) {
    delete static_cast<LtDesc*>(desc);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf,
                                              size_t bytes) {
    auto* d = static_cast<LtDesc*>(desc);
    // TRANSA (3) and TRANSB (4) take a cublasOperation_t, an int32: 0 is N, 1 is T.
    bool ok = (attr == 3 || attr == 4) && attribute(d->trans[attr - 3], buf, bytes) &&
              (d->trans[attr - 3] == 0 || d->trans[attr - 3] == 1);
    return attribute_set("cublasLtMatmulDescSetAttribute", ok, attr, bytes);
}

cublasStatus_t cublasLtMatmulPreferenceCreate(void** pref) {
    *pref = new LtPreference;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(void* pref) {
    delete static_cast<LtPreference*>(pref);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void* pref, int attr, const void* buf,
                                                    size_t bytes) {
    auto* p = static_cast<LtPreference*>(pref);
    bool ok = attr == 1 ? attribute(p->workspace, buf, bytes)  // MAX_WORKSPACE_BYTES, uint64
              : attr >= 5 && attr <= 8
                  ? attribute(p->align[attr - 5], buf, bytes)  // MIN_ALIGNMENT_[ABCD], uint32
                  : false;
    return attribute_set("cublasLtMatmulPreferenceSetAttribute", ok, attr, bytes);
}

// One algorithm, which needs the alignments the preference allows (the least any algorithm
// could ask for: a product on less aligned operands is refused) and up to 1 MiB of workspace.
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c,
                                              void* d, void* pref, int requested,
                                              LtHeuristicResult* results, int* returned) {
    GUARD;
    const char* call = "cublasLtMatmulAlgoGetHeuristic";
    *returned = 0;
    if (requested < 1) return lt_refuse(call, CUBLAS_STATUS_INVALID_VALUE, "no result asked for");
    auto* dd = static_cast<LtDesc*>(desc);
    auto* p = static_cast<LtPreference*>(pref);
    const LtLayout* l[3] = {static_cast<LtLayout*>(a), static_cast<LtLayout*>(b),
                            static_cast<LtLayout*>(c)};
    LtShape shape;
    std::string why = lt_shape(*dd, *l[0], *l[1], *l[2], *static_cast<LtLayout*>(d), shape);
    if (!why.empty()) return lt_refuse(call, CUBLAS_STATUS_NOT_SUPPORTED, why);
    for (unsigned al : p->align)
        if (al == 0 || (al & (al - 1)) != 0 || al > 256)
            return lt_refuse(call, CUBLAS_STATUS_INVALID_VALUE, "an alignment of " +
                                                                   std::to_string(al));
    if (const char* log = getenv("CUDA_HOST_HEURISTICS_LOG")) {
        if (FILE* f = fopen(log, "a")) {
            fprintf(f, "m %lld n %lld k %lld trans %d %d type %d compute %d out %d batch %d "
                       "lds %lld %lld %lld strides %lld %lld %lld align %u %u %u %u\n",
                    shape.m, shape.n, shape.k, dd->trans[0], dd->trans[1], l[0]->type,
                    dd->compute, l[2]->type, l[2]->batch, l[0]->ld, l[1]->ld, l[2]->ld,
                    l[0]->stride, l[1]->stride, l[2]->stride, p->align[0], p->align[1], p->align[2],
                    p->align[3]);
            fclose(f);
        }
    }
    LtHeuristicResult r{};
    r.algo.tag = ALGO_TAG;
    r.algo.product = digest(*dd, l);
    memcpy(r.algo.align, p->align, sizeof r.algo.align);
    r.algo.workspace = std::min<unsigned long long>(p->workspace, 1 << 20);
    r.workspaceSize = r.algo.workspace;
    r.state = CUBLAS_STATUS_SUCCESS;
    r.wavesCount = 1.0f;
    results[0] = r;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(void*, void* desc, const void* alpha, const void* A, void* a_desc,
                              const void* B, void* b_desc, const void* beta, const void* C,
                              void* c_desc, void* D, void* d_desc, const LtAlgo* algo,
                              void* workspace, size_t workspace_bytes, CUstream s) {
    GUARD;
    const char* call = "cublasLtMatmul";
    auto* dd = static_cast<LtDesc*>(desc);
    const LtLayout* l[3] = {static_cast<LtLayout*>(a_desc), static_cast<LtLayout*>(b_desc),
                            static_cast<LtLayout*>(c_desc)};
    LtShape shape;
    std::string why =
        lt_shape(*dd, *l[0], *l[1], *l[2], *static_cast<LtLayout*>(d_desc), shape);
    if (!why.empty()) return lt_refuse(call, CUBLAS_STATUS_NOT_SUPPORTED, why);
    // igpt's own rule, stricter than cuBLASLt (which would run its heuristic here): every
    // product passes the algorithm chosen for exactly its descriptor and layouts.
    if (algo == nullptr || algo->tag != ALGO_TAG)
        return lt_refuse(call, CUBLAS_STATUS_INVALID_VALUE,
                         "no algorithm from cublasLtMatmulAlgoGetHeuristic");
    if (algo->product != digest(*dd, l))
        return lt_refuse(call, CUBLAS_STATUS_INVALID_VALUE,
                         "the algorithm was chosen for another product");
    // Conservatively, an algorithm's alignment holds for every column's and batch matrix's
    // start, not only the operand's.
    const void* pointers[4] = {A, B, C, D};
    const LtLayout* of[4] = {l[0], l[1], l[2], l[2]};
    const char* names = "ABCD";
    for (int i = 0; i < 4; i++) {
        size_t element = of[i]->type == CUDA_R_16BF ? 2 : 4;
        uintptr_t starts = (uintptr_t)pointers[i] | (uintptr_t)(of[i]->ld * element) |
                           (of[i]->batch > 1 ? (uintptr_t)(of[i]->stride * element) : 0);
        if (starts % algo->align[i] != 0)
            return lt_refuse(call, CUBLAS_STATUS_NOT_SUPPORTED,
                             std::string("operand ") + names[i] + " at " +
                                 hex((uintptr_t)pointers[i]) + " (leading dimension " +
                                 std::to_string(of[i]->ld) + ", batch stride " +
                                 std::to_string(of[i]->stride) + ") is not aligned to the " +
                                 std::to_string(algo->align[i]) +
                                 " bytes its algorithm was chosen for");
    }
    if (workspace_bytes < algo->workspace)
        return lt_refuse(call, CUBLAS_STATUS_INVALID_VALUE,
                         "the algorithm needs " + std::to_string(algo->workspace) +
                             " bytes of workspace, given " + std::to_string(workspace_bytes));
    if (workspace_bytes && !in_allocation((uintptr_t)workspace, workspace_bytes))
        return lt_refuse(call, CUBLAS_STATUS_EXECUTION_FAILED,
                         "the workspace is not device memory");
    long long m = shape.m, n = shape.n, k = shape.k;
    bool ta = dd->trans[0] == 1, tb = dd->trans[1] == 1, fast_bf16 = shape.fast_bf16;
    bool bf16_result = shape.bf16_result;
    int result_type = l[2]->type;
    int type = l[0]->type, batch = l[2]->batch;
    long long lda = l[0]->ld, ldb = l[1]->ld, ldc = l[2]->ld;
    long long stride_a = l[0]->stride, stride_b = l[1]->stride, stride_c = l[2]->stride;
    size_t esize = type == CUDA_R_16BF ? 2 : 4, rsize = bf16_result ? 2 : 4;
    struct {
        const void* p;
        size_t bytes;
        const char* name;
    } operands[] = {
        {A, extent(l[0]->rows, l[0]->cols, lda, stride_a, batch, esize), "A"},
        {B, extent(l[1]->rows, l[1]->cols, ldb, stride_b, batch, esize), "B"},
        {C, extent(m, n, ldc, stride_c, batch, rsize), "C"},
        {D, C == D ? 0 : extent(m, n, ldc, stride_c, batch, rsize), "D"},
    };
    // D is C (a product in place) or apart from it: cuBLASLt does not define a partial overlap.
    size_t c_bytes = operands[2].bytes;
    if (C != D && c_bytes && (uintptr_t)D < (uintptr_t)C + c_bytes &&
        (uintptr_t)C < (uintptr_t)D + c_bytes)
        return lt_refuse(call, CUBLAS_STATUS_INVALID_VALUE,
                         "C and D overlap without being the same matrix");
    for (auto& o : operands)
        if (o.bytes && !in_allocation((uintptr_t)o.p, o.bytes))
            return lt_refuse(call, CUBLAS_STATUS_EXECUTION_FAILED,
                             std::string("operand ") + o.name + ": " +
                                 std::to_string(o.bytes) + " bytes at " +
                                 hex((uintptr_t)o.p) + " are not all device memory");
    // Host pointer mode: the scalars are read when the call is made, recorded or not.
    float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    Job job;
    for (auto& o : operands)
        if (o.bytes) job.uses.push_back({(uintptr_t)o.p, o.bytes});
    if (workspace_bytes) job.uses.push_back({(uintptr_t)workspace, workspace_bytes});
    job.run = [=] {
        // Each operand decoded once into doubles, rows of A and columns of B contiguous, so the
        // sums below read memory in order; the same values and the same order of additions as
        // decoding element by element. (m + n) k doubles: fine at the sizes tests run, some
        // hundreds of MB for a weight's gradient at iGPT-S's batch.
        std::vector<double> a_rows((size_t)m * k), b_cols((size_t)n * k);
        for (int b = 0; b < batch; b++) {
            const char* a = static_cast<const char*>(A) + (size_t)b * stride_a * esize;
            const char* bb = static_cast<const char*>(B) + (size_t)b * stride_b * esize;
            const char* c = static_cast<const char*>(C) + (size_t)b * stride_c * rsize;
            char* d = static_cast<char*>(D) + (size_t)b * stride_c * rsize;
            for (long long i = 0; i < m; i++)
                for (long long x = 0; x < k; x++)
                    a_rows[i * k + x] = element(a, type, ta, lda, i, x, fast_bf16);
            for (long long j = 0; j < n; j++)
                for (long long x = 0; x < k; x++)
                    b_cols[j * k + x] = element(bb, type, tb, ldb, x, j, fast_bf16);
            // Columns j = first, first + step, ...: each output is one thread's, so the bits
            // do not depend on how many threads share the columns.
            auto columns = [&](long long first, long long step) {
                for (long long j = first; j < n; j += step)
                    for (long long i = 0; i < m; i++) {
                        const double* ar = &a_rows[i * k];
                        const double* bc = &b_cols[j * k];
                        double sum = 0.0;
                        for (long long x = 0; x < k; x++) sum += ar[x] * bc[x];
                        // beta = 0: C is never read (it may hold NaN).
                        long long at = i + j * ldc;
                        float added = be == 0.0f ? 0.0f
                                                 : be * (float)element(c, result_type, false,
                                                                       ldc, i, j, false);
                        float r = be == 0.0f ? (float)(al * sum) : (float)(al * sum + added);
                        // A bf16 result is the f32 one rounded to nearest even.
                        if (bf16_result)
                            reinterpret_cast<__nv_bfloat16*>(d)[at] = __float2bfloat16(r);
                        else
                            reinterpret_cast<float*>(d)[at] = r;
                    }
            };
            // A second thread for large products only: starting one costs more than a small
            // product.
            if ((double)m * n * k >= 1e6) {
                std::thread other(columns, 1, 2);
                columns(0, 2);
                other.join();
            } else {
                columns(0, 1);
            }
        }
    };
    log_launch(call, "m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                         std::to_string(k));
    issue(stream_of(s), std::move(job), call);
    return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
