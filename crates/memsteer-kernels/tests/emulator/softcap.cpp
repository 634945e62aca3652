// Gemma 2's soft-capping on the device, run by the CPU emulator (shim.h) against double: the causal
// softmax of the tiled attention with capped, scaled and windowed scores (`causal_softmax`), the
// final logits' cap (`softcap`), and the steer step's gradient through the cap (`softmax_grad`).
// Exit status 1 and a line per case when any case is off.
#include "kernels.h"

#include "check.h"

// One query tile: qb queries at positions q0.. of their sequence, kn keys, `heads` heads.
static int softmax_case(int heads, int qb, int q0, float scale, int window, float cap, int dt) {
    int kn = q0 + qb;
    std::vector<float> s((size_t)heads * qb * kn);
    for (auto& x : s) x = 8.0f * normal(rng);
    size_t esz = dt == 0 ? 4 : 2;
    std::vector<unsigned char> p(s.size() * esz, 0xFF);  // NaN until written
    launch(qb, heads, 256, [&] { causal_softmax(s.data(), p.data(), dt, qb, kn, q0, scale, window, cap); });
    double worst = 0.0;
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < qb; i++) {
            size_t row = (size_t)h * qb + i;
            int last = q0 + i, first = window > 0 && last + 1 > window ? last + 1 - window : 0;
            double m = -1e300, den = 0.0;
            std::vector<double> z(kn);
            for (int j = first; j <= last; j++) {
                z[j] = s[row * kn + j] * (double)scale;
                if (cap > 0) z[j] = cap * std::tanh(z[j] / cap);
                m = std::max(m, z[j]);
            }
            for (int j = first; j <= last; j++) den += std::exp(z[j] - m);
            for (int j = 0; j < kn; j++) {
                double want = j >= first && j <= last ? std::exp(z[j] - m) / den : 0.0;
                worst = std::max(worst, rel(ld(p.data(), (i64)(row * kn + j), dt), want));
            }
        }
    char what[160];
    snprintf(what, sizeof what, "causal_softmax heads %d, %d queries from %d, scale %.3f, window %d, cap %.1f, %s", heads,
             qb, q0, scale, window, cap, type_name(dt));
    return report(what, worst, dt == 0 ? 1e-6 : (dt == 1 ? 5e-4 : 4e-3));
}

static int softcap_case(int n, float cap, int dt) {
    size_t esz = dt == 0 ? 4 : 2;
    std::vector<unsigned char> x(n * esz);
    std::vector<double> want(n);
    for (int i = 0; i < n; i++) {
        float v = 40.0f * normal(rng);
        st(x.data(), i, dt, v);
        double stored = ld(x.data(), i, dt);
        want[i] = cap * std::tanh(stored / cap);
    }
    launch((n + 255) / 256 > 3 ? 3 : (n + 255) / 256, 1, 256, [&] { softcap(x.data(), dt, n, cap); });  // grid-stride
    double worst = 0.0;
    for (int i = 0; i < n; i++) worst = std::max(worst, rel(ld(x.data(), i, dt), want[i]));
    char what[96];
    snprintf(what, sizeof what, "softcap %d values, cap %.0f, %s", n, cap, type_name(dt));
    return report(what, worst, dt == 0 ? 1e-6 : (dt == 1 ? 1e-3 : 8e-3));
}

static int grad_case(int rows, int V, float scale, float cap) {
    std::vector<float> z((size_t)rows * V), lse(rows);
    std::vector<u32> tgt(rows);
    for (int r = 0; r < rows; r++) {
        double m = -1e300, sum = 0.0;
        for (int j = 0; j < V; j++) {
            float raw = 6.0f * normal(rng);
            z[(size_t)r * V + j] = cap > 0 ? cap * std::tanh(raw / cap) : raw;
            m = std::max(m, (double)z[(size_t)r * V + j]);
        }
        for (int j = 0; j < V; j++) sum += std::exp(z[(size_t)r * V + j] - m);
        lse[r] = (float)(m + std::log(sum));
        tgt[r] = (u32)(rng() % V);
    }
    std::vector<float> g = z;
    launch((V + 255) / 256, rows, 256, [&] { softmax_grad(g.data(), V, lse.data(), tgt.data(), scale, rows, cap); });
    double worst = 0.0;
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < V; j++) {
            double zz = z[(size_t)r * V + j], p = std::exp(zz - (double)lse[r]);
            double want = scale * ((u32)j == tgt[r] ? p - 1.0 : p);
            if (cap > 0) want *= std::max(0.0, 1.0 - (zz / cap) * (zz / cap));
            worst = std::max(worst, rel(g[(size_t)r * V + j], want));
        }
    char what[96];
    snprintf(what, sizeof what, "softmax_grad %d rows of %d, scale %.2f, cap %.1f", rows, V, scale, cap);
    return report(what, worst, 1e-6);
}

int main() {
    rng.seed(11);
    int bad = 0;
    bad += softmax_case(3, 5, 0, 0.125f, 0, 50.0f, 0);
    bad += softmax_case(2, 7, 300, 0.0625f, 4, 1.5f, 0);
    bad += softmax_case(2, 4, 20, 0.25f, 0, 0.0f, 0);
    bad += softmax_case(4, 3, 600, 0.125f, 0, 2.0f, 2);
    bad += softmax_case(2, 6, 40, 0.125f, 16, 50.0f, 1);
    bad += softcap_case(1000, 30.0f, 0);
    bad += softcap_case(777, 3.0f, 2);
    bad += softcap_case(500, 30.0f, 1);
    bad += grad_case(3, 700, 0.5f, 3.0f);
    bad += grad_case(2, 300, 1.0f, 0.0f);
    printf(bad ? "%d case(s) off\n" : "every case within its bound\n", bad);
    return bad ? 1 : 0;
}
