// traffic.h: memory-traffic counters of the emulator's "traffic" build flavour.
//
// Included by cuda_emulator.h only when EMU_TRAFFIC is defined (build.py's traffic
// flavour: -DEMU_TRAFFIC -fsanitize=thread -g). GCC's ThreadSanitizer pass then calls
// __tsan_read<N>/__tsan_write<N>(address) before every load and store of the kernel
// code; no sanitizer runtime is linked: the hooks are defined here and count. The
// same hooks feed the data-race detector (racecheck.h); emu_instrument picks, per
// launch, whether the counters, the detector or both run.
//
// What is counted (the requests a kernel makes; no cache is modelled):
//   - an access is global when its address lies in an array argument of the launch
//     (registered by the loader), shared when it lies in the shared arena; every
//     other address (fiber stacks, the emulator's own data) is ignored;
//   - the access site is the instruction (program counter) that calls the hook; the
//     loader maps it to the kernels/topk_moe/cuda source line with addr2line;
//   - GROUPING: a warp-wide request is the n-th execution of a site by each lane of
//     one warp within one block (n counted per thread). Lanes that run a loop fewer
//     times simply are not in the later requests, as on a GPU after divergence.
//     Each thread's sequence of accesses does not depend on the schedule (results
//     are bitwise equal under every schedule), so neither do the counts;
//   - global: per request the distinct 32-byte sectors the lanes touch, and the
//     minimum: ceil(distinct bytes / 32);
//   - shared: per request the wavefronts, 32 banks of 4 bytes: accesses of up to 4
//     bytes are one phase of 32 lanes, 8-byte accesses two phases (lanes 0-15,
//     16-31), 16-byte accesses four phases of 8 lanes, ldmatrix one phase per 8x8
//     matrix (the 8 row addresses of lanes 8j..8j+7); a phase costs the largest
//     number of distinct 4-byte words any one bank holds (the same word is a
//     broadcast), an atomic the largest number of lanes on one bank (atomics on one
//     word serialise). A request whose distinct words all fit one conflict-free
//     wavefront (a broadcast, say of one 8-byte word) costs one, whatever its width.
//     Minimum: ceil(distinct words / 32);
//   - cp.async counts a 16-byte global read (its src-size bytes) and a 16-byte
//     shared write at issue; atomics count as one request that reads and writes;
//   - per global array argument: the distinct bytes read and written in the launch
//     (the ideal: each byte once), the distinct sectors of the launch (compulsory),
//     and the sum over blocks of the distinct sectors of each block.
#pragma once

#include <dlfcn.h>
#include <unordered_map>

namespace emu {

enum TrafficKind { traffic_read = 0, traffic_write = 1, traffic_atomic = 2, traffic_ldmatrix = 3 };
enum TrafficSpace { space_global = 0, space_shared = 1 };

struct TrafficBuffer {
    uintptr_t start = 0;
    size_t bytes = 0;
    std::vector<uint8_t> byte_flags;       // bit 0 read, bit 1 written, in this launch
    std::vector<uint8_t> sector_flags;     // the same per 32-byte sector (of the address)
    std::vector<uint32_t> sector_block;    // block stamp of the last read (even) / write (odd) sector
    long long read_bytes = 0, written_bytes = 0, read_sectors = 0, written_sectors = 0;
    long long block_read_sectors = 0, block_written_sectors = 0;
    uintptr_t first_sector = 0;
};

struct TrafficAccess { uintptr_t address; uint32_t bytes; uint32_t lane; };

struct TrafficGroup {
    const void* pc;
    int space;
    int kind;
    std::vector<TrafficAccess> accesses;
};

struct TrafficSite {
    const void* pc = nullptr;
    int space = 0, kind = 0;
    long long access_bytes = 0;   // bytes of one lane's access (the largest seen)
    long long requests = 0, lane_accesses = 0, bytes = 0;
    long long sectors = 0, min_sectors = 0, wavefronts = 0, min_wavefronts = 0;
};

struct GroupKey {
    const void* pc;
    uint32_t warp, n;
    bool operator==(const GroupKey& o) const { return pc == o.pc && warp == o.warp && n == o.n; }
};
struct GroupKeyHash {
    size_t operator()(const GroupKey& k) const {
        return std::hash<const void*>()(k.pc) ^ (size_t(k.warp) * 0x9e3779b97f4a7c15ull) ^ (size_t(k.n) << 17);
    }
};

inline int traffic_paused = 0;
inline int traffic_enabled = 1;
// The global arrays of the launch (registered by emu_traffic_begin and emu_race_begin).
constexpr int TRACKED_MAX = 64;
inline uintptr_t tracked_start[TRACKED_MAX];
inline uintptr_t tracked_bytes[TRACKED_MAX];
inline int tracked_count = 0;
inline bool tracked_overflow = false;  // more arrays than slots: look at every address

inline void track(uintptr_t start, size_t bytes) {
    if (tracked_count == TRACKED_MAX) { tracked_overflow = true; return; }
    tracked_start[tracked_count] = start;
    tracked_bytes[tracked_count] = (uintptr_t)bytes;
    ++tracked_count;
}  // emu_instrument: count this launch (racecheck.py may run without counting)
inline uint32_t traffic_block_stamp = 0;
inline std::vector<TrafficBuffer> traffic_buffers;
inline std::vector<std::unordered_map<const void*, uint32_t>> traffic_thread_counts;
inline std::unordered_map<GroupKey, uint32_t, GroupKeyHash> traffic_group_index;
inline std::vector<TrafficGroup> traffic_groups;
inline std::unordered_map<const void*, size_t> traffic_site_index;
inline std::vector<TrafficSite> traffic_sites;

struct TrafficPause {
    __attribute__((no_sanitize("thread"))) TrafficPause() { ++traffic_paused; }
    __attribute__((no_sanitize("thread"))) ~TrafficPause() { --traffic_paused; }
};

inline TrafficBuffer* traffic_buffer_of(uintptr_t a) {
    for (auto& b : traffic_buffers)
        if (a >= b.start && a < b.start + b.bytes) return &b;
    return nullptr;
}

// Distinct bytes and sectors of the launch and of this block, per global array.
inline void traffic_mark(TrafficBuffer& b, uintptr_t address, uint32_t bytes, bool read, bool write) {
    const uint8_t bit = (read ? 1 : 0) | (write ? 2 : 0);
    for (uintptr_t a = address; a < address + bytes && a < b.start + b.bytes; ++a) {
        uint8_t& f = b.byte_flags[a - b.start];
        if (read && !(f & 1)) ++b.read_bytes;
        if (write && !(f & 2)) ++b.written_bytes;
        f |= bit;
    }
    for (uintptr_t s = address >> 5; s <= (address + bytes - 1) >> 5; ++s) {
        const size_t i = s - b.first_sector;
        uint8_t& f = b.sector_flags[i];
        if (read && !(f & 1)) ++b.read_sectors;
        if (write && !(f & 2)) ++b.written_sectors;
        f |= bit;
        if (read && b.sector_block[2 * i] != traffic_block_stamp) { b.sector_block[2 * i] = traffic_block_stamp; ++b.block_read_sectors; }
        if (write && b.sector_block[2 * i + 1] != traffic_block_stamp) { b.sector_block[2 * i + 1] = traffic_block_stamp; ++b.block_written_sectors; }
    }
}

// Not instrumented itself, and paused while it runs: the library code it calls
// (containers) is instrumented, and its hook calls must not count or recurse.
__attribute__((no_sanitize("thread"))) inline void traffic_count(const void* p, uint32_t bytes, int kind,
                                                                  const void* pc) {
    if (traffic_paused || !traffic_enabled || !current || bytes == 0) return;
    TrafficPause pause;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t arena = reinterpret_cast<uintptr_t>(shared_arena);
    int space;
    if (a >= arena && a < arena + SHARED_ARENA_BYTES) {
        space = space_shared;
    } else if (TrafficBuffer* b = traffic_buffer_of(a)) {
        space = space_global;
        traffic_mark(*b, a, bytes, kind != traffic_write, kind != traffic_read);
    } else {
        return;  // a fiber's stack or the emulator's own memory
    }
    // A site is (instruction, space): cp.async's global read and shared write share a call.
    const void* site = reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(pc) * 2 + (uintptr_t)space);
    const uint32_t linear = (uint32_t)current->linear;
    const uint32_t n = traffic_thread_counts[linear][site]++;
    const GroupKey key{site, linear / 32, n};
    auto found = traffic_group_index.find(key);
    if (found == traffic_group_index.end()) {
        found = traffic_group_index.emplace(key, (uint32_t)traffic_groups.size()).first;
        traffic_groups.push_back(TrafficGroup{pc, space, kind, {}});
    }
    traffic_groups[found->second].accesses.push_back(TrafficAccess{a, bytes, linear & 31u});
}

}  // namespace emu

#include "racecheck.h"

namespace emu {

// Every access the instrumentation sees: the data-race detector (racecheck.h) and
// the counters, each when switched on for the launch (emu_instrument).
__attribute__((no_sanitize("thread"))) inline void traffic_access(const void* p, uint32_t bytes, int kind,
                                                                   const void* pc) {
    if (traffic_paused || !current || bytes == 0) return;
    // Most calls are for other memory (fiber stacks, the emulator's globals): filtered
    // here with plain arrays, since any container call would itself be instrumented.
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - reinterpret_cast<uintptr_t>(shared_arena) >= SHARED_ARENA_BYTES) {
        bool tracked = tracked_overflow;
        for (int i = 0; i < tracked_count && !tracked; ++i) tracked = a - tracked_start[i] < tracked_bytes[i];
        if (!tracked) return;
    }
    {
        TrafficPause pause;
        race_access(p, bytes, kind, pc);
    }
    traffic_count(p, bytes, kind, pc);
}

// Shared wavefronts of one request (see the rules at the top of this file).
inline long long shared_wavefronts_in_phases(const TrafficGroup& g, int lanes_per_phase) {
    long long total = 0;
    for (int phase = 0; phase < 32 / lanes_per_phase; ++phase) {
        std::vector<uintptr_t> words[32];
        int lanes_on_bank[32] = {0};
        bool any = false;
        for (auto& x : g.accesses) {
            if ((int)x.lane / lanes_per_phase != phase) continue;
            any = true;
            for (uintptr_t w = x.address >> 2; w <= (x.address + x.bytes - 1) >> 2; ++w) {
                auto& list = words[w % 32];
                if (std::find(list.begin(), list.end(), w) == list.end()) list.push_back(w);
                ++lanes_on_bank[w % 32];
            }
        }
        if (!any) continue;
        size_t worst = 1;
        for (int bank = 0; bank < 32; ++bank)
            worst = std::max(worst, g.kind == traffic_atomic ? (size_t)lanes_on_bank[bank] : words[bank].size());
        total += (long long)worst;
    }
    return total;
}

inline long long shared_wavefronts(const TrafficGroup& g) {
    uint32_t widest = 0;
    for (auto& x : g.accesses) widest = std::max(widest, x.bytes);
    if (g.kind == traffic_ldmatrix) return shared_wavefronts_in_phases(g, 8);
    const long long whole_warp = shared_wavefronts_in_phases(g, 32);
    if (widest <= 4 || whole_warp == 1) return whole_warp;
    // Conflicts count within a phase only: a warp balanced over the banks as a
    // whole still pays for two lanes of one quarter-warp on one bank.
    return shared_wavefronts_in_phases(g, widest >= 16 ? 8 : 16);
}

// At the end of each block: every request of the block into its site's totals.
inline void traffic_block_end() {
    for (const TrafficGroup& g : traffic_groups) {
        const void* site = reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(g.pc) * 2 + (uintptr_t)g.space);
        auto found = traffic_site_index.find(site);
        if (found == traffic_site_index.end()) {
            found = traffic_site_index.emplace(site, traffic_sites.size()).first;
            TrafficSite site;
            site.pc = g.pc; site.space = g.space; site.kind = g.kind;
            traffic_sites.push_back(site);
        }
        TrafficSite& s = traffic_sites[found->second];
        std::vector<uintptr_t> units;  // distinct sectors (global) or words (shared)
        std::vector<uintptr_t> bytes_seen;
        long long requested = 0;
        for (auto& x : g.accesses) {
            requested += x.bytes;
            s.access_bytes = std::max<long long>(s.access_bytes, x.bytes);
            for (uintptr_t a = x.address; a < x.address + x.bytes; ++a) bytes_seen.push_back(a);
        }
        std::sort(bytes_seen.begin(), bytes_seen.end());
        const long long distinct_bytes =
            (long long)(std::unique(bytes_seen.begin(), bytes_seen.end()) - bytes_seen.begin());
        s.requests += 1;
        s.lane_accesses += (long long)g.accesses.size();
        s.bytes += requested;
        if (g.space == space_global) {
            for (auto& x : g.accesses)
                for (uintptr_t q = x.address >> 5; q <= (x.address + x.bytes - 1) >> 5; ++q) units.push_back(q);
            std::sort(units.begin(), units.end());
            s.sectors += (long long)(std::unique(units.begin(), units.end()) - units.begin());
            s.min_sectors += (distinct_bytes + 31) / 32;
        } else {
            for (auto& x : g.accesses)
                for (uintptr_t w = x.address >> 2; w <= (x.address + x.bytes - 1) >> 2; ++w) units.push_back(w);
            std::sort(units.begin(), units.end());
            const long long words = (long long)(std::unique(units.begin(), units.end()) - units.begin());
            s.wavefronts += shared_wavefronts(g);
            s.min_wavefronts += (words + 31) / 32;
        }
    }
    traffic_groups.clear();
    traffic_group_index.clear();
    for (auto& counts : traffic_thread_counts) counts.clear();
}

inline void traffic_block_begin(int threads_per_block) {
    ++traffic_block_stamp;
    traffic_thread_counts.resize((size_t)threads_per_block);
    for (auto& counts : traffic_thread_counts) counts.clear();
    traffic_groups.clear();
    traffic_group_index.clear();
}

}  // namespace emu

// The loader's side: register the launch's arrays before it, read the counts after.
extern "C" void emu_traffic_begin(int n, const unsigned long long* starts, const unsigned long long* bytes) {
    emu::traffic_buffers.assign((size_t)n, emu::TrafficBuffer{});
    for (int i = 0; i < n; ++i) {
        emu::TrafficBuffer& b = emu::traffic_buffers[(size_t)i];
        b.start = (uintptr_t)starts[i];
        b.bytes = (size_t)bytes[i];
        emu::track(b.start, b.bytes);
        b.byte_flags.assign(b.bytes, 0);
        b.first_sector = b.start >> 5;
        const size_t sectors = b.bytes ? ((b.start + b.bytes - 1) >> 5) - b.first_sector + 1 : 0;
        b.sector_flags.assign(sectors, 0);
        b.sector_block.assign(2 * sectors, 0);
    }
    emu::traffic_sites.clear();
    emu::traffic_site_index.clear();
    emu::traffic_block_stamp = 0;
}
// What the instrumented build does in the next launch: count traffic, check for races.
extern "C" void emu_instrument(int count_traffic, int check_races) {
    emu::traffic_enabled = count_traffic;
    emu::race_enabled = check_races;
    emu::tracked_count = 0;  // the begin calls that follow register the launch's arrays
    emu::tracked_overflow = false;
}
extern "C" int emu_traffic_site_count() { return (int)emu::traffic_sites.size(); }
// out: pc offset in this library, space, kind, access bytes, requests, lane accesses,
// bytes, sectors, min sectors, wavefronts, min wavefronts.
extern "C" void emu_traffic_site(int i, long long* out) {
    const emu::TrafficSite& s = emu::traffic_sites[(size_t)i];
    Dl_info info;
    long long offset = -1;
    if (dladdr(s.pc, &info) && info.dli_fbase)
        offset = (long long)(reinterpret_cast<uintptr_t>(s.pc) - reinterpret_cast<uintptr_t>(info.dli_fbase));
    const long long values[11] = {offset, s.space, s.kind, s.access_bytes, s.requests, s.lane_accesses,
                                  s.bytes, s.sectors, s.min_sectors, s.wavefronts, s.min_wavefronts};
    std::memcpy(out, values, sizeof values);
}
// out: distinct bytes read, written; distinct sectors read, written (launch);
// the sum over blocks of each block's distinct sectors read, written.
extern "C" void emu_traffic_buffer(int i, long long* out) {
    const emu::TrafficBuffer& b = emu::traffic_buffers[(size_t)i];
    const long long values[6] = {b.read_bytes, b.written_bytes, b.read_sectors, b.written_sectors,
                                 b.block_read_sectors, b.block_written_sectors};
    std::memcpy(out, values, sizeof values);
}

// ThreadSanitizer's entry points, called by the instrumented code. The return
// address is inside the instruction that accessed memory: its site.
#define EMU_TSAN_HOOK(name, bytes, kind)                                                     \
    extern "C" __attribute__((noinline, no_sanitize("thread"))) void name(void* p) {         \
        emu::traffic_access(p, bytes, kind, __builtin_return_address(0));                    \
    }
EMU_TSAN_HOOK(__tsan_read1, 1, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_read2, 2, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_read4, 4, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_read8, 8, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_read16, 16, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_write1, 1, emu::traffic_write)
EMU_TSAN_HOOK(__tsan_write2, 2, emu::traffic_write)
EMU_TSAN_HOOK(__tsan_write4, 4, emu::traffic_write)
EMU_TSAN_HOOK(__tsan_write8, 8, emu::traffic_write)
EMU_TSAN_HOOK(__tsan_write16, 16, emu::traffic_write)
EMU_TSAN_HOOK(__tsan_unaligned_read2, 2, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_unaligned_read4, 4, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_unaligned_read8, 8, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_unaligned_read16, 16, emu::traffic_read)
EMU_TSAN_HOOK(__tsan_unaligned_write2, 2, emu::traffic_write)
EMU_TSAN_HOOK(__tsan_unaligned_write4, 4, emu::traffic_write)
EMU_TSAN_HOOK(__tsan_unaligned_write8, 8, emu::traffic_write)
EMU_TSAN_HOOK(__tsan_unaligned_write16, 16, emu::traffic_write)
#undef EMU_TSAN_HOOK
extern "C" __attribute__((noinline, no_sanitize("thread"))) void __tsan_read_range(void* p, unsigned long size) {
    emu::traffic_access(p, (uint32_t)size, emu::traffic_read, __builtin_return_address(0));
}
extern "C" __attribute__((noinline, no_sanitize("thread"))) void __tsan_write_range(void* p, unsigned long size) {
    emu::traffic_access(p, (uint32_t)size, emu::traffic_write, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
