// Helpers shared by the kernel files of the CUDA backend.
//
// Float16 values travel as their raw 16 bits (`half_bits`) and are converted
// with one PTX instruction each way, so that the sources need no header:
// NVRTC (through CuPy) and nvcc compile them alike, and CuPy's kernel cache,
// which hashes the source text, sees everything (the loader pastes this file
// into each source that includes it).
//
// All arithmetic is float32, whatever the storage type.
#pragma once

typedef unsigned short half_bits;

#define FULL_WARP_MASK 0xffffffffu

__device__ __forceinline__ float to_float(float value) { return value; }

__device__ __forceinline__ float to_float(half_bits bits) {
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
    return value;
}

__device__ __forceinline__ void store_float(float* target, float value) { *target = value; }

__device__ __forceinline__ void store_float(half_bits* target, float value) {
    half_bits bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));  // round to nearest even, once
    *target = bits;
}

// Bit tests rather than isfinite/isnan: no header, and no fast-math surprises.
__device__ __forceinline__ bool is_finite(float value) {
    return (__float_as_uint(value) & 0x7f800000u) != 0x7f800000u;
}

__device__ __forceinline__ bool is_nan(float value) {
    return (__float_as_uint(value) & 0x7fffffffu) > 0x7f800000u;
}

__device__ __forceinline__ float negative_infinity() { return __uint_as_float(0xff800000u); }

// Half of a 32-bit word, for unpacking vector loads of float16.
__device__ __forceinline__ float low_half(unsigned int word) { return to_float((half_bits)(word & 0xffffu)); }
__device__ __forceinline__ float high_half(unsigned int word) { return to_float((half_bits)(word >> 16)); }

__device__ __forceinline__ unsigned int pack_halves(float low, float high) {
    half_bits low_bits, high_bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(low_bits) : "f"(low));
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(high_bits) : "f"(high));
    return (unsigned int)low_bits | ((unsigned int)high_bits << 16);
}
