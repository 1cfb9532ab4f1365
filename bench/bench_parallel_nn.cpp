// Benchmarks of the per-token layers on several threads (issue 10): one forward and one backward of a Linear
// (64 -> 256, GPT's MLP input layer) and of an MLP (d_model 64, hidden 256, GELU), in float, at n = 16384 tokens.
//
// Names (select with --benchmark_filter):
//   linear_step/threads:T     Linear forward + backward on T threads (polyattn::set_num_threads(T))
//   mlp_step/threads:T        MLP forward + backward on T threads
// Times are wall-clock (UseRealTime: CPU time would sum the threads). Outputs and gradients are the same for
// every T (tests/test_parallel_nn.cpp); only the time changes. Compare T = 2 with T = 1 on an otherwise idle
// machine with at least two cores.
// Counters:
//   tokens_per_s   tokens through forward and backward per second
#include <polyattn/nn/linear.hpp>
#include <polyattn/nn/mlp.hpp>
#include <polyattn/parallel/threads.hpp>

#include <benchmark/benchmark.h>

#include <random>

namespace {

using polyattn::Index;
using polyattn::Matrix;

constexpr Index tokens = 16384;
constexpr Index d_model = 64;
constexpr Index hidden = 4 * d_model;

Matrix<float> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = normal(rng);
  return m;
}

// Forward and backward of `layer` (in -> out) per iteration on `threads` threads. Gradients accumulate across
// iterations (an optimizer would zero them; that is not the layer's cost).
template <class Layer>
void run_step(benchmark::State& state, Layer& layer, Index in, Index out) {
  polyattn::set_num_threads(static_cast<int>(state.range(0)));
  const Matrix<float> X = random_matrix(tokens, in, 1), dY = random_matrix(tokens, out, 2);
  Matrix<float> Y(tokens, out), dX = Matrix<float>::Zero(tokens, in);
  layer.forward(X, Y);  // warm-up: sizes the layer's workspaces
  layer.backward(X, dY, dX);
  for (auto _ : state) {
    layer.forward(X, Y);
    layer.backward(X, dY, dX);
    benchmark::ClobberMemory();
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(tokens) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
  polyattn::set_num_threads(0);
}

void linear_step(benchmark::State& state) {
  polyattn::Linear<float> layer({d_model, hidden}, "fc");
  run_step(state, layer, d_model, hidden);
}

void mlp_step(benchmark::State& state) {
  polyattn::MLP<float> layer({d_model}, "mlp");
  run_step(state, layer, d_model, d_model);
}

}  // namespace

BENCHMARK(linear_step)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(mlp_step)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
