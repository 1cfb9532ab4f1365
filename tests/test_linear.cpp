#include <polyattn/nn/linear.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <limits>
#include <stdexcept>

using Catch::Contains;
using polyattn::Index;
using polyattn::Linear;
using polyattn::LinearOptions;
using polyattn::Matrix;
using polyattn::testing::check_gradients;
using polyattn::testing::float_double_pass;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;
using polyattn::testing::trainable_parameters;

namespace {

Linear<double> random_linear(Index in, Index out, bool bias) {
  Linear<double> layer({in, out, bias, 0, 11});
  if (bias) layer.bias.value = random_matrix<double>(1, out, 12);
  return layer;
}

}  // namespace

TEST_CASE("Linear forward is X W + 1 b^T", "[linear]") {
  const Index n = 5, in = 4, out = 3;
  Linear<double> layer = random_linear(in, out, true);
  const Matrix<double> X = random_matrix<double>(n, in, 1);
  Matrix<double> Y(n, out);
  layer.forward(X, Y);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < out; ++j) {
      double expected = layer.bias.value(0, j);
      for (Index k = 0; k < in; ++k) expected += X(i, k) * layer.weight.value(k, j);
      // one dot product of length 4 with O(1) terms: error a few ulps of 1
      REQUIRE(Y(i, j) == Approx(expected).margin(1e-14));
    }
}

TEST_CASE("Linear backward matches central finite differences", "[linear]") {
  const Index n = 6, in = 5, out = 4;
  // The loss is linear in X, W and b separately, so central differences have no truncation error: only
  // rounding of O(eps |L| / h) ~ 1e-9 relative remains; 1e-7 leaves two digits of margin.
  const double tolerance = 1e-7;
  for (const bool bias : {true, false}) {
    CAPTURE(bias);
    Linear<double> layer = random_linear(in, out, bias);
    check_gradients(layer, random_matrix<double>(n, in, 2), random_matrix<double>(n, out, 3),
                    trainable_parameters(layer), tolerance);  // W, and b when the layer has one
  }
}

TEST_CASE("Linear backward accumulates into every gradient buffer", "[linear]") {
  const Index n = 3, in = 4, out = 2;
  Linear<double> layer = random_linear(in, out, true);
  const Matrix<double> X = random_matrix<double>(n, in, 4);
  const Matrix<double> dY = random_matrix<double>(n, out, 5);
  const Matrix<double> dX0 = random_matrix<double>(n, in, 6);
  Matrix<double> dX = dX0;
  layer.backward(X, dY, dX);
  layer.backward(X, dY, dX);
  // exact up to rounding of a handful of O(1) products
  REQUIRE(relative_error(dX, dX0 + 2 * dY * layer.weight.value.transpose()) < 1e-14);
  REQUIRE(relative_error(layer.weight.grad, 2 * X.transpose() * dY) < 1e-14);
  REQUIRE(relative_error(layer.bias.grad, 2 * dY.colwise().sum()) < 1e-14);
}

TEST_CASE("Linear frozen parameters receive no gradient", "[linear]") {
  Linear<double> layer = random_linear(3, 2, true);
  layer.weight.trainable = false;
  layer.bias.trainable = false;
  Matrix<double> dX = Matrix<double>::Zero(4, 3);
  layer.backward(random_matrix<double>(4, 3, 7), random_matrix<double>(4, 2, 8), dX);
  REQUIRE(layer.weight.grad.isZero(0));
  REQUIRE(layer.bias.grad.isZero(0));
  REQUIRE(dX.norm() > 0);
}

TEST_CASE("Linear in float agrees with double", "[linear]") {
  const Index n = 16, in = 32, out = 24;
  Linear<double> reference = random_linear(in, out, true);
  Linear<float> single({in, out, true});
  single.weight.value = reference.weight.value.cast<float>();
  single.bias.value = reference.bias.value.cast<float>();
  const Matrix<double> X = random_matrix<double>(n, in, 9);
  const Matrix<double> dY = random_matrix<double>(n, out, 10);
  const auto pass = float_double_pass(reference, single, X, dY);
  // Float inputs carry relative error u = 6e-8 and each output is a sum of <= 32 products with random signs,
  // so the relative Frobenius error is O(sqrt(32) u) ~ 4e-7 and at worst 32 u = 2e-6, the tolerance.
  const double tolerance = 2e-6;
  REQUIRE(relative_error(pass.Yf, pass.Y) < tolerance);
  REQUIRE(relative_error(pass.dXf, pass.dX) < tolerance);
  REQUIRE(relative_error(single.weight.grad, reference.weight.grad) < tolerance);
  REQUIRE(relative_error(single.bias.grad, reference.bias.grad) < tolerance);
}

TEST_CASE("Linear initialisation is seeded and fan-in scaled", "[linear]") {
  const Linear<double> a({256, 64, true, 0, 5}), b({256, 64, true, 0, 5}), c({256, 64, true, 0, 6});
  REQUIRE(a.weight.value == b.weight.value);
  REQUIRE(a.weight.value != c.weight.value);
  REQUIRE(a.bias.value.isZero(0));
  REQUIRE(a.weight.name == "linear.weight");
  // 16384 N(0, 1/256) samples: the sample variance has relative standard deviation sqrt(2/16384) = 1.1%,
  // so 6% is over five standard deviations.
  const double variance = a.weight.value.squaredNorm() / static_cast<double>(a.weight.size());
  REQUIRE(variance * 256 == Approx(1.0).epsilon(0.06));
  const Linear<float> single({256, 64, true, 0, 5});
  REQUIRE(single.weight.value == a.weight.value.cast<float>());
}

TEST_CASE("Linear rejects bad options and bad input with a precise message", "[linear]") {
  REQUIRE_THROWS_WITH((Linear<double>({0, 3})), Contains("LinearOptions") && Contains("'in_features'"));
  REQUIRE_THROWS_WITH((Linear<double>({3, 0})), Contains("'out_features'"));
  REQUIRE_THROWS_WITH((Linear<double>({3, 2, true, -1.0})), Contains("'init_std'"));
  Linear<double> layer({3, 2}, "fc");
  std::vector<polyattn::Parameter<double>*> parameters;
  layer.collect_parameters(parameters);
  REQUIRE(parameters.size() == 2);
  Linear<double>({3, 2, false}).collect_parameters(parameters);
  REQUIRE(parameters.size() == 3);
  Matrix<double> Y(4, 2), dX = Matrix<double>::Zero(4, 3);
  REQUIRE_THROWS_WITH(layer.forward(Matrix<double>::Ones(4, 5), Y),
                      Contains("Linear::forward") && Contains("'X'") && Contains("4x3") && Contains("4x5"));
  REQUIRE_THROWS_WITH(layer.forward(Matrix<double>::Ones(4, 3), Y.leftCols(1)),
                      Contains("'Y'") && Contains("4x2") && Contains("4x1"));
  Matrix<double> X = Matrix<double>::Ones(4, 3);
  X(2, 1) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(layer.forward(X, Y), std::invalid_argument);
  REQUIRE_THROWS_WITH(layer.forward(X, Y), Contains("'X'") && Contains("(2, 1)"));
  REQUIRE_THROWS_WITH(layer.backward(Matrix<double>::Ones(4, 3), Matrix<double>::Ones(3, 2), dX),
                      Contains("Linear::backward") && Contains("'dY'") && Contains("4x2") && Contains("3x2"));
  layer.weight.value.resize(2, 2);
  REQUIRE_THROWS_WITH(layer.forward(Matrix<double>::Ones(4, 3), Y), Contains("'fc.weight'") && Contains("3x2"));
}
