/// \file test_support.hpp
/// Helpers that several test files share (the gradient harness is gradient_check.hpp).
#pragma once

#include <polyattn/attention/options.hpp>
#include <polyattn/attention/polynomial.hpp>
#include <polyattn/common.hpp>
#include <polyattn/parallel/state_exchange.hpp>
#include <polyattn/parallel/threads.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace polyattn::testing {

/// Restores the library-wide thread count to its default (OMP_NUM_THREADS, else every core) when a test that
/// changed it ends, whether it passed or threw.
struct ThreadCountGuard {
  ThreadCountGuard() = default;
  ThreadCountGuard(const ThreadCountGuard&) = delete;
  ThreadCountGuard& operator=(const ThreadCountGuard&) = delete;
  ~ThreadCountGuard() { polyattn::set_num_threads(0); }
};

/// Row-major storage of `m` with `padding` unused columns of 7 on the right, so that a Ref to its left columns has
/// an outer stride larger than its width (as a head view of a wider projection has); tests check that the padding
/// is never written.
template <class T>
RowMajorMatrix<T> padded_row_major(const Matrix<T>& m, Index padding) {
  RowMajorMatrix<T> storage = RowMajorMatrix<T>::Constant(m.rows(), m.cols() + padding, T(7));
  storage.leftCols(m.cols()) = m;
  return storage;
}

/// Runs forward() and backward() of a backend made by `make()` on the column-major Q, K, V, G on one thread, then of
/// fresh ones on row-major copies (left blocks of wider matrices, so that rows lie further apart than their width) on
/// 1, 2 and 3 threads, and checks that the row-major output and gradients are bitwise the column-major ones and that
/// no padding column is written. Returns the column-major output.
template <class T, class Make>
Matrix<T> check_row_major_is_bitwise(const Make& make, const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                                     const Matrix<T>& G) {
  ThreadCountGuard guard;
  polyattn::set_num_threads(1);
  auto columns = make();
  Matrix<T> O(Q.rows(), V.cols()), dQ(Q.rows(), Q.cols()), dK(K.rows(), K.cols()), dV(V.rows(), V.cols());
  columns.forward(Q, K, V, O);
  columns.backward(Q, K, V, O, G, dQ, dK, dV);
  const auto Qr = padded_row_major(Q, 2), Kr = padded_row_major(K, 1), Vr = padded_row_major(V, 3),
             Gr = padded_row_major(G, 1);
  const auto zeros = [](const Matrix<T>& like, Index padding) {
    return padded_row_major(Matrix<T>::Zero(like.rows(), like.cols()).eval(), padding);
  };
  for (const int threads : {1, 2, 3}) {
    CAPTURE(threads);
    polyattn::set_num_threads(threads);
    auto Or = zeros(O, 2), dQr = zeros(dQ, 1), dKr = zeros(dK, 0), dVr = zeros(dV, 5);
    auto rows = make();
    rows.forward(Qr.leftCols(Q.cols()), Kr.leftCols(K.cols()), Vr.leftCols(V.cols()), Or.leftCols(O.cols()));
    rows.backward(Qr.leftCols(Q.cols()), Kr.leftCols(K.cols()), Vr.leftCols(V.cols()), Or.leftCols(O.cols()),
                  Gr.leftCols(G.cols()), dQr.leftCols(dQ.cols()), dKr.leftCols(dK.cols()), dVr.leftCols(dV.cols()));
    CHECK(Matrix<T>(Or.leftCols(O.cols())) == O);
    CHECK(Matrix<T>(dQr.leftCols(dQ.cols())) == dQ);
    CHECK(Matrix<T>(dKr.leftCols(dK.cols())) == dK);
    CHECK(Matrix<T>(dVr.leftCols(dV.cols())) == dV);
    CHECK((Or.rightCols(2).array() == T(7)).all());
    CHECK((dVr.rightCols(5).array() == T(7)).all());
  }
  return O;
}

/// A StateExchange of one rank: every collective is the identity (exclusive sums are zero).
struct SingleRankExchange final : polyattn::StateExchange {
  int rank() const override { return 0; }
  int ranks() const override { return 1; }
  void all_reduce_sum(Eigen::Ref<Eigen::MatrixXd>) override {}
  void exclusive_prefix_sum(Eigen::Ref<Eigen::MatrixXd> values, bool) override { values.setZero(); }
  double all_reduce_max(double value) override { return value; }
  void all_reduce_min(Eigen::Ref<Eigen::VectorXd>) override {}
  void all_gather_rows(const Eigen::Ref<const polyattn::RowMajorMatrixXd>& local, const std::vector<Index>&,
                       polyattn::RowMajorMatrixXd& gathered) override {
    gathered = local;
  }
  void reduce_scatter_rows(const Eigen::Ref<const polyattn::RowMajorMatrixXd>& all_rows, const std::vector<Index>&,
                           Eigen::Ref<polyattn::RowMajorMatrixXd> local) override {
    local = all_rows;
  }
};

/// n token ids drawn uniformly from [0, vocab).
inline std::vector<Index> random_ids(std::size_t n, Index vocab, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Index> ids(n);
  for (Index& id : ids) id = std::uniform_int_distribution<Index>(0, vocab - 1)(rng);
  return ids;
}

/// p(x) by Horner's rule in long double, independently of the library's evaluation.
inline long double evaluate_long_double(const Polynomial& p, long double x) {
  long double value = 0;
  for (auto a = p.coeffs.rbegin(); a != p.coeffs.rend(); ++a) value = value * x + static_cast<long double>(*a);
  return value;
}

/// R = c max_i ||q_i|| max_j ||k_j||, the maximum over heads, which bounds every |score|; measured independently
/// of the library.
template <class T>
double score_radius(const Matrix<T>& Q, const Matrix<T>& K, const AttentionOptions& opt) {
  const Index dk = Q.cols() / opt.heads;
  double radius = 0;
  for (Index h = 0; h < opt.heads; ++h)
    radius = std::max(radius, opt.resolved_scale(dk) *
                                  static_cast<double>(Q.middleCols(h * dk, dk).rowwise().norm().maxCoeff()) *
                                  static_cast<double>(K.middleCols(h * dk, dk).rowwise().norm().maxCoeff()));
  return radius;
}

}  // namespace polyattn::testing
