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
// Blocks, not warps, touch segment_counts and token (the second issue-21 fix). A
// block's W warps take W consecutive segments, so its entries of one (expert,
// choice) are a run of W consecutive int64 in segment_counts; the block reads and
// writes them through shared memory, its threads on consecutive segments. (One
// warp alone would touch a sector per expert, k * segments entries apart.) And a
// (segment, choice)'s rows at one expert are consecutive rows of `token`: the
// warp stages its token rows in shared memory in expert order and stores them
// with consecutive lanes on consecutive rows, instead of scattering each round's
// lanes over the E experts' row ranges. The emulator's counts of the whole stage
// at T = 256, E = 8 (analysis.measure.traffic): k = 2, 778 sectors against a
// minimum of 517 before, 478 against 433 after; k = 1, 303/255 before, 227/227 after.
//
// Kernels, in launch order:
//   dispatch_count_segments  one warp per segment: loads its elements once into
//                            registers, then for each choice j counts the
//                            arrivals per expert in the warp's own slice of shared
//                            memory (integer atomics, whose sum is order-free);
//                            after a block barrier the block writes all its
//                            warps' counts to segment_counts[e, j, segment].
//   dispatch_scan_segments   one block per expert: exclusive scan of its row of
//                            segment_counts in place (the arrival rank of each
//                            (choice, segment)'s first arrival), and
//                            counts[e] = min(arrivals, C).
//   dispatch_offsets         one block: exclusive scan of counts -> offsets (E+1).
//   dispatch_scatter         per choice j, the block loads offsets[e] +
//                            segment_counts[e, j, its segments] (the rows of each
//                            (segment, choice)'s first arrivals) into shared memory;
//                            then one warp per segment: within a round,
//                            __match_any_sync groups the lanes of one expert and a
//                            lane's rank is the number of lower lanes in its group
//                            (lower lanes hold earlier tokens of the same choice),
//                            earlier rounds are added from the warp's shared
//                            counters. The counters, scanned over experts, place
//                            each element in the warp's staging buffer (expert
//                            order); the warp then writes token[row] from it, and
//                            row[t, j] (or -1) after the last choice, as one
//                            contiguous store per round.
//
// Dropless plans need no host synchronisation (N = T * K is known); with a
// capacity the launcher reads offsets[E] once to size `token`.

#include "common.cuh"

#ifndef DISPATCH_ROUNDS
#define DISPATCH_ROUNDS 8
#endif
#ifndef DISPATCH_WARPS
#define DISPATCH_WARPS 8  // the launcher's largest block, in warps (launch_config.DISPATCH_MAX_WARPS)
#endif

constexpr int SEGMENT = 32 * DISPATCH_ROUNDS;
// dispatch_scatter keeps a (segment, choice)'s arrivals per expert in 16 bits and a
// token's offset from its segment's first token in the low 16 bits of an int.
static_assert(SEGMENT < 65536, "DISPATCH_ROUNDS: a segment must hold fewer than 65536 elements");
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
    const int n_warps = blockDim.x >> 5;
    const long long first_segment = (long long)blockIdx.x * n_warps;
    // A warp past the last segment loads no element and counts nothing, but stays
    // for the block's barriers.
    const long long segment = first_segment + warp;
    const int block_segments = (int)min((long long)n_warps, n_segments - first_segment);
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
        __syncthreads();  // every warp's counts of choice j are in
        // segment_counts[e, j, first_segment + w] for the block's segments w, the
        // block's threads on consecutive segments: one run per expert (transposed
        // from the warps' counters). Whoever reads a counter clears it for choice j + 1.
        long long* choice_counts = segment_counts + (long long)j * n_segments + first_segment;
        for (int slot = threadIdx.x; slot < n_experts * block_segments; slot += blockDim.x) {
            const int e = slot / block_segments;
            const int w = slot - e * block_segments;
            choice_counts[(long long)e * k * n_segments + w] = warp_counters[w * n_experts + e];
            warp_counters[w * n_experts + e] = 0;
        }
        __syncthreads();
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

// Exclusive prefix sum of values[0, n) in place, by one warp; returns the total.
__device__ int warp_exclusive_scan(unsigned short* values, int n, int lane) {
    int total = 0;
    for (int first = 0; first < n; first += 32) {
        const int i = first + lane;
        const int value = i < n ? values[i] : 0;
        int inclusive = value;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const int below = __shfl_up_sync(FULL_WARP_MASK, inclusive, offset);
            if (lane >= offset) inclusive += below;
        }
        if (i < n) values[i] = (unsigned short)(total + inclusive - value);
        total += __shfl_sync(FULL_WARP_MASK, inclusive, 31);
    }
    return total;
}

// A staged token row: its expert (high 16 bits) and its token's offset from the
// segment's first token (low 16 bits); DROPPED where the capacity drops it.
constexpr int DROPPED = -1;
__device__ __forceinline__ int pack_staged(int expert, int token_offset) { return (expert << 16) | token_offset; }

// At most 64 registers (four blocks of DISPATCH_WARPS warps per SM, as the
// kernel had before staging): left free, ptxas takes about 124 to load every
// round's shared values at once, which a memory-bound kernel does not need.
extern "C" __global__ void __launch_bounds__(32 * DISPATCH_WARPS, 4)
dispatch_scatter(const int* __restrict__ experts, long long n_tokens, int k, int n_experts, long long n_segments,
                 const long long* __restrict__ segment_base, const long long* __restrict__ offsets,
                 long long capacity, long long* __restrict__ token, long long* __restrict__ row) {
    // Dynamic shared memory, in this order (launch_config.dispatch_shared_bytes):
    //   row_base  (warps, n_experts) long long: the row of the (segment, choice)'s first
    //             arrival at each expert, offsets[e] + segment_base[e, j, segment];
    //   staged    (warps, SEGMENT) int: the choice's token rows in expert order;
    //   counter   (warps, n_experts) unsigned short: arrivals per expert in earlier
    //             rounds, then where each expert's run starts in staged.
    extern __shared__ long long scatter_shared[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    const long long first_segment = (long long)blockIdx.x * n_warps;
    const long long segment = first_segment + warp;  // past the last one: no element, only the barriers
    const int block_segments = (int)min((long long)n_warps, n_segments - first_segment);
    long long* block_row_base = scatter_shared;
    int* staged_base = (int*)(block_row_base + n_warps * n_experts);
    unsigned short* counter_base = (unsigned short*)(staged_base + n_warps * SEGMENT);
    long long* row_base = block_row_base + warp * n_experts;
    int* staged = staged_base + warp * SEGMENT;
    unsigned short* counter = counter_base + warp * n_experts;

    const long long n_elements = n_tokens * k;
    int expert[DISPATCH_ROUNDS];
    load_segment(experts, n_elements, segment, lane, expert);
    int rank[DISPATCH_ROUNDS];          // arrivals before this lane's element in its (segment, choice, expert)
    long long target[DISPATCH_ROUNDS];  // row[i] of each round, stored after the last choice
    const unsigned int lower_lanes = (1u << lane) - 1u;
    // Element segment * SEGMENT + offset is (t, j) = (first_token + (first_choice + offset) / k,
    // (first_choice + offset) % k): 32-bit arithmetic inside the segment.
    const long long first_token = segment * SEGMENT / k;
    const int first_choice = (int)(segment * SEGMENT % k);
    for (int j = 0; j < k; ++j) {
        // The block's row bases of choice j, its threads on consecutive segments of
        // one expert (a run of segment_base), and this warp's counters cleared.
        __syncthreads();  // the previous choice is done with row_base
        const long long* choice_base = segment_base + (long long)j * n_segments + first_segment;
        for (int slot = threadIdx.x; slot < n_experts * block_segments; slot += blockDim.x) {
            const int e = slot / block_segments;
            const int w = slot - e * block_segments;
            block_row_base[w * n_experts + e] = offsets[e] + choice_base[(long long)e * k * n_segments + w];
        }
        for (int e = lane; e < n_experts; e += 32) counter[e] = 0;
        __syncthreads();

        // Ranks: within a round, __match_any_sync groups the lanes of one expert and
        // the lower lanes of a group hold earlier tokens; earlier rounds are counted.
#pragma unroll
        for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
            const int from_first_token = first_choice + round * 32 + lane;  // elements
            const bool valid = expert[round] != NO_EXPERT && from_first_token % k == j;
            const int e = valid ? expert[round] : NO_EXPERT;
            const unsigned int same_expert = __match_any_sync(FULL_WARP_MASK, e);
            const int rank_in_round = __popc(same_expert & lower_lanes);
            const int earlier_rounds = valid ? counter[e] : 0;
            __syncwarp();
            if (valid && rank_in_round == 0) counter[e] = (unsigned short)(earlier_rounds + __popc(same_expert));
            __syncwarp();
            rank[round] = earlier_rounds + rank_in_round;
        }
        // counter[e]: the arrivals at e in this (segment, choice) -> where e's run starts in staged.
        const int n_staged = warp_exclusive_scan(counter, n_experts, lane);
        __syncwarp();

        // Each element's row (kept while it is below the expert's end, offsets[e + 1]:
        // counts[e] = min(arrivals, C) and an arrival rank is below the arrivals).
#pragma unroll
        for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
            const int from_first_token = first_choice + round * 32 + lane;
            if (expert[round] == NO_EXPERT || from_first_token % k != j) continue;
            const int e = expert[round];
            const long long target_row = row_base[e] + rank[round];
            const bool kept = capacity < 0 || target_row < offsets[e + 1];
            target[round] = kept ? target_row : -1;
            staged[counter[e] + rank[round]] = kept ? pack_staged(e, from_first_token / k) : DROPPED;
        }
        __syncwarp();
        // token[row] in runs: consecutive lanes on consecutive rows of one expert.
        for (int slot = lane; slot < n_staged; slot += 32) {
            const int value = staged[slot];
            if (value == DROPPED) continue;
            const int e = value >> 16;
            token[row_base[e] + (slot - counter[e])] = first_token + (value & 0xffff);
        }
    }
#pragma unroll
    for (int round = 0; round < DISPATCH_ROUNDS; ++round) {
        const long long i = segment * SEGMENT + round * 32 + lane;
        if (i < n_elements) row[i] = target[round];
    }
}
