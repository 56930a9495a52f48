// combine.cu: moving rows between token order and expert order.
//
// Kernels
//   permute_rows_{16,8,4,2}  rows[i, :] = x[token[i], :]. A byte copy, so one
//                            kernel per access width (16, 8, 4 or 2 bytes, the
//                            widest that divides the row and both base
//                            addresses; the launcher picks it) serves every
//                            dtype. One warp per row (grid-stride over rows),
//                            lanes over the row's vectors: coalesced 16-byte
//                            loads and stores whenever the row allows.
//   combine_{f32,f16}_{vector,scalar}
//                            y[t, :] = sum over kept j, in j order, of
//                            weights[t, j] * expert_out[row[t, j], :], in
//                            float32, rounded once to the output type. One warp
//                            per token (grid-stride), lanes over chunks of
//                            4 floats (float4) or 8 halves (16 bytes) in the
//                            vector kernels, single elements in the scalar ones
//                            (rows whose width or address is not 16-byte aligned).
//                            A dropped assignment (row -1) adds nothing; a token
//                            with every assignment dropped gets +0. Each output
//                            element has one writer and a fixed summation order:
//                            no atomics, bitwise reproducible, batch invariant.
//
// All index products (row * width) are 64-bit.

#include "common.cuh"

#define MAX_TOP_K 2

template <typename V>
__device__ __forceinline__ void gather_rows(const V* __restrict__ source, const long long* __restrict__ token,
                                            V* __restrict__ target, long long n_rows, long long row_vectors) {
    const int lane = threadIdx.x & 31;
    const long long warps_in_grid = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long i = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); i < n_rows;
         i += warps_in_grid) {
        const V* from = source + token[i] * row_vectors;
        V* to = target + i * row_vectors;
        for (long long v = lane; v < row_vectors; v += 32) to[v] = from[v];
    }
}

extern "C" __global__ void permute_rows_16(const uint4* source, const long long* token, uint4* target,
                                           long long n_rows, long long row_vectors) {
    gather_rows(source, token, target, n_rows, row_vectors);
}

extern "C" __global__ void permute_rows_8(const uint2* source, const long long* token, uint2* target,
                                          long long n_rows, long long row_vectors) {
    gather_rows(source, token, target, n_rows, row_vectors);
}

extern "C" __global__ void permute_rows_4(const unsigned int* source, const long long* token, unsigned int* target,
                                          long long n_rows, long long row_vectors) {
    gather_rows(source, token, target, n_rows, row_vectors);
}

extern "C" __global__ void permute_rows_2(const unsigned short* source, const long long* token,
                                          unsigned short* target, long long n_rows, long long row_vectors) {
    gather_rows(source, token, target, n_rows, row_vectors);
}

// VEC consecutive elements as floats, and back.
template <int VEC>
__device__ __forceinline__ void load_floats(const float* source, float (&values)[VEC]) {
    if constexpr (VEC == 4) {
        const float4 packed = *reinterpret_cast<const float4*>(source);
        values[0] = packed.x;
        values[1] = packed.y;
        values[2] = packed.z;
        values[3] = packed.w;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) values[i] = source[i];
    }
}

template <int VEC>
__device__ __forceinline__ void load_floats(const half_bits* source, float (&values)[VEC]) {
    if constexpr (VEC == 8) {
        const uint4 packed = *reinterpret_cast<const uint4*>(source);
        values[0] = low_half(packed.x);
        values[1] = high_half(packed.x);
        values[2] = low_half(packed.y);
        values[3] = high_half(packed.y);
        values[4] = low_half(packed.z);
        values[5] = high_half(packed.z);
        values[6] = low_half(packed.w);
        values[7] = high_half(packed.w);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) values[i] = to_float(source[i]);
    }
}

template <int VEC>
__device__ __forceinline__ void store_floats(float* target, const float (&values)[VEC]) {
    if constexpr (VEC == 4) {
        float4 packed;  // members set one by one: no make_float4, which NVRTC may lack
        packed.x = values[0];
        packed.y = values[1];
        packed.z = values[2];
        packed.w = values[3];
        *reinterpret_cast<float4*>(target) = packed;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) target[i] = values[i];
    }
}

template <int VEC>
__device__ __forceinline__ void store_floats(half_bits* target, const float (&values)[VEC]) {
    if constexpr (VEC == 8) {
        uint4 packed;
        packed.x = pack_halves(values[0], values[1]);
        packed.y = pack_halves(values[2], values[3]);
        packed.z = pack_halves(values[4], values[5]);
        packed.w = pack_halves(values[6], values[7]);
        *reinterpret_cast<uint4*>(target) = packed;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) store_float(target + i, values[i]);
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void combine_tokens(const T* __restrict__ expert_out, const T* __restrict__ weights,
                                               const long long* __restrict__ row, long long n_tokens, int k,
                                               long long d_model, T* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const long long warps_in_grid = (long long)gridDim.x * (blockDim.x >> 5);
    const long long n_chunks = d_model / VEC;  // the launcher picks VEC dividing d_model
    for (long long t = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); t < n_tokens;
         t += warps_in_grid) {
        long long source_row[MAX_TOP_K];
        float weight[MAX_TOP_K];
#pragma unroll
        for (int j = 0; j < MAX_TOP_K; ++j) {
            source_row[j] = j < k ? row[t * k + j] : -1;
            weight[j] = source_row[j] >= 0 ? to_float(weights[t * k + j]) : 0.0f;
        }
        for (long long chunk = lane; chunk < n_chunks; chunk += 32) {
            float sum[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) sum[i] = 0.0f;
#pragma unroll
            for (int j = 0; j < MAX_TOP_K; ++j) {
                if (source_row[j] < 0) continue;  // dropped (or j >= k): adds nothing
                float value[VEC];
                load_floats<VEC>(expert_out + source_row[j] * d_model + chunk * VEC, value);
#pragma unroll
                for (int i = 0; i < VEC; ++i) sum[i] = fmaf(weight[j], value[i], sum[i]);
            }
            store_floats<VEC>(y + t * d_model + chunk * VEC, sum);
        }
    }
}

extern "C" __global__ void combine_f32_vector(const float* expert_out, const float* weights, const long long* row,
                                              long long n_tokens, int k, long long d_model, float* y) {
    combine_tokens<float, 4>(expert_out, weights, row, n_tokens, k, d_model, y);
}

extern "C" __global__ void combine_f32_scalar(const float* expert_out, const float* weights, const long long* row,
                                              long long n_tokens, int k, long long d_model, float* y) {
    combine_tokens<float, 1>(expert_out, weights, row, n_tokens, k, d_model, y);
}

extern "C" __global__ void combine_f16_vector(const half_bits* expert_out, const half_bits* weights,
                                              const long long* row, long long n_tokens, int k, long long d_model,
                                              half_bits* y) {
    combine_tokens<half_bits, 8>(expert_out, weights, row, n_tokens, k, d_model, y);
}

extern "C" __global__ void combine_f16_scalar(const half_bits* expert_out, const half_bits* weights,
                                              const long long* row, long long n_tokens, int k, long long d_model,
                                              half_bits* y) {
    combine_tokens<half_bits, 1>(expert_out, weights, row, n_tokens, k, d_model, y);
}
