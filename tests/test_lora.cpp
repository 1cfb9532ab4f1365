#include <polyattn/nn/linear.hpp>
#include <polyattn/nn/optimizer.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <stdexcept>
#include <vector>

using Catch::Contains;
using polyattn::Index;
using polyattn::Linear;
using polyattn::LoRAOptions;
using polyattn::Matrix;
using polyattn::Parameter;
using polyattn::testing::check_gradients;
using polyattn::testing::float_double_pass;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

// A Linear layer with a random bias and an adapter with a random (non-zero) B, so that every gradient term is
// exercised: with the fresh B = 0 the gradient of A would vanish and a wrong formula for it could not be seen.
template <class T>
Linear<T> trained_lora(Index in, Index out, Index rank) {
  Linear<T> layer({in, out, true, 0, 21}, "proj");
  layer.bias.value = random_matrix<T>(1, out, 22);
  layer.add_lora({rank, 3.0, 0, 23});
  layer.lora_B.value = random_matrix<T>(rank, out, 24);
  return layer;
}

}  // namespace

TEST_CASE("LoRA forward is X W + 1 b^T + (alpha / r) X A B and starts equal to the base layer", "[lora]") {
  const Index n = 5, in = 6, out = 4, rank = 2;
  const Matrix<double> X = random_matrix<double>(n, in, 1);
  Linear<double> lora({in, out, true, 0, 2}, "proj");
  lora.bias.value = random_matrix<double>(1, out, 3);
  REQUIRE_FALSE(lora.has_lora());
  REQUIRE(lora.lora_scale() == 0);
  REQUIRE(lora.lora_A.size() == 0);
  REQUIRE(lora.lora_B.size() == 0);
  Matrix<double> Y_base(n, out), Y(n, out);
  lora.forward(X, Y_base);
  lora.add_lora({rank, 5.0});
  REQUIRE(lora.has_lora());
  REQUIRE(lora.lora_rank() == rank);
  REQUIRE(lora.lora_scale() == 2.5);
  REQUIRE(lora.lora_B.value.isZero(0));
  REQUIRE(lora.lora_A.rows() == in);
  REQUIRE(lora.lora_A.cols() == rank);
  lora.forward(X, Y);
  REQUIRE(Y == Y_base);  // B = 0 adds exact zeros

  lora.lora_B.value = random_matrix<double>(rank, out, 4);
  lora.forward(X, Y);
  const Matrix<double> expected = Y_base + 2.5 * X * lora.lora_A.value * lora.lora_B.value;
  REQUIRE(relative_error(Y, expected) < 1e-14);  // two short GEMMs of O(1) terms
}

TEST_CASE("LoRA A is seeded and scaled by init_std or 1/sqrt(in)", "[lora]") {
  Linear<double> a({64, 32}, "a"), b({64, 32}, "b"), c({64, 32}, "c"), d({64, 32}, "d");
  a.add_lora({8, 8.0, 0, 5});
  b.add_lora({8, 8.0, 0, 5});
  c.add_lora({8, 8.0, 0, 6});
  d.add_lora({8, 8.0, 0.5, 5});
  REQUIRE(a.lora_A.value == b.lora_A.value);
  REQUIRE(a.lora_A.value != c.lora_A.value);
  REQUIRE(relative_error(d.lora_A.value, 4.0 * a.lora_A.value) < 1e-15);  // same draws, 0.5 against 1/8
  // 512 N(0, 1/64) samples: the sample variance has relative standard deviation sqrt(2/512) = 6%, so 30% is
  // five standard deviations.
  const double variance = a.lora_A.value.squaredNorm() / static_cast<double>(a.lora_A.size());
  REQUIRE(variance * 64 == Approx(1.0).epsilon(0.3));
}

TEST_CASE("LoRA backward: A, B and input gradients match central finite differences", "[lora]") {
  const Index n = 7, in = 5, out = 6, rank = 3;
  Linear<double> lora = trained_lora<double>(in, out, rank);
  // The loss is linear in each of X, A, B separately, so central differences are exact up to rounding,
  // O(eps |L| / h) ~ 1e-9 relative; 1e-7 leaves two digits of margin.
  const double tolerance = 1e-7;
  check_gradients(lora, random_matrix<double>(n, in, 5), random_matrix<double>(n, out, 6),
                  {&lora.lora_A, &lora.lora_B}, tolerance);
  // The base parameters are frozen: no gradient at all.
  REQUIRE_FALSE(lora.weight.trainable);
  REQUIRE_FALSE(lora.bias.trainable);
  REQUIRE(lora.weight.grad.isZero(0));
  REQUIRE(lora.bias.grad.isZero(0));
}

TEST_CASE("LoRA with the base unfrozen trains W, b, A and B together", "[lora]") {
  const Index n = 6, in = 4, out = 5, rank = 2;
  Linear<double> lora = trained_lora<double>(in, out, rank);
  lora.weight.trainable = true;
  lora.bias.trainable = true;
  const double tolerance = 1e-7;  // linear in each argument, as above
  check_gradients(lora, random_matrix<double>(n, in, 12), random_matrix<double>(n, out, 13),
                  {&lora.weight, &lora.bias, &lora.lora_A, &lora.lora_B}, tolerance);
}

TEST_CASE("LoRA training updates A and B only, never the base weights", "[lora]") {
  const Index n = 8, in = 6, out = 6, rank = 2;
  Linear<double> lora = trained_lora<double>(in, out, rank);
  std::vector<Parameter<double>*> parameters;
  lora.collect_parameters(parameters);
  REQUIRE(parameters.size() == 4);
  REQUIRE(parameters[2] == &lora.lora_A);
  REQUIRE(parameters[3] == &lora.lora_B);
  REQUIRE(polyattn::count_trainable(parameters) == in * rank + rank * out);
  REQUIRE(lora.lora_A.name == "proj.weight.lora_A");
  REQUIRE(lora.lora_B.name == "proj.weight.lora_B");
  const Matrix<double> W0 = lora.weight.value, b0 = lora.bias.value, A0 = lora.lora_A.value;
  const Matrix<double> B0 = lora.lora_B.value;

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
  REQUIRE(lora.weight.value == W0);
  REQUIRE(lora.bias.value == b0);
  REQUIRE(lora.lora_A.value != A0);
  REQUIRE(lora.lora_B.value != B0);
}

TEST_CASE("LoRA merged weight reproduces the forward output", "[lora]") {
  const Index n = 9, in = 8, out = 5, rank = 3;
  Linear<double> lora = trained_lora<double>(in, out, rank);
  const Matrix<double> X = random_matrix<double>(n, in, 9);
  Matrix<double> Y(n, out), Y_merged(n, out);
  lora.forward(X, Y);

  Linear<double> merged = lora.merged();
  REQUIRE_FALSE(merged.has_lora());
  REQUIRE(merged.lora_A.size() == 0);
  REQUIRE(merged.lora_B.size() == 0);
  REQUIRE(merged.weight.trainable);
  REQUIRE(merged.bias.trainable);
  std::vector<Parameter<double>*> merged_parameters;
  merged.collect_parameters(merged_parameters);
  REQUIRE(merged_parameters.size() == 2);
  merged.forward(X, Y_merged);
  // X (W + s A B) against X W + s (X A) B: the same sums in another order, O(in * eps) relative.
  REQUIRE(relative_error(Y_merged, Y) < 1e-13);
  // merged() leaves the adapted layer as it was
  REQUIRE(lora.has_lora());
  REQUIRE_FALSE(lora.weight.trainable);

  const Matrix<double> A0 = lora.lora_A.value;
  lora.merge_lora();
  REQUIRE(lora.lora_B.value.isZero(0));
  REQUIRE(lora.lora_A.value == A0);
  REQUIRE(lora.has_lora());             // the adapter stays, so parameter lists stay valid
  REQUIRE_FALSE(lora.weight.trainable);  // and the base stays frozen
  REQUIRE(lora.weight.value == merged.weight.value);
  lora.forward(X, Y_merged);
  REQUIRE(relative_error(Y_merged, Y) < 1e-13);

  // A layer without adapter merges to a trainable copy of itself.
  Linear<double> plain({in, out, false, 0, 3}, "plain");
  plain.weight.trainable = false;
  const Linear<double> copy = plain.merged();
  REQUIRE(copy.weight.value == plain.weight.value);
  REQUIRE(copy.weight.trainable);
}

TEST_CASE("LoRA in float agrees with double", "[lora]") {
  const Index n = 12, in = 16, out = 8, rank = 4;
  Linear<double> reference = trained_lora<double>(in, out, rank);
  Linear<float> single = trained_lora<float>(in, out, rank);
  // Seeded initialisation and random_matrix give the float layer the rounded double values.
  REQUIRE(single.weight.value == reference.weight.value.cast<float>());
  REQUIRE(single.lora_A.value == reference.lora_A.value.cast<float>());
  REQUIRE(single.lora_B.value == reference.lora_B.value.cast<float>());
  const Matrix<double> X = random_matrix<double>(n, in, 10), dY = random_matrix<double>(n, out, 11);
  const auto pass = float_double_pass(reference, single, X, dY);
  // Chains of two products with inner sizes <= 16 of O(1) random terms: relative error O(sqrt(16) u) per
  // product, at worst 32 u = 2e-6 together, the tolerance.
  const double tolerance = 2e-6;
  REQUIRE(relative_error(pass.Yf, pass.Y) < tolerance);
  REQUIRE(relative_error(pass.dXf, pass.dX) < tolerance);
  REQUIRE(relative_error(single.lora_A.grad, reference.lora_A.grad) < tolerance);
  REQUIRE(relative_error(single.lora_B.grad, reference.lora_B.grad) < tolerance);
}

TEST_CASE("LoRA rejects bad options, a second adapter and a backward without forward", "[lora]") {
  Linear<double> base({4, 3}, "proj");
  REQUIRE_THROWS_WITH(base.add_lora({0, 8.0}), Contains("LoRAOptions") && Contains("'rank'"));
  REQUIRE_THROWS_WITH(base.add_lora({4, 8.0}), Contains("Linear::add_lora") && Contains("'proj.weight'") &&
                                                   Contains("min(in, out) = 3") && Contains("got 4"));
  REQUIRE_THROWS_WITH(base.add_lora({2, 0.0}), Contains("'alpha'"));
  REQUIRE_THROWS_WITH(base.add_lora({2, 8.0, -1.0}), Contains("'init_std'"));
  // the failed calls changed nothing
  REQUIRE_FALSE(base.has_lora());
  REQUIRE(base.weight.trainable);
  REQUIRE(base.bias.trainable);
  REQUIRE_THROWS_WITH(base.merge_lora(), Contains("Linear::merge_lora") && Contains("no adapter"));

  Linear<double> lora = base;
  lora.add_lora({2, 8.0});
  REQUIRE_THROWS_WITH(lora.add_lora({1, 8.0}), Contains("Linear::add_lora") && Contains("already has an adapter"));
  REQUIRE(lora.lora_rank() == 2);
  Matrix<double> dX = Matrix<double>::Zero(5, 4);
  REQUIRE_THROWS_WITH(lora.backward(Matrix<double>::Ones(5, 4), Matrix<double>::Ones(5, 3), dX),
                      Contains("Linear::backward") && Contains("forward pass"));
  Matrix<double> Y(5, 3);
  REQUIRE_THROWS_WITH(lora.forward(Matrix<double>::Ones(5, 2), Y),
                      Contains("Linear::forward") && Contains("'X'") && Contains("5x4") && Contains("5x2"));
  lora.forward(Matrix<double>::Ones(5, 4), Y);
  REQUIRE_THROWS_WITH(lora.backward(Matrix<double>::Ones(6, 4), Matrix<double>::Ones(6, 3), dX),
                      Contains("'dX'"));
  Matrix<double> dX6 = Matrix<double>::Zero(6, 4);
  REQUIRE_THROWS_WITH(lora.backward(Matrix<double>::Ones(6, 4), Matrix<double>::Ones(6, 3), dX6),
                      Contains("forward pass") && Contains("5x2") && Contains("6x2"));
  lora.lora_B.value.resize(3, 3);
  REQUIRE_THROWS_WITH(lora.forward(Matrix<double>::Ones(5, 4), Y),
                      Contains("'proj.weight.lora_B'") && Contains("2x3") && Contains("3x3"));
  REQUIRE_THROWS_WITH(lora.merge_lora(), Contains("'proj.weight.lora_B'"));
  REQUIRE_THROWS_WITH(lora.merged(), Contains("'proj.weight.lora_B'"));
}
