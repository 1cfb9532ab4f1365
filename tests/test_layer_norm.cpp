#include <polyattn/nn/layer_norm.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>

using Catch::Contains;
using polyattn::Index;
using polyattn::LayerNorm;
using polyattn::Matrix;
using polyattn::testing::check_gradients;
using polyattn::testing::float_double_pass;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

template <class T>
LayerNorm<T> random_layer_norm(Index d) {
  LayerNorm<T> ln({d, 1e-5}, "ln");
  ln.gain.value = random_matrix<T>(1, d, 41);
  ln.bias.value = random_matrix<T>(1, d, 42);
  return ln;
}

}  // namespace

TEST_CASE("LayerNorm forward matches the per-row definition", "[layer_norm]") {
  const Index n = 6, d = 7;
  LayerNorm<double> ln = random_layer_norm<double>(d);
  // A large common offset per row: the two-pass variance must not lose the small spread.
  Matrix<double> X = random_matrix<double>(n, d, 1);
  X.row(2).array() += 1e6;
  Matrix<double> Y(n, d);
  ln.forward(X, Y);
  for (Index i = 0; i < n; ++i) {
    long double mean = 0, variance = 0;
    for (Index k = 0; k < d; ++k) mean += X(i, k);
    mean /= d;
    for (Index k = 0; k < d; ++k) variance += (X(i, k) - mean) * (X(i, k) - mean);
    variance /= d;
    for (Index k = 0; k < d; ++k) {
      const long double expected =
          ln.gain.value(0, k) * (X(i, k) - mean) / std::sqrt(variance + 1e-5L) + ln.bias.value(0, k);
      // the row with offset 1e6 carries an input rounding of 1e6 * 1.1e-16 = 1e-10 on an O(1) spread
      REQUIRE(Y(i, k) == Approx(static_cast<double>(expected)).margin(1e-9));
    }
  }
}

TEST_CASE("LayerNorm backward matches central finite differences", "[layer_norm]") {
  const Index n = 5, d = 6;
  LayerNorm<double> ln = random_layer_norm<double>(d);
  Matrix<double> X = random_matrix<double>(n, d, 2, 2.0);
  X.row(1).array() += 3;
  // See gradient_check.hpp: h = 1e-6 on an O(1) smooth loss leaves ~1e-10 relative error in the differences;
  // 1e-7 leaves margin for the d = 6 cancellation inside the normalisation.
  const double tolerance = 1e-7;
  check_gradients(ln, X, random_matrix<double>(n, d, 3), {&ln.gain, &ln.bias}, tolerance);
}

TEST_CASE("LayerNorm backward accumulates and a constant row stays finite", "[layer_norm]") {
  const Index n = 3, d = 4;
  LayerNorm<double> ln = random_layer_norm<double>(d);
  Matrix<double> X = random_matrix<double>(n, d, 4);
  X.row(0).setConstant(2.5);  // zero variance: r = 1/sqrt(eps), x_hat = 0
  const Matrix<double> dY = random_matrix<double>(n, d, 5);
  Matrix<double> Y(n, d), once = Matrix<double>::Zero(n, d);
  ln.forward(X, Y);
  REQUIRE(relative_error(Y.row(0), ln.bias.value) < 1e-15);
  ln.backward(X, dY, once);
  REQUIRE(once.allFinite());
  const Matrix<double> gain_grad = ln.gain.grad, bias_grad = ln.bias.grad;
  Matrix<double> twice = once;
  ln.backward(X, dY, twice);
  REQUIRE(relative_error(twice, 2 * once) < 1e-15);
  REQUIRE(relative_error(ln.gain.grad, 2 * gain_grad) < 1e-15);
  REQUIRE(relative_error(ln.bias.grad, 2 * bias_grad) < 1e-15);
}

TEST_CASE("LayerNorm in float agrees with double", "[layer_norm]") {
  const Index n = 16, d = 32;
  LayerNorm<double> reference = random_layer_norm<double>(d);
  LayerNorm<float> single = random_layer_norm<float>(d);
  single.gain.value = reference.gain.value.cast<float>();
  single.bias.value = reference.bias.value.cast<float>();
  const Matrix<double> X = random_matrix<double>(n, d, 6), dY = random_matrix<double>(n, d, 7);
  const auto pass = float_double_pass(reference, single, X, dY);
  // Means and variances over d = 32 unit-variance features are well conditioned (sigma ~ 1 >> sqrt(eps)), so
  // each output carries O(d u) = 2e-6 relative error at worst, typically O(sqrt(d) u); the tolerance is the worst case.
  const double tolerance = 2e-6;
  REQUIRE(relative_error(pass.Yf, pass.Y) < tolerance);
  REQUIRE(relative_error(pass.dXf, pass.dX) < tolerance);
  REQUIRE(relative_error(single.gain.grad, reference.gain.grad) < tolerance);
  REQUIRE(relative_error(single.bias.grad, reference.bias.grad) < tolerance);
}

TEST_CASE("LayerNorm rejects bad options and bad input", "[layer_norm]") {
  REQUIRE_THROWS_WITH((LayerNorm<double>({0})), Contains("LayerNormOptions") && Contains("'features'"));
  REQUIRE_THROWS_WITH((LayerNorm<double>({4, 0.0})), Contains("'epsilon'"));
  LayerNorm<double> ln({4}, "ln_f");
  REQUIRE(ln.gain.name == "ln_f.gain");
  REQUIRE((ln.gain.value.array() == 1).all());
  REQUIRE(ln.bias.value.isZero(0));
  REQUIRE_FALSE(ln.gain.weight_decay);
  Matrix<double> Y(3, 4), dX = Matrix<double>::Zero(3, 4);
  REQUIRE_THROWS_WITH(ln.backward(Matrix<double>::Ones(3, 4), Matrix<double>::Ones(3, 4), dX),
                      Contains("LayerNorm::backward") && Contains("forward pass"));
  REQUIRE_THROWS_WITH(ln.forward(Matrix<double>::Ones(3, 5), Y),
                      Contains("LayerNorm::forward") && Contains("'X'") && Contains("3x4") && Contains("3x5"));
  Matrix<double> X = Matrix<double>::Ones(3, 4);
  X(0, 3) = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_WITH(ln.forward(X, Y), Contains("'X'") && Contains("(0, 3)"));
  ln.forward(Matrix<double>::Ones(3, 4), Y);
  REQUIRE_THROWS_WITH(ln.backward(Matrix<double>::Ones(3, 4), Matrix<double>::Ones(2, 4), dX),
                      Contains("'dY'") && Contains("3x4") && Contains("2x4"));
  Matrix<double> dY = Matrix<double>::Ones(3, 4);
  dY(1, 1) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_WITH(ln.backward(Matrix<double>::Ones(3, 4), dY, dX), Contains("'dY'") && Contains("(1, 1)"));
}
