// Forward + backward of exact attention (float, one head): the materialised reference (ExactReferenceBackend,
// n <= 2^12, single-threaded) and the blocked FlashAttention-2 style backend (ExactBlockedBackend, n = 2^10 ... 2^16,
// on T polyattn threads, timed by the wall clock), the baseline of the approximate gradients' speed-up targets.
//
// Inputs follow the authors' distribution: q, k ~ N(0, 1)/sqrt(d), v, G ~ N(0, 1); scale 1/sqrt(d). The
// exact methods' speed does not depend on the values.
//
// Names: BM_exact_reference_fwd_bwd/n:N/d:D/causal:C and BM_exact_blocked_fwd_bwd/n:N/d:D/causal:C/threads:T.
// Counters:
//   gflops      multiply-adds actually performed (2 flops each) per second, see the *_flops() functions:
//               the blocked backend computes whole diagonal blocks under the mask, the reference computes
//               the full n x n matrices in both cases;
//   forward_s, backward_s   seconds per iteration of each half (blocked only).
// n >= 2^14 runs a single iteration after an untimed one (about 20 s each at n = 2^16, d = 16 without mask on one
// core).
// Example: --benchmark_filter='^BM_exact_blocked.*n:65536/d:16'
// Threading target: threads:2 vs threads:1 at n = 2^14, d = 16 (>= 1.8x), measured with
//   --benchmark_filter='^BM_exact_blocked_fwd_bwd/n:16384/d:16/causal:./threads:./' --benchmark_repetitions=5
#include <polyattn/attention/exact_gradients.hpp>
#include <polyattn/parallel/threads.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>

namespace {

using polyattn::Index;
using polyattn::Matrix;

Matrix<float> random_normal(Index rows, Index cols, std::uint64_t seed, double sigma) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, sigma);
  Matrix<float> m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = static_cast<float>(normal(rng));
  return m;
}

struct Inputs {
  Matrix<float> Q, K, V, G;
};

Inputs make_inputs(Index n, Index d) {
  const double sigma_qk = 1 / std::sqrt(static_cast<double>(d));
  return {random_normal(n, d, 1, sigma_qk), random_normal(n, d, 2, sigma_qk), random_normal(n, d, 3, 1),
          random_normal(n, d, 4, 1)};
}

// Reference: forward S (d) and S V (d); backward recomputes S, P V, then G V^T, dQ, dK, dV: 4 (d_k + d_v)
// multiply-adds per entry of the full n x n matrix, masked or not.
double reference_flops(double n, double d) { return 2 * n * n * 4 * (d + d); }

// Blocked, counting the block pairs the loops of ExactAttention and of the two passes of ExactBlockedBackend
// visit (n queries and n keys): the dQ pass does 2 d_k + d_v multiply-adds per score, the dK, dV pass 2 d_k + 2 d_v.
double blocked_flops(Index n, Index d, bool causal, const polyattn::ExactBlockedOptions& blocks) {
  double forward_pairs = 0, query_pass_pairs = 0, key_pass_pairs = 0;
  for (Index q0 = 0; q0 < n; q0 += blocks.forward_query_block) {
    const Index bq = std::min(blocks.forward_query_block, n - q0);
    forward_pairs += static_cast<double>(bq) * static_cast<double>(causal ? q0 + bq : n);
  }
  for (Index q0 = 0; q0 < n; q0 += blocks.query_block) {
    const Index bq = std::min(blocks.query_block, n - q0);
    query_pass_pairs += static_cast<double>(bq) * static_cast<double>(causal ? q0 + bq : n);
  }
  for (Index k0 = 0; k0 < n; k0 += blocks.key_block) {
    const Index bk = std::min(blocks.key_block, n - k0);
    const Index first_query = causal ? (k0 / blocks.query_block) * blocks.query_block : 0;
    key_pass_pairs += static_cast<double>(bk) * static_cast<double>(n - first_query);
  }
  const double dk = static_cast<double>(d), dv = dk;
  return 2 * (forward_pairs * (dk + dv) + query_pass_pairs * (2 * dk + dv) + key_pass_pairs * (2 * dk + 2 * dv));
}

void set_gflops(benchmark::State& state, double flops) {
  state.counters["gflops"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

polyattn::AttentionOptions options(bool causal) {
  polyattn::AttentionOptions opt;
  opt.causal = causal;
  return opt;
}

void BM_exact_reference_fwd_bwd(benchmark::State& state) {
  Eigen::setNbThreads(1);
  const Index n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  const Inputs in = make_inputs(n, d);
  polyattn::ExactReferenceBackend<float> exact(options(causal));
  Matrix<float> O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  for (auto _ : state) {
    exact.forward(in.Q, in.K, in.V, O);
    exact.backward(in.Q, in.K, in.V, O, in.G, dQ, dK, dV);
    benchmark::DoNotOptimize(dQ.data());
    benchmark::ClobberMemory();
  }
  set_gflops(state, reference_flops(static_cast<double>(n), static_cast<double>(d)));
}

void BM_exact_blocked_fwd_bwd(benchmark::State& state) {
  Eigen::setNbThreads(1);
  const Index n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  polyattn::set_num_threads(static_cast<int>(state.range(3)));
  const Inputs in = make_inputs(n, d);
  const polyattn::ExactBlockedOptions blocks;
  polyattn::ExactBlockedBackend<float> exact(options(causal), blocks);
  Matrix<float> O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  // Untimed first call: it allocates the workspaces and faults in their pages and the outputs', which every later
  // call, as in a training loop, reuses. The runs of one iteration (n >= 2^14) would otherwise time them too, a
  // serial cost that made the two-thread speed-up 1.65x instead of 1.9x on a machine twice as fast as the first.
  exact.forward(in.Q, in.K, in.V, O);
  exact.backward(in.Q, in.K, in.V, O, in.G, dQ, dK, dV);
  double forward_seconds = 0, backward_seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    exact.forward(in.Q, in.K, in.V, O);
    benchmark::ClobberMemory();
    const auto middle = std::chrono::steady_clock::now();
    exact.backward(in.Q, in.K, in.V, O, in.G, dQ, dK, dV);
    benchmark::DoNotOptimize(dQ.data());
    benchmark::ClobberMemory();
    const auto end = std::chrono::steady_clock::now();
    forward_seconds += std::chrono::duration<double>(middle - start).count();
    backward_seconds += std::chrono::duration<double>(end - middle).count();
  }
  set_gflops(state, blocked_flops(n, d, causal, blocks));
  state.counters["forward_s"] = benchmark::Counter(forward_seconds, benchmark::Counter::kAvgIterations);
  state.counters["backward_s"] = benchmark::Counter(backward_seconds, benchmark::Counter::kAvgIterations);
  polyattn::set_num_threads(0);
}

}  // namespace

BENCHMARK(BM_exact_reference_fwd_bwd)
    ->ArgNames({"n", "d", "causal"})
    ->ArgsProduct({benchmark::CreateRange(1 << 10, 1 << 12, 2), {8, 16}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK(BM_exact_blocked_fwd_bwd)
    ->ArgNames({"n", "d", "causal", "threads"})
    ->ArgsProduct({benchmark::CreateRange(1 << 10, 1 << 13, 2), {8, 16}, {0, 1}, {1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK(BM_exact_blocked_fwd_bwd)
    ->ArgNames({"n", "d", "causal", "threads"})
    ->ArgsProduct({benchmark::CreateRange(1 << 14, 1 << 16, 2), {8, 16}, {0, 1}, {1}})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Two threads for the shape of the threading target.
BENCHMARK(BM_exact_blocked_fwd_bwd)
    ->ArgNames({"n", "d", "causal", "threads"})
    ->ArgsProduct({{1 << 14}, {16}, {0, 1}, {2}})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
