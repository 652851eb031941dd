// Runs igpt's CUDA kernels (src/backend/cuda/kernels.cu) on the host, unchanged:
//
//   g++ -std=c++17 -fno-extern-tls-init -x c++ -include tests/cuda_host/shim.h \
//       src/backend/cuda/kernels.cu
//
// -fno-extern-tls-init is needed to run, not to compile: for a block-scope `extern
// thread_local` inside a function template (attend<E>'s `extern __shared__`), GCC 12 calls
// a TLS initialisation function that is never defined, a jump to address 0. The flag tells
// it extern thread_locals need no dynamic initialisation, which holds here.
//
// Design. Every CUDA thread of a block is a fiber (its own stack, switched by
// cuda_host_switch on x86-64, by ucontext elsewhere) and a block's fibers all run on
// one OS thread, switching only at __syncthreads() and warp shuffles. That makes `__shared__`
// simple and exact: it expands to `thread_local`, so a kernel's shared array is one variable
// for all the threads of the block running on that OS thread, and `extern __shared__ float
// dynamic[]` becomes a block-scope `extern thread_local` declaration of the per-OS-thread
// buffer defined below, so kernels.cu compiles without edits. Blocks are shared out between a
// few OS threads, so atomicAdd really races.
//
// Blocks start in ascending order of their index, or (set_reverse_order) descending, so a
// result that depends on the order blocks add into memory shows. Within a block, fibers run
// until their next barrier, the first ready one in a fixed order, ascending or (reversed)
// descending thread index: the leading threads run ahead as far as the
// barriers let them. Running a kernel both ways catches a missing barrier whichever thread
// reads before the other writes, and a warp that overwrites shared memory another warp has
// yet to read. A barrier that not every thread of its group reaches
// (undefined on a GPU) is reported and aborts instead of hanging.
//
// The end of this file stands in for the CUDA types kernels.cu uses (float4, uint4) and
// emulates its inline PTX. Asynchronous copies (cp.async) are kept per thread in their commit
// groups and land, as set_late_async_copies says, when issued or only at the wait that covers
// them; a block that ends with a copy no wait covered is reported. The tensor-core
// instructions ldmatrix and mma.sync: each is
// warp-wide (all 32 lanes must reach it, else the deadlock report), each lane hands in its
// own registers and takes back its own, with the fragment layouts of the PTX ISA. ldmatrix
// checks that every row address is 16-byte aligned and inside the launch's dynamic shared
// memory, and no lane goes on before the warp has read; a shared tile another warp writes
// meanwhile shows as a different result in the other scheduling order.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// A register limit for nvcc; nothing to the host.
#define __launch_bounds__(...)
#define __shared__ thread_local

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x = 1, unsigned int y = 1, unsigned int z = 1) : x(x), y(y), z(z) {}
};

// The built-in indices. Each OS thread runs one block at a time; the scheduler sets
// threadIdx before resuming a fiber.
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

// The dynamic shared memory of the block running on this OS thread: the most a launch may
// have on compute capability 9.0, 227 KiB, which a kernel must opt into above 48 KiB (the host
// driver enforces that; a test calling a kernel directly states its bytes). kernels.cu names
// its array `dynamic`; another name would fail to link, loudly.
constexpr size_t kMaxDynamicShared = 227 * 1024;
alignas(128) inline thread_local float dynamic[kMaxDynamicShared / sizeof(float)];

// ---------------------------------------------------------------------------------------
// Device math: the CUDA names the host library lacks.

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// One IEEE rounding each, never fused (the host build has no FMA to fuse them into).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, sizeof u);
    return u;
}

inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// A compare-and-swap loop, as a GPU without native float atomics does it.
template <typename T>
inline T atomicAdd(T* address, T value) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomicAdd: 4- or 8-byte types only");
    T old;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    T want = old + value;
    while (!__atomic_compare_exchange(address, &old, &want, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_RELAXED))
        want = old + value;
    return old;
}

// ---------------------------------------------------------------------------------------
// The fiber scheduler of one block.

namespace cuda_host {

constexpr size_t kStackBytes = 64 * 1024;
// 32-bit values a lane hands in to an emulated warp-wide instruction, at most.
constexpr int kExchangeWords = 8;

#if defined(__x86_64__)
// A switch that saves only what a call preserves (rbx, rbp, r12-r15, the stack pointer, the
// SSE and x87 control words) on the stack it leaves, and loads the same from the stack it
// goes to. swapcontext also saves the signal mask with a system call at every switch, which
// made switching most of the emulator's time. Hidden symbols: each program or library that
// includes this header has its own copy.
extern "C" void cuda_host_switch(void** save_sp, void* load_sp);
extern "C" void cuda_host_fiber_start();
asm(R"(
    .text
    .globl cuda_host_switch
    .hidden cuda_host_switch
    .type cuda_host_switch, @function
cuda_host_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_host_switch, .-cuda_host_switch

    .globl cuda_host_fiber_start
    .hidden cuda_host_fiber_start
    .type cuda_host_fiber_start, @function
cuda_host_fiber_start:
    callq *%r12
    ud2
    .size cuda_host_fiber_start, .-cuda_host_fiber_start
)");
#endif

struct Fiber {
#if defined(__x86_64__)
    void* sp;  // saved stack pointer (see cuda_host_switch)
#else
    ucontext_t ctx;
#endif
    std::unique_ptr<char[]> stack;
    uint3 idx;
    enum { Ready, Waiting, Done } state;
    int waiting_on;      // -1: the block barrier; w >= 0: warp w's barrier
    unsigned shuffles;   // shuffles done, picks the slot buffer (see shfl_xor)
};

struct Block {
    // Fibers (with their stacks) are kept between launches; the first `threads` run this one.
    std::vector<Fiber> fibers;
    unsigned threads = 0;
    // No fiber before this place in scheduling order is ready (a barrier's release resets it),
    // so the scheduler's search starts here: a pass over the block costs O(threads).
    unsigned scan_from = 0;
    // This launch's scheduling order: threads in descending order (see set_reverse_order).
    bool reverse = false;
#if defined(__x86_64__)
    void* scheduler_sp;
#else
    ucontext_t scheduler;
#endif
    int current = -1;
    unsigned arrived_block = 0;
    std::vector<unsigned> arrived_warp;
    // Two buffers of per-thread slots for shuffles, used alternately: a lane cannot write a
    // buffer again before every lane of its warp passed the barrier of the shuffle between,
    // so one barrier per shuffle suffices.
    std::vector<uint64_t> slots[2];
    // Wider slots for the emulated tensor-core instructions (see exchange), used in turn
    // with the shuffle slots.
    std::vector<uint32_t> words[2];
    // Each thread's asynchronous copies (cp.async): those not yet committed, then its
    // committed groups, oldest first. A copy's source is read when it is issued.
    struct AsyncCopy {
        void* dst;
        unsigned char bytes[16];
    };
    std::vector<std::vector<AsyncCopy>> async_open;
    std::vector<std::deque<std::vector<AsyncCopy>>> async_groups;
    // The launch's dynamic shared memory, the start of `dynamic`.
    size_t shared_bytes = 0;
    const std::function<void()>* body = nullptr;
};

inline thread_local Block* current_block = nullptr;
inline std::atomic<bool> reverse_order{false};

inline void set_reverse_order(bool reverse) { reverse_order = reverse; }

// Whether asynchronous copies land as late as they may (at the wait that covers them) or as
// early (when issued): a kernel that reads a tile before waiting for it shows in the first
// way, one that copies into a tile another warp still reads in the second.
inline std::atomic<bool> late_async_copies{false};

inline void set_late_async_copies(bool late) { late_async_copies = late; }

[[noreturn]] inline void fail(const char* what) {
    fprintf(stderr, "cuda_host: block (%u, %u), thread %u: %s\n", blockIdx.x, blockIdx.y,
            threadIdx.x, what);
    abort();
}

// Leaves fiber `me` for the scheduler of its block.
inline void to_scheduler(Block& b, Fiber& me) {
#if defined(__x86_64__)
    cuda_host_switch(&me.sp, b.scheduler_sp);
#else
    swapcontext(&me.ctx, &b.scheduler);
#endif
}

inline unsigned warp_size_of(const Block& b, unsigned warp) {
    return std::min(32u, b.threads - warp * 32);
}

// Waits at the block barrier (group -1) or warp `group`'s barrier. The last thread to arrive
// releases the others and carries on; the others return to the scheduler.
inline void barrier(int group) {
    Block& b = *current_block;
    Fiber& me = b.fibers[b.current];
    unsigned& arrived = group < 0 ? b.arrived_block : b.arrived_warp[group];
    unsigned size = group < 0 ? b.threads : warp_size_of(b, group);
    if (++arrived == size) {
        arrived = 0;
        // Only the group's own fibers can wait on its barrier: a warp's release scans 32.
        unsigned first = group < 0 ? 0 : group * 32, end = first + size;
        for (unsigned i = first; i < end; i++) {
            Fiber& f = b.fibers[i];
            if (f.state == Fiber::Waiting && f.waiting_on == group) f.state = Fiber::Ready;
        }
        // The earliest released fiber in scheduling order (see run_block's scan).
        unsigned earliest = b.reverse ? b.threads - end : first;
        b.scan_from = std::min(b.scan_from, earliest);
        return;
    }
    me.state = Fiber::Waiting;
    me.waiting_on = group;
    to_scheduler(b, me);
}

// A fiber's life: the kernel's body, then back to the scheduler for good.
inline void fiber_entry() {
    Block& b = *current_block;
    (*b.body)();
    Fiber& me = b.fibers[b.current];
    me.state = Fiber::Done;
#if defined(__x86_64__)
    to_scheduler(b, me);
    __builtin_unreachable();
#endif
    // (ucontext: uc_link returns to the scheduler.)
}

// Makes `f` start at fiber_entry when next resumed.
inline void prepare(Block& b, Fiber& f) {
#if defined(__x86_64__)
    // The frame cuda_host_switch pops: control words, r15, r14, r13, r12 (fiber_entry, which
    // cuda_host_fiber_start calls), rbx, rbp, return address; the stack 16-byte aligned
    // after the return, as at a call.
    uintptr_t top = ((uintptr_t)(f.stack.get() + kStackBytes) & ~(uintptr_t)15) - 16;
    uint64_t* frame = (uint64_t*)(top - 64);
    uint32_t control[2] = {_mm_getcsr(), 0x037f};
    memcpy(&frame[0], control, 8);
    frame[1] = frame[2] = frame[3] = frame[5] = frame[6] = 0;
    frame[4] = (uint64_t)(void (*)())fiber_entry;
    frame[7] = (uint64_t)cuda_host_fiber_start;
    f.sp = frame;
    (void)b;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
}

// Runs fiber `f` until it waits or ends.
inline void resume(Block& b, Fiber& f) {
#if defined(__x86_64__)
    cuda_host_switch(&b.scheduler_sp, f.sp);
#else
    swapcontext(&b.scheduler, &f.ctx);
#endif
}

// Runs block `block_idx` of a launch: one fiber per thread until all are done.
inline void run_block(Block& b, const std::function<void()>& body, uint3 block_idx, dim3 block,
                      dim3 grid, size_t shared_bytes) {
    unsigned n = block.x * block.y * block.z;
    current_block = &b;
    b.body = &body;
    blockIdx = block_idx;
    blockDim = block;
    gridDim = grid;
    // Poison the dynamic shared memory, so reading what no thread wrote, or beyond what the
    // launch asked for, shows as NaN: the launch's bytes and 48 KiB past them (not all 227
    // KiB, which would cost every block of every kernel).
    b.shared_bytes = shared_bytes;
    const size_t launched = (shared_bytes + sizeof(float) - 1) / sizeof(float);
    const size_t kFloats =
        std::min(kMaxDynamicShared / sizeof(float), launched + 48 * 1024 / sizeof(float));
    std::fill(dynamic, dynamic + kFloats, NAN);
    if (b.fibers.size() < n) {
        size_t had = b.fibers.size();
        b.fibers.resize(n);
        for (size_t i = had; i < n; i++) b.fibers[i].stack.reset(new char[kStackBytes]);
    }
    b.threads = n;
    unsigned warps = (n + 31) / 32;
    b.arrived_block = 0;
    b.arrived_warp.assign(warps, 0);
    b.words[0].assign((size_t)n * kExchangeWords, 0);
    b.words[1].assign((size_t)n * kExchangeWords, 0);
    b.slots[0].assign(n, 0);
    b.slots[1].assign(n, 0);
    b.async_open.assign(n, {});
    b.async_groups.assign(n, {});
    for (unsigned i = 0; i < n; i++) {
        Fiber& f = b.fibers[i];
        f.idx = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
        f.state = Fiber::Ready;
        f.shuffles = 0;
        prepare(b, f);
    }
    // Greedy: always resume the first ready thread in scheduling order, so the leading
    // threads (and their warp) run as far ahead of the others as the barriers allow.
    const bool reverse = b.reverse = reverse_order;
    b.scan_from = 0;
    for (;;) {
        int next = -1;
        for (unsigned k = b.scan_from; k < n; k++) {
            unsigned i = reverse ? n - 1 - k : k;
            if (b.fibers[i].state == Fiber::Ready) {
                next = i;
                b.scan_from = k;
                break;
            }
        }
        if (next < 0) {
            bool live = false;
            for (unsigned i = 0; i < n; i++) live = live || b.fibers[i].state != Fiber::Done;
            if (!live) break;
            for (unsigned i = 0; i < n; i++)
                if (b.fibers[i].state == Fiber::Waiting) threadIdx = b.fibers[i].idx;
            fail("deadlock: a __syncthreads() or warp shuffle that not every thread of its "
                 "block or warp reaches");
        }
        b.current = next;
        threadIdx = b.fibers[next].idx;
        resume(b, b.fibers[next]);
    }
    for (unsigned i = 0; i < n; i++)
        if (!b.async_open[i].empty() || !b.async_groups[i].empty()) {
            threadIdx = b.fibers[i].idx;
            fail("an asynchronous copy that no wait covers");
        }
    for (size_t i = launched; i < kFloats; i++)
        if (!std::isnan(dynamic[i]))
            fail("wrote dynamic shared memory beyond the launch's shared_mem_bytes");
    current_block = nullptr;
}

// Lane `src_lane`'s value, as __shfl_sync (every lane of the full warp takes part), through
// the fixed-size shuffle slots.
template <typename T>
inline T shfl(unsigned mask, T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    Block& b = *current_block;
    Fiber& me = b.fibers[b.current];
    unsigned tid = b.current, warp = tid / 32;
    if (mask != 0xffffffffu || warp_size_of(b, warp) != 32)
        fail("shuffle with a partial mask or a partial warp (not emulated)");
    std::vector<uint64_t>& slot = b.slots[me.shuffles++ & 1];
    memcpy(&slot[tid], &v, sizeof v);
    barrier(warp);
    T out;
    memcpy(&out, &slot[warp * 32 + (src_lane & 31)], sizeof out);
    return out;
}

// The value of lane (this lane ^ lane_mask), as __shfl_xor_sync.
template <typename T>
inline T shfl_xor(unsigned mask, T v, int lane_mask) {
    unsigned lane = current_block->current % 32;
    return shfl(mask, v, (int)(lane ^ (lane_mask & 31)));
}

// The warp's predicates as a bit mask (lane i: bit i), through the shuffle slots.
inline unsigned ballot(unsigned mask, bool predicate) {
    Block& b = *current_block;
    Fiber& me = b.fibers[b.current];
    unsigned tid = b.current, warp = tid / 32;
    if (mask != 0xffffffffu || warp_size_of(b, warp) != 32)
        fail("ballot with a partial mask or a partial warp (not emulated)");
    std::vector<uint64_t>& slot = b.slots[me.shuffles++ & 1];
    slot[tid] = predicate;
    barrier(warp);
    unsigned bits = 0;
    for (unsigned i = 0; i < 32; i++) bits |= (slot[warp * 32 + i] != 0 ? 1u : 0u) << i;
    return bits;
}

// Blocks with their fibers' stacks, kept for the next launch: allocating (and first touching)
// a stack per thread at every launch would cost more than most kernels.
inline std::mutex block_pool_lock;
inline std::vector<std::unique_ptr<Block>> block_pool;

inline std::unique_ptr<Block> take_block() {
    std::lock_guard<std::mutex> guard(block_pool_lock);
    if (block_pool.empty()) return std::make_unique<Block>();
    std::unique_ptr<Block> b = std::move(block_pool.back());
    block_pool.pop_back();
    return b;
}

inline void give_block(std::unique_ptr<Block> b) {
    std::lock_guard<std::mutex> guard(block_pool_lock);
    block_pool.push_back(std::move(b));
}

// Runs `kernel(args...)` over `grid` blocks of `block` threads with `shared_bytes` of dynamic
// shared memory. Blocks are shared out between a few OS threads, one block at a time each.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            Args... args) {
    if (shared_bytes > kMaxDynamicShared) {
        fprintf(stderr, "cuda_host: %zu bytes of dynamic shared memory exceed 227 KiB\n",
                shared_bytes);
        abort();
    }
    if (block.x * block.y * block.z > 1024 || block.x * block.y * block.z == 0) {
        fprintf(stderr, "cuda_host: a block of %u threads is not launchable\n",
                block.x * block.y * block.z);
        abort();
    }
    std::function<void()> body = [&] { kernel(static_cast<Params>(args)...); };
    size_t blocks = (size_t)grid.x * grid.y * grid.z;
    std::atomic<size_t> next{0};
    auto worker = [&] {
        std::unique_ptr<Block> b = take_block();
        for (size_t k; (k = next++) < blocks;) {
            size_t i = reverse_order ? blocks - 1 - k : k;
            uint3 idx = {unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                         unsigned(i / ((size_t)grid.x * grid.y))};
            run_block(*b, body, idx, block, grid, shared_bytes);
        }
        give_block(std::move(b));
    };
    unsigned n_threads = std::max(1u, std::min(2u, std::thread::hardware_concurrency()));
    std::vector<std::thread> threads;
    for (unsigned t = 1; t < n_threads; t++) threads.emplace_back(worker);
    worker();
    for (auto& t : threads) t.join();
}

}  // namespace cuda_host

inline void __syncthreads() { cuda_host::barrier(-1); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return cuda_host::shfl_xor(mask, v, lane_mask);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
    return cuda_host::shfl(mask, v, src_lane);
}

// Leading zero bits of a 32-bit value (32 for 0).
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return cuda_host::ballot(mask, predicate != 0);
}

// The position of the lowest set bit, from 1; 0 for none.
inline int __ffs(int x) { return __builtin_ffs(x); }

// __syncwarp: the warp's barrier (full warps only).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    cuda_host::Block& b = *cuda_host::current_block;
    unsigned warp = b.current / 32;
    if (mask != 0xffffffffu || cuda_host::warp_size_of(b, warp) != 32)
        cuda_host::fail("__syncwarp with a partial mask or a partial warp (not emulated)");
    cuda_host::barrier(warp);
}

// ---------------------------------------------------------------------------------------
// Vector types (vector_types.h), bfloat16 (cuda_bf16.h, for the test driver), and the
// tensor-core instructions kernels.cu writes in inline PTX under nvcc: ldmatrix and
// mma.sync m16n8k16 with bf16 operands and f32 accumulators.

// float4 and uint4: four values read or written at once, 16-byte aligned.
struct alignas(16) float4 {
    float x, y, z, w;
};

inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return {x, y, z, w};
}

struct __nv_bfloat16 {
    unsigned short bits;
};

// Round to nearest even; a NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(unsigned short)(u >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
    return __uint_as_float((unsigned int)h.bits << 16);
}

// The instructions are emulated lane by lane, with the fragment layouts of the PTX ISA
// (groupID g = lane / 4, tig = lane % 4): every lane hands in its own registers, the warp
// meets, and each lane takes back only what the instruction gives it. A kernel that puts a
// value in the wrong lane or register computes wrong results here as it would on a GPU.
namespace cuda_host {

// The warp of the calling thread, which must be a full one.
inline unsigned full_warp(const char* what) {
    Block& b = *current_block;
    unsigned warp = b.current / 32;
    if (warp_size_of(b, warp) != 32) fail(what);
    return warp;
}

// Every lane of the calling (full) warp hands in `words` 32-bit values; returns the warp's
// values, lane by lane (lane i's at [i * kExchangeWords]), valid until the warp's next
// exchange but one. The slots alternate as the shuffle slots do (see Block::slots).
inline const uint32_t* exchange(const uint32_t* mine, int words, const char* what) {
    Block& b = *current_block;
    Fiber& me = b.fibers[b.current];
    unsigned tid = b.current, warp = full_warp(what);
    std::vector<uint32_t>& slot = b.words[me.shuffles++ & 1];
    memcpy(&slot[tid * kExchangeWords], mine, words * sizeof(uint32_t));
    barrier(warp);
    return &slot[warp * 32 * kExchangeWords];
}

inline unsigned lane_id() { return current_block->current % 32; }

inline float bf16_half(uint32_t word, int high) {
    return __uint_as_float((high ? word >> 16 : word & 0xffffu) << 16);
}

// ldmatrix .m8n8 .x4 .b16, plain or transposed: lanes 8i .. 8i + 7 address the rows of
// matrix i. Loads complete for the whole warp before any lane goes on.
inline void ldmatrix(uint32_t (&r)[4], const unsigned short* row, bool transposed) {
    uint32_t mine[2];
    memcpy(mine, &row, sizeof row);
    const uint32_t* all = exchange(mine, 2, "ldmatrix outside a full warp");
    const char* shared = (const char*)dynamic;
    if ((uintptr_t)row % 16 != 0) fail("ldmatrix: a row address not 16-byte aligned");
    if ((const char*)row < shared || (const char*)row + 16 > shared + current_block->shared_bytes)
        fail("ldmatrix: a row address outside the launch's shared memory");
    auto row_of = [&](unsigned lane) {
        const unsigned short* p;
        memcpy(&p, &all[lane * kExchangeWords], sizeof p);
        return p;
    };
    const unsigned lane = lane_id(), g = lane / 4, tig = lane % 4;
    for (unsigned i = 0; i < 4; i++) {
        unsigned short lo, hi;
        if (!transposed) {
            const unsigned short* p = row_of(8 * i + g);  // row g of matrix i
            lo = p[2 * tig];
            hi = p[2 * tig + 1];
        } else {  // column g of matrix i, rows 2 tig and 2 tig + 1
            lo = row_of(8 * i + 2 * tig)[g];
            hi = row_of(8 * i + 2 * tig + 1)[g];
        }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    barrier(current_block->current / 32);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with d as c: d += a b, the exact bf16
// products summed in f32 in order of k (the tensor cores' order of additions is their own:
// the tests allow for it).
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const uint32_t* all = exchange(mine, 6, "mma.sync outside a full warp");
    // A (row, k) is in lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8);
    // B (k, n) in lane n * 4 + (k % 8) / 2, register k / 8.
    auto a_at = [&](int row, int k) {
        unsigned lane = (row % 8) * 4 + (k % 8) / 2;
        return bf16_half(all[lane * kExchangeWords + row / 8 + 2 * (k / 8)], k % 2);
    };
    auto b_at = [&](int k, int n) {
        unsigned lane = n * 4 + (k % 8) / 2;
        return bf16_half(all[lane * kExchangeWords + 4 + k / 8], k % 2);
    };
    const int lane = lane_id(), g = lane / 4, tig = lane % 4;
    float out[4];
    for (int e = 0; e < 4; e++) {
        const int row = g + 8 * (e / 2), n = 2 * tig + e % 2;
        float acc = d[e];
        for (int k = 0; k < 16; k++) acc += a_at(row, k) * b_at(k, n);
        out[e] = acc;
    }
    memcpy(d, out, sizeof out);
}

// cp.async.cg.shared.global, 16 bytes: lands when issued or at the wait that covers it (see
// late_async_copies).
inline void copy_async_16(void* dst, const void* src) {
    Block& b = *current_block;
    const char* shared = (const char*)dynamic;
    if ((uintptr_t)dst % 16 != 0 || (uintptr_t)src % 16 != 0)
        fail("cp.async: an address not 16-byte aligned");
    if ((const char*)dst < shared || (const char*)dst + 16 > shared + b.shared_bytes)
        fail("cp.async: a destination outside the launch's shared memory");
    Block::AsyncCopy c{dst, {}};
    memcpy(c.bytes, src, 16);
    if (!late_async_copies) memcpy(dst, c.bytes, 16);
    b.async_open[b.current].push_back(c);
}

// cp.async.commit_group: this thread's copies since the last commit become a group.
inline void copy_async_commit() {
    Block& b = *current_block;
    b.async_groups[b.current].push_back(std::move(b.async_open[b.current]));
    b.async_open[b.current].clear();
}

// cp.async.wait_group: all but this thread's latest `pending` groups have landed.
inline void copy_async_wait(int pending) {
    Block& b = *current_block;
    auto& groups = b.async_groups[b.current];
    while (groups.size() > (size_t)pending) {
        if (late_async_copies)
            for (const Block::AsyncCopy& c : groups.front()) memcpy(c.dst, c.bytes, 16);
        groups.pop_front();
    }
}

}  // namespace cuda_host

inline void copy_async_16(void* dst, const void* src) { cuda_host::copy_async_16(dst, src); }
inline void copy_async_commit() { cuda_host::copy_async_commit(); }
template <int kPending>
inline void copy_async_wait() {
    cuda_host::copy_async_wait(kPending);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const unsigned short* row) {
    cuda_host::ldmatrix(r, row, false);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const unsigned short* row) {
    cuda_host::ldmatrix(r, row, true);
}

inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuda_host::mma_bf16(d, a, b0, b1);
}
