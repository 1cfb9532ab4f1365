#include <polyattn/attention/feature_map.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

using polyattn::FeatureMap;
using polyattn::FeatureMapKind;
using polyattn::FeatureSide;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::Polynomial;
using polyattn::taylor_exp;
using polyattn::testing::gradient_error;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;
using Catch::Contains;
using polyattn::testing::evaluate_long_double;

namespace {

const char* kind_name(FeatureMapKind kind) { return kind == FeatureMapKind::symmetric ? "symmetric" : "kronecker"; }

Index binomial(Index n, Index k) {
  Index value = 1;
  for (Index i = 1; i <= k; ++i) value = value * (n - k + i) / i;  // exact: a product of i consecutive integers
  return value;
}

Index kronecker_width(Index d, int g) {
  Index total = 0, level = 1;
  for (int t = 0; t <= g; ++t, level *= d) total += level;
  return total;
}

// The first g + 1 coefficients of 0.5 - x + 0.3 x^2 - 0.2 x^3 + 0.1 x^4: negative weights exercise the
// sign(omega) sqrt|omega| split between the query and the key features.
Polynomial mixed_sign_polynomial(int degree) {
  const std::vector<double> all{0.5, -1.0, 0.3, -0.2, 0.1};
  Polynomial p;
  p.coeffs.assign(all.begin(), all.begin() + degree + 1);
  return p;
}

// Checks phi_Q(q) . phi_K(k) = p(c q.k) entrywise. Each feature product is one term of
// sum_t a_t (c q.k)^t expanded into monomials, and the absolute values of all those terms add up to
// sum_t |a_t| (c |q|.|k|)^t <= P(c ||q|| ||k||) with P = p.absolute_bound. Building a monomial costs at most
// g + 2 roundings (the sqrt(c) scaling, g products, the weight) and the dot product r more, so
// |error| <= (r + g + 3) u P. In double (u = 2^-53) with r <= 781 that is < 9e-14 P; the stated
// tolerance is 1e-12 P. In float the same bound is used with u = 2^-24 and a factor 2 margin.
template <class T>
void check_kernel_identity(FeatureMapKind kind, Index d, const Polynomial& p, double scale, std::uint64_t seed) {
  const Index n = 5, m = 4;
  const Matrix<T> Q = random_matrix<T>(n, d, seed, 1.0 / std::sqrt(static_cast<double>(d)));
  const Matrix<T> K = random_matrix<T>(m, d, seed + 1, 1.0 / std::sqrt(static_cast<double>(d)));
  const FeatureMap<T> map(kind, d, p, scale);
  Matrix<T> Fq(n, map.width()), Fk(m, map.width());
  map.features(Q, FeatureSide::query, Fq);
  map.features(K, FeatureSide::key, Fk);
  const Matrix<T> kernel = Fq * Fk.transpose();
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double per_term = static_cast<double>(map.width() + p.degree() + 3) * u;
  const double tolerance_factor = std::is_same<T, double>::value ? 1e-12 : 2 * per_term;
  REQUIRE(per_term <= tolerance_factor);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < m; ++j) {
      long double dot = 0;
      for (Index l = 0; l < d; ++l) dot += static_cast<long double>(Q(i, l)) * static_cast<long double>(K(j, l));
      const long double expected = evaluate_long_double(p, static_cast<long double>(scale) * dot);
      const double bound = p.absolute_bound(scale * static_cast<double>(Q.row(i).template cast<double>().norm() *
                                                                        K.row(j).template cast<double>().norm()));
      CAPTURE(i, j, static_cast<double>(kernel(i, j)), static_cast<double>(expected), bound);
      CHECK(std::fabs(static_cast<long double>(kernel(i, j)) - expected) <=
            static_cast<long double>(tolerance_factor * bound));
    }
}

}  // namespace

TEST_CASE("phi_Q(q).phi_K(k) = p(c q.k) for both maps (double)", "[feature_map]") {
  std::uint64_t seed = 100;
  for (const FeatureMapKind kind : {FeatureMapKind::symmetric, FeatureMapKind::kronecker})
    for (const Index d : {1, 2, 3, 5})
      for (int g = 0; g <= 4; ++g)
        for (const double scale : {0.3, 1.0, 2.5}) {
          CAPTURE(kind_name(kind), d, g, scale);
          check_kernel_identity<double>(kind, d, taylor_exp(g), scale, seed++);
          check_kernel_identity<double>(kind, d, mixed_sign_polynomial(g), scale, seed++);
        }
}

TEST_CASE("phi_Q(q).phi_K(k) = p(c q.k) in float", "[feature_map]") {
  for (const FeatureMapKind kind : {FeatureMapKind::symmetric, FeatureMapKind::kronecker})
    for (const int g : {2, 4}) {
      CAPTURE(kind_name(kind), g);
      check_kernel_identity<float>(kind, 4, taylor_exp(g), 0.5, 7);
      check_kernel_identity<float>(kind, 4, mixed_sign_polynomial(g), 0.5, 8);
    }
}

TEST_CASE("raw monomials, weights and the scaled input reproduce the kernel", "[feature_map]") {
  const Index n = 6, d = 3;
  const double c = 0.7;
  const Polynomial p = mixed_sign_polynomial(3);
  const Matrix<double> X = random_matrix<double>(n, d, 11);
  for (const FeatureMapKind kind : {FeatureMapKind::symmetric, FeatureMapKind::kronecker}) {
    CAPTURE(kind_name(kind));
    const FeatureMap<double> map(kind, d, p, c);
    REQUIRE(map.kind() == kind);
    REQUIRE(map.dim() == d);
    REQUIRE(map.degree() == 3);
    REQUIRE(map.scale() == c);
    Matrix<double> scaled(n, d), M(n, map.width());
    map.monomials(X, scaled, M);
    // sqrt(c) X: one rounding of sqrt(c) and one of each product.
    REQUIRE(relative_error(scaled, std::sqrt(c) * X) <= 4e-16);
    const Matrix<double> kernel = M * map.weights().asDiagonal() * M.transpose();
    const Matrix<double> scores = c * X * X.transpose();
    const Matrix<double> expected = scores.unaryExpr([&](double s) { return p(s); });
    // Same rounding argument as the feature identity: (r + g + 3) u sum_t |a_t| ||sqrt(c) x||^{2t} < 1e-14
    // relative here (r <= 40, entries O(1)); 1e-12 leaves the margin of the identity test.
    REQUIRE(relative_error(kernel, expected) <= 1e-12);
    // Monomial degrees: degree(feature k) counts the products that built it.
    const std::vector<int>& degrees = map.feature_degrees();
    REQUIRE(static_cast<Index>(degrees.size()) == map.width());
    REQUIRE(degrees.front() == 0);
    REQUIRE(std::is_sorted(degrees.begin(), degrees.end()));
    REQUIRE(degrees.back() == 3);
  }
}

TEMPLATE_TEST_CASE("monomials with column sums: the same monomials and 1^T M", "[feature_map]", float, double) {
  using T = TestType;
  const FeatureMap<T> map(FeatureMapKind::symmetric, 5, taylor_exp(2), 0.6);
  const Index r = map.width();
  // Whole strips of 4 SIMD packets, a strip cut short, single rows after the last packet, and fewer rows than one.
  for (const Index n : {Index(64), Index(128), Index(100), Index(70), Index(5), Index(1)}) {
    CAPTURE(n);
    const Matrix<T> X = random_matrix<T>(n, 5, 90 + static_cast<unsigned>(n));
    Matrix<T> scaled(n, 5), M(n, r), scaled_plain(n, 5), M_plain(n, r);
    polyattn::Vector<T> sums = polyattn::Vector<T>::Constant(r, T(7));  // overwritten, not added to
    map.monomials(X, scaled, M, sums);
    map.monomials(X, scaled_plain, M_plain);
    REQUIRE(M == M_plain);
    REQUIRE(scaled == scaled_plain);
    // Each sum adds n terms in some order: within n u sum_i |M_ik| of the sum in double.
    const Eigen::MatrixXd exact = M.template cast<double>();
    for (Index k = 0; k < r; ++k) {
      const double bound = static_cast<double>(n) * std::numeric_limits<T>::epsilon() * exact.col(k).cwiseAbs().sum();
      REQUIRE(std::abs(static_cast<double>(sums(k)) - exact.col(k).sum()) <= bound);
    }
    REQUIRE(sums(0) == static_cast<T>(n));
  }
  const Matrix<T> X = random_matrix<T>(8, 5, 97);
  Matrix<T> scaled(8, 5), M(8, r);
  polyattn::Vector<T> short_sums(r - 1);
  REQUIRE_THROWS_AS(map.monomials(X, scaled, M, short_sums), std::invalid_argument);
  REQUIRE_THROWS_WITH(map.monomials(X, scaled, M, short_sums),
                      Contains("FeatureMap::monomials") && Contains("'column_sums'") && Contains(std::to_string(r)) &&
                          Contains(std::to_string(r - 1)));
  Matrix<T> wide(8, r + 5);
  wide.leftCols(5) = X;
  Eigen::Map<polyattn::Vector<T>> overlapping(wide.data(), r);
  REQUIRE_THROWS_WITH(map.monomials(wide.leftCols(5), scaled, M, overlapping),
                      Contains("'column_sums'") && Contains("'X'"));
}

TEST_CASE("feature widths are C(d+g, g) and sum_t d^t", "[feature_map]") {
  for (Index d = 1; d <= 8; ++d)
    for (int g = 0; g <= 5; ++g) {
      CAPTURE(d, g);
      const FeatureMap<double> symmetric(FeatureMapKind::symmetric, d, taylor_exp(g), 1.0);
      const FeatureMap<double> kronecker(FeatureMapKind::kronecker, d, taylor_exp(g), 1.0);
      REQUIRE(symmetric.width() == binomial(d + g, g));
      REQUIRE(polyattn::feature_width(FeatureMapKind::symmetric, d, g) == binomial(d + g, g));
      REQUIRE(kronecker.width() == kronecker_width(d, g));
      REQUIRE(polyattn::feature_width(FeatureMapKind::kronecker, d, g) == kronecker_width(d, g));
      // Degree-t features: C(d+t-1, t) multisets, d^t ordered tuples.
      for (int t = 0; t <= g; ++t) {
        const auto count = [t](const std::vector<int>& degrees) {
          return static_cast<Index>(std::count(degrees.begin(), degrees.end(), t));
        };
        REQUIRE(count(symmetric.feature_degrees()) == binomial(d + t - 1, t));
        REQUIRE(count(kronecker.feature_degrees()) == kronecker_width(d, t) - kronecker_width(d, t - 1));
      }
    }
}

TEST_CASE("feature_width saturates at cap + 1 instead of overflowing", "[feature_map]") {
  using polyattn::default_max_features;
  using polyattn::feature_width;
  const Index cap = default_max_features;
  REQUIRE(feature_width(FeatureMapKind::kronecker, 1000, 10) == cap + 1);
  REQUIRE(feature_width(FeatureMapKind::symmetric, 1000, 10) == cap + 1);
  REQUIRE(feature_width(FeatureMapKind::symmetric, 64, 1000) == cap + 1);
  REQUIRE(feature_width(FeatureMapKind::kronecker, 2, 1000) == cap + 1);
  REQUIRE(feature_width(FeatureMapKind::symmetric, Index(1) << 40, 3) == cap + 1);
  REQUIRE(feature_width(FeatureMapKind::kronecker, std::numeric_limits<Index>::max(), 2) == cap + 1);
  // Exactly at the cap: C(8+2, 2) = 45.
  REQUIRE(feature_width(FeatureMapKind::symmetric, 8, 2, 45) == 45);
  REQUIRE(feature_width(FeatureMapKind::symmetric, 8, 2, 44) == 45);
  // A caller may lift the cap almost to the top of Index; the result must stay exact below the cap and
  // saturate at cap + 1 above it, with no signed overflow on the way (UBSan checks the arithmetic).
  for (const Index huge_cap : {std::numeric_limits<Index>::max() / 2, std::numeric_limits<Index>::max() - 1}) {
    CAPTURE(huge_cap);
    CHECK(feature_width(FeatureMapKind::symmetric, 10, 5, huge_cap) == binomial(15, 5));
    CHECK(feature_width(FeatureMapKind::kronecker, 10, 5, huge_cap) == kronecker_width(10, 5));
    CHECK(feature_width(FeatureMapKind::symmetric, 1000, 60, huge_cap) == huge_cap + 1);
    CHECK(feature_width(FeatureMapKind::kronecker, 1000, 60, huge_cap) == huge_cap + 1);
  }
}

TEST_CASE("monomials_backward matches central finite differences and accumulates", "[feature_map]") {
  const Index n = 4, d = 3;
  const double c = 0.7;
  for (const FeatureMapKind kind : {FeatureMapKind::symmetric, FeatureMapKind::kronecker})
    for (const int g : {1, 2, 3}) {
      CAPTURE(kind_name(kind), g);
      const FeatureMap<double> map(kind, d, taylor_exp(g), c);
      const Index r = map.width();
      Matrix<double> X = random_matrix<double>(n, d, 21);
      const Matrix<double> upstream = random_matrix<double>(n, r, 22);  // L = sum(upstream o M(X))
      Matrix<double> scaled(n, d), M(n, r);
      const auto loss = [&]() {
        map.monomials(X, scaled, M);
        return upstream.cwiseProduct(M).sum();
      };
      loss();
      const Matrix<double> saved_scaled = scaled, saved_M = M;
      Matrix<double> dM = upstream;
      Matrix<double> dX = Matrix<double>::Zero(n, d);
      map.monomials_backward(dM, saved_scaled, saved_M, dX);
      // Central differences with h = 1e-6 on an O(1) polynomial loss: truncation h^2 L''' and rounding
      // u |L| / h are both ~1e-10 relative, so 1e-7 (gradient_check.hpp) has three digits of margin.
      REQUIRE(gradient_error(loss, X, dX) <= 1e-7);
      // Backward accumulates: a second call on a non-zero buffer adds the same gradient.
      const Matrix<double> offset = random_matrix<double>(n, d, 23);
      Matrix<double> accumulated = offset;
      dM = upstream;
      map.monomials_backward(dM, saved_scaled, saved_M, accumulated);
      REQUIRE(relative_error(accumulated - offset, dX) <= 1e-14);
    }
}

TEST_CASE("bad feature-map arguments throw std::invalid_argument naming the argument", "[feature_map]") {
  const Polynomial p = taylor_exp(2);
  for (const Index bad_dim : {0, -3}) {
    CAPTURE(bad_dim);
    REQUIRE_THROWS_AS(FeatureMap<double>(FeatureMapKind::symmetric, bad_dim, p, 1.0), std::invalid_argument);
    REQUIRE_THROWS_WITH(FeatureMap<double>(FeatureMapKind::symmetric, bad_dim, p, 1.0), Contains("'dim'"));
  }
  Polynomial no_coefficients;
  no_coefficients.coeffs.clear();  // degree -1
  REQUIRE_THROWS_AS(FeatureMap<double>(FeatureMapKind::symmetric, 3, no_coefficients, 1.0), std::invalid_argument);
  REQUIRE_THROWS_WITH(FeatureMap<double>(FeatureMapKind::symmetric, 3, no_coefficients, 1.0), Contains("'degree'"));
  for (const double bad_scale : {0.0, -0.5, std::numeric_limits<double>::quiet_NaN(),
                                 std::numeric_limits<double>::infinity()}) {
    CAPTURE(bad_scale);
    REQUIRE_THROWS_AS(FeatureMap<float>(FeatureMapKind::kronecker, 3, p, bad_scale), std::invalid_argument);
    REQUIRE_THROWS_WITH(FeatureMap<float>(FeatureMapKind::kronecker, 3, p, bad_scale), Contains("'scale'"));
  }
  // Width above max_features names 'degree': C(8+2, 2) = 45 fits a cap of 45 but not 44.
  REQUIRE_NOTHROW(FeatureMap<double>(FeatureMapKind::symmetric, 8, p, 1.0, 45));
  REQUIRE_THROWS_AS(FeatureMap<double>(FeatureMapKind::symmetric, 8, p, 1.0, 44), std::invalid_argument);
  REQUIRE_THROWS_WITH(FeatureMap<double>(FeatureMapKind::symmetric, 8, p, 1.0, 44), Contains("'degree'"));
  // Default cap 2^20: C(72, 8) ~ 1.1e10 and 16 + ... + 16^5 = 1118481 exceed it.
  REQUIRE_THROWS_WITH(FeatureMap<double>(FeatureMapKind::symmetric, 64, taylor_exp(8), 1.0), Contains("'degree'"));
  REQUIRE_THROWS_WITH(FeatureMap<double>(FeatureMapKind::kronecker, 16, taylor_exp(5), 1.0), Contains("'degree'"));
  REQUIRE_NOTHROW(FeatureMap<float>(FeatureMapKind::kronecker, 16, taylor_exp(4), 1.0));

  const FeatureMap<double> map(FeatureMapKind::symmetric, 3, p, 1.0);  // width 10
  Matrix<double> F(4, map.width()), scaled(4, 3);
  const Matrix<double> wide = Matrix<double>::Ones(4, 4);
  REQUIRE_THROWS_AS(map.features(wide, FeatureSide::query, F), std::invalid_argument);
  REQUIRE_THROWS_WITH(map.features(wide, FeatureSide::query, F), Contains("'X'") && Contains("3") && Contains("4"));
  REQUIRE_THROWS_WITH(map.monomials(wide, scaled, F), Contains("'X'"));
  const Matrix<double> X = Matrix<double>::Ones(4, 3);
  Matrix<double> short_output(3, map.width());
  REQUIRE_THROWS_AS(map.features(X, FeatureSide::key, short_output), std::invalid_argument);
  REQUIRE_THROWS_WITH(map.features(X, FeatureSide::key, short_output), Contains("'output'"));

  map.monomials(X, scaled, F);
  Matrix<double> dM(4, map.width() - 1), dX(4, 3), bad_dX(4, 2);
  REQUIRE_THROWS_WITH(map.monomials_backward(dM, scaled, F, dX), Contains("'dM'"));
  dM.resize(4, map.width());
  REQUIRE_THROWS_WITH(map.monomials_backward(dM, scaled.leftCols(2), F, dX), Contains("'scaled'"));
  REQUIRE_THROWS_AS(map.monomials_backward(dM, scaled, F, bad_dX), std::invalid_argument);
  REQUIRE_THROWS_WITH(map.monomials_backward(dM, scaled, F, bad_dX), Contains("'dX'"));
}

TEST_CASE("FeatureMap rejects a width beyond what can be allocated, even without a cap", "[feature_map]") {
  const Index no_limit = std::numeric_limits<Index>::max();
  for (const auto kind : {FeatureMapKind::symmetric, FeatureMapKind::kronecker}) {
    REQUIRE_THROWS_AS(FeatureMap<float>(kind, 64, taylor_exp(40), 1.0, no_limit), std::invalid_argument);
    REQUIRE_THROWS_WITH(FeatureMap<float>(kind, 64, taylor_exp(40), 1.0, no_limit),
                        Contains("polyattn::FeatureMap") && Contains("'degree'") && Contains("max_feature_width"));
    // Just above the ceiling (symmetric: C(d+g, g) for d = 2^26, g = 1 is 2^26 + 1).
    REQUIRE_THROWS_WITH(FeatureMap<float>(kind, polyattn::max_feature_width, taylor_exp(1), 1.0, no_limit),
                        Contains("max_feature_width"));
  }
  REQUIRE(FeatureMap<float>(FeatureMapKind::symmetric, 16, taylor_exp(2), 1.0, no_limit).width() == 153);
  REQUIRE_THROWS_WITH(FeatureMap<float>(FeatureMapKind::symmetric, 16, taylor_exp(2), 1.0, 0), Contains("'max_features'"));
}

TEST_CASE("FeatureMap rejects outputs overlapping the input", "[feature_map][aliasing]") {
  const FeatureMap<double> map(FeatureMapKind::symmetric, 3, taylor_exp(2), 0.5);
  Matrix<double> X = random_matrix<double>(5, 3, 80), scaled(5, 3), M(5, map.width()), F(5, map.width());
  REQUIRE_THROWS_AS(map.monomials(X, X, M), std::invalid_argument);
  REQUIRE_THROWS_WITH(map.monomials(X, X, M),
                      Contains("FeatureMap::monomials") && Contains("'scaled'") && Contains("'X'"));
  Matrix<double> wide(5, map.width() + 3);
  REQUIRE_THROWS_WITH(map.monomials(wide.leftCols(3), scaled, wide.middleCols(2, map.width())),
                      Contains("'M'") && Contains("'X'"));
  map.monomials(X, scaled, M);
  Matrix<double> dM = M, dX = Matrix<double>::Zero(5, 3);
  REQUIRE_THROWS_WITH(map.monomials_backward(dM, scaled, M, scaled),
                      Contains("monomials_backward") && Contains("'dX'") && Contains("'scaled'"));
  REQUIRE_THROWS_WITH(map.monomials_backward(M, scaled, M, dX), Contains("'dM'") && Contains("'M'"));
  // Disjoint blocks of one matrix are fine.
  wide.leftCols(3) = X;
  Matrix<double> scaled2(5, 3);
  map.monomials(wide.leftCols(3), scaled2, wide.rightCols(map.width()));
  REQUIRE(wide.rightCols(map.width()) == M);
}
