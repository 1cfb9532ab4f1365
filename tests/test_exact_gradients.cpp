#include <polyattn/attention/backend_factory.hpp>
#include <polyattn/attention/exact_gradients.hpp>
#include <polyattn/parallel/gathered_keys.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <memory>
#include <initializer_list>
#include <stdexcept>
#include <vector>
#include <string>

using Catch::Contains;
using polyattn::AttentionBackend;
using polyattn::AttentionMethod;
using polyattn::AttentionOptions;
using polyattn::ExactBlockedBackend;
using polyattn::ExactBlockedOptions;
using polyattn::ExactReferenceBackend;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::testing::gradient_error;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

// Random Q, K, V (n x h d_k, m x h d_k, m x h d_v) and upstream gradient G = R of the loss L = <R, O>.
template <class T>
struct ExactProblem {
  Matrix<T> Q, K, V, G;
};

template <class T>
ExactProblem<T> random_exact_problem(Index n, Index m, Index heads, Index dk, Index dv, std::uint64_t seed) {
  return {random_matrix<T>(n, heads * dk, seed), random_matrix<T>(m, heads * dk, seed + 1),
          random_matrix<T>(m, heads * dv, seed + 2), random_matrix<T>(n, heads * dv, seed + 3)};
}

// L = <R, O>: a random linear functional of the output, so dL/dO = R exactly.
double projected_loss(const ExactProblem<double>& x, const AttentionOptions& opt) {
  return (x.G.array() * polyattn::attention_reference(x.Q, x.K, x.V, opt).array()).sum();
}

struct ExactGradients {
  Matrix<double> O, dQ, dK, dV;
};

// forward then backward; the outputs start as NaN so that a backend that reads them instead of overwriting
// them fails.
ExactGradients run(AttentionBackend<double>& backend, const ExactProblem<double>& x) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  ExactGradients g{Matrix<double>::Constant(x.Q.rows(), x.V.cols(), nan),
                   Matrix<double>::Constant(x.Q.rows(), x.Q.cols(), nan),
                   Matrix<double>::Constant(x.K.rows(), x.K.cols(), nan),
                   Matrix<double>::Constant(x.V.rows(), x.V.cols(), nan)};
  backend.forward(x.Q, x.K, x.V, g.O);
  backend.backward(x.Q, x.K, x.V, g.O, x.G, g.dQ, g.dK, g.dV);
  return g;
}

std::unique_ptr<AttentionBackend<double>> make_exact_backend(bool blocked, const AttentionOptions& opt) {
  if (!blocked) return std::make_unique<ExactReferenceBackend<double>>(opt);
  // blocks of 4 x 3 do not divide n = 9 and exercise partial diagonal blocks under the mask
  ExactBlockedOptions blocks;
  blocks.query_block = 4;
  blocks.key_block = 3;
  blocks.forward_query_block = 4;
  blocks.forward_key_block = 5;
  return std::make_unique<ExactBlockedBackend<double>>(opt, blocks);
}

}  // namespace

TEST_CASE("Exact dQ, dK, dV match central finite differences of the exact loss", "[exact_gradients]") {
  // L = <R, O> is analytic in Q, K, V with O(1) derivatives for these O(1) inputs. Central differences with
  // h = 1e-6 have truncation error h^2 L''' / 6 ~ 1e-13 and rounding error eps |L| / h ~ 1e-9 per entry,
  // against gradient entries of order 0.1-1: relative Frobenius errors near 1e-9, so 1e-7 leaves a margin of
  // about 100 while any wrong term (an O(1) relative error) fails by six orders of magnitude.
  const double tolerance = 1e-7;
  const Index n = 9, dk = 3, dv = 2;
  for (const bool blocked : {false, true})
    for (const bool causal : {false, true})
      for (Index heads = 1; heads <= 4; ++heads)
        for (const double scale : {1.0 / dk, 1.0 / std::sqrt(double(dk))}) {
          CAPTURE(blocked, causal, heads, scale);
          const AttentionOptions opt{scale, causal, heads};
          ExactProblem<double> x = random_exact_problem<double>(n, n, heads, dk, dv, 100 + 10 * std::uint64_t(heads));
          const auto backend = make_exact_backend(blocked, opt);
          const ExactGradients g = run(*backend, x);
          REQUIRE(relative_error(g.O, polyattn::attention_reference(x.Q, x.K, x.V, opt)) < 1e-14);
          const auto loss = [&] { return projected_loss(x, opt); };
          REQUIRE(gradient_error(loss, x.Q, g.dQ) < tolerance);
          REQUIRE(gradient_error(loss, x.K, g.dK) < tolerance);
          REQUIRE(gradient_error(loss, x.V, g.dV) < tolerance);
        }
}

TEST_CASE("Causal exact gradients with fewer queries than keys match central finite differences",
          "[exact_gradients]") {
  // The loss of the first test case on n < m queries, the last n positions: attention_reference() on the
  // bottom-right mask is itself checked against the definition (test_exact_attention.cpp). Same tolerance
  // argument as there.
  const double tolerance = 1e-7;
  struct Case {
    Index n, m;
  };
  for (const Case shape : {Case{5, 9}, Case{1, 7}, Case{8, 9}})
    for (const bool blocked : {false, true})
      for (const Index heads : {1, 2}) {
        CAPTURE(shape.n, shape.m, blocked, heads);
        const AttentionOptions opt{std::nullopt, true, heads};
        ExactProblem<double> x =
            random_exact_problem<double>(shape.n, shape.m, heads, 3, 2, 400 + std::uint64_t(shape.n));
        const auto backend = make_exact_backend(blocked, opt);
        const ExactGradients g = run(*backend, x);
        const auto loss = [&] { return projected_loss(x, opt); };
        REQUIRE(gradient_error(loss, x.Q, g.dQ) < tolerance);
        REQUIRE(gradient_error(loss, x.K, g.dK) < tolerance);
        REQUIRE(gradient_error(loss, x.V, g.dV) < tolerance);
      }
}

TEST_CASE("Causal exact attention of the last n queries is the last n rows of the full causal run",
          "[exact_gradients]") {
  // Queries that stand at positions m - n .. m - 1 see the keys they see in the full n = m run, so O is its
  // last n rows. The full run's gradient with G zero on its first m - n rows is the gradient of the same loss:
  // dQ is zero on those rows and the sub-problem's dQ below them; dK and dV are the sub-problem's. Different
  // blockings sum the same terms in other orders: ~1e-15 relative, 1e-12 fails on any misplaced mask.
  const double tolerance = 1e-12;
  struct Case {
    Index n, m;
  };
  for (const Case shape : {Case{13, 40}, Case{1, 40}, Case{39, 40}, Case{25, 26}, Case{17, 33}})
    for (const bool blocked : {false, true})
      for (const Index heads : {1, 3}) {
        CAPTURE(shape.n, shape.m, blocked, heads);
        const AttentionOptions opt{std::nullopt, true, heads};
        const std::uint64_t seed = 500 + std::uint64_t(shape.n);
        ExactProblem<double> full = random_exact_problem<double>(shape.m, shape.m, heads, 4, 3, seed);
        full.G.topRows(shape.m - shape.n).setZero();
        const ExactProblem<double> last{full.Q.bottomRows(shape.n), full.K, full.V, full.G.bottomRows(shape.n)};
        const ExactGradients expected = run(*make_exact_backend(blocked, opt), full);
        const ExactGradients actual = run(*make_exact_backend(blocked, opt), last);
        REQUIRE(relative_error(actual.O, expected.O.bottomRows(shape.n)) < tolerance);
        REQUIRE(expected.dQ.topRows(shape.m - shape.n).isZero(0));
        REQUIRE(relative_error(actual.dQ, expected.dQ.bottomRows(shape.n)) < tolerance);
        REQUIRE(relative_error(actual.dK, expected.dK) < tolerance);
        REQUIRE(relative_error(actual.dV, expected.dV) < tolerance);
      }
}

TEST_CASE("Only the exact methods take fewer queries than keys under the causal mask", "[exact_gradients]") {
  const AttentionOptions opt{std::nullopt, true, 2};
  const ExactProblem<double> fewer = random_exact_problem<double>(5, 8, 2, 3, 2, 600);
  const ExactProblem<double> more = random_exact_problem<double>(8, 5, 2, 3, 2, 601);
  for (const AttentionMethod method : polyattn::all_attention_methods) {
    CAPTURE(polyattn::attention_method_name(method));
    const auto backend = polyattn::make_attention_backend<double>(method, opt);
    Matrix<double> O(5, 4), dQ(5, 6), dK(8, 6), dV(8, 4);
    const bool exact = method == AttentionMethod::exact_reference || method == AttentionMethod::exact_blocked;
    if (exact) {
      REQUIRE_NOTHROW(backend->forward(fewer.Q, fewer.K, fewer.V, O));
      REQUIRE_NOTHROW(backend->backward(fewer.Q, fewer.K, fewer.V, O, fewer.G, dQ, dK, dV));
    } else {
      REQUIRE_THROWS_AS(backend->forward(fewer.Q, fewer.K, fewer.V, O), std::invalid_argument);
      REQUIRE_THROWS_WITH(backend->forward(fewer.Q, fewer.K, fewer.V, O),
                          Contains("causal attention needs as many queries as keys") && Contains("'Q' with 5 rows") &&
                              Contains("'K' with 8"));
      REQUIRE_THROWS_WITH(backend->backward(fewer.Q, fewer.K, fewer.V, O, fewer.G, dQ, dK, dV),
                          Contains("Backend::backward") && Contains("causal attention needs as many queries as keys"));
    }
    // More queries than keys: the first ones would see no key, for every method.
    Matrix<double> O8(8, 4), dQ8(8, 6), dK5(5, 6), dV5(5, 4);
    REQUIRE_THROWS_AS(backend->forward(more.Q, more.K, more.V, O8), std::invalid_argument);
    REQUIRE_THROWS_WITH(backend->forward(more.Q, more.K, more.V, O8),
                        Contains("'Q' with 8 rows") && Contains("'K' with 5"));
    REQUIRE_THROWS_WITH(backend->backward(more.Q, more.K, more.V, O8, more.G, dQ8, dK5, dV5),
                        Contains("'Q' with 8 rows") && Contains("'K' with 5"));
  }
  Matrix<double> dQ(8, 6), dK(5, 6), dV(5, 4);
  REQUIRE_THROWS_WITH(
      polyattn::attention_backward_reference<double>(more.Q, more.K, more.V, more.G, opt, dQ, dK, dV),
      Contains("attention_backward_reference") && Contains("at most as many queries as keys"));
  REQUIRE_THROWS_WITH(polyattn::attention_reference(more.Q, more.K, more.V, opt),
                      Contains("attention_reference") && Contains("at most as many queries as keys"));
}

TEST_CASE("Causal exact gradients do not reach keys after the query", "[exact_gradients]") {
  // Under the causal mask query i never sees key j > i: the gradient of row i of O reaches only keys 0..i.
  const Index n = 6;
  ExactProblem<double> x = random_exact_problem<double>(n, n, 1, 2, 2, 7);
  x.G.setZero();
  x.G.row(2).setOnes();
  ExactBlockedBackend<double> exact(AttentionOptions{std::nullopt, true, 1}, ExactBlockedOptions{4, 4, 4, 4});
  const ExactGradients g = run(exact, x);
  REQUIRE(g.dK.bottomRows(n - 3).isZero(0));
  REQUIRE(g.dV.bottomRows(n - 3).isZero(0));
  REQUIRE(g.dK.topRows(3).norm() > 0.01);
}

TEST_CASE("Blocked exact backward equals the materialised backward in double", "[exact_gradients]") {
  // Both sum the same O(1) products in different orders: per entry <= m eps sum|terms| with m <= 40, so
  // relative differences of ~1e-14, also after the cancellation in p = P o (G V^T) - diag(kappa) P (random
  // inputs keep its relative size near 1). 1e-12 fails on any missing or doubled block.
  const double tolerance = 1e-12;
  struct Case {
    Index n, m, query_block, key_block;
  };
  // block sizes that divide n, that do not, that differ from each other and that exceed n; fewer queries than
  // keys (causal: the queries are the last positions), down to a single query
  const Case cases[] = {{32, 32, 8, 8}, {32, 32, 16, 4}, {37, 37, 8, 5}, {37, 37, 5, 8}, {37, 37, 64, 64},
                        {37, 37, 1, 7}, {11, 23, 4, 6}, {11, 23, 3, 4}, {30, 41, 8, 5}, {1, 17, 4, 4}};
  for (const Case& k : cases)
    for (const bool causal : {false, true})
      for (const Index heads : {1, 3}) {
        CAPTURE(k.n, k.m, k.query_block, k.key_block, causal, heads);
        const AttentionOptions opt{std::nullopt, causal, heads};
        const ExactProblem<double> x = random_exact_problem<double>(k.n, k.m, heads, 4, 3, 200);
        ExactReferenceBackend<double> reference(opt);
        ExactBlockedBackend<double> blocked(opt, ExactBlockedOptions{k.query_block, k.key_block, k.query_block,
                                                                     k.key_block});
        const ExactGradients expected = run(reference, x);
        const ExactGradients actual = run(blocked, x);
        REQUIRE(relative_error(actual.O, expected.O) < tolerance);
        REQUIRE(relative_error(actual.dQ, expected.dQ) < tolerance);
        REQUIRE(relative_error(actual.dK, expected.dK) < tolerance);
        REQUIRE(relative_error(actual.dV, expected.dV) < tolerance);
      }
}

// The reference's results are bitwise the same wherever its inputs and outputs lie in memory: every operand and
// result is placed at each offset of one SIMD alignment (64 bytes) in a buffer of its own. Eigen's small products
// round their first entries differently by alignment; the Python binding hands over numpy copies that are only
// 16-byte aligned, and two backward calls of a gradcheck differed before the reference copied its operands.
template <class T>
void check_reference_ignores_alignment(Index n, bool causal) {
  using Map = Eigen::Map<Matrix<T>, Eigen::Unaligned>;
  constexpr Index slots = 64 / static_cast<Index>(sizeof(T));
  const Index heads = 2, dk = 3, dv = 2;
  const AttentionOptions opt{std::nullopt, causal, heads};
  const ExactProblem<T> x = random_exact_problem<T>(n, n, heads, dk, dv, 300);
  ExactReferenceBackend<T> reference(opt);
  Matrix<T> O0, dQ0, dK0, dV0;
  for (Index offset = 0; offset < slots; ++offset) {
    CAPTURE(n, causal, offset);
    std::vector<std::vector<T>> buffers(8);
    const auto placed = [&](std::size_t k, Index rows, Index cols) {
      buffers[k].assign(static_cast<std::size_t>(rows * cols + slots), T(0));
      return Map(buffers[k].data() + offset, rows, cols);
    };
    Map Q = placed(0, n, heads * dk), K = placed(1, n, heads * dk), V = placed(2, n, heads * dv);
    Map G = placed(3, n, heads * dv), O = placed(4, n, heads * dv), dQ = placed(5, n, heads * dk);
    Map dK = placed(6, n, heads * dk), dV = placed(7, n, heads * dv);
    Q = x.Q;
    K = x.K;
    V = x.V;
    G = x.G;
    reference.forward(Q, K, V, O);
    reference.backward(Q, K, V, O, G, dQ, dK, dV);
    if (offset == 0) {
      O0 = O;
      dQ0 = dQ;
      dK0 = dK;
      dV0 = dV;
    }
    REQUIRE(O == O0);
    REQUIRE(dQ == dQ0);
    REQUIRE(dK == dK0);
    REQUIRE(dV == dV0);
  }
}

TEST_CASE("The exact reference gives the same bits wherever its matrices lie", "[exact_gradients]") {
  for (const Index n : {1, 6, 13, 40})
    for (const bool causal : {false, true}) {
      check_reference_ignores_alignment<double>(n, causal);
      check_reference_ignores_alignment<float>(n, causal);
    }
}

TEST_CASE("Blocked exact backward in float agrees with the double reference", "[exact_gradients]") {
  // Float unit roundoff u = 6e-8. A score c q.k over d_h = 16 terms of size ~1 carries a rounding error of
  // ~sqrt(16) u c |q||k| ~ 1e-7 (random signs), which is the relative error of exp(S - lse); sums over
  // n = 300 keys add ~sqrt(log n) u in relative terms, and the cancellation in p magnifies relative errors
  // only by a small factor for random inputs. Measured: 2e-7 to 4e-7 for O, dQ, dK and dV. The tolerance
  // 1e-5 leaves a margin of 25 and still rejects any algebraic mistake (O(1) errors).
  const double tolerance = 1e-5;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const AttentionOptions opt{std::nullopt, causal, 2};
    const ExactProblem<double> x = random_exact_problem<double>(300, 300, 2, 16, 16, 300);
    ExactReferenceBackend<double> reference(opt);
    const ExactGradients expected = run(reference, x);
    ExactBlockedBackend<float> blocked(opt, ExactBlockedOptions{64, 128, 48, 80});
    const Matrix<float> Q = x.Q.cast<float>(), K = x.K.cast<float>(), V = x.V.cast<float>(), G = x.G.cast<float>();
    Matrix<float> O(300, 32), dQ(300, 32), dK(300, 32), dV(300, 32);
    blocked.forward(Q, K, V, O);
    blocked.backward(Q, K, V, O, G, dQ, dK, dV);
    CHECK(relative_error(O, expected.O) < tolerance);
    CHECK(relative_error(dQ, expected.dQ) < tolerance);
    CHECK(relative_error(dK, expected.dK) < tolerance);
    CHECK(relative_error(dV, expected.dV) < tolerance);
  }
}

TEST_CASE("Exact backends report their method and an exact certificate", "[exact_gradients]") {
  const AttentionOptions opt{std::nullopt, false, 1};
  ExactReferenceBackend<double> reference(opt);
  ExactBlockedBackend<double> blocked(opt);
  REQUIRE(reference.method() == AttentionMethod::exact_reference);
  REQUIRE(blocked.method() == AttentionMethod::exact_blocked);
  const ExactProblem<double> x = random_exact_problem<double>(5, 5, 1, 2, 2, 9);
  Matrix<double> O(5, 2), dQ(5, 2), dK(5, 2), dV(5, 2);
  for (AttentionBackend<double>* backend : {static_cast<AttentionBackend<double>*>(&reference),
                                            static_cast<AttentionBackend<double>*>(&blocked)}) {
    const polyattn::Certificate forward = backend->forward(x.Q, x.K, x.V, O);
    const polyattn::GradientCertificate backward = backend->backward(x.Q, x.K, x.V, O, x.G, dQ, dK, dV);
    REQUIRE(forward.valid);
    REQUIRE(!forward.vacuous());
    REQUIRE(forward.poly_error == 0);
    REQUIRE(forward.output_bound == 0);
    REQUIRE(backward.forward.output_bound == 0);
    REQUIRE(backward.dv_bound == 0);
    REQUIRE(backward.dqk_bound == 0);
  }
}

TEST_CASE("make_attention_backend configures exact methods from PolynomialAttentionOptions::attention",
          "[exact_gradients]") {
  polyattn::PolynomialAttentionOptions poly;
  poly.attention = AttentionOptions{0.25, true, 2};
  for (const AttentionMethod method : {AttentionMethod::exact_reference, AttentionMethod::exact_blocked}) {
    const auto backend = polyattn::make_attention_backend<double>(method, poly);
    REQUIRE(backend->method() == method);
    REQUIRE(backend->attention_options().causal);
    REQUIRE(backend->attention_options().heads == 2);
    REQUIRE(*backend->attention_options().scale == 0.25);
  }
}

TEST_CASE("make_attention_backend takes plain AttentionOptions for every method", "[exact_gradients]") {
  const AttentionOptions opt{0.25, true, 2};
  for (const AttentionMethod method : polyattn::all_attention_methods) {
    CAPTURE(polyattn::attention_method_name(method));
    const auto backend = polyattn::make_attention_backend<double>(method, opt);
    REQUIRE(backend->method() == method);
    REQUIRE(backend->attention_options().causal);
    REQUIRE(backend->attention_options().heads == 2);
    REQUIRE(*backend->attention_options().scale == 0.25);
  }
  REQUIRE_THROWS_AS(polyattn::make_attention_backend<double>(AttentionMethod::exact_blocked, AttentionOptions{-1.0, false, 1}),
                    std::invalid_argument);
}

TEST_CASE("Exact backends reject bad input with the argument's name", "[exact_gradients]") {
  const AttentionOptions opt{std::nullopt, true, 2};
  const ExactProblem<double> x = random_exact_problem<double>(6, 6, 2, 3, 2, 11);
  Matrix<double> O(6, 4), dQ(6, 6), dK(6, 6), dV(6, 4);
  ExactBlockedBackend<double> blocked(opt);
  ExactReferenceBackend<double> reference(opt);

  SECTION("backward before forward") {
    REQUIRE_THROWS_WITH(blocked.backward(x.Q, x.K, x.V, O, x.G, dQ, dK, dV), Contains("preceding forward()"));
  }
  SECTION("G of the wrong shape") {
    blocked.forward(x.Q, x.K, x.V, O);
    const Matrix<double> G = x.G.leftCols(3);
    REQUIRE_THROWS_WITH(blocked.backward(x.Q, x.K, x.V, O, G, dQ, dK, dV), Contains("'G' must be 6x4, got 6x3"));
    REQUIRE_THROWS_WITH(reference.backward(x.Q, x.K, x.V, O, G, dQ, dK, dV), Contains("'G' must be 6x4, got 6x3"));
  }
  SECTION("NaN in G") {
    blocked.forward(x.Q, x.K, x.V, O);
    Matrix<double> G = x.G;
    G(4, 1) = std::numeric_limits<double>::quiet_NaN();
    REQUIRE_THROWS_WITH(blocked.backward(x.Q, x.K, x.V, O, G, dQ, dK, dV),
                        Contains("'G' has a non-finite entry") && Contains("(4, 1)"));
    REQUIRE_THROWS_WITH(reference.backward(x.Q, x.K, x.V, O, G, dQ, dK, dV), Contains("'G' has a non-finite entry"));
  }
  SECTION("NaN in Q") {
    Matrix<double> Q = x.Q;
    Q(0, 0) = std::numeric_limits<double>::infinity();
    REQUIRE_THROWS_WITH(blocked.forward(Q, x.K, x.V, O), Contains("'Q' has a non-finite entry"));
  }
  SECTION("gradient outputs of the wrong shape") {
    blocked.forward(x.Q, x.K, x.V, O);
    Matrix<double> wrong(6, 5);
    REQUIRE_THROWS_WITH(blocked.backward(x.Q, x.K, x.V, O, x.G, wrong, dK, dV), Contains("'dQ' must be 6x6"));
    REQUIRE_THROWS_WITH(blocked.backward(x.Q, x.K, x.V, O, x.G, dQ, wrong, dV), Contains("'dK' must be 6x6"));
    REQUIRE_THROWS_WITH(blocked.backward(x.Q, x.K, x.V, O, x.G, dQ, dK, wrong), Contains("'dV' must be 6x4"));
  }
  SECTION("a different sequence length than the forward pass") {
    blocked.forward(x.Q, x.K, x.V, O);
    const ExactProblem<double> y = random_exact_problem<double>(5, 5, 2, 3, 2, 12);
    Matrix<double> O5(5, 4), dQ5(5, 6), dK5(5, 6), dV5(5, 4);
    REQUIRE_THROWS_WITH(blocked.backward(y.Q, y.K, y.V, O5, y.G, dQ5, dK5, dV5), Contains("preceding forward()"));
  }
  SECTION("n = 0") {
    const Matrix<double> empty(0, 6), empty_v(0, 4);
    Matrix<double> O0(0, 4);
    REQUIRE_THROWS_AS(blocked.forward(empty, empty, empty_v, O0), std::invalid_argument);
    REQUIRE_THROWS_WITH(blocked.forward(empty, empty, empty_v, O0), Contains("'Q' must be non-empty"));
    REQUIRE_THROWS_WITH(reference.forward(empty, empty, empty_v, O0), Contains("'Q' must be non-empty"));
  }
  SECTION("block sizes") {
    ExactBlockedOptions blocks;
    blocks.key_block = 0;
    REQUIRE_THROWS_WITH(ExactBlockedBackend<double>(opt, blocks), Contains("'key_block' must be >= 1, got 0"));
    blocks = ExactBlockedOptions{};
    blocks.forward_query_block = -3;
    REQUIRE_THROWS_WITH(ExactBlockedBackend<double>(opt, blocks), Contains("'forward_query_block'"));
  }
  SECTION("options") {
    REQUIRE_THROWS_WITH(ExactBlockedBackend<double>(AttentionOptions{-1.0, false, 1}), Contains("'scale'"));
    REQUIRE_THROWS_WITH(ExactReferenceBackend<double>(AttentionOptions{std::nullopt, false, 0}), Contains("'heads'"));
  }
}

TEST_CASE("Exact backends reject outputs overlapping inputs or each other, naming both", "[exact_gradients][aliasing]") {
  const Index n = 12, d = 4;
  const ExactProblem<double> x = random_exact_problem<double>(n, n, 1, d, d, 40);
  const AttentionOptions opt{std::nullopt, true, 1};
  ExactReferenceBackend<double> reference(opt);
  ExactBlockedBackend<double> blocked(opt, ExactBlockedOptions{4, 4, 4, 4});
  for (AttentionBackend<double>* backend : std::initializer_list<AttentionBackend<double>*>{&reference, &blocked}) {
    const std::string forward_name = backend == &reference ? "ExactReferenceBackend::forward" : "ExactBlockedBackend::forward";
    const std::string backward_name =
        backend == &reference ? "ExactReferenceBackend::backward" : "ExactBlockedBackend::backward";
    Matrix<double> Q = x.Q, K = x.K, V = x.V, G = x.G, O(n, d), dQ(n, d), dK(n, d), dV(n, d);
    REQUIRE_THROWS_AS(backend->forward(Q, K, V, K), std::invalid_argument);
    REQUIRE_THROWS_WITH(backend->forward(Q, K, V, K), Contains(forward_name) && Contains("'O'") && Contains("'K'"));
    REQUIRE_THROWS_WITH(backend->forward(Q, K, V, V), Contains(forward_name) && Contains("'O'") && Contains("'V'"));
    REQUIRE_THROWS_WITH(backend->forward(Q, K, V, Q), Contains(forward_name) && Contains("'O'") && Contains("'Q'"));
    backend->forward(Q, K, V, O);
    REQUIRE_THROWS_AS(backend->backward(Q, K, V, O, G, dQ, K, dV), std::invalid_argument);
    REQUIRE_THROWS_WITH(backend->backward(Q, K, V, O, G, dQ, K, dV),
                        Contains(backward_name) && Contains("'dK'") && Contains("'K'"));
    REQUIRE_THROWS_WITH(backend->backward(Q, K, V, O, G, Q, dK, dV), Contains("'dQ'") && Contains("'Q'"));
    REQUIRE_THROWS_WITH(backend->backward(Q, K, V, O, G, dQ, dK, G), Contains("'dV'") && Contains("'G'"));
    REQUIRE_THROWS_WITH(backend->backward(Q, K, V, O, G, dQ, dK, O), Contains("'dV'") && Contains("'O'"));
    REQUIRE_THROWS_WITH(backend->backward(Q, K, V, O, G, dQ, dQ, dV), Contains("'dQ'") && Contains("'dK'"));
    // Partial overlap: dV's last column is dK's first.
    Matrix<double> both(n, 2 * d - 1);
    REQUIRE_THROWS_WITH(backend->backward(Q, K, V, O, G, dQ, both.leftCols(d), both.rightCols(d)),
                        Contains("'dK'") && Contains("'dV'"));
    // The inputs are untouched by the rejected calls, and disjoint blocks of one matrix work.
    REQUIRE(Q == x.Q);
    REQUIRE(K == x.K);
    REQUIRE(G == x.G);
    Matrix<double> grads(n, 3 * d);
    backend->backward(Q, K, V, O, G, grads.leftCols(d), grads.middleCols(d, d), grads.rightCols(d));
    backend->backward(Q, K, V, O, G, dQ, dK, dV);
    REQUIRE(grads.leftCols(d) == dQ);
    REQUIRE(grads.middleCols(d, d) == dK);
    REQUIRE(grads.rightCols(d) == dV);
  }
  Matrix<double> Q = x.Q, K = x.K, dQ(n, d), dV(n, d);
  REQUIRE_THROWS_WITH(polyattn::attention_backward_reference<double>(Q, K, x.V, x.G, opt, dQ, K, dV),
                      Contains("attention_backward_reference") && Contains("'dK'") && Contains("'K'"));
}

TEST_CASE("Exact block options larger than the problem do not size the workspace", "[exact_gradients]") {
  const Index n = 16, d = 4, huge = Index(1) << 30;
  const ExactProblem<double> x = random_exact_problem<double>(n, n, 2, d, d, 50);
  for (const bool causal : {false, true}) {
    const AttentionOptions opt{std::nullopt, causal, 2};
    ExactReferenceBackend<double> reference(opt);
    ExactBlockedBackend<double> blocked(opt, ExactBlockedOptions{huge, huge, huge, huge});
    const ExactGradients expected = run(reference, x), actual = run(blocked, x);
    REQUIRE(relative_error(actual.O, expected.O) < 1e-13);
    REQUIRE(relative_error(actual.dQ, expected.dQ) < 1e-12);
    REQUIRE(relative_error(actual.dK, expected.dK) < 1e-12);
    REQUIRE(relative_error(actual.dV, expected.dV) < 1e-12);
  }
}

TEST_CASE("Exact backends report overflow of finite float input as a domain_error", "[exact_gradients][overflow]") {
  const Index n = 16, d = 4;
  const ExactProblem<float> x = random_exact_problem<float>(n, n, 1, d, d, 60);
  const AttentionOptions opt{std::nullopt, false, 1};
  ExactReferenceBackend<float> reference(opt);
  ExactBlockedBackend<float> blocked(opt, ExactBlockedOptions{4, 4, 4, 4});
  const Matrix<float> Qbig = x.Q * 1e20f, Kbig = x.K * 1e20f, Vbig = Matrix<float>::Constant(n, d, 1e38f);
  // One key dominates every query, so P's first column sums to n and dV = P^T G overflows with |G| ~ 1e38.
  Matrix<float> Kdominant = Matrix<float>::Zero(n, d), Qones = Matrix<float>::Ones(n, d);
  Kdominant.row(0).setConstant(20.0f);
  const Matrix<float> Gbig = Matrix<float>::Constant(n, d, 1e38f);
  for (AttentionBackend<float>* backend : std::initializer_list<AttentionBackend<float>*>{&reference, &blocked}) {
    const std::string name = backend == &reference ? "ExactReferenceBackend" : "ExactBlockedBackend";
    Matrix<float> O(n, d), dQ(n, d), dK(n, d), dV(n, d);
    REQUIRE_THROWS_AS(backend->forward(Qbig, Kbig, x.V, O), std::domain_error);
    REQUIRE_THROWS_WITH(backend->forward(Qbig, Kbig, x.V, O),
                        Contains(name + "::forward") && Contains("overflowed float") && Contains("score radius"));
    REQUIRE_THROWS_WITH(backend->forward(x.Q, x.K, Vbig, O), Contains(name + "::forward") && Contains("max |V|"));
    backend->forward(Qones, Kdominant, x.V, O);
    REQUIRE_THROWS_AS(backend->backward(Qones, Kdominant, x.V, O, Gbig, dQ, dK, dV), std::domain_error);
    REQUIRE_THROWS_WITH(backend->backward(Qones, Kdominant, x.V, O, Gbig, dQ, dK, dV),
                        Contains(name + "::backward") && Contains("overflowed float") && Contains("max |G|"));
  }
}

namespace {


// Both exact backends on row-major blocks give bitwise the column-major results, for any thread count, and never
// write the padding; causal with fewer queries than keys too.
template <class T, class Backend>
void check_exact_row_major(const Backend& prototype) {
  const AttentionOptions& opt = prototype.options();
  const Index dk = 4, dv = 3, h = opt.heads;
  for (const Index n : {Index(1), Index(37), Index(130)})
    for (const Index extra_keys : {Index(0), Index(9)}) {
      const Index m = n + extra_keys;
      CAPTURE(opt.causal, h, n, m);
      polyattn::testing::check_row_major_is_bitwise<T>(
          [&] { return prototype; }, random_matrix<T>(n, h * dk, 70 + static_cast<std::uint64_t>(n)),
          random_matrix<T>(m, h * dk, 71), random_matrix<T>(m, h * dv, 72), random_matrix<T>(n, h * dv, 73));
    }
}

template <class T>
void check_exact_row_major_all() {
  for (const bool causal : {false, true})
    for (const Index heads : {Index(1), Index(2)}) {
      const AttentionOptions opt{std::nullopt, causal, heads};
      check_exact_row_major<T>(ExactReferenceBackend<T>(opt));
      check_exact_row_major<T>(ExactBlockedBackend<T>(opt));
      check_exact_row_major<T>(ExactBlockedBackend<T>(opt, ExactBlockedOptions{16, 8, 32, 16}));
    }
}

}  // namespace

TEST_CASE("exact backends read and write row-major matrices in place, bitwise as column-major ones",
          "[exact_gradients]") {
  check_exact_row_major_all<float>();
  check_exact_row_major_all<double>();
}

TEST_CASE("A backend without row-major overloads takes row-major matrices through copies", "[exact_gradients]") {
  // GatheredKeysBackend (the distributed exact baseline, here on one rank) has none: AttentionBackend's defaults
  // copy the matrices, with results bitwise those of the column-major call.
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const AttentionOptions opt{std::nullopt, causal, 2};
    const ExactProblem<double> x = random_exact_problem<double>(19, 19, 2, 4, 3, 400);
    polyattn::testing::check_row_major_is_bitwise<double>(
        [&] {
          return polyattn::GatheredKeysBackend<double>(std::make_unique<ExactBlockedBackend<double>>(opt),
                                                       std::make_shared<polyattn::testing::SingleRankExchange>());
        },
        x.Q, x.K, x.V, x.G);
  }
}

TEST_CASE("exact backends on row-major matrices name bad arguments", "[exact_gradients]") {
  using RowMajor = polyattn::RowMajorMatrix<double>;
  const Index n = 6;
  const RowMajor Q = random_matrix<double>(n, 3, 80), K = random_matrix<double>(n, 3, 81),
                 V = random_matrix<double>(n, 2, 82), G = random_matrix<double>(n, 2, 83);
  RowMajor O(n, 2), dQ(n, 3), dK(n, 3), dV(n, 2);
  ExactBlockedBackend<double> blocked;
  ExactReferenceBackend<double> reference;
  RowMajor bad_K = K;
  bad_K(4, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(blocked.forward(Q, bad_K, V, O),
                    Contains("ExactBlockedBackend::forward") && Contains("'K'") && Contains("(4, 1)"));
  CHECK_THROWS_WITH(reference.forward(Q, bad_K, V, O),
                    Contains("ExactReferenceBackend::forward") && Contains("'K'") && Contains("(4, 1)"));
  RowMajor wrong_O(n, 3);
  CHECK_THROWS_WITH(blocked.forward(Q, K, V, wrong_O), Contains("'O'") && Contains("6x2"));
  blocked.forward(Q, K, V, O);
  RowMajor bad_G = G;
  bad_G(5, 0) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(blocked.backward(Q, K, V, O, bad_G, dQ, dK, dV), Contains("'G'") && Contains("(5, 0)"));
  CHECK_THROWS_WITH(reference.backward(Q, K, V, O, bad_G, dQ, dK, dV), Contains("'G'") && Contains("(5, 0)"));
  CHECK_THROWS_WITH(blocked.backward(Q, K, V, O, G, dQ, dK, dQ), Contains("'dV'"));
}
