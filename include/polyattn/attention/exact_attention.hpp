/// \file attention/exact_attention.hpp
/// Exact softmax attention, \f$O = \mathrm{softmax}(c\,QK^\top\ [\circ\ M])\,V\f$, rows stabilised by
/// their maximum:
/// - attention_reference(): materialises the \f$n \times m\f$ score matrix of each head. Readable; the
///   reference every other routine is tested against.
/// - ExactAttention: streams over key blocks with an online softmax (as FlashAttention does) and never
///   forms the \f$n\times m\f$ matrix: \f$O(nd + b_q b_k)\f$ memory. This is the honest baseline every
///   speed-up is measured against, so its inner loop is two GEMM-shaped products per block.
#pragma once

#include "options.hpp"

#include <algorithm>
#include <limits>
#include <vector>

namespace polyattn {

namespace detail {

/// Sets `S(i, j) = -inf` where key `first_key + j` lies after query position `positions[i]`.
template <class Derived>
void mask_future_keys(Eigen::MatrixBase<Derived>& S, const Index* positions, Index first_key) {
  using T = typename Derived::Scalar;
  const T minus_inf = -std::numeric_limits<T>::infinity();
  for (Index i = 0; i < S.rows(); ++i)
    for (Index j = std::max<Index>(0, positions[i] - first_key + 1); j < S.cols(); ++j) S(i, j) = minus_inf;
}

}  // namespace detail

namespace detail {

/// attention_reference() reporting errors as `where`.
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> attention_reference(const char* where, const Eigen::MatrixBase<DQ>& Q,
                                                const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
                                                const AttentionOptions& opt) {
  using T = typename DQ::Scalar;
  static_check_scalar<T>();
  const auto shape = check_qkv(where, Q, K, V, opt);
  Matrix<T> O(shape.n, shape.heads * shape.dv);
  for (Index h = 0; h < shape.heads; ++h) {
    const T c = static_cast<T>(opt.resolved_scale(shape.dk));
    Matrix<T> S = c * Q.middleCols(h * shape.dk, shape.dk) * K.middleCols(h * shape.dk, shape.dk).transpose();
    if (opt.causal) S.template triangularView<Eigen::StrictlyUpper>().setConstant(-std::numeric_limits<T>::infinity());
    const Vector<T> row_max = S.rowwise().maxCoeff();
    S = (S.colwise() - row_max).array().exp();
    const Vector<T> row_sum = S.rowwise().sum();
    O.middleCols(h * shape.dv, shape.dv).noalias() =
        row_sum.cwiseInverse().asDiagonal() * (S * V.middleCols(h * shape.dv, shape.dv));
  }
  require_finite_result(where, "the output", O,
                        [&] { return exact_overflow_cause<T>(Q, K, V, shape, opt.resolved_scale(shape.dk)); });
  return O;
}

}  // namespace detail

/// Materialised exact attention (the reference). Returns O (n x h d_v). Throws std::invalid_argument for bad
/// shapes or non-finite input, std::domain_error when finite input overflows the scalar type.
///
/// \code
///   polyattn::Matrix<double> O = polyattn::attention_reference(Q, K, V, {1.0 / 16, true, 4});
/// \endcode
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> attention_reference(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                                const Eigen::MatrixBase<DV>& V, const AttentionOptions& opt = {}) {
  return detail::attention_reference("polyattn::attention_reference", Q, K, V, opt);
}

/// Streaming exact attention with online softmax over key blocks; keeps its workspace between calls.
///
/// For each block of \f$b_q\f$ queries it keeps the running row maximum \f$\mu\f$, normaliser \f$\ell\f$
/// and unnormalised output \f$A\f$; a key block with scores \f$S\f$ updates
/// \f[ \mu' = \max(\mu, \max_j S_{\cdot j}),\quad \ell' = e^{\mu-\mu'}\ell + \textstyle\sum_j e^{S_{\cdot j}-\mu'},
///     \quad A' = e^{\mu-\mu'}A + e^{S-\mu'}V_{\text{block}}, \f]
/// and \f$O = A/\ell\f$ at the end. Under a causal mask key blocks after the query block are skipped.
/// The per-row log-sum-exp \f$\mu + \log\ell\f$ is kept for a recomputing backward pass.
///
/// \code
///   polyattn::ExactAttention<float> exact({std::nullopt, /*causal=*/true, /*heads=*/2});
///   polyattn::Matrix<float> O(n, V.cols());
///   exact.forward(Q, K, V, O);
/// \endcode
template <class T>
class ExactAttention {
 public:
  /// \param query_block rows \f$b_q\f$ of Q per block, \param key_block rows \f$b_k\f$ of K and V per block.
  /// The workspace is \f$b_q b_k + b_q (d_k + d_v)\f$ scalars. The defaults (256 x 256 floats: 256 KiB of
  /// scores, fits L2) measured fastest on AVX-512 for \f$d \in [8, 64]\f$; both must be \f$\ge 1\f$.
  explicit ExactAttention(AttentionOptions options = {}, Index query_block = 256, Index key_block = 256)
      : options_(std::move(options)), query_block_(query_block), key_block_(key_block) {
    detail::static_check_scalar<T>();
    options_.check();
    detail::require(query_block >= 1, "polyattn::ExactAttention", "'query_block' must be >= 1, got ", query_block);
    detail::require(key_block >= 1, "polyattn::ExactAttention", "'key_block' must be >= 1, got ", key_block);
  }

  const AttentionOptions& options() const { return options_; }

  /// Writes \f$O\f$ (n x h d_v) for Q (n x h d_k), K (m x h d_k), V (m x h d_v). `O` must not share memory with
  /// Q, K or V (std::invalid_argument). Throws std::domain_error when finite input overflows T (scores beyond
  /// the largest T, or sums of weighted values).
  void forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V, MatrixRef<T> O) {
    forward(Q, K, V, O, "polyattn::ExactAttention::forward");
  }

  /// forward() reporting errors as `where` (for the backends built on it).
  void forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V, MatrixRef<T> O,
               const char* where);

  /// Exact attention of a few queries at arbitrary positions (ascending if causal) against all keys:
  /// row `i` of `O` is the attention output of query `Q.row(i)` standing at position `positions[i]`.
  /// Used by the a-posteriori error estimate of the approximate methods.
  void forward_rows(const ConstMatrixRef<T>& Q, const std::vector<Index>& positions, const ConstMatrixRef<T>& K,
                    const ConstMatrixRef<T>& V, MatrixRef<T> O);

  /// Per-row, per-head \f$\log\sum_j e^{S_{ij}}\f$ of the last forward call (n x h).
  const Matrix<T>& logsumexp() const { return logsumexp_; }

 private:
  // Finite input whose scores or value sums overflowed T leaves NaN or inf in O or the log-sum-exp: a domain_error
  // saying what overflowed instead. O(n d).
  void check_finite_results(const char* where, const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                            const ConstMatrixRef<T>& V, const MatrixRef<T>& O, const detail::HeadShape& shape) const {
    const auto cause = [&] {
      return detail::exact_overflow_cause<T>(Q, K, V, shape, options_.resolved_scale(shape.dk));
    };
    detail::require_finite_result(where, "the output", O, cause);
    detail::require_finite_result(where, "the log-sum-exp of the scores", logsumexp_, cause);
  }

  // Sizes the workspaces for blocks of up to `query_rows` queries; a later call of the same shape reuses them.
  void reserve(Index query_rows, const detail::HeadShape& shape) {
    const Index key_rows = std::min(key_block_, shape.m);
    detail::ensure_shape(scaled_queries_, query_rows, shape.dk);
    detail::ensure_shape(scores_, query_rows, key_rows);
    detail::ensure_shape(accumulator_, query_rows, shape.dv);
    for (Vector<T>* v : {&running_max_, &running_sum_, &block_max_, &rescale_}) detail::ensure_shape(*v, query_rows, 1);
  }

  // Online softmax of the (already scaled) queries `Qs` at `positions` over all keys, in the top rows of the
  // workspaces.
  void rows(const ConstMatrixRef<T>& Qs, const Index* positions, const ConstMatrixRef<T>& Kh,
            const ConstMatrixRef<T>& Vh, MatrixRef<T> O, Eigen::Ref<Vector<T>> lse) {
    const Index bq = Qs.rows();
    const Index key_end = options_.causal ? positions[bq - 1] + 1 : Kh.rows();
    auto running_max = running_max_.head(bq), running_sum = running_sum_.head(bq);
    auto block_max = block_max_.head(bq), rescale = rescale_.head(bq);
    auto accumulator = accumulator_.topRows(bq);
    running_max.setConstant(-std::numeric_limits<T>::infinity());
    running_sum.setZero();
    accumulator.setZero();
    for (Index k0 = 0; k0 < key_end; k0 += key_block_) {
      const Index bk = std::min(key_block_, key_end - k0);
      auto scores = scores_.topLeftCorner(bq, bk);
      scores.noalias() = Qs * Kh.middleRows(k0, bk).transpose();
      if (options_.causal && k0 + bk - 1 > positions[0]) detail::mask_future_keys(scores, positions, k0);
      // Column by column: each column is contiguous, so max, exp and sum run on full SIMD packets
      // (a `colwise() - vector` expression would fall back to scalar exp).
      block_max = running_max;
      for (Index j = 0; j < bk; ++j) block_max = block_max.cwiseMax(scores.col(j));
      rescale = (running_max - block_max).array().exp().matrix();
      running_sum.array() *= rescale.array();
      for (Index j = 0; j < bk; ++j) {
        auto column = scores.col(j).array();
        column = (column - block_max.array()).exp();
        running_sum.array() += column;
      }
      accumulator.array().colwise() *= rescale.array();
      accumulator.noalias() += scores * Vh.middleRows(k0, bk);
      running_max = block_max;
    }
    O.noalias() = running_sum.cwiseInverse().asDiagonal() * accumulator;
    lse = running_max + running_sum.array().log().matrix();
  }

  AttentionOptions options_;
  Index query_block_, key_block_;
  std::vector<Index> positions_;
  Matrix<T> scaled_queries_, scores_, accumulator_, logsumexp_;
  Vector<T> running_max_, running_sum_, block_max_, rescale_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
void ExactAttention<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                                MatrixRef<T> O, const char* where) {
  const auto shape = detail::check_qkv(where, Q, K, V, options_);
  detail::check_forward_output(where, shape, Q, K, V, O);
  detail::ensure_shape(logsumexp_, shape.n, shape.heads);
  const Index query_rows = std::min(query_block_, shape.n);  // never sized by the option alone
  positions_.resize(static_cast<std::size_t>(query_rows));
  reserve(query_rows, shape);
  const T c = static_cast<T>(options_.resolved_scale(shape.dk));
  for (Index h = 0; h < shape.heads; ++h) {
    const auto Kh = K.middleCols(h * shape.dk, shape.dk);
    const auto Vh = V.middleCols(h * shape.dv, shape.dv);
    for (Index q0 = 0; q0 < shape.n; q0 += query_block_) {
      const Index bq = std::min(query_block_, shape.n - q0);
      for (Index i = 0; i < bq; ++i) positions_[static_cast<std::size_t>(i)] = q0 + i;
      auto Qs = scaled_queries_.topRows(bq);
      Qs.noalias() = c * Q.block(q0, h * shape.dk, bq, shape.dk);
      rows(Qs, positions_.data(), Kh, Vh, O.block(q0, h * shape.dv, bq, shape.dv),
           logsumexp_.col(h).segment(q0, bq));
    }
  }
  check_finite_results(where, Q, K, V, O, shape);
}

template <class T>
void ExactAttention<T>::forward_rows(const ConstMatrixRef<T>& Q, const std::vector<Index>& positions,
                                     const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V, MatrixRef<T> O) {
  constexpr const char* where = "polyattn::ExactAttention::forward_rows";
  AttentionOptions relaxed = options_;
  relaxed.causal = false;  // the mask is given by `positions`, not by the row index
  const auto shape = detail::check_qkv(where, Q, K, V, relaxed);
  detail::require(static_cast<Index>(positions.size()) == shape.n, where, "'positions' must have ", shape.n,
                  " entries, got ", positions.size());
  detail::check_forward_output(where, shape, Q, K, V, O);
  for (std::size_t i = 0; i < positions.size(); ++i)
    detail::require(positions[i] >= 0 && positions[i] < shape.m && (i == 0 || positions[i] >= positions[i - 1]),
                    where, "'positions' must be ascending within [0, ", shape.m, "), got ", positions[i],
                    " at index ", i);
  detail::ensure_shape(logsumexp_, shape.n, shape.heads);
  reserve(shape.n, shape);
  const T c = static_cast<T>(options_.resolved_scale(shape.dk));
  for (Index h = 0; h < shape.heads; ++h) {
    scaled_queries_.noalias() = c * Q.middleCols(h * shape.dk, shape.dk);
    rows(scaled_queries_, positions.data(), K.middleCols(h * shape.dk, shape.dk),
         V.middleCols(h * shape.dv, shape.dv), O.middleCols(h * shape.dv, shape.dv), logsumexp_.col(h));
  }
  check_finite_results(where, Q, K, V, O, shape);
}

}  // namespace polyattn
