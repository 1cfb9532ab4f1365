#include <polyattn/attention/exact_gradients.hpp>
#include <polyattn/attention/paper_gradients.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

using Catch::Contains;
using polyattn::AttentionOptions;
using polyattn::Certificate;
using polyattn::FeatureMapKind;
using polyattn::GradientCertificate;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::PaperBackend;
using polyattn::PolynomialAttentionOptions;
using polyattn::Vector;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

struct PaperProblem {
  Matrix<double> Q, K, V, G;
};

// Queries and keys with small entries (the bounded-entry regime: R = c max|q| max|k| well below 1),
// values and upstream gradient N(0, 1).
PaperProblem random_paper_problem(Index n, Index dk, Index dv, Index heads, std::uint64_t seed, double qk_sigma) {
  return {random_matrix<double>(n, heads * dk, seed, qk_sigma), random_matrix<double>(n, heads * dk, seed + 1, qk_sigma),
          random_matrix<double>(n, heads * dv, seed + 2), random_matrix<double>(n, heads * dv, seed + 3)};
}

// Row-normalised (optionally causally masked) kernel matrix kernel(c Q_h K_h^T) of one head.
template <class Kernel>
Matrix<double> attention_matrix(const Matrix<double>& Qh, const Matrix<double>& Kh, double c, bool causal,
                                Kernel kernel) {
  Matrix<double> A = (c * Qh * Kh.transpose()).unaryExpr(kernel);
  if (causal) A.triangularView<Eigen::StrictlyUpper>().setZero();
  // Evaluated first: Eigen would recompute the lazy row sums for every entry of the product.
  const Vector<double> inverse_row_sums = A.rowwise().sum().cwiseInverse();
  return inverse_row_sums.asDiagonal() * A;
}

struct PaperGradients {
  Matrix<double> O, dQ, dK, dV;
  std::vector<Matrix<double>> P;  // per head
};

// The exact-gradient formulas with P replaced by the row-normalised polynomial kernel P~ (materialised):
// what Algorithm 1 computes, up to rounding.
PaperGradients formulas_with_approximate_p(const PaperProblem& pr, const AttentionOptions& opt,
                                           const polyattn::Polynomial& poly) {
  const Index heads = opt.heads, dk = pr.Q.cols() / heads, dv = pr.V.cols() / heads, n = pr.Q.rows();
  const double c = opt.resolved_scale(dk);
  PaperGradients out{Matrix<double>(n, heads * dv), Matrix<double>(n, heads * dk), Matrix<double>(n, heads * dk),
                     Matrix<double>(n, heads * dv), {}};
  for (Index h = 0; h < heads; ++h) {
    const Matrix<double> Qh = pr.Q.middleCols(h * dk, dk), Kh = pr.K.middleCols(h * dk, dk);
    const Matrix<double> Vh = pr.V.middleCols(h * dv, dv), Gh = pr.G.middleCols(h * dv, dv);
    const Matrix<double> P = attention_matrix(Qh, Kh, c, opt.causal, [&](double x) { return poly(x); });
    const Matrix<double> O = P * Vh;
    const Vector<double> kappa = O.cwiseProduct(Gh).rowwise().sum();
    const Matrix<double> p = P.cwiseProduct(Gh * Vh.transpose()) - kappa.asDiagonal() * P;
    out.O.middleCols(h * dv, dv) = O;
    out.dQ.middleCols(h * dk, dk) = c * p * Kh;
    out.dK.middleCols(h * dk, dk) = c * p.transpose() * Qh;
    out.dV.middleCols(h * dv, dv) = P.transpose() * Gh;
    out.P.push_back(P);
  }
  return out;
}

template <class T>
struct PaperRun {
  Matrix<T> O, dQ, dK, dV;
  Certificate cert;
  GradientCertificate grad;
};

template <class T>
PaperRun<T> run_paper(const PaperProblem& pr, const PolynomialAttentionOptions& opt) {
  const Matrix<T> Q = pr.Q.cast<T>(), K = pr.K.cast<T>(), V = pr.V.cast<T>(), G = pr.G.cast<T>();
  PaperRun<T> run{Matrix<T>(Q.rows(), V.cols()), Matrix<T>(Q.rows(), Q.cols()), Matrix<T>(K.rows(), K.cols()),
                  Matrix<T>(K.rows(), V.cols()), {}, {}};
  PaperBackend<T> paper(opt);
  run.cert = paper.forward(Q, K, V, run.O);
  run.grad = paper.backward(Q, K, V, run.O, G, run.dQ, run.dK, run.dV);
  return run;
}

PolynomialAttentionOptions polynomial_options(bool causal, Index heads, int degree, FeatureMapKind map, Index chunk) {
  PolynomialAttentionOptions opt;
  opt.attention.causal = causal;
  opt.attention.heads = heads;
  opt.degree = degree;
  opt.feature_map = map;
  opt.chunk_size = chunk;
  return opt;
}

double max_abs_difference(const Matrix<double>& a, const Matrix<double>& b) { return (a - b).cwiseAbs().maxCoeff(); }

}  // namespace

TEMPLATE_TEST_CASE("Paper backward equals the exact-gradient formulas evaluated with the approximate P",
                   "[paper_gradients]", float, double) {
  using T = TestType;
  // Both sides compute the same function of the inputs in different orders. In double the rounding is a
  // few hundred u relative to the result's norm (sums of <= n r (d+1) ~ 1e4 terms, and p~ is a difference
  // of O(1) terms whose result is O(0.1)): 1e-11 leaves margin. In float u = 6e-8 and the same
  // amplification gives ~1e-5; 2e-4 leaves margin.
  const double tolerance = std::is_same<T, double>::value ? 1e-11 : 2e-4;
  const Index n = 19, dk = 3, dv = 2;
  for (const bool causal : {false, true})
    for (const Index heads : {Index(1), Index(2), Index(3)})
      for (const int degree : {2, 4})
        for (const FeatureMapKind map : {FeatureMapKind::symmetric, FeatureMapKind::kronecker})
          for (const Index chunk : {Index(4), Index(5), Index(19)}) {  // 19 rows: 5 does not divide, 19 is one chunk
            CAPTURE(causal, heads, degree, map == FeatureMapKind::symmetric, chunk);
            const PaperProblem pr =
                random_paper_problem(n, dk, dv, heads, 100 + static_cast<std::uint64_t>(heads), 0.5);
            const PolynomialAttentionOptions opt = polynomial_options(causal, heads, degree, map, chunk);
            const PaperRun<T> run = run_paper<T>(pr, opt);
            const PaperGradients ref = formulas_with_approximate_p(pr, opt.attention, polyattn::taylor_exp(degree));
            CHECK(relative_error(run.O, ref.O) < tolerance);
            CHECK(relative_error(run.dQ, ref.dQ) < tolerance);
            CHECK(relative_error(run.dK, ref.dK) < tolerance);
            CHECK(relative_error(run.dV, ref.dV) < tolerance);
          }
}

TEMPLATE_TEST_CASE("Paper backward over several blocks of rows equals the formulas with the approximate P",
                   "[paper_gradients][threads]", float, double) {
  using T = TestType;
  // Blocks hold at least 1024 rows: 2100 rows are three blocks (1024, 1024, 52) whose partial states are added in
  // block order, and under the mask every block's scans start from the sums over the blocks before (after) it.
  // Tolerances as in the test above; the sums are longer here (2100 rows), hence the wider float one.
  const double tolerance = std::is_same<T, double>::value ? 1e-11 : 1e-3;
  const Index n = 2100, dk = 3, dv = 2, heads = 2;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const PaperProblem pr = random_paper_problem(n, dk, dv, heads, 7, 0.5);
    const PolynomialAttentionOptions opt = polynomial_options(causal, heads, 2, FeatureMapKind::symmetric, 4);
    const PaperRun<T> run = run_paper<T>(pr, opt);
    const PaperGradients ref = formulas_with_approximate_p(pr, opt.attention, polyattn::taylor_exp(2));
    CHECK(relative_error(run.O, ref.O) < tolerance);
    CHECK(relative_error(run.dQ, ref.dQ) < tolerance);
    CHECK(relative_error(run.dK, ref.dK) < tolerance);
    CHECK(relative_error(run.dV, ref.dV) < tolerance);
  }
}

TEST_CASE("Paper forward is the polynomial attention forward with the same certificate", "[paper_gradients]") {
  const PaperProblem pr = random_paper_problem(21, 4, 3, 2, 150, 0.5);
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    PolynomialAttentionOptions opt = polynomial_options(causal, 2, 4, FeatureMapKind::symmetric, 8);
    opt.estimate_error = true;
    polyattn::PolynomialAttention<double> polynomial(opt);
    Matrix<double> expected(21, 6);
    const Certificate expected_cert = polynomial.forward(pr.Q, pr.K, pr.V, expected);
    const PaperRun<double> run = run_paper<double>(pr, opt);
    // Same code on the same data: identical bits.
    CHECK(run.O == expected);
    CHECK(run.cert.radius == expected_cert.radius);
    CHECK(run.cert.poly_error == expected_cert.poly_error);
    CHECK(run.cert.output_bound == expected_cert.output_bound);
    CHECK(run.cert.sampled_max_error == expected_cert.sampled_max_error);
    CHECK(run.grad.forward.poly_error == expected_cert.poly_error);
  }
}

namespace {

// The row-wise Kronecker factor [A (/) S, diag(t) A], column l + j r = A(:, l) S(:, j) (the last group: t), formed.
Matrix<double> kronecker_factor(const Matrix<double>& A, const Matrix<double>& S, const Vector<double>& t) {
  const Index r = A.cols(), k = S.cols();
  Matrix<double> F(A.rows(), (k + 1) * r);
  for (Index j = 0; j <= k; ++j)
    F.middleCols(j * r, r) = (j < k ? Vector<double>(S.col(j)) : t).asDiagonal() * A;
  return F;
}

}  // namespace

TEST_CASE("Products with the Kronecker factors equal those with the factors formed", "[paper_gradients]") {
  const Index rows = 7, r = 5, k = 3, m = 4;
  const Matrix<double> A = random_matrix<double>(rows, r, 300), S = random_matrix<double>(rows, k, 301);
  const Vector<double> t = random_matrix<double>(rows, 1, 302).col(0);
  const Matrix<double> X = random_matrix<double>(rows, m, 303), F = kronecker_factor(A, S, t);
  // F^T X = A^T H, F^T X's rows [j r, (j + 1) r) in H's column block j.
  Matrix<double> H;
  polyattn::detail::kronecker_right_factor<double>(X, S, t, H);
  const Matrix<double> state = A.transpose() * H, expected = F.transpose() * X;
  for (Index j = 0; j <= k; ++j)
    CHECK((state.middleCols(j * m, m) - expected.middleRows(j * r, r)).cwiseAbs().maxCoeff() < 1e-13);
  // F Z for a state Z in that layout, through M = A Z.
  const Matrix<double> Z = random_matrix<double>(r, (k + 1) * m, 304);
  Matrix<double> Z_stacked((k + 1) * r, m);
  for (Index j = 0; j <= k; ++j) Z_stacked.middleRows(j * r, r) = Z.middleCols(j * m, m);
  Matrix<double> Y = Matrix<double>::Zero(rows, m);
  const Matrix<double> M = A * Z;
  polyattn::detail::add_kronecker_product<double>(M, S, t, Y);
  CHECK((Y - F * Z_stacked).cwiseAbs().maxCoeff() < 1e-13);
}

TEST_CASE("Kronecker factors reproduce p~ and the backend's products equal the formed ones", "[paper_gradients]") {
  const Index n = 13, dk = 3, dv = 3;
  const PaperProblem pr = random_paper_problem(n, dk, dv, 1, 200, 0.5);
  const double c = 1 / std::sqrt(3.0);
  const polyattn::FeatureMap<double> map(FeatureMapKind::symmetric, dk, polyattn::taylor_exp(2), c);
  Matrix<double> Fq(n, map.width()), Fk(n, map.width());
  map.features(pr.Q, polyattn::FeatureSide::query, Fq);
  map.features(pr.K, polyattn::FeatureSide::key, Fk);
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    Matrix<double> A = Fq * Fk.transpose();
    if (causal) A.triangularView<Eigen::StrictlyUpper>().setZero();
    const Vector<double> normaliser = A.rowwise().sum();
    const Matrix<double> U1 = normaliser.cwiseInverse().asDiagonal() * Fq, &V1 = Fk;
    const Matrix<double> P = normaliser.cwiseInverse().asDiagonal() * A;
    const Vector<double> kappa = (P * pr.V).cwiseProduct(pr.G).rowwise().sum();
    const Matrix<double> Up = kronecker_factor(U1, pr.G, -kappa);
    const Matrix<double> Vp = kronecker_factor(V1, pr.V, Vector<double>::Ones(n));
    REQUIRE(Up.cols() == map.width() * (dv + 1));
    // Fact C.2: (U1 (/) G)(V1 (/) V)^T = (U1 V1^T) o (G V^T); the mask commutes with the Hadamard product.
    Matrix<double> p_lowrank = Up * Vp.transpose();
    if (causal) p_lowrank.triangularView<Eigen::StrictlyUpper>().setZero();
    const Matrix<double> p = P.cwiseProduct(pr.G * pr.V.transpose()) - kappa.asDiagonal() * P;
    CHECK(relative_error(p_lowrank, p) < 1e-13);
    // The formed factors' products, right to left: c U_p (V_p^T K) etc. (causal: masked products of the whole
    // factors).
    const Matrix<double> dQ = c * p_lowrank * pr.K, dK = c * p_lowrank.transpose() * pr.Q;
    for (const Index chunk : {Index(3), Index(13)}) {
      CAPTURE(chunk);
      PolynomialAttentionOptions opt = polynomial_options(causal, 1, 2, FeatureMapKind::symmetric, chunk);
      opt.attention.scale = c;
      const PaperRun<double> run = run_paper<double>(pr, opt);
      // Sums of <= n r (d+1) = 520 O(1) products in different orders: 1e-12 relative has margin.
      CHECK(relative_error(run.dQ, dQ) < 1e-12);
      CHECK(relative_error(run.dK, dK) < 1e-12);
      CHECK(relative_error(run.dV, P.transpose() * pr.G) < 1e-12);
    }
  }
}

TEST_CASE("Paper gradients are within the epsilon-derived bound of the exact gradients", "[paper_gradients]") {
  // Tolerance derivation. With eps the certified max |p(x) e^{-x} - 1| on [-R, R] (eps < 1), every entry
  // obeys |P~ - P| <= delta P with delta = 2 eps / (1 - eps). With a = max ||g_i|| max ||v_j|| (which bounds
  // |(G V^T)_ij| and |kappa_i|): |kappa~_i - kappa_i| <= delta a and |p~_ij - p_ij| <= 2 a delta P_ij +
  // a delta P~_ij, so
  //   |dQ~ - dQ| <= 3 c delta a max|K|,
  //   |dK~ - dK|_j <= c delta a max|Q| (2 colsum(P)_j + colsum(P~)_j),
  //   |dV~ - dV|_j <= delta max|G| colsum(P)_j,
  // computed here from the materialised exact P and P~. Rounding (double) is ~1e-15 relative, negligible
  // against delta >= 1e-6 here. The certificate's bounds use only P~ (colsum(P) <= rho colsum(P~)), so they
  // must be at least these.
  const Index n = 24, dk = 4, dv = 3;
  for (const bool causal : {false, true})
    for (const Index heads : {Index(1), Index(2), Index(3)})
      for (const int degree : {2, 4})
        for (const FeatureMapKind map : {FeatureMapKind::symmetric, FeatureMapKind::kronecker}) {
          CAPTURE(causal, heads, degree, map == FeatureMapKind::symmetric);
          const PaperProblem pr = random_paper_problem(n, dk, dv, heads, 300 + static_cast<std::uint64_t>(heads), 0.2);
          const PolynomialAttentionOptions opt = polynomial_options(causal, heads, degree, map, 7);
          const PaperRun<double> run = run_paper<double>(pr, opt);
          REQUIRE(run.cert.radius < 0.5);
          REQUIRE_FALSE(run.cert.vacuous());
          const double eps = run.cert.poly_error, delta = 2 * eps / (1 - eps);
          Matrix<double> dQ(n, heads * dk), dK(n, heads * dk), dV(n, heads * dv);
          polyattn::attention_backward_reference<double>(pr.Q, pr.K, pr.V, pr.G, opt.attention, dQ, dK, dV);
          const PaperGradients approx = formulas_with_approximate_p(pr, opt.attention, polyattn::taylor_exp(degree));
          double bound_q = 0, bound_k = 0, bound_v = 0;
          for (Index h = 0; h < heads; ++h) {
            const Matrix<double> Qh = pr.Q.middleCols(h * dk, dk), Kh = pr.K.middleCols(h * dk, dk);
            const Matrix<double> Vh = pr.V.middleCols(h * dv, dv), Gh = pr.G.middleCols(h * dv, dv);
            const double c = opt.attention.resolved_scale(dk);
            const double a = Gh.rowwise().norm().maxCoeff() * Vh.rowwise().norm().maxCoeff();
            const Matrix<double> P = attention_matrix(Qh, Kh, c, causal, [](double x) { return std::exp(x); });
            const Vector<double> col_exact = P.colwise().sum().transpose();
            const Vector<double> col_approx = approx.P[static_cast<std::size_t>(h)].colwise().sum().transpose();
            bound_q = std::max(bound_q, 3 * c * delta * a * Kh.cwiseAbs().maxCoeff());
            bound_k = std::max(bound_k, c * delta * a * Qh.cwiseAbs().maxCoeff() * (2 * col_exact + col_approx).maxCoeff());
            bound_v = std::max(bound_v, delta * Gh.cwiseAbs().maxCoeff() * col_exact.maxCoeff());
          }
          CAPTURE(eps, bound_q, bound_k, bound_v, dQ.cwiseAbs().maxCoeff(), dK.cwiseAbs().maxCoeff(),
                  dV.cwiseAbs().maxCoeff());
          CHECK(max_abs_difference(run.dQ, dQ) <= bound_q);
          CHECK(max_abs_difference(run.dK, dK) <= bound_k);
          CHECK(max_abs_difference(run.dV, dV) <= bound_v);
          // The dQ terms are the same expression evaluated in another order (and with FMA contraction
          // where the compiler chooses): equal up to a few ulps, hence the 1e-12 relative slack.
          CHECK(run.grad.dqk_bound >= std::max(bound_q, bound_k) * (1 - 1e-12));
          CHECK(run.grad.dv_bound >= bound_v * (1 - 1e-12));
          if (degree == 4) {
            // The bound is small against the gradients here, so a wrong formula (e.g. the paper's printed
            // f instead of f^T) could not hide under it.
            CHECK(bound_q < 0.05 * dQ.cwiseAbs().maxCoeff());
            CHECK(bound_k < 0.05 * dK.cwiseAbs().maxCoeff());
            CHECK(bound_v < 0.05 * dV.cwiseAbs().maxCoeff());
          }
        }
}

TEST_CASE("Paper gradients at negligible epsilon match central finite differences of the exact loss",
          "[paper_gradients]") {
  // At R ~ 0.3 the degree-12 Taylor truncation has eps ~ 1e-18, certified <= 1e-12 (the certificate's
  // rounding term dominates), so the paper's gradients equal the exact ones to ~1e-11 (bound above) and
  // must agree with central differences of the exact loss L = <G, O> to their accuracy, ~1e-9
  // (gradient_check.hpp): 1e-7 as for every double gradient check.
  const Index n = 7, dk = 3, dv = 2, heads = 2;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    PaperProblem pr = random_paper_problem(n, dk, dv, heads, 400, 0.25);
    const PolynomialAttentionOptions opt = polynomial_options(causal, heads, 12, FeatureMapKind::symmetric, 3);
    const PaperRun<double> run = run_paper<double>(pr, opt);
    REQUIRE(run.cert.poly_error < 1e-12);
    auto loss = [&] {
      return (polyattn::attention_reference(pr.Q, pr.K, pr.V, opt.attention).array() * pr.G.array()).sum();
    };
    CHECK(polyattn::testing::gradient_error(loss, pr.Q, run.dQ) < 1e-7);
    CHECK(polyattn::testing::gradient_error(loss, pr.K, run.dK) < 1e-7);
    CHECK(polyattn::testing::gradient_error(loss, pr.V, run.dV) < 1e-7);
  }
}

TEST_CASE("Paper backward rejects bad input naming the argument", "[paper_gradients]") {
  const Index n = 6, dk = 2, dv = 2;
  const PaperProblem pr = random_paper_problem(n, dk, dv, 1, 500, 0.5);
  Matrix<double> O(n, dv), dQ(n, dk), dK(n, dk), dV(n, dv);
  PaperBackend<double> paper(PolynomialAttentionOptions{});
  CHECK(paper.method() == polyattn::AttentionMethod::paper);
  CHECK_THROWS_WITH(paper.backward(pr.Q, pr.K, pr.V, O, pr.G, dQ, dK, dV), Contains("forward() first"));
  paper.forward(pr.Q, pr.K, pr.V, O);
  const Matrix<double> short_g = pr.G.topRows(n - 1);
  CHECK_THROWS_WITH(paper.backward(pr.Q, pr.K, pr.V, O, short_g, dQ, dK, dV),
                    Contains("PaperBackend::backward") && Contains("'G'") && Contains("6x2") && Contains("5x2"));
  Matrix<double> wide_dv(n, dv + 1);
  CHECK_THROWS_WITH(paper.backward(pr.Q, pr.K, pr.V, O, pr.G, dQ, dK, wide_dv), Contains("'dV'") && Contains("6x3"));
  Matrix<double> nan_g = pr.G;
  nan_g(3, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(paper.backward(pr.Q, pr.K, pr.V, O, nan_g, dQ, dK, dV), Contains("'G'") && Contains("(3, 1)"));
  Matrix<double> nan_q = pr.Q;
  nan_q(0, 0) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(paper.backward(nan_q, pr.K, pr.V, O, pr.G, dQ, dK, dV), Contains("'Q'"));
  const Matrix<double> longer = random_matrix<double>(n + 1, dk, 501);
  Matrix<double> dK_longer(n + 1, dk), dV_longer(n + 1, dv);
  CHECK_THROWS_WITH(paper.backward(pr.Q, longer, random_matrix<double>(n + 1, dv, 502), O, pr.G, dQ, dK_longer,
                                   dV_longer),
                    Contains("last forward()"));
  const Matrix<double> empty(0, dk), empty_v(0, dv);
  Matrix<double> empty_dq(0, dk), empty_dv(0, dv);
  CHECK_THROWS_WITH(paper.backward(empty, empty, empty_v, empty_v, empty_v, empty_dq, empty_dq, empty_dv),
                    Contains("'Q'") && Contains("non-empty"));
  PolynomialAttentionOptions bad_degree;
  bad_degree.degree = -1;
  CHECK_THROWS_WITH(PaperBackend<double>(bad_degree), Contains("'degree'"));
}

TEST_CASE("PaperBackend rejects outputs overlapping inputs or each other", "[paper_gradients][aliasing]") {
  const Index n = 16, d = 4;
  Matrix<double> Q = random_matrix<double>(n, d, 100), K = random_matrix<double>(n, d, 101),
                 V = random_matrix<double>(n, d, 102), G = random_matrix<double>(n, d, 103);
  PolynomialAttentionOptions opt;
  opt.degree = 4;
  opt.estimate_error = true;
  PaperBackend<double> paper(opt);
  Matrix<double> O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  REQUIRE_THROWS_AS(paper.forward(Q, K, V, Q), std::invalid_argument);
  REQUIRE_THROWS_WITH(paper.forward(Q, K, V, Q),
                      Contains("polyattn::PaperBackend::forward") && Contains("'O'") && Contains("'Q'"));
  paper.forward(Q, K, V, O);
  const std::string where = "polyattn::PaperBackend::backward";
  REQUIRE_THROWS_AS(paper.backward(Q, K, V, O, G, dQ, K, dV), std::invalid_argument);
  REQUIRE_THROWS_WITH(paper.backward(Q, K, V, O, G, dQ, K, dV), Contains(where) && Contains("'dK'") && Contains("'K'"));
  REQUIRE_THROWS_WITH(paper.backward(Q, K, V, O, G, Q, dK, dV), Contains(where) && Contains("'dQ'") && Contains("'Q'"));
  REQUIRE_THROWS_WITH(paper.backward(Q, K, V, O, G, dQ, dK, G), Contains(where) && Contains("'dV'") && Contains("'G'"));
  REQUIRE(K == random_matrix<double>(n, d, 101));
}

TEST_CASE("PaperBackend names itself when finite input overflows", "[paper_gradients][overflow]") {
  const Index n = 16, d = 4;
  const Matrix<float> V = random_matrix<float>(n, d, 104), huge = Matrix<float>::Constant(n, d, 1e30f);
  Matrix<float> O(n, d);
  PolynomialAttentionOptions opt;
  PaperBackend<float> paper(opt);
  REQUIRE_THROWS_AS(paper.forward(huge, huge, V, O), std::domain_error);
  REQUIRE_THROWS_WITH(paper.forward(huge, huge, V, O), Contains("polyattn::PaperBackend::forward") &&
                                                           Contains("overflowed float") && Contains("score radius"));
  opt.radius = 1;
  opt.range_policy = polyattn::RangePolicy::raise_degree;
  PaperBackend<float> raising(opt);
  REQUIRE_THROWS_WITH(raising.forward(huge, huge, V, O),
                      Contains("PaperBackend::forward") && Contains("score radius") && Contains("raise_degree"));
}

namespace {

// The paper backend on row-major blocks (each chunk of rows staged in cache) gives bitwise the column-major
// results, for any thread count, and never writes the padding.
template <class T>
void check_paper_row_major() {
  const Index dk = 3, dv = 2;
  for (const bool causal : {false, true})
    for (const Index heads : {Index(1), Index(2)})
      for (const Index chunk : {Index(0), Index(5)})
        for (const Index n : {Index(1), Index(37), Index(1300)}) {  // 1300 rows: two blocks of the partition
          CAPTURE(causal, heads, chunk, n);
          PolynomialAttentionOptions opt;
          opt.attention.causal = causal;
          opt.attention.heads = heads;
          opt.chunk_size = chunk;
          polyattn::testing::check_row_major_is_bitwise<T>(
              [&] { return PaperBackend<T>(opt); }, random_matrix<T>(n, heads * dk, 90, 0.5),
              random_matrix<T>(n, heads * dk, 91, 0.5), random_matrix<T>(n, heads * dv, 92),
              random_matrix<T>(n, heads * dv, 93));
        }
}

}  // namespace

TEST_CASE("PaperBackend reads and writes row-major matrices in place, bitwise as column-major ones",
          "[paper_gradients]") {
  check_paper_row_major<float>();
  check_paper_row_major<double>();
}

TEST_CASE("PaperBackend on row-major matrices names bad arguments", "[paper_gradients]") {
  using RowMajor = polyattn::RowMajorMatrix<double>;
  const Index n = 6;
  const RowMajor Q = random_matrix<double>(n, 3, 94), K = random_matrix<double>(n, 3, 95),
                 V = random_matrix<double>(n, 2, 96), G = random_matrix<double>(n, 2, 97);
  RowMajor O(n, 2), dQ(n, 3), dK(n, 3), dV(n, 2);
  PaperBackend<double> paper{PolynomialAttentionOptions{}};
  CHECK_THROWS_WITH(paper.backward(Q, K, V, O, G, dQ, dK, dV), Contains("call forward() first"));
  RowMajor bad_V = V;
  bad_V(3, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(paper.forward(Q, K, bad_V, O),
                    Contains("PaperBackend::forward") && Contains("'V'") && Contains("(3, 1)"));
  paper.forward(Q, K, V, O);
  RowMajor bad_G = G;
  bad_G(5, 0) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(paper.backward(Q, K, V, O, bad_G, dQ, dK, dV), Contains("'G'") && Contains("(5, 0)"));
  CHECK_THROWS_WITH(paper.backward(Q, K, V, O, G, dQ, dK, dQ), Contains("'dV'"));
}
