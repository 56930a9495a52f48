// router.cu: the fused router, logits = x @ router, softmax over E, top-k.
//
// One kernel per (k, storage type): router_top1_f32, router_top2_f32,
// router_top1_f16, router_top2_f16. Logits, softmax and the weights are
// computed in float32 whatever the storage type; probs and weights are stored
// in the input's type (rounded once), experts as int32.
//
// Versions
//   v1 (this file) one block of ROUTER_WARPS warps per ROUTER_TOKENS
//      consecutive tokens. Lane = d_lane * EXPERT_LANES + expert_lane; the
//      lane owns experts e = expert_lane + m * EXPERT_LANES (m < EXPERTS_PER_LANE)
//      and model columns d = warp * D_LANES + d_lane + i * ROUTER_WARPS * D_LANES.
//      Each router element a lane loads (coalesced over expert_lane) is used
//      for all ROUTER_TOKENS tokens of the block; partial logits are summed
//      over d_lane by a shuffle butterfly, then over warps through shared
//      memory in warp order, and warp 0 does softmax and top-k with shuffles.
//
// Why this mapping: the router matrix (D x E) is re-read for every group of
// tokens and dominates the traffic, so its reads are the coalesced ones; x is
// read once per block (broadcast across expert lanes). E is a compile-time
// constant (-D N_EXPERTS) so that each lane's logits live in registers.
//
// Determinism and batch invariance: every token's logits are summed in one
// fixed order that depends only on E and D (columns in lane order, the d_lane
// butterfly, then warps 0, 1, 2, ...), never on T or on the other tokens of
// the block; every reduction is a butterfly of commutative operations, so all
// lanes hold bitwise-identical results. Ties: the order is (logit descending,
// expert index ascending), a strict total order, so the top-k is unique and
// equal logits go to the smaller index. NaN logits rank as -infinity (the
// indices stay valid even when the finiteness check is skipped).
//
// Non-finite input: x @ router has a non-finite entry exactly when x or the
// router holds one (inf * 0 is NaN, inf - inf is NaN, NaN spreads), or when
// float32 overflows; either sets *nonfinite = 1 for the launcher to raise.

#include "common.cuh"

#ifndef N_EXPERTS
#define N_EXPERTS 64
#endif
#ifndef ROUTER_TOKENS
#define ROUTER_TOKENS 8
#endif
#ifndef ROUTER_WARPS
#define ROUTER_WARPS 8
#endif

__host__ __device__ constexpr int next_power_of_two(int n) {
    int power = 1;
    while (power < n) power <<= 1;
    return power;
}

constexpr int EXPERT_LANES = N_EXPERTS >= 32 ? 32 : next_power_of_two(N_EXPERTS);
constexpr int D_LANES = 32 / EXPERT_LANES;
constexpr int EXPERTS_PER_LANE = (N_EXPERTS + EXPERT_LANES - 1) / EXPERT_LANES;
constexpr int D_STRIDE = ROUTER_WARPS * D_LANES;  // columns a block covers per step
constexpr int D_UNROLL = EXPERTS_PER_LANE >= 8 ? 1 : (EXPERTS_PER_LANE >= 4 ? 2 : 4);
constexpr int NO_EXPERT = 0x7fffffff;  // ranks below every real expert

static_assert(N_EXPERTS >= 1 && N_EXPERTS <= 1024, "the router supports 1 to 1024 experts");
static_assert(ROUTER_TOKENS >= 1 && ROUTER_TOKENS * EXPERTS_PER_LANE <= 64, "logits per lane");
static_assert(ROUTER_WARPS >= 1 && ROUTER_WARPS <= 32, "warps per block");

// (logit, expert) ranks above (other_logit, other_expert).
__device__ __forceinline__ bool outranks(float logit, int expert, float other_logit, int other_expert) {
    return logit > other_logit || (logit == other_logit && expert < other_expert);
}

template <int K, typename T>
__device__ __forceinline__ void route_block(
    const T* __restrict__ x, const T* __restrict__ router, long long n_tokens, long long d_model,
    int renormalize, int* __restrict__ experts, T* __restrict__ weights, T* __restrict__ probs,
    int* __restrict__ nonfinite) {
    __shared__ float partial_logits[ROUTER_WARPS > 1 ? ROUTER_WARPS - 1 : 1][ROUTER_TOKENS]
                                   [EXPERTS_PER_LANE][EXPERT_LANES];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int expert_lane = lane % EXPERT_LANES;
    const int d_lane = lane / EXPERT_LANES;
    const long long first_token = (long long)blockIdx.x * ROUTER_TOKENS;
    const long long tokens_left = n_tokens - first_token;  // >= 1: grid = ceil(T / ROUTER_TOKENS)
    const int n_slots = tokens_left < ROUTER_TOKENS ? (int)tokens_left : ROUTER_TOKENS;

    float logit[ROUTER_TOKENS][EXPERTS_PER_LANE];
#pragma unroll
    for (int s = 0; s < ROUTER_TOKENS; ++s)
#pragma unroll
        for (int m = 0; m < EXPERTS_PER_LANE; ++m) logit[s][m] = 0.0f;

    const T* x_block = x + first_token * d_model;
#pragma unroll D_UNROLL
    for (long long d = warp * D_LANES + d_lane; d < d_model; d += D_STRIDE) {
        const T* router_row = router + d * N_EXPERTS;
        float column[EXPERTS_PER_LANE];
#pragma unroll
        for (int m = 0; m < EXPERTS_PER_LANE; ++m) {
            const int e = expert_lane + m * EXPERT_LANES;
            column[m] = e < N_EXPERTS ? to_float(router_row[e]) : 0.0f;
        }
#pragma unroll
        for (int s = 0; s < ROUTER_TOKENS; ++s) {
            const float x_value = s < n_slots ? to_float(x_block[s * d_model + d]) : 0.0f;
#pragma unroll
            for (int m = 0; m < EXPERTS_PER_LANE; ++m) logit[s][m] = fmaf(x_value, column[m], logit[s][m]);
        }
    }

    // Sum over the d_lanes of the warp (lanes that share expert_lane).
#pragma unroll
    for (int offset = EXPERT_LANES; offset < 32; offset <<= 1)
#pragma unroll
        for (int s = 0; s < ROUTER_TOKENS; ++s)
#pragma unroll
            for (int m = 0; m < EXPERTS_PER_LANE; ++m)
                logit[s][m] += __shfl_xor_sync(FULL_WARP_MASK, logit[s][m], offset);

    // Sum over the warps, in warp order, in warp 0.
    if (ROUTER_WARPS > 1) {
        if (warp > 0 && d_lane == 0) {
#pragma unroll
            for (int s = 0; s < ROUTER_TOKENS; ++s)
#pragma unroll
                for (int m = 0; m < EXPERTS_PER_LANE; ++m)
                    partial_logits[warp - 1][s][m][expert_lane] = logit[s][m];
        }
        __syncthreads();
        if (warp > 0) return;
        for (int w = 0; w < ROUTER_WARPS - 1; ++w)
#pragma unroll
            for (int s = 0; s < ROUTER_TOKENS; ++s)
#pragma unroll
                for (int m = 0; m < EXPERTS_PER_LANE; ++m) logit[s][m] += partial_logits[w][s][m][expert_lane];
    }

#pragma unroll
    for (int s = 0; s < ROUTER_TOKENS; ++s) {
        if (s >= n_slots) break;  // warp-uniform
        const long long t = first_token + s;

        // Finiteness and the row maximum.
        bool bad = false;
        float row_max = negative_infinity();
#pragma unroll
        for (int m = 0; m < EXPERTS_PER_LANE; ++m) {
            if (expert_lane + m * EXPERT_LANES < N_EXPERTS) {
                bad |= !is_finite(logit[s][m]);
                row_max = fmaxf(row_max, logit[s][m]);
            }
        }
#pragma unroll
        for (int offset = 1; offset < EXPERT_LANES; offset <<= 1)
            row_max = fmaxf(row_max, __shfl_xor_sync(FULL_WARP_MASK, row_max, offset));
        if (__any_sync(FULL_WARP_MASK, bad) && lane == 0) atomicOr(nonfinite, 1);

        // Softmax; probs are written by the d_lane 0 copy of each expert.
        float prob[EXPERTS_PER_LANE];
        float row_sum = 0.0f;
#pragma unroll
        for (int m = 0; m < EXPERTS_PER_LANE; ++m) {
            prob[m] = expert_lane + m * EXPERT_LANES < N_EXPERTS ? expf(logit[s][m] - row_max) : 0.0f;
            row_sum += prob[m];
        }
#pragma unroll
        for (int offset = 1; offset < EXPERT_LANES; offset <<= 1)
            row_sum += __shfl_xor_sync(FULL_WARP_MASK, row_sum, offset);
#pragma unroll
        for (int m = 0; m < EXPERTS_PER_LANE; ++m) {
            const int e = expert_lane + m * EXPERT_LANES;
            prob[m] = prob[m] / row_sum;
            if (d_lane == 0 && e < N_EXPERTS) store_float(probs + t * N_EXPERTS + e, prob[m]);
        }

        // Top-k: each lane's best K of its experts (ascending e, so a tie keeps
        // the smaller index), then a butterfly merge over the expert lanes. The
        // probability travels with its expert, so an unnormalised weight is
        // bitwise the stored prob.
        float best_logit = negative_infinity(), second_logit = negative_infinity();
        int best_expert = NO_EXPERT, second_expert = NO_EXPERT;
        float best_prob = 0.0f, second_prob = 0.0f;
#pragma unroll
        for (int m = 0; m < EXPERTS_PER_LANE; ++m) {
            const int e = expert_lane + m * EXPERT_LANES;
            if (e >= N_EXPERTS) continue;
            const float key = is_nan(logit[s][m]) ? negative_infinity() : logit[s][m];
            if (outranks(key, e, best_logit, best_expert)) {
                if (K == 2) {
                    second_logit = best_logit;
                    second_expert = best_expert;
                    second_prob = best_prob;
                }
                best_logit = key;
                best_expert = e;
                best_prob = prob[m];
            } else if (K == 2 && outranks(key, e, second_logit, second_expert)) {
                second_logit = key;
                second_expert = e;
                second_prob = prob[m];
            }
        }
#pragma unroll
        for (int offset = 1; offset < EXPERT_LANES; offset <<= 1) {
            const float other_logit = __shfl_xor_sync(FULL_WARP_MASK, best_logit, offset);
            const int other_expert = __shfl_xor_sync(FULL_WARP_MASK, best_expert, offset);
            const float other_prob = __shfl_xor_sync(FULL_WARP_MASK, best_prob, offset);
            if (K == 1) {
                if (outranks(other_logit, other_expert, best_logit, best_expert)) {
                    best_logit = other_logit;
                    best_expert = other_expert;
                    best_prob = other_prob;
                }
            } else {
                const float other_second_logit = __shfl_xor_sync(FULL_WARP_MASK, second_logit, offset);
                const int other_second_expert = __shfl_xor_sync(FULL_WARP_MASK, second_expert, offset);
                const float other_second_prob = __shfl_xor_sync(FULL_WARP_MASK, second_prob, offset);
                if (outranks(other_logit, other_expert, best_logit, best_expert)) {
                    // The other's best leads; second is the better of my best and its second.
                    if (outranks(best_logit, best_expert, other_second_logit, other_second_expert)) {
                        second_logit = best_logit;
                        second_expert = best_expert;
                        second_prob = best_prob;
                    } else {
                        second_logit = other_second_logit;
                        second_expert = other_second_expert;
                        second_prob = other_second_prob;
                    }
                    best_logit = other_logit;
                    best_expert = other_expert;
                    best_prob = other_prob;
                } else if (outranks(other_logit, other_expert, second_logit, second_expert)) {
                    second_logit = other_logit;
                    second_expert = other_expert;
                    second_prob = other_prob;
                }
            }
        }

        if (lane == 0) {
            float best_weight = best_prob, second_weight = second_prob;
            if (renormalize) {
                const float total = K == 2 ? best_prob + second_prob : best_prob;
                best_weight = best_prob / total;
                second_weight = second_prob / total;
            }
            experts[t * K] = best_expert;
            store_float(weights + t * K, best_weight);
            if (K == 2) {
                experts[t * K + 1] = second_expert;
                store_float(weights + t * K + 1, second_weight);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
router_top1_f32(const float* x, const float* router, long long n_tokens, long long d_model, int renormalize,
                int* experts, float* weights, float* probs, int* nonfinite) {
    route_block<1, float>(x, router, n_tokens, d_model, renormalize, experts, weights, probs, nonfinite);
}

extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
router_top2_f32(const float* x, const float* router, long long n_tokens, long long d_model, int renormalize,
                int* experts, float* weights, float* probs, int* nonfinite) {
    route_block<2, float>(x, router, n_tokens, d_model, renormalize, experts, weights, probs, nonfinite);
}

extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
router_top1_f16(const half_bits* x, const half_bits* router, long long n_tokens, long long d_model,
                int renormalize, int* experts, half_bits* weights, half_bits* probs, int* nonfinite) {
    route_block<1, half_bits>(x, router, n_tokens, d_model, renormalize, experts, weights, probs, nonfinite);
}

extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
router_top2_f16(const half_bits* x, const half_bits* router, long long n_tokens, long long d_model,
                int renormalize, int* experts, half_bits* weights, half_bits* probs, int* nonfinite) {
    route_block<2, half_bits>(x, router, n_tokens, d_model, renormalize, experts, weights, probs, nonfinite);
}
