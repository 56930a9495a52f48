// cuda_emulator.h: the CUDA features of kernels/topk_moe/cuda/*.cu, for the host C++ compiler.
//
// Force-included (g++ -include) into each .cu file after rewrite.py's mechanical,
// line-preserving rewrites (asm statements -> calls of the ptx_* functions below,
// __shared__ declarations -> references into the block's shared arena, a launch
// entry appended per extern "C" __global__ kernel). Execution model:
//   - blocks run one after another, in blockIdx order;
//   - the threads of a block are cooperative fibers (own stacks, switched by hand
//     on x86-64, ucontext elsewhere) that run until they reach a barrier or a
//     warp collective, so memory written between two barriers is seen in an order
//     the schedule picks (ascending, descending, shuffled or warp by warp);
//   - __shared__ memory is one arena per launch, poisoned (0xff bytes: NaN for
//     floats, -1 for integers) before every block;
//   - a fault (barrier reached by part of a block, a collective whose mask names a
//     lane that did not arrive, misaligned vector access, unknown shared address,
//     an out-of-bounds local array index) stops the launch with a message that
//     names the kernel, block, thread and source line.
// Semantics of the PTX instructions come from the PTX ISA's fragment tables; the
// emulator's tests (tests/test_emulator.py) write those tables out lane by lane.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <xmmintrin.h>
#else
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------
// Qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ---------------------------------------------------------------------------
// Vector types (the alignment CUDA gives them; -fsanitize=alignment checks every use)

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
struct __half;  // defined with the rest of cuda_fp16.h below

namespace emu {

// ---------------------------------------------------------------------------
// Float16: bit-exact conversions (round to nearest even), no FTZ on conversions,
// as PTX cvt.rn.f16.f32 and cvt.f32.f16 without .ftz.

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN (payload kept)
    if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
    if (mantissa == 0) return bits_float(sign);
    int shift = 0;  // subnormal half: normalise (every subnormal half is a normal float)
    while (!(mantissa & 0x400u)) { mantissa <<= 1; ++shift; }
    return bits_float(sign | ((uint32_t)(113 - shift) << 23) | ((mantissa & 0x3ffu) << 13));
}

inline uint16_t float_to_half_rn(float f) {
    const uint32_t u = float_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t magnitude = u & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));  // NaN stays NaN
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds past 65504: infinity
    if (magnitude < 0x33000000u) return sign;                          // below half the smallest subnormal: 0
    const int exponent = (int)(magnitude >> 23) - 127;
    uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;           // 24 significant bits
    int drop;                                                           // bits below the half's last place
    uint32_t base;
    if (exponent < -14) { drop = 13 + (-14 - exponent); base = 0; }    // subnormal half
    else { drop = 13; base = (uint32_t)(exponent + 15) << 10; mantissa &= 0x7fffffu; }
    uint32_t kept = mantissa >> drop;
    const uint32_t rest = mantissa & ((1u << drop) - 1u);
    const uint32_t halfway = 1u << (drop - 1);
    if (rest > halfway || (rest == halfway && (kept & 1u))) kept += 1;  // a carry moves into the exponent
    return (uint16_t)(sign | (base + kept));
}

// ---------------------------------------------------------------------------
// Faults

struct Fault {
    bool raised = false;
    std::string message;
};
inline Fault fault;
[[noreturn]] void fail(const std::string& what);
void raise_fault(const std::string& what);
std::string where();

// ---------------------------------------------------------------------------
// Threads, warps, blocks

enum class State { ready, at_barrier, at_collective, exited };

enum class Collective {
    none, syncwarp, shfl_idx, shfl_up, shfl_down, shfl_xor, vote_any, vote_all, vote_ballot, match_any,
    ldmatrix_x4, ldmatrix_x4_trans, mma_m16n8k16
};

inline const char* collective_name(Collective c) {
    switch (c) {
        case Collective::none: return "none";
        case Collective::syncwarp: return "__syncwarp";
        case Collective::shfl_idx: return "__shfl_sync";
        case Collective::shfl_up: return "__shfl_up_sync";
        case Collective::shfl_down: return "__shfl_down_sync";
        case Collective::shfl_xor: return "__shfl_xor_sync";
        case Collective::vote_any: return "__any_sync";
        case Collective::vote_all: return "__all_sync";
        case Collective::vote_ballot: return "__ballot_sync";
        case Collective::match_any: return "__match_any_sync";
        case Collective::ldmatrix_x4: return "ldmatrix.x4";
        case Collective::ldmatrix_x4_trans: return "ldmatrix.x4.trans";
        case Collective::mma_m16n8k16: return "mma.m16n8k16";
    }
    return "?";
}

struct CopyAsync { unsigned shared_offset; const unsigned char* source; int bytes; };

struct Thread {
    void* stack_pointer = nullptr;
#if !defined(__x86_64__)
    ucontext_t context;
#endif
    uint3 index{0, 0, 0};
    int linear = 0;
    State state = State::ready;
    std::vector<std::vector<CopyAsync>> copy_groups;  // committed groups, oldest first
    std::vector<CopyAsync> open_group;                // cp.async since the last commit
};

struct Warp {
    Collective kind = Collective::none;
    unsigned mask = 0;
    unsigned arrived = 0;
    uint64_t in[32][12];
    uint64_t out[32][4];
};

struct LaunchConfig {
    unsigned grid[3];
    unsigned block[3];
    unsigned long long dynamic_shared_bytes;
    int schedule;              // 0 ascending, 1 descending, 2 shuffled, 3 warp by warp (last warp first)
    unsigned long long seed;   // of the shuffled schedule
    int copy_async_eager;      // 1: cp.async lands at issue; 0: at the wait that needs it
    int check_launch_bounds;
};

constexpr size_t SHARED_ARENA_BYTES = 4u << 20;
constexpr size_t DYNAMIC_SHARED_LIMIT = 48u << 10;   // without cudaFuncSetAttribute opt-in
constexpr size_t STATIC_SHARED_BASE = 64u << 10;     // static __shared__ variables start here
constexpr size_t STACK_BYTES = 256u << 10;

inline unsigned char* shared_arena = nullptr;
inline size_t static_shared_used = STATIC_SHARED_BASE;
inline std::vector<Thread> threads;
inline std::vector<Warp> warps;
inline std::vector<unsigned char*> stacks;
inline Thread* current = nullptr;
inline void* scheduler_stack_pointer = nullptr;
#if !defined(__x86_64__)
inline ucontext_t scheduler_context;
#endif
inline const LaunchConfig* config = nullptr;
inline const char* kernel_name = "";
inline uint3 block_index{0, 0, 0};
inline dim3 block_dim;
inline dim3 grid_dim;
inline int block_threads = 0;
inline int barrier_count = 0;
inline int exited_count = 0;

}  // namespace emu

// ---------------------------------------------------------------------------
// Traffic counters and the data-race detector (racecheck.h): real in the "traffic"
// (instrumented) build flavour (build.py), no-ops otherwise.
// EMU_SITE marks a runtime function that records an access for its caller, whose
// return address is the access site: not inlined (and not instrumented itself) there.

#ifdef EMU_TRAFFIC
#include "traffic.h"
#define EMU_SITE inline __attribute__((noinline, no_sanitize("thread")))
#define EMU_CALLER __builtin_return_address(0)
// The emulator's own machinery (scheduler, collectives) touches only its own data:
// left uninstrumented, its loads and stores make no hook calls (a block of 256
// fibers reaches these loops millions of times).
#define EMU_UNINSTRUMENTED __attribute__((no_sanitize("thread")))
#else
namespace emu {
enum TrafficKind { traffic_read = 0, traffic_write = 1, traffic_atomic = 2, traffic_ldmatrix = 3 };
struct TrafficPause {};
inline void traffic_access(const void*, uint32_t, int, const void*) {}
inline void traffic_count(const void*, uint32_t, int, const void*) {}
inline void traffic_block_begin(int) {}
inline void traffic_block_end() {}
inline void race_block_begin(int, uint32_t) {}
inline void race_block_end() {}
inline void race_epoch_end() {}
inline void race_syncwarp(int, unsigned) {}
inline void race_copy_issue(unsigned, const void*, int, const void*) {}
inline void race_copy_commit() {}
inline void race_copy_wait(long long, bool = false) {}
}  // namespace emu
#define EMU_SITE inline
#define EMU_CALLER nullptr
#define EMU_UNINSTRUMENTED
#endif

namespace emu {


// The static __shared__ variable of one declaration: a fixed place in the arena,
// chosen on first use (a static reference in the rewritten source holds it).
template <typename T, size_t ALIGN>
T& shared_variable() {
    const size_t align = ALIGN > alignof(T) ? ALIGN : alignof(T);
    size_t offset = (static_shared_used + align - 1) / align * align;
    if (offset + sizeof(T) > SHARED_ARENA_BYTES) fail("static __shared__ memory exceeds the emulator's arena");
    static_shared_used = offset + sizeof(T);
    // Poison it now too: it may be first used in the middle of a block.
    TrafficPause pause;
    std::memset(shared_arena + offset, 0xff, sizeof(T));
    return *reinterpret_cast<T*>(shared_arena + offset);
}

inline void* dynamic_shared() { return shared_arena; }

inline unsigned shared_address(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < shared_arena || c >= shared_arena + SHARED_ARENA_BYTES)
        fail("__cvta_generic_to_shared: the address is not in shared memory");
    return (unsigned)(c - shared_arena);
}

inline unsigned char* shared_pointer(unsigned address, size_t bytes, size_t align, const char* what) {
    if ((size_t)address + bytes > SHARED_ARENA_BYTES) fail(std::string(what) + ": shared address out of range");
    if (address % align) fail(std::string(what) + ": shared address " + std::to_string(address) +
                              " is not " + std::to_string(align) + "-byte aligned");
    return shared_arena + address;
}

// ---------------------------------------------------------------------------
// Fiber switching

#if defined(__x86_64__)
extern "C" void emu_switch_stack(void** save, void* next);
extern "C" void emu_fiber_start();
asm(R"(
.text
.p2align 4
.globl emu_switch_stack
.hidden emu_switch_stack
.type emu_switch_stack,@function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch_stack, .-emu_switch_stack
.p2align 4
.globl emu_fiber_start
.hidden emu_fiber_start
.type emu_fiber_start,@function
emu_fiber_start:
    movq %r12, %rdi
    call *%r13
    ud2
.size emu_fiber_start, .-emu_fiber_start
)");
#endif

inline void (*thread_body)(Thread*) = nullptr;
inline void** kernel_args = nullptr;  // the launch's argument pointers

[[noreturn]] inline void fiber_main(Thread* thread);

inline void to_scheduler() {
#if defined(__x86_64__)
    emu_switch_stack(&current->stack_pointer, scheduler_stack_pointer);
#else
    swapcontext(&current->context, &scheduler_context);
#endif
}

inline void resume(Thread* thread) {
    current = thread;
#if defined(__x86_64__)
    emu_switch_stack(&scheduler_stack_pointer, thread->stack_pointer);
#else
    swapcontext(&scheduler_context, &thread->context);
#endif
    current = nullptr;
}

inline void fiber_entry_trampoline(Thread* thread) { fiber_main(thread); }

#if !defined(__x86_64__)
inline void fiber_entry_ucontext(unsigned high, unsigned low) {
    fiber_main(reinterpret_cast<Thread*>(((uintptr_t)high << 32) | low));
}
#endif

inline void prepare_fiber(Thread* thread, unsigned char* stack) {
#if defined(__x86_64__)
    // emu_switch_stack pops r15 r14 r13 r12 rbx rbp, then returns into
    // emu_fiber_start, which calls r13(r12) with a 16-byte aligned stack.
    uintptr_t top = ((uintptr_t)(stack + STACK_BYTES)) & ~(uintptr_t)15;
    void** sp = reinterpret_cast<void**>(top);
    *--sp = reinterpret_cast<void*>(&emu_fiber_start);
    *--sp = nullptr;                                                // rbp
    *--sp = nullptr;                                                // rbx
    *--sp = thread;                                                 // r12
    *--sp = reinterpret_cast<void*>(&fiber_entry_trampoline);       // r13
    *--sp = nullptr;                                                // r14
    *--sp = nullptr;                                                // r15
    thread->stack_pointer = sp;
#else
    getcontext(&thread->context);
    thread->context.uc_stack.ss_sp = stack;
    thread->context.uc_stack.ss_size = STACK_BYTES;
    thread->context.uc_link = nullptr;
    uintptr_t p = reinterpret_cast<uintptr_t>(thread);
    makecontext(&thread->context, (void (*)())fiber_entry_ucontext, 2, (unsigned)(p >> 32), (unsigned)p);
#endif
}

inline std::string where() {
    std::string s = std::string("kernel ") + kernel_name + ", block (" + std::to_string(block_index.x) + ", " +
                    std::to_string(block_index.y) + ", " + std::to_string(block_index.z) + ")";
    if (current)
        s += ", thread (" + std::to_string(current->index.x) + ", " + std::to_string(current->index.y) + ", " +
             std::to_string(current->index.z) + ")";
    return s;
}

// Records the first fault of a launch (the scheduler calls this directly).
inline void raise_fault(const std::string& what) {
    if (!fault.raised) {
        fault.raised = true;
        fault.message = where() + ": " + what;
    }
}

[[noreturn]] inline void fail(const std::string& what) {
    raise_fault(what);
    if (current) {  // abandon this fiber: the scheduler sees the fault and stops the launch
        current->state = State::exited;
        to_scheduler();
    }
    std::fprintf(stderr, "cuda emulator: fault outside a fiber: %s\n", fault.message.c_str());
    std::abort();
}

// Copies of cp.async land here (late schedule) or at issue (eager schedule).
EMU_UNINSTRUMENTED inline void land(const CopyAsync& copy) {
    TrafficPause pause;  // counted at issue (copy_async_16)
    unsigned char* target = shared_arena + copy.shared_offset;
    if (copy.bytes > 0) std::memcpy(target, copy.source, (size_t)copy.bytes);
    std::memset(target + copy.bytes, 0, 16 - (size_t)copy.bytes);
}

inline void check_collective_lanes(int warp);

[[noreturn]] EMU_UNINSTRUMENTED inline void fiber_main(Thread* thread) {
    thread_body(thread);
    // A thread's cp.async copies complete even if it never waits for them.
    {
        TrafficPause pause;
        race_copy_wait(0, true);
    }
    for (auto& group : thread->copy_groups) for (auto& copy : group) land(copy);
    for (auto& copy : thread->open_group) land(copy);
    thread->copy_groups.clear();
    thread->open_group.clear();
    thread->state = State::exited;
    ++exited_count;
    check_collective_lanes(thread->linear / 32);
    to_scheduler();
    std::abort();  // never resumed
}

inline Thread& me() { return *current; }
inline int lane_id() { return me().linear & 31; }
inline Warp& my_warp() { return warps[me().linear / 32]; }
inline unsigned warp_lanes(int warp) {  // lanes that exist (a partial last warp has fewer)
    const int first = warp * 32;
    const int n = std::min(32, block_threads - first);
    return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// A pending collective must be able to complete: every lane its mask names
// must exist and must not have exited or be waiting at a block barrier.
EMU_UNINSTRUMENTED inline void check_collective_lanes(int warp) {
    Warp& w = warps[warp];
    if (w.kind == Collective::none) return;
    const unsigned missing = w.mask & ~w.arrived;
    for (int lane = 0; lane < 32; ++lane) {
        if (!(missing >> lane & 1u)) continue;
        const int linear = warp * 32 + lane;
        if (!(warp_lanes(warp) >> lane & 1u))
            fail(std::string(collective_name(w.kind)) + ": mask names lane " + std::to_string(lane) +
                 " of warp " + std::to_string(warp) + ", which the block does not have");
        const State s = threads[linear].state;
        if (s == State::exited || s == State::at_barrier)
            fail(std::string(collective_name(w.kind)) + ": mask 0x" + [&] {
                char b[16]; std::snprintf(b, sizeof b, "%08x", w.mask); return std::string(b); }() +
                 " names lane " + std::to_string(lane) + " of warp " + std::to_string(warp) + ", which " +
                 (s == State::exited ? "has exited" : "waits at __syncthreads") + " and never arrives");
    }
}

void compute_collective(Warp& w);

// Arrive at a warp collective with this lane's inputs already in w.in[lane].
// Returns once every lane of `mask` has arrived and the outputs are in w.out.
EMU_UNINSTRUMENTED inline void arrive(Collective kind, unsigned mask) {
    Thread& t = me();
    const int lane = t.linear & 31;
    const int warp = t.linear / 32;
    Warp& w = warps[warp];
    if (!(mask >> lane & 1u))
        fail(std::string(collective_name(kind)) + ": the mask does not name the calling lane " + std::to_string(lane));
    if (w.kind == Collective::none) {
        w.kind = kind;
        w.mask = mask;
        w.arrived = 0;
    } else if (w.kind != kind || w.mask != mask) {
        fail(std::string("lanes of warp ") + std::to_string(warp) + " meet at different collectives: " +
             collective_name(w.kind) + " and " + collective_name(kind) + " (or different masks)");
    }
    w.arrived |= 1u << lane;
    if (w.arrived == w.mask) {
        {
            TrafficPause pause;  // ldmatrix's shared reads are counted at the call (ptx_ldmatrix_*)
            compute_collective(w);
            if (kind == Collective::syncwarp) race_syncwarp(warp, mask);  // orders the named lanes' memory
        }
        for (int l = 0; l < 32; ++l)
            if ((w.mask >> l & 1u) && l != lane) threads[warp * 32 + l].state = State::ready;
        w.kind = Collective::none;
        return;
    }
    check_collective_lanes(warp);
    t.state = State::at_collective;
    to_scheduler();
}

EMU_UNINSTRUMENTED inline void syncthreads() {
    Thread& t = me();
    t.state = State::at_barrier;
    ++barrier_count;
    // A lane now at the barrier cannot complete its warp's pending collective.
    check_collective_lanes(t.linear / 32);
    to_scheduler();
}

// ---------------------------------------------------------------------------
// Warp collectives: the computation, done once by the last lane to arrive.

inline void mma_m16n8k16(Warp& w);
inline void ldmatrix_x4(Warp& w, bool trans);

EMU_UNINSTRUMENTED inline void compute_collective(Warp& w) {
    const unsigned mask = w.mask;
    auto lanes = [&](auto f) { for (int l = 0; l < 32; ++l) if (mask >> l & 1u) f(l); };
    auto source_value = [&](int lane, int source) -> uint64_t {
        if (!(mask >> source & 1u))
            fail(std::string(collective_name(w.kind)) + ": lane " + std::to_string(lane) + " reads lane " +
                 std::to_string(source) + ", which the mask leaves out (undefined on the GPU)");
        return w.in[source][0];
    };
    switch (w.kind) {
        case Collective::syncwarp: break;
        case Collective::shfl_idx: case Collective::shfl_up: case Collective::shfl_down: case Collective::shfl_xor:
            lanes([&](int l) {
                const int width = (int)w.in[l][2];
                const int arg = (int)w.in[l][1];
                const int segment = l & ~(width - 1);
                int source = l;
                if (w.kind == Collective::shfl_idx) source = segment + (arg & (width - 1));
                else if (w.kind == Collective::shfl_up) source = (l - arg) >= segment ? l - arg : l;
                else if (w.kind == Collective::shfl_down) source = (l + arg) < segment + width ? l + arg : l;
                else { const int s = l ^ arg; source = s < segment + width && s >= segment ? s : l; }
                w.out[l][0] = source == l ? w.in[l][0] : source_value(l, source);
            });
            break;
        case Collective::vote_any: case Collective::vote_all: case Collective::vote_ballot: {
            unsigned ballot = 0;
            lanes([&](int l) { if (w.in[l][0]) ballot |= 1u << l; });
            lanes([&](int l) {
                w.out[l][0] = w.kind == Collective::vote_ballot ? ballot
                              : w.kind == Collective::vote_any  ? (ballot != 0)
                                                                : (ballot == mask);
            });
            break;
        }
        case Collective::match_any:
            lanes([&](int l) {
                unsigned same = 0;
                lanes([&](int o) { if (w.in[o][0] == w.in[l][0]) same |= 1u << o; });
                w.out[l][0] = same;
            });
            break;
        case Collective::ldmatrix_x4: ldmatrix_x4(w, false); break;
        case Collective::ldmatrix_x4_trans: ldmatrix_x4(w, true); break;
        case Collective::mma_m16n8k16: mma_m16n8k16(w); break;
        case Collective::none: break;
    }
}

template <typename T>
uint64_t to_bits(T value) {
    static_assert(sizeof(T) <= 8, "a shuffled value is at most 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

template <typename T>
EMU_UNINSTRUMENTED T shuffle(Collective kind, unsigned mask, T value, int arg, int width) {
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail(std::string(collective_name(kind)) + ": width must be a power of two from 1 to 32");
    Warp& w = my_warp();
    const int lane = lane_id();
    w.in[lane][0] = to_bits(value);
    w.in[lane][1] = (uint64_t)(int64_t)arg;
    w.in[lane][2] = (uint64_t)width;
    arrive(kind, mask);
    return from_bits<T>(w.out[lane][0]);
}

// ---------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA 9.7.14.5.15, "Warp-level
// matrix load instruction: ldmatrix"): lanes 8j..8j+7 give the addresses of the 8 rows
// (16 bytes each) of matrix j. Without .trans lane l receives, in register j, row l/4
// elements 2(l%4) and 2(l%4)+1; with .trans it receives the same two positions of the
// transposed matrix: column l/4, rows 2(l%4) and 2(l%4)+1.

EMU_UNINSTRUMENTED inline void ldmatrix_x4(Warp& w, bool trans) {
    const char* what = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    const unsigned char* rows[32];
    for (int l = 0; l < 32; ++l) rows[l] = shared_pointer((unsigned)w.in[l][0], 16, 16, what);
    for (int l = 0; l < 32; ++l) {
        for (int j = 0; j < 4; ++j) {
            uint16_t low, high;
            if (!trans) {
                const unsigned char* row = rows[8 * j + l / 4];
                std::memcpy(&low, row + 4 * (l % 4), 2);
                std::memcpy(&high, row + 4 * (l % 4) + 2, 2);
            } else {
                std::memcpy(&low, rows[8 * j + 2 * (l % 4)] + 2 * (l / 4), 2);
                std::memcpy(&high, rows[8 * j + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
            }
            w.out[l][j] = (uint32_t)low | ((uint32_t)high << 16);
        }
    }
}

// ---------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (PTX ISA 9.7.13.4.8, "Matrix
// Fragments for mma.m16n8k16 with floating point type"); g = lane / 4, t = lane % 4:
//   A (16 x 16) a0..a3, each two f16 (low half first): a0 (g, 2t..2t+1),
//       a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16 x 8)  b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g)
//   C, D (16 x 8) c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
// D = A B + C. The 16 products of f16 values are exact in double; they are summed
// with C in double and rounded to float once (the tensor core's own rounding of its
// internal sum is not specified, so bitwise GPU equality is not claimed).

EMU_UNINSTRUMENTED inline void mma_m16n8k16(Warp& w) {
    float a[16][16], b[16][8], c[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int r = 0; r < 4; ++r) {
            const uint32_t reg = (uint32_t)w.in[l][r];
            const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
            a[row][col] = half_to_float((uint16_t)(reg & 0xffffu));
            a[row][col + 1] = half_to_float((uint16_t)(reg >> 16));
        }
        for (int r = 0; r < 2; ++r) {
            const uint32_t reg = (uint32_t)w.in[l][4 + r];
            b[2 * t + 8 * r][g] = half_to_float((uint16_t)(reg & 0xffffu));
            b[2 * t + 8 * r + 1][g] = half_to_float((uint16_t)(reg >> 16));
        }
        for (int r = 0; r < 4; ++r)
            c[g + (r >> 1) * 8][2 * t + (r & 1)] = from_bits<float>(w.in[l][6 + r]);
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int r = 0; r < 4; ++r) {
            const int row = g + (r >> 1) * 8, col = 2 * t + (r & 1);
            double sum = c[row][col];
            for (int k = 0; k < 16; ++k) sum += (double)a[row][k] * (double)b[k][col];
            w.out[l][r] = to_bits((float)sum);
        }
    }
}

// ---------------------------------------------------------------------------
// The launch

EMU_UNINSTRUMENTED inline void run_block(const LaunchConfig& cfg) {
    const int n = block_threads;
    std::memset(shared_arena, 0xff, static_shared_used);  // poison: NaN floats, -1 integers
    barrier_count = 0;
    exited_count = 0;
    for (auto& w : warps) { w.kind = Collective::none; w.arrived = 0; }
    for (int i = 0; i < n; ++i) {
        Thread& t = threads[i];
        t.state = State::ready;
        t.copy_groups.clear();
        t.open_group.clear();
        prepare_fiber(&t, stacks[i]);
    }
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = cfg.schedule == 1 ? n - 1 - i : i;
    uint64_t random_state = cfg.seed * 6364136223846793005ull + 1442695040888963407ull +
                            block_index.x * 0x9e3779b97f4a7c15ull + block_index.y;
    for (;;) {
        bool progress = false;
        if (cfg.schedule == 2) {  // a fresh shuffle for every pass
            for (int i = n - 1; i > 0; --i) {
                random_state = random_state * 6364136223846793005ull + 1442695040888963407ull;
                std::swap(order[i], order[(random_state >> 33) % (uint64_t)(i + 1)]);
            }
        }
        if (cfg.schedule == 3) {  // each warp as far as it goes before the next, last warp first
            for (int warp = (n + 31) / 32 - 1; warp >= 0; --warp) {
                for (bool again = true; again;) {
                    again = false;
                    for (int i = warp * 32; i < std::min(n, warp * 32 + 32); ++i) {
                        if (threads[i].state != State::ready) continue;
                        resume(&threads[i]);
                        if (fault.raised) return;
                        again = progress = true;
                    }
                }
            }
        } else {
            for (int i : order) {
                if (threads[i].state != State::ready) continue;
                resume(&threads[i]);
                if (fault.raised) return;
                progress = true;
            }
        }
        if (exited_count == n) return;
        if (barrier_count > 0 && barrier_count + exited_count == n) {
            if (exited_count > 0) {
                raise_fault("__syncthreads reached by " + std::to_string(barrier_count) + " of " + std::to_string(n) +
                     " threads; " + std::to_string(exited_count) + " had exited (a barrier after an early return)");
                return;
            }
            race_epoch_end();  // every access before the barrier is ordered before every one after it
            for (int i = 0; i < n; ++i) threads[i].state = State::ready;
            barrier_count = 0;
            continue;
        }
        if (!progress) {
            int waiting = 0;
            for (int i = 0; i < n; ++i) waiting += threads[i].state == State::at_collective;
            raise_fault("deadlock: " + std::to_string(barrier_count) + " threads wait at __syncthreads, " +
                        std::to_string(waiting) + " at warp collectives, " + std::to_string(exited_count) +
                        " exited");
            return;
        }
    }
}

inline int launch(const LaunchConfig* cfg, const char* name, long long max_threads, void (*body)(Thread*),
                  char* error, int error_size) {
    config = cfg;
    kernel_name = name;
    fault = Fault{};
    current = nullptr;
    auto report = [&]() {
        std::snprintf(error, (size_t)error_size, "%s", fault.message.c_str());
        return 1;
    };
    block_dim.x = cfg->block[0]; block_dim.y = cfg->block[1]; block_dim.z = cfg->block[2];
    grid_dim.x = cfg->grid[0]; grid_dim.y = cfg->grid[1]; grid_dim.z = cfg->grid[2];
    const long long n = (long long)block_dim.x * block_dim.y * block_dim.z;
    auto refuse = [&](const std::string& why) {
        fault.raised = true;
        fault.message = std::string("kernel ") + name + ": " + why;
        return report();
    };
    if (n < 1 || n > 1024) return refuse("a block has " + std::to_string(n) + " threads (1 to 1024 allowed)");
    if (cfg->check_launch_bounds && max_threads > 0 && n > max_threads)
        return refuse("a block of " + std::to_string(n) + " threads exceeds __launch_bounds__(" +
                      std::to_string(max_threads) + ")");
    if (block_dim.z > 64) return refuse("blockDim.z above 64");
    if (grid_dim.x < 1 || grid_dim.y < 1 || grid_dim.z < 1 || grid_dim.y > 65535 || grid_dim.z > 65535 ||
        grid_dim.x > 2147483647u)
        return refuse("grid dimensions out of range");
    if (cfg->dynamic_shared_bytes > DYNAMIC_SHARED_LIMIT)
        return refuse("dynamic shared memory of " + std::to_string(cfg->dynamic_shared_bytes) +
                      " bytes exceeds the 48 KiB a launch may take without opting in");
    if (!shared_arena) {
        shared_arena = static_cast<unsigned char*>(std::aligned_alloc(4096, SHARED_ARENA_BYTES));
    }
    block_threads = (int)n;
    threads.assign((size_t)n, Thread{});
    warps.assign((size_t)((n + 31) / 32), Warp{});
    while ((long long)stacks.size() < n) stacks.push_back(static_cast<unsigned char*>(std::aligned_alloc(64, STACK_BYTES)));
    for (int i = 0; i < n; ++i) {
        threads[i].linear = i;
        threads[i].index = {(unsigned)(i % block_dim.x), (unsigned)((i / block_dim.x) % block_dim.y),
                            (unsigned)(i / (block_dim.x * block_dim.y))};
    }
    thread_body = body;
#if defined(__x86_64__)
    // CuPy compiles with -ftz=true: float32 subnormals flush to zero (FTZ and DAZ).
    const unsigned saved_csr = _mm_getcsr();
    _mm_setcsr(saved_csr | 0x8040u);
#endif
    for (unsigned z = 0; z < grid_dim.z && !fault.raised; ++z)
        for (unsigned y = 0; y < grid_dim.y && !fault.raised; ++y)
            for (unsigned x = 0; x < grid_dim.x && !fault.raised; ++x) {
                block_index = {x, y, z};
                traffic_block_begin((int)n);
                race_block_begin((int)n, x + grid_dim.x * (y + grid_dim.y * z));
                run_block(*cfg);
                traffic_block_end();
                if (!fault.raised) race_block_end();
            }
#if defined(__x86_64__)
    _mm_setcsr(saved_csr);
#endif
    if (fault.raised) return report();
    return 0;
}

// The kernel's parameters, from the launcher's argument pointers (CuPy's convention).
template <typename... P, size_t... I>
void call_with(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}
template <typename... P>
void call_kernel(void (*kernel)(P...), void** args) {
    call_with(kernel, args, std::index_sequence_for<P...>{});
}

// A parameter's type as the Python launcher checks it: a pointer is "f<size>" to
// floating-point elements (float, __half), "i<size>" to signed integers, "u<size>" to
// unsigned ones and "v" to a vector type (the last two are raw bytes: any dtype);
// a scalar is "i32", "u32", "i64", "u64" or "f32".
template <typename T>
const char* type_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        using E = std::remove_cv_t<std::remove_pointer_t<U>>;
        if constexpr (std::is_floating_point_v<E>) return sizeof(E) == 4 ? "f4" : "f8";
        else if constexpr (std::is_same_v<E, __half>) return "f2";
        else if constexpr (std::is_integral_v<E> && std::is_signed_v<E>)
            return sizeof(E) == 1 ? "i1" : sizeof(E) == 2 ? "i2" : sizeof(E) == 4 ? "i4" : "i8";
        else if constexpr (std::is_integral_v<E>)
            return sizeof(E) == 1 ? "u1" : sizeof(E) == 2 ? "u2" : sizeof(E) == 4 ? "u4" : "u8";
        else return "v";
    } else if constexpr (std::is_same_v<U, int>) return "i32";
    else if constexpr (std::is_same_v<U, unsigned int>) return "u32";
    else if constexpr (std::is_same_v<U, long long> || std::is_same_v<U, long>) return "i64";
    else if constexpr (std::is_same_v<U, unsigned long long> || std::is_same_v<U, unsigned long>) return "u64";
    else if constexpr (std::is_same_v<U, float>) return "f32";
    else return "?";
}
template <typename... P>
const char* signature(void (*)(P...)) {
    static const std::string text = [] {
        std::string s;
        ((s += std::string(type_code<P>()) + ","), ...);
        return s;
    }();
    return text.c_str();
}

// ---------------------------------------------------------------------------
// cp.async.cg.shared.global [dst], [src], 16, src_size (PTX ISA 9.7.9.25.3.1):
// copies src_size bytes and fills the rest of the 16 with zeros; both addresses
// 16-byte aligned. The copy belongs to the thread's open group until
// cp.async.commit_group; cp.async.wait_group N waits until at most the N most
// recent committed groups are pending.

EMU_UNINSTRUMENTED inline void copy_async_16(unsigned shared, const void* global, int source_bytes) {
    if (source_bytes < 0 || source_bytes > 16) fail("cp.async: src-size must be 0 to 16");
    shared_pointer(shared, 16, 16, "cp.async destination");
    if (reinterpret_cast<uintptr_t>(global) % 16) fail("cp.async: the global source is not 16-byte aligned");
    CopyAsync copy{shared, static_cast<const unsigned char*>(global), source_bytes};
    if (config->copy_async_eager) land(copy);
    else me().open_group.push_back(copy);
}

EMU_UNINSTRUMENTED inline void copy_async_commit() {
    {
        TrafficPause pause;
        race_copy_commit();
    }
    Thread& t = me();
    t.copy_groups.push_back(std::move(t.open_group));
    t.open_group.clear();
}

EMU_UNINSTRUMENTED inline void copy_async_wait(long long pending) {
    {
        TrafficPause pause;
        race_copy_wait(pending);
    }
    Thread& t = me();
    while ((long long)t.copy_groups.size() > pending) {
        for (auto& copy : t.copy_groups.front()) land(copy);
        t.copy_groups.erase(t.copy_groups.begin());
    }
}

}  // namespace emu

// ---------------------------------------------------------------------------
// The CUDA names the kernels use

#define threadIdx (emu::current->index)
#define blockIdx (emu::block_index)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define warpSize 32

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::my_warp().in[emu::lane_id()][0] = 0;
    emu::arrive(emu::Collective::syncwarp, mask);
}

template <typename T> T __shfl_sync(unsigned mask, T v, int lane, int width = 32) {
    return emu::shuffle(emu::Collective::shfl_idx, mask, v, lane, width);
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shuffle(emu::Collective::shfl_up, mask, v, (int)delta, width);
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shuffle(emu::Collective::shfl_down, mask, v, (int)delta, width);
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::shuffle(emu::Collective::shfl_xor, mask, v, lane_mask, width);
}
EMU_UNINSTRUMENTED inline unsigned emu_vote(emu::Collective kind, unsigned mask, int predicate) {
    const int lane = emu::lane_id();
    emu::my_warp().in[lane][0] = predicate != 0;
    emu::arrive(kind, mask);
    return (unsigned)emu::my_warp().out[lane][0];
}
inline int __any_sync(unsigned mask, int predicate) { return (int)emu_vote(emu::Collective::vote_any, mask, predicate); }
inline int __all_sync(unsigned mask, int predicate) { return (int)emu_vote(emu::Collective::vote_all, mask, predicate); }
inline unsigned __ballot_sync(unsigned mask, int predicate) { return emu_vote(emu::Collective::vote_ballot, mask, predicate); }
template <typename T> unsigned __match_any_sync(unsigned mask, T value) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
    const int lane = emu::lane_id();
    emu::my_warp().in[lane][0] = emu::to_bits(value);
    emu::arrive(emu::Collective::match_any, mask);
    return (unsigned)emu::my_warp().out[lane][0];
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

inline unsigned __float_as_uint(float f) { return emu::float_bits(f); }
inline float __uint_as_float(unsigned u) { return emu::bits_float(u); }
inline int __float_as_int(float f) { return (int)emu::float_bits(f); }
inline float __int_as_float(int i) { return emu::bits_float((unsigned)i); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float expf(float v) { return std::exp(v); }
inline float erff(float v) { return std::erf(v); }
inline float sqrtf(float v) { return std::sqrt(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float fabsf(float v) { return std::fabs(v); }
inline float logf(float v) { return std::log(v); }
inline float tanhf(float v) { return std::tanh(v); }

// __ldg: a read-only load (alignment checked like any access of T).
template <typename T> __forceinline__ T __ldg(const T* p) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(T))
        emu::fail("__ldg: misaligned " + std::to_string(sizeof(T)) + "-byte load");
    return *p;
}

EMU_SITE int atomicAdd(int* p, int v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    int old = *p; *p = old + v; return old;
}
EMU_SITE unsigned atomicAdd(unsigned* p, unsigned v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    unsigned old = *p; *p = old + v; return old;
}
EMU_SITE unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    auto old = *p; *p = old + v; return old;
}
EMU_SITE float atomicAdd(float* p, float v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    float old = *p; *p = old + v; return old;
}
EMU_SITE int atomicOr(int* p, int v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    int old = *p; *p = old | v; return old;
}
EMU_SITE unsigned atomicOr(unsigned* p, unsigned v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    unsigned old = *p; *p = old | v; return old;
}
EMU_SITE int atomicAnd(int* p, int v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    int old = *p; *p = old & v; return old;
}
EMU_SITE int atomicMax(int* p, int v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    int old = *p; *p = old > v ? old : v; return old;
}
EMU_SITE int atomicMin(int* p, int v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    int old = *p; *p = old < v ? old : v; return old;
}
EMU_SITE int atomicExch(int* p, int v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    int old = *p; *p = v; return old;
}
EMU_SITE int atomicCAS(int* p, int compare, int v) {
    emu::traffic_access(p, sizeof *p, emu::traffic_atomic, EMU_CALLER);
    int old = *p; if (old == compare) *p = v; return old;
}

inline size_t __cvta_generic_to_shared(const void* p) { return emu::shared_address(p); }
[[noreturn]] inline void __trap() { emu::fail("__trap()"); }

// ---------------------------------------------------------------------------
// cuda_fp16.h, the part the kernels use

struct __half {
    unsigned short bits;
};
struct alignas(4) __half2 {
    __half x, y;
};
inline float __half2float(__half h) { return emu::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{emu::float_to_half_rn(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half2 __floats2half2_rn(float low, float high) { return __half2{__float2half_rn(low), __float2half_rn(high)}; }

// ---------------------------------------------------------------------------
// Inline PTX: rewrite.py turns each asm statement into a call of the function named
// after its opcode (dots -> underscores), operands in the order they are written.
// An opcode without a function here is refused by rewrite.py, at build time.

inline void ptx_cvt_f32_f16(float& d, unsigned short a) { d = emu::half_to_float(a); }
inline void ptx_cvt_rn_f16_f32(unsigned short& d, float a) { d = emu::float_to_half_rn(a); }

inline void ptx_ldmatrix_x4(bool trans, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned address) {
    const int lane = emu::lane_id();
    emu::Warp& w = emu::my_warp();
    w.in[lane][0] = address;
    emu::arrive(trans ? emu::Collective::ldmatrix_x4_trans : emu::Collective::ldmatrix_x4, 0xffffffffu);
    r0 = (unsigned)w.out[lane][0]; r1 = (unsigned)w.out[lane][1];
    r2 = (unsigned)w.out[lane][2]; r3 = (unsigned)w.out[lane][3];
}
EMU_SITE void ptx_ldmatrix_sync_aligned_m8n8_x4_shared_b16(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                                         unsigned address) {
    if (address < emu::SHARED_ARENA_BYTES) emu::traffic_access(emu::shared_arena + address, 16, emu::traffic_ldmatrix, EMU_CALLER);
    ptx_ldmatrix_x4(false, r0, r1, r2, r3, address);
}
EMU_SITE void ptx_ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16(unsigned& r0, unsigned& r1, unsigned& r2,
                                                               unsigned& r3, unsigned address) {
    if (address < emu::SHARED_ARENA_BYTES) emu::traffic_access(emu::shared_arena + address, 16, emu::traffic_ldmatrix, EMU_CALLER);
    ptx_ldmatrix_x4(true, r0, r1, r2, r3, address);
}

inline void ptx_mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32(
    float& d0, float& d1, float& d2, float& d3, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
    unsigned b1, float c0, float c1, float c2, float c3) {
    const int lane = emu::lane_id();
    emu::Warp& w = emu::my_warp();
    const uint64_t in[10] = {a0, a1, a2, a3, b0, b1, emu::to_bits(c0), emu::to_bits(c1), emu::to_bits(c2),
                             emu::to_bits(c3)};
    std::memcpy(w.in[lane], in, sizeof in);
    emu::arrive(emu::Collective::mma_m16n8k16, 0xffffffffu);
    d0 = emu::from_bits<float>(w.out[lane][0]); d1 = emu::from_bits<float>(w.out[lane][1]);
    d2 = emu::from_bits<float>(w.out[lane][2]); d3 = emu::from_bits<float>(w.out[lane][3]);
}

EMU_SITE void ptx_cp_async_cg_shared_global(unsigned shared, const void* global, long long cp_size, int source_bytes) {
    if (cp_size != 16) emu::fail("cp.async.cg: cp-size must be 16");
    // Counted at issue; racecheck sees the copy in flight until the wait that completes it.
    if (source_bytes > 0 && source_bytes <= 16) emu::traffic_count(global, (uint32_t)source_bytes, emu::traffic_read, EMU_CALLER);
    if (shared < emu::SHARED_ARENA_BYTES) emu::traffic_count(emu::shared_arena + shared, 16, emu::traffic_write, EMU_CALLER);
    emu::copy_async_16(shared, global, source_bytes);
    if (shared + 16 <= emu::SHARED_ARENA_BYTES && source_bytes >= 0 && source_bytes <= 16) {
        emu::TrafficPause pause;
        emu::race_copy_issue(shared, global, source_bytes, EMU_CALLER);
    }
}
inline void ptx_cp_async_commit_group() { emu::copy_async_commit(); }
inline void ptx_cp_async_wait_group(long long pending) { emu::copy_async_wait(pending); }

// ---------------------------------------------------------------------------
// -fsanitize=alignment,bounds report here (no sanitizer runtime is linked): the
// fault names the rewritten file's line, which is the .cu file's line.

namespace emu {
struct SourceLocation { const char* file; uint32_t line; uint32_t column; };
struct TypeMismatchData { SourceLocation location; const void* type; unsigned char log_alignment; unsigned char kind; };
struct OutOfBoundsData { SourceLocation location; const void* array_type; const void* index_type; };
inline std::string at(const SourceLocation& l) { return std::string(l.file) + ":" + std::to_string(l.line); }
}  // namespace emu

extern "C" void __ubsan_handle_type_mismatch_v1(emu::TypeMismatchData* data, uintptr_t pointer) {
    if (pointer == 0) emu::fail(emu::at(data->location) + ": null pointer access");
    emu::fail(emu::at(data->location) + ": misaligned access: address " + std::to_string(pointer % 4096) +
              " (mod 4096) for a type of alignment " + std::to_string(1u << data->log_alignment));
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(emu::TypeMismatchData* data, uintptr_t pointer) {
    __ubsan_handle_type_mismatch_v1(data, pointer);
}
extern "C" void __ubsan_handle_out_of_bounds(emu::OutOfBoundsData* data, uintptr_t index) {
    emu::fail(emu::at(data->location) + ": local array index " + std::to_string((long long)index) + " out of bounds");
}
extern "C" void __ubsan_handle_out_of_bounds_abort(emu::OutOfBoundsData* data, uintptr_t index) {
    __ubsan_handle_out_of_bounds(data, index);
}
