#include <polyattn/nn/activation.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <limits>
#include <stdexcept>

using Catch::Contains;
using polyattn::Activation;
using polyattn::ActivationKind;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::testing::check_gradients;
using polyattn::testing::float_double_pass;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

TEST_CASE("GELU matches the tanh formula at pinned points and ReLU is max(0, x)", "[activation]") {
  Matrix<double> X(1, 5), Y(1, 5);
  X << 1.0, -1.0, 2.0, 0.0, -0.5;
  Activation<double> gelu(ActivationKind::gelu), relu(ActivationKind::relu);
  gelu.forward(X, Y);
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) evaluated independently (Python, double)
  REQUIRE(Y(0, 0) == Approx(0.8411919906082768).epsilon(1e-15));
  REQUIRE(Y(0, 1) == Approx(-0.15880800939172324).epsilon(1e-14));
  REQUIRE(Y(0, 2) == Approx(1.954597694087775).epsilon(1e-15));
  REQUIRE(Y(0, 3) == 0.0);
  relu.forward(X, Y);
  REQUIRE(Y == (Matrix<double>(1, 5) << 1.0, 0.0, 2.0, 0.0, 0.0).finished());
}

TEST_CASE("Activation backward matches central finite differences", "[activation]") {
  for (const ActivationKind kind : {ActivationKind::gelu, ActivationKind::relu}) {
    CAPTURE(static_cast<int>(kind));
    Activation<double> f(kind);
    // GELU is smooth with O(1) third derivative: truncation h^2 ~ 1e-12, rounding eps |L| / h ~ 1e-9 relative.
    // ReLU is piecewise linear and no seeded input lies within h = 1e-6 of the kink, so the difference is
    // exact up to rounding. Both give 1e-7 with margin.
    check_gradients(f, random_matrix<double>(7, 5, 1, 2.0), random_matrix<double>(7, 5, 2), {}, 1e-7);
  }
}

TEST_CASE("Activation backward accumulates; ReLU'(0) = 0", "[activation]") {
  for (const ActivationKind kind : {ActivationKind::gelu, ActivationKind::relu}) {
    Activation<double> f(kind);
    const Matrix<double> X = random_matrix<double>(4, 3, 3), dY = random_matrix<double>(4, 3, 4);
    Matrix<double> Y(4, 3), once = Matrix<double>::Zero(4, 3);
    f.forward(X, Y);
    f.backward(X, dY, once);
    Matrix<double> twice = once;
    f.backward(X, dY, twice);
    REQUIRE(relative_error(twice, 2 * once) < 1e-15);
  }
  Activation<double> relu(ActivationKind::relu);
  const Matrix<double> zero = Matrix<double>::Zero(2, 2);
  Matrix<double> Y(2, 2), dX = Matrix<double>::Zero(2, 2);
  relu.forward(zero, Y);
  relu.backward(zero, Matrix<double>::Ones(2, 2), dX);
  REQUIRE(dX.isZero(0));
}

TEST_CASE("GELU saturates without overflow for huge inputs", "[activation]") {
  Matrix<float> X(1, 6), Y(1, 6), dX = Matrix<float>::Zero(1, 6);
  const float huge = std::numeric_limits<float>::max();
  X << huge, -huge, 1e20f, -1e20f, 11.0f, -11.0f;
  Activation<float> gelu;
  gelu.forward(X, Y);
  gelu.backward(X, Matrix<float>::Ones(1, 6), dX);
  // x^3 overflows float beyond 7e12; e = exp(-2|u|) then underflows to 0 and the clamp keeps x^2 finite in the
  // derivative, where 0 * inf would otherwise give NaN.
  REQUIRE(Y.allFinite());
  REQUIRE(dX.allFinite());
  REQUIRE(Y(0, 0) == huge);
  REQUIRE(Y(0, 1) == 0.0f);
  REQUIRE(Y(0, 4) == 11.0f);
  REQUIRE(dX == (Matrix<float>(1, 6) << 1, 0, 1, 0, 1, 0).finished());

  Matrix<double> Xd(1, 2), Yd(1, 2), dXd = Matrix<double>::Zero(1, 2);
  Xd << 1e300, -1e300;
  Activation<double> gelu_double;
  gelu_double.forward(Xd, Yd);
  gelu_double.backward(Xd, Matrix<double>::Ones(1, 2), dXd);
  REQUIRE(Yd(0, 0) == 1e300);
  REQUIRE(Yd(0, 1) == 0.0);
  REQUIRE(dXd == (Matrix<double>(1, 2) << 1, 0).finished());
}

TEST_CASE("GELU keeps full relative accuracy in the negative tail, also in float", "[activation]") {
  Matrix<float> X(1, 3), Y(1, 3);
  X << -3.0f, -5.0f, -8.0f;
  Activation<float> gelu;
  gelu.forward(X, Y);
  // 40-digit references (mpmath). Computing 1 + tanh(u) directly would cancel to an absolute error of u = 6e-8,
  // i.e. a relative error of 2e-5 at x = -3 and 100% at x = -5. Through e = exp(-2|u|) the relative error is
  // about |2u| ulps of exp's argument: 2|u| = 14, 40 and 150 here, so tolerances 20, 50 and 200 ulps (u = 6e-8).
  REQUIRE(Y(0, 0) == Approx(-0.0036373920817730188378).epsilon(20 * 6e-8));
  REQUIRE(Y(0, 1) == Approx(-2.2917961966295060456e-7).epsilon(50 * 6e-8));
  REQUIRE(Y(0, 2) == Approx(-3.107782937501111218e-21).epsilon(200 * 6e-8));
}

TEST_CASE("Activation in float agrees with double", "[activation]") {
  for (const ActivationKind kind : {ActivationKind::gelu, ActivationKind::relu}) {
    CAPTURE(static_cast<int>(kind));
    const Matrix<double> X = random_matrix<double>(16, 24, 5, 2.0), dY = random_matrix<double>(16, 24, 6);
    Activation<double> reference(kind);
    Activation<float> single(kind);
    const auto pass = float_double_pass(reference, single, X, dY);
    // Each entry is a tanh (Eigen's float tanh is accurate to a few ulps) and about ten flops: O(10 u) = 6e-7
    // relative, and GELU'(x) has condition number O(1) for |x| <= 8; tolerance 1e-6.
    REQUIRE(relative_error(pass.Yf, pass.Y) < 1e-6);
    REQUIRE(relative_error(pass.dXf, pass.dX) < 1e-6);
  }
}

TEST_CASE("Activation rejects bad input", "[activation]") {
  Activation<double> gelu;
  Matrix<double> Y(3, 2), dX = Matrix<double>::Zero(3, 2);
  REQUIRE_THROWS_WITH(gelu.backward(Matrix<double>::Ones(3, 2), Matrix<double>::Ones(3, 2), dX),
                      Contains("Activation::backward") && Contains("forward pass"));
  REQUIRE_THROWS_WITH(gelu.forward(Matrix<double>::Ones(3, 2), Y.leftCols(1)),
                      Contains("Activation::forward") && Contains("'Y'") && Contains("3x2") && Contains("3x1"));
  Matrix<double> X = Matrix<double>::Ones(3, 2);
  X(2, 0) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_WITH(gelu.forward(X, Y), Contains("'X'") && Contains("(2, 0)"));
  REQUIRE_THROWS_WITH(gelu.forward(Matrix<double>(0, 2), Y), Contains("non-empty"));
  gelu.forward(Matrix<double>::Ones(3, 2), Y);
  REQUIRE_THROWS_WITH(gelu.backward(Matrix<double>::Ones(3, 2), Matrix<double>::Ones(3, 1), dX),
                      Contains("'dY'") && Contains("3x2") && Contains("3x1"));
}
