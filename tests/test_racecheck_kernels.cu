// Kernels that race or do not, for tests/test_racecheck.py. Each access the tests
// name is on a line marked `// site: <name>`; the test finds the line by its marker
// and checks that the emulated racecheck reports (or does not report) that line,
// with the threads and the address the comment beside each kernel works out.

// A shared counter every thread increments: a non-atomic read-modify-write of one
// word by all threads (races), or atomicAdd (does not). The zeroing and the final
// read are ordered by the barriers.
extern "C" __global__ void shared_counter(int use_atomic, int* out) {
    __shared__ int counter;
    if (threadIdx.x == 0) counter = 0;  // site: counter_zero
    __syncthreads();
    if (use_atomic) {
        atomicAdd(&counter, 1);  // site: counter_atomic
    } else {
        counter += 1;  // site: counter_plain
    }
    __syncthreads();
    if (threadIdx.x == 0) out[0] = counter;  // site: counter_result
}

// 64 threads (two warps): thread t writes s[t], then reads s[63 - t], which a thread
// of the other warp wrote. Without the barrier between (barrier = 0) that read races
// with the write; with it (barrier = 1) it does not.
extern "C" __global__ void exchange_across_warps(int barrier, float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;  // site: exchange_write
    if (barrier) __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];  // site: exchange_read
}

// Double buffering as the v2 expert kernel does it: tile i + 1 is stored into the
// buffer that tile i - 1 was read from while tile i is read, one barrier per tile.
// same_buffer = 1 stores into the buffer being read (a broken double buffer: races).
extern "C" __global__ void double_buffer(const float* in, int tiles, int same_buffer, float* out) {
    __shared__ float buffer[2][64];
    const int t = threadIdx.x;
    buffer[0][t] = in[t];  // site: buffer_first
    __syncthreads();
    float sum = 0.0f;
    for (int i = 0; i < tiles; ++i) {
        const int s = i & 1;
        for (int j = 0; j < 64; ++j) sum += buffer[s][(t + j) & 63];  // site: buffer_read
        if (i + 1 < tiles) buffer[same_buffer ? s : s ^ 1][t] = in[(i + 1) * 64 + t];  // site: buffer_store
        __syncthreads();
    }
    out[t] = sum;
}

// A shared table written once, then read by every thread many times: reads never race.
extern "C" __global__ void read_only_table(float* out) {
    __shared__ float table[32];
    if (threadIdx.x < 32) table[threadIdx.x] = 0.5f * threadIdx.x;
    __syncthreads();
    float sum = 0.0f;
    for (int i = 0; i < 32; ++i) sum += table[(threadIdx.x + i) & 31];  // site: table_read
    out[threadIdx.x] = sum;
}

// One warp: lane l writes s[l], the lanes of `mask` meet at __syncwarp(mask), then
// lane l reads s[l ^ 16], written by the other half-warp. A full mask orders every
// write before every read; mask 0x0000ffff lets only lanes 0-15 sync among themselves,
// so each read of the other half races with that half's write.
extern "C" __global__ void syncwarp_exchange(unsigned mask, int* out) {
    __shared__ int s[32];
    const int lane = threadIdx.x & 31;
    s[lane] = lane * 10;  // site: warp_write
    if (mask >> lane & 1u) __syncwarp(mask);
    out[lane] = s[lane ^ 16];  // site: warp_read
}

// Registers exchanged by shuffles and votes are not memory: no hazard. A shuffle does
// not order shared memory either (only __syncwarp does): with through_shared = 1, lane l
// also reads s[l ^ 1] after a shuffle, which races with lane l ^ 1's write.
extern "C" __global__ void warp_synchronous(int through_shared, int* out) {
    __shared__ int s[32];
    const int lane = threadIdx.x & 31;
    int value = lane;
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
    const int all = __all_sync(0xffffffffu, value == 496);
    int result = value + (int)__popc(odd) + all;
    if (through_shared) {
        s[lane] = lane;  // site: shuffled_write
        result += __shfl_sync(0xffffffffu, result, 0);
        result += s[lane ^ 1];  // site: shuffled_read
    }
    out[lane] = result;
}

// Global memory across blocks: no barrier orders two blocks. Thread 0 of every block
// writes out[0] (races, between blocks), or adds to it atomically (does not); every
// thread also writes its own element of per_thread (no two accesses share a byte).
extern "C" __global__ void global_across_blocks(int use_atomic, int* out, int* per_thread) {
    per_thread[blockIdx.x * blockDim.x + threadIdx.x] = (int)threadIdx.x;  // site: own_element
    if (threadIdx.x != 0) return;
    if (use_atomic) atomicAdd(out, 1);  // site: global_atomic
    else out[0] = (int)blockIdx.x;  // site: global_store
}

// Global memory within a block is checked like shared memory: thread t writes
// data[t] and reads data[t + 1] (written by thread t + 1) with or without a barrier.
extern "C" __global__ void global_neighbour(int barrier, int* data, int* out) {
    data[threadIdx.x] = (int)threadIdx.x;  // site: neighbour_write
    if (barrier) __syncthreads();
    out[threadIdx.x] = threadIdx.x + 1 < blockDim.x ? data[threadIdx.x + 1] : 0;  // site: neighbour_read
}

// cp.async: thread t copies 16 bytes into tile[t], waits, meets the block at a
// barrier and reads tile[t ^ 1] (no hazard). wait = 0 leaves the copies in flight
// across the barrier: the neighbour's read races with the copy still landing; early =
// 1 reads its own tile[t] before waiting (the thread's own copy has not landed).
extern "C" __global__ void copy_async_tiles(const unsigned short* source, int wait, int early, unsigned short* out) {
    __shared__ __align__(16) unsigned short tile[64][8];
    const int t = threadIdx.x;
    const unsigned target = (unsigned)__cvta_generic_to_shared(&tile[t][0]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(target), "l"(source + 8 * t), "r"(16));  // site: copy_issue
    asm volatile("cp.async.commit_group;\n" ::);
    unsigned short mine = 0;
    if (early) mine = tile[t][0];  // site: copy_early_read
    if (wait) asm volatile("cp.async.wait_group %0;\n" ::"n"(0));
    __syncthreads();
    out[t] = (unsigned short)(tile[t ^ 1][0] + mine);  // site: copy_read
}
