#include <polyattn/attention/polynomial.hpp>

#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

using polyattn::certify_exp;
using polyattn::exp_polynomial;
using polyattn::minimax_exp;
using polyattn::Polynomial;
using polyattn::PolynomialKind;
using polyattn::select_degree;
using polyattn::taylor_exp;
using Catch::Contains;
using polyattn::testing::evaluate_long_double;

namespace {

constexpr double nan_value = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_value = std::numeric_limits<double>::infinity();

// Independent check of certify_exp(): |p(x) e^{-x} - 1| on a grid of [-R, R] with `points` intervals,
// evaluated in long double. 65537 is prime, so almost every dense point falls strictly between two
// points of the certificate's 2^14-interval grid, and the grid is 4x denser than the certificate's.
constexpr int dense_points = 65537;

long double dense_max_error(const Polynomial& p, double radius, int points = dense_points) {
  long double worst = 0;
  const long double r = radius;
  for (int k = 0; k <= points; ++k) {
    const long double x = -r + 2 * r * k / points;
    worst = std::max(worst, std::fabs(evaluate_long_double(p, x) * std::exp(-x) - 1));
  }
  return worst;
}

long double dense_min_value(const Polynomial& p, double radius, int points = dense_points) {
  long double lowest = std::numeric_limits<long double>::infinity();
  const long double r = radius;
  for (int k = 0; k <= points; ++k) lowest = std::min(lowest, evaluate_long_double(p, -r + 2 * r * k / points));
  return lowest;
}

const char* kind_name(PolynomialKind kind) { return kind == PolynomialKind::taylor ? "taylor" : "minimax"; }

}  // namespace

TEST_CASE("taylor_exp has coefficients 1/t!", "[polynomial]") {
  const Polynomial p = taylor_exp(5);
  REQUIRE(p.degree() == 5);
  const std::vector<double> expected{1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120};
  REQUIRE(p.coeffs.size() == expected.size());
  // 1/t! built by repeated division by small integers: each step rounds once, so t * 2^-53 relative.
  for (std::size_t t = 0; t < expected.size(); ++t)
    CHECK(p.coeffs[t] == Approx(expected[t]).epsilon(1e-15));
  REQUIRE(taylor_exp(0).coeffs == std::vector<double>{1.0});
  // Horner value of 1 + x + x^2/2 at x = 2 is exactly 5.
  REQUIRE(taylor_exp(2)(2.0) == 5.0);
}

TEST_CASE("Polynomial derivative and absolute_bound", "[polynomial]") {
  Polynomial p;
  p.coeffs = {1.0, -2.0, 3.0, -4.0};  // 1 - 2x + 3x^2 - 4x^3
  const Polynomial d = p.derivative();
  REQUIRE(d.coeffs == std::vector<double>{-2.0, 6.0, -12.0});
  REQUIRE(Polynomial{}.derivative().coeffs == std::vector<double>{0.0});
  // sum |a_t| 2^t = 1 + 4 + 12 + 32, exact in double.
  REQUIRE(p.absolute_bound(2.0) == 49.0);
  REQUIRE(p(-1.0) == 10.0);
}

TEST_CASE("certify_exp is a true upper bound on the relative error", "[polynomial]") {
  for (const PolynomialKind kind : {PolynomialKind::taylor, PolynomialKind::minimax})
    for (const double radius : {0.25, 1.0, 2.0, 3.5, 6.0})
      for (int degree = 0; degree <= 8; ++degree) {
        CAPTURE(kind_name(kind), radius, degree);
        const Polynomial p = exp_polynomial(kind, degree, radius);
        const double certified = certify_exp(p, radius).relative_error;
        const long double dense = dense_max_error(p, radius);
        CAPTURE(certified, static_cast<double>(dense));
        REQUIRE(std::isfinite(certified));
        // The certificate bounds the true maximum, which is at least the maximum over any sample.
        CHECK(static_cast<long double>(certified) >= dense);
        if (kind == PolynomialKind::taylor && dense >= 1e-9L) {
          // Not absurdly loose. For Taylor, p'' - 2p' + p = x^g/g! - x^{g-1}/(g-1)!, so the
          // certificate's interpolation term is h^2/8 e^R (R^{g-1}/(g-1)! + R^g/g!) with h = 2R/2^14,
          // while the true maximum is >= R^{g+1}/(g+1)! (at x = -R): the ratio is at most
          // e^R (g(g+1) + (g+1)R) / 2^29 < 2e-4 here; its rounding term is ~1e-14 << 1e-9 * 1e-2.
          CHECK(static_cast<long double>(certified) <= 1.01L * dense);
        }
      }
}

TEST_CASE("certify_exp at radius 0 certifies the single point 0", "[polynomial]") {
  const auto cert = certify_exp(taylor_exp(2), 0.0);
  REQUIRE(cert.positive);
  // p(0) = 1 exactly, so only the rounding term (a few 2^-53) remains.
  REQUIRE(cert.relative_error <= 1e-14);
}

TEST_CASE("certify_exp beyond the range of exp reports an infinite error, never NaN", "[polynomial]") {
  // e^800 overflows double: no finite bound can be certified, and none may be claimed.
  for (const int degree : {0, 1, 2, 5}) {
    CAPTURE(degree);
    for (const PolynomialKind kind : {PolynomialKind::taylor, PolynomialKind::minimax}) {
      const auto cert = certify_exp(exp_polynomial(kind, degree, 800.0), 800.0);
      REQUIRE(cert.relative_error == inf_value);
    }
    REQUIRE(certify_exp(taylor_exp(degree), 800.0).positive == (degree % 2 == 0));
  }
}

TEST_CASE("even Taylor truncations are certified positive, odd ones on a large interval are not",
          "[polynomial]") {
  for (const double radius : {1.0, 5.0, 20.0, 50.0})
    for (const int degree : {0, 2, 4, 6, 10}) {
      CAPTURE(radius, degree);
      const Polynomial p = taylor_exp(degree);
      REQUIRE(certify_exp(p, radius).positive);
      REQUIRE(dense_min_value(p, radius, 20000) > 0);
    }
  // 1 + x < 0 for x < -1; 1 + x + x^2/2 + x^3/6 has its real root near -1.596.
  for (const double radius : {2.0, 3.0, 10.0})
    for (const int degree : {1, 3}) {
      CAPTURE(radius, degree);
      const Polynomial p = taylor_exp(degree);
      REQUIRE(dense_min_value(p, radius, 20000) < 0);  // the truth the certificate must not contradict
      REQUIRE_FALSE(certify_exp(p, radius).positive);
    }
  // On a small interval an odd truncation is positive and epsilon < 1 certifies it.
  REQUIRE(certify_exp(taylor_exp(1), 0.5).positive);
  REQUIRE(certify_exp(taylor_exp(3), 1.0).positive);
}

TEST_CASE("minimax beats Taylor at the same degree and interval", "[polynomial]") {
  for (const double radius : {0.5, 1.0, 2.0, 4.0})
    for (int degree = 0; degree <= 6; ++degree) {
      CAPTURE(radius, degree);
      const Polynomial taylor = taylor_exp(degree);
      const Polynomial minimax = minimax_exp(degree, radius);
      REQUIRE(minimax.degree() == degree);
      const long double taylor_error = dense_max_error(taylor, radius, 20000);
      const long double minimax_error = dense_max_error(minimax, radius, 20000);
      CAPTURE(static_cast<double>(taylor_error), static_cast<double>(minimax_error));
      // Taylor is exact at 0 and worst at -R, the minimax error equioscillates over [-R, R]: the best
      // degree-g relative error is about 2^-g times Taylor's (Chebyshev economisation), so a factor of 2
      // is a safe margin for every g >= 1 while the minimax polynomial must strictly win at g = 0.
      if (degree == 0)
        CHECK(minimax_error < taylor_error);
      else
        CHECK(2 * minimax_error <= taylor_error);
      CHECK(certify_exp(minimax, radius).relative_error < certify_exp(taylor, radius).relative_error);
    }
}

TEST_CASE("select_degree returns the smallest degree meeting the target", "[polynomial]") {
  struct Setting {
    PolynomialKind kind;
    bool even_only;
  };
  for (const Setting setting : {Setting{PolynomialKind::taylor, true}, Setting{PolynomialKind::taylor, false},
                                Setting{PolynomialKind::minimax, false}, Setting{PolynomialKind::minimax, true}})
    for (const double radius : {0.5, 1.0, 2.0, 4.0})
      for (const double target : {1e-1, 1e-3, 1e-6, 1e-9}) {
        CAPTURE(kind_name(setting.kind), setting.even_only, radius, target);
        const int degree = select_degree(radius, target, setting.kind, setting.even_only);
        CAPTURE(degree);
        if (setting.even_only) REQUIRE(degree % 2 == 0);
        const Polynomial chosen = exp_polynomial(setting.kind, degree, radius);
        REQUIRE(certify_exp(chosen, radius).relative_error <= target);
        REQUIRE(dense_max_error(chosen, radius, 20000) <= static_cast<long double>(target));
        const int step = setting.even_only ? 2 : 1;
        if (degree - step >= 0) {
          const Polynomial smaller = exp_polynomial(setting.kind, degree - step, radius);
          REQUIRE(certify_exp(smaller, radius).relative_error > target);
        }
      }
  REQUIRE(select_degree(0.0, 1e-3) == 0);
  // e^1 * 1/(g+1)! <= 1e-3 first holds at g = 6 (e/5040 = 5.4e-4; e/720 = 3.8e-3 fails at g = 5), and the
  // true error at x = -1 is e * |e^-1 - p(-1)| = 2.3e-4 at g = 6 versus 1.6e-3 at g = 5.
  REQUIRE(select_degree(1.0, 1e-3, PolynomialKind::taylor, false) == 6);
  REQUIRE(select_degree(1.0, 1e-3, PolynomialKind::taylor, true) == 6);
}

TEST_CASE("select_degree throws std::domain_error for an unreachable target", "[polynomial]") {
  // Rounding in double limits the reachable relative error to about 1e-16 e^{2R}.
  REQUIRE_THROWS_AS(select_degree(1.0, 1e-20), std::domain_error);
  REQUIRE_THROWS_AS(select_degree(30.0, 1e-3), std::domain_error);
  // Degree 6 on [-4, 4] has error >= 4^7/7! = 3.3 > 1e-9.
  REQUIRE_THROWS_AS(select_degree(4.0, 1e-9, PolynomialKind::taylor, true, 6), std::domain_error);
  REQUIRE_THROWS_WITH(select_degree(4.0, 1e-9, PolynomialKind::taylor, true, 6), Contains("select_degree"));
}

TEST_CASE("bad polynomial arguments throw std::invalid_argument naming the argument", "[polynomial]") {
  REQUIRE_THROWS_AS(taylor_exp(-1), std::invalid_argument);
  REQUIRE_THROWS_WITH(taylor_exp(-1), Contains("'degree'") && Contains("-1"));
  REQUIRE_THROWS_AS(minimax_exp(-2, 1.0), std::invalid_argument);
  REQUIRE_THROWS_WITH(minimax_exp(-2, 1.0), Contains("'degree'"));
  for (const double bad : {0.0, -1.0, nan_value, inf_value}) {
    CAPTURE(bad);
    REQUIRE_THROWS_AS(minimax_exp(2, bad), std::invalid_argument);
    REQUIRE_THROWS_WITH(minimax_exp(2, bad), Contains("'radius'"));
  }
  // certify_exp and select_degree accept radius 0 (the single point 0) but nothing negative or non-finite.
  for (const double bad : {-1.0, -1e-300, nan_value, inf_value}) {
    CAPTURE(bad);
    REQUIRE_THROWS_AS(certify_exp(taylor_exp(2), bad), std::invalid_argument);
    REQUIRE_THROWS_WITH(certify_exp(taylor_exp(2), bad), Contains("'radius'"));
    REQUIRE_THROWS_AS(select_degree(bad, 1e-3), std::invalid_argument);
    REQUIRE_THROWS_WITH(select_degree(bad, 1e-3), Contains("'radius'"));
  }
  for (const double bad : {0.0, -1e-3, nan_value, inf_value}) {
    CAPTURE(bad);
    REQUIRE_THROWS_AS(select_degree(1.0, bad), std::invalid_argument);
    REQUIRE_THROWS_WITH(select_degree(1.0, bad), Contains("'target_error'"));
  }
  REQUIRE_THROWS_AS(select_degree(1.0, 1e-3, PolynomialKind::taylor, true, -1), std::invalid_argument);
  REQUIRE_THROWS_WITH(select_degree(1.0, 1e-3, PolynomialKind::taylor, true, -1), Contains("'max_degree'"));
  Polynomial empty;
  empty.coeffs.clear();
  REQUIRE_THROWS_AS(certify_exp(empty, 1.0), std::invalid_argument);
  REQUIRE_THROWS_WITH(certify_exp(empty, 1.0), Contains("'p'"));
}
