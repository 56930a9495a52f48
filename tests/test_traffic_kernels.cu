// Kernels with known memory-traffic patterns, for tests/test_traffic.py. Each
// counted access is on a line marked `// site: <name>`; the test finds the line by
// its marker and compares the counts of that site with the pattern's known value.

extern "C" __global__ void read_strided(const float* in, float* out, int stride, int offset) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = in[offset + t * stride];  // site: read_strided
    out[t] = v;  // site: write_coalesced
}

extern "C" __global__ void read_half(const unsigned short* in, unsigned short* out) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    out[t] = in[t];  // site: read_half
}

extern "C" __global__ void read_vector(const float4* in, float4* out, int stride) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const float4 v = in[t * stride];  // site: read_vector
    out[t] = v;
}

// Lane l runs the loop l % 4 + 1 times: its n-th request has the lanes with l % 4 >= n.
extern "C" __global__ void read_divergent(const float* in, float* out) {
    const int lane = threadIdx.x & 31;
    float sum = 0.0f;
    for (int j = 0; j <= lane % 4; ++j) sum += in[j * 32 + lane];  // site: read_divergent
    out[threadIdx.x] = sum;
}

// Every block reads the same 32 floats: 128 distinct bytes, 4 sectors per block.
extern "C" __global__ void read_same_rows(const float* in, float* out) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = in[threadIdx.x];  // site: read_same_rows
}

extern "C" __global__ void shared_strided(float* out, int stride) {
    __shared__ float values[32 * 33];
    for (int i = threadIdx.x; i < 32 * 33; i += blockDim.x) values[i] = (float)i;  // site: shared_fill
    __syncthreads();
    out[threadIdx.x] = values[threadIdx.x * stride];  // site: shared_strided
}

// 8- and 16-byte shared stores, lane l at element l * stride.
extern "C" __global__ void shared_wide(float* out, int stride) {
    __shared__ __align__(16) float4 wide[64];
    __shared__ __align__(16) float2 pairs[64];
    const int lane = threadIdx.x;
    wide[lane * stride] = make_float4(1.0f, 2.0f, 3.0f, (float)lane);  // site: shared_float4
    pairs[lane * stride] = make_float2(1.0f, (float)lane);  // site: shared_float2
    __syncthreads();
    out[lane] = wide[lane * stride].w + pairs[lane * stride].y;
}

// ldmatrix.x4: lane l gives row l % 8 of matrix l / 8 at &tile[l * pitch].
extern "C" __global__ void ldmatrix_pitch(unsigned* out, int pitch) {
    __shared__ __align__(16) unsigned short tile[32 * 72];
    for (int i = threadIdx.x; i < 32 * 72; i += blockDim.x) tile[i] = (unsigned short)i;
    __syncthreads();
    const int lane = threadIdx.x;
    const unsigned address = (unsigned)__cvta_generic_to_shared(&tile[lane * pitch]);
    unsigned r0, r1, r2, r3;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"  // site: ldmatrix
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(address));
    out[lane * 4] = r0;
    out[lane * 4 + 1] = r1;
    out[lane * 4 + 2] = r2;
    out[lane * 4 + 3] = r3;
}

// cp.async: lane l copies 16 bytes from source + 8 l into &tile[l * pitch].
extern "C" __global__ void copy_async_pitch(const unsigned short* source, unsigned short* out, int pitch) {
    __shared__ __align__(16) unsigned short tile[32 * 16];
    const int lane = threadIdx.x;
    const unsigned address = (unsigned)__cvta_generic_to_shared(&tile[lane * pitch]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(source + 8 * lane), "r"(16));  // site: cp_async
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group %0;\n" ::"n"(0));
    __syncthreads();
    out[lane] = tile[lane * pitch];
}

// Shared atomics: lane l adds to counter l % spread.
extern "C" __global__ void shared_atomics(int* out, int spread) {
    __shared__ int counters[32];
    counters[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&counters[threadIdx.x % spread], 1);  // site: shared_atomic
    __syncthreads();
    out[threadIdx.x] = counters[threadIdx.x];
}

// cp.async of a [rows][pitch] tile, 4 lanes per 64-byte row piece: quarter-warp q
// writes rows 2q and 2q + 1 (interleaved = 0) or rows q and q + 4 (interleaved = 1).
extern "C" __global__ void copy_async_tile(const unsigned short* source, unsigned short* out, int pitch,
                                           int interleaved) {
    __shared__ __align__(16) unsigned short tile[8 * 40];
    const int lane = threadIdx.x;
    const int row = interleaved ? ((lane >> 3) & 3) + 4 * ((lane >> 2) & 1) : lane >> 2;
    const unsigned address = (unsigned)__cvta_generic_to_shared(&tile[row * pitch + (lane & 3) * 8]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(source + 8 * lane), "r"(16));  // site: cp_async_tile
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group %0;\n" ::"n"(0));
    __syncthreads();
    out[lane] = tile[lane];
}
