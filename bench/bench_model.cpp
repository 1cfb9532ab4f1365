// Benchmarks of one GPT training step (nn/gpt.hpp): forward, backward, gradient-norm clipping and AdamW, in float.
//
// Configuration of issue 4's target: 2 layers, d_model 64, 4 heads (d_h = 16), Taylor degree g = 2 for the
// adjoint backend, byte vocabulary (256), one sequence per step; random tokens, next-token targets.
//
// Names (select with --benchmark_filter):
//   train_step/method:M/n:N     M in {exact_blocked, adjoint}, context N in {1024, 4096, 16384, 65536}
// Counters:
//   tokens_per_s   tokens trained per second
//   attention_ms   time spent inside the attention layers' forward and backward per step (measured with a
//                  separate instrumented step outside the timed loop), the rest being embedding, LayerNorm,
//                  MLP, head, loss and optimizer, which cost the same for both methods
//   loss           the loss of the last timed step (a sanity check that both methods train the same model)
//
// Target of issue 4 (compare in one run, --benchmark_filter='n:4096'):
//   train_step/method:adjoint/n:4096 >= 10x faster than train_step/method:exact_blocked/n:4096.
// Only the attention term grows quadratically; the rest of the step (about 2.8 GFLOP at n = 4096 in this
// configuration) is the same for both methods and bounds the ratio at a given n, hence n = 16384.
// Issue 10's targets, both on 2 threads: >= 10x at n = 16384 and >= 40x at n = 65536 (one exact step at 65536
// takes about a minute: run it with --benchmark_min_time=1 or less).
#include <polyattn/nn/gpt.hpp>
#include <polyattn/nn/optimizer.hpp>

#include <benchmark/benchmark.h>

#include "benchmark_gpt.hpp"

#include <chrono>
#include <random>
#include <string>
#include <vector>

namespace {

using polyattn::AttentionMethod;
using polyattn::Index;

void train_step(benchmark::State& state, AttentionMethod method, Index n) {
  polyattn::GPT<float> model(benchmark_gpt_config(method, n));
  polyattn::AdamWOptions adam_options;
  adam_options.learning_rate = 1e-3;
  polyattn::AdamW<float> adam(model.parameters(), adam_options);
  std::mt19937_64 rng(5);
  std::vector<Index> tokens(static_cast<std::size_t>(n)), targets(static_cast<std::size_t>(n));
  for (Index& t : tokens) t = std::uniform_int_distribution<Index>(0, 255)(rng);
  for (std::size_t i = 0; i + 1 < tokens.size(); ++i) targets[i] = tokens[i + 1];
  targets.back() = -1;

  const auto step = [&] {
    adam.zero_grad();
    const double loss = model.forward(tokens, targets);
    model.backward();
    polyattn::clip_grad_norm(model.parameters(), 1.0);
    adam.step();
    return loss;
  };
  double loss = step();  // warm-up: allocates every workspace and optimizer state
  for (auto _ : state) {
    loss = step();
    benchmark::DoNotOptimize(loss);
  }

  // One instrumented step, outside the timed loop: the attention layers' own share of it.
  using Clock = std::chrono::steady_clock;
  double attention_seconds = 0;
  for (Index layer = 0; layer < model.config().layers; ++layer) {
    polyattn::SelfAttention<float>& attention = model.attention(layer);
    const Index d = model.config().d_model;
    const polyattn::Matrix<float> X = polyattn::Matrix<float>::Random(n, d);
    polyattn::Matrix<float> Y(n, d), dX = polyattn::Matrix<float>::Zero(n, d);
    const auto start = Clock::now();
    attention.forward(X, Y);
    attention.backward(X, Y, dX);
    attention_seconds += std::chrono::duration<double>(Clock::now() - start).count();
  }
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["attention_ms"] = 1e3 * attention_seconds;
  state.counters["loss"] = loss;
}

void register_benchmarks() {
  for (const AttentionMethod method : {AttentionMethod::exact_blocked, AttentionMethod::adjoint})
    for (const Index n : {Index(1024), Index(4096), Index(16384), Index(65536)})
      benchmark::RegisterBenchmark(
          (std::string("train_step/method:") + polyattn::attention_method_name(method) + "/n:" + std::to_string(n))
              .c_str(),
          [method, n](benchmark::State& state) { train_step(state, method, n); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
}

const bool registered = (register_benchmarks(), true);

}  // namespace
