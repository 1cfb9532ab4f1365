// The exact window (PolynomialAttentionOptions::exact_window): PolynomialAttention and AdjointBackend against the
// dense formula (exp on the window's pairs, p elsewhere, one normaliser) and the adjoint gradient against finite
// differences of the windowed forward, causal and non-causal; large scores in float; what the certificate covers;
// the refusals. Thread counts: test_parallel_attention.cpp.
#include <polyattn/attention/adjoint_gradients.hpp>
#include <polyattn/attention/exact_gradients.hpp>
#include <polyattn/attention/paper_gradients.hpp>
#include <polyattn/nn/gpt.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

using Catch::Contains;
using polyattn::AdjointBackend;
using polyattn::Certificate;
using polyattn::GradientCertificate;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::PolynomialAttention;
using polyattn::PolynomialAttentionOptions;
using polyattn::testing::check_attention_gradients;
using polyattn::testing::AttentionProblem;
using polyattn::testing::AttentionResult;
using polyattn::testing::forward_backward;
using polyattn::testing::random_matrix;
using polyattn::testing::random_problem;
using polyattn::testing::relative_error;

namespace {

PolynomialAttentionOptions window_options(bool causal, Index heads, int degree, Index chunk, Index window) {
  PolynomialAttentionOptions opt;
  opt.attention.causal = causal;
  opt.attention.heads = heads;
  opt.attention.scale = 0.5;
  opt.degree = degree;
  opt.chunk_size = chunk;
  opt.exact_window = window;
  return opt;
}

// Whether query i and key j are a pair of the window.
bool near(Index i, Index j, Index window, bool causal) {
  return causal ? (i >= j && i - j < window) : std::abs(i - j) < window;
}

// The windowed function and its gradient written densely, independently of the kernel: per head
// A = exp(S) on the window's pairs, p(S) on the other unmasked pairs, 0 on masked ones; A' likewise with exp and
// p'; D = A 1, O = D^{-1} A V, kappa = rowsum(G o O), dS = (D^{-1} A') o (G V^T - kappa 1^T),
// dQ = c dS K, dK = c dS^T Q, dV = (D^{-1} A)^T G.
AttentionResult<double> dense_window(const AttentionProblem<double>& x, const polyattn::Polynomial& p, double c,
                                     bool causal, Index heads, Index window) {
  const Index dk = x.Q.cols() / heads, dv = x.V.cols() / heads, n = x.Q.rows();
  const polyattn::Polynomial dp = p.derivative();
  AttentionResult<double> r{Matrix<double>(n, x.V.cols()), Matrix<double>(n, x.Q.cols()),
                            Matrix<double>(n, x.K.cols()), Matrix<double>(n, x.V.cols()), {}, {}};
  for (Index h = 0; h < heads; ++h) {
    const Matrix<double> Qh = x.Q.middleCols(h * dk, dk), Kh = x.K.middleCols(h * dk, dk);
    const Matrix<double> Vh = x.V.middleCols(h * dv, dv), Gh = x.G.middleCols(h * dv, dv);
    const Matrix<double> S = c * Qh * Kh.transpose();
    Matrix<double> A = Matrix<double>::Zero(n, n), dA = Matrix<double>::Zero(n, n);
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < n; ++j) {
        if (causal && j > i) continue;
        const bool exact = near(i, j, window, causal);
        A(i, j) = exact ? std::exp(S(i, j)) : p(S(i, j));
        dA(i, j) = exact ? std::exp(S(i, j)) : dp(S(i, j));
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

TEST_CASE("exact window: forward and adjoint gradient equal the dense formula", "[exact_window]") {
  // The same sums in another order: 1e-12 relative in double. n = 30 with chunks 4 (the causal prefix state lags
  // by up to 8 chunks; non-causal tiles of 4 rows), 7 (does not divide n) and 0 (automatic: one chunk); windows 1
  // (the diagonal), 3, 9 (across chunks), 30 (every pair) and 45 (more than n). The causal backward also runs
  // without checkpoints and with one chunk per scan window, which moves the lag across scan windows.
  const Index n = 30, heads = 2;
  const AttentionProblem<double> x = random_problem<double>(n, heads, 4, 3, 500, 1.0);
  for (const bool causal : {false, true})
    for (const Index window : {1, 3, 9, 30, 45})
      for (const Index chunk : {4, 7, 0})
        for (const bool checkpoint : {true, false}) {
          if (!causal && !checkpoint) continue;
          CAPTURE(causal, window, chunk, checkpoint);
          PolynomialAttentionOptions opt = window_options(causal, heads, 2, chunk, window);
          if (!checkpoint) {
            opt.max_checkpoint_bytes = 0;
            opt.scan_window_bytes = 1;
          }
          AdjointBackend<double> adjoint(opt);
          const AttentionResult<double> r = forward_backward<double>(adjoint, x);
          const AttentionResult<double> dense = dense_window(x, polyattn::taylor_exp(2), 0.5, causal, heads, window);
          CHECK(relative_error(r.O, dense.O) < 1e-12);
          CHECK(relative_error(r.dQ, dense.dQ) < 1e-12);
          CHECK(relative_error(r.dK, dense.dK) < 1e-12);
          CHECK(relative_error(r.dV, dense.dV) < 1e-12);
          // PolynomialAttention runs the same forward pass.
          PolynomialAttention<double> forward_only(opt);
          Matrix<double> O(n, x.V.cols());
          forward_only.forward(x.Q, x.K, x.V, O);
          CHECK(O == r.O);
        }
}

TEST_CASE("exact window 0 is the polynomial method; a window changes the result", "[exact_window]") {
  // w = 0 runs the code of the plain method; a window of 1 already replaces p by exp on the diagonal.
  const AttentionProblem<double> x = random_problem<double>(21, 1, 3, 2, 600, 1.0);
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    AdjointBackend<double> plain(window_options(causal, 1, 4, 5, 0)), windowed(window_options(causal, 1, 4, 5, 1));
    const AttentionResult<double> a = forward_backward<double>(plain, x), b = forward_backward<double>(windowed, x);
    const AttentionResult<double> dense = dense_window(x, polyattn::taylor_exp(4), 0.5, causal, 1, 0);
    CHECK(relative_error(a.O, dense.O) < 1e-12);
    CHECK(relative_error(a.dQ, dense.dQ) < 1e-12);
    CHECK(relative_error(b.O, a.O) > 1e-6);
    CHECK(a.certificate.exact_window == 0);
    CHECK(a.certificate.far_radius == a.certificate.radius);
    CHECK(b.certificate.exact_window == 1);
  }
}

TEST_CASE("exact window: the adjoint gradient is the gradient of the windowed forward (finite differences)",
          "[exact_window]") {
  // Central differences of L = <G, O~> in double: 1e-7 relative (see test_adjoint_gradients.cpp).
  const Index n = 11, heads = 2;
  for (const bool causal : {false, true})
    for (const Index window : {1, 3, 6})
      for (const int degree : {2, 4}) {
        CAPTURE(causal, window, degree);
        const PolynomialAttentionOptions opt = window_options(causal, heads, degree, 4, window);
        AttentionProblem<double> x =
            random_problem<double>(n, heads, 3, 2, 700 + static_cast<std::uint64_t>(window), 1.0);
        AdjointBackend<double> adjoint(opt);
        const AttentionResult<double> r = forward_backward<double>(adjoint, x);
        PolynomialAttention<double> evaluator(opt);
        check_attention_gradients(evaluator, x, r, 1e-7);
      }
}

TEST_CASE("exact window: scores beyond float's exp range stay finite and accurate", "[exact_window][overflow]") {
  // q_i, k_j of norm 10 at random angles (d = 2, c = 1): scores in [-100, 100]. exp(100) overflows float, and so
  // would e^{100} times a far sum in a shift by the near maximum alone (near scores near -100). Against the double
  // kernel: float rounds the scores to ~1e-5 absolute, the weights to ~1e-5 relative, so 1e-4.
  REQUIRE(!std::isfinite(std::exp(100.0f)));
  const Index n = 40;
  Matrix<double> Q(n, 2), K(n, 2);
  const Matrix<double> angles = random_matrix<double>(n, 2, 800, 3.0);
  for (Index i = 0; i < n; ++i) {
    Q.row(i) << 10 * std::cos(angles(i, 0)), 10 * std::sin(angles(i, 0));
    K.row(i) << 10 * std::cos(angles(i, 1)), 10 * std::sin(angles(i, 1));
  }
  // Rows 0..4: near scores of about +100 (k_i = q_i) and, for row 5..9, about -100 (k_i = -q_i).
  for (Index i = 0; i < 5; ++i) K.row(i) = Q.row(i);
  for (Index i = 5; i < 10; ++i) K.row(i) = -Q.row(i);
  const AttentionProblem<double> x{Q, K, random_matrix<double>(n, 3, 801), random_matrix<double>(n, 3, 802)};
  const AttentionProblem<float> xf{Q.cast<float>(), K.cast<float>(), x.V.cast<float>(), x.G.cast<float>()};
  for (const bool causal : {false, true})
    for (const Index window : {1, 4, 16}) {
      CAPTURE(causal, window);
      PolynomialAttentionOptions opt = window_options(causal, 1, 2, 8, window);
      opt.attention.scale = 1.0;
      AdjointBackend<double> reference(opt);
      AdjointBackend<float> single(opt);
      const AttentionResult<double> r = forward_backward<double>(reference, x);
      const AttentionResult<float> rf = forward_backward<float>(single, xf);
      REQUIRE(r.certificate.radius == Approx(100).epsilon(1e-12));
      CHECK(rf.O.allFinite());
      CHECK(relative_error(rf.O, r.O) < 1e-4);
      CHECK(relative_error(rf.dQ, r.dQ) < 1e-4);
      CHECK(relative_error(rf.dK, r.dK) < 1e-4);
      CHECK(relative_error(rf.dV, r.dV) < 1e-4);
      const AttentionResult<double> dense = dense_window(x, polyattn::taylor_exp(2), 1.0, causal, 1, window);
      CHECK(relative_error(r.O, dense.O) < 1e-12);
      CHECK(relative_error(r.dQ, dense.dQ) < 1e-10);
    }
}

TEST_CASE("exact window: the certificate covers the far pairs and holds", "[exact_window]") {
  // Rows 0..2 of Q and K are 4x larger, so R is large, but with a causal window of 3 they meet each other only
  // inside it; the far pairs have a small radius, where degree 4 is certified. The bounds are checked against exact
  // attention entry by entry, and the sampled estimate (every row) is the true error.
  const Index n = 40, window = 3;
  AttentionProblem<double> x = random_problem<double>(n, 1, 4, 3, 900, 0.25);
  x.Q.topRows(3) *= 4;
  x.K.topRows(3) *= 4;
  PolynomialAttentionOptions opt = window_options(true, 1, 4, 8, window);
  opt.estimate_error = true;
  opt.estimate_rows = n;
  AdjointBackend<double> adjoint(opt);
  const AttentionResult<double> r = forward_backward<double>(adjoint, x);
  const Certificate& cert = r.certificate;
  // The far radius, measured independently: c max over j <= i - w of |q_i| |k_j|.
  double far = 0;
  for (Index i = window; i < n; ++i)
    far = std::max(far, 0.5 * x.Q.row(i).norm() * x.K.topRows(i - window + 1).rowwise().norm().maxCoeff());
  CHECK(cert.far_radius == Approx(far).epsilon(1e-12));
  CHECK(cert.interval == cert.far_radius);
  CHECK(cert.far_radius < cert.radius / 2);
  REQUIRE(!cert.vacuous());
  CHECK(cert.poly_error == polyattn::certify_exp(polyattn::taylor_exp(4), cert.far_radius).relative_error);
  // Without the window the same inputs are certified on the whole radius only, several times more loosely.
  PolynomialAttentionOptions plain_opt = opt;
  plain_opt.exact_window = 0;
  AdjointBackend<double> plain(plain_opt);
  const AttentionResult<double> p = forward_backward<double>(plain, x);
  CHECK(p.certificate.poly_error > 5 * cert.poly_error);

  const polyattn::AttentionOptions exact_opt{0.5, true, 1};
  const Matrix<double> O = polyattn::attention_reference(x.Q, x.K, x.V, exact_opt);
  Matrix<double> dQ(n, 4), dK(n, 4), dV(n, 3);
  polyattn::attention_backward_reference<double>(x.Q, x.K, x.V, x.G, exact_opt, dQ, dK, dV);
  CHECK((r.O - O).cwiseAbs().maxCoeff() <= cert.output_bound);
  CHECK((r.dQ - dQ).cwiseAbs().maxCoeff() <= r.gradient.dq_bound);
  CHECK((r.dK - dK).cwiseAbs().maxCoeff() <= r.gradient.dk_bound);
  CHECK((r.dV - dV).cwiseAbs().maxCoeff() <= r.gradient.dv_bound);
  double worst = 0;
  for (Index i = 0; i < n; ++i) worst = std::max(worst, (r.O.row(i) - O.row(i)).norm() / O.row(i).norm());
  CHECK(cert.sampled_rows == n);
  CHECK(cert.sampled_max_error == Approx(worst).epsilon(1e-9));

  // A window of at least n leaves no far pair: R_far = 0 and the output is exact attention.
  AdjointBackend<double> everything(window_options(true, 1, 4, 8, n));
  const AttentionResult<double> e = forward_backward<double>(everything, x);
  CHECK(e.certificate.far_radius == 0);
  CHECK(relative_error(e.O, O) < 1e-12);
  CHECK(relative_error(e.dQ, dQ) < 1e-12);
}

TEST_CASE("exact window: the range policy applies to the far radius", "[exact_window]") {
  // The same large-diagonal inputs: R exceeds 'radius' = 1.5 but the far radius does not.
  const Index n = 24;
  AttentionProblem<double> x = random_problem<double>(n, 1, 4, 3, 1000, 0.25);
  x.Q.topRows(2) *= 6;
  x.K.topRows(2) *= 6;
  PolynomialAttentionOptions opt = window_options(true, 1, 4, 0, 2);
  opt.radius = 1.5;
  opt.range_policy = polyattn::RangePolicy::throw_error;
  PolynomialAttention<double> windowed(opt);
  Matrix<double> O(n, 3);
  const Certificate cert = windowed.forward(x.Q, x.K, x.V, O);
  REQUIRE(cert.radius > opt.radius);
  CHECK(cert.valid);
  CHECK(cert.interval == opt.radius);
  opt.exact_window = 0;
  PolynomialAttention<double> plain(opt);
  CHECK_THROWS_WITH(plain.forward(x.Q, x.K, x.V, O), Contains("exceeds 'radius'"));
}

TEST_CASE("exact window: a reused object equals a fresh one across shapes", "[exact_window]") {
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const PolynomialAttentionOptions opt = window_options(causal, 1, 2, 5, 6);
    AdjointBackend<double> reused(opt);
    for (const Index n : {17, 4, 17}) {
      const AttentionProblem<double> x = random_problem<double>(n, 1, 3, 2, 1100 + static_cast<std::uint64_t>(n), 1.0);
      AdjointBackend<double> fresh(opt);
      const AttentionResult<double> a = forward_backward<double>(reused, x), b = forward_backward<double>(fresh, x);
      CHECK(a.O == b.O);
      CHECK(a.dQ == b.dQ);
      CHECK(a.dK == b.dK);
      CHECK(a.dV == b.dV);
    }
  }
}

TEST_CASE("exact window: invalid uses are refused naming the option", "[exact_window]") {
  CHECK_THROWS_WITH(AdjointBackend<double>(window_options(false, 1, 2, 0, -1)),
                    Contains("'exact_window'") && Contains(">= 0"));
  // Non-causal attention of other lengths has no diagonal.
  PolynomialAttention<double> windowed(window_options(false, 1, 2, 0, 4));
  const Matrix<double> Q = random_matrix<double>(5, 2, 1200), K = random_matrix<double>(7, 2, 1201);
  const Matrix<double> V = random_matrix<double>(7, 2, 1202);
  Matrix<double> O(5, 2);
  CHECK_THROWS_WITH(windowed.forward(Q, K, V, O), Contains("'exact_window'") && Contains("as many queries as keys"));
  // The paper's gradient evaluates p on every pair.
  CHECK_THROWS_WITH(polyattn::PaperBackend<double>(window_options(true, 1, 2, 0, 4)), Contains("'exact_window'"));
  CHECK_THROWS_AS(
      polyattn::make_attention_backend<double>(polyattn::AttentionMethod::paper, window_options(true, 1, 2, 0, 4)),
      std::invalid_argument);
  // A shard's window would reach into the previous rank's keys.
  AdjointBackend<double> sharded(window_options(true, 1, 2, 0, 4));
  sharded.set_state_exchange(std::make_shared<polyattn::testing::SingleRankExchange>());
  const AttentionProblem<double> x = random_problem<double>(6, 1, 2, 2, 1203, 1.0);
  Matrix<double> O6(6, 2);
  CHECK_THROWS_WITH(sharded.forward(x.Q, x.K, x.V, O6), Contains("'exact_window'") && Contains("state exchange"));
  sharded.set_state_exchange(nullptr);
  CHECK_NOTHROW(sharded.forward(x.Q, x.K, x.V, O6));
}

TEST_CASE("exact window: a GPT checkpoint records the window", "[exact_window]") {
  // The window changes the function the model computes, so a checkpoint stores it (and only when set, so that
  // checkpoints written without it still load).
  polyattn::GPTConfig config;
  config.vocab_size = 8;
  config.context = 8;
  config.d_model = 8;
  config.heads = 2;
  config.layers = 1;
  config.method = polyattn::AttentionMethod::adjoint;
  const auto field = [](polyattn::GPT<float>& model) -> std::string {
    for (const auto& [name, value] : model.checkpoint_fields())
      if (name == "attention.exact_window") return value;
    return "absent";
  };
  polyattn::GPT<float> plain(config);
  CHECK(field(plain) == "absent");
  config.approximation.exact_window = 64;
  polyattn::GPT<float> windowed(config);
  CHECK(field(windowed) == "64");
  const std::vector<Index> tokens{1, 2, 3, 4, 5, 6}, targets{2, 3, 4, 5, 6, 7};
  CHECK(std::isfinite(windowed.forward(tokens, targets)));
  windowed.backward();
}
