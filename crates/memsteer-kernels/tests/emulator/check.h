// What the emulator's drivers share: a seeded generator, random inputs, the error measure and the
// report line the tests count ("<case>: worst relative E (bound B)").
#pragma once

static std::mt19937 rng;
static std::normal_distribution<float> normal(0.0f, 1.0f);

// |got − want| relative to max(1, |want|); NaN counts as a failure.
static double rel(double got, double want) {
    double e = std::fabs(got - want) / std::max(1.0, std::fabs(want));
    return std::isnan(e) ? 1e9 : e;
}
static int report(const char* what, double worst, double bound) {
    printf("%s: worst relative %.2e (bound %.0e)\n", what, worst, bound);
    return worst <= bound ? 0 : 1;
}
static std::vector<float> randn(size_t n, float scale = 1.0f, float shift = 0.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = shift + scale * normal(rng);
    return v;
}
static const char* type_name(int dt) { return dt == 0 ? "f32" : (dt == 1 ? "f16" : "bf16"); }
