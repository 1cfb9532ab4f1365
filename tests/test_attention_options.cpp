#include <polyattn/attention/options.hpp>

#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

using polyattn::AttentionOptions;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::detail::check_qkv;
using Catch::Contains;

namespace {
constexpr const char* where = "test_where";
}

TEST_CASE("AttentionOptions defaults and resolved scale", "[attention_options]") {
  const AttentionOptions defaults;
  REQUIRE_FALSE(defaults.scale.has_value());
  REQUIRE_FALSE(defaults.causal);
  REQUIRE(defaults.heads == 1);
  REQUIRE_NOTHROW(defaults.check());
  REQUIRE(defaults.resolved_scale(16) == 0.25);
  REQUIRE(defaults.resolved_scale(2) == Approx(1 / std::sqrt(2.0)).epsilon(1e-15));
  AttentionOptions paper;
  paper.scale = 1.0 / 16;
  REQUIRE(paper.resolved_scale(4) == 1.0 / 16);
}

TEST_CASE("AttentionOptions::check names the offending field", "[attention_options]") {
  for (const polyattn::Index heads : {0, -2}) {
    AttentionOptions opt;
    opt.heads = heads;
    REQUIRE_THROWS_AS(opt.check(), std::invalid_argument);
    REQUIRE_THROWS_WITH(opt.check(), Contains("'heads'"));
  }
  for (const double scale : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(),
                             std::numeric_limits<double>::infinity()}) {
    CAPTURE(scale);
    AttentionOptions opt;
    opt.scale = scale;
    REQUIRE_THROWS_AS(opt.check(), std::invalid_argument);
    REQUIRE_THROWS_WITH(opt.check(), Contains("'scale'"));
  }
}

TEST_CASE("check_qkv returns the per-head shape", "[attention_options]") {
  AttentionOptions opt;
  opt.heads = 3;
  const Matrix<double> Q = Matrix<double>::Zero(5, 12), K = Matrix<double>::Zero(7, 12), V = Matrix<double>::Zero(7, 6);
  const auto shape = check_qkv(where, Q, K, V, opt);
  REQUIRE(shape.n == 5);
  REQUIRE(shape.m == 7);
  REQUIRE(shape.dk == 4);
  REQUIRE(shape.dv == 2);
  REQUIRE(shape.heads == 3);
}

TEST_CASE("check_qkv rejects bad shapes and entries, naming the argument", "[attention_options]") {
  const AttentionOptions opt;
  const Matrix<float> Q = Matrix<float>::Ones(4, 6), K = Matrix<float>::Ones(4, 6), V = Matrix<float>::Ones(4, 2);
  REQUIRE_NOTHROW(check_qkv(where, Q, K, V, opt));
  // Empty arguments: n = 0, m = 0, d = 0.
  REQUIRE_THROWS_WITH(check_qkv(where, Matrix<float>(0, 6), K, V, opt), Contains(where) && Contains("'Q'"));
  REQUIRE_THROWS_WITH(check_qkv(where, Q, Matrix<float>(0, 6), Matrix<float>(0, 2), opt), Contains("'K'"));
  REQUIRE_THROWS_WITH(check_qkv(where, Matrix<float>(4, 0), Matrix<float>(4, 0), V, opt), Contains("'Q'"));
  REQUIRE_THROWS_WITH(check_qkv(where, Q, K, Matrix<float>(4, 0), opt), Contains("'V'"));
  // Mismatched shapes.
  REQUIRE_THROWS_AS(check_qkv(where, Q, Matrix<float>::Ones(4, 5), V, opt), std::invalid_argument);
  REQUIRE_THROWS_WITH(check_qkv(where, Q, Matrix<float>::Ones(4, 5), V, opt), Contains("'Q'") && Contains("'K'"));
  REQUIRE_THROWS_WITH(check_qkv(where, Q, K, Matrix<float>::Ones(3, 2), opt), Contains("'V'") && Contains("3"));
  // Heads must divide the columns of Q/K and of V.
  AttentionOptions four_heads;
  four_heads.heads = 4;
  REQUIRE_THROWS_WITH(check_qkv(where, Q, K, Matrix<float>::Ones(4, 4), four_heads), Contains("'heads'"));
  AttentionOptions two_heads;
  two_heads.heads = 2;
  REQUIRE_NOTHROW(check_qkv(where, Q, K, V, two_heads));
  REQUIRE_THROWS_WITH(check_qkv(where, Q, K, Matrix<float>::Ones(4, 3), two_heads), Contains("'heads'") &&
                                                                                      Contains("'V'"));
  // Causal attention needs n == m.
  AttentionOptions causal;
  causal.causal = true;
  REQUIRE_NOTHROW(check_qkv(where, Q, K, V, causal));
  REQUIRE_THROWS_AS(check_qkv(where, Matrix<float>::Ones(3, 6), K, V, causal), std::invalid_argument);
  REQUIRE_THROWS_WITH(check_qkv(where, Matrix<float>::Ones(3, 6), K, V, causal), Contains("'Q'") && Contains("'K'"));
  REQUIRE_NOTHROW(check_qkv(where, Matrix<float>::Ones(3, 6), K, V, opt));
  // Non-finite entries, named with their position.
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()}) {
    Matrix<float> badQ = Q, badK = K, badV = V;
    badQ(2, 3) = bad;
    badK(0, 5) = bad;
    badV(3, 1) = bad;
    REQUIRE_THROWS_WITH(check_qkv(where, badQ, K, V, opt), Contains("'Q'") && Contains("(2, 3)"));
    REQUIRE_THROWS_WITH(check_qkv(where, Q, badK, V, opt), Contains("'K'") && Contains("(0, 5)"));
    REQUIRE_THROWS_WITH(check_qkv(where, Q, K, badV, opt), Contains("'V'") && Contains("(3, 1)"));
  }
  // Options are checked too.
  AttentionOptions bad_scale;
  bad_scale.scale = -1.0;
  REQUIRE_THROWS_WITH(check_qkv(where, Q, K, V, bad_scale), Contains("'scale'"));
}

// The parallel passes over a whole input (blocks of input_pass_rows rows): the entry an error names is the right
// row of the whole matrix (the first non-finite entry of the first block that has one), and max_abs() finds the
// largest |entry|, inf or NaN, in any block, for any thread count.
TEST_CASE("the parallel input passes name the right entry and find the largest one in any block",
          "[attention_options]") {
  using polyattn::detail::input_pass_rows;
  using polyattn::detail::max_abs;
  using polyattn::detail::require_finite_in_parallel;
  polyattn::testing::ThreadCountGuard guard;
  const Index n = 3 * input_pass_rows + 17;  // four blocks, the last one partial
  const Index infinite_row = 2 * input_pass_rows + 10, nan_row = input_pass_rows + 3;
  for (const int threads : {1, 2, 3}) {
    polyattn::set_num_threads(threads);
    INFO("threads " << threads);
    Matrix<double> X = Matrix<double>::Random(n, 3);
    X(n - 5, 2) = -4.5;
    REQUIRE(max_abs(X) == 4.5);
    REQUIRE_NOTHROW(require_finite_in_parallel("f", "X", X));
    X(infinite_row, 1) = std::numeric_limits<double>::infinity();
    REQUIRE(max_abs(X) == std::numeric_limits<double>::infinity());
    REQUIRE_THROWS_WITH(require_finite_in_parallel("f", "X", X),
                        Contains("f: argument 'X' has a non-finite entry (inf) at (" + std::to_string(infinite_row) +
                                 ", 1)"));
    X(nan_row, 0) = std::numeric_limits<double>::quiet_NaN();
    REQUIRE(std::isnan(max_abs(X)));
    REQUIRE_THROWS_WITH(require_finite_in_parallel("f", "X", X),
                        Contains("(nan) at (" + std::to_string(nan_row) + ", 0)"));
  }
  REQUIRE(max_abs(Matrix<float>(0, 3)) == 0);
  REQUIRE_NOTHROW(require_finite_in_parallel("f", "X", Matrix<float>(0, 3)));
}

// max_squared_row_norm() takes rows 16 at a time and zero-pads the last ones: every row counts, whatever the
// tail, and a NaN (or else an inf) anywhere makes the result NaN (inf).
template <class T>
void check_max_squared_row_norm() {
  using polyattn::detail::max_squared_row_norm;
  for (const Index n : {Index(0), Index(1), Index(15), Index(16), Index(17), Index(100)})
    for (const Index d : {Index(1), Index(5)}) {
      CAPTURE(n, d);
      const Matrix<T> wide = Matrix<T>::Random(n + 3, d + 2);
      const auto X = wide.block(2, 1, n, d);  // outer stride n + 3
      double expected = 0;
      for (Index i = 0; i < n; ++i) {
        double sum = 0;
        for (Index j = 0; j < d; ++j) sum += static_cast<double>(X(i, j)) * static_cast<double>(X(i, j));
        expected = std::max(expected, sum);
      }
      CHECK(max_squared_row_norm(X) == Approx(expected).epsilon(1e-15));
      for (Index row = 0; row < n; row += std::max<Index>(1, n / 3)) {
        Matrix<T> Y = X;
        Y(row, d - 1) = std::numeric_limits<T>::infinity();
        CHECK(std::isinf(max_squared_row_norm(Y)));
        Y(n - 1 - row, 0) = std::numeric_limits<T>::quiet_NaN();
        CHECK(std::isnan(max_squared_row_norm(Y)));
      }
    }
}

TEST_CASE("max_squared_row_norm counts every row and propagates NaN and inf", "[attention_options]") {
  check_max_squared_row_norm<float>();
  check_max_squared_row_norm<double>();
}

// row_statistics() transposes a row-major matrix piece by piece before summing: the same sums as on the
// column-major copy, bitwise, wherever the largest row lies, and a NaN or inf in any piece is still found.
TEST_CASE("row_statistics of a row-major matrix equals that of its column-major copy", "[attention_options]") {
  using polyattn::detail::input_pass_rows;
  using polyattn::detail::row_statistics;
  polyattn::testing::ThreadCountGuard guard;
  const Index n = input_pass_rows + 700;  // two blocks; the first has 16 pieces of 512 rows, the second 2
  for (const int threads : {1, 2, 3}) {
    polyattn::set_num_threads(threads);
    INFO("threads " << threads);
    Matrix<float> X = Matrix<float>::Random(n, 5);
    for (const Index largest_row : {Index(3), Index(600), input_pass_rows + 650}) {
      X.row(largest_row).setConstant(3.0f);
      const polyattn::RowMajorMatrix<float> rows = X;
      const auto expected = row_statistics(X), actual = row_statistics(rows);
      CHECK(actual.max_row_norm == expected.max_row_norm);
      CHECK(actual.max_abs == expected.max_abs);
      CHECK(actual.max_abs == 3.0);
    }
    for (const float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
      Matrix<float> Y = X;
      Y(1100, 4) = bad;
      const polyattn::RowMajorMatrix<float> rows = Y;
      const auto expected = row_statistics(Y), actual = row_statistics(rows);
      CHECK(std::isnan(actual.max_row_norm) == std::isnan(expected.max_row_norm));
      CHECK(std::isinf(actual.max_row_norm) == std::isinf(expected.max_row_norm));
      CHECK(!std::isfinite(actual.max_row_norm));
    }
  }
}
