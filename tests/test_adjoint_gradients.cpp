#include <polyattn/attention/adjoint_gradients.hpp>
#include <polyattn/attention/exact_gradients.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using Catch::Contains;
using polyattn::AdjointBackend;
using polyattn::AttentionBackend;
using polyattn::AttentionMethod;
using polyattn::Certificate;
using polyattn::FeatureMapKind;
using polyattn::GradientCertificate;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::PolynomialAttention;
using polyattn::PolynomialAttentionOptions;
using polyattn::PolynomialKind;
using polyattn::testing::check_attention_gradients;
using polyattn::testing::AttentionProblem;
using polyattn::testing::AttentionResult;
using polyattn::testing::forward_backward;
using polyattn::testing::random_matrix;
using polyattn::testing::random_problem;
using polyattn::testing::relative_error;

namespace {

PolynomialAttentionOptions adjoint_options(bool causal, Index heads, int degree, FeatureMapKind map, Index chunk) {
  PolynomialAttentionOptions opt;
  opt.attention.causal = causal;
  opt.attention.heads = heads;
  opt.degree = degree;
  opt.feature_map = map;
  opt.chunk_size = chunk;
  return opt;
}

// The gradient of the approximate function written densely, independently of the feature map and of the
// scans: A~ = p(S) (o M), D~ = A~ 1, O~ = D~^{-1} A~ V, kappa~ = rowsum(G o O~),
// dS = (p'(S) (o M) / D~) o (G V^T - kappa~ 1^T), dQ = c dS K, dK = c dS^T Q, dV = (D~^{-1} A~)^T G.
AttentionResult<double> dense_adjoint(const AttentionProblem<double>& x, const polyattn::Polynomial& p, double c,
                                      bool causal, Index heads) {
  const Index dk = x.Q.cols() / heads, dv = x.V.cols() / heads, n = x.Q.rows();
  const polyattn::Polynomial dp = p.derivative();
  AttentionResult<double> r{Matrix<double>(n, x.V.cols()), Matrix<double>(n, x.Q.cols()),
                            Matrix<double>(n, x.K.cols()), Matrix<double>(n, x.V.cols()), {}, {}};
  for (Index h = 0; h < heads; ++h) {
    const Matrix<double> Qh = x.Q.middleCols(h * dk, dk), Kh = x.K.middleCols(h * dk, dk);
    const Matrix<double> Vh = x.V.middleCols(h * dv, dv), Gh = x.G.middleCols(h * dv, dv);
    const Matrix<double> S = c * Qh * Kh.transpose();
    Matrix<double> A = S.unaryExpr([&](double s) { return p(s); });
    Matrix<double> dA = S.unaryExpr([&](double s) { return dp(s); });
    if (causal) {
      A.triangularView<Eigen::StrictlyUpper>().setZero();
      dA.triangularView<Eigen::StrictlyUpper>().setZero();
    }
    const Eigen::VectorXd inverse_d = A.rowwise().sum().cwiseInverse();
    const Matrix<double> P = inverse_d.asDiagonal() * A;
    const Matrix<double> O = P * Vh;
    const Eigen::VectorXd kappa = O.cwiseProduct(Gh).rowwise().sum();
    Matrix<double> centred = Gh * Vh.transpose();
    centred.colwise() -= kappa;
    const Matrix<double> dS = (inverse_d.asDiagonal() * dA).cwiseProduct(centred);
    r.O.middleCols(h * dv, dv) = O;
    r.dQ.middleCols(h * dk, dk) = c * dS * Kh;
    r.dK.middleCols(h * dk, dk) = c * dS.transpose() * Qh;
    r.dV.middleCols(h * dv, dv) = P.transpose() * Gh;
  }
  return r;
}

}  // namespace

TEST_CASE("AdjointBackend forward equals PolynomialAttention forward and certificate", "[adjoint_gradients]") {
  // Same function computed in the same order up to chunking: agreement to rounding, 1e-12 relative in double.
  const AttentionProblem<double> x = random_problem<double>(23, 3, 4, 1, 11, 1.0);
  for (const bool causal : {false, true})
    for (const Index heads : {1, 3})
      for (const int degree : {2, 4})
        for (const Index chunk : {0, 5}) {
          CAPTURE(causal, heads, degree, chunk);
          PolynomialAttentionOptions opt = adjoint_options(causal, heads, degree, FeatureMapKind::symmetric, chunk);
          opt.estimate_error = true;
          opt.estimate_rows = 7;
          // V has 3 columns: d_v = 3 for one head, 1 for three.
          const Matrix<double> Q = x.Q.leftCols(4 * heads), K = x.K.leftCols(4 * heads);
          AdjointBackend<double> adjoint(opt);
          PolynomialAttention<double> reference(opt);
          Matrix<double> O(23, 3), O_reference(23, 3);
          const Certificate cert = adjoint.forward(Q, K, x.V, O);
          const Certificate cert_reference = reference.forward(Q, K, x.V, O_reference);
          CHECK(relative_error(O, O_reference) < 1e-12);
          CHECK(cert.radius == cert_reference.radius);
          CHECK(cert.interval == cert_reference.interval);
          CHECK(cert.degree == cert_reference.degree);
          CHECK(cert.features == cert_reference.features);
          CHECK(cert.poly_error == cert_reference.poly_error);
          CHECK(cert.positive == cert_reference.positive);
          CHECK(cert.valid == cert_reference.valid);
          CHECK(cert.output_bound == cert_reference.output_bound);
          CHECK(cert.sampled_rows == 7);
          CHECK(cert.sampled_max_error == Approx(cert_reference.sampled_max_error).epsilon(1e-9));
          CHECK(cert.sampled_mean_error == Approx(cert_reference.sampled_mean_error).epsilon(1e-9));
        }
}

namespace {

// backward() differentiates O~ exactly, so central differences of L = <G, O~> agree up to their own truncation and
// rounding error, about 1e-10 relative here (gradient_check.hpp); 1e-7 leaves margin for the conditioning of the
// normaliser without admitting any modelling error (a wrong term is O(1)). n = 11 with chunks 4 (does not divide
// n), 11 (one chunk) and 0 (automatic); d_k = 3, d_v = 2. Four test cases (mask x degree) so that ctest runs them
// side by side.
void check_finite_differences(bool causal, int degree) {
  const Index n = 11, dk = 3, dv = 2;
  for (const Index heads : {1, 2, 3})
    for (const FeatureMapKind map : {FeatureMapKind::symmetric, FeatureMapKind::kronecker})
      for (const Index chunk : {4, 11, 0}) {
        CAPTURE(causal, heads, degree, map == FeatureMapKind::kronecker, chunk);
        const PolynomialAttentionOptions opt = adjoint_options(causal, heads, degree, map, chunk);
        AttentionProblem<double> x =
            random_problem<double>(n, heads, dk, dv, 100 + 7 * static_cast<std::uint64_t>(heads), 1.0);
        AdjointBackend<double> adjoint(opt);
        const AttentionResult<double> r = forward_backward<double>(adjoint, x);
        AdjointBackend<double> evaluator(opt);
        check_attention_gradients(evaluator, x, r, 1e-7);
      }
}

}  // namespace

TEST_CASE("AdjointBackend backward is the gradient of its forward (finite differences), non-causal, degree 2",
          "[adjoint_gradients]") {
  check_finite_differences(false, 2);
}

TEST_CASE("AdjointBackend backward is the gradient of its forward (finite differences), non-causal, degree 4",
          "[adjoint_gradients]") {
  check_finite_differences(false, 4);
}

TEST_CASE("AdjointBackend backward is the gradient of its forward (finite differences), causal, degree 2",
          "[adjoint_gradients]") {
  check_finite_differences(true, 2);
}

TEST_CASE("AdjointBackend backward is the gradient of its forward (finite differences), causal, degree 4",
          "[adjoint_gradients]") {
  check_finite_differences(true, 4);
}

TEST_CASE("AdjointBackend differentiates a minimax polynomial with a fixed interval", "[adjoint_gradients]") {
  // With radius > 0 the polynomial is fixed (not re-fitted to each perturbed input), so O~ is a smooth
  // function of Q, K, V and the same 1e-7 finite-difference tolerance applies. q, k ~ N(0, 0.6^2) with
  // d_k = 3 keep R = c max|q| max|k| near 2, inside [-4, 4] (checked by the certificate's `valid`).
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    PolynomialAttentionOptions opt = adjoint_options(causal, 2, 4, FeatureMapKind::symmetric, 3);
    opt.kind = PolynomialKind::minimax;
    opt.radius = 4;
    AttentionProblem<double> x = random_problem<double>(9, 2, 3, 2, 300, 0.6);
    AdjointBackend<double> adjoint(opt);
    const AttentionResult<double> r = forward_backward<double>(adjoint, x);
    REQUIRE(r.certificate.valid);
    AdjointBackend<double> evaluator(opt);
    check_attention_gradients(evaluator, x, r, 1e-7);
  }
}

TEST_CASE("AdjointBackend equals the dense gradient of the approximate function for every chunk size",
          "[adjoint_gradients]") {
  // The scans (prefix state, suffix state, in-chunk block) against the masked n x n formulas: the same
  // numbers summed in a different order, so 1e-12 relative in double. Chunk sizes 1, 4, 7 do not divide
  // n = 30; 5 and 30 do. The causal backward runs with the forward's prefix-state checkpoints and, with a
  // zero memory budget, with the prefix scan that recomputes them.
  const Index n = 30, heads = 2;
  const AttentionProblem<double> x = random_problem<double>(n, heads, 4, 3, 500, 1.0);
  for (const bool causal : {false, true})
    for (const bool checkpoint : {true, false})
      for (const int degree : {2, 4})
        for (const Index chunk : {1, 4, 5, 7, 30}) {
          CAPTURE(causal, checkpoint, degree, chunk);
          polyattn::PolynomialAttentionOptions opt =
              adjoint_options(causal, heads, degree, FeatureMapKind::symmetric, chunk);
          if (!checkpoint) opt.max_checkpoint_bytes = 0;
          AdjointBackend<double> adjoint(opt);
          const AttentionResult<double> r = forward_backward<double>(adjoint, x);
          CHECK(adjoint.checkpointed() == (checkpoint || !causal));
          const AttentionResult<double> dense = dense_adjoint(x, polyattn::taylor_exp(degree), 0.5, causal, heads);
          CHECK(relative_error(r.O, dense.O) < 1e-12);
          CHECK(relative_error(r.dQ, dense.dQ) < 1e-12);
          CHECK(relative_error(r.dK, dense.dK) < 1e-12);
          CHECK(relative_error(r.dV, dense.dV) < 1e-12);
        }
}

TEST_CASE("AdjointBackend against exact gradients within the certified bounds", "[adjoint_gradients]") {
  // Bounded-entry regime: q, k ~ N(0, 0.3^2) with d_k = 4 and c = 1/2 give R = c max|q| max|k| ~ 0.5, and
  // degree 4 certifies eps ~ R^5/5! e^R. The tolerance is the derived bound itself (file docs of
  // adjoint_gradients.hpp): every entry of dQ~ - dQ, dK~ - dK, dV~ - dV within dq_bound, dk_bound,
  // dv_bound, and O~ - O within the forward output_bound. Rounding (~1e-15) is negligible against them.
  const Index n = 40;
  for (const bool causal : {false, true})
    for (const Index heads : {1, 2}) {
      CAPTURE(causal, heads);
      const AttentionProblem<double> x = random_problem<double>(n, heads, 4, 3, 700, 0.3);
      AdjointBackend<double> adjoint(adjoint_options(causal, heads, 4, FeatureMapKind::symmetric, 16));
      const AttentionResult<double> r = forward_backward<double>(adjoint, x);
      REQUIRE(!r.certificate.vacuous());
      REQUIRE(r.gradient.forward.poly_error == r.certificate.poly_error);
      REQUIRE(r.gradient.derivative_error > r.certificate.poly_error);
      REQUIRE(r.gradient.dqk_bound == std::max(r.gradient.dq_bound, r.gradient.dk_bound));
      REQUIRE(std::isfinite(r.gradient.dqk_bound));
      REQUIRE(std::isfinite(r.gradient.dv_bound));
      Matrix<double> O(n, heads * 3), dQ(n, heads * 4), dK(n, heads * 4), dV(n, heads * 3);
      O = polyattn::attention_reference(x.Q, x.K, x.V, polyattn::AttentionOptions{0.5, causal, heads});
      polyattn::attention_backward_reference<double>(x.Q, x.K, x.V, x.G, {0.5, causal, heads}, dQ, dK, dV);
      CHECK((r.O - O).cwiseAbs().maxCoeff() <= r.certificate.output_bound);
      CHECK((r.dQ - dQ).cwiseAbs().maxCoeff() <= r.gradient.dq_bound);
      CHECK((r.dK - dK).cwiseAbs().maxCoeff() <= r.gradient.dk_bound);
      CHECK((r.dV - dV).cwiseAbs().maxCoeff() <= r.gradient.dv_bound);
      // The approximation is real but small: a bound of 0 or a copy of the exact gradient would fail here.
      CHECK(relative_error(r.dQ, dQ) > 0);
      CHECK(relative_error(r.dQ, dQ) < 1e-2);
    }
}

TEST_CASE("AdjointBackend gradient bounds are infinite when the forward certificate is vacuous",
          "[adjoint_gradients]") {
  // q, k ~ N(0, 2^2): R far beyond where degree 2 has eps < 1.
  const AttentionProblem<double> x = random_problem<double>(12, 1, 4, 2, 800, 2.0);
  AdjointBackend<double> adjoint(adjoint_options(false, 1, 2, FeatureMapKind::symmetric, 0));
  const AttentionResult<double> r = forward_backward<double>(adjoint, x);
  REQUIRE(r.certificate.vacuous());
  CHECK(std::isinf(r.gradient.dq_bound));
  CHECK(std::isinf(r.gradient.dk_bound));
  CHECK(std::isinf(r.gradient.dqk_bound));
  CHECK(std::isinf(r.gradient.dv_bound));
}

TEST_CASE("AdjointBackend in float agrees with double", "[adjoint_gradients]") {
  // Float rounding of O(n r d) sums of O(1) terms: ~1e-6 relative, conditioned by the normaliser; 1e-4.
  const Index n = 100;
  const AttentionProblem<double> x = random_problem<double>(n, 2, 8, 8, 900, 0.5);
  const AttentionProblem<float> xf{x.Q.cast<float>(), x.K.cast<float>(), x.V.cast<float>(), x.G.cast<float>()};
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const PolynomialAttentionOptions opt = adjoint_options(causal, 2, 2, FeatureMapKind::symmetric, 0);
    AdjointBackend<double> adjoint(opt);
    AdjointBackend<float> adjoint_float(opt);
    const AttentionResult<double> r = forward_backward<double>(adjoint, x);
    const AttentionResult<float> rf = forward_backward<float>(adjoint_float, xf);
    CHECK(relative_error(rf.O, r.O) < 1e-4);
    CHECK(relative_error(rf.dQ, r.dQ) < 1e-4);
    CHECK(relative_error(rf.dK, r.dK) < 1e-4);
    CHECK(relative_error(rf.dV, r.dV) < 1e-4);
  }
}

TEST_CASE("AdjointBackend reuses its workspaces across shapes", "[adjoint_gradients]") {
  // One object through n = 17, then n = 9 and back: each call must match a fresh object exactly.
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const PolynomialAttentionOptions opt = adjoint_options(causal, 1, 2, FeatureMapKind::symmetric, 5);
    AdjointBackend<double> reused(opt);
    for (const Index n : {17, 9, 17}) {
      const AttentionProblem<double> x = random_problem<double>(n, 1, 3, 2, 1000 + static_cast<std::uint64_t>(n), 1.0);
      AdjointBackend<double> fresh(opt);
      const AttentionResult<double> a = forward_backward<double>(reused, x);
      const AttentionResult<double> b = forward_backward<double>(fresh, x);
      CHECK(a.O == b.O);
      CHECK(a.dQ == b.dQ);
      CHECK(a.dK == b.dK);
      CHECK(a.dV == b.dV);
    }
  }
}

TEST_CASE("AdjointBackend through the backend interface", "[adjoint_gradients]") {
  std::unique_ptr<AttentionBackend<double>> backend =
      std::make_unique<AdjointBackend<double>>(adjoint_options(true, 1, 2, FeatureMapKind::symmetric, 0));
  CHECK(backend->method() == AttentionMethod::adjoint);
  const AttentionProblem<double> x = random_problem<double>(6, 1, 2, 2, 1100, 1.0);
  const AttentionResult<double> r = forward_backward<double>(*backend, x);
  CHECK(r.dQ.allFinite());
  CHECK(r.dK.allFinite());
  CHECK(r.dV.allFinite());
}

TEST_CASE("AdjointBackend rejects bad input naming the argument", "[adjoint_gradients]") {
  const Index n = 6;
  const AttentionProblem<double> x = random_problem<double>(n, 1, 3, 2, 1200, 1.0);
  Matrix<double> O(n, 2), dQ(n, 3), dK(n, 3), dV(n, 2);
  AdjointBackend<double> adjoint(adjoint_options(false, 1, 2, FeatureMapKind::symmetric, 0));

  CHECK_THROWS_WITH(adjoint.backward(x.Q, x.K, x.V, O, x.G, dQ, dK, dV), Contains("call forward() first"));
  CHECK_THROWS_AS(adjoint.backward(x.Q, x.K, x.V, O, x.G, dQ, dK, dV), std::invalid_argument);

  Matrix<double> wrong_O(n, 3);
  CHECK_THROWS_WITH(adjoint.forward(x.Q, x.K, x.V, wrong_O), Contains("'O'"));
  CHECK_THROWS_WITH(adjoint.forward(x.Q, x.K.topRows(n - 1), x.V, O), Contains("'V'"));
  Matrix<double> empty_O(0, 2);
  CHECK_THROWS_WITH(adjoint.forward(Matrix<double>(0, 3), x.K, x.V, empty_O), Contains("'Q'"));
  Matrix<double> bad_Q = x.Q;
  bad_Q(2, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(adjoint.forward(bad_Q, x.K, x.V, O), Contains("'Q'") && Contains("non-finite"));

  adjoint.forward(x.Q, x.K, x.V, O);
  CHECK_THROWS_WITH(adjoint.backward(x.Q, x.K, x.V, O, x.G.leftCols(1), dQ, dK, dV), Contains("'G'"));
  Matrix<double> bad_G = x.G;
  bad_G(0, 0) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(adjoint.backward(x.Q, x.K, x.V, O, bad_G, dQ, dK, dV), Contains("'G'") && Contains("non-finite"));
  CHECK_THROWS_AS(adjoint.backward(x.Q, x.K, x.V, O, bad_G, dQ, dK, dV), std::invalid_argument);
  // The backward pass finds non-finite inputs through the passes of its bounds, and still names the entry.
  for (const char* name : {"Q", "K", "V", "O"}) {
    Matrix<double> Qn = x.Q, Kn = x.K, Vn = x.V, On = O;
    Matrix<double>& bad = name[0] == 'Q' ? Qn : name[0] == 'K' ? Kn : name[0] == 'V' ? Vn : On;
    bad(3, 1) = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_WITH(adjoint.backward(Qn, Kn, Vn, On, x.G, dQ, dK, dV),
                      Contains(std::string("'") + name + "'") && Contains("non-finite") && Contains("(3, 1)"));
  }
  Matrix<double> wrong_dQ(n, 2), wrong_dK(n + 1, 3), wrong_dV(n, 3);
  CHECK_THROWS_WITH(adjoint.backward(x.Q, x.K, x.V, O, x.G, wrong_dQ, dK, dV), Contains("'dQ'"));
  CHECK_THROWS_WITH(adjoint.backward(x.Q, x.K, x.V, O, x.G, dQ, wrong_dK, dV), Contains("'dK'"));
  CHECK_THROWS_WITH(adjoint.backward(x.Q, x.K, x.V, O, x.G, dQ, dK, wrong_dV), Contains("'dV'"));
  const AttentionProblem<double> longer = random_problem<double>(n + 2, 1, 3, 2, 1300, 1.0);
  Matrix<double> longer_O(n + 2, 2), longer_dQ(n + 2, 3), longer_dK(n + 2, 3), longer_dV(n + 2, 2);
  CHECK_THROWS_WITH(adjoint.backward(longer.Q, longer.K, longer.V, longer_O, longer.G, longer_dQ, longer_dK,
                                     longer_dV),
                    Contains("shapes of the last forward()"));

  PolynomialAttentionOptions bad = adjoint_options(false, 1, -1, FeatureMapKind::symmetric, 0);
  CHECK_THROWS_WITH(AdjointBackend<double>(bad), Contains("'degree'"));
  bad = adjoint_options(false, 1, 2, FeatureMapKind::symmetric, -3);
  CHECK_THROWS_WITH(AdjointBackend<double>(bad), Contains("'chunk_size'"));
  bad = adjoint_options(false, 0, 2, FeatureMapKind::symmetric, 0);
  CHECK_THROWS_WITH(AdjointBackend<double>(bad), Contains("'heads'"));
  bad = adjoint_options(false, 2, 2, FeatureMapKind::symmetric, 0);
  AdjointBackend<double> two_heads(bad);
  CHECK_THROWS_WITH(two_heads.forward(x.Q, x.K, x.V, O), Contains("'heads'"));

  PolynomialAttentionOptions strict = adjoint_options(false, 1, 2, FeatureMapKind::symmetric, 0);
  strict.radius = 0.01;
  strict.range_policy = polyattn::RangePolicy::throw_error;
  AdjointBackend<double> strict_adjoint(strict);
  CHECK_THROWS_AS(strict_adjoint.forward(x.Q, x.K, x.V, O), std::domain_error);
}

TEST_CASE("AdjointBackend rejects a polynomial that is not positive on the scores", "[adjoint_gradients]") {
  // Degree 1 (1 + x) is negative for scores below -1: the normaliser of some row is not positive.
  Matrix<double> Q = Matrix<double>::Constant(3, 2, 2.0), K = -Matrix<double>::Constant(3, 2, 2.0);
  const Matrix<double> V = random_matrix<double>(3, 2, 1400);
  Matrix<double> O(3, 2);
  for (const bool causal : {false, true}) {
    AdjointBackend<double> adjoint(adjoint_options(causal, 1, 1, FeatureMapKind::symmetric, 0));
    CHECK_THROWS_AS(adjoint.forward(Q, K, V, O), std::domain_error);
  }
}

TEST_CASE("AdjointBackend rejects outputs overlapping inputs or each other", "[adjoint_gradients][aliasing]") {
  const Index n = 16, d = 4;
  Matrix<double> Q = random_matrix<double>(n, d, 90), K = random_matrix<double>(n, d, 91),
                 V = random_matrix<double>(n, d, 92), G = random_matrix<double>(n, d, 93);
  PolynomialAttentionOptions opt;
  opt.degree = 4;
  opt.estimate_error = true;
  AdjointBackend<double> attn(opt);
  Matrix<double> O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  REQUIRE_THROWS_AS(attn.forward(Q, K, V, Q), std::invalid_argument);
  REQUIRE_THROWS_WITH(attn.forward(Q, K, V, Q),
                      Contains("polyattn::AdjointBackend::forward") && Contains("'O'") && Contains("'Q'"));
  REQUIRE_THROWS_WITH(attn.forward(Q, K, V, V), Contains("'O'") && Contains("'V'"));
  attn.forward(Q, K, V, O);
  const std::string where = "polyattn::AdjointBackend::backward";
  REQUIRE_THROWS_AS(attn.backward(Q, K, V, O, G, Q, dK, dV), std::invalid_argument);
  REQUIRE_THROWS_WITH(attn.backward(Q, K, V, O, G, Q, dK, dV), Contains(where) && Contains("'dQ'") && Contains("'Q'"));
  REQUIRE_THROWS_WITH(attn.backward(Q, K, V, O, G, dQ, K, dV), Contains(where) && Contains("'dK'") && Contains("'K'"));
  REQUIRE_THROWS_WITH(attn.backward(Q, K, V, O, G, dQ, dK, G), Contains(where) && Contains("'dV'") && Contains("'G'"));
  REQUIRE_THROWS_WITH(attn.backward(Q, K, V, O, G, dQ, dK, dK), Contains("'dK'") && Contains("'dV'"));
  REQUIRE(Q == random_matrix<double>(n, d, 90));
  REQUIRE(K == random_matrix<double>(n, d, 91));
}

TEST_CASE("AdjointBackend reports overflow of finite input clearly", "[adjoint_gradients][overflow]") {
  const Index n = 16, d = 4;
  const Matrix<float> V = random_matrix<float>(n, d, 94), huge = Matrix<float>::Constant(n, d, 1e30f);
  Matrix<float> O(n, d);
  for (const bool causal : {false, true}) {
    PolynomialAttentionOptions opt;
    opt.attention.causal = causal;
    AdjointBackend<float> attn(opt);
    REQUIRE_THROWS_AS(attn.forward(huge, huge, V, O), std::domain_error);
    REQUIRE_THROWS_WITH(attn.forward(huge, huge, V, O), Contains("polyattn::AdjointBackend::forward") &&
                                                            Contains("overflowed float") && Contains("score radius"));
    const Matrix<float> Q = random_matrix<float>(n, d, 95), Vbig = Matrix<float>::Constant(n, d, 1e38f);
    REQUIRE_THROWS_WITH(attn.forward(Q, Q, Vbig, O), Contains("AdjointBackend::forward") && Contains("max |V|"));
    opt.radius = 1;
    opt.range_policy = polyattn::RangePolicy::raise_degree;
    AdjointBackend<float> raising(opt);
    REQUIRE_THROWS_AS(raising.forward(huge, huge, V, O), std::domain_error);
    REQUIRE_THROWS_WITH(raising.forward(huge, huge, V, O),
                        Contains("AdjointBackend::forward") && Contains("score radius") && Contains("raise_degree"));
  }
  PolynomialAttentionOptions opt;
  opt.max_features = std::numeric_limits<Index>::max();
  opt.degree = 40;
  AdjointBackend<float> wide(opt);
  const Matrix<float> Q = random_matrix<float>(n, 64, 96, 0.1);
  Matrix<float> O_wide(n, 64);
  REQUIRE_THROWS_WITH(wide.forward(Q, Q, Q, O_wide),
                      Contains("AdjointBackend::forward") && Contains("'degree'") && Contains("max_feature_width"));
}

namespace {

using polyattn::testing::padded_row_major;

template <class T>
void check_row_major_is_bitwise_column_major() {
  polyattn::testing::ThreadCountGuard guard;
  const Index dk = 4, dv = 3;
  for (const bool causal : {false, true})
    for (const Index heads : {1, 3})
      for (const Index window : {0, 3})
        for (const Index chunk : {0, 32})
          for (const Index n : {1, 70, 300}) {
            CAPTURE(causal, heads, window, chunk, n);
            PolynomialAttentionOptions opt = adjoint_options(causal, heads, 2, FeatureMapKind::symmetric, chunk);
            opt.exact_window = window;
            const AttentionProblem<T> x =
                random_problem<T>(n, heads, dk, dv, 1400 + static_cast<std::uint64_t>(n), 0.7);
            const Matrix<T> O = polyattn::testing::check_row_major_is_bitwise<T>(
                [&] { return AdjointBackend<T>(opt); }, x.Q, x.K, x.V, x.G);
            // PolynomialAttention's forward pass gives the same output, on either layout.
            polyattn::set_num_threads(1);
            Matrix<T> O_forward(n, heads * dv);
            PolynomialAttention<T>(opt).forward(x.Q, x.K, x.V, O_forward);
            CHECK(O_forward == O);
            for (const int threads : {1, 2, 3}) {
              CAPTURE(threads);
              polyattn::set_num_threads(threads);
              auto O_rows = padded_row_major(Matrix<T>::Zero(n, heads * dv).eval(), 0);
              PolynomialAttention<T>(opt).forward(padded_row_major(x.Q, 2).leftCols(heads * dk),
                                                  padded_row_major(x.K, 1).leftCols(heads * dk),
                                                  padded_row_major(x.V, 3).leftCols(heads * dv), O_rows);
              CHECK(Matrix<T>(O_rows) == O);
            }
          }
}

}  // namespace

TEST_CASE("Row-major matrices are read and written in place, bitwise as column-major ones", "[adjoint_gradients]") {
  check_row_major_is_bitwise_column_major<float>();
  check_row_major_is_bitwise_column_major<double>();
}

namespace {

// Serially without an exact window, the kernel takes the inputs' maxima for the gradient bounds from the blocks it
// reads; with a state exchange (here of one rank) the backend measures them in passes of its own. The gradients and
// every bound must be the same, bitwise, certificate vacuous or not, on either layout and any thread count.
template <class T>
void check_kernel_measured_bounds() {
  polyattn::testing::ThreadCountGuard guard;
  for (const bool causal : {false, true})
    for (const Index heads : {Index(1), Index(3)})
      for (const Index n : {Index(1), Index(37), Index(300)})
        for (const double sigma : {0.2, 2.0}) {
          const PolynomialAttentionOptions opt = adjoint_options(causal, heads, 2, FeatureMapKind::symmetric, 0);
          const AttentionProblem<T> x = random_problem<T>(n, heads, 4, 3, 1600 + static_cast<std::uint64_t>(n), sigma);
          polyattn::set_num_threads(1);
          AdjointBackend<T> passes(opt);
          passes.set_state_exchange(std::make_shared<polyattn::testing::SingleRankExchange>());
          Matrix<T> O(n, heads * 3), dQ(n, heads * 4), dK(n, heads * 4), dV(n, heads * 3);
          passes.forward(x.Q, x.K, x.V, O);
          const GradientCertificate expected = passes.backward(x.Q, x.K, x.V, O, x.G, dQ, dK, dV);
          REQUIRE(expected.forward.vacuous() == (sigma > 1));  // both kinds of certificate are covered
          for (const int threads : {1, 2, 3}) {
            CAPTURE(causal, heads, n, sigma, threads, expected.forward.vacuous());
            polyattn::set_num_threads(threads);
            AdjointBackend<T> measured(opt);
            Matrix<T> O2(n, heads * 3), dQ2(n, heads * 4), dK2(n, heads * 4), dV2(n, heads * 3);
            measured.forward(x.Q, x.K, x.V, O2);
            const GradientCertificate cert = measured.backward(x.Q, x.K, x.V, O2, x.G, dQ2, dK2, dV2);
            CHECK(O2 == O);
            CHECK(dQ2 == dQ);
            CHECK(dK2 == dK);
            CHECK(dV2 == dV);
            CHECK(cert.forward.radius == expected.forward.radius);
            CHECK(cert.forward.output_bound == expected.forward.output_bound);
            CHECK(cert.dq_bound == expected.dq_bound);
            CHECK(cert.dk_bound == expected.dk_bound);
            CHECK(cert.dqk_bound == expected.dqk_bound);
            CHECK(cert.dv_bound == expected.dv_bound);
            const polyattn::RowMajorMatrix<T> Qr = x.Q, Kr = x.K, Vr = x.V, Gr = x.G;
            polyattn::RowMajorMatrix<T> Or(n, heads * 3), dQr(n, heads * 4), dKr(n, heads * 4), dVr(n, heads * 3);
            AdjointBackend<T> rows(opt);
            rows.forward(Qr, Kr, Vr, Or);
            const GradientCertificate row_cert = rows.backward(Qr, Kr, Vr, Or, Gr, dQr, dKr, dVr);
            CHECK(row_cert.dq_bound == expected.dq_bound);
            CHECK(row_cert.dv_bound == expected.dv_bound);
          }
        }
}

}  // namespace

TEST_CASE("the gradient bounds measured by the kernel are those of the input passes, bitwise",
          "[adjoint_gradients]") {
  check_kernel_measured_bounds<float>();
  check_kernel_measured_bounds<double>();
}

// Non-finite input on the kernel-measured backward path: the call is redone on the checked path, which names it.
TEST_CASE("non-finite backward input on the kernel-measured path names the entry", "[adjoint_gradients]") {
  for (const bool causal : {false, true}) {
    const AttentionProblem<double> x = random_problem<double>(40, 1, 3, 2, 1700, 0.5);
    AdjointBackend<double> adjoint(adjoint_options(causal, 1, 2, FeatureMapKind::symmetric, 0));
    Matrix<double> O(40, 2), dQ(40, 3), dK(40, 3), dV(40, 2);
    adjoint.forward(x.Q, x.K, x.V, O);
    for (const char* name : {"Q", "K", "V", "O", "G"})
      for (const double bad : {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
        CAPTURE(causal, name, bad);
        Matrix<double> Q = x.Q, K = x.K, V = x.V, O_bad = O, G = x.G;
        const std::string which = name;
        (which == "Q" ? Q : which == "K" ? K : which == "V" ? V : which == "O" ? O_bad : G)(33, 1) = bad;
        CHECK_THROWS_WITH(adjoint.backward(Q, K, V, O_bad, G, dQ, dK, dV),
                          Contains("AdjointBackend::backward") && Contains("'" + which + "'") && Contains("(33, 1)"));
      }
  }
}

TEST_CASE("AdjointBackend on row-major matrices names bad arguments as the column-major call does",
          "[adjoint_gradients]") {
  using RowMajor = polyattn::RowMajorMatrix<double>;
  const Index n = 6;
  const AttentionProblem<double> x = random_problem<double>(n, 1, 3, 2, 1500, 1.0);
  const RowMajor Q = x.Q, K = x.K, V = x.V, G = x.G;
  RowMajor O(n, 2), dQ(n, 3), dK(n, 3), dV(n, 2);
  AdjointBackend<double> adjoint(adjoint_options(true, 1, 2, FeatureMapKind::symmetric, 0));
  CHECK_THROWS_WITH(adjoint.backward(Q, K, V, O, G, dQ, dK, dV), Contains("call forward() first"));
  RowMajor bad_Q = Q;
  bad_Q(4, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(adjoint.forward(bad_Q, K, V, O),
                    Contains("AdjointBackend::forward") && Contains("'Q'") && Contains("(4, 1)"));
  RowMajor wrong_O(n, 3);
  CHECK_THROWS_WITH(adjoint.forward(Q, K, V, wrong_O), Contains("'O'") && Contains("6x2"));
  RowMajor shared(n, 5);
  shared.leftCols(3) = Q;
  CHECK_THROWS_WITH(adjoint.forward(shared.leftCols(3), K, V, shared.rightCols(3).leftCols(2)),
                    Contains("'O'") && Contains("'Q'"));
  adjoint.forward(Q, K, V, O);
  RowMajor bad_G = G;
  bad_G(5, 0) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(adjoint.backward(Q, K, V, O, bad_G, dQ, dK, dV), Contains("'G'") && Contains("(5, 0)"));
  CHECK_THROWS_WITH(adjoint.backward(Q, K, V, O, G, dQ, dK, dQ), Contains("'dV'"));
}
