// The scoring path's memory-bound kernels, run by the CPU emulator (shim.h) against double: layer
// norm (one block per row, and one warp per row with 16-byte loads, where whole warps past the last
// row return early), bias + activation (plain, and eight halves per thread), the residual add, the
// output layer's log-sum-exp and target log-probability (plain, and 16-byte loads with ex2), type
// conversion, and the steer step's row scaling. Exit status 1 and a line per case when any case is off.
#include "kernels.h"

#include "check.h"

static double type_bound(int dt) { return dt == 0 ? 1e-6 : (dt == 1 ? 1e-3 : 8e-3); }
// Values of type dt (rounded from x).
static std::vector<unsigned char> typed(const std::vector<float>& x, int dt) {
    std::vector<unsigned char> out(x.size() * (dt == 0 ? 4 : 2));
    for (size_t i = 0; i < x.size(); i++) st(out.data(), (i64)i, dt, x[i]);
    return out;
}

static int layer_norm_case(int rows, int d, int out_dt, bool warp) {
    auto x = randn((size_t)rows * d, 2.0f, 3.0f), g = randn(d), b = randn(d);
    std::vector<unsigned char> out((size_t)rows * d * (out_dt == 0 ? 4 : 2), 0xFF);
    if (warp) {
        launch((rows + 7) / 8, 1, 256, [&] {
            layer_norm_warp(x.data(), g.data(), b.data(), 0, out.data(), out_dt, rows, d, 1e-5f);
        });
    } else {
        launch(rows, 1, 256, [&] { layer_norm(x.data(), g.data(), b.data(), 0, out.data(), out_dt, d, 1e-5f); });
    }
    double worst = 0.0;
    for (int r = 0; r < rows; r++) {
        double mean = 0.0, var = 0.0;
        for (int c = 0; c < d; c++) mean += x[(size_t)r * d + c];
        mean /= d;
        for (int c = 0; c < d; c++) var += std::pow(x[(size_t)r * d + c] - mean, 2);
        double inv = 1.0 / std::sqrt(var / d + 1e-5);
        for (int c = 0; c < d; c++) {
            double want = (x[(size_t)r * d + c] - mean) * inv * g[c] + b[c];
            worst = std::max(worst, rel(ld(out.data(), (i64)r * d + c, out_dt), want));
        }
    }
    char what[96];
    snprintf(what, sizeof what, "%s %d rows of %d, %s out", warp ? "layer_norm_warp" : "layer_norm", rows, d,
             type_name(out_dt));
    return report(what, worst, out_dt == 0 ? 2e-6 : type_bound(out_dt));
}

static double gelu_ref(double x, int act) {
    if (act == 1) return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    if (act == 2) return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
    return x;
}

static int bias_act_case(int rows, int cols, int act, int out_dt) {
    auto y = randn((size_t)rows * cols, 2.0f), b = randn(cols);
    std::vector<unsigned char> out((size_t)rows * cols * (out_dt == 0 ? 4 : 2), 0xFF);
    launch((cols + 255) / 256, rows, 256, [&] { bias_act(y.data(), 0, b.data(), 0, out.data(), out_dt, rows, cols, act); });
    double worst = 0.0;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            worst = std::max(worst, rel(ld(out.data(), (i64)r * cols + c, out_dt), gelu_ref(y[(size_t)r * cols + c] + b[c], act)));
    char what[64];
    snprintf(what, sizeof what, "bias_act %d × %d, act %d, %s out", rows, cols, act, type_name(out_dt));
    return report(what, worst, type_bound(out_dt));
}

static int bias_act_vec_case(int rows, int cols, int act, int h_dt) {
    auto y0 = randn((size_t)rows * cols, 2.0f), b = randn(cols);
    auto y = typed(y0, h_dt);
    auto before = y;
    int groups = cols / 8;
    launch((groups + 127) / 128, rows, 128, [&] { bias_act_vec(y.data(), b.data(), 0, y.data(), h_dt, rows, cols, act); });
    double worst = 0.0;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            double want = gelu_ref((double)ld(before.data(), (i64)r * cols + c, h_dt) + b[c], act);
            worst = std::max(worst, rel(ld(y.data(), (i64)r * cols + c, h_dt), want));
        }
    char what[64];
    snprintf(what, sizeof what, "bias_act_vec %d × %d, act %d, %s in place", rows, cols, act, type_name(h_dt));
    return report(what, worst, type_bound(h_dt));
}

static int residual_case(int rows, int d, bool second) {
    auto x = randn((size_t)rows * d), ba = randn(d), bb = randn(d);
    auto a = typed(randn((size_t)rows * d), 1), b2 = typed(randn((size_t)rows * d), 1);
    auto before = x;
    launch((d + 255) / 256, rows, 256, [&] {
        residual(x.data(), a.data(), ba.data(), second ? b2.data() : nullptr, bb.data(), 1, 0, rows, d);
    });
    double worst = 0.0;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < d; c++) {
            size_t i = (size_t)r * d + c;
            double want = before[i] + ld(a.data(), (i64)i, 1) + ba[c];
            if (second) want += ld(b2.data(), (i64)i, 1) + bb[c];
            worst = std::max(worst, rel(x[i], want));
        }
    char what[64];
    snprintf(what, sizeof what, "residual %d × %d, f16 branches, %s", rows, d, second ? "two branches" : "one branch");
    return report(what, worst, 1e-6);
}

static int lse_case(int rows, int V, int l_dt, bool vec) {
    auto z = randn((size_t)rows * V, 4.0f);
    auto logits = typed(z, l_dt);
    std::vector<u32> tgt(rows);
    for (int r = 0; r < rows; r++) tgt[r] = r == rows - 1 ? (u32)V : (u32)(rng() % V);  // the last: outside
    std::vector<float> out(rows, -1.0f), lse(rows, -1.0f);
    if (vec) {
        launch(rows, 1, 256, [&] { lse_target_vec(logits.data(), l_dt, V, tgt.data(), out.data(), lse.data()); });
    } else {
        launch(rows, 1, 256, [&] { lse_target(logits.data(), l_dt, V, tgt.data(), out.data(), lse.data()); });
    }
    double worst = 0.0;
    for (int r = 0; r < rows; r++) {
        double m = -1e300, s = 0.0;
        for (int j = 0; j < V; j++) m = std::max(m, (double)ld(logits.data(), (i64)r * V + j, l_dt));
        for (int j = 0; j < V; j++) s += std::exp(ld(logits.data(), (i64)r * V + j, l_dt) - m);
        double l = m + std::log(s);
        worst = std::max(worst, rel(lse[r], l));
        if (tgt[r] < (u32)V) worst = std::max(worst, rel(out[r], ld(logits.data(), (i64)r * V + tgt[r], l_dt) - l));
        else if (!std::isnan(out[r])) worst = 1e9;  // a target outside the vocabulary: NaN
    }
    char what[80];
    snprintf(what, sizeof what, "%s %d rows of %d, %s logits", vec ? "lse_target_vec" : "lse_target", rows, V,
             type_name(l_dt));
    return report(what, worst, 2e-6);
}

static int convert_case(int n, int from, int to) {
    auto x0 = randn(n, 30.0f);
    auto x = typed(x0, from);
    std::vector<unsigned char> y((size_t)n * (to == 0 ? 4 : 2), 0xFF);
    launch(2, 1, 256, [&] { convert(x.data(), from, y.data(), to, n); });
    double worst = 0.0;
    for (int i = 0; i < n; i++) {
        // Exactly the rounding of the source value to the target type.
        float v = ld(x.data(), i, from);
        std::vector<unsigned char> one(4);
        st(one.data(), 0, to, v);
        if (std::memcmp(one.data(), y.data() + (size_t)i * (to == 0 ? 4 : 2), to == 0 ? 4 : 2) != 0) worst = 1e9;
    }
    char what[48];
    snprintf(what, sizeof what, "convert %d values %s to %s", n, type_name(from), type_name(to));
    return report(what, worst, 0.0);
}

static int scale_rows_case(int rows, int cols, int steers, int i, float factor) {
    auto m = randn((size_t)rows * cols), strengths = randn((size_t)rows * steers);
    auto before = m;
    launch((cols + 255) / 256, rows, 256, [&] { scale_rows(m.data(), cols, strengths.data(), steers, i, factor, rows); });
    double worst = 0.0;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            double want = (double)before[(size_t)r * cols + c] * ((double)factor * strengths[(size_t)r * steers + i]);
            worst = std::max(worst, rel(m[(size_t)r * cols + c], want));
        }
    char what[64];
    snprintf(what, sizeof what, "scale_rows %d × %d by steer %d of %d", rows, cols, i, steers);
    return report(what, worst, 1e-6);
}

int main() {
    rng.seed(9);
    int bad = 0;
    bad += layer_norm_case(3, 300, 0, false);
    bad += layer_norm_case(2, 128, 2, false);
    bad += layer_norm_case(13, 256, 0, true);
    bad += layer_norm_case(9, 64, 1, true);
    bad += layer_norm_case(5, 96, 2, true);
    bad += bias_act_case(5, 300, 0, 0);
    bad += bias_act_case(3, 260, 1, 0);
    bad += bias_act_case(4, 100, 2, 1);
    bad += bias_act_vec_case(4, 64, 2, 1);
    bad += bias_act_vec_case(3, 2056, 1, 2);
    bad += residual_case(4, 300, true);
    bad += residual_case(3, 70, false);
    bad += lse_case(3, 1000, 0, false);
    bad += lse_case(2, 999, 1, false);
    bad += lse_case(3, 1000, 0, true);
    bad += lse_case(3, 1024, 1, true);
    bad += convert_case(1000, 0, 2);
    bad += convert_case(600, 2, 1);
    bad += convert_case(600, 1, 0);
    bad += scale_rows_case(5, 300, 3, 1, 0.25f);
    printf(bad ? "%d case(s) off\n" : "every case within its bound\n", bad);
    return bad ? 1 : 0;
}
