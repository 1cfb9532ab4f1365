// Sequence parallelism of the per-token layers (issue 10): outputs, input gradients and every parameter gradient
// are bitwise identical for 1, 2, 3 and 4 threads, on row counts spanning several blocks of each layer with a
// partial last block; and the multi-block results agree (to rounding) with the same layer run one block at a
// time, which is the serial code. Also the threading primitive itself (parallel/threads.hpp).
#include <polyattn/nn/activation.hpp>
#include <polyattn/nn/cross_entropy.hpp>
#include <polyattn/nn/embedding.hpp>
#include <polyattn/nn/gpt.hpp>
#include <polyattn/nn/layer_norm.hpp>
#include <polyattn/nn/linear.hpp>
#include <polyattn/nn/mlp.hpp>
#include <polyattn/parallel/threads.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

using polyattn::Index;
using polyattn::Matrix;
using polyattn::Parameter;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;
using polyattn::testing::ThreadCountGuard;

namespace {

// Everything a run produces: outputs, input gradients, parameter gradients, in a fixed order.
template <class T>
using Results = std::vector<Matrix<T>>;

// Runs `run()` with 1, 2, 3 and 4 threads and requires exactly the same results each time; returns them.
template <class T, class Run>
Results<T> require_same_for_any_thread_count(Run&& run) {
  ThreadCountGuard guard;
  polyattn::set_num_threads(1);
  const Results<T> reference = run();
  for (const int threads : {2, 3, 4}) {
    CAPTURE(threads);
    polyattn::set_num_threads(threads);
    const Results<T> results = run();
    REQUIRE(results.size() == reference.size());
    for (std::size_t k = 0; k < results.size(); ++k) {
      CAPTURE(k);
      REQUIRE(results[k].rows() == reference[k].rows());
      REQUIRE(results[k].cols() == reference[k].cols());
      REQUIRE(results[k] == reference[k]);  // bitwise, not approximate
    }
  }
  return reference;
}

template <class T, class Layer>
std::vector<Parameter<T>*> parameters_of(Layer& layer) {
  std::vector<Parameter<T>*> out;
  layer.collect_parameters(out);
  return out;
}

// Forward and backward of a (X -> Y) layer on rows [begin, begin + rows) of X and dY; Y and dX are written to
// the same rows of `Y` and `dX`, parameter gradients accumulate.
template <class T, class Layer>
void run_layer_block(Layer& layer, const Matrix<T>& X, const Matrix<T>& dY, Index begin, Index rows, Matrix<T>& Y,
                     Matrix<T>& dX) {
  Matrix<T> Yb(rows, dY.cols());
  Matrix<T> dXb = dX.middleRows(begin, rows);
  layer.forward(X.middleRows(begin, rows), Yb);
  layer.backward(X.middleRows(begin, rows), dY.middleRows(begin, rows), dXb);
  Y.middleRows(begin, rows) = Yb;
  dX.middleRows(begin, rows) = dXb;
}

// Y, dX (starting from a nonzero dX: backward accumulates) and the parameter gradients (from zero) of one
// forward and backward over all rows (`chunk` = 0), or over consecutive chunks of `chunk` rows.
template <class T, class Layer>
Results<T> run_layer(Layer& layer, const Matrix<T>& X, const Matrix<T>& dY, Index chunk = 0) {
  const std::vector<Parameter<T>*> parameters = parameters_of<T>(layer);
  for (Parameter<T>* parameter : parameters) parameter->grad.setZero();
  Matrix<T> Y(X.rows(), dY.cols());
  Matrix<T> dX = random_matrix<T>(X.rows(), X.cols(), 77);
  const Index step = chunk > 0 ? chunk : X.rows();
  for (Index begin = 0; begin < X.rows(); begin += step)
    run_layer_block(layer, X, dY, begin, std::min(step, X.rows() - begin), Y, dX);
  Results<T> results{Y, dX};
  for (Parameter<T>* parameter : parameters) results.push_back(parameter->grad);
  return results;
}

template <class T>
double reordering_tolerance() {
  return std::is_same<T, float>::value ? 2e-5 : 1e-13;
}

// The threaded run is the same for 1 to 4 threads, and agrees with the layer run on chunks of `chunk` rows
// (one block each, so the serial path) up to the rounding of summing the parameter gradients in another order.
template <class T, class Layer>
void check_layer(Layer& layer, const Matrix<T>& X, const Matrix<T>& dY, Index chunk) {
  const Results<T> threaded = require_same_for_any_thread_count<T>([&] { return run_layer<T>(layer, X, dY); });
  const Results<T> chunked = run_layer<T>(layer, X, dY, chunk);
  REQUIRE(threaded.size() == chunked.size());
  for (std::size_t k = 0; k < threaded.size(); ++k) {
    CAPTURE(k);
    REQUIRE(relative_error(threaded[k], chunked[k]) < reordering_tolerance<T>());
  }
}

// Row counts: not multiples of the block sizes (512 rows for most layers, 256 for CrossEntropy), and several
// blocks long.
constexpr Index n_rows = 2100;

}  // namespace

TEMPLATE_TEST_CASE("Linear: the same results for 1, 2, 3 and 4 threads", "[parallel][linear]", float, double) {
  using T = TestType;
  SECTION("with bias") {
    polyattn::Linear<T> layer({24, 40, true, 0, 1});
    layer.bias.value = random_matrix<T>(1, 40, 2);
    check_layer<T>(layer, random_matrix<T>(n_rows, 24, 3), random_matrix<T>(n_rows, 40, 4), 500);
  }
  SECTION("without bias") {
    polyattn::Linear<T> layer({24, 40, false, 0, 1});
    check_layer<T>(layer, random_matrix<T>(n_rows, 24, 3), random_matrix<T>(n_rows, 40, 4), 500);
  }
  SECTION("wide input: blocks of in_features rows") {
    polyattn::Linear<T> layer({600, 8, true, 0, 1});
    REQUIRE(layer.block_rows() == 600);
    check_layer<T>(layer, random_matrix<T>(n_rows, 600, 3), random_matrix<T>(n_rows, 8, 4), 600);
  }
  SECTION("with a LoRA adapter, every parameter trainable") {
    polyattn::Linear<T> layer({24, 40, true, 0, 1});
    layer.add_lora({3, 6, 0, 5});
    layer.lora_B.value = random_matrix<T>(3, 40, 6);
    layer.weight.trainable = true;
    layer.bias.trainable = true;
    check_layer<T>(layer, random_matrix<T>(n_rows, 24, 3), random_matrix<T>(n_rows, 40, 4), 500);
  }
  SECTION("with a LoRA adapter, frozen weight and bias") {
    polyattn::Linear<T> layer({24, 40, true, 0, 1});
    layer.add_lora({3, 6, 0, 5});
    layer.lora_B.value = random_matrix<T>(3, 40, 6);
    check_layer<T>(layer, random_matrix<T>(n_rows, 24, 3), random_matrix<T>(n_rows, 40, 4), 500);
  }
}

TEMPLATE_TEST_CASE("LayerNorm: the same results for 1, 2, 3 and 4 threads", "[parallel][layer_norm]", float,
                   double) {
  using T = TestType;
  polyattn::LayerNorm<T> layer({24});
  layer.gain.value = random_matrix<T>(1, 24, 1);
  layer.bias.value = random_matrix<T>(1, 24, 2);
  check_layer<T>(layer, random_matrix<T>(n_rows, 24, 3), random_matrix<T>(n_rows, 24, 4), 500);
}

TEMPLATE_TEST_CASE("Activation: the same results for 1, 2, 3 and 4 threads", "[parallel][activation]", float,
                   double) {
  using T = TestType;
  for (const auto kind : {polyattn::ActivationKind::gelu, polyattn::ActivationKind::relu}) {
    CAPTURE(static_cast<int>(kind));
    polyattn::Activation<T> layer(kind);
    check_layer<T>(layer, random_matrix<T>(n_rows, 24, 3, 3.0), random_matrix<T>(n_rows, 24, 4), 500);
  }
}

TEMPLATE_TEST_CASE("MLP: the same results for 1, 2, 3 and 4 threads", "[parallel][mlp]", float, double) {
  using T = TestType;
  polyattn::MLP<T> layer({16});  // hidden 64, GELU
  check_layer<T>(layer, random_matrix<T>(n_rows, 16, 3), random_matrix<T>(n_rows, 16, 4), 500);
}

TEMPLATE_TEST_CASE("Embedding: the same results for 1, 2, 3 and 4 threads", "[parallel][embedding]", float,
                   double) {
  using T = TestType;
  const Index vocab = 100, d = 12;  // 7 blocks of table rows
  polyattn::Embedding<T> layer({vocab, n_rows + 5, d});
  // Skewed token frequencies, as in text: many repeats of a few tokens, some tokens absent.
  std::mt19937_64 rng(9);
  std::geometric_distribution<Index> skewed(0.05);
  std::vector<Index> tokens(static_cast<std::size_t>(n_rows));
  for (Index& token : tokens) token = std::min<Index>(skewed(rng), vocab - 1);
  const Matrix<T> dY = random_matrix<T>(n_rows, d, 4);
  const auto run = [&] {
    layer.token_table.grad.setZero();
    layer.position_table.grad.setZero();
    Matrix<T> Y(n_rows, d);
    layer.forward(tokens, Y);
    layer.backward(tokens, dY);
    return Results<T>{Y, layer.token_table.grad, layer.position_table.grad};
  };
  const Results<T> results = require_same_for_any_thread_count<T>(run);
  // The serial scatter, which adds each table row's positions in position order, exactly as the threaded one.
  Matrix<T> token_grad = Matrix<T>::Zero(vocab, d), Y = layer.position_table.value.topRows(n_rows);
  for (Index j = 0; j < d; ++j)
    for (Index i = 0; i < n_rows; ++i) {
      token_grad(tokens[static_cast<std::size_t>(i)], j) += dY(i, j);
      Y(i, j) += layer.token_table.value(tokens[static_cast<std::size_t>(i)], j);
    }
  REQUIRE(results[0] == Y);
  REQUIRE(results[1] == token_grad);
  REQUIRE(results[2].topRows(n_rows) == dY);
  REQUIRE(results[2].bottomRows(5).isZero(0));
}

TEMPLATE_TEST_CASE("CrossEntropy: the same results for 1, 2, 3 and 4 threads", "[parallel][cross_entropy]", float,
                   double) {
  using T = TestType;
  const Index vocab = 30;
  const Matrix<T> logits = random_matrix<T>(n_rows, vocab, 1, 2.0);
  std::mt19937_64 rng(2);
  std::uniform_int_distribution<Index> token(0, vocab - 1);
  for (const bool ignore : {false, true}) {
    CAPTURE(ignore);
    polyattn::CrossEntropyOptions options;
    if (ignore) options.ignore_target = -1;
    std::vector<Index> targets(static_cast<std::size_t>(n_rows));
    for (Index i = 0; i < n_rows; ++i) targets[static_cast<std::size_t>(i)] = ignore && i % 7 == 3 ? -1 : token(rng);
    // Make some targets the row maximum, so that the accuracy is not 0.
    for (Index i = 0; i < n_rows; i += 5)
      if (targets[static_cast<std::size_t>(i)] >= 0) logits.row(i).maxCoeff(&targets[static_cast<std::size_t>(i)]);
    polyattn::CrossEntropy<T> loss(options);
    const auto run = [&] {
      Results<T> results(4);
      results[0] = Matrix<T>::Constant(1, 1, static_cast<T>(loss.forward(logits, targets)));
      results[1] = Matrix<T>::Constant(1, 2, T(0));
      results[1](0, 0) = static_cast<T>(loss.scored());
      results[1](0, 1) = static_cast<T>(loss.correct());
      results[2] = loss.probabilities();
      results[3] = random_matrix<T>(n_rows, vocab, 3);  // backward accumulates
      loss.backward(logits, targets, results[3]);
      return results;
    };
    const Results<T> results = require_same_for_any_thread_count<T>(run);
    // Against a direct evaluation.
    double total = 0;
    Index scored = 0, correct = 0;
    Matrix<T> dlogits = random_matrix<T>(n_rows, vocab, 3);
    for (Index i = 0; i < n_rows; ++i) {
      const Index target = targets[static_cast<std::size_t>(i)];
      if (target < 0) continue;
      ++scored;
      const double m = static_cast<double>(logits.row(i).maxCoeff());
      double sum = 0;
      for (Index v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(logits(i, v)) - m);
      total += m - static_cast<double>(logits(i, target)) + std::log(sum);
      if (static_cast<double>(logits(i, target)) == m) ++correct;
    }
    for (Index i = 0; i < n_rows; ++i) {
      const Index target = targets[static_cast<std::size_t>(i)];
      if (target < 0) continue;
      dlogits.row(i) += loss.probabilities().row(i) / static_cast<T>(scored);
      dlogits(i, target) -= T(1) / static_cast<T>(scored);
    }
    REQUIRE(results[1](0, 0) == static_cast<T>(scored));
    REQUIRE(results[1](0, 1) == static_cast<T>(correct));
    REQUIRE(correct >= n_rows / 6);
    REQUIRE(static_cast<double>(results[0](0, 0)) == Approx(total / static_cast<double>(scored)).epsilon(1e-6));
    REQUIRE(relative_error(results[3], dlogits) < reordering_tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("GPT (2 layers): the same loss, logits and gradients for 1, 2, 3 and 4 threads", "[parallel][gpt]",
                   float, double) {
  using T = TestType;
  polyattn::GPTConfig config;
  config.vocab_size = 50;
  config.context = 1300;
  config.d_model = 16;
  config.heads = 2;
  config.layers = 2;
  polyattn::GPT<T> model(config);
  const Index n = 1300;
  std::mt19937_64 rng(4);
  std::uniform_int_distribution<Index> token(0, config.vocab_size - 1);
  std::vector<Index> tokens(static_cast<std::size_t>(n + 1));
  for (Index& t : tokens) t = token(rng);
  const std::vector<Index> inputs(tokens.begin(), tokens.end() - 1), targets(tokens.begin() + 1, tokens.end());
  const auto run = [&] {
    for (Parameter<T>* parameter : model.parameters()) parameter->grad.setZero();
    Results<T> results{Matrix<T>::Constant(1, 1, static_cast<T>(model.forward(inputs, targets)))};
    model.backward();
    results.push_back(model.logits());
    for (Parameter<T>* parameter : model.parameters()) results.push_back(parameter->grad);
    return results;
  };
  const Results<T> results = require_same_for_any_thread_count<T>(run);
  REQUIRE(std::isfinite(static_cast<double>(results[0](0, 0))));
  REQUIRE(results.back().norm() > 0);
}

TEST_CASE("parallel_for visits every block exactly once, whatever the thread count", "[parallel][threads]") {
  ThreadCountGuard guard;
  for (const int threads : {1, 2, 3, 4}) {
    polyattn::set_num_threads(threads);
#ifdef _OPENMP
    REQUIRE(polyattn::num_threads() == threads);
#else
    REQUIRE(polyattn::num_threads() == 1);
#endif
    for (const Index blocks : {0, 1, 2, 3, 5, 17, 100}) {
      CAPTURE(threads, blocks);
      const int team = polyattn::detail::parallel_threads(blocks);
      REQUIRE(team >= 1);
      REQUIRE(team <= std::max<Index>(1, std::min<Index>(threads, blocks)));
      std::vector<int> visits(static_cast<std::size_t>(blocks), 0), thread_of(static_cast<std::size_t>(blocks), -1);
      polyattn::detail::parallel_for(blocks, [&](Index block, int thread) {
        ++visits[static_cast<std::size_t>(block)];  // each block writes only its own entries
        thread_of[static_cast<std::size_t>(block)] = thread;
      });
      for (std::size_t b = 0; b < visits.size(); ++b) {
        CAPTURE(b);
        REQUIRE(visits[b] == 1);
        REQUIRE(thread_of[b] >= 0);
        REQUIRE(thread_of[b] < team);
      }
    }
  }
  REQUIRE(polyattn::detail::block_count(0, 512) == 0);
  REQUIRE(polyattn::detail::block_count(512, 512) == 1);
  REQUIRE(polyattn::detail::block_count(513, 512) == 2);
}

TEST_CASE("parallel_for rethrows the exception of the lowest failing block on the caller", "[parallel][threads]") {
  ThreadCountGuard guard;
  for (const int threads : {1, 2, 3, 4}) {
    CAPTURE(threads);
    polyattn::set_num_threads(threads);
    std::vector<int> visits(20, 0);
    const auto body = [&](Index block, int) {
      ++visits[static_cast<std::size_t>(block)];
      if (block == 7 || block == 13) throw std::runtime_error("block " + std::to_string(block));
    };
    REQUIRE_THROWS_WITH(polyattn::detail::parallel_for(20, body), "block 7");
    // Blocks before the first failure ran (serially, later blocks never start).
    for (std::size_t b = 0; b <= 7; ++b) REQUIRE(visits[b] == 1);
  }
}

TEST_CASE("parallel_pass runs its loops in order, each split as parallel_for splits it", "[parallel][threads]") {
  ThreadCountGuard guard;
  for (const int threads : {1, 2, 3, 4}) {
    polyattn::set_num_threads(threads);
    const std::vector<Index> loops = {5, 0, 17, 1, 3};
    // The thread parallel_for() alone gives each block, to compare with.
    std::vector<std::vector<int>> expected_thread;
    for (const Index blocks : loops) {
      expected_thread.emplace_back(static_cast<std::size_t>(blocks), -1);
      polyattn::detail::parallel_for(blocks, [&](Index block, int thread) {
        expected_thread.back()[static_cast<std::size_t>(block)] = thread;
      });
    }
    std::vector<std::vector<int>> visits, thread_of;
    for (const Index blocks : loops) {
      visits.emplace_back(static_cast<std::size_t>(blocks), 0);
      thread_of.emplace_back(static_cast<std::size_t>(blocks), -1);
    }
    // Each loop's blocks read what the whole previous loop wrote, and the serial steps between them.
    std::vector<Index> written(loops.size(), 0), seen_before(loops.size(), -1);
    int serial_steps = 0;
    const int team = polyattn::detail::parallel_threads(17);
    polyattn::detail::parallel_pass(team, [&] {
      for (std::size_t l = 0; l < loops.size(); ++l) {
        polyattn::detail::parallel_for(loops[l], [&](Index block, int thread) {
          const auto b = static_cast<std::size_t>(block);
          ++visits[l][b];
          thread_of[l][b] = thread;
          if (block == 0) seen_before[l] = l > 0 ? written[l - 1] : 0;
        });
        polyattn::detail::serial_step([&] {
          ++serial_steps;
          written[l] = static_cast<Index>(std::count(visits[l].begin(), visits[l].end(), 1));
        });
      }
    });
    CAPTURE(threads);
    REQUIRE(serial_steps == static_cast<int>(loops.size()));
    for (std::size_t l = 0; l < loops.size(); ++l) {
      CAPTURE(l);
      REQUIRE(written[l] == loops[l]);
      if (loops[l] > 0 && l > 0) REQUIRE(seen_before[l] == loops[l - 1]);
      for (std::size_t b = 0; b < visits[l].size(); ++b) {
        CAPTURE(b);
        REQUIRE(visits[l][b] == 1);
        // parallel_for() alone runs 1-block loops on the caller; in the pass they go to thread 0 as well.
        REQUIRE(thread_of[l][b] == expected_thread[l][b]);
      }
    }
  }
}

TEST_CASE("parallel_pass rethrows the first failing loop's lowest block and skips the loops after it",
          "[parallel][threads]") {
  ThreadCountGuard guard;
  for (const int threads : {1, 2, 3, 4}) {
    CAPTURE(threads);
    polyattn::set_num_threads(threads);
    std::vector<int> visits(3 * 20, 0);
    int nested_threads = -1;
    const auto pass = [&] {
      for (Index loop = 0; loop < 3; ++loop)
        polyattn::detail::parallel_for(20, [&](Index block, int) {
          ++visits[static_cast<std::size_t>(loop * 20 + block)];
          if (loop == 0 && block == 4) {
            // A loop inside a block runs on that block's thread alone, as inside parallel_for().
            nested_threads = 0;
            polyattn::detail::parallel_for(8, [&](Index, int thread) {
              nested_threads = std::max(nested_threads, thread);
            });
          }
          if (loop == 1 && (block == 13 || block == 6))
            throw std::runtime_error("loop 1 block " + std::to_string(block));
        });
    };
    REQUIRE_THROWS_WITH(polyattn::detail::parallel_pass(polyattn::detail::parallel_threads(20), pass),
                        "loop 1 block 6");
    REQUIRE(nested_threads == 0);
    for (Index block = 0; block < 20; ++block) {
      CAPTURE(block);
      REQUIRE(visits[static_cast<std::size_t>(block)] == 1);
      REQUIRE(visits[static_cast<std::size_t>(40 + block)] == 0);  // the loop after the failure never ran
    }
  }
}

TEST_CASE("set_num_threads rejects a negative count and 0 restores the default", "[parallel][threads]") {
  ThreadCountGuard guard;
  REQUIRE_THROWS_AS(polyattn::set_num_threads(-1), std::invalid_argument);
  polyattn::set_num_threads(3);
  REQUIRE_THROWS_AS(polyattn::set_num_threads(-1), std::invalid_argument);
#ifdef _OPENMP
  REQUIRE(polyattn::num_threads() == 3);  // a rejected call changes nothing
  polyattn::set_num_threads(0);
  REQUIRE(polyattn::num_threads() == std::max(1, omp_get_max_threads()));
#else
  REQUIRE(polyattn::num_threads() == 1);
#endif
}

TEST_CASE("parallel_for runs nested loops serially on the calling thread", "[parallel][threads]") {
  ThreadCountGuard guard;
  polyattn::set_num_threads(2);
  const Index outer = 4, inner = 8;
  std::vector<int> inner_team(outer, 0), inner_max_thread(outer, -1), inner_visits(outer * inner, 0);
  polyattn::detail::parallel_for(outer, [&](Index block, int) {
    const auto b = static_cast<std::size_t>(block);
#ifdef _OPENMP
    const bool in_team = omp_in_parallel() != 0;
#else
    const bool in_team = true;
#endif
    inner_team[b] = in_team ? polyattn::detail::parallel_threads(inner) : 1;
    polyattn::detail::parallel_for(inner, [&](Index k, int thread) {
      ++inner_visits[static_cast<std::size_t>(block * inner + k)];
      if (in_team) inner_max_thread[b] = std::max(inner_max_thread[b], thread);
    });
  });
  for (std::size_t b = 0; b < static_cast<std::size_t>(outer); ++b) {
    CAPTURE(b);
    REQUIRE(inner_team[b] == 1);
    REQUIRE(inner_max_thread[b] <= 0);
  }
  for (const int visits : inner_visits) REQUIRE(visits == 1);
#ifdef _OPENMP
  // With two threads and four blocks the outer loop does run in a team, so the check above is not vacuous.
  int outer_in_team = 0;
  polyattn::detail::parallel_for(outer, [&](Index block, int) {
    if (block == 0) outer_in_team = omp_in_parallel();
  });
  REQUIRE(outer_in_team != 0);
#endif
}
