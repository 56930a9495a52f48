// dispatch.cu: the dispatch plan, a stable counting sort of the assignments by expert.
//
// Assignment a = j * T + t (j-major, the contract's order) goes to expert
// experts[t, j]. Its arrival rank is the number of earlier assignments with the
// same expert; it is kept when rank < C (always when dropless), at row
// offsets[e] + rank. Everything is integer and each output has exactly one
// writer, so the plan is identical bit for bit on every run; no result depends
// on the order in which atomics land.
//
// Kernels, in launch order (a segment is SEGMENT = 32 * DISPATCH_ROUNDS
// consecutive assignments, handled by one warp in rounds of 32, lane = a % 32):
//   dispatch_count_segments  one warp per segment: its arrivals per expert,
//                            counted in the warp's own slice of shared memory
//                            (integer atomics, whose sum is order-free), written
//                            to segment_counts[e, segment].
//   dispatch_scan_segments   one block per expert: exclusive scan of its row of
//                            segment_counts in place (the arrival rank of each
//                            segment's first arrival), and counts[e] = min(arrivals, C).
//   dispatch_offsets         one block: exclusive scan of counts -> offsets (E+1).
//   dispatch_scatter         one warp per segment again: within a round,
//                            __match_any_sync groups the lanes of one expert and
//                            a lane's rank is the number of lower lanes in its
//                            group; earlier rounds are added from the warp's
//                            shared counters, earlier segments from the scan.
//                            Writes row[t, j] (or -1) and token[row].
//
// Dropless plans need no host synchronisation (N = T * K is known); with a
// capacity the launcher reads offsets[E] once to size `token`.

#include "common.cuh"

#ifndef DISPATCH_ROUNDS
#define DISPATCH_ROUNDS 8
#endif

constexpr int SEGMENT = 32 * DISPATCH_ROUNDS;

// The expert of assignment a = j * T + t, and its (t, j).
__device__ __forceinline__ int assignment_expert(const int* __restrict__ experts, long long a, long long n_tokens,
                                                 int k, long long& t, int& j) {
    j = (int)(a / n_tokens);
    t = a - (long long)j * n_tokens;
    return experts[t * k + j];
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32); also
// returns the block's total. Every thread of the block must call it.
__device__ long long block_exclusive_scan(long long value, long long& block_total) {
    __shared__ long long warp_sums[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    long long inclusive = value;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const long long below = __shfl_up_sync(FULL_WARP_MASK, inclusive, offset);
        if (lane >= offset) inclusive += below;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        long long sum = lane < n_warps ? warp_sums[lane] : 0;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const long long below = __shfl_up_sync(FULL_WARP_MASK, sum, offset);
            if (lane >= offset) sum += below;
        }
        warp_sums[lane] = sum;  // inclusive prefix over warps
    }
    __syncthreads();
    const long long warp_prefix = warp > 0 ? warp_sums[warp - 1] : 0;
    block_total = warp_sums[n_warps - 1];
    __syncthreads();  // warp_sums is reused by the next call
    return warp_prefix + inclusive - value;
}

extern "C" __global__ void dispatch_count_segments(const int* __restrict__ experts, long long n_tokens, int k,
                                                   int n_experts, long long n_segments,
                                                   long long* __restrict__ segment_counts) {
    extern __shared__ int warp_counters[];  // (warps per block, n_experts)
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long segment = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    if (segment >= n_segments) return;  // whole warps; no block barrier below
    int* counter = warp_counters + warp * n_experts;
    for (int e = lane; e < n_experts; e += 32) counter[e] = 0;
    __syncwarp();

    const long long n_assignments = n_tokens * k;
#pragma unroll
    for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
        const long long a = segment * SEGMENT + round * 32 + lane;
        if (a < n_assignments) {
            long long t;
            int j;
            atomicAdd(&counter[assignment_expert(experts, a, n_tokens, k, t, j)], 1);
        }
    }
    __syncwarp();
    for (int e = lane; e < n_experts; e += 32) segment_counts[(long long)e * n_segments + segment] = counter[e];
}

extern "C" __global__ void dispatch_scan_segments(long long* __restrict__ segment_counts, long long n_segments,
                                                  long long capacity, long long* __restrict__ counts) {
    const int e = blockIdx.x;
    long long* row = segment_counts + (long long)e * n_segments;
    long long arrivals = 0;
    for (long long base = 0; base < n_segments; base += blockDim.x) {
        const long long segment = base + threadIdx.x;
        const long long count = segment < n_segments ? row[segment] : 0;
        long long chunk_total;
        const long long before = block_exclusive_scan(count, chunk_total);
        if (segment < n_segments) row[segment] = arrivals + before;
        arrivals += chunk_total;
    }
    if (threadIdx.x == 0) counts[e] = (capacity < 0 || arrivals < capacity) ? arrivals : capacity;
}

extern "C" __global__ void dispatch_offsets(const long long* __restrict__ counts, int n_experts,
                                            long long* __restrict__ offsets) {
    long long total = 0;
    for (int base = 0; base < n_experts; base += blockDim.x) {
        const int e = base + threadIdx.x;
        const long long count = e < n_experts ? counts[e] : 0;
        long long chunk_total;
        const long long before = block_exclusive_scan(count, chunk_total);
        if (e < n_experts) offsets[e] = total + before;
        total += chunk_total;
    }
    if (threadIdx.x == 0) offsets[n_experts] = total;
}

extern "C" __global__ void dispatch_scatter(const int* __restrict__ experts, long long n_tokens, int k,
                                            int n_experts, long long n_segments,
                                            const long long* __restrict__ segment_base,
                                            const long long* __restrict__ offsets, long long capacity,
                                            long long* __restrict__ token, long long* __restrict__ row) {
    extern __shared__ int warp_counters[];  // (warps per block, n_experts)
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long segment = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    if (segment >= n_segments) return;
    int* counter = warp_counters + warp * n_experts;  // arrivals in this segment's earlier rounds
    for (int e = lane; e < n_experts; e += 32) counter[e] = 0;
    __syncwarp();

    const long long n_assignments = n_tokens * k;
    const unsigned int lower_lanes = (1u << lane) - 1u;
#pragma unroll 1
    for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
        const long long a = segment * SEGMENT + round * 32 + lane;
        const bool valid = a < n_assignments;
        long long t = 0;
        int j = 0;
        const int e = valid ? assignment_expert(experts, a, n_tokens, k, t, j) : -1;
        const unsigned int same_expert = __match_any_sync(FULL_WARP_MASK, e);
        const int rank_in_round = __popc(same_expert & lower_lanes);
        const int earlier_rounds = valid ? counter[e] : 0;
        __syncwarp();
        if (valid && rank_in_round == 0) counter[e] = earlier_rounds + __popc(same_expert);
        __syncwarp();
        if (valid) {
            const long long arrival = segment_base[(long long)e * n_segments + segment] + earlier_rounds + rank_in_round;
            const bool kept = capacity < 0 || arrival < capacity;
            const long long target = kept ? offsets[e] + arrival : -1;
            row[t * k + j] = target;
            if (kept) token[target] = t;
        }
    }
}
