// Kernels that exercise one emulated CUDA feature each, for tests/test_emulator.py.
// They are built by the emulator exactly as kernels/topk_moe/cuda/*.cu are (same rewrites,
// same header), so each test checks the path the real kernels take.

// --- float16 conversions, both ways, through the PTX the kernels use ---------

extern "C" __global__ void half_to_float_all(const unsigned short* bits, float* out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits[i]));
    out[i] = value;
}

extern "C" __global__ void float_to_half_all(const float* values, unsigned short* out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(values[i]));
    out[i] = bits;
}

extern "C" __global__ void fp16_header_round_trip(const float* values, unsigned short* out, float* back, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const __half h = __float2half_rn(values[i]);
    out[i] = __half_as_ushort(h);
    back[i] = __half2float(__ushort_as_half(out[i]));
}

// --- flush to zero (CuPy's -ftz=true) ---------------------------------------

extern "C" __global__ void multiply(const float* a, const float* b, float* out) {
    out[threadIdx.x] = a[threadIdx.x] * b[threadIdx.x];
}

// --- warp collectives: one row of results per lane ---------------------------
// out[lane * 12 + c]: shfl idx (lane 3 - lane ... see the test), up 3, down 5, xor 6,
// xor 1 at width 8, idx at width 16, any, all, ballot, match_any, popc, syncwarp.

extern "C" __global__ void collectives(const int* values, int* out) {
    const int lane = threadIdx.x & 31;
    const int v = values[threadIdx.x];
    int* row = out + threadIdx.x * 12;
    row[0] = __shfl_sync(0xffffffffu, v, 31 - lane);
    row[1] = __shfl_up_sync(0xffffffffu, v, 3);
    row[2] = __shfl_down_sync(0xffffffffu, v, 5);
    row[3] = __shfl_xor_sync(0xffffffffu, v, 6);
    row[4] = __shfl_xor_sync(0xffffffffu, v, 1, 8);
    row[5] = __shfl_sync(0xffffffffu, v, 2, 16);
    row[6] = __any_sync(0xffffffffu, v > 40);
    row[7] = __all_sync(0xffffffffu, v >= 0);
    row[8] = (int)__ballot_sync(0xffffffffu, v & 1);
    row[9] = (int)__match_any_sync(0xffffffffu, v % 3);
    row[10] = __popc(__ballot_sync(0xffffffffu, lane < 7));
    __syncwarp();
    const long long wide = ((long long)v << 40) | lane;
    row[11] = (int)(__shfl_xor_sync(0xffffffffu, wide, 16) >> 40);
}

// --- atomics and a block barrier ---------------------------------------------

extern "C" __global__ void count_and_scan(const int* values, int* counts, int* total) {
    __shared__ int bins[4];
    if (threadIdx.x < 4) bins[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&bins[values[threadIdx.x] & 3], 1);
    __syncthreads();
    if (threadIdx.x < 4) counts[blockIdx.x * 4 + threadIdx.x] = bins[threadIdx.x];
    if (threadIdx.x == 0) atomicAdd(total, blockDim.x);
}

// --- ldmatrix x4 [.trans]: lane l addresses row l % 8 of matrix l / 8 --------
// tile: 32 rows of 8 halves (16 bytes); row_of_lane gives the row each lane addresses.

extern "C" __global__ void ldmatrix_table(const unsigned short* tile, const int* row_of_lane, int trans,
                                          unsigned* out) {
    __shared__ __align__(16) unsigned short rows[32][8];
    const int lane = threadIdx.x;
    for (int c = 0; c < 8; ++c) rows[lane][c] = tile[lane * 8 + c];
    __syncwarp();
    const unsigned address = (unsigned)__cvta_generic_to_shared(&rows[row_of_lane[lane]][0]);
    unsigned r0, r1, r2, r3;
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(address));
    out[lane * 4 + 0] = r0;
    out[lane * 4 + 1] = r1;
    out[lane * 4 + 2] = r2;
    out[lane * 4 + 3] = r3;
}

// --- mma.m16n8k16: registers in, registers out, lane by lane -------------------

extern "C" __global__ void mma_registers(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int lane = threadIdx.x;
    float d0 = c[lane * 4], d1 = c[lane * 4 + 1], d2 = c[lane * 4 + 2], d3 = c[lane * 4 + 3];
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
                 : "r"(a[lane * 4]), "r"(a[lane * 4 + 1]), "r"(a[lane * 4 + 2]), "r"(a[lane * 4 + 3]),
                   "r"(b[lane * 2]), "r"(b[lane * 2 + 1]));
    d[lane * 4] = d0;
    d[lane * 4 + 1] = d1;
    d[lane * 4 + 2] = d2;
    d[lane * 4 + 3] = d3;
}

// --- cp.async: two groups, wait for the older one only ------------------------
// out[0:8] the first 16 bytes after wait_group 1, out[8:16] the second's destination
// at that moment; source_bytes of the second copy are copied, the rest zero-filled.

extern "C" __global__ void copy_async_groups(const unsigned short* source, int source_bytes, unsigned short* out) {
    __shared__ __align__(16) unsigned short landed[2][8];
    const unsigned first = (unsigned)__cvta_generic_to_shared(&landed[0][0]);
    const unsigned second = (unsigned)__cvta_generic_to_shared(&landed[1][0]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(first), "l"(source), "r"(16));
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(second), "l"(source + 8), "r"(source_bytes));
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group %0;\n" ::"n"(1));
    for (int i = 0; i < 8; ++i) out[i] = landed[0][i];
    for (int i = 0; i < 8; ++i) out[8 + i] = landed[1][i];
    asm volatile("cp.async.wait_group %0;\n" ::"n"(0));
    for (int i = 0; i < 8; ++i) out[16 + i] = landed[1][i];
}

// --- faults -------------------------------------------------------------------

extern "C" __global__ void barrier_after_early_exit(int* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void shuffle_with_exited_lanes(int* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

extern "C" __global__ void write_one_past_the_end(float* out, long long n) {
    if (threadIdx.x == 0) out[n] = 1.0f;
}

extern "C" __global__ void misaligned_vector_load(const float* in, float* out) {
    const float4 v = *reinterpret_cast<const float4*>(in + 1);
    out[0] = v.x;
}

extern "C" __global__ void read_shared_before_it_is_written(float* out) {
    __shared__ float values[64];
    values[threadIdx.x] = (float)threadIdx.x;
    // missing __syncthreads: thread t reads what thread 63 - t writes
    out[threadIdx.x] = values[63 - threadIdx.x];
}

extern "C" __global__ void __launch_bounds__(64) bounded(int* out) { out[threadIdx.x] = 1; }

extern "C" __global__ void takes_long_long(long long n, long long* out) { out[0] = n; }
