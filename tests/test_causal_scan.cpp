#include <polyattn/attention/causal_scan.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>
#include <stdexcept>

using Catch::Contains;
using polyattn::CausalScan;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::ScanDirection;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

namespace {

// (M o U Vf^T) with M_ij = [i >= j], formed explicitly.
template <class T>
Matrix<T> masked_dense(const Matrix<T>& U, const Matrix<T>& Vf) {
  Matrix<T> A = U * Vf.transpose();
  A.template triangularView<Eigen::StrictlyUpper>().setZero();
  return A;
}

// Both sides sum the same k * n products per entry in different orders; with N(0,1) data the rounding is
// O(sqrt(k n) u) relative to the result's norm, so a few hundred u is a tolerance with margin:
// 1e-13 in double, 5e-5 in float (n, k <= 64).
template <class T>
double tolerance() {
  return std::is_same<T, double>::value ? 1e-13 : 5e-5;
}

}  // namespace

TEMPLATE_TEST_CASE("Prefix and suffix scans equal the explicitly masked dense products", "[causal_scan]", float,
                   double) {
  using T = TestType;
  const Index n = 37, k = 6, m = 5;
  const Matrix<T> U = random_matrix<T>(n, k, 1), Vf = random_matrix<T>(n, k, 2), H = random_matrix<T>(n, m, 3);
  const Matrix<T> masked = masked_dense(U, Vf);
  const Matrix<T> expected_prefix = masked * H, expected_suffix = masked.transpose() * H;
  // 1 (row by row), 4 and 5 (divide 37 unevenly), 37 (one chunk), 64 (larger than n).
  for (const Index chunk : {Index(1), Index(4), Index(5), Index(37), Index(64)}) {
    CAPTURE(chunk);
    CausalScan<T> scan({chunk});
    Matrix<T> Y = Matrix<T>::Constant(n, m, std::numeric_limits<T>::quiet_NaN());  // must be overwritten
    scan.prefix_product(U, Vf, H, Y);
    CHECK(relative_error(Y, expected_prefix) < tolerance<T>());
    Y.setConstant(std::numeric_limits<T>::quiet_NaN());
    scan.suffix_product(U, Vf, H, Y);
    CHECK(relative_error(Y, expected_suffix) < tolerance<T>());
  }
}

TEST_CASE("Suffix scan is not the prefix scan of the swapped factors", "[causal_scan]") {
  // The paper's prefix scan applied to (Vf, U) computes M o (Vf U^T), not (M o U Vf^T)^T: the two differ
  // by everything strictly above/below the diagonal, so this guards the direction of the suffix scan.
  const Index n = 12, k = 3, m = 2;
  const Matrix<double> U = random_matrix<double>(n, k, 4), Vf = random_matrix<double>(n, k, 5);
  const Matrix<double> H = random_matrix<double>(n, m, 6);
  CausalScan<double> scan({5});
  Matrix<double> suffix(n, m), swapped_prefix(n, m);
  scan.suffix_product(U, Vf, H, suffix);
  scan.prefix_product(Vf, U, H, swapped_prefix);
  CHECK(relative_error(suffix, masked_dense<double>(U, Vf).transpose() * H) < 1e-13);
  CHECK(relative_error(swapped_prefix, suffix) > 0.1);
}

TEMPLATE_TEST_CASE("Chunk-by-chunk scan over column tiles equals the whole-matrix scan", "[causal_scan]", float,
                   double) {
  using T = TestType;
  const Index n = 23, k = 7, m = 3, b = 6;
  const Matrix<T> U = random_matrix<T>(n, k, 7), Vf = random_matrix<T>(n, k, 8), H = random_matrix<T>(n, m, 9);
  for (const ScanDirection direction : {ScanDirection::prefix, ScanDirection::suffix}) {
    const bool prefix = direction == ScanDirection::prefix;
    CAPTURE(prefix);
    CausalScan<T> scan({b});
    Matrix<T> whole(n, m), tiled(n, m);
    if (prefix)
      scan.prefix_product(U, Vf, H, whole);
    else
      scan.suffix_product(U, Vf, H, whole);
    // Tiles of 3, 3 and 1 columns, visited out of order (the state rows are addressed by offset).
    const Index offsets[] = {3, 0, 6}, widths[] = {3, 3, 1};
    const Index chunks = (n + b - 1) / b;
    scan.start(direction, k, m);
    for (Index step = 0; step < chunks; ++step) {
      const Index first = (prefix ? step : chunks - 1 - step) * b, rows = std::min(b, n - first);
      auto Yb = tiled.middleRows(first, rows);
      Yb.setZero();
      scan.begin_chunk(rows);
      for (int t = 0; t < 3; ++t)
        scan.add_factors(offsets[t], U.block(first, offsets[t], rows, widths[t]),
                         Vf.block(first, offsets[t], rows, widths[t]), H.middleRows(first, rows), Yb);
      scan.end_chunk(H.middleRows(first, rows), Yb);
    }
    CHECK(relative_error(tiled, whole) < tolerance<T>());
    const Matrix<T> masked = masked_dense(U, Vf);
    CHECK(relative_error(tiled, prefix ? Matrix<T>(masked * H) : Matrix<T>(masked.transpose() * H)) <
          tolerance<T>());
  }
}

TEST_CASE("Causal scan rejects bad input naming the argument", "[causal_scan]") {
  const Index n = 8, k = 3, m = 2;
  const Matrix<double> U = random_matrix<double>(n, k, 10), Vf = random_matrix<double>(n, k, 11);
  const Matrix<double> H = random_matrix<double>(n, m, 12);
  Matrix<double> Y(n, m);
  CausalScan<double> scan;
  CHECK_THROWS_WITH(scan.prefix_product(U, random_matrix<double>(n, k + 1, 13), H, Y),
                    Contains("prefix_product") && Contains("'Vf'") && Contains("8x3") && Contains("8x4"));
  CHECK_THROWS_WITH(scan.suffix_product(U, Vf, random_matrix<double>(n - 1, m, 14), Y),
                    Contains("suffix_product") && Contains("'H'") && Contains("7x2"));
  Matrix<double> wrong_y(n, m + 1);
  CHECK_THROWS_WITH(scan.prefix_product(U, Vf, H, wrong_y), Contains("'Y'") && Contains("8x2"));
  Matrix<double> empty_y(0, m);
  CHECK_THROWS_WITH(scan.prefix_product(Matrix<double>(0, k), Matrix<double>(0, k), Matrix<double>(0, m), empty_y),
                    Contains("'U'") && Contains("non-empty"));
  Matrix<double> bad = U;
  bad(2, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(scan.prefix_product(bad, Vf, H, Y), Contains("'U'") && Contains("(2, 1)"));
  CHECK_THROWS_AS(CausalScan<double>({0}), std::invalid_argument);
  CHECK_THROWS_WITH(CausalScan<double>({0}), Contains("chunk_size"));
  scan.start(ScanDirection::prefix, k, m);
  scan.begin_chunk(4);
  Matrix<double> Yb(4, m);
  CHECK_THROWS_WITH(scan.add_factors(2, U.topRows(4), Vf.topRows(4), H.topRows(4), Yb),
                    Contains("add_factors") && Contains("rank 3"));
  CHECK_THROWS_WITH(scan.end_chunk(H.topRows(3), Yb.topRows(3)), Contains("'H'") && Contains("4x2"));
}
