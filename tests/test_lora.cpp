#include <polyattn/lora.hpp>
#include <polyattn/optimizer.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <stdexcept>
#include <vector>

using Catch::Contains;
using polyattn::Index;
using polyattn::Linear;
using polyattn::LoRALinear;
using polyattn::LoRAOptions;
using polyattn::Matrix;
using polyattn::Parameter;
using polyattn::testing::gradient_error;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

// A LoRA layer with a random bias and a random (non-zero) B, so that every gradient term is exercised:
// with the fresh B = 0 the gradient of A would vanish and a wrong formula for it could not be seen.
template <class T>
LoRALinear<T> trained_lora(Index in, Index out, Index rank) {
  Linear<T> base({in, out, true, 0, 21}, "proj");
  base.bias.value = random_matrix<T>(1, out, 22);
  LoRALinear<T> lora(std::move(base), {rank, 3.0, 0, 23});
  lora.B.value = random_matrix<T>(rank, out, 24);
  return lora;
}

double lora_projected_loss(LoRALinear<double>& layer, const Matrix<double>& X, const Matrix<double>& R) {
  Matrix<double> Y(X.rows(), layer.out_features());
  layer.forward(X, Y);
  return (R.array() * Y.array()).sum();
}

}  // namespace

TEST_CASE("LoRA forward is X W + 1 b^T + (alpha / r) X A B and starts equal to the base layer", "[lora]") {
  const Index n = 5, in = 6, out = 4, rank = 2;
  const Matrix<double> X = random_matrix<double>(n, in, 1);
  Linear<double> base({in, out, true, 0, 2}, "proj");
  base.bias.value = random_matrix<double>(1, out, 3);
  Matrix<double> Y_base(n, out), Y(n, out);
  base.forward(X, Y_base);
  LoRALinear<double> lora(base, {rank, 5.0});
  REQUIRE(lora.scale() == 2.5);
  REQUIRE(lora.B.value.isZero(0));
  lora.forward(X, Y);
  REQUIRE(Y == Y_base);  // B = 0 adds exact zeros

  lora.B.value = random_matrix<double>(rank, out, 4);
  lora.forward(X, Y);
  const Matrix<double> expected = Y_base + 2.5 * X * lora.A.value * lora.B.value;
  REQUIRE(relative_error(Y, expected) < 1e-14);  // two short GEMMs of O(1) terms
}

TEST_CASE("LoRA backward: A, B and input gradients match central finite differences", "[lora]") {
  const Index n = 7, in = 5, out = 6, rank = 3;
  LoRALinear<double> lora = trained_lora<double>(in, out, rank);
  Matrix<double> X = random_matrix<double>(n, in, 5);
  const Matrix<double> R = random_matrix<double>(n, out, 6);
  Matrix<double> dX = Matrix<double>::Zero(n, in);
  Matrix<double> Y(n, out);
  lora.forward(X, Y);
  lora.backward(X, R, dX);
  const auto loss = [&] { return lora_projected_loss(lora, X, R); };
  // The loss is linear in each of X, A, B separately, so central differences are exact up to rounding,
  // O(eps |L| / h) ~ 1e-9 relative; 1e-7 leaves two digits of margin.
  const double tolerance = 1e-7;
  REQUIRE(gradient_error(loss, X, dX) < tolerance);
  REQUIRE(gradient_error(loss, lora.A.value, lora.A.grad) < tolerance);
  REQUIRE(gradient_error(loss, lora.B.value, lora.B.grad) < tolerance);
  // The base parameters are frozen: no gradient at all.
  REQUIRE(lora.base.weight.grad.isZero(0));
  REQUIRE(lora.base.bias.grad.isZero(0));
}

TEST_CASE("LoRA training updates A and B only, never the base weights", "[lora]") {
  const Index n = 8, in = 6, out = 6, rank = 2;
  LoRALinear<double> lora = trained_lora<double>(in, out, rank);
  std::vector<Parameter<double>*> parameters;
  lora.collect_parameters(parameters);
  REQUIRE(parameters.size() == 4);
  REQUIRE(polyattn::count_trainable(parameters) == in * rank + rank * out);
  REQUIRE(lora.A.name == "proj.weight.lora_A");
  const Matrix<double> W0 = lora.base.weight.value, b0 = lora.base.bias.value, A0 = lora.A.value;
  const Matrix<double> B0 = lora.B.value;

  // Regress onto a fixed target with AdamW (weight decay on) and SGD: the loss must fall, the base must not move.
  const Matrix<double> X = random_matrix<double>(n, in, 7), target = random_matrix<double>(n, out, 8);
  polyattn::AdamW<double> adam(parameters, {0.01, 0.9, 0.999, 1e-8, 0.1});
  polyattn::SGD<double> sgd(parameters, {0.01, 0.9, 0.1});
  Matrix<double> Y(n, out), dX(n, in);
  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < 40; ++step) {
    polyattn::zero_grads(parameters);
    lora.forward(X, Y);
    last_loss = 0.5 * (Y - target).squaredNorm();
    if (step == 0) first_loss = last_loss;
    dX.setZero();
    lora.backward(X, Y - target, dX);
    if (step % 2 == 0)
      adam.step();
    else
      sgd.step();
  }
  REQUIRE(last_loss < 0.9 * first_loss);
  REQUIRE(lora.base.weight.value == W0);
  REQUIRE(lora.base.bias.value == b0);
  REQUIRE(lora.A.value != A0);
  REQUIRE(lora.B.value != B0);
}

TEST_CASE("LoRA merged weight reproduces the forward output", "[lora]") {
  const Index n = 9, in = 8, out = 5, rank = 3;
  LoRALinear<double> lora = trained_lora<double>(in, out, rank);
  const Matrix<double> X = random_matrix<double>(n, in, 9);
  Matrix<double> Y(n, out), Y_merged(n, out);
  lora.forward(X, Y);

  const Linear<double> merged = lora.merged();
  merged.forward(X, Y_merged);
  // X (W + s A B) against X W + s (X A) B: the same sums in another order, O(in * eps) relative.
  REQUIRE(relative_error(Y_merged, Y) < 1e-13);
  REQUIRE(merged.weight.trainable);

  lora.merge();
  REQUIRE(lora.B.value.isZero(0));
  REQUIRE(lora.base.weight.value == merged.weight.value);
  lora.forward(X, Y_merged);
  REQUIRE(relative_error(Y_merged, Y) < 1e-13);
}

TEST_CASE("LoRA in float agrees with double", "[lora]") {
  const Index n = 12, in = 16, out = 8, rank = 4;
  LoRALinear<double> reference = trained_lora<double>(in, out, rank);
  LoRALinear<float> single = trained_lora<float>(in, out, rank);
  single.base.weight.value = reference.base.weight.value.cast<float>();
  single.A.value = reference.A.value.cast<float>();
  const Matrix<double> X = random_matrix<double>(n, in, 10), dY = random_matrix<double>(n, out, 11);
  Matrix<double> Y(n, out), dX = Matrix<double>::Zero(n, in);
  Matrix<float> Yf(n, out), dXf = Matrix<float>::Zero(n, in);
  reference.forward(X, Y);
  reference.backward(X, dY, dX);
  single.forward(X.cast<float>(), Yf);
  single.backward(X.cast<float>(), dY.cast<float>(), dXf);
  // Chains of two products with inner sizes <= 16 of O(1) random terms: relative error O(sqrt(16) u) per
  // product, at worst 32 u = 2e-6 together, the tolerance.
  const double tolerance = 2e-6;
  REQUIRE(relative_error(Yf, Y) < tolerance);
  REQUIRE(relative_error(dXf, dX) < tolerance);
  REQUIRE(relative_error(single.A.grad, reference.A.grad) < tolerance);
  REQUIRE(relative_error(single.B.grad, reference.B.grad) < tolerance);
}

TEST_CASE("LoRA rejects bad options and a backward without forward", "[lora]") {
  const Linear<double> base({4, 3}, "proj");
  REQUIRE_THROWS_WITH((LoRALinear<double>(base, {0, 8.0})), Contains("LoRAOptions") && Contains("'rank'"));
  REQUIRE_THROWS_WITH((LoRALinear<double>(base, {4, 8.0})),
                      Contains("LoRALinear") && Contains("min(in, out) = 3") && Contains("got 4"));
  REQUIRE_THROWS_WITH((LoRALinear<double>(base, {2, 0.0})), Contains("'alpha'"));
  REQUIRE_THROWS_WITH((LoRALinear<double>(base, {2, 8.0, -1.0})), Contains("'init_std'"));

  LoRALinear<double> lora(base, {2, 8.0});
  Matrix<double> dX = Matrix<double>::Zero(5, 4);
  REQUIRE_THROWS_WITH(lora.backward(Matrix<double>::Ones(5, 4), Matrix<double>::Ones(5, 3), dX),
                      Contains("LoRALinear::backward") && Contains("forward pass"));
  Matrix<double> Y(5, 3);
  REQUIRE_THROWS_WITH(lora.forward(Matrix<double>::Ones(5, 2), Y),
                      Contains("LoRALinear::forward") && Contains("'X'") && Contains("5x4") && Contains("5x2"));
  lora.B.value.resize(3, 3);
  REQUIRE_THROWS_WITH(lora.forward(Matrix<double>::Ones(5, 4), Y),
                      Contains("'proj.weight.lora_B'") && Contains("2x3") && Contains("3x3"));
}
