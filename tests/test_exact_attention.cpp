#include <polyattn/attention/exact_attention.hpp>

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
using polyattn::ExactAttention;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::attention_reference;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;
using polyattn::testing::score_radius;
using Catch::Contains;

namespace {

constexpr double u_double = std::numeric_limits<double>::epsilon() / 2;
constexpr double u_float = std::numeric_limits<float>::epsilon() / 2;

AttentionOptions make_options(std::optional<double> scale, bool causal, Index heads) {
  AttentionOptions opt;
  opt.scale = scale;
  opt.causal = causal;
  opt.heads = heads;
  return opt;
}

// The definition, one row at a time in long double: query i (standing at position positions[i], or i)
// attends to every key, or to keys j <= position under the causal mask. Independent ground truth.
template <class T>
Matrix<double> naive_attention(const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                               const AttentionOptions& opt, const std::vector<Index>* positions = nullptr) {
  const Index dk = Q.cols() / opt.heads, dv = V.cols() / opt.heads;
  const long double c = opt.resolved_scale(dk);
  Matrix<double> O(Q.rows(), V.cols());
  for (Index h = 0; h < opt.heads; ++h)
    for (Index i = 0; i < Q.rows(); ++i) {
      const Index position = positions ? (*positions)[static_cast<std::size_t>(i)] : i;
      const Index keys = opt.causal ? position + 1 : K.rows();
      std::vector<long double> s(static_cast<std::size_t>(keys));
      long double top = -std::numeric_limits<long double>::infinity();
      for (Index j = 0; j < keys; ++j) {
        long double dot = 0;
        for (Index l = 0; l < dk; ++l)
          dot += static_cast<long double>(Q(i, h * dk + l)) * static_cast<long double>(K(j, h * dk + l));
        s[static_cast<std::size_t>(j)] = c * dot;
        top = std::max(top, c * dot);
      }
      long double total = 0;
      std::vector<long double> out(static_cast<std::size_t>(dv), 0.0L);
      for (Index j = 0; j < keys; ++j) {
        const long double w = std::exp(s[static_cast<std::size_t>(j)] - top);
        total += w;
        for (Index l = 0; l < dv; ++l) out[static_cast<std::size_t>(l)] += w * static_cast<long double>(V(j, h * dv + l));
      }
      for (Index l = 0; l < dv; ++l) O(i, h * dv + l) = static_cast<double>(out[static_cast<std::size_t>(l)] / total);
    }
  return O;
}

// Forward rounding of softmax attention in precision u: a score c q.k (d products and sums) is off by at
// most (d + 2) u R, which perturbs each weight e^{s - max} by that much relatively, plus u for exp;
// the normaliser and the weighted sum of m terms add m u each, and the division u. A perturbation of
// relative size delta in every weight moves each output row by at most 2 delta max|v| while the rows of
// O are O(max|v|), so the relative (Frobenius) error is below 4((d + 2)R + m + 2)u.
double forward_tolerance(Index dk, Index m, double radius, double u) {
  return 4 * ((static_cast<double>(dk) + 2) * radius + static_cast<double>(m) + 2) * u;
}

}  // namespace

TEST_CASE("materialised reference equals the definition evaluated in long double", "[exact_attention]") {
  std::uint64_t seed = 1;
  for (const bool causal : {false, true})
    for (const Index heads : {1, 3})
      for (const std::optional<double> scale : {std::optional<double>{}, std::optional<double>{1.0}}) {
        const Index n = 37, m = causal ? n : 23, dk = 8, dv = 5;
        const AttentionOptions opt = make_options(scale, causal, heads);
        const Matrix<double> Q = random_matrix<double>(n, heads * dk, seed++);
        const Matrix<double> K = random_matrix<double>(m, heads * dk, seed++);
        const Matrix<double> V = random_matrix<double>(m, heads * dv, seed++);
        CAPTURE(causal, heads, opt.resolved_scale(dk));
        const double tolerance = forward_tolerance(dk, m, score_radius(Q, K, opt), u_double);
        REQUIRE(tolerance < 1e-12);  // the 1e-12 holds with margin
        REQUIRE(relative_error(attention_reference(Q, K, V, opt), naive_attention(Q, K, V, opt)) <= tolerance);
      }
}

TEST_CASE("blocked exact attention equals the materialised reference (double, 1e-12)", "[exact_attention]") {
  struct Blocks {
    Index query, key;
  };
  std::uint64_t seed = 100;
  for (const bool causal : {false, true})
    for (const Index heads : {1, 2, 3, 4})
      for (const Index n : {1, 7, 64, 100})
        for (const Blocks blocks : {Blocks{1, 1}, Blocks{8, 16}, Blocks{7, 13}, Blocks{64, 32}, Blocks{128, 256}}) {
          const Index m = causal ? n : n + 5, dk = 4, dv = 3;  // non-causal: n != m
          CAPTURE(causal, heads, n, m, blocks.query, blocks.key);
          const AttentionOptions opt = make_options(std::nullopt, causal, heads);
          const Matrix<double> Q = random_matrix<double>(n, heads * dk, seed++);
          const Matrix<double> K = random_matrix<double>(m, heads * dk, seed++);
          const Matrix<double> V = random_matrix<double>(m, heads * dv, seed++);
          ExactAttention<double> exact(opt, blocks.query, blocks.key);
          Matrix<double> O(n, heads * dv);
          exact.forward(Q, K, V, O);
          // Both are within forward_tolerance (< 1e-13 here) of the exact result; the issue asks for 1e-12.
          REQUIRE(relative_error(O, attention_reference(Q, K, V, opt)) <= 1e-12);
          // The saved log-sum-exp is log sum_j e^{s_ij}: check it via O = sum_j e^{s_ij - lse_i} v_j.
          const Matrix<double>& lse = exact.logsumexp();
          REQUIRE(lse.rows() == n);
          REQUIRE(lse.cols() == heads);
          for (Index h = 0; h < heads; ++h) {
            const double c = opt.resolved_scale(dk);
            Matrix<double> P = c * Q.middleCols(h * dk, dk) * K.middleCols(h * dk, dk).transpose();
            P = (P.colwise() - lse.col(h)).array().exp();
            if (causal) P.triangularView<Eigen::StrictlyUpper>().setZero();
            // Rows of P sum to 1 when lse is right; the sum of m terms of size <= 1 rounds by m u.
            REQUIRE((P.rowwise().sum().array() - 1).abs().maxCoeff() <= 1e-12);
          }
          // The workspace is reused: a second call on other inputs of the same shape is just as exact.
          const Matrix<double> V2 = random_matrix<double>(m, heads * dv, seed++);
          exact.forward(Q, K, V2, O);
          REQUIRE(relative_error(O, attention_reference(Q, K, V2, opt)) <= 1e-12);
        }
}

TEST_CASE("causal attention of fewer queries than keys masks bottom-right, as the definition says",
          "[exact_attention]") {
  // The n queries stand at positions m - n .. m - 1 (AttentionOptions::causal): the long-double definition with
  // those positions is the ground truth for the materialised reference and the streaming forward, within
  // forward_tolerance (< 1e-13 here).
  struct Blocks {
    Index query, key;
  };
  std::uint64_t seed = 700;
  for (const Index heads : {1, 2})
    for (const Index n : {1, 6, 31, 64})
      for (const Blocks blocks : {Blocks{1, 1}, Blocks{8, 16}, Blocks{7, 13}, Blocks{128, 256}}) {
        const Index m = 64, dk = 4, dv = 3;
        CAPTURE(heads, n, blocks.query, blocks.key);
        const AttentionOptions opt = make_options(std::nullopt, true, heads);
        const Matrix<double> Q = random_matrix<double>(n, heads * dk, seed++);
        const Matrix<double> K = random_matrix<double>(m, heads * dk, seed++);
        const Matrix<double> V = random_matrix<double>(m, heads * dv, seed++);
        std::vector<Index> positions(static_cast<std::size_t>(n));
        for (Index i = 0; i < n; ++i) positions[static_cast<std::size_t>(i)] = i + m - n;
        const Matrix<double> truth = naive_attention(Q, K, V, opt, &positions);
        const double tolerance = forward_tolerance(dk, m, score_radius(Q, K, opt), u_double);
        REQUIRE(relative_error(attention_reference(Q, K, V, opt), truth) <= tolerance);
        ExactAttention<double> exact(opt, blocks.query, blocks.key);
        Matrix<double> O(n, heads * dv);
        exact.forward(Q, K, V, O);
        REQUIRE(relative_error(O, truth) <= tolerance);
      }
  // More queries than keys: the first queries would see no key.
  const AttentionOptions opt = make_options(std::nullopt, true, 1);
  const Matrix<double> Q = random_matrix<double>(6, 4, 1), K = random_matrix<double>(5, 4, 2);
  const Matrix<double> V = random_matrix<double>(5, 2, 3);
  Matrix<double> O(6, 2);
  REQUIRE_THROWS_AS(ExactAttention<double>(opt).forward(Q, K, V, O), std::invalid_argument);
  REQUIRE_THROWS_WITH(ExactAttention<double>(opt).forward(Q, K, V, O),
                      Contains("ExactAttention::forward") && Contains("at most as many queries as keys") &&
                          Contains("'Q' with 6 rows") && Contains("'K' with 5"));
}

TEST_CASE("every row of P sums to one: V = ones gives ones", "[exact_attention]") {
  const Index n = 70, dk = 6;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const AttentionOptions opt = make_options(0.8, causal, 2);
    const Matrix<double> Q = random_matrix<double>(n, 2 * dk, 5), K = random_matrix<double>(n, 2 * dk, 6);
    const Matrix<double> ones = Matrix<double>::Ones(n, 4);
    ExactAttention<double> exact(opt, 16, 24);
    Matrix<double> O(n, 4);
    exact.forward(Q, K, ones, O);
    // Numerator and normaliser are the same m positive terms summed in different orders: each is within
    // (m - 1)u relatively of the exact sum, so |O - 1| <= 2 m u + u < 4 m u.
    const double tolerance = 4 * static_cast<double>(n) * u_double;
    REQUIRE((O.array() - 1).abs().maxCoeff() <= tolerance);
    REQUIRE((attention_reference(Q, K, ones, opt).array() - 1).abs().maxCoeff() <= tolerance);
    if (causal) {
      // Query 0 sees only key 0: its output is v_0 up to the division e^0 * v / e^0.
      const Matrix<double> V = random_matrix<double>(n, 4, 7);
      exact.forward(Q, K, V, O);
      REQUIRE((O.row(0) - V.row(0)).cwiseAbs().maxCoeff() <= 2 * u_double * V.row(0).cwiseAbs().maxCoeff());
    }
  }
}

TEST_CASE("forward_rows equals the matching rows of forward", "[exact_attention]") {
  const Index n = 45, dk = 4, dv = 3, heads = 2;
  const std::vector<Index> positions{0, 3, 3, 17, 31, 44};
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const AttentionOptions opt = make_options(std::nullopt, causal, heads);
    const Matrix<double> Q = random_matrix<double>(n, heads * dk, 11);
    const Matrix<double> K = random_matrix<double>(n, heads * dk, 12);
    const Matrix<double> V = random_matrix<double>(n, heads * dv, 13);
    ExactAttention<double> exact(opt, 8, 8);
    Matrix<double> O(n, heads * dv);
    exact.forward(Q, K, V, O);
    const auto count = static_cast<Index>(positions.size());
    Matrix<double> selected(count, heads * dk), expected(count, heads * dv), rows(count, heads * dv);
    for (Index i = 0; i < count; ++i) {
      selected.row(i) = Q.row(positions[static_cast<std::size_t>(i)]);
      expected.row(i) = O.row(positions[static_cast<std::size_t>(i)]);
    }
    exact.forward_rows(selected, positions, K, V, rows);
    // Same key blocks, different query grouping: both within ~1e-14 of the exact rows.
    REQUIRE(relative_error(rows, expected) <= 1e-12);
    // Arbitrary queries standing at the given positions (the mask follows the position, not the row).
    const Matrix<double> other = random_matrix<double>(count, heads * dk, 14);
    exact.forward_rows(other, positions, K, V, rows);
    REQUIRE(relative_error(rows, naive_attention(other, K, V, opt, &positions)) <= 1e-12);
  }
  // Non-causal with n != m: positions only need to lie in [0, m).
  const AttentionOptions opt = make_options(0.5, false, 1);
  const Matrix<double> K = random_matrix<double>(20, 4, 15), V = random_matrix<double>(20, 2, 16);
  const Matrix<double> Q = random_matrix<double>(3, 4, 17);
  const std::vector<Index> some{2, 9, 19};
  ExactAttention<double> exact(opt, 4, 6);
  Matrix<double> rows(3, 2);
  exact.forward_rows(Q, some, K, V, rows);
  REQUIRE(relative_error(rows, naive_attention(Q, K, V, opt)) <= 1e-12);
}

TEST_CASE("exact attention accepts inputs and output that are blocks of larger matrices", "[exact_attention]") {
  // Eigen::Ref with an outer stride; the output block is written in place and nothing around it changes.
  const Index n = 19, dk = 4, dv = 3;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const AttentionOptions opt = make_options(std::nullopt, causal, 1);
    const Matrix<double> wide_Q = random_matrix<double>(n + 2, dk + 3, 61);
    const Matrix<double> K = random_matrix<double>(n, dk, 62), V = random_matrix<double>(n, dv, 63);
    Matrix<double> big = Matrix<double>::Constant(n + 5, dv + 2, -7.0);
    ExactAttention<double> exact(opt, 8, 8);
    exact.forward(wide_Q.block(1, 2, n, dk), K, V, big.block(4, 1, n, dv));
    const Matrix<double> Q = wide_Q.block(1, 2, n, dk);
    Matrix<double> O(n, dv);
    ExactAttention<double>(opt, 8, 8).forward(Q, K, V, O);
    REQUIRE(Matrix<double>(big.block(4, 1, n, dv)) == O);
    big.block(4, 1, n, dv).setConstant(-7.0);
    REQUIRE((big.array() == -7.0).all());
  }
}

TEST_CASE("float agrees with double within the float rounding bound", "[exact_attention]") {
  const Index n = 64, dk = 16, dv = 8;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const AttentionOptions opt = make_options(std::nullopt, causal, 2);
    const Matrix<float> Qf = random_matrix<float>(n, 2 * dk, 21), Kf = random_matrix<float>(n, 2 * dk, 22);
    const Matrix<float> Vf = random_matrix<float>(n, 2 * dv, 23);
    // The float inputs converted exactly to double, so only the arithmetic differs.
    const Matrix<double> Q = Qf.cast<double>(), K = Kf.cast<double>(), V = Vf.cast<double>();
    const Matrix<double> truth = naive_attention(Q, K, V, opt);
    const double tolerance = forward_tolerance(dk, n, score_radius(Q, K, opt), u_float);
    CAPTURE(tolerance);
    REQUIRE(tolerance < 1e-3);  // the bound must say something
    ExactAttention<float> exact(opt, 16, 32);
    Matrix<float> O(n, 2 * dv);
    exact.forward(Qf, Kf, Vf, O);
    REQUIRE(relative_error(O, truth) <= tolerance);
    REQUIRE(relative_error(attention_reference(Qf, Kf, Vf, opt), truth) <= tolerance);
    ExactAttention<double> exact_double(opt, 16, 32);
    Matrix<double> Od(n, 2 * dv);
    exact_double.forward(Q, K, V, Od);
    REQUIRE(relative_error(Od, truth) <= forward_tolerance(dk, n, score_radius(Q, K, opt), u_double));
  }
}

TEMPLATE_TEST_CASE("large scores stay finite: rows are stabilised by their maximum", "[exact_attention]", float,
                   double) {
  // scale 50 on N(0, 4) entries with d = 8: scores reach about 1000, beyond exp's range in float (88.7)
  // and double (709.8) without the max subtraction.
  const Index n = 40, dk = 8, dv = 4;
  const double u = std::numeric_limits<TestType>::epsilon() / 2;
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const AttentionOptions opt = make_options(50.0, causal, 1);
    const Matrix<TestType> Q = random_matrix<TestType>(n, dk, 31, 2.0), K = random_matrix<TestType>(n, dk, 32, 2.0);
    const Matrix<TestType> V = random_matrix<TestType>(n, dv, 33);
    const Matrix<double> scores = 50.0 * Q.template cast<double>() * K.template cast<double>().transpose();
    REQUIRE(scores.triangularView<Eigen::Lower>().toDenseMatrix().maxCoeff() > 709.8);
    const double radius = score_radius(Q, K, opt);
    const Matrix<double> truth = naive_attention(Q, K, V, opt);
    ExactAttention<TestType> exact(opt, 16, 16);
    Matrix<TestType> O(n, dv);
    exact.forward(Q, K, V, O);
    const Matrix<TestType> reference = attention_reference(Q, K, V, opt);
    REQUIRE(O.allFinite());
    REQUIRE(reference.allFinite());
    // Convex combinations of the rows of V.
    REQUIRE(O.maxCoeff() <= V.maxCoeff());
    REQUIRE(O.minCoeff() >= V.minCoeff());
    // Scores this large are ill-conditioned ((d + 2) R u absolute rounding), which the bound states.
    const double tolerance = forward_tolerance(dk, n, radius, u);
    CAPTURE(tolerance);
    REQUIRE(relative_error(O, truth) <= tolerance);
    REQUIRE(relative_error(reference, truth) <= tolerance);
  }
}

TEST_CASE("bad exact-attention input throws std::invalid_argument naming the argument", "[exact_attention]") {
  const Matrix<double> Q = random_matrix<double>(6, 4, 41), K = random_matrix<double>(6, 4, 42);
  const Matrix<double> V = random_matrix<double>(6, 2, 43);
  Matrix<double> O(6, 2);
  ExactAttention<double> exact;
  REQUIRE_NOTHROW(exact.forward(Q, K, V, O));

  const auto forward_error = [&](const Matrix<double>& q, const Matrix<double>& k, const Matrix<double>& v,
                                 Matrix<double>& o, const char* name) {
    CAPTURE(name);
    REQUIRE_THROWS_AS(exact.forward(q, k, v, o), std::invalid_argument);
    REQUIRE_THROWS_WITH(exact.forward(q, k, v, o), Contains("ExactAttention::forward") && Contains(name));
    REQUIRE_THROWS_AS(attention_reference(q, k, v, exact.options()), std::invalid_argument);
    REQUIRE_THROWS_WITH(attention_reference(q, k, v, exact.options()), Contains("attention_reference") &&
                                                                             Contains(name));
  };
  // Mismatched shapes.
  forward_error(Q, random_matrix<double>(6, 3, 44), V, O, "'K'");
  forward_error(Q, K, random_matrix<double>(5, 2, 45), O, "'V'");
  Matrix<double> wrong_output(6, 3);
  REQUIRE_THROWS_AS(exact.forward(Q, K, V, wrong_output), std::invalid_argument);
  REQUIRE_THROWS_WITH(exact.forward(Q, K, V, wrong_output), Contains("'O'") && Contains("6x2") && Contains("6x3"));
  // n = 0, m = 0, d = 0.
  Matrix<double> empty_output(0, 2);
  forward_error(Matrix<double>(0, 4), K, V, empty_output, "'Q'");
  forward_error(Q, Matrix<double>(0, 4), Matrix<double>(0, 2), O, "'K'");
  forward_error(Matrix<double>(6, 0), Matrix<double>(6, 0), V, O, "'Q'");
  // Non-finite entries.
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    Matrix<double> badQ = Q, badK = K, badV = V;
    badQ(1, 2) = bad;
    badK(5, 0) = -bad;
    badV(3, 1) = bad;
    forward_error(badQ, K, V, O, "'Q'");
    forward_error(Q, badK, V, O, "'K'");
    forward_error(Q, K, badV, O, "'V'");
  }
  // Scale <= 0 or non-finite: rejected when the object is built and by the reference.
  for (const double bad : {0.0, -2.0, std::numeric_limits<double>::quiet_NaN()}) {
    CAPTURE(bad);
    REQUIRE_THROWS_AS(ExactAttention<double>(make_options(bad, false, 1)), std::invalid_argument);
    REQUIRE_THROWS_WITH(ExactAttention<double>(make_options(bad, false, 1)), Contains("'scale'"));
    REQUIRE_THROWS_WITH(attention_reference(Q, K, V, make_options(bad, false, 1)), Contains("'scale'"));
  }
  REQUIRE_THROWS_WITH(ExactAttention<float>(make_options(std::nullopt, false, 0)), Contains("'heads'"));
  REQUIRE_THROWS_WITH(ExactAttention<float>(AttentionOptions{}, 0, 16), Contains("'query_block'"));
  REQUIRE_THROWS_WITH(ExactAttention<float>(AttentionOptions{}, 16, 0), Contains("'key_block'"));
  // Heads must divide the columns (4 columns of Q, 2 of V).
  ExactAttention<double> three_heads(make_options(std::nullopt, false, 3));
  REQUIRE_THROWS_AS(three_heads.forward(Q, K, V, O), std::invalid_argument);
  REQUIRE_THROWS_WITH(three_heads.forward(Q, K, V, O), Contains("'heads'"));
  ExactAttention<double> four_heads(make_options(std::nullopt, false, 4));
  REQUIRE_THROWS_WITH(four_heads.forward(Q, K, V, O), Contains("'heads'") && Contains("'V'"));
  // Causal with more queries than keys (fewer are the last positions of the sequence).
  ExactAttention<double> causal(make_options(std::nullopt, true, 1));
  const Matrix<double> shorter_K = random_matrix<double>(4, 4, 46), shorter_V = random_matrix<double>(4, 2, 47);
  REQUIRE_THROWS_AS(causal.forward(Q, shorter_K, shorter_V, O), std::invalid_argument);
  REQUIRE_THROWS_WITH(causal.forward(Q, shorter_K, shorter_V, O), Contains("'Q'") && Contains("'K'"));
  REQUIRE_THROWS_WITH(attention_reference(Q, shorter_K, shorter_V, causal.options()), Contains("'Q'") &&
                                                                                          Contains("'K'"));
  // forward_rows: positions must match the rows, ascend and lie in [0, m).
  Matrix<double> two_rows(2, 2);
  const Matrix<double> two_queries = Q.topRows(2);
  REQUIRE_NOTHROW(causal.forward_rows(two_queries, {1, 4}, K, V, two_rows));
  for (const std::vector<Index>& bad : {std::vector<Index>{1}, std::vector<Index>{4, 1},
                                        std::vector<Index>{1, 6}, std::vector<Index>{-1, 2}}) {
    REQUIRE_THROWS_AS(causal.forward_rows(two_queries, bad, K, V, two_rows), std::invalid_argument);
    REQUIRE_THROWS_WITH(causal.forward_rows(two_queries, bad, K, V, two_rows), Contains("'positions'"));
  }
  Matrix<double> bad_rows(3, 2);
  REQUIRE_THROWS_WITH(causal.forward_rows(two_queries, {1, 4}, K, V, bad_rows), Contains("'O'"));
}

TEST_CASE("memory_overlaps: exact for blocks of one matrix, conservative otherwise", "[exact_attention][aliasing]") {
  using polyattn::detail::memory_of;
  using polyattn::detail::memory_overlaps;
  Matrix<float> A(10, 8), B(10, 8);
  REQUIRE(memory_overlaps(memory_of("a", A), memory_of("a", A)));
  REQUIRE_FALSE(memory_overlaps(memory_of("a", A), memory_of("b", B)));
  REQUIRE_FALSE(memory_overlaps(memory_of("l", A.leftCols(4)), memory_of("r", A.rightCols(4))));
  REQUIRE(memory_overlaps(memory_of("l", A.leftCols(5)), memory_of("r", A.rightCols(4))));
  REQUIRE_FALSE(memory_overlaps(memory_of("t", A.topRows(5)), memory_of("b", A.bottomRows(5))));
  REQUIRE(memory_overlaps(memory_of("t", A.topRows(6)), memory_of("b", A.bottomRows(5))));
  REQUIRE(memory_overlaps(memory_of("b", A.block(2, 1, 3, 3)), memory_of("b", A.block(4, 3, 3, 3))));
  REQUIRE_FALSE(memory_overlaps(memory_of("b", A.block(2, 1, 3, 3)), memory_of("b", A.block(5, 1, 3, 3))));
  // Interleaved address ranges: rows 6-9 of columns 1-2 against other rows of the same columns.
  REQUIRE_FALSE(memory_overlaps(memory_of("b", A.block(6, 1, 4, 2)), memory_of("t", A.block(0, 2, 6, 3))));
  REQUIRE(memory_overlaps(memory_of("b", A.block(6, 1, 4, 2)), memory_of("t", A.block(6, 2, 1, 3))));
  // The second block starts higher in its column than the first, so it reaches the first's next column.
  REQUIRE(memory_overlaps(memory_of("a", A.block(6, 1, 4, 2)), memory_of("b", A.block(2, 2, 5, 1))));
  REQUIRE_FALSE(memory_overlaps(memory_of("a", A.block(6, 1, 4, 2)), memory_of("b", A.block(2, 2, 4, 1))));
  REQUIRE(memory_overlaps(memory_of("b", A.block(2, 2, 5, 1)), memory_of("a", A.block(6, 1, 4, 2))));
  REQUIRE_FALSE(memory_overlaps(memory_of("e", A.leftCols(0)), memory_of("a", A)));
}

TEST_CASE("ExactAttention and the reference reject an output overlapping an input", "[exact_attention][aliasing]") {
  const Index n = 12, d = 4;
  Matrix<double> Q = random_matrix<double>(n, d, 1), K = random_matrix<double>(n, d, 2),
                 V = random_matrix<double>(n, d, 3);
  ExactAttention<double> exact(make_options(std::nullopt, true, 1), 4, 4);
  const auto rejects = [&](const char* input, auto&& call) {
    REQUIRE_THROWS_AS(call(), std::invalid_argument);
    REQUIRE_THROWS_WITH(call(), Contains("polyattn::ExactAttention::forward") && Contains("'O'") &&
                                    Contains(std::string("'") + input + "'"));
  };
  rejects("Q", [&] { exact.forward(Q, K, V, Q); });
  rejects("K", [&] { exact.forward(Q, K, V, K); });
  rejects("V", [&] { exact.forward(Q, K, V, V); });
  // Partial overlap: O shares one column with V.
  Matrix<double> buffer(n, 2 * d);
  buffer.leftCols(d) = V;
  rejects("V", [&] { exact.forward(Q, K, buffer.leftCols(d), buffer.middleCols(d - 1, d)); });
  REQUIRE_THROWS_WITH(exact.forward_rows(Q.topRows(2), {0, 1}, K, V, Q.topRows(2)),
                      Contains("ExactAttention::forward_rows") && Contains("'O'") && Contains("'Q'"));
  // Disjoint column blocks of one matrix are fine.
  exact.forward(Q, K, buffer.leftCols(d), buffer.rightCols(d));
  REQUIRE(relative_error(buffer.rightCols(d), attention_reference(Q, K, V, exact.options())) < 1e-13);
}

TEST_CASE("Exact attention of finite float input that overflows throws a domain_error saying so",
          "[exact_attention][overflow]") {
  const Index n = 16, d = 4;
  Matrix<float> Q = random_matrix<float>(n, d, 4), K = random_matrix<float>(n, d, 5),
                V = random_matrix<float>(n, d, 6);
  const AttentionOptions opt = make_options(std::nullopt, false, 1);
  // Scores ~1e40 exceed float; in double the same input is fine.
  const Matrix<float> Qbig = Q * 1e20f, Kbig = K * 1e20f;
  REQUIRE(attention_reference(Qbig.cast<double>(), Kbig.cast<double>(), V.cast<double>(), opt).allFinite());
  ExactAttention<float> exact(opt, 8, 8);
  Matrix<float> O(n, d);
  REQUIRE_THROWS_AS(exact.forward(Qbig, Kbig, V, O), std::domain_error);
  REQUIRE_THROWS_WITH(exact.forward(Qbig, Kbig, V, O),
                      Contains("polyattn::ExactAttention::forward") && Contains("overflowed float") &&
                          Contains("score radius"));
  REQUIRE_THROWS_AS(attention_reference(Qbig, Kbig, V, opt), std::domain_error);
  REQUIRE_THROWS_WITH(attention_reference(Qbig, Kbig, V, opt),
                      Contains("polyattn::attention_reference") && Contains("overflowed float"));
  // Values near the largest float: the weighted sums overflow.
  const Matrix<float> Vbig = Matrix<float>::Constant(n, d, 1e38f);
  REQUIRE_THROWS_AS(exact.forward(Q, K, Vbig, O), std::domain_error);
  REQUIRE_THROWS_WITH(exact.forward(Q, K, Vbig, O), Contains("ExactAttention::forward") && Contains("max |V|"));
  REQUIRE_THROWS_AS(attention_reference(Q, K, Vbig, opt), std::domain_error);
}

TEST_CASE("ExactAttention sizes its workspace by the problem, not by huge block options", "[exact_attention]") {
  const Index n = 16, d = 4;
  Matrix<double> Q = random_matrix<double>(n, d, 7), K = random_matrix<double>(n, d, 8),
                 V = random_matrix<double>(n, d, 9);
  for (const bool causal : {false, true}) {
    const AttentionOptions opt = make_options(std::nullopt, causal, 1);
    ExactAttention<double> exact(opt, Index(1) << 30, Index(1) << 30);
    Matrix<double> O(n, d);
    exact.forward(Q, K, V, O);
    REQUIRE(relative_error(O, attention_reference(Q, K, V, opt)) < 1e-13);
  }
}
