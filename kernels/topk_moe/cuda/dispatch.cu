// dispatch.cu: the dispatch plan, a stable counting sort of the assignments by expert.
//
// Assignment (t, j) goes to expert experts[t, j]. Its arrival rank is the number
// of assignments with the same expert that come before it in the contract's
// j-major order (a = j * T + t); it is kept when rank < C (always when
// dropless), at row offsets[e] + rank. Everything is integer and each output has
// exactly one writer, so the plan is identical bit for bit on every run; no
// result depends on the order in which atomics land.
//
// Memory order, not rank order. experts and row are (T, k) arrays, element
// i = t * k + j. A segment is SEGMENT = 32 * DISPATCH_ROUNDS consecutive
// elements, handled by one warp in rounds of 32 (lane = i % 32), so every load
// of experts and every store of row is one contiguous run of 32 elements. (Walking
// the assignments in j-major order instead reads every k-th element, and at
// k = 2 touches twice the sectors the arrays hold: issue 21.) The j-major rank
// is recovered by counting each choice j apart: segment_counts is (E, k, segments),
// and a scan along an expert's row, choice by choice, segment by segment, gives
// each (expert, choice, segment) the arrivals that precede it in j-major order.
//
// Kernels, in launch order:
//   dispatch_count_segments  one warp per segment: loads its elements once into
//                            registers, then for each choice j counts the
//                            arrivals per expert in the warp's own slice of shared
//                            memory (integer atomics, whose sum is order-free) and
//                            writes them to segment_counts[e, j, segment].
//   dispatch_scan_segments   one block per expert: exclusive scan of its row of
//                            segment_counts in place (the arrival rank of each
//                            (choice, segment)'s first arrival), and
//                            counts[e] = min(arrivals, C).
//   dispatch_offsets         one block: exclusive scan of counts -> offsets (E+1).
//   dispatch_scatter         one warp per segment again, choice by choice: within a
//                            round, __match_any_sync groups the lanes of one expert
//                            and a lane's rank is the number of lower lanes in its
//                            group (lower lanes hold earlier tokens of the same
//                            choice); earlier rounds are added from the warp's
//                            shared counters, earlier choices and segments from the
//                            scan. Writes token[row] at once and row[t, j] (or -1)
//                            after the last choice, as one contiguous store per round.
//
// Dropless plans need no host synchronisation (N = T * K is known); with a
// capacity the launcher reads offsets[E] once to size `token`.

#include "common.cuh"

#ifndef DISPATCH_ROUNDS
#define DISPATCH_ROUNDS 8
#endif

constexpr int SEGMENT = 32 * DISPATCH_ROUNDS;
constexpr int NO_EXPERT = -1;  // a lane past the last element

// The experts of a segment's elements, one per round in this lane (NO_EXPERT past
// the end): one contiguous 128-byte load per round.
__device__ __forceinline__ void load_segment(const int* __restrict__ experts, long long n_elements,
                                             long long segment, int lane, int (&expert)[DISPATCH_ROUNDS]) {
#pragma unroll
    for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
        const long long i = segment * SEGMENT + round * 32 + lane;
        expert[round] = i < n_elements ? experts[i] : NO_EXPERT;
    }
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

    int expert[DISPATCH_ROUNDS];
    load_segment(experts, n_tokens * k, segment, lane, expert);
    const int lane_choice = (int)((segment * SEGMENT + lane) % k);  // j of this lane's first element
    const int round_step = 32 % k;  // how far j moves from one round to the next
    for (int j = 0; j < k; ++j) {
        int choice = lane_choice;
#pragma unroll
        for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
            if (expert[round] != NO_EXPERT && choice == j) atomicAdd(&counter[expert[round]], 1);
            choice += round_step;
            if (choice >= k) choice -= k;
        }
        __syncwarp();
        // segment_counts[e, j, segment]; each lane reads and clears its own counters
        long long* choice_counts = segment_counts + (long long)j * n_segments + segment;
        for (int e = lane; e < n_experts; e += 32) {
            choice_counts[(long long)e * k * n_segments] = counter[e];
            counter[e] = 0;
        }
        __syncwarp();
    }
}

// row_length = k * segments: the row of one expert, choices j-major.
extern "C" __global__ void dispatch_scan_segments(long long* __restrict__ segment_counts, long long row_length,
                                                  long long capacity, long long* __restrict__ counts) {
    const int e = blockIdx.x;
    long long* row = segment_counts + (long long)e * row_length;
    long long arrivals = 0;
    for (long long base = 0; base < row_length; base += blockDim.x) {
        const long long slot = base + threadIdx.x;
        const long long count = slot < row_length ? row[slot] : 0;
        long long chunk_total;
        const long long before = block_exclusive_scan(count, chunk_total);
        if (slot < row_length) row[slot] = arrivals + before;
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
    int* counter = warp_counters + warp * n_experts;  // this choice's arrivals in earlier rounds
    for (int e = lane; e < n_experts; e += 32) counter[e] = 0;
    __syncwarp();

    const long long n_elements = n_tokens * k;
    int expert[DISPATCH_ROUNDS];
    load_segment(experts, n_elements, segment, lane, expert);
    long long target[DISPATCH_ROUNDS];  // row[i] of each round, stored after the last choice
    const unsigned int lower_lanes = (1u << lane) - 1u;
    // Element segment * SEGMENT + offset is (t, j) = (first_token + (first_choice + offset) / k,
    // (first_choice + offset) % k): 32-bit arithmetic inside the segment.
    const long long first_token = segment * SEGMENT / k;
    const int first_choice = (int)(segment * SEGMENT % k);
    for (int j = 0; j < k; ++j) {
        const long long* choice_base = segment_base + (long long)j * n_segments + segment;  // [e, j, segment]
#pragma unroll
        for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
            const int from_first_token = first_choice + round * 32 + lane;  // elements
            const bool valid = expert[round] != NO_EXPERT && from_first_token % k == j;
            const int e = valid ? expert[round] : NO_EXPERT;
            const unsigned int same_expert = __match_any_sync(FULL_WARP_MASK, e);
            const int rank_in_round = __popc(same_expert & lower_lanes);
            const int earlier_rounds = valid ? counter[e] : 0;
            __syncwarp();
            if (valid && rank_in_round == 0) counter[e] = earlier_rounds + __popc(same_expert);
            __syncwarp();
            if (valid) {
                const long long arrival = choice_base[(long long)e * k * n_segments] + earlier_rounds + rank_in_round;
                const bool kept = capacity < 0 || arrival < capacity;
                target[round] = kept ? offsets[e] + arrival : -1;
                if (kept) token[target[round]] = first_token + from_first_token / k;
            }
        }
        for (int e = lane; e < n_experts; e += 32) counter[e] = 0;  // the next choice counts afresh
        __syncwarp();
    }
#pragma unroll
    for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
        const long long i = segment * SEGMENT + round * 32 + lane;
        if (i < n_elements) row[i] = target[round];
    }
}
