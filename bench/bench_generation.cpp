// Benchmarks of autoregressive generation (nn/generator.hpp): tokens per second once the context holds a long
// prompt, with the polynomial state (adjoint) against the KV cache (exact blocked), in float.
//
// Configuration of issue 12's target: 2 layers, d_model 64, 4 heads (d_h = 16, r = 153 features at g = 2), Taylor
// degree g = 2, byte vocabulary (256), random weights (the cost of a token does not depend on what was learned).
//
// Names (select with --benchmark_filter):
//   generate/method:M/n:N     M in {exact_blocked, adjoint}, prompt of N in {1024, 4096, 16384, 65536} tokens
// Each run draws a random prompt of N tokens and prefills it (not timed; the prefill_s counter), appends one token
// (not timed: the one-row workspaces are allocated), then times `generated_tokens` (128) steps, each drawing a token
// from the logits (temperature 1, seeded) and appending it, so the context grows from N + 1 to N + 129 during the
// timed steps.
// Counters:
//   tokens_per_s   generated tokens per second (sampling included)
//   prefill_s      seconds of the prefill (GPT::forward on the prompt and the states built from it)
//   state_MiB      memory of the decoding state after the last step: KV caches 2 n d numbers per layer,
//                  polynomial states h r (d_h + 1) numbers per layer
//
// Target of issue 12 (one run): tokens_per_s of method:adjoint at n:65536 within 1.2x of n:1024; method:exact_blocked
// falling with n; adjoint / exact_blocked at n:65536 >> 10.
#include <polyattn/nn/generator.hpp>

#include <benchmark/benchmark.h>

#include "benchmark_gpt.hpp"

#include <chrono>
#include <random>
#include <string>
#include <vector>

namespace {

using polyattn::AttentionMethod;
using polyattn::Index;

constexpr Index generated_tokens = 128;

void generate(benchmark::State& state, AttentionMethod method, Index prompt_length) {
  polyattn::GPT<float> model(benchmark_gpt_config(method, prompt_length + 1 + generated_tokens));
  polyattn::Generator<float> generator(model);
  std::mt19937_64 rng(5);
  std::vector<Index> prompt(static_cast<std::size_t>(prompt_length));
  for (Index& t : prompt) t = std::uniform_int_distribution<Index>(0, 255)(rng);
  polyattn::GenerationOptions options;
  options.seed = 9;
  polyattn::TokenSampler sampler(options);

  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  generator.prefill(prompt);
  const double prefill_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  generator.reserve(model.config().context);
  generator.append(sampler.next(generator.logits().row(0)));
  for (auto _ : state) {
    const Index token = sampler.next(generator.logits().row(0));
    benchmark::DoNotOptimize(generator.append(token).data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(1, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["prefill_s"] = prefill_seconds;
  state.counters["state_MiB"] = static_cast<double>(generator.state_bytes()) / (1 << 20);
}

void register_benchmarks() {
  for (const AttentionMethod method : {AttentionMethod::exact_blocked, AttentionMethod::adjoint})
    for (const Index n : {Index(1024), Index(4096), Index(16384), Index(65536)})
      benchmark::RegisterBenchmark(
          (std::string("generate/method:") + polyattn::attention_method_name(method) + "/n:" + std::to_string(n))
              .c_str(),
          [method, n](benchmark::State& state) { generate(state, method, n); })
          ->Iterations(generated_tokens)  // one append each: the context ends full, at n + 1 + generated_tokens
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();
}

const bool registered = (register_benchmarks(), true);

}  // namespace
