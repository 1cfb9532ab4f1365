// Forward + backward of the paper's Algorithm 1 (PaperBackend), float, one head.
// Inputs follow the authors' distribution: q, k ~ N(0, 1)/sqrt(d), v, G ~ N(0, 1); scale 1/sqrt(d).
// `gflops` counts the multiply-adds the implementation performs (2 flops each), see paper_flops().
#include <polyattn/attention/paper_gradients.hpp>

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>

namespace {

using polyattn::Index;
using polyattn::Matrix;

// Backward row chunks: the chunked scan's default for causal attention, PaperBackend's otherwise; set explicitly so
// that the flop count below is exact.
constexpr Index causal_chunk = polyattn::detail::default_scan_rows;
constexpr Index full_chunk = 256;

Matrix<float> random_normal(Index rows, Index cols, std::uint64_t seed, double sigma) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, sigma);
  Matrix<float> m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = static_cast<float>(normal(rng));
  return m;
}

// Flops of one forward + backward with n tokens, head dimension d (= d_v), r features, chunk b.
// k = r (d + 1) is the rank of p~ = U_p V_p^T.
double paper_flops(double n, double d, double r, double b, bool causal) {
  const double k = r * (d + 1);
  double forward = 4 * n * r * (d + 1);           // phi_K^T [V, 1] and phi_Q times it
  double backward = 8 * n * k * d                 // V_p^T K, U_p (.), U_p^T Q, V_p (.)
                    + 4 * n * r * (d + 1)         // U_1^T [G, 1], V_1 (.)
                    + 2 * n * r;                  // the normaliser phi_Q V_1^T 1
  if (causal) {
    // Each chunk's own pairs through its b x b block (counted whole, of which the causal panels are about half).
    forward += n * b * (4 * d + 2);               // in-chunk p(c q.k) block and its product with [V, 1]
    backward += n * b * (14 * d + 4);             // two p(c q.k) blocks, two G V^T blocks, their products with K, Q
                                                  // and [G, 1], the normaliser's row sums
  }
  return forward + backward;
}

void BM_paper_forward_backward(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  const int degree = static_cast<int>(state.range(2));
  const bool causal = state.range(3) != 0;
  polyattn::PolynomialAttentionOptions opt;
  opt.attention.causal = causal;
  opt.degree = degree;
  opt.chunk_size = causal ? causal_chunk : full_chunk;
  polyattn::PaperBackend<float> paper(opt);
  const double sigma_qk = 1 / std::sqrt(static_cast<double>(d));
  const Matrix<float> Q = random_normal(n, d, 1, sigma_qk), K = random_normal(n, d, 2, sigma_qk);
  const Matrix<float> V = random_normal(n, d, 3, 1), G = random_normal(n, d, 4, 1);
  Matrix<float> O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  for (auto _ : state) {
    paper.forward(Q, K, V, O);
    paper.backward(Q, K, V, O, G, dQ, dK, dV);
    benchmark::DoNotOptimize(dQ.data());
    benchmark::DoNotOptimize(dK.data());
    benchmark::DoNotOptimize(dV.data());
    benchmark::ClobberMemory();
  }
  const double r = static_cast<double>(polyattn::feature_width(opt.feature_map, d, degree));
  const double flops = paper_flops(static_cast<double>(n), static_cast<double>(d), r,
                                   static_cast<double>(opt.chunk_size), causal);
  state.counters["gflops"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["features"] = r;
}

BENCHMARK(BM_paper_forward_backward)
    ->ArgNames({"n", "d", "g", "causal"})
    ->ArgsProduct({benchmark::CreateRange(1 << 10, 1 << 16, 2), {8, 16}, {2, 4}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
