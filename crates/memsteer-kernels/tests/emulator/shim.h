// Runs pieces of kernels.cu on the CPU: the CUDA built-ins they use, with each thread of a block an
// OS thread, blocks one after another. `__shared__` variables are statics (one block runs at a time),
// `__syncthreads` is a barrier of the block, `__shfl_xor_sync` an exchange through memory between two
// barriers of the warp; a thread that returns leaves both barriers, as an exited CUDA thread does.
// Loads and stores cover f32, f16 and bf16 in software (the kernels' own helpers use PTX).
// Plain C++17, no GPU: the `*_run_in_the_cpu_emulator` tests (tests/tests.rs) build it with a driver
// (decode.cpp, softcap.cpp, rows.cpp) and the pieces of kernels.cu it runs.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

static inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
static inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
#define NEG_INF __int_as_float(0xff800000)

// A reusable barrier of n threads; a thread that has finished leaves it (n shrinks).
struct Barrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned n, waiting = 0, generation = 0;
    explicit Barrier(unsigned n) : n(n) {}
    void release() {
        waiting = 0;
        generation++;
        cv.notify_all();
    }
    void wait() {
        std::unique_lock<std::mutex> lock(m);
        unsigned gen = generation;
        if (++waiting == n) {
            release();
        } else {
            cv.wait(lock, [&] { return gen != generation; });
        }
    }
    void leave() {
        std::unique_lock<std::mutex> lock(m);
        if (--n > 0 && waiting == n) release();
    }
};
// Every line of a driver's report reaches its output at once, even when a sanitizer ends the process.
[[maybe_unused]] static const int line_buffered = setvbuf(stdout, nullptr, _IOLBF, 0);

static std::unique_ptr<Barrier> block_barrier;
static std::unique_ptr<Barrier> warp_barrier[32];
static float exchange[32][32];

static inline void __syncthreads() { block_barrier->wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
    int t = threadIdx.x, w = t >> 5, l = t & 31;
    exchange[w][l] = v;
    warp_barrier[w]->wait();
    float r = exchange[w][l ^ o];
    warp_barrier[w]->wait();
    return r;
}

// IEEE half to float and back (round to nearest even), in software.
static inline float h2f(u16 h) {
    u32 sign = (u32)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));  // inf, NaN
    if (e == 0) {
        float v = std::ldexp((float)m, -24);  // subnormal (or zero)
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}
static inline u16 f2h(float f) {
    u32 u = __float_as_uint(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (u16)(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // rounds to infinity (65520 and above)
    if (a < 0x38800000u) {                                // below 2^-14: a subnormal half
        float v = __uint_as_float(a) * 16777216.0f;       // in units of 2^-24, exact
        return (u16)(sign | (u32)std::nearbyint(v));       // round half to even (the default mode)
    }
    u32 e = (a >> 23) - 112, m = a & 0x7fffffu;
    u32 h = (e << 10) | (m >> 13), rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (u16)(sign | h);
}
static inline float b2f(u16 b) { return __uint_as_float(((u32)b) << 16); }
// The PTX exponential (ex2.approx) as the library's.
static inline float ex2(float x) { return std::exp2(x); }
// CUDA's vector types.
struct float4 {
    float x, y, z, w;
};
struct uint2 {
    u32 x, y;
};
struct uint4 {
    u32 x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline uint2 make_uint2(u32 x, u32 y) { return {x, y}; }
static inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return {x, y, z, w}; }
static inline u16 f2b(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
static inline float ld(const void* p, i64 i, int dt) {
    if (dt == 0) return ((const float*)p)[i];
    u16 v = ((const u16*)p)[i];
    return dt == 1 ? h2f(v) : b2f(v);
}
static inline void st(void* p, i64 i, int dt, float v) {
    if (dt == 0) ((float*)p)[i] = v;
    else ((u16*)p)[i] = dt == 1 ? f2h(v) : f2b(v);
}

// Runs a grid of gx × gy blocks of `threads` threads (a multiple of 32, at most 1024): one OS thread per
// CUDA thread, started once per launch and reused for every block, blocks one after another.
static void launch(unsigned gx, unsigned gy, unsigned threads, const std::function<void()>& kernel) {
    blockDim.x = threads;
    gridDim.x = gx;
    gridDim.y = gy;
    std::mutex m;
    std::condition_variable go, done;
    unsigned block = 0, finished = 0;  // the block being run (1-based; 0: none yet), threads done with it
    bool stop = false;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; t++) ts.emplace_back([&, t] {
        threadIdx.x = t;
        unsigned seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(m);
                go.wait(lock, [&] { return stop || block != seen; });
                if (stop) return;
                seen = block;
            }
            kernel();
            exchange[t >> 5][t & 31] = NAN;  // an exited lane has no value to shuffle
            warp_barrier[t >> 5]->leave();
            block_barrier->leave();
            std::lock_guard<std::mutex> lock(m);
            if (++finished == threads) done.notify_one();
        }
    });
    for (unsigned by = 0; by < gy; by++) {
        for (unsigned bx = 0; bx < gx; bx++) {
            std::unique_lock<std::mutex> lock(m);
            blockIdx.x = bx;
            blockIdx.y = by;
            block_barrier.reset(new Barrier(threads));
            for (unsigned w = 0; w < threads / 32; w++) warp_barrier[w].reset(new Barrier(32));
            finished = 0;
            block++;
            go.notify_all();
            done.wait(lock, [&] { return finished == threads; });
        }
    }
    {
        std::lock_guard<std::mutex> lock(m);
        stop = true;
        go.notify_all();
    }
    for (auto& t : ts) t.join();
}
