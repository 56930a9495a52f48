// expert_mlp.cu: the experts of an MoE layer, every expert in one launch per GEMM.
//
// Rows arrive grouped by expert (topk_moe.dispatch + permute): expert e owns rows
// offsets[e]:offsets[e+1] of `rows` (N, D). Expert e computes
//     hidden = act(rows @ w1[e])                      relu | gelu   (ACTIVATION 0 | 1)
//     hidden = silu(rows @ w1[e]) * (rows @ w3[e])    swiglu        (ACTIVATION 2)
//     out    = hidden @ w2[e]
// with w1, w3 (E, D, F) and w2 (E, F, D), all row-major. Both GEMMs are the same
// "A (rows of one expert) @ B[e]" product, so each version has a `hidden` kernel
// (GEMM1, the gate GEMM sharing its A tile, activation fused in the epilogue) and
// an `out` kernel (GEMM2). Accumulation is float32 in every version; the hidden
// activations are stored in the input dtype (float16 inputs: rounded to float16
// once, after the activation, as a plain float16 implementation stores them).
//
// Versions (thread-to-data mapping of each):
//   v1      naive, the reference ported: one thread per output element (row, column);
//           block = one row x 128 columns, its expert found by a binary search of offsets.
//   v2      float32 tiled SGEMM (FFMA, no TF32): block = 128-row tile of one expert x
//           128 columns (64 columns of w1 and of w3 when gated), BK = 16, register
//           prefetch into a second shared-memory buffer; 256 threads as 16 x 16, each
//           owns 8 rows x 8 columns (8 x 4 of w1 and 8 x 4 of w3 when gated).
//   v3      float16 tensor cores: mma.sync m16n8k16 (float32 accumulators) fed by
//           ldmatrix, cp.async double buffering, BK = 32; block tile as v2, 8 warps
//           as 2 (rows) x 4 (columns), each warp owns 64 rows x 32 columns (x 16 of
//           w1 and 16 of w3 when gated).
//   decode  few rows per expert: block = one expert x a slice of LANES * 16 bytes of
//           columns; each thread streams 16-byte chunks of one weight row (coalesced
//           across the LANES lanes of a row group), the 8 warps x (32 / LANES) row
//           groups split the K rows, and all of the expert's rows (DECODE_ROWS per
//           pass) reuse each weight chunk from registers; a shuffle + shared-memory
//           reduction finishes the sums. Each selected expert's weights are read once
//           per pass, unselected experts' weights never.
//   tile_starts  one block: tile_starts[e] = sum over e' < e of ceil(count_e' / BM),
//           the first row tile of each expert. v2 and v3 launch an upper bound of
//           row tiles (known on the host without a sync) and each block finds its
//           expert by a binary search of tile_starts; blocks past the last tile exit.
//
// Compile-time constants (-D, all passed by expert_mlp.py from COMPILE_DEFINES):
//   ACTIVATION    0 relu, 1 gelu (exact erf), 2 swiglu
//   VECTOR_LOADS  1 when every row length (D, F) and base pointer is a multiple of
//                 16 bytes: 16-byte loads, cp.async, paired stores. 0: element loads
//                 and stores with bounds checks everywhere (odd D and F).
//   V2_*, V3_*, DECODE_*: block shapes, checked below against the thread mappings.
// All index products (row * K, e * K * n_cols, k * n_cols) are 64-bit.

#include <cuda_fp16.h>

// v3's cp.async and mma.sync need sm_80 or newer. Older architectures compile the
// PTX helpers below as traps, so the file (v1, v2, decode) still builds there; the
// launcher (expert_mlp.py) never picks v3 on them and refuses it when asked.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define HAS_SM80_PTX 0
#else
#define HAS_SM80_PTX 1
#endif

#ifndef ACTIVATION
#define ACTIVATION 2
#endif
#ifndef VECTOR_LOADS
#define VECTOR_LOADS 1
#endif
#ifndef V2_BLOCK_ROWS
#define V2_BLOCK_ROWS 128
#endif
#ifndef V2_BLOCK_COLS
#define V2_BLOCK_COLS 128
#endif
#ifndef V2_BLOCK_COLS_GATED
#define V2_BLOCK_COLS_GATED 64
#endif
#ifndef V3_BLOCK_ROWS
#define V3_BLOCK_ROWS 128
#endif
#ifndef V3_BLOCK_COLS
#define V3_BLOCK_COLS 128
#endif
#ifndef V3_BLOCK_COLS_GATED
#define V3_BLOCK_COLS_GATED 64
#endif
#ifndef V1_BLOCK_COLS
#define V1_BLOCK_COLS 128
#endif
#ifndef DECODE_ROWS
#define DECODE_ROWS 4
#endif
#ifndef DECODE_HIDDEN_LANES
#define DECODE_HIDDEN_LANES 8
#endif
#ifndef DECODE_OUT_LANES
#define DECODE_OUT_LANES 4
#endif
#ifndef THREADS
#define THREADS 256
#endif

#define GATED (ACTIVATION == 2)

static_assert(ACTIVATION >= 0 && ACTIVATION <= 2, "ACTIVATION: 0 relu, 1 gelu, 2 swiglu");
static_assert(THREADS == 256, "v2, v3 and decode map exactly 256 threads");
static_assert(V2_BLOCK_ROWS == 128 && V2_BLOCK_COLS == 128 && V2_BLOCK_COLS_GATED == 64,
              "v2's 16 x 16 threads own 8 x 8 (gated 8 x 4 + 8 x 4) outputs each");
static_assert(V3_BLOCK_ROWS == 128 && V3_BLOCK_COLS == 128 && V3_BLOCK_COLS_GATED == 64,
              "v3's 2 x 4 warps own 64 x 32 (gated 64 x 16 + 64 x 16) outputs each");
static_assert(DECODE_ROWS >= 1 && DECODE_ROWS <= 8, "decode keeps DECODE_ROWS rows in registers");
static_assert(DECODE_HIDDEN_LANES == 4 || DECODE_HIDDEN_LANES == 8 || DECODE_HIDDEN_LANES == 16 ||
              DECODE_HIDDEN_LANES == 32, "decode lanes per weight row: 4, 8, 16 or 32");
static_assert(DECODE_OUT_LANES == 4 || DECODE_OUT_LANES == 8 || DECODE_OUT_LANES == 16 ||
              DECODE_OUT_LANES == 32, "decode lanes per weight row: 4, 8, 16 or 32");

// ---------------------------------------------------------------------------
// Element helpers: float32 accumulation whatever the storage type.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float half_bits_to_float(unsigned bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xffffu)));
}

// The activation on one float32 accumulator (gate: the w3 accumulator, swiglu only).
__device__ __forceinline__ float activate(float h, float gate) {
#if ACTIVATION == 0
    (void)gate;
    return h < 0.0f ? 0.0f : h;  // keeps NaN, as numpy.maximum(h, 0) does
#elif ACTIVATION == 1
    (void)gate;
    return 0.5f * h * (1.0f + erff(h * 0.70710678118654752440f));
#else
    return h / (1.0f + expf(-h)) * gate;  // silu(h) * gate; h -> -inf gives -0, not NaN
#endif
}

__device__ __forceinline__ int clamp_count(long long n, int most) {
    return n <= 0 ? 0 : (n >= most ? most : static_cast<int>(n));
}

// 16 bytes of T from p into floats; elements [valid, VEC) are zero. p is only read
// where valid > 0; VECTOR_LOADS promises 16-byte alignment of every full chunk.
__device__ __forceinline__ void load_chunk(const float* p, int valid, float (&out)[4]) {
#if VECTOR_LOADS
    if (valid >= 4) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(p));
        out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
        return;
    }
#endif
#pragma unroll
    for (int c = 0; c < 4; ++c) out[c] = c < valid ? __ldg(p + c) : 0.0f;
}

__device__ __forceinline__ void load_chunk(const __half* p, int valid, float (&out)[8]) {
#if VECTOR_LOADS
    if (valid >= 8) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
        const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // the lower half of each word is the lower address
            out[2 * i] = half_bits_to_float(words[i]);
            out[2 * i + 1] = half_bits_to_float(words[i] >> 16);
        }
        return;
    }
#endif
#pragma unroll
    for (int c = 0; c < 8; ++c) out[c] = c < valid ? __half2float(__ldg(p + c)) : 0.0f;
}

// ---------------------------------------------------------------------------
// Row tiles of the grouped GEMMs (v2, v3).

__device__ __forceinline__ int tiles_of(long long count, int block_rows) {
    const int rows = count > 0 ? static_cast<int>(count) : 0;
    return (rows + block_rows - 1) / block_rows;
}

// tile_starts[e] = number of row tiles of experts 0..e-1; tile_starts[E] = all tiles.
// One block: each thread sums a contiguous run of experts, then a Hillis-Steele scan.
extern "C" __global__ void __launch_bounds__(THREADS)
expert_mlp_tile_starts(const long long* __restrict__ offsets, int n_experts, int block_rows,
                       int* __restrict__ tile_starts) {
    __shared__ int scan[THREADS];
    const int per_thread = (n_experts + THREADS - 1) / THREADS;
    const int first = threadIdx.x * per_thread;
    const int last = min(first + per_thread, n_experts);
    // The launcher guarantees N < 2^31, so counts fit an int (32-bit division).
    int local = 0;
    for (int e = first; e < last; ++e) local += tiles_of(offsets[e + 1] - offsets[e], block_rows);
    scan[threadIdx.x] = local;
    __syncthreads();
    for (int stride = 1; stride < THREADS; stride *= 2) {
        const int add = threadIdx.x >= stride ? scan[threadIdx.x - stride] : 0;
        __syncthreads();
        scan[threadIdx.x] += add;
        __syncthreads();
    }
    int running = scan[threadIdx.x] - local;  // exclusive prefix
    for (int e = first; e < last; ++e) {
        tile_starts[e] = running;
        running += tiles_of(offsets[e + 1] - offsets[e], block_rows);
    }
    if (threadIdx.x == THREADS - 1) tile_starts[n_experts] = scan[THREADS - 1];
}

struct RowTile {
    long long row_begin;  // first row of the tile in the (N, .) matrices
    int rows;             // rows of the tile that belong to the expert, 1..block_rows
    int expert;
};

// Block blockIdx.x's expert and rows; false for blocks past the last tile.
__device__ __forceinline__ bool find_row_tile(const long long* __restrict__ offsets,
                                              const int* __restrict__ tile_starts, int n_experts,
                                              int block_rows, RowTile& tile) {
    const int index = blockIdx.x;
    if (index >= tile_starts[n_experts]) return false;
    // Invariant: tile_starts[lo] <= index < tile_starts[hi]. Empty experts have
    // tile_starts[e] == tile_starts[e + 1], so the search lands on a non-empty one.
    int lo = 0, hi = n_experts;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (tile_starts[mid] <= index) lo = mid; else hi = mid;
    }
    const long long begin = offsets[lo];
    const long long end = offsets[lo + 1];
    tile.row_begin = begin + static_cast<long long>(index - tile_starts[lo]) * block_rows;
    tile.rows = clamp_count(end - tile.row_begin, block_rows);
    tile.expert = lo;
    return true;
}

// ---------------------------------------------------------------------------
// v1: naive. One thread per output element; the reference's loop over k.

template <typename T, bool GATE, bool ACT>
__device__ __forceinline__ void v1_element(const T* __restrict__ A, const long long* __restrict__ offsets,
                                           int n_experts, const T* __restrict__ B,
                                           const T* __restrict__ B_gate, T* __restrict__ C, int K,
                                           int n_cols) {
    const long long row = blockIdx.x;
    const int col = blockIdx.y * V1_BLOCK_COLS + threadIdx.x;
    if (col >= n_cols) return;
    int lo = 0, hi = n_experts;  // offsets[lo] <= row < offsets[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (offsets[mid] <= row) lo = mid; else hi = mid;
    }
    const T* a = A + row * K;
    const size_t expert_offset = static_cast<size_t>(lo) * K * n_cols + col;
    const T* b = B + expert_offset;
    const T* g = B_gate + expert_offset;
    float h = 0.0f, gate = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float x = to_float(a[k]);
        h = fmaf(x, to_float(b[static_cast<size_t>(k) * n_cols]), h);
        if constexpr (GATE) gate = fmaf(x, to_float(g[static_cast<size_t>(k) * n_cols]), gate);
    }
    C[row * n_cols + col] = from_float<T>(ACT ? activate(h, gate) : h);
}

extern "C" __global__ void __launch_bounds__(V1_BLOCK_COLS)
expert_mlp_v1_hidden_f32(const float* rows, const long long* offsets, int n_experts, const float* w1,
                         const float* w3, float* hidden, int d_model, int d_ff) {
    v1_element<float, GATED, true>(rows, offsets, n_experts, w1, w3, hidden, d_model, d_ff);
}

extern "C" __global__ void __launch_bounds__(V1_BLOCK_COLS)
expert_mlp_v1_out_f32(const float* hidden, const long long* offsets, int n_experts, const float* w2,
                      float* out, int d_ff, int d_model) {
    v1_element<float, false, false>(hidden, offsets, n_experts, w2, w2, out, d_ff, d_model);
}

extern "C" __global__ void __launch_bounds__(V1_BLOCK_COLS)
expert_mlp_v1_hidden_f16(const __half* rows, const long long* offsets, int n_experts, const __half* w1,
                         const __half* w3, __half* hidden, int d_model, int d_ff) {
    v1_element<__half, GATED, true>(rows, offsets, n_experts, w1, w3, hidden, d_model, d_ff);
}

extern "C" __global__ void __launch_bounds__(V1_BLOCK_COLS)
expert_mlp_v1_out_f16(const __half* hidden, const long long* offsets, int n_experts, const __half* w2,
                      __half* out, int d_ff, int d_model) {
    v1_element<__half, false, false>(hidden, offsets, n_experts, w2, w2, out, d_ff, d_model);
}

// ---------------------------------------------------------------------------
// v2: float32 tiled SGEMM. Block tile 128 rows (one expert) x BN columns, BK = 16.
// Shared: A transposed (a_tile[k][row]) so a thread's 8 rows are two float4 reads;
// B as is. Thread (ty, tx) = (tid / 16, tid % 16) owns rows {ty*4 + i, 64 + ty*4 + i}
// and columns {tx*4 + j, 64 + tx*4 + j} (gated: {tx*4 + j} of w1 and of w3).
// Global loads for tile k+1 go to registers during the FMAs of tile k, then to the
// other shared buffer: one barrier per k tile.

template <bool GATE, bool ACT>
__device__ __forceinline__ void v2_block(const float* __restrict__ A, const long long* __restrict__ offsets,
                                         const int* __restrict__ tile_starts, int n_experts,
                                         const float* __restrict__ B, const float* __restrict__ B_gate,
                                         float* __restrict__ C, int K, int n_cols) {
    constexpr int BM = V2_BLOCK_ROWS;
    constexpr int BK = 16;
    constexpr int BN = GATE ? V2_BLOCK_COLS_GATED : V2_BLOCK_COLS;
    constexpr int TN = GATE ? 4 : 8;        // columns per thread per matrix
    constexpr int B_LOADS = GATE ? 1 : 2;   // float4 chunks of a B tile per thread
    constexpr int GATE_BN = GATE ? BN : 4;  // keeps the unused gate buffer tiny
    __shared__ __align__(16) float a_tile[2][BK][BM];
    __shared__ __align__(16) float b_tile[2][BK][BN];
    __shared__ __align__(16) float g_tile[2][BK][GATE_BN];

    RowTile tile;
    if (!find_row_tile(offsets, tile_starts, n_experts, BM, tile)) return;
    const int col0 = blockIdx.y * BN;
    const int tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;

    const float* a_base = A + tile.row_begin * K;
    const size_t expert_offset = static_cast<size_t>(tile.expert) * K * n_cols;
    const float* b_base = B + expert_offset;
    const float* g_base = B_gate + expert_offset;

    // Load mapping. A: chunk i = tid + 256 p -> row i / 4, k (i % 4) * 4 (4 threads
    // read 64 contiguous bytes of a row). B: row k, 4 columns; a warp reads 512 (gated
    // 256) contiguous bytes of a weight row.
    int a_row[2], a_k[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
        const int i = tid + THREADS * p;
        a_row[p] = i >> 2;
        a_k[p] = (i & 3) * 4;
    }
    int b_k[B_LOADS], b_n[B_LOADS];
#pragma unroll
    for (int p = 0; p < B_LOADS; ++p) {
        const int i = tid + THREADS * p;
        b_k[p] = GATE ? (i >> 4) : (i >> 5);
        b_n[p] = GATE ? (i & 15) * 4 : (i & 31) * 4;
    }

    float a_stage[2][4], b_stage[B_LOADS][4], g_stage[B_LOADS][4];
    auto load_global = [&](int k0) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            const int valid = a_row[p] < tile.rows ? clamp_count(static_cast<long long>(K) - k0 - a_k[p], 4) : 0;
            load_chunk(a_base + static_cast<size_t>(a_row[p]) * K + k0 + a_k[p], valid, a_stage[p]);
        }
#pragma unroll
        for (int p = 0; p < B_LOADS; ++p) {
            const int k = k0 + b_k[p];
            const int valid = k < K ? clamp_count(static_cast<long long>(n_cols) - col0 - b_n[p], 4) : 0;
            const size_t at = static_cast<size_t>(k) * n_cols + col0 + b_n[p];
            load_chunk(b_base + at, valid, b_stage[p]);
            if constexpr (GATE) load_chunk(g_base + at, valid, g_stage[p]);
        }
    };
    auto store_shared = [&](int s) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
#pragma unroll
            for (int c = 0; c < 4; ++c) a_tile[s][a_k[p] + c][a_row[p]] = a_stage[p][c];
        }
#pragma unroll
        for (int p = 0; p < B_LOADS; ++p) {
            *reinterpret_cast<float4*>(&b_tile[s][b_k[p]][b_n[p]]) =
                make_float4(b_stage[p][0], b_stage[p][1], b_stage[p][2], b_stage[p][3]);
            if constexpr (GATE)
                *reinterpret_cast<float4*>(&g_tile[s][b_k[p]][b_n[p]]) =
                    make_float4(g_stage[p][0], g_stage[p][1], g_stage[p][2], g_stage[p][3]);
        }
    };

    float acc[8][TN];
    float gacc[8][GATE ? TN : 1];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
#pragma unroll
        for (int j = 0; j < (GATE ? TN : 1); ++j) gacc[i][j] = 0.0f;
    }

    const int k_tiles = (K + BK - 1) / BK;
    if (k_tiles > 0) {
        load_global(0);
        store_shared(0);
    }
    __syncthreads();
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int s = kt & 1;
        const bool more = kt + 1 < k_tiles;
        if (more) load_global((kt + 1) * BK);  // in flight during the FMAs below
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float a[8], b[TN], g[TN];
            const float4 a_lo = *reinterpret_cast<const float4*>(&a_tile[s][k][ty * 4]);
            const float4 a_hi = *reinterpret_cast<const float4*>(&a_tile[s][k][64 + ty * 4]);
            a[0] = a_lo.x; a[1] = a_lo.y; a[2] = a_lo.z; a[3] = a_lo.w;
            a[4] = a_hi.x; a[5] = a_hi.y; a[6] = a_hi.z; a[7] = a_hi.w;
            const float4 b_lo = *reinterpret_cast<const float4*>(&b_tile[s][k][tx * 4]);
            b[0] = b_lo.x; b[1] = b_lo.y; b[2] = b_lo.z; b[3] = b_lo.w;
            if constexpr (GATE) {
                const float4 g_lo = *reinterpret_cast<const float4*>(&g_tile[s][k][tx * 4]);
                g[0] = g_lo.x; g[1] = g_lo.y; g[2] = g_lo.z; g[3] = g_lo.w;
            } else {
                const float4 b_hi = *reinterpret_cast<const float4*>(&b_tile[s][k][64 + tx * 4]);
                b[4] = b_hi.x; b[5] = b_hi.y; b[6] = b_hi.z; b[7] = b_hi.w;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
#pragma unroll
                for (int j = 0; j < TN; ++j) {
                    acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
                    if constexpr (GATE) gacc[i][j] = fmaf(a[i], g[j], gacc[i][j]);
                }
            }
        }
        if (more) store_shared(s ^ 1);  // that buffer was last read before the previous barrier
        __syncthreads();
    }

    // Epilogue: activation (hidden) or none (out), float4 stores where aligned.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int local_row = i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4);
        if (local_row >= tile.rows) continue;
        float* c_row = C + (tile.row_begin + local_row) * n_cols;
#pragma unroll
        for (int h = 0; h < TN / 4; ++h) {
            const int col = col0 + h * 64 + tx * 4;
            const int valid = clamp_count(static_cast<long long>(n_cols) - col, 4);
            float v[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                v[c] = acc[i][h * 4 + c];
                if constexpr (GATE) v[c] = activate(v[c], gacc[i][h * 4 + c]);
                else if constexpr (ACT) v[c] = activate(v[c], 0.0f);
            }
#if VECTOR_LOADS
            if (valid >= 4) {
                *reinterpret_cast<float4*>(c_row + col) = make_float4(v[0], v[1], v[2], v[3]);
                continue;
            }
#endif
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (c < valid) c_row[col + c] = v[c];
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
expert_mlp_v2_hidden_f32(const float* rows, const long long* offsets, const int* tile_starts, int n_experts,
                         const float* w1, const float* w3, float* hidden, int d_model, int d_ff) {
    v2_block<GATED, true>(rows, offsets, tile_starts, n_experts, w1, w3, hidden, d_model, d_ff);
}

extern "C" __global__ void __launch_bounds__(THREADS)
expert_mlp_v2_out_f32(const float* hidden, const long long* offsets, const int* tile_starts, int n_experts,
                      const float* w2, float* out, int d_ff, int d_model) {
    v2_block<false, false>(hidden, offsets, tile_starts, n_experts, w2, w2, out, d_ff, d_model);
}

// ---------------------------------------------------------------------------
// v3: float16 on tensor cores. mma.sync.m16n8k16 row.col, float32 accumulators.
// Fragment layouts (PTX ISA, "matrix fragments for mma.m16n8k16"), g = lane / 4,
// t = lane % 4: A regs {(g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)};
// B regs {(k 2t.., n g), (k 2t+8.., n g)}; C {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
// ldmatrix.x4 on row-major A, lane l addressing row l % 16, k (l / 16) * 8, yields
// exactly the A regs; ldmatrix.x4.trans on row-major B ([k][n]), lane l addressing
// k l % 16, n (l / 16) * 8, yields the B regs of two n-tiles of 8.

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const __half* p) {
#if HAS_SM80_PTX
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p))
                 : "memory");  // reads shared memory that plain stores may have written
#else
    __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const __half* p) {
#if HAS_SM80_PTX
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p))
                 : "memory");  // reads shared memory that plain stores may have written
#else
    __trap();
#endif
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if HAS_SM80_PTX
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

// 8 halves from global p into shared dst; elements [valid, 8) are zero.
// VECTOR_LOADS: cp.async with a source size (zero fill), p 16-byte aligned, and
// `fallback` (any readable address) stands in for p when nothing is read.
__device__ __forceinline__ void copy_chunk8(__half* dst, const __half* p, int valid, const __half* fallback) {
#if VECTOR_LOADS
    const int bytes = 2 * (valid < 0 ? 0 : (valid > 8 ? 8 : valid));
    const __half* src = bytes > 0 ? p : fallback;
#if HAS_SM80_PTX
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                 "r"(bytes)
                 : "memory");
#else
    (void)src;
    __trap();
#endif
#else
    (void)fallback;
    unsigned short bits[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) bits[c] = c < valid ? __half_as_ushort(p[c]) : static_cast<unsigned short>(0);
    uint4 packed;
    packed.x = bits[0] | (static_cast<unsigned>(bits[1]) << 16);
    packed.y = bits[2] | (static_cast<unsigned>(bits[3]) << 16);
    packed.z = bits[4] | (static_cast<unsigned>(bits[5]) << 16);
    packed.w = bits[6] | (static_cast<unsigned>(bits[7]) << 16);
    *reinterpret_cast<uint4*>(dst) = packed;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if HAS_SM80_PTX
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    __trap();
#endif
}

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#if HAS_SM80_PTX
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#else
    __trap();
#endif
}

template <bool GATE, bool ACT>
__device__ __forceinline__ void v3_block(const __half* __restrict__ A, const long long* __restrict__ offsets,
                                         const int* __restrict__ tile_starts, int n_experts,
                                         const __half* __restrict__ B, const __half* __restrict__ B_gate,
                                         __half* __restrict__ C, int K, int n_cols) {
    constexpr int BM = V3_BLOCK_ROWS;
    constexpr int BK = 32;
    constexpr int BN = GATE ? V3_BLOCK_COLS_GATED : V3_BLOCK_COLS;  // per matrix
    constexpr int A_PITCH = BK + 8;  // +16 bytes: ldmatrix rows fall in distinct banks
    constexpr int B_PITCH = BN + 8;
    constexpr int WARP_N = BN / 4;        // columns per warp per matrix: 32 or 16
    constexpr int N_TILES = WARP_N / 8;   // mma n-tiles per warp per matrix: 4 or 2
    constexpr int B_CHUNKS = BK * BN / 8 / THREADS;  // 16-byte chunks per thread per matrix: 2 or 1
    constexpr int COLS_CHUNKS = BN / 8;   // chunks per B row
    constexpr int G_ROWS = GATE ? BK : 1;
    constexpr int G_PITCH = GATE ? B_PITCH : 8;
    __shared__ __align__(128) __half a_tile[2][BM][A_PITCH];
    __shared__ __align__(128) __half b_tile[2][BK][B_PITCH];
    __shared__ __align__(128) __half g_tile[2][G_ROWS][G_PITCH];

    RowTile tile;
    if (!find_row_tile(offsets, tile_starts, n_experts, BM, tile)) return;
    const int col0 = blockIdx.y * BN;
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int warp_m = warp >> 2;  // 0..1: rows warp_m * 64 ..
    const int warp_n = warp & 3;   // 0..3: columns warp_n * WARP_N ..

    const __half* a_base = A + tile.row_begin * K;
    const size_t expert_offset = static_cast<size_t>(tile.expert) * K * n_cols;
    const __half* b_base = B + expert_offset;
    const __half* g_base = B_gate + expert_offset;

    // Copy mapping: A chunk i = tid + 256 p -> k (i % 4) * 8 of a row of the 8-row
    // group i / 32: the 8 lanes of quarter-warp q write rows q and q + 4 of it, 64
    // bytes each. At the 80-byte pitch rows q and q + 4 start 16 banks apart, so the
    // 16-byte shared writes are conflict-free (rows q and q + 1 would share 4 banks);
    // the warp still reads 8 whole 64-byte row pieces of global memory. B chunk
    // i -> k i / COLS_CHUNKS, column (i % COLS_CHUNKS) * 8.
    auto load_stage = [&](int s, int k0) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            const int i = tid + THREADS * p;
            const int row = (i >> 5) * 8 + ((i >> 3) & 3) + 4 * ((i >> 2) & 1), k = (i & 3) * 8;
            const int valid = row < tile.rows ? clamp_count(static_cast<long long>(K) - k0 - k, 8) : 0;
            copy_chunk8(&a_tile[s][row][k], a_base + static_cast<size_t>(row) * K + k0 + k, valid, A);
        }
#pragma unroll
        for (int p = 0; p < B_CHUNKS; ++p) {
            const int i = tid + THREADS * p;
            const int k = i / COLS_CHUNKS, n = (i % COLS_CHUNKS) * 8;
            const int valid = k0 + k < K ? clamp_count(static_cast<long long>(n_cols) - col0 - n, 8) : 0;
            const size_t at = static_cast<size_t>(k0 + k) * n_cols + col0 + n;
            copy_chunk8(&b_tile[s][k][n], b_base + at, valid, B);
            if constexpr (GATE) copy_chunk8(&g_tile[s][k][n], g_base + at, valid, B_gate);
        }
    };

    float acc[4][N_TILES][4];
    float gacc[4][GATE ? N_TILES : 1][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < N_TILES; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
#pragma unroll
        for (int j = 0; j < (GATE ? N_TILES : 1); ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) gacc[i][j][r] = 0.0f;
    }

    const int k_tiles = (K + BK - 1) / BK;
    if (k_tiles > 0) load_stage(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int s = kt & 1;
        if (kt + 1 < k_tiles) {
            load_stage(s ^ 1, (kt + 1) * BK);  // that buffer was last read before the previous barrier
            cp_async_commit();
            cp_async_wait<1>();  // this thread's copies of tile kt have landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // ... and everyone's
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a_frag[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                ldmatrix_x4(a_frag[i], &a_tile[s][warp_m * 64 + i * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
            unsigned b_frag[N_TILES][2], g_frag[GATE ? N_TILES : 1][2];
#pragma unroll
            for (int jj = 0; jj < N_TILES / 2; ++jj) {
                const int k = kk + (lane & 15);
                const int n = warp_n * WARP_N + jj * 16 + (lane >> 4) * 8;
                unsigned r[4];
                ldmatrix_x4_trans(r, &b_tile[s][k][n]);
                b_frag[2 * jj][0] = r[0]; b_frag[2 * jj][1] = r[1];
                b_frag[2 * jj + 1][0] = r[2]; b_frag[2 * jj + 1][1] = r[3];
                if constexpr (GATE) {
                    ldmatrix_x4_trans(r, &g_tile[s][k][n]);
                    g_frag[2 * jj][0] = r[0]; g_frag[2 * jj][1] = r[1];
                    g_frag[2 * jj + 1][0] = r[2]; g_frag[2 * jj + 1][1] = r[3];
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < N_TILES; ++j) {
                    mma_16816(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
                    if constexpr (GATE) mma_16816(gacc[i][j], a_frag[i], g_frag[j][0], g_frag[j][1]);
                }
            }
        }
        __syncthreads();  // all reads of buffer s done before it is refilled
    }

    // Epilogue from the accumulators: lane (g, t) owns rows g and g + 8 of each
    // 16-row tile, columns 2t and 2t + 1 of each 8-column tile.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int half_row = 0; half_row < 2; ++half_row) {
            const int local_row = warp_m * 64 + i * 16 + g + half_row * 8;
            unsigned pairs[N_TILES];  // columns j * 8 + 2t, +1 as two halves
#pragma unroll
            for (int j = 0; j < N_TILES; ++j) {
                float v0 = acc[i][j][half_row * 2];
                float v1 = acc[i][j][half_row * 2 + 1];
                if constexpr (GATE) {
                    v0 = activate(v0, gacc[i][j][half_row * 2]);
                    v1 = activate(v1, gacc[i][j][half_row * 2 + 1]);
                } else if constexpr (ACT) {
                    v0 = activate(v0, 0.0f);
                    v1 = activate(v1, 0.0f);
                }
                pairs[j] = __half_as_ushort(__float2half_rn(v0)) |
                           (static_cast<unsigned>(__half_as_ushort(__float2half_rn(v1))) << 16);
            }
#if VECTOR_LOADS
            // The 4 lanes of a row swap pairs (a 4 x N_TILES transpose, 4 shuffles) so
            // that lane t holds N_TILES consecutive pairs, columns 2 N_TILES t ..: one
            // 16-byte (or 8-byte) store per lane, whole sectors per row, instead of 4-byte
            // stores that fill half of each sector. Every lane shuffles; the row bound
            // only guards the store.
            unsigned run[N_TILES] = {};
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int partner = t ^ r;
                // partner's pairs q = partner * N_TILES + m lie in tile q / 4 at lane q % 4.
                const int send_tile = partner * N_TILES / 4;
                unsigned send = pairs[0];
#pragma unroll
                for (int j = 1; j < N_TILES; ++j) send = send_tile == j ? pairs[j] : send;
                const unsigned got = __shfl_xor_sync(0xffffffffu, send, r);
                const int m = (partner - t * N_TILES) & 3;  // which of my pairs partner held
#pragma unroll
                for (int mm = 0; mm < N_TILES; ++mm) run[mm] = m == mm ? got : run[mm];
            }
            const int col = col0 + warp_n * WARP_N + t * 2 * N_TILES;
            // VECTOR_LOADS: n_cols is a multiple of 8, so a lane's run is all in or all out.
            if (local_row < tile.rows && col < n_cols) {
                __half* at = C + (tile.row_begin + local_row) * n_cols + col;
                if constexpr (N_TILES == 4) *reinterpret_cast<uint4*>(at) = make_uint4(run[0], run[1], run[2], run[3]);
                else *reinterpret_cast<uint2*>(at) = make_uint2(run[0], run[1]);
            }
#else
            if (local_row >= tile.rows) continue;
            __half* c_row = C + (tile.row_begin + local_row) * n_cols;
#pragma unroll
            for (int j = 0; j < N_TILES; ++j) {
                const int col = col0 + warp_n * WARP_N + j * 8 + t * 2;
                const int valid = clamp_count(static_cast<long long>(n_cols) - col, 2);
                if (valid > 0) c_row[col] = __ushort_as_half(static_cast<unsigned short>(pairs[j] & 0xffffu));
                if (valid > 1) c_row[col + 1] = __ushort_as_half(static_cast<unsigned short>(pairs[j] >> 16));
            }
#endif
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
expert_mlp_v3_hidden_f16(const __half* rows, const long long* offsets, const int* tile_starts, int n_experts,
                         const __half* w1, const __half* w3, __half* hidden, int d_model, int d_ff) {
    v3_block<GATED, true>(rows, offsets, tile_starts, n_experts, w1, w3, hidden, d_model, d_ff);
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
expert_mlp_v3_out_f16(const __half* hidden, const long long* offsets, const int* tile_starts, int n_experts,
                      const __half* w2, __half* out, int d_ff, int d_model) {
    v3_block<false, false>(hidden, offsets, tile_starts, n_experts, w2, w2, out, d_ff, d_model);
}

// ---------------------------------------------------------------------------
// decode: few rows per expert; streams the weights. Block (x, e) = expert e (grid.y)
// x columns [x * SLICE, (x + 1) * SLICE), SLICE = LANES * (16 bytes of T). Lane l of
// warp w: row group l / LANES, column chunk l % LANES; it reads weight rows
// k = w * GROUPS + l / LANES + K_STEP * i, so each weight row's slice is one
// coalesced LANES x 16-byte read. Its partial sums for DECODE_ROWS rows stay in
// registers; shuffles add the GROUPS row groups of a warp, shared memory the 8 warps.

template <typename T, bool GATE, bool ACT, int LANES>
__device__ __forceinline__ void decode_block(const T* __restrict__ A, const long long* __restrict__ offsets,
                                             const T* __restrict__ B, const T* __restrict__ B_gate,
                                             T* __restrict__ C, int K, int n_cols) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr int SLICE = LANES * VEC;
    constexpr int GROUPS = 32 / LANES;
    constexpr int WARPS = THREADS / 32;
    constexpr int K_STEP = WARPS * GROUPS;
    constexpr int R = DECODE_ROWS;
    constexpr int GV = GATE ? VEC : 1;
    __shared__ float partial[WARPS][R][SLICE];
    __shared__ float gate_partial[GATE ? WARPS : 1][GATE ? R : 1][GATE ? SLICE : 1];

    const int expert = blockIdx.y;
    const long long begin = offsets[expert];
    const long long count = offsets[expert + 1] - begin;
    if (count <= 0) return;  // an unselected expert's weights are never read

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = lane / LANES, sub = lane % LANES;
    const int slice0 = blockIdx.x * SLICE;
    const int col = slice0 + sub * VEC;
    const int col_valid = clamp_count(static_cast<long long>(n_cols) - col, VEC);
    const size_t expert_offset = static_cast<size_t>(expert) * K * n_cols + col;
    const T* b_base = B + expert_offset;
    const T* g_base = B_gate + expert_offset;
    const int k_first = warp * GROUPS + group;

    for (long long pass = 0; pass < count; pass += R) {
        const int rows_here = clamp_count(count - pass, R);
        const T* a_rows = A + (begin + pass) * K;
        float acc[R][VEC], gacc[R][GV];
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[r][v] = 0.0f;
#pragma unroll
            for (int v = 0; v < GV; ++v) gacc[r][v] = 0.0f;
        }
#pragma unroll 4
        for (int k = k_first; k < K; k += K_STEP) {
            float w[VEC], gw[VEC];
            load_chunk(b_base + static_cast<size_t>(k) * n_cols, col_valid, w);
            if constexpr (GATE) load_chunk(g_base + static_cast<size_t>(k) * n_cols, col_valid, gw);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (r < rows_here) {
                    const float x = to_float(a_rows[static_cast<size_t>(r) * K + k]);
#pragma unroll
                    for (int v = 0; v < VEC; ++v) {
                        acc[r][v] = fmaf(x, w[v], acc[r][v]);
                        if constexpr (GATE) gacc[r][v] = fmaf(x, gw[v], gacc[r][v]);
                    }
                }
            }
        }
        // Lanes with the same column chunk (same `sub`) differ in the bits >= LANES.
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
#pragma unroll
                for (int offset = LANES; offset < 32; offset <<= 1) {
                    acc[r][v] += __shfl_xor_sync(0xffffffffu, acc[r][v], offset);
                    if constexpr (GATE) gacc[r][v] += __shfl_xor_sync(0xffffffffu, gacc[r][v], offset);
                }
            }
        }
        if (group == 0) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int v = 0; v < VEC; ++v) {
                    partial[warp][r][sub * VEC + v] = acc[r][v];
                    if constexpr (GATE) gate_partial[warp][r][sub * VEC + v] = gacc[r][v];
                }
            }
        }
        __syncthreads();
        for (int index = threadIdx.x; index < R * SLICE; index += THREADS) {
            const int r = index / SLICE, c = index % SLICE;
            if (r < rows_here && slice0 + c < n_cols) {
                float h = 0.0f, gate = 0.0f;
#pragma unroll
                for (int w = 0; w < WARPS; ++w) {
                    h += partial[w][r][c];
                    if constexpr (GATE) gate += gate_partial[w][r][c];
                }
                C[(begin + pass + r) * n_cols + slice0 + c] = from_float<T>(ACT ? activate(h, gate) : h);
            }
        }
        __syncthreads();  // `partial` is rewritten by the next pass
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
expert_mlp_decode_hidden_f32(const float* rows, const long long* offsets, const float* w1, const float* w3,
                             float* hidden, int d_model, int d_ff) {
    decode_block<float, GATED, true, DECODE_HIDDEN_LANES>(rows, offsets, w1, w3, hidden, d_model, d_ff);
}

extern "C" __global__ void __launch_bounds__(THREADS)
expert_mlp_decode_out_f32(const float* hidden, const long long* offsets, const float* w2, float* out, int d_ff,
                          int d_model) {
    decode_block<float, false, false, DECODE_OUT_LANES>(hidden, offsets, w2, w2, out, d_ff, d_model);
}

extern "C" __global__ void __launch_bounds__(THREADS)
expert_mlp_decode_hidden_f16(const __half* rows, const long long* offsets, const __half* w1, const __half* w3,
                             __half* hidden, int d_model, int d_ff) {
    decode_block<__half, GATED, true, DECODE_HIDDEN_LANES>(rows, offsets, w1, w3, hidden, d_model, d_ff);
}

extern "C" __global__ void __launch_bounds__(THREADS)
expert_mlp_decode_out_f16(const __half* hidden, const long long* offsets, const __half* w2, __half* out,
                          int d_ff, int d_model) {
    decode_block<__half, false, false, DECODE_OUT_LANES>(hidden, offsets, w2, w2, out, d_ff, d_model);
}
