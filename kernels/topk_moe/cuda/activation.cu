// activation.cu: the dense MLP's activation, applied in place between its two
// cuBLAS GEMMs (hidden = x @ w1 is ours to overwrite).
//
// Kernels: activate_{relu,gelu,swiglu}_{f32,f16}. One thread per element,
// grid-stride over n = T * F (64-bit). Arithmetic in float32, stored in the
// hidden's type (rounded once).
//   relu    v < 0 ? 0 : v           (NaN stays NaN, as numpy.maximum keeps it)
//   gelu    0.5 v (1 + erf(v / sqrt 2)), the exact form
//   swiglu  silu(v) * gate = v / (1 + exp(-v)) * gate

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void relu_in_place(T* __restrict__ hidden, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = to_float(hidden[i]);
        store_float(hidden + i, v < 0.0f ? 0.0f : v);
    }
}

template <typename T>
__device__ __forceinline__ void gelu_in_place(T* __restrict__ hidden, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = to_float(hidden[i]);
        store_float(hidden + i, 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f)));
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_in_place(T* __restrict__ hidden, const T* __restrict__ gate, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = to_float(hidden[i]);
        store_float(hidden + i, v / (1.0f + expf(-v)) * to_float(gate[i]));
    }
}

extern "C" __global__ void activate_relu_f32(float* hidden, long long n) { relu_in_place(hidden, n); }
extern "C" __global__ void activate_gelu_f32(float* hidden, long long n) { gelu_in_place(hidden, n); }
extern "C" __global__ void activate_swiglu_f32(float* hidden, const float* gate, long long n) {
    swiglu_in_place(hidden, gate, n);
}

extern "C" __global__ void activate_relu_f16(half_bits* hidden, long long n) { relu_in_place(hidden, n); }
extern "C" __global__ void activate_gelu_f16(half_bits* hidden, long long n) { gelu_in_place(hidden, n); }
extern "C" __global__ void activate_swiglu_f16(half_bits* hidden, const half_bits* gate, long long n) {
    swiglu_in_place(hidden, gate, n);
}
