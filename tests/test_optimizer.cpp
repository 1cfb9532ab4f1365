#include <polyattn/nn/optimizer.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

using Catch::Contains;
using polyattn::AdamW;
using polyattn::AdamWOptions;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::Parameter;
using polyattn::SGD;
using polyattn::SGDOptions;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

Parameter<double> random_parameter(const char* name, Index rows, Index cols, std::uint64_t seed) {
  Parameter<double> p(name, rows, cols);
  p.value = random_matrix<double>(rows, cols, seed);
  p.grad = random_matrix<double>(rows, cols, seed + 100);
  return p;
}

// L(w) = 1/2 sum_ij curvature_ij (w_ij - target_ij)^2, an ill-conditioned (curvature 0.1 .. 10) quadratic.
struct Quadratic {
  Matrix<double> curvature, target;
  void gradient(Parameter<double>& p) const {
    p.grad = curvature.cwiseProduct(p.value - target);
  }
};

Quadratic make_quadratic(Index rows, Index cols) {
  Quadratic q;
  q.curvature = (random_matrix<double>(rows, cols, 31).array().abs() * 3).min(10).max(0.1).matrix();
  q.target = random_matrix<double>(rows, cols, 32);
  return q;
}

}  // namespace

TEST_CASE("AdamW first and second steps match the hand-computed update", "[optimizer]") {
  Parameter<double> w = random_parameter("w", 3, 2, 1);
  Parameter<double> b = random_parameter("b", 1, 2, 2);
  b.weight_decay = false;
  const Matrix<double> w0 = w.value, g1 = w.grad, b0 = b.value, gb = b.grad;
  AdamWOptions options;
  options.learning_rate = 0.1;
  options.weight_decay = 0.05;
  AdamW<double> adam({&w, &b}, options);
  adam.step();
  // Step 1: m = (1-b1) g, v = (1-b2) g^2, the bias corrections give mhat = g and vhat = g^2.
  const Matrix<double> w1 =
      w0 - 0.1 * (g1.array() / (g1.array().abs() + 1e-8) + 0.05 * w0.array()).matrix();
  const Matrix<double> b1 = b0 - 0.1 * (gb.array() / (gb.array().abs() + 1e-8)).matrix();
  // a few roundings of O(1) values
  REQUIRE(relative_error(w.value, w1) < 1e-15);
  REQUIRE(relative_error(b.value, b1) < 1e-15);
  REQUIRE(adam.steps(0) == 1);

  const Matrix<double> g2 = random_matrix<double>(3, 2, 3);
  w.grad = g2;
  b.grad.setZero();
  adam.step();
  const Matrix<double> m = 0.9 * 0.1 * g1 + 0.1 * g2;
  const Matrix<double> v = (0.999 * 0.001 * g1.array().square() + 0.001 * g2.array().square()).matrix();
  const Matrix<double> mhat = m / (1 - 0.81), vhat = v / (1 - 0.999 * 0.999);
  const Matrix<double> w2 =
      w1 - 0.1 * (mhat.array() / (vhat.array().sqrt() + 1e-8) + 0.05 * w1.array()).matrix();
  REQUIRE(relative_error(adam.first_moment(0), m) < 1e-15);
  REQUIRE(relative_error(adam.second_moment(0), v) < 1e-15);
  // the folded bias correction reorders a few operations: still a handful of roundings
  REQUIRE(relative_error(w.value, w2) < 1e-14);
}

TEST_CASE("AdamW weight decay is decoupled from the gradient", "[optimizer]") {
  Parameter<double> w = random_parameter("w", 4, 3, 4);
  w.grad.setZero();
  const Matrix<double> w0 = w.value;
  AdamWOptions options;
  options.learning_rate = 0.01;
  options.weight_decay = 0.1;
  AdamW<double> adam({&w}, options);
  adam.step();
  // With g = 0 the Adam term vanishes and only theta <- (1 - eta lambda) theta remains; L2 regularisation
  // folded into g would instead move every entry by about eta (Adam normalises the gradient).
  REQUIRE(relative_error(w.value, (1 - 0.01 * 0.1) * w0) < 1e-15);
}

TEST_CASE("AdamW and SGD minimise an ill-conditioned quadratic", "[optimizer]") {
  const Quadratic quadratic = make_quadratic(5, 4);
  // Both runs start at 0, |target|_F = 5.2 away from the minimiser, and must reach it to 1e-4.
  SECTION("AdamW") {
    Parameter<double> w("w", 5, 4);
    AdamWOptions options;
    options.learning_rate = 0.05;
    options.weight_decay = 0;
    AdamW<double> adam({&w}, options);
    for (int step = 0; step < 2000; ++step) {
      quadratic.gradient(w);
      adam.step();
    }
    REQUIRE((w.value - quadratic.target).norm() < 1e-4);
  }
  SECTION("SGD with momentum") {
    Parameter<double> w("w", 5, 4);
    // eta * max curvature = 0.1 * 10 = 1 < 2 (1 + mu): stable; the slowest mode contracts by about
    // sqrt(mu) = 0.95 per step, so 600 steps shrink the error by ~1e-13.
    SGD<double> sgd({&w}, {0.1, 0.9, 0});
    for (int step = 0; step < 600; ++step) {
      quadratic.gradient(w);
      sgd.step();
    }
    REQUIRE((w.value - quadratic.target).norm() < 1e-4);
  }
}

TEST_CASE("SGD momentum steps match the hand-computed update", "[optimizer]") {
  Parameter<double> w = random_parameter("w", 2, 3, 5);
  const Matrix<double> w0 = w.value, g1 = w.grad, g2 = random_matrix<double>(2, 3, 6);
  SGD<double> sgd({&w}, {0.1, 0.9, 0.01});
  sgd.step();
  const Matrix<double> w1 = w0 - 0.1 * (g1 + 0.01 * w0);
  REQUIRE(relative_error(w.value, w1) < 1e-15);
  w.grad = g2;
  sgd.step();
  const Matrix<double> velocity = 0.9 * g1 + g2;
  REQUIRE(relative_error(sgd.velocity(0), velocity) < 1e-15);
  REQUIRE(relative_error(w.value, w1 - 0.1 * (velocity + 0.01 * w1)) < 1e-15);
  sgd.set_learning_rate(0);
  const Matrix<double> w2 = w.value;
  sgd.step();
  REQUIRE(w.value == w2);
  REQUIRE_THROWS_WITH(sgd.set_learning_rate(-1), Contains("'learning_rate'"));
}

TEST_CASE("clip_grad_norm scales the global norm exactly and keeps the direction", "[optimizer]") {
  Parameter<double> a = random_parameter("a", 3, 4, 7), b = random_parameter("b", 1, 5, 8);
  Parameter<double> frozen = random_parameter("frozen", 2, 2, 9);
  frozen.trainable = false;
  const std::vector<Parameter<double>*> parameters{&a, &frozen, &b};
  const Matrix<double> ga = a.grad, gb = b.grad, gf = frozen.grad;
  const double norm = std::sqrt(ga.squaredNorm() + gb.squaredNorm());  // the frozen gradient does not count
  REQUIRE(polyattn::global_grad_norm(parameters) == Approx(norm).epsilon(1e-15));

  // Above the threshold nothing is clipped and nothing changes.
  REQUIRE(polyattn::clip_grad_norm(parameters, 2 * norm) == Approx(norm).epsilon(1e-15));
  REQUIRE(a.grad == ga);
  REQUIRE(b.grad == gb);

  const double max_norm = norm / 3;
  REQUIRE(polyattn::clip_grad_norm(parameters, max_norm) == Approx(norm).epsilon(1e-15));
  // One multiplication per entry and a norm: relative error a few ulps.
  REQUIRE(polyattn::global_grad_norm(parameters) == Approx(max_norm).epsilon(1e-14));
  REQUIRE(relative_error(a.grad, ga / 3) < 1e-15);
  REQUIRE(relative_error(b.grad, gb / 3) < 1e-15);
  REQUIRE(frozen.grad == gf);

  REQUIRE_THROWS_WITH(polyattn::clip_grad_norm(parameters, 0.0), Contains("clip_grad_norm") && Contains("'max_norm'"));
  const Matrix<double> clipped = a.grad;
  b.grad(0, 3) = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_AS(polyattn::clip_grad_norm(parameters, 1.0), std::domain_error);
  REQUIRE_THROWS_WITH(polyattn::clip_grad_norm(parameters, 1.0), Contains("'b'"));
  REQUIRE(a.grad == clipped);

  // Gradients near the overflow threshold still give the right norm (no squaring overflow).
  Parameter<double> huge("huge", 2, 1);
  huge.grad << 3e200, 4e200;
  REQUIRE(polyattn::global_grad_norm(std::vector<Parameter<double>*>{&huge}) == Approx(5e200).epsilon(1e-15));
}

TEST_CASE("Optimizers never change frozen parameters", "[optimizer]") {
  Parameter<double> trained = random_parameter("trained", 3, 3, 10);
  Parameter<double> frozen = random_parameter("frozen", 3, 3, 11);
  frozen.trainable = false;
  frozen.grad(0, 0) = std::numeric_limits<double>::quiet_NaN();  // not even a NaN gradient is looked at
  const Matrix<double> frozen_value = frozen.value, trained_value = trained.value;
  AdamW<double> adam({&frozen, &trained}, {});
  SGD<double> sgd({&trained, &frozen}, {0.1, 0.9, 0.5});
  for (int step = 0; step < 5; ++step) {
    adam.step();
    sgd.step();
  }
  REQUIRE(frozen.value == frozen_value);
  REQUIRE(trained.value != trained_value);
  REQUIRE(adam.steps(0) == 0);
  REQUIRE(adam.first_moment(0).size() == 0);
  REQUIRE(sgd.velocity(1).size() == 0);
}

TEST_CASE("Optimizers reject a non-finite gradient without changing any parameter", "[optimizer]") {
  Parameter<double> first = random_parameter("first", 2, 2, 12), second = random_parameter("second", 2, 2, 13);
  second.grad(1, 0) = std::numeric_limits<double>::quiet_NaN();
  const Matrix<double> first_value = first.value;
  AdamW<double> adam({&first, &second}, {});
  SGD<double> sgd({&first, &second}, {});
  REQUIRE_THROWS_AS(adam.step(), std::domain_error);
  REQUIRE_THROWS_WITH(adam.step(), Contains("AdamW::step") && Contains("'second'"));
  REQUIRE_THROWS_WITH(sgd.step(), Contains("SGD::step") && Contains("'second'"));
  REQUIRE(first.value == first_value);
  REQUIRE(adam.steps(0) == 0);
}

TEST_CASE("Optimizers reject bad options and bad parameter lists", "[optimizer]") {
  Parameter<double> p("p", 2, 2), q("q", 1, 1);
  AdamWOptions adam_options;
  adam_options.beta2 = 1;
  REQUIRE_THROWS_WITH((AdamW<double>({&p}, adam_options)), Contains("AdamWOptions") && Contains("'beta2'"));
  adam_options = {};
  adam_options.epsilon = 0;
  REQUIRE_THROWS_WITH((AdamW<double>({&p}, adam_options)), Contains("'epsilon'"));
  REQUIRE_THROWS_WITH((SGD<double>({&p}, {0.1, 1.0, 0})), Contains("SGDOptions") && Contains("'momentum'"));
  REQUIRE_THROWS_WITH((SGD<double>({&p}, {0.1, 0.9, -1})), Contains("'weight_decay'"));
  REQUIRE_THROWS_WITH((AdamW<double>({&p, &q, &p}, {})), Contains("AdamW") && Contains("'p' twice"));
  REQUIRE_THROWS_WITH((SGD<double>({&p, nullptr}, {})), Contains("null pointer at index 1"));

  AdamW<double> adam({&p}, {});
  adam.step();
  p.value.resize(3, 3);
  p.zero_grad();
  REQUIRE_THROWS_WITH(adam.step(), Contains("AdamW::step") && Contains("'p'") && Contains("changed shape"));
}

TEST_CASE("AdamW in float agrees with double", "[optimizer]") {
  Parameter<double> w = random_parameter("w", 8, 8, 14);
  Parameter<float> wf("w", 8, 8);
  wf.value = w.value.cast<float>();
  AdamW<double> adam({&w}, {});
  AdamW<float> adam_float({&wf}, {});
  for (int step = 0; step < 10; ++step) {
    w.grad = random_matrix<double>(8, 8, 200 + static_cast<std::uint64_t>(step));
    wf.grad = w.grad.cast<float>();
    adam.step();
    adam_float.step();
  }
  // Each step moves an O(1) weight by ~1e-3 with float relative error ~1e-7 in the update, and rounds the
  // weight itself (u = 6e-8): after 10 steps the relative error is a few 1e-7; tolerance 1e-6.
  REQUIRE(relative_error(wf.value, w.value) < 1e-6);
}
