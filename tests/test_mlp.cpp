#include <polyattn/nn/mlp.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <limits>
#include <stdexcept>
#include <vector>

using Catch::Contains;
using polyattn::ActivationKind;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::MLP;
using polyattn::MLPOptions;
using polyattn::testing::check_gradients;
using polyattn::testing::float_double_pass;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;
using polyattn::testing::trainable_parameters;

namespace {

template <class T>
MLP<T> random_mlp(Index d, Index hidden, ActivationKind kind, bool bias) {
  MLP<T> mlp({d, hidden, kind, bias, 1.0, 51}, "mlp");
  if (bias) {
    mlp.fc.bias.value = random_matrix<T>(1, hidden, 52, 0.5);
    mlp.proj.bias.value = random_matrix<T>(1, d, 53, 0.5);
  }
  return mlp;
}

}  // namespace

TEST_CASE("MLP forward is Linear -> activation -> Linear", "[mlp]") {
  const Index n = 4, d = 3, hidden = 5;
  MLP<double> mlp = random_mlp<double>(d, hidden, ActivationKind::relu, true);
  const Matrix<double> X = random_matrix<double>(n, d, 1);
  Matrix<double> Y(n, d);
  mlp.forward(X, Y);
  const Matrix<double> H = ((X * mlp.fc.weight.value).rowwise() + mlp.fc.bias.value.row(0)).cwiseMax(0.0);
  const Matrix<double> expected = (H * mlp.proj.weight.value).rowwise() + mlp.proj.bias.value.row(0);
  REQUIRE(relative_error(Y, expected) < 1e-15);  // the same operations in the same order
}

TEST_CASE("MLP backward matches central finite differences for every parameter", "[mlp]") {
  const Index n = 5, d = 4, hidden = 6;
  for (const ActivationKind kind : {ActivationKind::gelu, ActivationKind::relu})
    for (const bool bias : {true, false}) {
      CAPTURE(static_cast<int>(kind), bias);
      MLP<double> mlp = random_mlp<double>(d, hidden, kind, bias);
      // Smooth (GELU) or piecewise linear with no seeded pre-activation within h of the kink (ReLU):
      // truncation O(h^2) and rounding O(eps |L| / h) ~ 1e-9 relative; 1e-7 leaves margin.
      const double tolerance = 1e-7;
      check_gradients(mlp, random_matrix<double>(n, d, 2, 1.5), random_matrix<double>(n, d, 3),
                      trainable_parameters(mlp), tolerance);  // both weights, and both biases when there are
    }
}

TEST_CASE("MLP backward accumulates into dX and the parameter gradients", "[mlp]") {
  MLP<double> mlp = random_mlp<double>(3, 8, ActivationKind::gelu, true);
  const Matrix<double> X = random_matrix<double>(6, 3, 4), dY = random_matrix<double>(6, 3, 5);
  Matrix<double> Y(6, 3), once = Matrix<double>::Zero(6, 3);
  mlp.forward(X, Y);
  mlp.backward(X, dY, once);
  const Matrix<double> fc_grad = mlp.fc.weight.grad;
  Matrix<double> twice = once;
  mlp.backward(X, dY, twice);
  REQUIRE(relative_error(twice, 2 * once) < 1e-15);
  REQUIRE(relative_error(mlp.fc.weight.grad, 2 * fc_grad) < 1e-15);
}

TEST_CASE("MLP in float agrees with double", "[mlp]") {
  const Index n = 16, d = 16, hidden = 64;
  for (const ActivationKind kind : {ActivationKind::gelu, ActivationKind::relu}) {
    CAPTURE(static_cast<int>(kind));
    MLP<double> reference = random_mlp<double>(d, hidden, kind, true);
    MLP<float> single = random_mlp<float>(d, hidden, kind, true);
    single.fc.weight.value = reference.fc.weight.value.cast<float>();
    single.proj.weight.value = reference.proj.weight.value.cast<float>();
    const Matrix<double> X = random_matrix<double>(n, d, 6), dY = random_matrix<double>(n, d, 7);
    const auto pass = float_double_pass(reference, single, X, dY);
    // Two products with inner sizes 16 and 64 around an activation accurate to O(10 u): worst case
    // (16 + 64 + 10) u = 5.4e-6 relative; that is the tolerance.
    const double tolerance = 5.4e-6;
    REQUIRE(relative_error(pass.Yf, pass.Y) < tolerance);
    REQUIRE(relative_error(pass.dXf, pass.dX) < tolerance);
    REQUIRE(relative_error(single.fc.weight.grad, reference.fc.weight.grad) < tolerance);
    REQUIRE(relative_error(single.proj.weight.grad, reference.proj.weight.grad) < tolerance);
  }
}

TEST_CASE("MLP options: defaults, names, output gain and validation", "[mlp]") {
  MLP<double> mlp({8}, "block0.mlp");
  REQUIRE(mlp.hidden() == 32);
  REQUIRE(mlp.options().activation == ActivationKind::gelu);
  std::vector<polyattn::Parameter<double>*> parameters;
  mlp.collect_parameters(parameters);
  REQUIRE(parameters.size() == 4);
  REQUIRE(parameters[0]->name == "block0.mlp.fc.weight");
  REQUIRE(parameters[3]->name == "block0.mlp.proj.bias");

  MLPOptions half_gain;
  half_gain.d_model = 8;
  half_gain.output_gain = 0.5;
  const MLP<double> damped(half_gain, "block0.mlp");
  REQUIRE(damped.fc.weight.value == mlp.fc.weight.value);
  REQUIRE(relative_error(damped.proj.weight.value, 0.5 * mlp.proj.weight.value) < 1e-15);

  REQUIRE_THROWS_WITH((MLP<double>({0})), Contains("MLPOptions") && Contains("'d_model'"));
  REQUIRE_THROWS_WITH((MLP<double>({4, -1})), Contains("'hidden'"));
  REQUIRE_THROWS_WITH((MLP<double>({4, 8, ActivationKind::gelu, true, 0.0})), Contains("'output_gain'"));

  Matrix<double> Y(3, 8), dX = Matrix<double>::Zero(3, 8);
  REQUIRE_THROWS_WITH(mlp.backward(Matrix<double>::Ones(3, 8), Matrix<double>::Ones(3, 8), dX),
                      Contains("MLP::backward") && Contains("forward pass"));
  REQUIRE_THROWS_WITH(mlp.forward(Matrix<double>::Ones(3, 7), Y),
                      Contains("MLP::forward") && Contains("'X'") && Contains("3x8") && Contains("3x7"));
  Matrix<double> X = Matrix<double>::Ones(3, 8);
  X(1, 2) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_WITH(mlp.forward(X, Y), Contains("MLP::forward") && Contains("'X'") && Contains("(1, 2)"));
  mlp.forward(Matrix<double>::Ones(3, 8), Y);
  REQUIRE_THROWS_WITH(mlp.backward(Matrix<double>::Ones(3, 8), X, dX),
                      Contains("MLP::backward") && Contains("'dY'") && Contains("(1, 2)"));
}
