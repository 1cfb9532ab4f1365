#include <polyattn/attention/block_product.hpp>
#include <polyattn/attention/polynomial_attention.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

using polyattn::AttentionOptions;
using polyattn::Certificate;
using polyattn::FeatureMap;
using polyattn::FeatureMapKind;
using polyattn::FeatureSide;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::Polynomial;
using polyattn::PolynomialAttention;
using polyattn::PolynomialAttentionOptions;
using polyattn::PolynomialKind;
using polyattn::RangePolicy;
using polyattn::Vector;
using polyattn::attention_reference;
using polyattn::certify_exp;
using polyattn::taylor_exp;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;
using polyattn::testing::score_radius;
using Catch::Contains;

namespace {

// One randomised problem: q, k ~ N(0, I/d), v ~ N(0, 1); when `radius` > 0, Q and K are then both scaled
// by sqrt(radius / R) so that the score radius is `radius` (which decides whether epsilon < 1).
struct Problem {
  Index n, m, dk, dv, heads;
  double radius;
  std::uint64_t seed;

  struct Inputs {
    Matrix<double> Q, K, V;
  };
  // Rounded to T and back, so that the double reference sees exactly the inputs of a T computation.
  template <class T = double>
  Inputs make(const AttentionOptions& opt) const {
    const double sigma = 1 / std::sqrt(static_cast<double>(dk));
    Inputs in{random_matrix<double>(n, heads * dk, seed, sigma), random_matrix<double>(m, heads * dk, seed + 1, sigma),
              random_matrix<double>(m, heads * dv, seed + 2)};
    if (radius > 0) {
      const double shrink = std::sqrt(radius / score_radius(in.Q, in.K, opt));
      in.Q *= shrink;
      in.K *= shrink;
    }
    in.Q = in.Q.template cast<T>().template cast<double>();
    in.K = in.K.template cast<T>().template cast<double>();
    in.V = in.V.template cast<T>().template cast<double>();
    return in;
  }
};

// Exact softmax matrix of one head (materialised, double).
Matrix<double> softmax_matrix(const Matrix<double>& Qh, const Matrix<double>& Kh, double c, bool causal) {
  Matrix<double> S = c * Qh * Kh.transpose();
  if (causal) S.triangularView<Eigen::StrictlyUpper>().setConstant(-std::numeric_limits<double>::infinity());
  const Vector<double> top = S.rowwise().maxCoeff();
  S = (S.colwise() - top).array().exp();
  const Vector<double> total = S.rowwise().sum();
  return total.cwiseInverse().asDiagonal() * S;
}

// The low-rank product computed directly: per head A = phi_Q(Q) phi_K(K)^T (o lower-triangular mask),
// O = diag(A 1)^-1 A V. The reference for the chunked and streaming evaluation.
Matrix<double> direct_low_rank(const Matrix<double>& Q, const Matrix<double>& K, const Matrix<double>& V,
                               const AttentionOptions& opt, FeatureMapKind kind, const Polynomial& p) {
  const Index dk = Q.cols() / opt.heads, dv = V.cols() / opt.heads;
  const double c = opt.resolved_scale(dk);
  Matrix<double> O(Q.rows(), V.cols());
  for (Index h = 0; h < opt.heads; ++h) {
    const FeatureMap<double> map(kind, dk, p, c);
    Matrix<double> Fq(Q.rows(), map.width()), Fk(K.rows(), map.width());
    map.features(Q.middleCols(h * dk, dk), FeatureSide::query, Fq);
    map.features(K.middleCols(h * dk, dk), FeatureSide::key, Fk);
    Matrix<double> A = Fq * Fk.transpose();
    if (opt.causal) A.triangularView<Eigen::StrictlyUpper>().setZero();
    const Vector<double> normaliser = A.rowwise().sum();
    O.middleCols(h * dv, dv) = normaliser.cwiseInverse().asDiagonal() * (A * V.middleCols(h * dv, dv));
  }
  return O;
}

// Rounding of the approximate path in precision u. A kernel value p(c q.k) is a sum whose absolute terms
// add up to at most P(R) = sum_t |a_t| R^t (test_feature_map.cpp), each term built with r + g + 3
// roundings, while the exact value is at least p_min >= (1 - eps) e^{-R} (p >= (1 - eps) e^x on [-R, R]).
// Each weight is therefore off relatively by (r + g + 3) u P(R) e^R / (1 - eps), the normaliser and the
// weighted sums of m terms add m u, and a relative perturbation eta of every weight moves an output entry by
// at most 2 eta max|v|. Returns 4 eta max|v| (a factor 2 margin).
double rounding_slack(const Certificate& cert, const Polynomial& p, Index m, double max_v, double u) {
  const double eta = (static_cast<double>(cert.features + cert.degree + 3) * p.absolute_bound(cert.radius) *
                          std::exp(cert.radius) / (1 - cert.poly_error) +
                      static_cast<double>(m) + 2) *
                     u;
  return 4 * eta * max_v;
}

struct AccuracyCase {
  Problem problem;
  std::optional<double> scale;
  bool causal;
  int degree;
  FeatureMapKind map;
  PolynomialKind kind;
};

const char* map_name(FeatureMapKind kind) { return kind == FeatureMapKind::symmetric ? "symmetric" : "kronecker"; }

// Approximate vs materialised exact on one case; returns the certificate.
template <class T>
Certificate check_against_exact(const AccuracyCase& test) {
  const Problem& pr = test.problem;
  PolynomialAttentionOptions opt;
  opt.attention.scale = test.scale;
  opt.attention.causal = test.causal;
  opt.attention.heads = pr.heads;
  opt.degree = test.degree;
  opt.feature_map = test.map;
  opt.kind = test.kind;
  const Problem::Inputs in = pr.make<T>(opt.attention);
  const Matrix<double>&Q = in.Q, &K = in.K, &V = in.V;
  const Matrix<T> Qt = Q.template cast<T>(), Kt = K.template cast<T>(), Vt = V.template cast<T>();
  PolynomialAttention<T> attn(opt);
  Matrix<T> Ot(pr.n, pr.heads * pr.dv);
  const Certificate cert = attn.forward(Qt, Kt, Vt, Ot);
  const Matrix<double> O = Ot.template cast<double>();
  const Matrix<double> exact = attention_reference(Q, K, V, opt.attention);
  REQUIRE(O.allFinite());

  const double radius = score_radius(Q, K, opt.attention);
  const double u = std::numeric_limits<T>::epsilon() / 2;
  CAPTURE(radius, cert.radius, cert.poly_error, cert.output_bound, cert.features);
  // R is measured on the inputs (in T, hence d u relative).
  REQUIRE(cert.radius == Approx(radius).epsilon(8 * static_cast<double>(pr.dk) * u));
  REQUIRE(cert.interval == cert.radius);  // radius option 0: the interval is the measured R
  REQUIRE(cert.valid);
  REQUIRE(cert.degree == test.degree);
  REQUIRE(cert.features == polyattn::feature_width(test.map, pr.dk, test.degree));
  const Polynomial p = test.kind == PolynomialKind::taylor ? taylor_exp(test.degree)
                                                          : polyattn::minimax_exp(test.degree, cert.interval);
  // epsilon is the certified error of the polynomial on [-R, R].
  REQUIRE(cert.poly_error == Approx(certify_exp(p, cert.interval).relative_error).epsilon(1e-6));

  const double max_v = V.cwiseAbs().maxCoeff();
  const double max_error = (O - exact).cwiseAbs().maxCoeff();
  CAPTURE(max_error);
  if (cert.vacuous()) {
    REQUIRE(cert.output_bound == std::numeric_limits<double>::infinity());
    return cert;
  }
  REQUIRE(cert.positive);
  REQUIRE(cert.output_bound == Approx(2 * cert.poly_error / (1 - cert.poly_error) * max_v).epsilon(1e-12));
  const double slack = rounding_slack(cert, p, pr.m, max_v, u);
  CAPTURE(slack);
  REQUIRE(max_error <= cert.output_bound + slack);
  // Relative (Frobenius) tolerance from epsilon: |P~_ij - P_ij| <= 2 eps/(1 - eps) P_ij gives
  // ||o~_i - o_i||_2 <= 2 eps/(1 - eps) sum_j P_ij ||v_j||_2 per row and head; the squares of these row
  // bounds (plus the rounding slack) sum to the squared Frobenius bound.
  const double factor = 2 * cert.poly_error / (1 - cert.poly_error);
  const double c = opt.attention.resolved_scale(pr.dk);
  double bound_squared = 0;
  for (Index h = 0; h < pr.heads; ++h) {
    const Matrix<double> P = softmax_matrix(Q.middleCols(h * pr.dk, pr.dk), K.middleCols(h * pr.dk, pr.dk), c,
                                            test.causal);
    const Vector<double> row_bound = factor * (P * V.middleCols(h * pr.dv, pr.dv).rowwise().norm());
    bound_squared += (row_bound.array() + std::sqrt(static_cast<double>(pr.dv)) * slack).square().sum();
  }
  const double tolerance = std::sqrt(bound_squared) / exact.norm();
  CAPTURE(tolerance);
  REQUIRE(relative_error(O, exact) <= tolerance);
  return cert;
}

}  // namespace

TEST_CASE("approximate attention stays within its certificate (double)", "[polynomial_attention]") {
  using FM = FeatureMapKind;
  using PK = PolynomialKind;
  // The radii R = 0.7 ... 2.5 keep epsilon < 1 for the chosen degrees, so every certificate is a real bound.
  const std::vector<AccuracyCase> cases{
      {{50, 50, 4, 3, 1, 0.9, 1}, std::nullopt, false, 2, FM::symmetric, PK::taylor},
      {{50, 50, 4, 3, 1, 1.5, 2}, std::nullopt, true, 4, FM::symmetric, PK::taylor},
      {{64, 64, 8, 4, 2, 1.0, 3}, 1.0 / 8, true, 2, FM::kronecker, PK::taylor},
      {{33, 41, 3, 2, 4, 0.7, 4}, std::nullopt, false, 3, FM::symmetric, PK::taylor},
      {{40, 40, 6, 3, 3, 1.8, 5}, 0.5, false, 6, FM::symmetric, PK::taylor},
      {{48, 48, 4, 3, 2, 1.5, 6}, std::nullopt, true, 4, FM::symmetric, PK::minimax},
      {{30, 30, 3, 2, 1, 1.0, 7}, 1.0, true, 3, FM::kronecker, PK::minimax},
      {{70, 70, 5, 4, 1, 2.5, 8}, std::nullopt, true, 8, FM::symmetric, PK::taylor},
  };
  for (const AccuracyCase& test : cases) {
    CAPTURE(test.problem.n, test.problem.m, test.problem.dk, test.problem.heads, test.causal, test.degree,
            map_name(test.map), test.kind == PK::taylor);
    const Certificate cert = check_against_exact<double>(test);
    REQUIRE_FALSE(cert.vacuous());  // every case above was chosen to give a real bound
  }
}

TEST_CASE("approximate attention stays within its certificate (float)", "[polynomial_attention]") {
  const AccuracyCase test{{64, 64, 8, 4, 2, 1.2, 11}, std::nullopt, true, 4, FeatureMapKind::symmetric,
                          PolynomialKind::taylor};
  REQUIRE_FALSE(check_against_exact<float>(test).vacuous());
  const AccuracyCase full{{50, 60, 4, 4, 1, 0.9, 12}, 0.5, false, 2, FeatureMapKind::kronecker,
                          PolynomialKind::taylor};
  REQUIRE_FALSE(check_against_exact<float>(full).vacuous());
}

TEST_CASE("the authors' setting at g = 2 has a vacuous certificate, reported as such", "[polynomial_attention]") {
  // d = 4, q, k ~ N(0, 1/d), scale 1: R ~ 3, where 1 - x + x^2/2 at x = -3 is 2.5 = 50 e^{-3}: eps >= 1.
  const AccuracyCase test{{80, 80, 4, 4, 1, 0.0, 21}, 1.0, false, 2, FeatureMapKind::kronecker,
                          PolynomialKind::taylor};
  const Certificate cert = check_against_exact<double>(test);
  REQUIRE(cert.radius > 2.5);
  REQUIRE(cert.vacuous());
  REQUIRE(cert.poly_error >= 1);
}

TEST_CASE("causal chunked result equals the masked low-rank product computed directly", "[polynomial_attention]") {
  // Entries of A are computed two ways (prefix state over features vs p(c Q_b K_b^T) inside a chunk), each
  // within (r + g + 3) u P(R) of the exact kernel value while A_ij >= p_min; with R = 1.2, r <= 40 and
  // P(R)/p_min <= 14 (p(-1.2) = 0.23 for g = 3) every weight agrees to < 7e-14 relatively, and each
  // normalised row to twice that times max|v|/|o| ~ 5: the 1e-12 holds.
  const Index n = 50, dk = 3, dv = 2;
  for (const FeatureMapKind kind : {FeatureMapKind::symmetric, FeatureMapKind::kronecker})
    for (const int degree : {2, 3})
      for (const Index heads : {1, 2}) {
        PolynomialAttentionOptions opt;
        opt.attention.causal = true;
        opt.attention.heads = heads;
        opt.degree = degree;
        opt.feature_map = kind;
        const auto [Q, K, V] = Problem{n, n, dk, dv, heads, 1.2, 31}.make(opt.attention);
        const Matrix<double> direct = direct_low_rank(Q, K, V, opt.attention, kind, taylor_exp(degree));
        for (const Index chunk : {1, 7, 10, 25, 49, 50, 64, 0}) {  // 0: automatic
          CAPTURE(map_name(kind), degree, heads, chunk);
          opt.chunk_size = chunk;
          PolynomialAttention<double> attn(opt);
          Matrix<double> O(n, heads * dv);
          attn.forward(Q, K, V, O);
          REQUIRE(relative_error(O, direct) <= 1e-12);
          REQUIRE(attn.feature_map().width() == polyattn::feature_width(kind, dk, degree));
        }
      }
}

TEST_CASE("non-causal streaming result equals the low-rank product computed directly", "[polynomial_attention]") {
  // As in the causal test, but every entry of A comes from the features: 1e-12 with a wide margin.
  const Index n = 37, m = 29, dk = 4, dv = 3, heads = 2;
  AttentionOptions shape;
  shape.heads = heads;
  const auto [Q, K, V] = Problem{n, m, dk, dv, heads, 1.2, 41}.make(shape);
  for (const FeatureMapKind kind : {FeatureMapKind::symmetric, FeatureMapKind::kronecker}) {
    PolynomialAttentionOptions opt;
    opt.attention.heads = heads;
    opt.degree = 4;
    opt.feature_map = kind;
    const Matrix<double> direct = direct_low_rank(Q, K, V, opt.attention, kind, taylor_exp(4));
    for (const Index chunk : {1, 5, 29, 37, 100, 0}) {
      CAPTURE(map_name(kind), chunk);
      opt.chunk_size = chunk;
      PolynomialAttention<double> attn(opt);
      Matrix<double> O(n, heads * dv);
      attn.forward(Q, K, V, O);
      REQUIRE(relative_error(O, direct) <= 1e-12);
    }
  }
}

TEST_CASE("a minimax polynomial fitted to the measured R matches the direct product", "[polynomial_attention]") {
  // With radius 0 the minimax fit is made for the measured R of the call: rebuild it from cert.interval.
  const Index n = 40, dk = 3, dv = 2;
  const auto [Q, K, V] = Problem{n, n, dk, dv, 1, 2.0, 45}.make(AttentionOptions{});
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    PolynomialAttentionOptions opt;
    opt.attention.causal = causal;
    opt.degree = 4;
    opt.kind = PolynomialKind::minimax;
    opt.chunk_size = 9;
    PolynomialAttention<double> attn(opt);
    Matrix<double> O(n, dv);
    const Certificate cert = attn.forward(Q, K, V, O);
    const Polynomial p = polyattn::minimax_exp(4, cert.interval);
    REQUIRE(cert.interval == Approx(2.0).epsilon(1e-12));
    REQUIRE(p.coeffs != taylor_exp(4).coeffs);
    REQUIRE(relative_error(O, direct_low_rank(Q, K, V, opt.attention, FeatureMapKind::symmetric, p)) <= 1e-12);
  }
}

TEST_CASE("zero queries attend uniformly: prefix means of the values", "[polynomial_attention]") {
  // All scores are 0 and p(0) = a_0 = 1 for both kinds (Taylor exactly; the minimax fit for R = 0 too), so
  // row i is the mean of v_0..v_i (causal) or of all v_j. Sums of at most m terms: (m + 2) u max|v| each,
  // doubled for the ratio of two such sums.
  const Index n = 23, dk = 3, dv = 2;
  const Matrix<double> Q = Matrix<double>::Zero(n, dk), K = random_matrix<double>(n, dk, 55);
  const Matrix<double> V = random_matrix<double>(n, dv, 56);
  const double tolerance = 2 * (n + 2) * 0x1p-53 * V.cwiseAbs().maxCoeff();
  for (const PolynomialKind kind : {PolynomialKind::taylor, PolynomialKind::minimax})
    for (const bool causal : {false, true})
      for (const Index chunk : {0, 4}) {
        CAPTURE(kind == PolynomialKind::taylor, causal, chunk);
        PolynomialAttentionOptions opt;
        opt.attention.causal = causal;
        opt.kind = kind;
        opt.degree = 4;
        opt.chunk_size = chunk;
        PolynomialAttention<double> attn(opt);
        Matrix<double> O(n, dv);
        const Certificate cert = attn.forward(Q, K, V, O);
        REQUIRE(cert.radius == 0);
        REQUIRE_FALSE(cert.vacuous());
        Matrix<double> expected(n, dv);
        for (Index i = 0; i < n; ++i)
          expected.row(i) = V.topRows(causal ? i + 1 : n).colwise().mean();
        REQUIRE((O - expected).cwiseAbs().maxCoeff() <= tolerance);
      }
}

TEST_CASE("a reused object gives the results of a fresh one when shapes and R change", "[polynomial_attention]") {
  // The feature map and the workspaces are kept between calls; another head dimension, sequence length or
  // radius (minimax: another polynomial) must not leak from one call into the next. Same inputs, same
  // chunking, same arithmetic: the results must be identical.
  struct Call {
    Index n, dk;
    double radius;
  };
  std::uint64_t seed = 57;
  for (const PolynomialKind kind : {PolynomialKind::taylor, PolynomialKind::minimax})
    for (const bool causal : {false, true}) {
      PolynomialAttentionOptions opt;
      opt.kind = kind;
      opt.degree = 4;
      opt.chunk_size = 6;
      opt.attention.causal = causal;
      opt.estimate_error = true;
      opt.estimate_rows = 5;
      PolynomialAttention<double> reused(opt);
      for (const Call call : {Call{30, 4, 1.0}, Call{17, 3, 2.0}, Call{40, 4, 0.5}, Call{9, 4, 1.0}}) {
        CAPTURE(kind == PolynomialKind::taylor, causal, call.n, call.dk, call.radius);
        const auto [Q, K, V] = Problem{call.n, call.n, call.dk, 2, 1, call.radius, seed++}.make(opt.attention);
        PolynomialAttention<double> fresh(opt);
        Matrix<double> expected(call.n, 2), O(call.n, 2);
        const Certificate fresh_cert = fresh.forward(Q, K, V, expected);
        const Certificate cert = reused.forward(Q, K, V, O);
        REQUIRE(O == expected);
        REQUIRE(cert.poly_error == fresh_cert.poly_error);
        REQUIRE(cert.features == fresh_cert.features);
        REQUIRE(cert.sampled_max_error == fresh_cert.sampled_max_error);
      }
    }
}

TEST_CASE("polynomial attention accepts inputs and output that are blocks of larger matrices", "[polynomial_attention]") {
  // Q, K, V bind to Eigen::Ref with an outer stride; O is written in place into a block, leaving the rest of
  // the larger matrix untouched. Same arithmetic as on plain matrices: identical results.
  const Index n = 21, dk = 3, dv = 2;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    PolynomialAttentionOptions opt;
    opt.attention.causal = causal;
    opt.chunk_size = 5;
    const auto [Q, K, V] = Problem{n, n, dk, dv, 1, 1.0, 58}.make(opt.attention);
    Matrix<double> wide_Q = random_matrix<double>(n + 3, dk + 4, 59);
    wide_Q.block(2, 1, n, dk) = Q;
    Matrix<double> wide_K = random_matrix<double>(n + 1, dk + 2, 60);
    wide_K.block(1, 2, n, dk) = K;
    Matrix<double> big = Matrix<double>::Constant(n + 4, dv + 3, -7.0);
    PolynomialAttention<double> attn(opt);
    attn.forward(wide_Q.block(2, 1, n, dk), wide_K.block(1, 2, n, dk), V, big.block(3, 1, n, dv));
    Matrix<double> O(n, dv);
    PolynomialAttention<double> plain(opt);
    plain.forward(Q, K, V, O);
    REQUIRE(Matrix<double>(big.block(3, 1, n, dv)) == O);
    big.block(3, 1, n, dv).setConstant(-7.0);
    REQUIRE((big.array() == -7.0).all());
  }
}

// With a Taylor polynomial and no configured radius the kernel measures R and max |V| in the blocks it reads
// (no input passes of their own). The certificate must be the one the input passes give, bitwise, for any thread
// count, layout, head count and chunk tail (the largest row placed in the last, zero-padded rows); and the output
// must be that of the checked path, which a configured radius (Taylor: the same polynomial) takes.
template <class T>
void check_kernel_measured_certificate() {
  using RowMajor = polyattn::RowMajorMatrix<T>;
  polyattn::testing::ThreadCountGuard guard;
  for (const bool causal : {false, true})
    for (const Index heads : {Index(1), Index(3)})
      for (const Index n : {Index(1), Index(37), Index(300)}) {
        PolynomialAttentionOptions opt;
        opt.attention.causal = causal;
        opt.attention.heads = heads;
        const auto in = Problem{n, n, 4, 3, heads, 0.0, 90}.make<T>(opt.attention);
        Matrix<T> Q = in.Q.template cast<T>(), K = in.K.template cast<T>(), V = in.V.template cast<T>();
        Q.row(n - 1) *= T(2);  // the largest query, key and value in the last rows
        K.row(n - 1) *= T(2);
        V(n - 1, 3 * heads - 1) = T(5);
        const auto shape = polyattn::detail::check_qkv_shapes("test", Q, K, V, opt.attention);
        const double radius = polyattn::detail::score_radius(Q, K, shape, opt.attention.resolved_scale(4));
        PolynomialAttentionOptions checked_opt = opt;
        checked_opt.radius = 1e6;  // taken by the checked path; R stays far below it
        Matrix<T> checked(n, 3 * heads);
        const Certificate checked_cert = PolynomialAttention<T>(checked_opt).forward(Q, K, V, checked);
        for (const int threads : {1, 2, 3}) {
          polyattn::set_num_threads(threads);
          CAPTURE(causal, heads, n, threads);
          Matrix<T> O(n, 3 * heads);
          const Certificate cert = PolynomialAttention<T>(opt).forward(Q, K, V, O);
          CHECK(cert.radius == radius);
          CHECK(cert.radius == checked_cert.radius);
          CHECK(cert.interval == radius);
          CHECK(cert.output_bound ==
                polyattn::detail::apriori_output_bound(cert.poly_error, polyattn::detail::max_abs(V)));
          CHECK(O == checked);
          RowMajor O_rows(n, 3 * heads);
          const Certificate row_cert =
              PolynomialAttention<T>(opt).forward(RowMajor(Q), RowMajor(K), RowMajor(V), O_rows);
          CHECK(row_cert.radius == radius);
          CHECK(row_cert.output_bound == cert.output_bound);
          CHECK(Matrix<T>(O_rows) == O);
        }
      }
}

TEST_CASE("the certificate measured by the kernel is that of the input passes, bitwise", "[polynomial_attention]") {
  check_kernel_measured_certificate<float>();
  check_kernel_measured_certificate<double>();
}

// Non-finite input on the kernel-measured path: the call is redone on the checked path, which names the entry.
TEST_CASE("non-finite input on the kernel-measured path names the entry", "[polynomial_attention]") {
  for (const bool causal : {false, true}) {
    PolynomialAttentionOptions opt;
    opt.attention.causal = causal;
    const auto in = Problem{50, 50, 4, 3, 1, 0.0, 91}.make(opt.attention);
    for (const char* name : {"Q", "K", "V"})
      for (const double bad : {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
        CAPTURE(causal, name, bad);
        Matrix<double> Q = in.Q, K = in.K, V = in.V, O(50, 3);
        (std::string(name) == "Q" ? Q : std::string(name) == "K" ? K : V)(41, 2) = bad;
        PolynomialAttention<double> attn(opt);
        CHECK_THROWS_WITH(attn.forward(Q, K, V, O),
                          Contains(std::string("'") + name + "'") && Contains("(41, 2)"));
      }
  }
}

TEST_CASE("the a-posteriori estimate equals the error on the sampled rows and is reproducible",
          "[polynomial_attention]") {
  const Index n = 80, dk = 4, dv = 3, heads = 2, sampled = 10;
  AttentionOptions shape;
  shape.heads = heads;
  shape.scale = 1.0;
  const auto [Q, K, V] = Problem{n, n, dk, dv, heads, 2.0, 51}.make(shape);
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    PolynomialAttentionOptions opt;
    opt.attention.causal = causal;
    opt.attention.heads = heads;
    opt.attention.scale = 1.0;
    opt.degree = 2;
    opt.estimate_error = true;
    opt.estimate_rows = sampled;
    opt.seed = 987654321;
    PolynomialAttention<double> attn(opt);
    Matrix<double> O(n, heads * dv);
    const Certificate cert = attn.forward(Q, K, V, O);
    REQUIRE(cert.sampled_rows == sampled);

    const std::vector<Index> rows = polyattn::detail::sample_rows(n, sampled, opt.seed);
    REQUIRE(static_cast<Index>(rows.size()) == sampled);
    REQUIRE(std::is_sorted(rows.begin(), rows.end()));
    REQUIRE(std::adjacent_find(rows.begin(), rows.end()) == rows.end());
    REQUIRE(rows.front() >= 0);
    REQUIRE(rows.back() < n);
    // Recompute the row errors ||o~_i - o_i|| / ||o_i|| from the materialised reference. The blocked exact
    // rows the library uses agree with it to ~1e-14 relatively, so each row error agrees to 1e-13 absolutely:
    // compared with 1e-8 relative and 1e-12 absolute tolerance (causal row 0 has error 0).
    const Matrix<double> exact = attention_reference(Q, K, V, opt.attention);
    std::vector<double> errors(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i)
      errors[static_cast<std::size_t>(i)] = (O.row(i) - exact.row(i)).norm() / exact.row(i).norm();
    double max_error = 0, sum_error = 0;
    for (const Index i : rows) {
      max_error = std::max(max_error, errors[static_cast<std::size_t>(i)]);
      sum_error += errors[static_cast<std::size_t>(i)];
    }
    REQUIRE(max_error > 1e-3);  // the comparison below is about a real error, not rounding
    CHECK(cert.sampled_max_error == Approx(max_error).epsilon(1e-8).margin(1e-12));
    CHECK(cert.sampled_mean_error == Approx(sum_error / sampled).epsilon(1e-8).margin(1e-12));

    // Reproducible: a fresh object with the same seed reports bit-identical figures ...
    PolynomialAttention<double> again(opt);
    Matrix<double> O2(n, heads * dv);
    const Certificate repeat = again.forward(Q, K, V, O2);
    REQUIRE(repeat.sampled_max_error == cert.sampled_max_error);
    REQUIRE(repeat.sampled_mean_error == cert.sampled_mean_error);
    // ... and another seed samples other rows.
    opt.seed = 12345;
    const std::vector<Index> other_rows = polyattn::detail::sample_rows(n, sampled, opt.seed);
    REQUIRE(other_rows != rows);
    PolynomialAttention<double> reseeded(opt);
    const Certificate other = reseeded.forward(Q, K, V, O2);
    double other_sum = 0;
    for (const Index i : other_rows) other_sum += errors[static_cast<std::size_t>(i)];
    CHECK(other.sampled_mean_error == Approx(other_sum / sampled).epsilon(1e-8).margin(1e-12));

    // At least as many requested rows as queries: every row is used.
    opt.estimate_rows = n + 5;
    PolynomialAttention<double> everything(opt);
    const Certificate all = everything.forward(Q, K, V, O2);
    REQUIRE(all.sampled_rows == n);
    CHECK(all.sampled_max_error == Approx(*std::max_element(errors.begin(), errors.end())).epsilon(1e-8).margin(1e-12));
  }
  // Without estimate_error nothing is sampled.
  PolynomialAttention<double> plain;
  Matrix<double> O(n, heads * dv);
  const Certificate cert = plain.forward(Q, K, V, O);
  REQUIRE(cert.sampled_rows == 0);
  REQUIRE(std::isnan(cert.sampled_max_error));
}

TEST_CASE("range policies when R exceeds the configured radius", "[polynomial_attention]") {
  const Index n = 40, dk = 4, dv = 2;
  const auto [Q, K, V] = Problem{n, n, dk, dv, 1, 4.0, 61}.make(AttentionOptions{});
  PolynomialAttentionOptions opt;
  opt.attention.causal = true;
  opt.degree = 2;
  opt.radius = 1.0;
  const double radius = score_radius(Q, K, opt.attention);
  REQUIRE(radius > 2 * opt.radius);
  Matrix<double> O(n, dv);
  const Matrix<double> exact = attention_reference(Q, K, V, opt.attention);

  SECTION("throw_error throws std::domain_error naming 'radius'") {
    opt.range_policy = RangePolicy::throw_error;
    PolynomialAttention<double> attn(opt);
    REQUIRE_THROWS_AS(attn.forward(Q, K, V, O), std::domain_error);
    REQUIRE_THROWS_WITH(attn.forward(Q, K, V, O), Contains("'radius'"));
    // Inside the interval the same policy computes normally.
    const Matrix<double> small_Q = Q * (0.5 * opt.radius / radius);
    const Certificate cert = attn.forward(small_Q, K, V, O);
    REQUIRE(cert.valid);
    REQUIRE(cert.interval == opt.radius);
    REQUIRE(cert.poly_error == Approx(certify_exp(taylor_exp(2), opt.radius).relative_error).epsilon(1e-12));
  }
  SECTION("mark_invalid computes but marks the certificate invalid") {
    opt.range_policy = RangePolicy::mark_invalid;
    PolynomialAttention<double> attn(opt);
    const Certificate cert = attn.forward(Q, K, V, O);
    REQUIRE_FALSE(cert.valid);
    REQUIRE(cert.vacuous());
    REQUIRE(cert.radius == Approx(radius).epsilon(1e-12));
    REQUIRE(cert.interval == opt.radius);
    REQUIRE(O.allFinite());
  }
  SECTION("raise_degree raises the degree and keeps the certificate valid") {
    opt.range_policy = RangePolicy::raise_degree;
    PolynomialAttention<double> attn(opt);
    const Certificate cert = attn.forward(Q, K, V, O);
    const double configured = certify_exp(taylor_exp(2), opt.radius).relative_error;
    const double target = std::min(configured, 0.5);
    CAPTURE(cert.degree, cert.poly_error, configured);
    REQUIRE(cert.valid);
    REQUIRE(cert.degree > opt.degree);
    REQUIRE(cert.degree % 2 == 0);  // an even Taylor request stays even (positive)
    REQUIRE(cert.interval >= cert.radius);
    REQUIRE(cert.radius == Approx(radius).epsilon(1e-12));
    REQUIRE(cert.poly_error <= target);
    REQUIRE_FALSE(cert.vacuous());
    // Smallest such degree: two less would not reach the target on the measured interval.
    REQUIRE(certify_exp(taylor_exp(cert.degree - 2), cert.interval).relative_error > target);
    REQUIRE(cert.features == polyattn::feature_width(FeatureMapKind::symmetric, dk, cert.degree));
    const double max_v = V.cwiseAbs().maxCoeff();
    REQUIRE((O - exact).cwiseAbs().maxCoeff() <=
            cert.output_bound + rounding_slack(cert, taylor_exp(cert.degree), n, max_v, 0x1p-53));
  }
  SECTION("raise_degree with a minimax polynomial") {
    opt.range_policy = RangePolicy::raise_degree;
    opt.kind = PolynomialKind::minimax;
    opt.degree = 3;
    PolynomialAttention<double> attn(opt);
    const Certificate cert = attn.forward(Q, K, V, O);
    const double configured = certify_exp(polyattn::minimax_exp(3, opt.radius), opt.radius).relative_error;
    REQUIRE(cert.valid);
    REQUIRE(cert.degree > 3);
    REQUIRE(cert.interval >= cert.radius);
    REQUIRE(cert.poly_error <= std::min(configured, 0.5));
    const double max_v = V.cwiseAbs().maxCoeff();
    const Polynomial p = polyattn::minimax_exp(cert.degree, cert.interval);
    REQUIRE((O - exact).cwiseAbs().maxCoeff() <= cert.output_bound + rounding_slack(cert, p, n, max_v, 0x1p-53));
  }
}

TEST_CASE("a feature width above max_features throws naming 'degree'", "[polynomial_attention]") {
  const auto [Q, K, V] = Problem{10, 10, 4, 2, 1, 1.0, 71}.make(AttentionOptions{});
  Matrix<double> O(10, 2);
  PolynomialAttentionOptions opt;
  opt.degree = 2;  // C(4 + 2, 2) = 15 features
  opt.max_features = 15;
  REQUIRE_NOTHROW(PolynomialAttention<double>(opt).forward(Q, K, V, O));
  opt.max_features = 14;
  PolynomialAttention<double> capped(opt);
  REQUIRE_THROWS_AS(capped.forward(Q, K, V, O), std::invalid_argument);
  REQUIRE_THROWS_WITH(capped.forward(Q, K, V, O), Contains("'degree'"));
  // Default cap 2^20 with d = 64 and g = 8: C(72, 8) ~ 1.1e10 features.
  const auto wide = Problem{4, 4, 64, 2, 1, 1.0, 72}.make(AttentionOptions{});
  PolynomialAttentionOptions big;
  big.degree = 8;
  PolynomialAttention<double> huge(big);
  Matrix<double> Ow(4, 2);
  REQUIRE_THROWS_WITH(huge.forward(wide.Q, wide.K, wide.V, Ow), Contains("'degree'"));
}

TEST_CASE("an odd degree with a negative normaliser throws std::domain_error", "[polynomial_attention]") {
  // q_i = 2 e_1 + noise, k_j = -2 e_1 + noise, scale 1: scores ~ -4, so p(x) = 1 + x ~ -3 for every pair and
  // every normaliser sum_j p(s_ij) is negative, in the first chunk already.
  const Index n = 12, dk = 3;
  Matrix<double> Q = random_matrix<double>(n, dk, 81, 0.05), K = random_matrix<double>(n, dk, 82, 0.05);
  Q.col(0).array() += 2;
  K.col(0).array() -= 2;
  const Matrix<double> V = random_matrix<double>(n, 2, 83);
  for (const bool causal : {false, true})
    for (const Index chunk : {0, 5}) {
      CAPTURE(causal, chunk);
      PolynomialAttentionOptions opt;
      opt.attention.scale = 1.0;
      opt.attention.causal = causal;
      opt.degree = 1;
      opt.chunk_size = chunk;
      PolynomialAttention<double> attn(opt);
      Matrix<double> O(n, 2);
      REQUIRE_THROWS_AS(attn.forward(Q, K, V, O), std::domain_error);
      // Degree 2 is positive everywhere and computes.
      opt.degree = 2;
      PolynomialAttention<double> even(opt);
      even.forward(Q, K, V, O);
      REQUIRE(O.allFinite());
    }
}

TEST_CASE("bad polynomial-attention input throws std::invalid_argument naming the argument",
          "[polynomial_attention]") {
  const auto [Q, K, V] = Problem{6, 6, 4, 2, 1, 1.0, 91}.make(AttentionOptions{});
  Matrix<double> O(6, 2);
  PolynomialAttention<double> attn;
  REQUIRE_THROWS_AS(attn.feature_map(), std::invalid_argument);  // before the first call
  REQUIRE_NOTHROW(attn.forward(Q, K, V, O));

  const auto expect = [&](const Matrix<double>& q, const Matrix<double>& k, const Matrix<double>& v,
                          Matrix<double>& o, const char* name) {
    CAPTURE(name);
    REQUIRE_THROWS_AS(attn.forward(q, k, v, o), std::invalid_argument);
    REQUIRE_THROWS_WITH(attn.forward(q, k, v, o), Contains("PolynomialAttention") && Contains(name));
  };
  expect(Q, random_matrix<double>(6, 3, 92), V, O, "'K'");
  expect(Q, K, random_matrix<double>(5, 2, 93), O, "'V'");
  Matrix<double> wrong_output(6, 3);
  expect(Q, K, V, wrong_output, "'O'");
  Matrix<double> empty_output(0, 2);
  expect(Matrix<double>(0, 4), K, V, empty_output, "'Q'");
  expect(Q, Matrix<double>(0, 4), Matrix<double>(0, 2), O, "'K'");
  expect(Matrix<double>(6, 0), Matrix<double>(6, 0), V, O, "'Q'");
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                           -std::numeric_limits<double>::infinity()}) {
    CAPTURE(bad);
    Matrix<double> badQ = Q, badK = K, badV = V;
    badQ(4, 1) = bad;
    badK(0, 3) = bad;
    badV(2, 0) = bad;
    expect(badQ, K, V, O, "'Q'");
    expect(Q, badK, V, O, "'K'");
    expect(Q, K, badV, O, "'V'");
  }
  // Heads must divide the columns; causal needs n == m.
  PolynomialAttentionOptions three_heads;
  three_heads.attention.heads = 3;
  PolynomialAttention<double> split(three_heads);
  REQUIRE_THROWS_WITH(split.forward(Q, K, V, O), Contains("'heads'"));
  PolynomialAttentionOptions causal;
  causal.attention.causal = true;
  PolynomialAttention<double> masked(causal);
  const Matrix<double> longer_K = random_matrix<double>(8, 4, 94), longer_V = random_matrix<double>(8, 2, 95);
  REQUIRE_THROWS_AS(masked.forward(Q, longer_K, longer_V, O), std::invalid_argument);
  REQUIRE_THROWS_WITH(masked.forward(Q, longer_K, longer_V, O), Contains("'Q'") && Contains("'K'"));

  // Options are checked when the object is built.
  const auto options_error = [](const PolynomialAttentionOptions& opt, const char* name) {
    CAPTURE(name);
    REQUIRE_THROWS_AS(PolynomialAttention<float>(opt), std::invalid_argument);
    REQUIRE_THROWS_WITH(PolynomialAttention<float>(opt), Contains(name));
  };
  for (const double bad : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN()}) {
    PolynomialAttentionOptions opt;
    opt.attention.scale = bad;
    options_error(opt, "'scale'");
  }
  PolynomialAttentionOptions opt;
  opt.degree = -1;
  options_error(opt, "'degree'");
  opt = {};
  opt.radius = -1;
  options_error(opt, "'radius'");
  opt.radius = std::numeric_limits<double>::quiet_NaN();
  options_error(opt, "'radius'");
  opt = {};
  opt.chunk_size = -1;
  options_error(opt, "'chunk_size'");
  opt = {};
  opt.max_features = 0;
  options_error(opt, "'max_features'");
  opt = {};
  opt.estimate_rows = 0;
  options_error(opt, "'estimate_rows'");
  opt = {};
  opt.attention.heads = 0;
  options_error(opt, "'heads'");
  opt = {};
  opt.range_policy = RangePolicy::raise_degree;  // needs radius > 0
  options_error(opt, "'radius'");
}

TEST_CASE("PolynomialAttention rejects an output overlapping an input", "[polynomial_attention][aliasing]") {
  const Index n = 16, d = 4;
  Matrix<double> Q = random_matrix<double>(n, d, 70), K = random_matrix<double>(n, d, 71),
                 V = random_matrix<double>(n, d, 72);
  PolynomialAttentionOptions opt;
  opt.degree = 4;
  opt.estimate_error = true;
  PolynomialAttention<double> attn(opt);
  for (Matrix<double>* input : {&Q, &K, &V}) {
    const std::string name = input == &Q ? "'Q'" : input == &K ? "'K'" : "'V'";
    REQUIRE_THROWS_AS(attn.forward(Q, K, V, *input), std::invalid_argument);
    REQUIRE_THROWS_WITH(attn.forward(Q, K, V, *input),
                        Contains("polyattn::PolynomialAttention::forward") && Contains("'O'") && Contains(name));
  }
  REQUIRE(Q == random_matrix<double>(n, d, 70));
}

TEST_CASE("PolynomialAttention reports overflow of finite input clearly", "[polynomial_attention][overflow]") {
  const Index n = 16, d = 4;
  const Matrix<float> Q = random_matrix<float>(n, d, 73), K = random_matrix<float>(n, d, 74),
                      V = random_matrix<float>(n, d, 75);
  Matrix<float> O(n, d);
  PolynomialAttentionOptions opt;
  // Q = K = 1e30: R ~ 1e60 is finite in double (it used to overflow, accumulated in float), the features overflow.
  const Matrix<float> huge = Matrix<float>::Constant(n, d, 1e30f);
  PolynomialAttention<float> attn(opt);
  REQUIRE_THROWS_AS(attn.forward(huge, huge, V, O), std::domain_error);
  REQUIRE_THROWS_WITH(attn.forward(huge, huge, V, O), Contains("polyattn::PolynomialAttention::forward") &&
                                                          Contains("overflowed float") && Contains("score radius"));
  // Values near the largest float: the numerators overflow, the normalisers do not.
  const Matrix<float> Vbig = Matrix<float>::Constant(n, d, 1e38f);
  REQUIRE_THROWS_AS(attn.forward(Q, K, Vbig, O), std::domain_error);
  REQUIRE_THROWS_WITH(attn.forward(Q, K, Vbig, O),
                      Contains("PolynomialAttention::forward") && Contains("the output") && Contains("max |V|"));
  // In double, entries 1e200 make R overflow double itself.
  const Matrix<double> huge_double = Matrix<double>::Constant(n, d, 1e200);
  Matrix<double> O_double(n, d);
  PolynomialAttention<double> attn_double(opt);
  REQUIRE_THROWS_AS(attn_double.forward(huge_double, huge_double, V.cast<double>(), O_double), std::domain_error);
  REQUIRE_THROWS_WITH(attn_double.forward(huge_double, huge_double, V.cast<double>(), O_double),
                      Contains("PolynomialAttention::forward") && Contains("score radius") &&
                          Contains("overflows double"));
  // raise_degree when no degree <= 64 suffices names the caller and the radius.
  opt.radius = 1;
  opt.range_policy = RangePolicy::raise_degree;
  PolynomialAttention<float> raising(opt);
  REQUIRE_THROWS_AS(raising.forward(huge, huge, V, O), std::domain_error);
  REQUIRE_THROWS_WITH(raising.forward(huge, huge, V, O), Contains("PolynomialAttention::forward") &&
                                                             Contains("score radius") && Contains("raise_degree"));
  opt.range_policy = RangePolicy::throw_error;
  PolynomialAttention<float> throwing(opt);
  REQUIRE_THROWS_WITH(throwing.forward(huge, huge, V, O),
                      Contains("PolynomialAttention::forward") && Contains("RangePolicy::throw_error"));
}

TEST_CASE("PolynomialAttention rejects an unallocatable feature width before allocating", "[polynomial_attention]") {
  const Index n = 8, d = 64;
  const Matrix<float> Q = random_matrix<float>(n, d, 76, 0.1), K = random_matrix<float>(n, d, 77, 0.1),
                      V = random_matrix<float>(n, 2, 78);
  Matrix<float> O(n, 2);
  PolynomialAttentionOptions opt;
  opt.max_features = std::numeric_limits<Index>::max();  // "no limit"
  opt.degree = 40;                                         // C(104, 40) ~ 1e29 features, beyond Index arithmetic
  PolynomialAttention<float> attn(opt);
  REQUIRE_THROWS_AS(attn.forward(Q, K, V, O), std::invalid_argument);
  REQUIRE_THROWS_WITH(attn.forward(Q, K, V, O), Contains("PolynomialAttention::forward") && Contains("'degree'") &&
                                                    Contains("max_feature_width"));
  // A huge chunk size is capped by the problem size.
  PolynomialAttentionOptions chunked;
  chunked.degree = 2;
  chunked.chunk_size = Index(1) << 30;
  for (const bool causal : {false, true}) {
    chunked.attention.causal = causal;
    PolynomialAttentionOptions automatic = chunked;
    automatic.chunk_size = 0;
    Matrix<float> O_chunked(n, 2), O_automatic(n, 2);
    PolynomialAttention<float>(chunked).forward(Q.leftCols(8), K.leftCols(8), V, O_chunked);
    PolynomialAttention<float>(automatic).forward(Q.leftCols(8), K.leftCols(8), V, O_automatic);
    REQUIRE(relative_error(O_chunked, O_automatic) < 1e-5);
  }
}

// block_product() (the kernel's register-tiled C = A B) and block_product_add() (C += A B) against the product in
// long double, entry by entry within the standard bound |c - c^| <= k u (|C| + |A| |B|)_ij of a length-k sum of
// products (one more term when adding to C); the rows around the destination block stay untouched. Shapes cover
// full tiles, single packets and single rows, every remainder of the column groups, and a transposed (row-major) B.
// Every entry of a computed product C within terms * u * magnitude_ij of the exact one, u the unit roundoff of C's
// scalar type: the bound of a sum of `terms` products.
template <class DC, class Wide>
void require_within_product_bound(const Eigen::MatrixBase<DC>& C, const Wide& exact, const Wide& magnitude,
                                  Index terms) {
  const long double bound = static_cast<long double>(terms) * std::numeric_limits<typename DC::Scalar>::epsilon() / 2;
  for (Index j = 0; j < C.cols(); ++j)
    for (Index i = 0; i < C.rows(); ++i)
      REQUIRE(std::abs(static_cast<long double>(C(i, j)) - exact(i, j)) <= bound * magnitude(i, j));
}

template <class T>
void check_block_product(Index rows, Index depth, Index cols, bool transposed_b, bool accumulate) {
  using Wide = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;
  const Matrix<T> A_full = Matrix<T>::Random(rows + 3, depth);
  const Matrix<T> B_stored = transposed_b ? Matrix<T>::Random(cols, depth) : Matrix<T>::Random(depth, cols);
  Matrix<T> C_full = Matrix<T>::Constant(rows + 5, cols, T(7));
  const auto A = A_full.middleRows(1, rows);
  auto C = C_full.middleRows(2, rows);
  const Wide C_before = C.template cast<long double>();
  if (transposed_b)
    accumulate ? polyattn::detail::block_product_add<T>(A, B_stored.transpose(), C)
               : polyattn::detail::block_product<T>(A, B_stored.transpose(), C);
  else
    accumulate ? polyattn::detail::block_product_add<T>(A, B_stored, C)
               : polyattn::detail::block_product<T>(A, B_stored, C);
  const Wide B = transposed_b ? Wide(B_stored.transpose().template cast<long double>())
                              : Wide(B_stored.template cast<long double>());
  Wide exact = A.template cast<long double>() * B;
  Wide magnitude = A.template cast<long double>().cwiseAbs() * B.cwiseAbs();
  if (accumulate) {
    exact += C_before;
    magnitude += C_before.cwiseAbs();
  }
  INFO(rows << " x " << depth << " times " << depth << " x " << cols << (transposed_b ? " (B transposed)" : "")
            << (accumulate ? ", added to C" : ""));
  require_within_product_bound(C, exact, magnitude, accumulate ? depth + 1 : depth);
  REQUIRE((C_full.topRows(2).array() == T(7)).all());
  REQUIRE((C_full.bottomRows(3).array() == T(7)).all());
}

TEST_CASE("block_product equals the product within rounding for every tile remainder", "[polynomial_attention]") {
  for (const Index rows : {0, 1, 7, 8, 15, 16, 17, 31, 33, 50, 64, 65, 100})
    for (const Index depth : {1, 16, 17, 153})
      for (const Index cols : {1, 5, 6, 7, 13, 17, 18, 64})
        for (const bool transposed : {false, true})
          for (const bool accumulate : {false, true}) {
            check_block_product<float>(rows, depth, cols, transposed, accumulate);
            check_block_product<double>(rows, depth, cols, transposed, accumulate);
          }
}

// transposed_product() (a chunk's state, transposed: C = B^T A) against the product in long double within the bound
// of a length-k sum of products, for column counts of B below, at and above whole SIMD packets (the packed rows of
// C go through block_product, the rest through matrix-vector products), written into a block of a larger matrix,
// and with one scratch matrix reused across shapes, as a chunk loop reuses it.
template <class T>
void check_transposed_products() {
  using Wide = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;
  Matrix<T> transposed;
  for (const Index rows : {100, 64, 17, 1, 0})
    for (const Index r : {153, 17, 16, 1})
      for (const Index cols : {1, 7, 8, 15, 16, 17, 18, 33}) {
        const Matrix<T> A = Matrix<T>::Random(rows, r), B = Matrix<T>::Random(rows, cols);
        Matrix<T> C_full = Matrix<T>::Constant(cols + 3, r, T(7));
        auto C = C_full.middleRows(1, cols);
        polyattn::detail::transposed_product<T>(B, A, C, transposed);
        const Wide exact = B.template cast<long double>().transpose() * A.template cast<long double>();
        const Wide magnitude =
            B.template cast<long double>().cwiseAbs().transpose() * A.template cast<long double>().cwiseAbs();
        INFO(rows << " x " << cols << " transposed times " << rows << " x " << r);
        require_within_product_bound(C, exact, magnitude, rows);
        REQUIRE((C_full.topRows(1).array() == T(7)).all());
        REQUIRE((C_full.bottomRows(2).array() == T(7)).all());
      }
}

TEST_CASE("transposed_product equals B^T A within rounding", "[polynomial_attention]") {
  check_transposed_products<float>();
  check_transposed_products<double>();
}

// The products on a causal block's panels (block_product.hpp) against the masked products in long double, within
// the bound of a sum of products: C = A B on the panels with every entry above them untouched; for_causal_packets()
// making the panels tril(C); C += L B and C += L^T B (through transpose_causal()) for that L, whose entries above
// the panels are NaN to show that nothing reads them. Sizes below, at and between whole SIMD packets.
template <class T>
void check_causal_panel_products(Index rows) {
  using Wide = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;
  constexpr Index lanes = polyattn::detail::BlockProductTile<T>::lanes;
  const Index depth = 17, cols = 16;
  const auto on_panels = [](Index i, Index j) { return i >= j / lanes * lanes; };
  INFO(rows << " rows, " << lanes << " lanes");
  const Matrix<T> A = Matrix<T>::Random(rows, depth), B = Matrix<T>::Random(rows, depth);
  Matrix<T> L = Matrix<T>::Constant(rows, rows, T(7));
  polyattn::detail::causal_block_product<T>(A, B.transpose(), L);
  const Wide exact = A.template cast<long double>() * B.template cast<long double>().transpose();
  const Wide magnitude = A.template cast<long double>().cwiseAbs() * B.template cast<long double>().cwiseAbs().transpose();
  const long double u = std::numeric_limits<T>::epsilon() / 2;
  for (Index j = 0; j < rows; ++j)
    for (Index i = 0; i < rows; ++i) {
      if (on_panels(i, j))
        REQUIRE(std::abs(static_cast<long double>(L(i, j)) - exact(i, j)) <= depth * u * magnitude(i, j));
      else
        REQUIRE(L(i, j) == T(7));
    }
  // for_causal_packets() visits every entry of the panels once, with the mask of those on or below the diagonal;
  // the kernel's way of making a block tril(.) as it writes it.
  const Matrix<T> before_masking = L;
  Eigen::MatrixXi visits = Eigen::MatrixXi::Zero(rows, rows);
  polyattn::detail::for_causal_packets<T>(rows, [&](Index j, Index i, auto packet, const auto* on_or_below) {
    using Packet = decltype(packet);
    const Index size = Eigen::internal::unpacket_traits<Packet>::size;
    for (Index lane = 0; lane < size; ++lane) ++visits(i + lane, j);
    REQUIRE((on_or_below != nullptr) == (i < j));  // a mask exactly for the packets reaching above the diagonal
    Eigen::internal::pstoreu(&L(i, j), polyattn::detail::masked(Eigen::internal::ploadu<Packet>(&L(i, j)), on_or_below));
  });
  Wide lower = Wide::Zero(rows, rows);
  for (Index j = 0; j < rows; ++j)
    for (Index i = 0; i < rows; ++i) {
      REQUIRE(visits(i, j) == (on_panels(i, j) ? 1 : 0));
      if (!on_panels(i, j)) {
        REQUIRE(L(i, j) == T(7));
        L(i, j) = std::numeric_limits<T>::quiet_NaN();
      } else {
        REQUIRE(L(i, j) == (i >= j ? before_masking(i, j) : T(0)));
        lower(i, j) = L(i, j);
      }
    }
  const Matrix<T> X = Matrix<T>::Random(rows, cols), C0 = Matrix<T>::Random(rows, cols);
  const Wide Xw = X.template cast<long double>(), C0w = C0.template cast<long double>();
  Matrix<T> C = C0;
  polyattn::detail::causal_product_add<T>(L, X, C);
  require_within_product_bound(C, Wide(C0w + lower * Xw), Wide(C0w.cwiseAbs() + lower.cwiseAbs() * Xw.cwiseAbs()),
                               rows + 1);
  Matrix<T> U = Matrix<T>::Constant(rows, rows, T(7));
  polyattn::detail::transpose_causal<T>(L, U);
  for (Index j = 0; j < rows; ++j)
    for (Index i = 0; i < rows; ++i) REQUIRE(U(j, i) == (on_panels(i, j) ? L(i, j) : T(7)));
  for (Index j = 0; j < rows; ++j)
    for (Index i = 0; i < rows; ++i)
      if (!on_panels(i, j)) U(j, i) = std::numeric_limits<T>::quiet_NaN();
  C = C0;
  polyattn::detail::transposed_causal_product_add<T>(U, X, C);
  require_within_product_bound(C, Wide(C0w + lower.transpose() * Xw),
                               Wide(C0w.cwiseAbs() + lower.cwiseAbs().transpose() * Xw.cwiseAbs()), rows + 1);
}

TEST_CASE("the causal block's panel products equal the masked products within rounding", "[polynomial_attention]") {
  for (const Index rows : {1, 7, 8, 9, 16, 17, 33, 48, 64, 70}) {
    check_causal_panel_products<float>(rows);
    check_causal_panel_products<double>(rows);
  }
}

// transpose_into() against Eigen's transpose, exactly, for full SIMD tiles and every remainder of rows and columns
// (blocks of larger matrices, so that the outer strides differ from the sizes).
template <class T>
void check_transpose(Index rows, Index cols) {
  const Matrix<T> A_full = Matrix<T>::Random(rows + 2, cols + 1);
  Matrix<T> At_full = Matrix<T>::Constant(cols + 3, rows + 1, T(7));
  const auto A = A_full.block(1, 1, rows, cols);
  auto At = At_full.block(2, 0, cols, rows);
  polyattn::detail::transpose_into<T>(A, At);
  INFO(rows << " x " << cols);
  REQUIRE(At == A.transpose());
  REQUIRE((At_full.topRows(2).array() == T(7)).all());
  REQUIRE((At_full.bottomRows(1).array() == T(7)).all());
  REQUIRE((At_full.rightCols(1).array() == T(7)).all());
}

TEST_CASE("transpose_into equals the transpose for every tile remainder", "[polynomial_attention]") {
  for (const Index rows : {0, 1, 7, 8, 15, 16, 17, 33, 64, 65})
    for (const Index cols : {0, 1, 5, 8, 16, 17, 31, 64}) {
      check_transpose<float>(rows, cols);
      check_transpose<double>(rows, cols);
    }
}
