// The chunked causal scan's parts (attention/chunked_scan.hpp): the chunk and window policy, the exclusive scan of
// the slots in either order and across windows, and the masked polynomial block. The methods' scans themselves are
// checked against their references in test_polynomial_attention.cpp, test_adjoint_gradients.cpp and
// test_paper_gradients.cpp, and across thread counts and windows in test_parallel_attention.cpp.
#include <polyattn/attention/chunked_scan.hpp>
#include <polyattn/attention/polynomial.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

using polyattn::Index;
using polyattn::Matrix;
using polyattn::detail::ScanOrder;
using polyattn::testing::random_matrix;
using polyattn::testing::ThreadCountGuard;

TEST_CASE("Scan chunks and windows follow the chunk size and the window bytes", "[chunked_scan]") {
  using polyattn::detail::scan_rows;
  using polyattn::detail::window_chunks;
  CHECK(scan_rows(0, 1000) == polyattn::detail::default_scan_rows);
  CHECK(scan_rows(0, 10) == 10);
  CHECK(scan_rows(0, 0) == 1);  // an empty shard: no chunks, but a valid chunk size
  CHECK(scan_rows(16, 1000) == 16);
  CHECK(polyattn::detail::scan_chunks(16, 1000) == 63);
  CHECK(polyattn::detail::scan_chunks(0, 0) == 0);
  CHECK(window_chunks(100, 1000.0, 3500) == 3);
  CHECK(window_chunks(100, 1000.0, 1) == 1);        // at least one chunk
  CHECK(window_chunks(100, 1000.0, 1 << 30) == 100);  // at most all of them
  CHECK(window_chunks(0, 1000.0, 0) == 1);
}

TEST_CASE("Windows cover the chunks in scan order", "[chunked_scan]") {
  using Window = std::tuple<Index, Index, Index>;
  for (const ScanOrder order : {ScanOrder::prefix, ScanOrder::suffix}) {
    std::vector<Window> windows;
    polyattn::detail::for_each_window(8, 3, order, [&](Index index, Index first, Index count) {
      windows.emplace_back(index, first, count);
    });
    std::vector<Window> expected{{0, 0, 3}, {1, 3, 3}, {2, 6, 2}};
    if (order == ScanOrder::suffix) std::reverse(expected.begin(), expected.end());
    CHECK(windows == expected);
  }
  int calls = 0;
  polyattn::detail::for_each_window(0, 3, ScanOrder::prefix, [&](Index, Index, Index) { ++calls; });
  CHECK(calls == 0);  // an empty shard
}

TEMPLATE_TEST_CASE("The exclusive scan gives every slot the sum of the slots before it, across windows",
                   "[chunked_scan]", float, double) {
  using T = TestType;
  ThreadCountGuard guard;
  // Slots of 3 x 200 entries (more than one parallel block of 256 entries), 7 chunks in windows of 4 and 3.
  const Index rows = 3, cols = 200, chunks = 7;
  const Matrix<T> states = random_matrix<T>(rows, cols * chunks, 5);
  const Matrix<T> incoming = random_matrix<T>(rows, cols, 6);
  for (const ScanOrder order : {ScanOrder::prefix, ScanOrder::suffix}) {
    // The reference: each slot's sum, added one chunk at a time in scan order, as the scan must.
    Matrix<T> expected(rows, cols * chunks), running = incoming;
    for (Index step = 0; step < chunks; ++step) {
      const Index chunk = order == ScanOrder::prefix ? step : chunks - 1 - step;
      expected.middleCols(chunk * cols, cols) = running;
      running += states.middleCols(chunk * cols, cols);
    }
    for (const int threads : {1, 2, 3}) {
      polyattn::set_num_threads(threads);
      Matrix<T> slots = states, carry = incoming;
      // The windows in scan order: chunks [0, 4) then [4, 7) for a prefix scan, the other way round for a suffix.
      const Index first_window = order == ScanOrder::prefix ? 0 : 4, first_count = order == ScanOrder::prefix ? 4 : 3;
      const Index second_window = order == ScanOrder::prefix ? 4 : 0, second_count = 7 - first_count;
      for (const auto& [first, count] : {std::pair<Index, Index>{first_window, first_count},
                                        std::pair<Index, Index>{second_window, second_count}}) {
        Eigen::Map<Matrix<T>> window(slots.data() + first * rows * cols, rows, count * cols);
        polyattn::detail::exclusive_scan<T>(window, carry, order, 1e9);
      }
      INFO("suffix " << (order == ScanOrder::suffix) << ", threads " << threads);
      CHECK(slots == expected);
      CHECK(carry == running);
    }
  }
}

TEMPLATE_TEST_CASE("The masked polynomial block is p and p' of the scores on and below the diagonal",
                   "[chunked_scan]", float, double) {
  using T = TestType;
  const double tolerance = std::is_same<T, float>::value ? 1e-5 : 1e-13;
  const polyattn::Polynomial p = polyattn::taylor_exp(4), dp = p.derivative();
  const std::vector<T> coefficients(p.coeffs.begin(), p.coeffs.end());
  // Chunks shorter than a SIMD packet, of whole packets and with a partial last packet.
  for (const Index rows : {Index(1), Index(7), Index(16), Index(37)}) {
    const Matrix<T> Q = random_matrix<T>(rows, 5, 7, 0.5), K = random_matrix<T>(rows, 5, 8, 0.5);
    const Matrix<double> S = Q.template cast<double>() * K.template cast<double>().transpose();
    for (const bool with_derivative : {false, true}) {
      // NaN where nothing should be written, to see what the panels hold.
      Matrix<T> block = Matrix<T>::Constant(rows, rows, std::numeric_limits<T>::quiet_NaN());
      Matrix<T> derivatives = block;
      polyattn::detail::causal_polynomial_block<T>(coefficients.data(), p.degree(), Q, K, block,
                                                   with_derivative ? &derivatives : nullptr);
      constexpr Index lanes = polyattn::detail::BlockProductTile<T>::lanes;
      CAPTURE(rows, with_derivative);
      for (Index j = 0; j < rows; ++j)
        for (Index i = j / lanes * lanes; i < rows; ++i) {  // column j's panel starts at its packet
          CAPTURE(i, j);
          if (i < j) {
            CHECK(block(i, j) == T(0));  // masked within the panel
            continue;
          }
          CHECK(std::abs(static_cast<double>(block(i, j)) - p(S(i, j))) <= tolerance * p(S(i, j)));
          if (with_derivative)
            CHECK(std::abs(static_cast<double>(derivatives(i, j)) - dp(S(i, j))) <= tolerance * std::abs(dp(S(i, j))));
        }
      if (!with_derivative) CHECK(derivatives.hasNaN());  // not written (it is all NaN)
    }
  }
}
