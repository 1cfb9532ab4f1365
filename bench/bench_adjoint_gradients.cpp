// Benchmarks of the adjoint method (AdjointBackend): forward + backward, float, on T polyattn threads, timed by the
// wall clock (CPU time would add the threads up).
//
// Inputs follow the polynomial-attention authors' setup: q, k ~ N(0, 1)/sqrt(d), v, G ~ N(0, 1), score
// scale c = 1, one head.
//
// Names (select with --benchmark_filter):
//   adjoint/causal:C/g:G/d:D/n:N/threads:T       AdjointBackend forward + backward, Taylor degree G, T threads
//   adjoint_row_major/causal:C/g:2/d:16/n:N/threads:1
//                                                the same on row-major matrices (the storage order of PyTorch and
//                                                numpy), read and written in place: the cost of that layout
//   adjoint_baseline/exact_blocked/causal:C/d:16/n:65536
//                                                ExactBlockedBackend forward + backward, the baseline of the
//                                                issue-3 speed-up target (about 10 s per call)
//   adjoint_window/causal:C/g:2/d:16/n:16384/w:W AdjointBackend forward + backward with an exact window of W
//                                                tokens (PolynomialAttentionOptions::exact_window; 0: none), one
//                                                thread: the accuracy-vs-window figures of issue 12
// Counters: gflops (flops by the count below), features (r); for n <= 2^13 and for adjoint_window also
// rel_error_dQ, rel_error_dK, rel_error_dV = ||dX~ - dX||_F / ||dX||_F against ExactBlockedBackend on the same
// inputs (computed once, outside the timed loop); adjoint_window also rel_error (of O), radius (R) and
// far_radius (R over the pairs outside the window, where the polynomial is used).
//
// Figures of issue 12 (accuracy and cost vs window, n = 16384, d = 16, g = 2):
//   --benchmark_filter='^adjoint_window/' --benchmark_repetitions=3
//
// Flop count of the adjoint method: 7 products of n x r x (d + 1) shape (forward: key state and query
// product; backward: dM_Q, dZ, dM_K, dV and, under the mask, the prefix state again), 2 flops each, i.e.
// 14 n r (d + 1) for causal and non-causal alike, so that their gflops compare as speeds. The exact
// baseline counts (4 + 10) n^2 d (forward: QK^T, PV; backward: QK^T, dV, dP, dQ, dK), halved under the mask.
//
// Targets of issue 3 (one run, e.g.
//   --benchmark_filter='adjoint.*/d:16/n:65536(/threads:1)?$' --benchmark_repetitions=3):
//   adjoint/causal:0/g:2/d:16/n:65536/threads:1 >= 100x faster than adjoint_baseline/exact_blocked/causal:0/d:16/n:65536;
//   adjoint/causal:1/g:2/d:16/n:65536/threads:1 within 1.5x of adjoint/causal:0/g:2/d:16/n:65536/threads:1.
// Threading targets of issue 10: threads:2 vs threads:1 at n = 2^18 (>= 1.8x); causal n = 2^20 on 2 threads < 0.6 s.
#include <polyattn/attention/adjoint_gradients.hpp>
#include <polyattn/attention/exact_gradients.hpp>
#include <polyattn/parallel/threads.hpp>

#include <benchmark/benchmark.h>

#include <map>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>

namespace {

using polyattn::Index;
using Mat = polyattn::Matrix<float>;
using RowMajor = polyattn::RowMajorMatrix<float>;

constexpr Index max_error_n = Index(1) << 13;
constexpr Index baseline_n = Index(1) << 16;
constexpr Index baseline_d = 16;

struct Problem {
  Mat Q, K, V, G;
};

// Inputs of each (n, d), generated once and shared by every benchmark of that shape.
const Problem& problem(Index n, Index d) {
  static std::map<std::pair<Index, Index>, Problem> cache;
  auto found = cache.find({n, d});
  if (found != cache.end()) return found->second;
  std::mt19937 rng(static_cast<std::mt19937::result_type>(7919 * n + d));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float qk_scale = 1.0f / std::sqrt(static_cast<float>(d));
  Problem p{Mat(n, d), Mat(n, d), Mat(n, d), Mat(n, d)};
  for (Index j = 0; j < d; ++j)
    for (Index i = 0; i < n; ++i) {
      p.Q(i, j) = qk_scale * normal(rng);
      p.K(i, j) = qk_scale * normal(rng);
      p.V(i, j) = normal(rng);
      p.G(i, j) = normal(rng);
    }
  return cache.emplace(std::make_pair(n, d), std::move(p)).first->second;
}

polyattn::PolynomialAttentionOptions adjoint_options(bool causal, int degree) {
  polyattn::PolynomialAttentionOptions opt;
  opt.attention.scale = 1.0;
  opt.attention.causal = causal;
  opt.degree = degree;
  return opt;
}

struct Gradients {
  Mat O, dQ, dK, dV;
};

Gradients run_backend(polyattn::AttentionBackend<float>& backend, const Problem& p) {
  Gradients g{Mat(p.Q.rows(), p.V.cols()), Mat(p.Q.rows(), p.Q.cols()), Mat(p.K.rows(), p.K.cols()),
              Mat(p.V.rows(), p.V.cols())};
  backend.forward(p.Q, p.K, p.V, g.O);
  backend.backward(p.Q, p.K, p.V, g.O, p.G, g.dQ, g.dK, g.dV);
  return g;
}

// Exact output and gradients, computed at most once per (n, d, causal) for the rel_error counters.
const Gradients& exact_gradients(Index n, Index d, bool causal) {
  static std::map<std::tuple<Index, Index, bool>, Gradients> cache;
  auto found = cache.find({n, d, causal});
  if (found != cache.end()) return found->second;
  polyattn::ExactBlockedBackend<float> exact(adjoint_options(causal, 2).attention);
  return cache.emplace(std::make_tuple(n, d, causal), run_backend(exact, problem(n, d))).first->second;
}

double relative_error(const Mat& approx, const Mat& exact) {
  return static_cast<double>((approx - exact).norm() / exact.norm());
}

// On matrices stored as `Stored`: Mat (column-major), or RowMajor, read and written in place by the row-major
// overloads.
template <class Stored>
void adjoint_forward_backward(benchmark::State& state, bool causal, int degree, Index d, Index n, int threads) {
  polyattn::set_num_threads(threads);
  const Problem& p = problem(n, d);
  // Row-major runs read copies made here, outside the timed loop; column-major ones the shared inputs.
  using Input = std::conditional_t<std::is_same<Stored, Mat>::value, const Mat&, const Stored>;
  Input Q = p.Q, K = p.K, V = p.V, G = p.G;
  polyattn::AdjointBackend<float> adjoint(adjoint_options(causal, degree));
  Stored O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  // Untimed first call: it faults in the outputs' pages, the workspaces and the checkpoints (170 MiB at n = 2^20),
  // which every later call, as in a training loop, reuses.
  adjoint.forward(Q, K, V, O);
  adjoint.backward(Q, K, V, O, G, dQ, dK, dV);
  for (auto _ : state) {
    adjoint.forward(Q, K, V, O);
    adjoint.backward(Q, K, V, O, G, dQ, dK, dV);
    benchmark::DoNotOptimize(dV.data());
    benchmark::ClobberMemory();
  }
  const auto r = static_cast<double>(adjoint.feature_map().width());
  const double flops = 14.0 * static_cast<double>(n) * r * static_cast<double>(d + 1);
  state.counters["features"] = r;
  state.counters["gflops"] =
      benchmark::Counter(flops * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  if (n <= max_error_n) {
    const Gradients& exact = exact_gradients(n, d, causal);
    state.counters["rel_error_dQ"] = relative_error(dQ, exact.dQ);
    state.counters["rel_error_dK"] = relative_error(dK, exact.dK);
    state.counters["rel_error_dV"] = relative_error(dV, exact.dV);
  }
  polyattn::set_num_threads(0);
}

void adjoint_window_forward_backward(benchmark::State& state, bool causal, Index n, Index window) {
  constexpr Index d = 16;
  polyattn::set_num_threads(1);
  const Problem& p = problem(n, d);
  polyattn::PolynomialAttentionOptions options = adjoint_options(causal, 2);
  options.exact_window = window;
  polyattn::AdjointBackend<float> adjoint(options);
  Mat O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  polyattn::Certificate certificate;
  for (auto _ : state) {
    certificate = adjoint.forward(p.Q, p.K, p.V, O);
    adjoint.backward(p.Q, p.K, p.V, O, p.G, dQ, dK, dV);
    benchmark::DoNotOptimize(dV.data());
    benchmark::ClobberMemory();
  }
  const Gradients& exact = exact_gradients(n, d, causal);
  state.counters["rel_error"] = relative_error(O, exact.O);
  state.counters["rel_error_dQ"] = relative_error(dQ, exact.dQ);
  state.counters["rel_error_dK"] = relative_error(dK, exact.dK);
  state.counters["rel_error_dV"] = relative_error(dV, exact.dV);
  state.counters["radius"] = certificate.radius;
  state.counters["far_radius"] = certificate.far_radius;
  polyattn::set_num_threads(0);
}

void exact_blocked_forward_backward(benchmark::State& state, bool causal) {
  const Problem& p = problem(baseline_n, baseline_d);
  polyattn::set_num_threads(1);
  polyattn::ExactBlockedBackend<float> exact(adjoint_options(causal, 2).attention);
  Mat O(baseline_n, baseline_d), dQ(baseline_n, baseline_d), dK(baseline_n, baseline_d), dV(baseline_n, baseline_d);
  for (auto _ : state) {
    exact.forward(p.Q, p.K, p.V, O);
    exact.backward(p.Q, p.K, p.V, O, p.G, dQ, dK, dV);
    benchmark::DoNotOptimize(dV.data());
    benchmark::ClobberMemory();
  }
  const double n = static_cast<double>(baseline_n);
  const double flops = 14.0 * n * n * static_cast<double>(baseline_d) * (causal ? 0.5 : 1.0);
  state.counters["gflops"] =
      benchmark::Counter(flops * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

const bool registered = [] {
  for (const bool causal : {false, true})
    for (const int degree : {2, 4})
      for (const Index d : {8, 16})
        for (Index n = Index(1) << 10; n <= (Index(1) << 20); n *= 4) {
          // Two threads and 2^20 tokens for the shapes of the threading targets (issue 10).
          const bool threaded = degree == 2 && d == 16 && n >= (Index(1) << 16);
          if (n > (Index(1) << 18) && !(threaded && causal)) continue;
          for (int threads = 1; threads <= (threaded ? 2 : 1); ++threads) {
            const std::string name = "adjoint/causal:" + std::to_string(causal) + "/g:" + std::to_string(degree) +
                                     "/d:" + std::to_string(d) + "/n:" + std::to_string(n) +
                                     "/threads:" + std::to_string(threads);
            benchmark::RegisterBenchmark(name.c_str(), adjoint_forward_backward<Mat>, causal, degree, d, n, threads)
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime();
          }
        }
  for (const bool causal : {false, true})
    for (const Index n : {Index(1) << 16, Index(1) << 18}) {
      const std::string name =
          "adjoint_row_major/causal:" + std::to_string(causal) + "/g:2/d:16/n:" + std::to_string(n) + "/threads:1";
      benchmark::RegisterBenchmark(name.c_str(), adjoint_forward_backward<RowMajor>, causal, 2, Index(16), n, 1)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  for (const bool causal : {false, true})
    for (const Index window : {0, 16, 64, 256}) {
      constexpr Index n = Index(1) << 14;
      const std::string name = "adjoint_window/causal:" + std::to_string(causal) +
                               "/g:2/d:16/n:" + std::to_string(n) + "/w:" + std::to_string(window);
      benchmark::RegisterBenchmark(name.c_str(), adjoint_window_forward_backward, causal, n, window)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  for (const bool causal : {false, true}) {
    const std::string name = "adjoint_baseline/exact_blocked/causal:" + std::to_string(causal) +
                             "/d:" + std::to_string(baseline_d) + "/n:" + std::to_string(baseline_n);
    benchmark::RegisterBenchmark(name.c_str(), exact_blocked_forward_backward, causal)
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
  return true;
}();

}  // namespace
