// The decoding kernels of kernels.cu (cache_store, cached_attention), run by the CPU emulator
// (shim.h), against attention computed here in double from the same keys, values and queries.
// One step of three sequences with caches of different capacities: a prompt of 5 on an empty cache
// (rows at positions 0-4: warps that see no key), one token at position 9, a chunk of 3 at positions
// 4-6; several layers, grouped heads, heads of 32 to 256 (partial lanes at 80), windows, scales,
// soft-caps, f32, f16 and bf16. Every cache buffer starts as NaN and, after each store, must equal
// the image this file computes with its own offsets (what was stored where, NaN elsewhere).
// Exit status 1 and a line per case when any case is off.
#include "kernels.h"


// Offset of one position of one key/value head's keys (part 0) or values (part 1): the layout of
// memsteer_kernels::cuda::cache_len, written out here rather than taken from the kernels.
static size_t slot(int layer, int part, int kv_heads, int head, int capacity, int p, int hd) {
    return ((((size_t)layer * 2 + part) * kv_heads + head) * capacity + p) * hd;
}

struct Case {
    int layers, heads, kv_heads, hd, window;
    float scale, cap;
    int dt;
};

static int run(const Case& c, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int S = 3, caps[S] = {7, 13, 9}, pasts[S] = {0, 9, 4}, news[S] = {5, 1, 3};
    const size_t esz = c.dt == 0 ? 4 : 2;
    auto round = [&](float v) { return c.dt == 0 ? v : (c.dt == 1 ? h2f(f2h(v)) : b2f(f2b(v))); };
    // Every key and value of every sequence, [layer][kv head][position][dim], and the cache buffers.
    std::vector<std::vector<float>> K(S), V(S);
    std::vector<std::vector<unsigned char>> buf(S), image(S);
    std::vector<unsigned long long> addresses(S);
    std::vector<u32> capacities(S);
    for (int s = 0; s < S; s++) {
        size_t values = (size_t)c.layers * c.kv_heads * caps[s] * c.hd;
        buf[s].assign(2 * values * esz, 0xFF);  // NaN where nothing is stored
        image[s] = buf[s];
        addresses[s] = (unsigned long long)(uintptr_t)buf[s].data();
        capacities[s] = caps[s];
        K[s].resize(values);
        V[s].resize(values);
        for (auto& x : K[s]) x = round(normal(rng));
        for (auto& x : V[s]) x = round(normal(rng));
        // What earlier steps stored.
        for (int l = 0; l < c.layers; l++)
            for (int h = 0; h < c.kv_heads; h++)
                for (int p = 0; p < pasts[s]; p++)
                    for (int d = 0; d < c.hd; d++) {
                        size_t at = (((size_t)l * c.kv_heads + h) * caps[s] + p) * c.hd + d;
                        st(buf[s].data(), slot(l, 0, c.kv_heads, h, caps[s], p, c.hd) + d, c.dt, K[s][at]);
                        st(buf[s].data(), slot(l, 1, c.kv_heads, h, caps[s], p, c.hd) + d, c.dt, V[s][at]);
                    }
        image[s] = buf[s];
    }
    std::vector<u32> seq, pos;
    for (int s = 0; s < S; s++)
        for (int i = 0; i < news[s]; i++) {
            seq.push_back(s);
            pos.push_back(pasts[s] + i);
        }
    const int rows = (int)seq.size();
    double worst = 0.0;
    for (int layer = 0; layer < c.layers; layer++) {
        // This step's keys and values (kv_heads × rows × hd) and queries (heads × rows × hd), head-major.
        std::vector<unsigned char> k(c.kv_heads * rows * c.hd * esz), v(k.size());
        std::vector<unsigned char> q(c.heads * rows * c.hd * esz), ctx(rows * c.heads * c.hd * esz, 0xFF);
        for (int h = 0; h < c.kv_heads; h++)
            for (int r = 0; r < rows; r++)
                for (int d = 0; d < c.hd; d++) {
                    size_t at = (((size_t)layer * c.kv_heads + h) * caps[seq[r]] + pos[r]) * c.hd + d;
                    st(k.data(), ((i64)h * rows + r) * c.hd + d, c.dt, K[seq[r]][at]);
                    st(v.data(), ((i64)h * rows + r) * c.hd + d, c.dt, V[seq[r]][at]);
                }
        std::vector<float> qf(c.heads * rows * c.hd);
        for (size_t i = 0; i < qf.size(); i++) {
            qf[i] = round(normal(rng));
            st(q.data(), (i64)i, c.dt, qf[i]);
        }
        launch(rows, c.kv_heads, 128, [&] {
            cache_store(k.data(), v.data(), addresses.data(), capacities.data(), seq.data(), pos.data(), c.dt, rows,
                        c.kv_heads, c.hd, layer);
        });
        // The store wrote this layer's rows where the layout says, and nothing else.
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < c.kv_heads; h++)
                for (int d = 0; d < c.hd; d++) {
                    size_t at = (((size_t)layer * c.kv_heads + h) * caps[seq[r]] + pos[r]) * c.hd + d;
                    st(image[seq[r]].data(), slot(layer, 0, c.kv_heads, h, caps[seq[r]], pos[r], c.hd) + d, c.dt, K[seq[r]][at]);
                    st(image[seq[r]].data(), slot(layer, 1, c.kv_heads, h, caps[seq[r]], pos[r], c.hd) + d, c.dt, V[seq[r]][at]);
                }
        for (int s = 0; s < S; s++)
            if (std::memcmp(image[s].data(), buf[s].data(), buf[s].size()) != 0) {
                printf("cache_store, layer %d, sequence %d: the cache differs from the layout's image\n", layer, s);
                worst = 1e9;
            }
        launch(rows, c.heads, 128, [&] {
            cached_attention(q.data(), addresses.data(), capacities.data(), seq.data(), pos.data(), ctx.data(), c.dt,
                             rows, c.heads, c.kv_heads, c.hd, layer, c.scale, c.window, c.cap);
        });
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < c.heads; h++) {
                int s = seq[r], p = pos[r], kvh = h / (c.heads / c.kv_heads);
                int first = c.window > 0 && p + 1 > c.window ? p + 1 - c.window : 0;
                auto key = [&](int j, int d) { return K[s][(((size_t)layer * c.kv_heads + kvh) * caps[s] + j) * c.hd + d]; };
                auto value = [&](int j, int d) { return V[s][(((size_t)layer * c.kv_heads + kvh) * caps[s] + j) * c.hd + d]; };
                std::vector<double> w;
                double m = -1e300;
                for (int j = first; j <= p; j++) {
                    double dot = 0.0;
                    for (int d = 0; d < c.hd; d++) dot += (double)qf[((size_t)h * rows + r) * c.hd + d] * key(j, d);
                    double x = dot * c.scale;
                    if (c.cap > 0) x = c.cap * std::tanh(x / c.cap);
                    w.push_back(x);
                    m = std::max(m, x);
                }
                double den = 0.0;
                for (auto& x : w) den += (x = std::exp(x - m));
                for (int d = 0; d < c.hd; d++) {
                    double want = 0.0;
                    for (int j = first; j <= p; j++) want += w[j - first] * value(j, d);
                    want /= den;
                    double got = ld(ctx.data(), (i64)r * c.heads * c.hd + (i64)h * c.hd + d, c.dt);
                    double err = std::fabs(got - want) / std::max(1.0, std::fabs(want));
                    worst = std::isnan(err) ? 1e9 : std::max(worst, err);
                }
            }
    }
    // f32: the kernel's float sums against double; f16 and bf16: the output rounded to 2^-11 and 2^-8.
    double bound = c.dt == 0 ? 1e-5 : (c.dt == 1 ? 1e-3 : 8e-3);
    printf("layers %d, heads %d/%d of %d, window %d, scale %.4f, cap %.1f, %s: worst relative %.2e (bound %.0e)\n",
           c.layers, c.heads, c.kv_heads, c.hd, c.window, c.scale, c.cap, c.dt == 0 ? "f32" : (c.dt == 1 ? "f16" : "bf16"), worst, bound);
    return worst <= bound ? 0 : 1;
}

int main() {
    const Case cases[] = {
        {2, 4, 2, 64, 0, 0.125f, 0.0f, 0},
        {2, 4, 2, 80, 3, 0.1118f, 0.0f, 0},
        {2, 4, 2, 256, 0, 0.125f, 1.5f, 0},
        {1, 2, 1, 256, 4, 0.0625f, 50.0f, 0},
        {2, 8, 2, 128, 0, 0.0884f, 0.0f, 2},
        {1, 3, 3, 32, 2, 0.3f, 0.0f, 0},
        {1, 4, 1, 64, 5, 0.125f, 2.0f, 2},
        {2, 4, 2, 64, 0, 0.125f, 0.0f, 1},
        {1, 2, 1, 128, 3, 0.0884f, 30.0f, 1},
    };
    int bad = 0;
    unsigned seed = 1;
    for (const Case& c : cases) bad += run(c, seed++);
    printf(bad ? "%d case(s) off\n" : "every case within its bound\n", bad);
    return bad ? 1 : 0;
}
