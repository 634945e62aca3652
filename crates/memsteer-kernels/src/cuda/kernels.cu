// memsteer's CUDA kernels, compiled once per process by NVRTC (see cuda/mod.rs).
//
// No system headers: NVRTC gives none. Half-precision conversions are inline PTX or bit operations,
// -inf is written as a bit pattern. Element types are passed as run-time codes (0 = f32, 1 = f16,
// 2 = bf16): every thread of a launch takes the same branch, so the switch costs nothing measurable
// next to the memory traffic these kernels are bound by.
//
// Matrix products are not here: cuBLAS (tensor cores for f16/bf16, f32 accumulation) does them.
// These kernels are the memory-bound rest: embeddings, layer norm, bias + activation, residuals, the
// QKV split with rotary embeddings, the causal softmax, and the row-wise log-sum-exp of the output
// layer (which never sees more than one bounded chunk of logits).

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float b2f(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 f2b(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest even
    return (u16)(u >> 16);
}

__device__ __forceinline__ float ld(const void* p, i64 i, int dt) {
    if (dt == 0) return ((const float*)p)[i];
    u16 v = ((const u16*)p)[i];
    return dt == 1 ? h2f(v) : b2f(v);
}
__device__ __forceinline__ void st(void* p, i64 i, int dt, float v) {
    if (dt == 0) ((float*)p)[i] = v;
    else if (dt == 1) ((u16*)p)[i] = f2h(v);
    else ((u16*)p)[i] = f2b(v);
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}
__device__ float block_max(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : NEG_INF;
    return warp_max(v);
}
// (max, sum of exp(x - max)) merged with another such pair.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == NEG_INF) return;
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// Converts n values from type x_dt to type y_dt.
extern "C" __global__ void convert(const void* x, int x_dt, void* y, int y_dt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(y, i, y_dt, ld(x, i, x_dt));
}

// x[r] = (wte[tok[r]] (+ wpe[pos[r]] when wpe is not null)) · scale (1 but for Gemma); one block per row. An id or position
// outside its table (the host checks first) gives NaN, never a read outside the table.
extern "C" __global__ void embed(const u32* tok, const u32* pos, const void* wte, const void* wpe, int dt,
                                 float* x, int d, i64 vocab, i64 positions, float scale) {
    i64 r = blockIdx.x;
    i64 t = tok[r];
    bool bad = t >= vocab || (wpe && (i64)pos[r] >= positions);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        if (bad) {
            x[r * d + c] = __int_as_float(0x7fc00000);
            continue;
        }
        float v = ld(wte, t * d + c, dt);
        if (wpe) v += ld(wpe, (i64)pos[r] * d + c, dt);
        x[r * d + c] = v * scale;
    }
}

// out[r] = (x[r] − mean) / sqrt(var + eps) · g + b, written as `out_dt`; one block per row, two passes
// over the row as the CPU path does (mean, then the mean squared deviation).
extern "C" __global__ void layer_norm(const float* x, const void* g, const void* b, int dt, void* out, int out_dt,
                                      int d, float eps) {
    i64 r = blockIdx.x;
    const float* row = x + r * d;
    float s = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) s += row[c];
    float mean = block_sum(s) / d;
    float q = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float e = row[c] - mean;
        q += e * e;
    }
    float inv = 1.0f / sqrtf(block_sum(q) / d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        st(out, r * d + c, out_dt, (row[c] - mean) * inv * ld(g, c, dt) + ld(b, c, dt));
}

__device__ __forceinline__ float gelu(float x, int act) {
    if (act == 1) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    if (act == 2) {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    return x;
}

// out = act(y + b) over a rows × cols matrix (y of type y_dt, b of type dt), written as `out_dt`
// (act: 0 none, 1 exact GELU, 2 tanh GELU); out may be y when the types agree. Grid (column blocks,
// row blocks): no integer division per element.
extern "C" __global__ void bias_act(const void* y, int y_dt, const void* b, int dt, void* out, int out_dt, i64 rows,
                                    int cols, int act) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float bc = ld(b, c, dt);
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
        i64 i = r * cols + c;
        st(out, i, out_dt, gelu(ld(y, i, y_dt) + bc, act));
    }
}

// ---- Vectorised variants of layer_norm and bias_act (Gpu::set_vectorised) -----------------------------
// layer_norm with one warp per row and 16-byte loads: d a multiple of 4, x and out 16-byte aligned.
// The same two passes (mean, then the mean squared deviation), the row re-read from L1. Half-precision
// outputs are stored four at a time (8 bytes). 8 rows per block of 256 threads.
extern "C" __global__ void layer_norm_warp(const float* x, const void* g, const void* b, int dt, void* out, int out_dt,
                                           i64 rows, int d, float eps) {
    const i64 r = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // a whole warp leaves together: the shuffles below see all 32 lanes
    const int lane = threadIdx.x & 31, n4 = d >> 2;
    const float4* row = (const float4*)(x + r * d);
    float s = 0.0f;
    for (int i = lane; i < n4; i += 32) {
        float4 v = row[i];
        s += (v.x + v.y) + (v.z + v.w);
    }
    const float mean = warp_sum(s) / d;
    float q = 0.0f;
    for (int i = lane; i < n4; i += 32) {
        float4 v = row[i];
        float a = v.x - mean, bb = v.y - mean, c = v.z - mean, e = v.w - mean;
        q += (a * a + bb * bb) + (c * c + e * e);
    }
    const float inv = 1.0f / sqrtf(warp_sum(q) / d + eps);
    for (int i = lane; i < n4; i += 32) {
        float4 v = row[i];
        const int c = 4 * i;
        float y[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; e++) y[e] = (y[e] - mean) * inv * ld(g, c + e, dt) + ld(b, c + e, dt);
        if (out_dt == 0) {
            ((float4*)out)[r * n4 + i] = make_float4(y[0], y[1], y[2], y[3]);
        } else {
            u32 lo, hi;
            if (out_dt == 1) {
                lo = (u32)f2h(y[0]) | ((u32)f2h(y[1]) << 16);
                hi = (u32)f2h(y[2]) | ((u32)f2h(y[3]) << 16);
            } else {
                lo = (u32)f2b(y[0]) | ((u32)f2b(y[1]) << 16);
                hi = (u32)f2b(y[2]) | ((u32)f2b(y[3]) << 16);
            }
            ((uint2*)out)[r * n4 + i] = make_uint2(lo, hi);
        }
    }
}

// bias_act for y and out of one half type h_dt (1 f16, 2 bf16; out may be y) with cols a multiple of 8,
// both 16-byte aligned: each thread takes 8 columns (one 16-byte load and store per row) over a stride
// of rows. Grid (column groups of 8 · blockDim, row blocks).
extern "C" __global__ void bias_act_vec(const void* y, const void* b, int dt, void* out, int h_dt, i64 rows, int cols,
                                        int act) {
    const int c8 = blockIdx.x * blockDim.x + threadIdx.x;  // which group of 8 columns
    const int groups = cols >> 3;
    if (c8 >= groups) return;
    float bias[8];
#pragma unroll
    for (int e = 0; e < 8; e++) bias[e] = ld(b, c8 * 8 + e, dt);
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
        const i64 i = r * groups + c8;
        uint4 u = ((const uint4*)y)[i];
        u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            u16 lo = (u16)(w[e] & 0xffffu), hi = (u16)(w[e] >> 16);
            float a = (h_dt == 1 ? h2f(lo) : b2f(lo)) + bias[2 * e];
            float c = (h_dt == 1 ? h2f(hi) : b2f(hi)) + bias[2 * e + 1];
            a = gelu(a, act);
            c = gelu(c, act);
            w[e] = h_dt == 1 ? ((u32)f2h(a) | ((u32)f2h(c) << 16)) : ((u32)f2b(a) | ((u32)f2b(c) << 16));
        }
        ((uint4*)out)[i] = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// x += (a + ba) (+ (b2 + bb) when b2 is not null): a and b2 of type a_dt, biases (length d) of type dt;
// a null bias adds nothing.
extern "C" __global__ void residual(float* x, const void* a, const void* ba, const void* b2, const void* bb, int a_dt,
                                    int dt, i64 rows, int d) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float bias = (ba ? ld(ba, c, dt) : 0.0f) + (b2 && bb ? ld(bb, c, dt) : 0.0f);
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
        i64 i = r * d + c;
        float v = ld(a, i, a_dt) + bias;
        if (b2) v += ld(b2, i, a_dt);
        x[i] += v;
    }
}

// ---- The Llama family: RMSNorm, the q/k norms and the gated MLPs ----------------------------------------
// out[r] = x[r] / sqrt(mean(x[r]²) + eps) · g (x of type x_dt, g of type dt, out written as out_dt), as the CPU
// path computes it (x·rstd, then ·g); one block per row.
extern "C" __global__ void rms_norm(const void* x, int x_dt, const void* g, int dt, void* out, int out_dt, int d,
                                    float eps) {
    i64 r = blockIdx.x;
    float s = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = ld(x, r * d + c, x_dt);
        s += v * v;
    }
    float inv = 1.0f / sqrtf(block_sum(s) / d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        st(out, r * d + c, out_dt, ld(x, r * d + c, x_dt) * inv * ld(g, c, dt));
}

// RMSNorm in place of the queries and keys in the fused projection (rows of row_len values of type dt): qn
// groups of qw values at q_off + j·q_step (weight gq), then kn groups of kw values at k_off + j·k_step
// (weight gk); weights of type g_dt. One head per group (Qwen 3, Gemma 3) or all heads at once (OLMo 2).
// Grid (rows, qn + kn).
extern "C" __global__ void qk_rms_norm(void* qkv, int dt, i64 row_len, int q_off, int q_step, int qn, int qw,
                                       int k_off, int k_step, int kn, int kw, const void* gq, const void* gk,
                                       int g_dt, float eps) {
    const int j = blockIdx.y;
    const bool is_q = j < qn;
    const int w = is_q ? qw : kw;
    const i64 at = (i64)blockIdx.x * row_len + (is_q ? q_off + j * q_step : k_off + (j - qn) * k_step);
    const void* g = is_q ? gq : gk;
    float s = 0.0f;
    for (int c = threadIdx.x; c < w; c += blockDim.x) {
        float v = ld(qkv, at + c, dt);
        s += v * v;
    }
    float inv = 1.0f / sqrtf(block_sum(s) / w + eps);
    for (int c = threadIdx.x; c < w; c += blockDim.x) st(qkv, at + c, dt, ld(qkv, at + c, dt) * inv * ld(g, c, g_dt));
}

// up = act(gate) · up over n values of type dt: act 3 SiLU (SwiGLU), 2 tanh GELU (GeGLU).
extern "C" __global__ void gated_act(const void* gate, void* up, int dt, i64 n, int act) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float g = ld(gate, i, dt);
        float a = act == 3 ? g / (1.0f + expf(-g)) : gelu(g, act);
        st(up, i, dt, ld(up, i, dt) * a);
    }
}

// Splits the fused QKV projection (rows of `row_len` values of type qkv_dt, plus bias when not null) into
// head-major q (heads × rows × hd) and k, v (kv_heads × rows × hd), type out_dt, rotating the first `rot`
// dimensions of every q and k head (rotate-half) with the tables cos_t/sin_t (position × rot/2). Head h
// of q starts at q_off + h·head_stride in a row, of k at k_off + h·head_stride, of v at v_off + h·head_stride
// (GPT-NeoX: per-head [q k v], head_stride 3·hd; GPT-2 and the Llama family: [q | k | v], head_stride hd).
// One block per row.
extern "C" __global__ void qkv_split(const void* qkv, int qkv_dt, const void* bias, int dt, const u32* pos, const float* cos_t,
                                     const float* sin_t, int rot, i64 row_len, int q_off, int k_off, int v_off,
                                     int head_stride, void* q, void* k, void* v, int out_dt, i64 rows, int heads,
                                     int kv_heads, int hd, i64 positions) {
    i64 r = blockIdx.x;
    if (rot > 0 && (i64)pos[r] >= positions) rot = 0;  // outside the tables (the host checks first): no rotation
    int d = heads * hd, half = rot / 2;
    const i64 row = r * row_len;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        int h = j / hd, i = j % hd;
        i64 dst = ((i64)h * rows + r) * hd + i;
        for (int part = 0; part < 3 && (part == 0 || h < kv_heads); part++) {
            int at = (part == 0 ? q_off : (part == 1 ? k_off : v_off)) + h * head_stride;
            float val = ld(qkv, row + at + i, qkv_dt);
            if (bias) val += ld(bias, at + i, dt);
            if (part < 2 && i < rot) {
                int f = i < half ? i : i - half;
                float c = cos_t[(i64)pos[r] * half + f], s = sin_t[(i64)pos[r] * half + f];
                int o_at = at + (i < half ? i + half : i - half);
                float o = ld(qkv, row + o_at, qkv_dt);
                if (bias) o += ld(bias, o_at, dt);
                val = i < half ? val * c - o * s : val * c + o * s;
            }
            st(part == 0 ? q : (part == 1 ? k : v), dst, out_dt, val);
        }
    }
}

// Causal softmax of one query block's scores: s is (heads × qb × kn) f32, query i of the block sits at
// position q0 + i of its sequence and sees keys 0..=q0 + i, or only the last `window` of them when window > 0.
// Writes p (type p_dt), zero outside what a query sees.
// Grid (qb, heads).
// With cap > 0 the scaled scores are soft-capped to cap·tanh(s/cap) first (Gemma 2).
__device__ __forceinline__ float capped(float x, float cap) { return cap > 0.0f ? tanhf(x / cap) * cap : x; }
extern "C" __global__ void causal_softmax(const float* s, void* p, int p_dt, int qb, int kn, int q0, float scale,
                                          int window, float cap) {
    i64 row = (i64)blockIdx.y * qb + blockIdx.x;
    const float* x = s + row * kn;
    int last = q0 + blockIdx.x;
    int first = window > 0 && last + 1 > window ? last + 1 - window : 0;
    float m = NEG_INF;
    for (int j = first + threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, capped(x[j] * scale, cap));
    m = block_max(m);
    float sum = 0.0f;
    for (int j = first + threadIdx.x; j <= last; j += blockDim.x) sum += expf(capped(x[j] * scale, cap) - m);
    float inv = 1.0f / block_sum(sum);
    for (int j = threadIdx.x; j < kn; j += blockDim.x)
        st(p, row * kn + j, p_dt, j >= first && j <= last ? expf(capped(x[j] * scale, cap) - m) * inv : 0.0f);
}

// In place, n values of type dt: x = cap·tanh(x/cap) (Gemma 2's final logits).
extern "C" __global__ void softcap(void* x, int dt, i64 n, float cap) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(x, i, dt, tanhf(ld(x, i, dt) / cap) * cap);
}

// Per row of a chunk of logits (rows × V, type l_dt): lse = log Σ exp, and out = logit[target] − lse.
// lse may be null. One block per row; an online (max, sum) per thread, merged across the block.
extern "C" __global__ void lse_target(const void* logits, int l_dt, i64 V, const u32* tgt, float* out, float* lse) {
    i64 r = blockIdx.x;
    float m = NEG_INF, s = 0.0f;
    for (i64 j = threadIdx.x; j < V; j += blockDim.x) {
        float x = ld(logits, r * V + j, l_dt);
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    float bm = block_max(m);
    float bs = block_sum(m == NEG_INF ? 0.0f : s * expf(m - bm));
    if (threadIdx.x == 0) {
        float l = bm + logf(bs);
        if (out) out[r] = tgt[r] < V ? ld(logits, r * V + tgt[r], l_dt) - l : __int_as_float(0x7fc00000);
        if (lse) lse[r] = l;
    }
}

// lse_target for rows whose length V is a multiple of 8: 16-byte loads (8 halves or 4 floats), one
// running-max update per load, exponentials through ex2 (2⁻²² relative error), no branch per element.
extern "C" __global__ void lse_target_vec(const void* logits, int l_dt, i64 V, const u32* tgt, float* out, float* lse) {
    const float L2E = 1.4426950408889634f;
    i64 r = blockIdx.x;
    float m = NEG_INF, s = 0.0f;  // running max and Σ 2^((x − m)·log2 e)
    if (l_dt == 1) {
        const uint4* p = (const uint4*)((const u16*)logits + r * V);
        for (i64 i = threadIdx.x; i < V / 8; i += blockDim.x) {
            uint4 u = p[i];
            u32 w[4] = {u.x, u.y, u.z, u.w};
            float x[8];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                x[2 * e] = h2f((u16)(w[e] & 0xffffu));
                x[2 * e + 1] = h2f((u16)(w[e] >> 16));
            }
            float mx = x[0];
#pragma unroll
            for (int e = 1; e < 8; e++) mx = fmaxf(mx, x[e]);
            if (mx > m) {
                s *= ex2((m - mx) * L2E);
                m = mx;
            }
            float ml = m * L2E;
#pragma unroll
            for (int e = 0; e < 8; e++) s += ex2(x[e] * L2E - ml);
        }
    } else {
        const float4* p = (const float4*)((const float*)logits + r * V);
        for (i64 i = threadIdx.x; i < V / 4; i += blockDim.x) {
            float4 u = p[i];
            float mx = fmaxf(fmaxf(u.x, u.y), fmaxf(u.z, u.w));
            if (mx > m) {
                s *= ex2((m - mx) * L2E);
                m = mx;
            }
            float ml = m * L2E;
            s += ex2(u.x * L2E - ml) + ex2(u.y * L2E - ml) + ex2(u.z * L2E - ml) + ex2(u.w * L2E - ml);
        }
    }
    float bm = block_max(m);
    float bs = block_sum(m == NEG_INF ? 0.0f : s * expf(m - bm));
    if (threadIdx.x == 0) {
        float l = bm + logf(bs);
        if (out) out[r] = tgt[r] < V ? ld(logits, r * V + tgt[r], l_dt) - l : __int_as_float(0x7fc00000);
        if (lse) lse[r] = l;
    }
}


// ---- Decoding with key/value caches on the device ------------------------------------------------
// Each sequence of a decoding batch owns one cache buffer (type dt), laid out layers × 2 (keys, values)
// × kv_heads × capacity × hd; `caches` holds the buffers' addresses and `caps` their capacities, one per
// sequence, and row r of the batch belongs to sequence seq[r] at position pos[r] (< its capacity: the
// host checks every address, capacity and position before a launch).

// Offset of position p of one key/value head's keys (part 0) or values (part 1) in a cache buffer.
__device__ __forceinline__ i64 cache_at(int layer, int part, int kv_heads, int head, i64 capacity, i64 p, int hd) {
    return ((((i64)layer * 2 + part) * kv_heads + head) * capacity + p) * hd;
}

// Stores layer `layer`'s new keys and values (head-major kv_heads × rows × hd, type dt) at their rows'
// positions. Grid (rows, kv_heads).
extern "C" __global__ void cache_store(const void* k, const void* v, const unsigned long long* caches, const u32* caps,
                                       const u32* seq, const u32* pos, int dt, i64 rows, int kv_heads, int hd,
                                       int layer) {
    i64 r = blockIdx.x;
    int h = blockIdx.y;
    u32 s = seq[r];
    void* base = (void*)caches[s];
    i64 capacity = caps[s], p = pos[r];
    i64 kd = cache_at(layer, 0, kv_heads, h, capacity, p, hd), vd = cache_at(layer, 1, kv_heads, h, capacity, p, hd);
    i64 src = ((i64)h * rows + r) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        if (dt == 0) {
            ((float*)base)[kd + d] = ((const float*)k)[src + d];
            ((float*)base)[vd + d] = ((const float*)v)[src + d];
        } else {
            ((u16*)base)[kd + d] = ((const u16*)k)[src + d];
            ((u16*)base)[vd + d] = ((const u16*)v)[src + d];
        }
    }
}

// Attention of each row's query heads (head-major heads × rows × hd, type dt) over its sequence's cached
// keys 0..=pos (only the last `window` of them when window > 0), written row-major to ctx (rows ×
// heads·hd, type dt). Scores are scaled, then soft-capped when cap > 0 (Gemma 2); query head h reads
// key/value head h / (heads / kv_heads). Everything after the loads is f32: each warp keeps an online
// softmax over every 4th key (lane l holds dimensions l, l + 32, …; hd ≤ 256), and the four warps'
// maxima, sums and accumulators are merged at the end. Grid (rows, heads), 128 threads.
#define DEC_WARPS 4
extern "C" __global__ void __launch_bounds__(128)
    cached_attention(const void* q, const unsigned long long* caches, const u32* caps, const u32* seq, const u32* pos,
                     void* ctx, int dt, i64 rows, int heads, int kv_heads, int hd, int layer, float scale, int window,
                     float cap) {
    __shared__ float s_max[DEC_WARPS], s_sum[DEC_WARPS];
    __shared__ float s_acc[DEC_WARPS][256];
    i64 r = blockIdx.x;
    int h = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int kvh = h / (heads / kv_heads);
    u32 s = seq[r];
    const void* base = (const void*)caches[s];
    i64 capacity = caps[s], p = pos[r];
    i64 kb = cache_at(layer, 0, kv_heads, kvh, capacity, 0, hd), vb = cache_at(layer, 1, kv_heads, kvh, capacity, 0, hd);
    float qr[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int d = lane + 32 * i;
        qr[i] = d < hd ? ld(q, ((i64)h * rows + r) * hd + d, dt) : 0.0f;
        acc[i] = 0.0f;
    }
    i64 first = window > 0 && p + 1 > window ? p + 1 - window : 0;
    float m = NEG_INF, l = 0.0f;
    for (i64 j = first + w; j <= p; j += DEC_WARPS) {
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int d = lane + 32 * i;
            if (d < hd) part += qr[i] * ld(base, kb + j * hd + d, dt);
        }
        float sc = capped(warp_sum(part) * scale, cap);
        float mn = fmaxf(m, sc);
        float corr = expf(m - mn), e = expf(sc - mn);
        l = l * corr + e;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int d = lane + 32 * i;
            if (d < hd) acc[i] = acc[i] * corr + e * ld(base, vb + j * hd + d, dt);
        }
        m = mn;
    }
    if (lane == 0) {
        s_max[w] = m;
        s_sum[w] = l;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int d = lane + 32 * i;
        if (d < hd) s_acc[w][d] = acc[i];
    }
    __syncthreads();
    float top = NEG_INF;
    for (int x = 0; x < DEC_WARPS; x++) top = fmaxf(top, s_max[x]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int x = 0; x < DEC_WARPS; x++) {
            if (s_max[x] == NEG_INF) continue;  // a warp that saw no key
            float f = expf(s_max[x] - top);
            num += s_acc[x][d] * f;
            den += s_sum[x] * f;
        }
        st(ctx, r * heads * hd + (i64)h * hd + d, dt, num / den);
    }
}

// ---- LM-Steer training (the output layer's backward on one chunk of logits) -----------------------
// m[t, :] *= factor · strengths[t · steers + i] for a rows × cols f32 matrix. Grid (column blocks, row blocks).
extern "C" __global__ void scale_rows(float* m, int cols, const float* strengths, int steers, int i, float factor,
                                      i64 rows) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) m[r * cols + c] *= factor * strengths[r * steers + i];
}

// Turns a chunk of f32 logits (rows × V) into scale · (softmax − one-hot(target)), in place, from each
// row's log-sum-exp. With cap > 0 the logits are soft-capped ones (cap·tanh(z/cap)) and the result is
// the gradient with respect to the uncapped z: times 1 − (logit/cap)². Grid (column blocks, row blocks).
extern "C" __global__ void softmax_grad(float* logits, i64 V, const float* lse, const u32* tgt, float scale, i64 rows,
                                        float cap) {
    i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (j >= V) return;
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
        i64 at = r * V + j;
        float z = logits[at];
        float p = expf(z - lse[r]);
        float g = scale * (j == (i64)tgt[r] ? p - 1.0f : p);
        if (cap > 0.0f) {
            float t = z / cap;
            g *= fmaxf(1.0f - t * t, 0.0f);
        }
        logits[at] = g;
    }
}

// ---- Fused causal attention (flash-attention style) on tensor cores -------------------------------
// One block = 4 warps = 64 queries of one (head, sequence); key tiles of 64 keys are staged in shared
// memory (K as is, V transposed), each warp computes S = Q Kᵀ for its 16 queries with
// mma.sync.m16n8k16 (f16 or bf16 inputs, f32 accumulation), keeps a running max and sum per row, and
// accumulates O = P V with P rounded to the input type, as flash attention does. Scores are kept in
// log2 units (the scale includes log2 e), so every exponential is one ex2.approx. No score matrix ever
// leaves registers. q, k, v are head-major (q heads × rows × HD; k and v heads/group × rows × HD, query head h
// reading key/value head h / group); ctx is row-major (rows × heads·HD).

template <bool BF>
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    if (BF) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

template <bool BF>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u16 a = BF ? f2b(lo) : f2h(lo), b = BF ? f2b(hi) : f2h(hi);
    return (u32)a | ((u32)b << 16);
}

// LDSM: V stays row-major in shared memory and its B fragments come from ldmatrix.trans (coalesced
// loads, conflict-free stores and reads); otherwise V is transposed on its way into shared memory.
template <int HD, bool BF, bool LDSM>
__device__ void flash_attention(const u16* q, const u16* k, const u16* v, u16* ctx, const u32* starts,
                                const u32* lens, int rows, int heads, int group, float scale) {
#if __CUDA_ARCH__ >= 800  // mma.sync m16n8k16 needs sm_80; the host never launches these below it
    __shared__ u32 ks[64][HD / 2 + 4];                     // K tile: [key][dim pair]
    __shared__ __align__(16) u16 vt[LDSM ? 64 : HD][(LDSM ? HD : 64) + 8];  // V: [key][dim] or [dim][key]
    const int s = blockIdx.z, h = blockIdx.y;
    const int len = (int)lens[s], start = (int)starts[s];
    const int q0 = blockIdx.x * 64;
    if (q0 >= len) return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const i64 head_base = ((i64)h * rows + start) * HD;  // element offset of this (head, sequence)
    // Grouped-query attention: `group` query heads share each key/value head.
    const i64 kv_base = ((i64)(h / group) * rows + start) * HD;
    const u32* q32 = (const u32*)(q + head_base);
    const u32* k32 = (const u32*)(k + kv_base);
    const u32* v32 = (const u32*)(v + kv_base);
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two query rows
    // Q fragments for the warp's 16 rows, all HD/16 k-steps.
    u32 qa[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        int c = kk * 8 + t;  // u32 column (dims 2c, 2c+1)
        qa[kk][0] = r0 < len ? q32[(i64)r0 * (HD / 2) + c] : 0u;
        qa[kk][1] = r1 < len ? q32[(i64)r1 * (HD / 2) + c] : 0u;
        qa[kk][2] = r0 < len ? q32[(i64)r0 * (HD / 2) + c + 4] : 0u;
        qa[kk][3] = r1 < len ? q32[(i64)r1 * (HD / 2) + c + 4] : 0u;
    }
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    const int last_key = min(q0 + 63, len - 1);
    for (int key0 = 0; key0 <= last_key; key0 += 64) {
        __syncthreads();
        // A warp's lanes take consecutive dimension pairs of one key: coalesced loads.
        for (int i = tid; i < 64 * (HD / 2); i += blockDim.x) {
            int key = i / (HD / 2), c = i % (HD / 2);
            bool in = key0 + key < len;
            ks[key][c] = in ? k32[(i64)(key0 + key) * (HD / 2) + c] : 0u;
            u32 val = in ? v32[(i64)(key0 + key) * (HD / 2) + c] : 0u;
            if (LDSM) {
                *(u32*)&vt[key][2 * c] = val;
            } else {
                vt[2 * c][key] = (u16)(val & 0xffffu);
                vt[2 * c + 1][key] = (u16)(val >> 16);
            }
        }
        __syncthreads();
        float sc[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int n = 0; n < 8; n++) mma16816<BF>(sc[n], qa[kk], ks[n * 8 + g][kk * 8 + t], ks[n * 8 + g][kk * 8 + t + 4]);
        }
        // Scale, mask (future keys and keys past the sequence), running max per row.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = key0 + n * 8 + 2 * t + (e & 1);
                int row = e < 2 ? r0 : r1;
                float x = (key > row || key >= len) ? NEG_INF : sc[n][e] * scale;  // log2 units
                sc[n][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float b0 = mx0 == NEG_INF ? 0.0f : mx0, b1 = mx1 == NEG_INF ? 0.0f : mx1;
        float c0 = ex2(m0 - b0), c1 = ex2(m1 - b1);  // m = -inf gives 0: nothing to rescale yet
        m0 = mx0;
        m1 = mx1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            o[i][0] *= c0;
            o[i][1] *= c0;
            o[i][2] *= c1;
            o[i][3] *= c1;
        }
        u32 pa[4][4];
#pragma unroll
        for (int n = 0; n < 8; n++) {
            float p0 = ex2(sc[n][0] - b0), p1 = ex2(sc[n][1] - b0);
            float p2 = ex2(sc[n][2] - b1), p3 = ex2(sc[n][3] - b1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            int j = n >> 1, hi = n & 1;
            pa[j][hi * 2 + 0] = pack2<BF>(p0, p1);
            pa[j][hi * 2 + 1] = pack2<BF>(p2, p3);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int dn = 0; dn < HD / 8; dn++) {
                u32 v0, v1;
                if (LDSM) {
                    // Lanes 0-7 address keys j·16 + 0..7, lanes 8-15 keys j·16 + 8..15, at dims dn·8..+7;
                    // .trans hands lane (g, t) keys 2t, 2t+1 (and +8) of dim g: the m16n8k16 B fragment.
                    const u16* row = &vt[j * 16 + (lane & 15)][dn * 8];
                    u32 addr = (u32)__cvta_generic_to_shared(row);
                    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                                 : "=r"(v0), "=r"(v1)
                                 : "r"(addr));
                } else {
                    v0 = *(const u32*)&vt[dn * 8 + g][j * 16 + 2 * t];
                    v1 = *(const u32*)&vt[dn * 8 + g][j * 16 + 2 * t + 8];
                }
                mma16816<BF>(o[dn], pa[j], v0, v1);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int d = heads * HD;
#pragma unroll
    for (int dn = 0; dn < HD / 8; dn++) {
        int col = h * HD + dn * 8 + 2 * t;
        if (r0 < len) *(u32*)&ctx[(i64)(start + r0) * d + col] = pack2<BF>(o[dn][0] * i0, o[dn][1] * i0);
        if (r1 < len) *(u32*)&ctx[(i64)(start + r1) * d + col] = pack2<BF>(o[dn][2] * i1, o[dn][3] * i1);
    }
#endif
}

extern "C" __global__ void __launch_bounds__(128) flash_hd64_f16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention<64, false, true>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_hd64_bf16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention<64, true, true>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_hd128_f16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention<128, false, true>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_hd128_bf16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention<128, true, true>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_tv_hd64_f16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention<64, false, false>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_tv_hd64_bf16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention<64, true, false>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_tv_hd128_f16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention<128, false, false>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_tv_hd128_bf16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention<128, true, false>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}

// ---- Pipelined fused attention ---------------------------------------------------------------------
// The same computation as flash_attention, organised as FlashAttention-2 does:
// - WARPS warps of 16 queries per block (128 queries at heads of 64: half the K/V traffic per query);
// - K/V tiles of KN keys copied global → shared by cp.async (16 bytes per copy, no registers in between),
//   double-buffered: tile i + 1 is in flight while tile i is computed; keys past the sequence are
//   zero-filled by the copy itself;
// - K fragments by ldmatrix (x4: two k-steps of one 8-key n-tile per instruction), V fragments by
//   ldmatrix.trans (x4: two 8-dimension columns), P packed two values per cvt;
// - the mask is applied only on tiles that cross the diagonal or the sequence's end, and a warp skips
//   the tiles that lie wholly past its last query;
// - query blocks are launched last-first (grid.z reversed): the blocks with the most keys start first.
// Grid: (heads, sequences, query blocks); q, k, v, ctx as for flash_attention; q, k, v 16-byte aligned.

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

// Two floats rounded to one register of two halves (lo in the low 16 bits): one instruction.
template <bool BF>
__device__ __forceinline__ u32 pack2x(float lo, float hi) {
    u32 r = 0;
#if __CUDA_ARCH__ >= 800
    if (BF) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

template <int HD, int KN, int WARPS, bool BF>
__device__ void flash_attention_pipelined(const u16* q, const u16* k, const u16* v, u16* ctx, const u32* starts,
                                          const u32* lens, int rows, int heads, int group, float scale) {
#if __CUDA_ARCH__ >= 800
    constexpr int BM = WARPS * 16, THREADS = WARPS * 32, LD = HD + 8;  // row pitch: 16 bytes of padding
    constexpr int CHUNKS = KN * HD / 8;                                    // 16-byte copies per tile and operand
    static_assert(CHUNKS % THREADS == 0, "every thread issues the same number of copies");
    __shared__ __align__(16) u16 ks[2][KN][LD];
    __shared__ __align__(16) u16 vs[2][KN][LD];
    const int h = blockIdx.x, s = blockIdx.y;
    const int len = (int)lens[s], start = (int)starts[s];
    const int q0 = (gridDim.z - 1 - blockIdx.z) * BM;
    if (q0 >= len) return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const i64 head_base = ((i64)h * rows + start) * HD;
    const i64 kv_base = ((i64)(h / group) * rows + start) * HD;  // grouped-query attention
    const u16* kh = k + kv_base;
    const u16* vh = v + kv_base;
    const u32* q32 = (const u32*)(q + head_base);
    const int w0 = q0 + warp * 16;              // the warp's first query
    const int r0 = w0 + g, r1 = r0 + 8;         // this thread's two query rows
    const int w_last = w0 < len ? min(w0 + 15, len - 1) : -1;  // the warp's last query in the sequence (-1: none)
    const int last_key = min(q0 + BM - 1, len - 1);
    const int tiles = last_key / KN + 1;

    // Issues the copies of tile `tile` into buffer `b` (one commit group).
    auto load = [&](int tile, int b) {
        const int key0 = tile * KN;
#pragma unroll
        for (int j = 0; j < CHUNKS / THREADS; j++) {
            const int c = tid + j * THREADS;
            const int key = c / (HD / 8), col = (c % (HD / 8)) * 8;
            const bool in = key0 + key < len;
            const i64 off = in ? (i64)(key0 + key) * HD + col : 0;  // a valid address even when zero-filled
            cp_async16((u32)__cvta_generic_to_shared(&ks[b][key][col]), kh + off, in ? 16 : 0);
            cp_async16((u32)__cvta_generic_to_shared(&vs[b][key][col]), vh + off, in ? 16 : 0);
        }
        cp_async_commit();
    };
    load(0, 0);

    u32 qa[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const int c = kk * 8 + t;
        qa[kk][0] = r0 < len ? q32[(i64)r0 * (HD / 2) + c] : 0u;
        qa[kk][1] = r1 < len ? q32[(i64)r1 * (HD / 2) + c] : 0u;
        qa[kk][2] = r0 < len ? q32[(i64)r0 * (HD / 2) + c + 4] : 0u;
        qa[kk][3] = r1 < len ? q32[(i64)r1 * (HD / 2) + c + 4] : 0u;
    }
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

    for (int it = 0; it < tiles; it++) {
        const int b = it & 1, key0 = it * KN;
        if (it + 1 < tiles) {
            load(it + 1, b ^ 1);  // its buffer was last read in iteration it − 1, before the barrier below
            cp_async_wait<1>();   // tile it has landed (this thread's copies)
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();          // ... and every thread's copies
        if (key0 <= w_last) {     // otherwise every key of the tile lies past the warp's queries
            float sc[KN / 8][4];
#pragma unroll
            for (int n = 0; n < KN / 8; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
            for (int kk2 = 0; kk2 < HD / 32; kk2++) {
#pragma unroll
                for (int n = 0; n < KN / 8; n++) {
                    // Lane l addresses row l & 7 (key n·8 + l & 7) of matrix l >> 3 (dims kk2·32 + (l >> 3)·8):
                    // registers 0-3 are the B fragments (b0, b1) of k-steps 2·kk2 and 2·kk2 + 1.
                    u32 b0, b1, b2, b3;
                    u32 addr = (u32)__cvta_generic_to_shared(&ks[b][n * 8 + (lane & 7)][kk2 * 32 + (lane >> 3) * 8]);
                    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                                 : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                                 : "r"(addr));
                    mma16816<BF>(sc[n], qa[2 * kk2], b0, b1);
                    mma16816<BF>(sc[n], qa[2 * kk2 + 1], b2, b3);
                }
            }
            // Scale; mask only where the tile crosses the warp's diagonal or the sequence's end.
            const bool mask = key0 + KN - 1 > w0 || key0 + KN > len;
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int n = 0; n < KN / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = sc[n][e] * scale;  // log2 units
                    if (mask) {
                        const int key = key0 + n * 8 + 2 * t + (e & 1);
                        if (key > (e < 2 ? r0 : r1) || key >= len) x = NEG_INF;
                    }
                    sc[n][e] = x;
                    if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
                }
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float base0 = mx0 == NEG_INF ? 0.0f : mx0, base1 = mx1 == NEG_INF ? 0.0f : mx1;
            const float c0 = ex2(m0 - base0), c1 = ex2(m1 - base1);
            m0 = mx0;
            m1 = mx1;
            l0 *= c0;
            l1 *= c1;
#pragma unroll
            for (int i = 0; i < HD / 8; i++) {
                o[i][0] *= c0;
                o[i][1] *= c0;
                o[i][2] *= c1;
                o[i][3] *= c1;
            }
            u32 pa[KN / 16][4];
#pragma unroll
            for (int n = 0; n < KN / 8; n++) {
                const float p0 = ex2(sc[n][0] - base0), p1 = ex2(sc[n][1] - base0);
                const float p2 = ex2(sc[n][2] - base1), p3 = ex2(sc[n][3] - base1);
                l0 += p0 + p1;
                l1 += p2 + p3;
                const int j = n >> 1, hi = n & 1;
                pa[j][hi * 2 + 0] = pack2x<BF>(p0, p1);
                pa[j][hi * 2 + 1] = pack2x<BF>(p2, p3);
            }
#pragma unroll
            for (int j = 0; j < KN / 16; j++) {
#pragma unroll
                for (int dn = 0; dn < HD / 8; dn += 2) {
                    // Lanes 0-15 address keys j·16 + (l & 15) at dims dn·8, lanes 16-31 the same keys at
                    // dims (dn + 1)·8; .trans gives the B fragments of dimension columns dn and dn + 1.
                    u32 v0, v1, v2, v3;
                    u32 addr = (u32)__cvta_generic_to_shared(&vs[b][j * 16 + (lane & 15)][(dn + (lane >> 4)) * 8]);
                    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                                 : "=r"(v0), "=r"(v1), "=r"(v2), "=r"(v3)
                                 : "r"(addr));
                    mma16816<BF>(o[dn], pa[j], v0, v1);
                    mma16816<BF>(o[dn + 1], pa[j], v2, v3);
                }
            }
        }
        __syncthreads();  // every warp is done with buffer b before iteration it + 1 refills it
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int d = heads * HD;
#pragma unroll
    for (int dn = 0; dn < HD / 8; dn++) {
        const int col = h * HD + dn * 8 + 2 * t;
        if (r0 < len) *(u32*)&ctx[(i64)(start + r0) * d + col] = pack2x<BF>(o[dn][0] * i0, o[dn][1] * i0);
        if (r1 < len) *(u32*)&ctx[(i64)(start + r1) * d + col] = pack2x<BF>(o[dn][2] * i1, o[dn][3] * i1);
    }
#endif
}

// Heads of 64: 128-query blocks (8 warps), 64-key tiles (36 KiB of shared memory, double-buffered).
extern "C" __global__ void __launch_bounds__(256, 2) flash2_hd64_f16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention_pipelined<64, 64, 8, false>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(256, 2) flash2_hd64_bf16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention_pipelined<64, 64, 8, true>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
// Heads of 128: 64-query blocks (4 warps: the accumulators take twice the registers), 32-key tiles
// (34 KiB, double-buffered, inside the 48 KiB of static shared memory).
extern "C" __global__ void __launch_bounds__(128) flash2_hd128_f16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention_pipelined<128, 32, 4, false>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash2_hd128_bf16(const u16* q, const u16* k, const u16* v, u16* ctx,
        const u32* starts, const u32* lens, int rows, int heads, int group, float scale) {
    flash_attention_pipelined<128, 32, 4, true>(q, k, v, ctx, starts, lens, rows, heads, group, scale);
}
