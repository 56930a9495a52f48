// racecheck.h: a data-race detector of the emulator's instrumented build flavour, the
// CPU twin of compute-sanitizer's racecheck (which sees shared memory only; this one
// sees global memory too).
//
// Included by traffic.h (build.py's "traffic" flavour: GCC's ThreadSanitizer pass calls
// a hook before every load and store). The hooks feed both the traffic counters and
// this detector; racecheck.py switches it on per launch (emu_instrument).
//
// What is a hazard: two accesses to the same byte by different threads, at least one
// a write, not both atomic, and not ordered by a barrier:
//   - __syncthreads orders every access of a block before it against every access after
//     it: the accesses between two block barriers form an epoch, checked at its end;
//   - within an epoch, __syncwarp(mask) orders the accesses of the lanes it names:
//     each thread carries a vector clock over the 32 lanes of its warp, joined at every
//     __syncwarp (so orderings compose: lane a syncs with b, b later with c);
//   - shuffles, votes, __match_any_sync, ldmatrix and mma exchange registers, never
//     race, and do not order memory (the CUDA programming guide promises memory
//     ordering for __syncwarp only; compute-sanitizer reports a shared write and read
//     that only a shuffle separates);
//   - nothing orders two blocks of one launch: global memory keeps, per byte, a
//     shadow of the blocks that read, wrote and atomically updated it, and any access
//     that conflicts with one of another block is a hazard, whatever the barriers;
//   - launches are ordered (a stream): each launch starts with a clean shadow.
// cp.async: the copy's shared write (and global read) happen at an unknown moment
// between the issue and the cp.async.wait_group that completes it, so the copy counts
// as an access of the issuing thread in every epoch from its issue to its completion,
// ordered by no __syncwarp before it completes; and the issuing thread's own access to
// the destination before its wait is a hazard too (reading a tile that has not landed).
//
// Reports are grouped like compute-sanitizer's: one per (space, array, the two access
// sites and kinds), with the first example's threads, blocks and address and the number
// of conflicting access pairs.
#pragma once

#include <array>
#include <numeric>

namespace emu {

enum RaceKind { race_read = 0, race_write = 1, race_atomic = 2 };

// One access of the current epoch.
struct RaceAccess {
    uintptr_t address;
    uint32_t bytes;
    uint32_t snapshot;   // the thread's warp clock then (index into race_snapshots); NO_SNAPSHOT: unordered
    uint16_t thread;     // linear index in the block
    uint16_t site;       // index into race_site_pcs
    uint8_t kind;        // RaceKind
    uint8_t async;       // 1: a cp.async copy
    int16_t buffer;      // global array index, -1 for shared memory
};

// One access of the launch, as the global shadow keeps it (block 0: none).
struct RaceRecord {
    uint32_t block = 0;  // linear block index + 1
    uint16_t thread = 0;
    uint16_t site = 0;
};

struct RaceBuffer {
    uintptr_t start = 0;
    size_t bytes = 0;
    // Per byte and kind: the last access and the last one of an earlier block
    // (blocks run in order, so these two always hold one of another block if any).
    std::vector<RaceRecord> shadow;
};

struct RaceCopy {
    unsigned shared_offset;
    uintptr_t source;
    int bytes;
    uint16_t site;
    long long group;        // -1 while uncommitted
    size_t log_write, log_read;  // its entries in the current epoch's log (SIZE_MAX: none)
};

struct RaceHazard {
    int space, buffer;      // 0 global (buffer: argument index), 1 shared (buffer -1)
    long long offset;       // byte offset in the array (global) or the shared address
    RaceRecord first, second;
    int first_kind, second_kind, first_async, second_async;
    long long count;
};

constexpr uint32_t NO_SNAPSHOT = 0xffffffffu;

inline int race_enabled = 0;
inline uint32_t race_block = 0;  // linear index + 1 of the running block
inline std::vector<RaceBuffer> race_buffers;
inline std::vector<RaceAccess> race_log;
inline std::vector<std::array<uint32_t, 32>> race_snapshots;
inline std::vector<uint32_t> race_thread_snapshot;
inline std::vector<std::vector<RaceCopy>> race_pending;      // per thread
inline std::vector<long long> race_committed;                // per thread: groups committed
inline std::vector<const void*> race_site_pcs;
inline std::unordered_map<const void*, uint16_t> race_site_index;
inline std::vector<RaceHazard> race_hazards;
inline std::unordered_map<std::string, size_t> race_hazard_index;
constexpr size_t RACE_MAX_REPORTS = 200;

inline uint16_t race_site(const void* pc) {
    auto found = race_site_index.find(pc);
    if (found != race_site_index.end()) return found->second;
    const uint16_t index = (uint16_t)std::min<size_t>(race_site_pcs.size(), 0xffff);
    if (race_site_pcs.size() < 0xffff) race_site_pcs.push_back(pc);
    race_site_index.emplace(pc, index);
    return index;
}

inline int race_kind_of(int traffic_kind) {
    return traffic_kind == 1 ? race_write : traffic_kind == 2 ? race_atomic : race_read;  // ldmatrix reads
}

inline void race_report(int space, int buffer, long long offset, const RaceRecord& a, int a_kind, int a_async,
                        const RaceRecord& b, int b_kind, int b_async) {
    // One report per (space, array, the two sites and kinds), in a canonical order.
    const bool swap = std::make_pair(a.site, a_kind) > std::make_pair(b.site, b_kind);
    const RaceRecord& first = swap ? b : a;
    const RaceRecord& second = swap ? a : b;
    const int first_kind = swap ? b_kind : a_kind, second_kind = swap ? a_kind : b_kind;
    const int first_async = swap ? b_async : a_async, second_async = swap ? a_async : b_async;
    std::string key = std::to_string(space) + "," + std::to_string(buffer) + "," + std::to_string(first.site) + "," +
                      std::to_string(first_kind) + std::to_string(first_async) + "," + std::to_string(second.site) +
                      "," + std::to_string(second_kind) + std::to_string(second_async);
    auto found = race_hazard_index.find(key);
    if (found != race_hazard_index.end()) {
        ++race_hazards[found->second].count;
        return;
    }
    if (race_hazards.size() >= RACE_MAX_REPORTS) return;
    race_hazard_index.emplace(key, race_hazards.size());
    race_hazards.push_back(RaceHazard{space, buffer, offset, first, second, first_kind, second_kind, first_async,
                                      second_async, 1});
}

inline RaceBuffer* race_buffer_of(uintptr_t a, int& index) {
    for (size_t i = 0; i < race_buffers.size(); ++i) {
        RaceBuffer& b = race_buffers[i];
        if (a >= b.start && a < b.start + b.bytes) { index = (int)i; return &b; }
    }
    return nullptr;
}

// ---------------------------------------------------------------------------
// Global memory across blocks: the shadow.

inline void race_cross_block(int buffer, uintptr_t address, uint32_t bytes, int kind, const RaceRecord& me) {
    RaceBuffer& b = race_buffers[(size_t)buffer];
    // Which kinds of another block conflict with this one: not read-read, not atomic-atomic.
    const bool conflicts[3][3] = {{false, true, true}, {true, true, true}, {true, true, false}};
    bool reported[3] = {false, false, false};
    for (uintptr_t a = address; a < address + bytes && a < b.start + b.bytes; ++a) {
        RaceRecord* records = &b.shadow[(a - b.start) * 6];
        for (int other = 0; other < 3; ++other) {
            if (!conflicts[kind][other] || reported[other]) continue;
            const RaceRecord& last = records[2 * other];
            const RaceRecord& earlier = records[2 * other + 1];
            const RaceRecord* them = last.block && last.block != me.block ? &last
                                     : earlier.block && earlier.block != me.block ? &earlier : nullptr;
            if (them) {
                race_report(0, buffer, (long long)(a - b.start), *them, other, 0, me, kind, 0);
                reported[other] = true;
            }
        }
        RaceRecord& last = records[2 * kind];
        if (last.block != me.block) records[2 * kind + 1] = last;
        last = me;
    }
}

// ---------------------------------------------------------------------------
// Within a block: the epoch log, checked at each barrier.

inline bool race_ordered(const RaceAccess& a, const RaceAccess& b) {
    if (a.thread / 32 != b.thread / 32 || a.snapshot == NO_SNAPSHOT || b.snapshot == NO_SNAPSHOT) return false;
    const int lane_a = a.thread & 31, lane_b = b.thread & 31;
    const auto& clock_a = race_snapshots[a.snapshot];
    const auto& clock_b = race_snapshots[b.snapshot];
    return clock_b[lane_a] >= clock_a[lane_a] || clock_a[lane_b] >= clock_b[lane_b];
}

inline RaceRecord race_record_of(const RaceAccess& a) { return RaceRecord{race_block, a.thread, a.site}; }

inline void race_check_epoch() {
    const size_t n = race_log.size();
    if (n == 0) return;
    bool any_write = false;
    uint32_t widest = 0;
    for (const RaceAccess& a : race_log) {
        any_write |= a.kind != race_read;
        widest = std::max(widest, a.bytes);
    }
    if (!any_write) return;
    std::vector<uint32_t> order(n);
    std::iota(order.begin(), order.end(), 0u);
    std::sort(order.begin(), order.end(), [](uint32_t x, uint32_t y) {
        return race_log[x].address < race_log[y].address || (race_log[x].address == race_log[y].address && x < y);
    });
    for (size_t position = 0; position < n; ++position) {
        const uint32_t wi = order[position];
        const RaceAccess& w = race_log[wi];
        if (w.kind == race_read) continue;
        // Candidates start within `widest` bytes before w.
        const uintptr_t low = w.address >= widest ? w.address - widest + 1 : 0;
        size_t j = (size_t)(std::lower_bound(order.begin(), order.end(), low, [](uint32_t x, uintptr_t value) {
                                return race_log[x].address < value;
                            }) - order.begin());
        for (; j < n && race_log[order[j]].address < w.address + w.bytes; ++j) {
            const uint32_t xi = order[j];
            const RaceAccess& x = race_log[xi];
            if (xi == wi || x.address + x.bytes <= w.address) continue;
            if (x.thread == w.thread) continue;                             // program order
            if (x.kind != race_read && xi < wi) continue;                    // that pair is found from x
            if (w.kind == race_atomic && x.kind == race_atomic) continue;
            if (race_ordered(w, x)) continue;
            const uintptr_t overlap = std::max(w.address, x.address);
            long long offset;
            if (w.buffer < 0) offset = (long long)(overlap - reinterpret_cast<uintptr_t>(shared_arena));
            else offset = (long long)(overlap - race_buffers[(size_t)w.buffer].start);
            // The earlier access in the log first (the order the emulator ran them).
            const RaceAccess& a = xi < wi ? x : w;
            const RaceAccess& b = xi < wi ? w : x;
            race_report(w.buffer < 0 ? 1 : 0, w.buffer, offset, race_record_of(a), a.kind, a.async,
                        race_record_of(b), b.kind, b.async);
        }
    }
}

inline void race_log_copy(RaceCopy& copy, uint16_t thread, uint32_t snapshot) {
    copy.log_write = race_log.size();
    race_log.push_back(RaceAccess{reinterpret_cast<uintptr_t>(shared_arena) + copy.shared_offset, 16, snapshot,
                                  thread, copy.site, race_write, 1, -1});
    copy.log_read = SIZE_MAX;
    int buffer = -1;
    if (copy.bytes > 0 && race_buffer_of(copy.source, buffer)) {
        copy.log_read = race_log.size();
        race_log.push_back(RaceAccess{copy.source, (uint32_t)copy.bytes, snapshot, thread, copy.site, race_read, 1,
                                      (int16_t)buffer});
    }
}

// A new epoch: fresh warp clocks (own lane 1, others 0); copies still in flight are
// accesses of this epoch too.
inline void race_epoch_begin() {
    const size_t n = race_thread_snapshot.size();
    race_log.clear();
    race_snapshots.assign(n, std::array<uint32_t, 32>{});
    for (size_t t = 0; t < n; ++t) {
        race_snapshots[t][t & 31] = 1;
        race_thread_snapshot[t] = (uint32_t)t;
    }
    for (size_t t = 0; t < n; ++t)
        for (RaceCopy& copy : race_pending[t]) race_log_copy(copy, (uint16_t)t, NO_SNAPSHOT);
}

inline void race_epoch_end() {
    if (!race_enabled) return;
    race_check_epoch();
    race_epoch_begin();
}

inline void race_block_begin(int threads_per_block, uint32_t linear_block) {
    if (!race_enabled) return;
    race_block = linear_block + 1;
    race_thread_snapshot.assign((size_t)threads_per_block, 0);
    race_pending.assign((size_t)threads_per_block, {});
    race_committed.assign((size_t)threads_per_block, 0);
    race_epoch_begin();
}

inline void race_block_end() {
    if (!race_enabled) return;
    race_check_epoch();
    race_log.clear();
}

// __syncwarp(mask) completed: the lanes of mask see each other's earlier accesses.
inline void race_syncwarp(int warp, unsigned mask) {
    if (!race_enabled) return;
    std::array<uint32_t, 32> joined{};
    for (int lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        const auto& clock = race_snapshots[race_thread_snapshot[(size_t)(warp * 32 + lane)]];
        for (int i = 0; i < 32; ++i) joined[i] = std::max(joined[i], clock[i]);
    }
    for (int lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        auto clock = joined;
        ++clock[lane];
        race_thread_snapshot[(size_t)(warp * 32 + lane)] = (uint32_t)race_snapshots.size();
        race_snapshots.push_back(clock);
    }
}

// A load or store of the kernel (the hooks, atomics, ldmatrix).
inline void race_access(const void* p, uint32_t bytes, int traffic_kind, const void* pc) {
    if (!race_enabled || !current || bytes == 0) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t arena = reinterpret_cast<uintptr_t>(shared_arena);
    int buffer = -1;
    if (a >= arena && a < arena + SHARED_ARENA_BYTES) {
        buffer = -1;
    } else if (!race_buffer_of(a, buffer)) {
        return;  // a fiber's stack or the emulator's own memory
    }
    const int kind = race_kind_of(traffic_kind);
    const uint16_t thread = (uint16_t)current->linear;
    const uint16_t site = race_site(pc);
    race_log.push_back(RaceAccess{a, bytes, race_thread_snapshot[thread], thread, site, (uint8_t)kind, 0,
                                  (int16_t)buffer});
    const RaceRecord me{race_block, thread, site};
    if (buffer >= 0) {
        race_cross_block(buffer, a, bytes, kind, me);
        return;
    }
    // This thread's own copies in flight to these bytes: it has not waited for them.
    for (const RaceCopy& copy : race_pending[thread]) {
        const uintptr_t start = arena + copy.shared_offset;
        if (a < start + 16 && start < a + bytes)
            race_report(1, -1, (long long)(std::max(a, start) - arena), RaceRecord{race_block, thread, copy.site},
                        race_write, 1, me, kind, 0);
    }
}

// cp.async issued: its accesses join the log as unordered until it completes.
inline void race_copy_issue(unsigned shared_offset, const void* source, int bytes, const void* pc) {
    if (!race_enabled || !current) return;
    const uint16_t thread = (uint16_t)current->linear;
    RaceCopy copy{shared_offset, reinterpret_cast<uintptr_t>(source), bytes, race_site(pc), -1, SIZE_MAX, SIZE_MAX};
    race_log_copy(copy, thread, NO_SNAPSHOT);
    int buffer = -1;
    if (bytes > 0 && race_buffer_of(copy.source, buffer))
        race_cross_block(buffer, copy.source, (uint32_t)bytes, race_read, RaceRecord{race_block, thread, copy.site});
    race_pending[thread].push_back(copy);
}

inline void race_copy_commit() {
    if (!race_enabled || !current) return;
    const int thread = current->linear;
    for (RaceCopy& copy : race_pending[(size_t)thread])
        if (copy.group < 0) copy.group = race_committed[(size_t)thread];
    ++race_committed[(size_t)thread];
}

// The copies of groups older than the `pending` most recent complete now: in this
// thread's program order, where later __syncwarps can order them.
inline void race_copy_wait(long long pending, bool everything = false) {
    if (!race_enabled || !current) return;
    const int thread = current->linear;
    auto& copies = race_pending[(size_t)thread];
    const long long done_below = race_committed[(size_t)thread] - pending;
    const uint32_t now = race_thread_snapshot[(size_t)thread];
    std::vector<RaceCopy> still;
    for (RaceCopy& copy : copies) {
        if (everything || (copy.group >= 0 && copy.group < done_below)) {
            if (copy.log_write != SIZE_MAX) race_log[copy.log_write].snapshot = now;
            if (copy.log_read != SIZE_MAX) race_log[copy.log_read].snapshot = now;
        } else {
            still.push_back(copy);
        }
    }
    copies.swap(still);
}

}  // namespace emu

// The loader's side: register the launch's arrays, read the hazards after it.
extern "C" void emu_race_begin(int n, const unsigned long long* starts, const unsigned long long* bytes) {
    emu::race_buffers.assign((size_t)n, emu::RaceBuffer{});
    for (int i = 0; i < n; ++i) {
        emu::RaceBuffer& b = emu::race_buffers[(size_t)i];
        b.start = (uintptr_t)starts[i];
        b.bytes = (size_t)bytes[i];
        b.shadow.assign(b.bytes * 6, emu::RaceRecord{});
        emu::track(b.start, b.bytes);
    }
    emu::race_hazards.clear();
    emu::race_hazard_index.clear();
    emu::race_site_pcs.clear();
    emu::race_site_index.clear();
    emu::race_log.clear();
}
extern "C" int emu_race_hazard_count() { return (int)emu::race_hazards.size(); }
// out: space, array index, offset, count, then for each of the two accesses:
// pc offset in this library, kind, async, block (linear), thread (linear).
extern "C" void emu_race_hazard(int i, long long* out) {
    const emu::RaceHazard& h = emu::race_hazards[(size_t)i];
    auto offset_of = [](uint16_t site) -> long long {
        Dl_info info;
        const void* pc = emu::race_site_pcs[site];
        if (dladdr(pc, &info) && info.dli_fbase)
            return (long long)(reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase));
        return -1;
    };
    const long long values[14] = {h.space, h.buffer, h.offset, h.count,
                                  offset_of(h.first.site), h.first_kind, h.first_async, (long long)h.first.block - 1,
                                  h.first.thread,
                                  offset_of(h.second.site), h.second_kind, h.second_async,
                                  (long long)h.second.block - 1, h.second.thread};
    std::memcpy(out, values, sizeof values);
}
extern "C" void emu_race_end() {
    for (auto& b : emu::race_buffers) { b.shadow.clear(); b.shadow.shrink_to_fit(); }
}
