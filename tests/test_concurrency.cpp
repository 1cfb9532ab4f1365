// The thread-safety contract of README ("Threads"): distinct objects are independent, so any number of threads
// may each drive their own backend, attention object or model at the same time and get exactly the results of a
// serial run. (One object shared by two threads at once is not supported: objects keep workspaces.) The CI script
// also builds this file alone under ThreadSanitizer, which reports any data race these runs provoke.
#include <polyattn/attention/backend_factory.hpp>
#include <polyattn/nn/gpt.hpp>
#include <polyattn/nn/optimizer.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <thread>
#include <vector>

using polyattn::AttentionMethod;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::testing::random_matrix;

namespace {

// Everything one forward+backward call of a backend writes.
template <class T>
struct Outputs {
  Matrix<T> O, dQ, dK, dV;
  bool operator==(const Outputs& other) const {
    return O == other.O && dQ == other.dQ && dK == other.dK && dV == other.dV;
  }
};

// One job: its own backend object, inputs of its own shape, run `repeats` times (every result must be the same).
template <class T>
struct BackendJob {
  AttentionMethod method;
  bool causal;
  Index n, heads;
  std::uint64_t seed;

  Outputs<T> run(int repeats) const {
    polyattn::PolynomialAttentionOptions options;
    options.attention.causal = causal;
    options.attention.heads = heads;
    options.degree = 2;
    auto backend = polyattn::make_attention_backend<T>(method, options);
    const Index d = 4 * heads;
    const Matrix<T> Q = random_matrix<T>(n, d, seed, 0.5), K = random_matrix<T>(n, d, seed + 1, 0.5);
    const Matrix<T> V = random_matrix<T>(n, d, seed + 2), G = random_matrix<T>(n, d, seed + 3);
    Outputs<T> first, out{Matrix<T>(n, d), Matrix<T>(n, d), Matrix<T>(n, d), Matrix<T>(n, d)};
    for (int repeat = 0; repeat < repeats; ++repeat) {
      backend->forward(Q, K, V, out.O);
      backend->backward(Q, K, V, out.O, G, out.dQ, out.dK, out.dV);
      if (repeat == 0)
        first = out;
      else if (!(out == first))
        first.O.setConstant(T(-1));  // marks a run whose repeats disagreed; compared below
    }
    return first;
  }
};

template <class T>
std::vector<BackendJob<T>> backend_jobs() {
  std::vector<BackendJob<T>> jobs;
  std::uint64_t seed = 100;
  for (const AttentionMethod method : polyattn::all_attention_methods)
    for (const bool causal : {false, true}) {
      jobs.push_back({method, causal, 40 + static_cast<Index>(seed % 7) * 9, 1 + static_cast<Index>(seed % 2), seed});
      seed += 10;
    }
  return jobs;
}

// Runs every job on its own thread, all at once, and returns their results in job order.
template <class Job>
auto run_concurrently(const std::vector<Job>& jobs, int repeats) {
  std::vector<decltype(jobs.front().run(repeats))> results(jobs.size());
  std::vector<std::thread> threads;
  for (std::size_t j = 0; j < jobs.size(); ++j)
    threads.emplace_back([&, j] { results[j] = jobs[j].run(repeats); });
  for (std::thread& thread : threads) thread.join();
  return results;
}

template <class T>
void check_backends_run_independently() {
  const std::vector<BackendJob<T>> jobs = backend_jobs<T>();
  const auto parallel = run_concurrently(jobs, 3);
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    INFO("method " << polyattn::attention_method_name(jobs[j].method) << ", causal " << jobs[j].causal);
    REQUIRE(parallel[j] == jobs[j].run(1));
  }
}

// A small GPT trained for a few steps on its own sequence: returns the losses and the final logits.
struct ModelJob {
  AttentionMethod method;
  std::uint64_t seed;

  std::vector<double> run(int /*repeats*/) const {
    polyattn::GPTConfig config;
    config.vocab_size = 16;
    config.context = 24;
    config.d_model = 8;
    config.heads = 2;
    config.layers = 1;
    config.method = method;
    config.seed = seed;
    polyattn::GPT<double> model(config);
    polyattn::AdamW<double> adam(model.parameters(), {1e-2});
    std::vector<Index> tokens(24), targets(24);
    for (Index i = 0; i < 24; ++i) {
      tokens[static_cast<std::size_t>(i)] = static_cast<Index>((seed + 3 * static_cast<std::uint64_t>(i)) % 16);
      targets[static_cast<std::size_t>(i)] = static_cast<Index>((seed + 5 * static_cast<std::uint64_t>(i)) % 16);
    }
    std::vector<double> losses;
    for (int step = 0; step < 3; ++step) {
      adam.zero_grad();
      losses.push_back(model.forward(tokens, targets));
      model.backward();
      adam.step();
    }
    return losses;
  }
};

}  // namespace

TEST_CASE("Distinct backends on distinct threads give the serial results exactly", "[concurrency]") {
  check_backends_run_independently<float>();
  check_backends_run_independently<double>();
}

TEST_CASE("Distinct models train on distinct threads with the serial results exactly", "[concurrency]") {
  std::vector<ModelJob> jobs;
  for (const AttentionMethod method : polyattn::all_attention_methods) jobs.push_back({method, 7u + jobs.size()});
  const auto parallel = run_concurrently(jobs, 1);
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    INFO("method " << polyattn::attention_method_name(jobs[j].method));
    REQUIRE(parallel[j] == jobs[j].run(1));
  }
}
