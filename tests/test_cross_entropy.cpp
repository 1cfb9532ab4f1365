#include <polyattn/nn/cross_entropy.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

using Catch::Contains;
using polyattn::CrossEntropy;
using polyattn::CrossEntropyOptions;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::testing::gradient_error;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

CrossEntropyOptions ignoring(Index target) {
  CrossEntropyOptions options;
  options.ignore_target = target;
  return options;
}

}  // namespace

TEST_CASE("CrossEntropy forward is the mean of -log softmax at the targets", "[cross_entropy]") {
  Matrix<double> logits(3, 3);
  logits << 0, 0, 0,                             // uniform: -log(1/3)
      std::log(1.0), std::log(3.0), 0,           // p = (1, 3, 1) / 5 at target 1: -log(3/5)
      2, -1, 0.5;
  const std::vector<Index> targets{2, 1, 0};
  CrossEntropy<double> loss;
  const double value = loss.forward(logits, targets);
  const long double third = std::log(std::exp(2.0L) + std::exp(-1.0L) + std::exp(0.5L)) - 2.0L;
  const long double expected = (std::log(3.0L) - std::log(3.0L / 5.0L) + third) / 3.0L;
  REQUIRE(value == Approx(static_cast<double>(expected)).epsilon(1e-15));  // a few roundings of O(1) terms
  REQUIRE(loss.scored() == 3);
  REQUIRE(relative_error(loss.probabilities().rowwise().sum(), Matrix<double>::Ones(3, 1)) < 1e-15);
  // Row 0 is a three-way tie that includes its target, row 1 and row 2 hit their maxima (3/5 and e^2).
  REQUIRE(loss.correct() == 3);
  REQUIRE(loss.accuracy() == 1.0);
}

TEST_CASE("CrossEntropy backward matches central finite differences", "[cross_entropy]") {
  const Index n = 6, vocab = 5;
  for (const bool with_ignored : {false, true}) {
    CAPTURE(with_ignored);
    CrossEntropy<double> loss(with_ignored ? ignoring(-1) : CrossEntropyOptions{});
    Matrix<double> logits = random_matrix<double>(n, vocab, 1, 2.0);
    std::vector<Index> targets{4, 0, 2, 2, 1, 3};
    if (with_ignored) targets[1] = targets[4] = -1;
    loss.forward(logits, targets);
    Matrix<double> dlogits = Matrix<double>::Zero(n, vocab);
    loss.backward(logits, targets, dlogits);
    // Smooth O(1) loss: truncation O(h^2) and rounding O(eps / h) ~ 1e-10 relative; 1e-7 leaves margin.
    REQUIRE(gradient_error([&] { return loss.forward(logits, targets); }, logits, dlogits) < 1e-7);
    // Softmax gradients sum to zero along each row.
    REQUIRE(dlogits.rowwise().sum().cwiseAbs().maxCoeff() < 1e-16 * vocab);
    if (with_ignored) {
      REQUIRE(loss.scored() == 4);
      REQUIRE(dlogits.row(1).isZero(0));
      REQUIRE(dlogits.row(4).isZero(0));
    }
  }
}

TEST_CASE("CrossEntropy backward accumulates; an all-ignored batch has zero loss and gradient", "[cross_entropy]") {
  CrossEntropy<double> loss(ignoring(7));
  const Matrix<double> logits = random_matrix<double>(3, 4, 2);
  const std::vector<Index> targets{1, 7, 3};
  loss.forward(logits, targets);
  Matrix<double> once = Matrix<double>::Zero(3, 4);
  loss.backward(logits, targets, once);
  Matrix<double> twice = once;
  loss.backward(logits, targets, twice);
  REQUIRE(relative_error(twice, 2 * once) < 1e-15);

  const std::vector<Index> none{7, 7, 7};
  REQUIRE(loss.forward(logits, none) == 0.0);
  REQUIRE(loss.accuracy() == 0.0);
  Matrix<double> untouched = Matrix<double>::Zero(3, 4);
  loss.backward(logits, none, untouched);
  REQUIRE(untouched.isZero(0));
}

TEST_CASE("CrossEntropy is stable for huge logits in float and double", "[cross_entropy]") {
  // exp(1000) overflows both types and exp(-1000) underflows: a naive softmax gives inf / inf = NaN.
  Matrix<float> logits(3, 3);
  logits << 1000, 0, -1000,   //
      1e30f, 1e30f, -1e30f,   // a tie between two huge logits: p = (1/2, 1/2, 0)
      -5000, -5001, -5002;    // a common offset changes nothing
  CrossEntropy<float> loss;
  const double value = loss.forward(logits, {1, 0, 2});
  const double third = 2 + std::log(1 + std::exp(-1.0) + std::exp(-2.0));
  REQUIRE(std::isfinite(value));
  // Row 1: 1000 + log(1 + e^-1000 + e^-2000) - 0 = 1000. Row 2: log 2, which survives only because m - z_t = 0 is
  // formed before log s is added (1e30 + log 2 = 1e30). Row 3: the offset-free value. Float logits, double sums.
  REQUIRE(value == Approx((1000 + std::log(2.0) + third) / 3).epsilon(1e-6));
  Matrix<float> dlogits = Matrix<float>::Zero(3, 3);
  loss.backward(logits, {1, 0, 2}, dlogits);
  REQUIRE(dlogits.allFinite());
  REQUIRE(dlogits(1, 0) == Approx((0.5 - 1) / 3).epsilon(1e-6));
  REQUIRE(dlogits(1, 1) == Approx(0.5 / 3).epsilon(1e-6));
}

TEST_CASE("CrossEntropy in float agrees with double", "[cross_entropy]") {
  const Index n = 16, vocab = 32;
  const Matrix<double> logits = random_matrix<double>(n, vocab, 3, 3.0);
  std::vector<Index> targets;
  for (Index i = 0; i < n; ++i) targets.push_back((5 * i + 1) % vocab);
  CrossEntropy<double> reference;
  CrossEntropy<float> single;
  const double value = reference.forward(logits, targets);
  const double value_float = single.forward(logits.cast<float>(), targets);
  Matrix<double> dlogits = Matrix<double>::Zero(n, vocab);
  Matrix<float> dlogits_float = Matrix<float>::Zero(n, vocab);
  reference.backward(logits, targets, dlogits);
  single.backward(logits.cast<float>(), targets, dlogits_float);
  // Per row: exponentials of arguments up to ~20 in size (relative error ~20 u each) summed over 32 entries
  // (32 u), then a division: O(60 u) = 3.6e-6 relative on the probabilities and the gradient. The loss adds
  // m_i + log s_i - z_t in double from float inputs, relative error O(u |z| / L) with |z| / L <= 10: 6e-7.
  REQUIRE(value_float == Approx(value).epsilon(6e-7));
  REQUIRE(relative_error(dlogits_float, dlogits) < 3.6e-6);
}

TEST_CASE("CrossEntropy accuracy counts targets at the row maximum", "[cross_entropy]") {
  Matrix<double> logits(4, 3);
  logits << 3, 1, 0,  //
      0, 2, 1,        //
      1, 1, 0,        // tie between 0 and 1: target 1 counts as correct
      0, 0, 5;
  CrossEntropy<double> loss(ignoring(-100));
  loss.forward(logits, {0, 2, 1, -100});
  REQUIRE(loss.scored() == 3);
  REQUIRE(loss.correct() == 2);
  REQUIRE(loss.accuracy() == Approx(2.0 / 3));
}

TEST_CASE("CrossEntropy rejects bad targets and logits with a precise message", "[cross_entropy]") {
  CrossEntropy<double> loss;
  const Matrix<double> logits = Matrix<double>::Zero(3, 5);
  REQUIRE_THROWS_AS(loss.forward(logits, {0, 5, 1}), std::invalid_argument);
  REQUIRE_THROWS_WITH(loss.forward(logits, {0, 5, 1}), Contains("CrossEntropy::forward") &&
                                                           Contains("'targets' entry 1") && Contains("[0, 5)") &&
                                                           Contains("got 5"));
  REQUIRE_THROWS_WITH(loss.forward(logits, {0, 1, -1}), Contains("entry 2") && Contains("got -1"));
  REQUIRE_THROWS_WITH(loss.forward(logits, {0, 1}), Contains("'targets'") && Contains("(3)") && Contains("got 2"));
  Matrix<double> bad = logits;
  bad(2, 4) = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_WITH(loss.forward(bad, {0, 1, 2}), Contains("'logits'") && Contains("(2, 4)"));
  REQUIRE_THROWS_WITH(loss.forward(Matrix<double>(0, 5), {}), Contains("'logits'") && Contains("non-empty"));

  CrossEntropy<double> hiding(ignoring(3));
  REQUIRE_THROWS_WITH(hiding.forward(logits, {0, 1, 2}), Contains("'ignore_target'") && Contains("got 3"));

  Matrix<double> dlogits = Matrix<double>::Zero(3, 5);
  REQUIRE_THROWS_WITH(loss.backward(logits, {0, 1, 2}, dlogits),
                      Contains("CrossEntropy::backward") && Contains("forward pass"));
  loss.forward(logits, {0, 1, 2});
  REQUIRE_THROWS_WITH(loss.backward(logits, {0, 1, 3}, dlogits), Contains("forward pass"));
  REQUIRE_THROWS_WITH(loss.backward(logits, {0, 1, 2}, dlogits.leftCols(4)),
                      Contains("'dlogits'") && Contains("3x5") && Contains("3x4"));
}
