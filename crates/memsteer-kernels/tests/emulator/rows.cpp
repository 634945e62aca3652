// The row kernels a new architecture touches, run by the CPU emulator (shim.h) against double: the
// QKV split with rotary positions (rotate-half, partial, per-row positions, bias; the [q | k | v]
// layout with grouped heads and GPT-NeoX's per-head [q k v]), RMSNorm, the q/k norms (per head and
// whole), the gated activations (SiLU, tanh GELU) and the embedding (scale, learned positions, an id
// outside the table giving NaN). Exit status 1 and a line per case when any case is off.
#include "kernels.h"

#include "check.h"

// Layout: neox = per-head [q k v] (head_stride 3·hd), else [q | k | v] (head_stride hd).
static int qkv_case(int rows, int heads, int kv_heads, int hd, int rot, bool neox, bool bias) {
    int row_len = neox ? 3 * heads * hd : (heads + 2 * kv_heads) * hd;
    int q_off = 0, k_off = neox ? hd : heads * hd, v_off = neox ? 2 * hd : (heads + kv_heads) * hd;
    int stride = neox ? 3 * hd : hd;
    int positions = 40, half = rot / 2;
    auto qkv = randn((size_t)rows * row_len), b = randn(row_len, 0.5f);
    std::vector<float> cos_t((size_t)positions * std::max(half, 1)), sin_t(cos_t.size());
    for (int p = 0; p < positions; p++)
        for (int f = 0; f < half; f++) {
            double a = p * std::pow(10000.0, -2.0 * f / rot);
            cos_t[(size_t)p * half + f] = (float)std::cos(a);
            sin_t[(size_t)p * half + f] = (float)std::sin(a);
        }
    std::vector<u32> pos(rows);
    for (int r = 0; r < rows; r++) pos[r] = (u32)(rng() % positions);
    std::vector<float> q((size_t)heads * rows * hd), k((size_t)kv_heads * rows * hd), v(k.size());
    launch(rows, 1, 128, [&] {
        qkv_split(qkv.data(), 0, bias ? b.data() : nullptr, 0, pos.data(), cos_t.data(), sin_t.data(), rot, row_len,
                  q_off, k_off, v_off, stride, q.data(), k.data(), v.data(), 0, rows, heads, kv_heads, hd, positions);
    });
    double worst = 0.0;
    for (int part = 0; part < 3; part++) {
        int n = part == 0 ? heads : kv_heads, off = part == 0 ? q_off : (part == 1 ? k_off : v_off);
        const std::vector<float>& out = part == 0 ? q : (part == 1 ? k : v);
        for (int h = 0; h < n; h++)
            for (int r = 0; r < rows; r++)
                for (int i = 0; i < hd; i++) {
                    auto val = [&](int j) {
                        int at = off + h * stride + j;
                        return (double)qkv[(size_t)r * row_len + at] + (bias ? b[at] : 0.0);
                    };
                    double want = val(i);
                    if (part < 2 && i < rot) {
                        int f = i < half ? i : i - half;
                        double c = cos_t[(size_t)pos[r] * half + f], s = sin_t[(size_t)pos[r] * half + f];
                        want = i < half ? val(i) * c - val(i + half) * s : val(i) * c + val(i - half) * s;
                    }
                    worst = std::max(worst, rel(out[((size_t)h * rows + r) * hd + i], want));
                }
    }
    char what[128];
    snprintf(what, sizeof what, "qkv_split %d rows, heads %d/%d of %d, rotary %d, %s%s", rows, heads, kv_heads, hd, rot,
             neox ? "per-head [q k v]" : "[q | k | v]", bias ? ", bias" : "");
    return report(what, worst, 1e-6);
}

static int rms_case(int rows, int d, int dt) {
    auto x = randn((size_t)rows * d, 3.0f), g = randn(d);
    size_t esz = dt == 0 ? 4 : 2;
    std::vector<unsigned char> xs(x.size() * esz), out(x.size() * esz);
    for (size_t i = 0; i < x.size(); i++) st(xs.data(), (i64)i, dt, x[i]);
    launch(rows, 1, 256, [&] { rms_norm(xs.data(), dt, g.data(), 0, out.data(), dt, d, 1e-6f); });
    double worst = 0.0;
    for (int r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int c = 0; c < d; c++) ss += std::pow((double)ld(xs.data(), (i64)r * d + c, dt), 2);
        double inv = 1.0 / std::sqrt(ss / d + 1e-6);
        for (int c = 0; c < d; c++)
            worst = std::max(worst, rel(ld(out.data(), (i64)r * d + c, dt), ld(xs.data(), (i64)r * d + c, dt) * inv * g[c]));
    }
    char what[64];
    snprintf(what, sizeof what, "rms_norm %d rows of %d, %s", rows, d, type_name(dt));
    return report(what, worst, dt == 0 ? 1e-6 : (dt == 1 ? 1e-3 : 8e-3));
}

// Per head (whole = false: one group per head, Qwen 3) or whole projections (OLMo 2), in place.
static int qk_norm_case(int rows, int heads, int kv_heads, int hd, bool whole) {
    int row_len = (heads + 2 * kv_heads) * hd, k_off = heads * hd;
    int qw = whole ? heads * hd : hd, kw = whole ? kv_heads * hd : hd;
    int qn = heads * hd / qw, kn = kv_heads * hd / kw;
    auto qkv = randn((size_t)rows * row_len, 2.0f), gq = randn(qw), gk = randn(kw);
    auto before = qkv;
    launch(rows, qn + kn, 128, [&] {
        qk_rms_norm(qkv.data(), 0, row_len, 0, qw, qn, qw, k_off, kw, kn, kw, gq.data(), gk.data(), 0, 1e-6f);
    });
    double worst = 0.0;
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < qn + kn; j++) {
            bool is_q = j < qn;
            int w = is_q ? qw : kw, at = is_q ? j * qw : k_off + (j - qn) * kw;
            const std::vector<float>& g = is_q ? gq : gk;
            double ss = 0.0;
            for (int c = 0; c < w; c++) ss += std::pow((double)before[(size_t)r * row_len + at + c], 2);
            double inv = 1.0 / std::sqrt(ss / w + 1e-6);
            for (int c = 0; c < w; c++)
                worst = std::max(worst, rel(qkv[(size_t)r * row_len + at + c], before[(size_t)r * row_len + at + c] * inv * g[c]));
        }
    // The values (after the keys) untouched.
    for (int r = 0; r < rows; r++)
        for (int c = (heads + kv_heads) * hd; c < row_len; c++)
            worst = std::max(worst, rel(qkv[(size_t)r * row_len + c], before[(size_t)r * row_len + c]));
    char what[96];
    snprintf(what, sizeof what, "qk_rms_norm %d rows, heads %d/%d of %d, %s", rows, heads, kv_heads, hd,
             whole ? "whole projections" : "per head");
    return report(what, worst, 1e-6);
}

static int gated_case(int n, int act) {
    auto gate = randn(n, 3.0f), up = randn(n);
    auto out = up;
    launch(2, 1, 256, [&] { gated_act(gate.data(), out.data(), 0, n, act); });
    double worst = 0.0;
    for (int i = 0; i < n; i++) {
        double g = gate[i];
        double a = act == 3 ? g / (1.0 + std::exp(-g))
                            : 0.5 * g * (1.0 + std::tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)));
        worst = std::max(worst, rel(out[i], up[i] * a));
    }
    char what[64];
    snprintf(what, sizeof what, "gated_act %d values, %s", n, act == 3 ? "SiLU" : "tanh GELU");
    return report(what, worst, 1e-6);
}

static int embed_case(int rows, int d, bool learned, float scale) {
    int vocab = 50, positions = 30;
    auto wte = randn((size_t)vocab * d), wpe = randn((size_t)positions * d);
    std::vector<u32> tok(rows), pos(rows);
    for (int r = 0; r < rows; r++) {
        tok[r] = r == rows - 1 ? vocab : (u32)(rng() % vocab);  // the last id is outside the table
        pos[r] = (u32)(rng() % positions);
    }
    std::vector<float> x((size_t)rows * d);
    launch(rows, 1, 128, [&] {
        embed(tok.data(), pos.data(), wte.data(), learned ? wpe.data() : nullptr, 0, x.data(), d, vocab, positions, scale);
    });
    double worst = 0.0;
    for (int r = 0; r < rows - 1; r++)
        for (int c = 0; c < d; c++) {
            double want = ((double)wte[(size_t)tok[r] * d + c] + (learned ? wpe[(size_t)pos[r] * d + c] : 0.0)) * scale;
            worst = std::max(worst, rel(x[(size_t)r * d + c], want));
        }
    for (int c = 0; c < d; c++)
        if (!std::isnan(x[(size_t)(rows - 1) * d + c])) worst = 1e9;  // an id outside the table: NaN
    char what[96];
    snprintf(what, sizeof what, "embed %d rows of %d, %s, scale %.2f, an id outside the table", rows, d,
             learned ? "learned positions" : "no positions", scale);
    return report(what, worst, 1e-6);
}

int main() {
    rng.seed(5);
    int bad = 0;
    bad += qkv_case(5, 4, 2, 16, 16, false, true);
    bad += qkv_case(4, 3, 3, 24, 6, true, true);
    bad += qkv_case(3, 4, 1, 8, 0, false, false);
    bad += rms_case(3, 300, 0);
    bad += rms_case(2, 64, 2);
    bad += rms_case(2, 96, 1);
    bad += qk_norm_case(3, 4, 2, 16, false);
    bad += qk_norm_case(2, 4, 2, 16, true);
    bad += gated_case(600, 3);
    bad += gated_case(300, 2);
    bad += embed_case(6, 40, true, 1.0f);
    bad += embed_case(4, 33, false, 5.656854f);
    printf(bad ? "%d case(s) off\n" : "every case within its bound\n", bad);
    return bad ? 1 : 0;
}
