/// \file attention/exact_attention.hpp
/// Exact softmax attention, \f$O = \mathrm{softmax}(c\,QK^\top\ [\circ\ M])\,V\f$, rows stabilised by
/// their maximum:
/// - attention_reference(): materialises the \f$n \times m\f$ score matrix of each head. Readable; the
///   reference every other routine is tested against.
/// - ExactAttention: streams over key blocks with an online softmax (as FlashAttention does) and never
///   forms the \f$n\times m\f$ matrix: \f$O(nd + b_q b_k)\f$ memory. This is the honest baseline every
///   speed-up is measured against, so its inner loop is two GEMM-shaped products per block. Query blocks
///   are independent and run on polyattn's threads (parallel/threads.hpp), bitwise the same for any count.
///
/// Under the causal mask there may be fewer queries than keys: the \f$n\f$ queries are the last \f$n\f$ of the
/// \f$m\f$ positions, query \f$i\f$ attends to keys \f$j \le i + (m - n)\f$ (AttentionOptions::causal).
#pragma once

#include "../parallel/threads.hpp"
#include "options.hpp"

#include <algorithm>
#include <limits>
#include <vector>

namespace polyattn {

namespace detail {

/// The rows [row, row + rows) of columns [col, col + cols) of `X` as a column-major matrix: the block itself, or,
/// for a row-major `X`, its transposed copy in the top-left corner of `scratch` (at least rows x cols). Products
/// of the exact methods take their operands through it, so that Eigen runs the same column-major kernels (and
/// gives the same bits) whatever the caller's layout; the copy is O(rows cols) against a product of O(rows cols b).
template <class T, class Derived>
ConstMatrixRef<T> column_major_block(const Eigen::MatrixBase<Derived>& X, Index row, Index col, Index rows,
                                     Index cols, Matrix<T>& scratch) {
  if constexpr (bool(Derived::IsRowMajor)) {
    auto block = scratch.topLeftCorner(rows, cols);
    transpose_into<T>(X.block(row, col, rows, cols).transpose(), block);
    return block;
  } else {
    return X.block(row, col, rows, cols);
  }
}

/// Sets `S(i, j) = -inf` where key `first_key + j` lies after query position `positions[i]`.
template <class Derived>
void mask_future_keys(Eigen::MatrixBase<Derived>& S, const Index* positions, Index first_key) {
  using T = typename Derived::Scalar;
  const T minus_inf = -std::numeric_limits<T>::infinity();
  for (Index i = 0; i < S.rows(); ++i)
    for (Index j = std::max<Index>(0, positions[i] - first_key + 1); j < S.cols(); ++j) S(i, j) = minus_inf;
}

/// Position of query 0 under the bottom-right causal mask: the n queries are the last of the m positions, so
/// query i stands at position i + (m - n) and sees keys 0 .. i + (m - n).
inline Index first_query_position(const HeadShape& shape) { return shape.m - shape.n; }

/// Sets the keys that no query of a materialised n x m score matrix `S` may see to -inf: under the
/// bottom-right causal mask, the strict upper triangle of the last n columns (all of S when n == m).
template <class Derived>
void mask_scores_causally(Eigen::MatrixBase<Derived>& S) {
  using T = typename Derived::Scalar;
  S.rightCols(S.rows()).template triangularView<Eigen::StrictlyUpper>().setConstant(
      -std::numeric_limits<T>::infinity());
}

/// Number of work items of a loop over `blocks` blocks whose cost grows or shrinks linearly with the block index
/// (causal query blocks see more keys the later they stand, causal key blocks fewer queries): item `i` takes
/// blocks `i` and `blocks - 1 - i`, so every item costs about the same and parallel_for()'s contiguous share of
/// items gives each thread an equal share of the work.
inline Index balanced_block_pairs(Index blocks) { return (blocks + 1) / 2; }

/// Calls `body(block)` for the one or two blocks of work item `pair` (see balanced_block_pairs()).
template <class Body>
void for_each_block_of_pair(Index pair, Index blocks, Body&& body) {
  body(pair);
  if (blocks - 1 - pair != pair) body(blocks - 1 - pair);
}

/// attention_reference() reporting errors as `where`.
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> attention_reference(const char* where, const Eigen::MatrixBase<DQ>& Q,
                                                const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
                                                const AttentionOptions& opt) {
  using T = typename DQ::Scalar;
  static_check_scalar<T>();
  const auto shape = check_qkv(where, Q, K, V, opt, CausalQueries::last_positions);
  Matrix<T> O(shape.n, shape.heads * shape.dv);
  for (Index h = 0; h < shape.heads; ++h) {
    const T c = static_cast<T>(opt.resolved_scale(shape.dk));
    // Copies of the head's columns, and the products into temporaries: Eigen's small (coefficient-based) products
    // do their first entries in another summation order up to the SIMD alignment of their operands and
    // destination, so the last bits would depend on where the caller's matrices lie (a numpy copy is 16-byte
    // aligned only; two backward calls of the Python tests differed). Eigen aligns its own allocations alike.
    const Matrix<T> Qh = Q.middleCols(h * shape.dk, shape.dk), Kh = K.middleCols(h * shape.dk, shape.dk);
    const Matrix<T> Vh = V.middleCols(h * shape.dv, shape.dv);
    Matrix<T> S = c * Qh * Kh.transpose();
    if (opt.causal) mask_scores_causally(S);
    const Vector<T> row_max = S.rowwise().maxCoeff();
    S = (S.colwise() - row_max).array().exp();
    const Vector<T> row_sum = S.rowwise().sum();
    const Matrix<T> SV = S * Vh;
    O.middleCols(h * shape.dv, shape.dv) = row_sum.cwiseInverse().asDiagonal() * SV;
  }
  require_finite_result(where, "the output", O,
                        [&] { return exact_overflow_cause<T>(Q, K, V, shape, opt.resolved_scale(shape.dk)); });
  return O;
}

}  // namespace detail

/// Materialised exact attention (the reference). Returns O (n x h d_v); causal, Q may have fewer rows than K
/// (the queries are the last positions, AttentionOptions::causal). Throws std::invalid_argument for bad
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
/// and \f$O = A/\ell\f$ at the end. Under a causal mask key blocks after the query block are skipped, and Q
/// may have fewer rows than K (the queries are the last positions, AttentionOptions::causal).
/// The per-row log-sum-exp \f$\mu + \log\ell\f$ is kept for a recomputing backward pass.
///
/// **Threads.** Query blocks of all heads are independent and spread over polyattn's threads, each with its own
/// workspace; under the mask, early and late query blocks are paired so that threads get equal work. Each block
/// is computed the same way on any thread, so O and the log-sum-exp do not depend on the thread count.
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
  /// The workspace is \f$b_q b_k + b_q (d_k + d_v)\f$ scalars per thread. The defaults (256 x 256 floats:
  /// 256 KiB of scores, fits L2) measured fastest on AVX-512 for \f$d \in [8, 64]\f$; both must be \f$\ge 1\f$.
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

  /// forward() on row-major matrices (a C-ordered array, a block of one), read and written in place; the result
  /// is bitwise that of the column-major call.
  void forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K, const ConstRowMajorRef<T>& V,
               RowMajorRef<T> O, const char* where = "polyattn::ExactAttention::forward");

  /// Exact attention of a few queries at arbitrary positions (ascending if causal) against all keys:
  /// row `i` of `O` is the attention output of query `Q.row(i)` standing at position `positions[i]`.
  /// Used by the a-posteriori error estimate of the approximate methods.
  void forward_rows(const ConstMatrixRef<T>& Q, const std::vector<Index>& positions, const ConstMatrixRef<T>& K,
                    const ConstMatrixRef<T>& V, MatrixRef<T> O);

  /// Per-row, per-head \f$\log\sum_j e^{S_{ij}}\f$ of the last forward call (n x h).
  const Matrix<T>& logsumexp() const { return logsumexp_; }

 private:
  // forward() on column-major (ConstMatrixRef, MatrixRef) or row-major (ConstRowMajorRef, RowMajorRef) matrices.
  template <class In, class Out>
  void forward_any(const In& Q, const In& K, const In& V, Out& O, const char* where);

  // Finite input whose scores or value sums overflowed T leaves NaN or inf in O or the log-sum-exp: a domain_error
  // saying what overflowed instead. O(n d).
  template <class In, class Out>
  void check_finite_results(const char* where, const In& Q, const In& K, const In& V, const Out& O,
                            const detail::HeadShape& shape) const {
    const auto cause = [&] {
      return detail::exact_overflow_cause<T>(Q, K, V, shape, options_.resolved_scale(shape.dk));
    };
    detail::require_finite_result(where, "the output", O, cause);
    detail::require_finite_result(where, "the log-sum-exp of the scores", logsumexp_, cause);
  }

  // One thread's scratch for blocks of up to `query_rows` queries: scaled queries, a score block, the running
  // output and row statistics of the online softmax, and the queries' positions.
  struct Workspace {
    Matrix<T> scaled_queries, scores, accumulator;
    Matrix<T> staged_keys, staged_values;  // a block of row-major keys and values (column_major_block())
    Vector<T> running_max, running_sum, block_max, rescale;
    std::vector<Index> positions;
  };

  // Sizes the first `threads` workspaces for blocks of up to `query_rows` queries; later calls of the same shape
  // reuse them (fresh memory would cost page faults on every call).
  void reserve(Index query_rows, const detail::HeadShape& shape, int threads) {
    const Index key_rows = std::min(key_block_, shape.m);
    if (workspaces_.size() < static_cast<std::size_t>(threads)) workspaces_.resize(static_cast<std::size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      Workspace& w = workspaces_[static_cast<std::size_t>(t)];
      detail::ensure_shape(w.scaled_queries, query_rows, shape.dk);
      detail::ensure_shape(w.scores, query_rows, key_rows);
      detail::ensure_shape(w.accumulator, query_rows, shape.dv);
      detail::ensure_shape(w.staged_keys, key_rows, shape.dk);
      detail::ensure_shape(w.staged_values, key_rows, shape.dv);
      for (Vector<T>* v : {&w.running_max, &w.running_sum, &w.block_max, &w.rescale})
        detail::ensure_shape(*v, query_rows, 1);
      w.positions.resize(static_cast<std::size_t>(query_rows));
    }
  }

  // Online softmax of the (already scaled) queries in the top `bq` rows of `w.scaled_queries`, standing at
  // `positions`, over all keys they see.
  template <class Keys, class Values, class Output>
  void rows(Workspace& w, Index bq, const Index* positions, const Keys& Kh, const Values& Vh, Output O,
            Eigen::Ref<Vector<T>> lse) const {
    const auto Qs = w.scaled_queries.topRows(bq);
    const Index key_end = options_.causal ? positions[bq - 1] + 1 : Kh.rows();
    auto running_max = w.running_max.head(bq), running_sum = w.running_sum.head(bq);
    auto block_max = w.block_max.head(bq), rescale = w.rescale.head(bq);
    auto accumulator = w.accumulator.topRows(bq);
    running_max.setConstant(-std::numeric_limits<T>::infinity());
    running_sum.setZero();
    accumulator.setZero();
    for (Index k0 = 0; k0 < key_end; k0 += key_block_) {
      const Index bk = std::min(key_block_, key_end - k0);
      auto scores = w.scores.topLeftCorner(bq, bk);
      scores.noalias() = Qs * detail::column_major_block<T>(Kh, k0, 0, bk, Kh.cols(), w.staged_keys).transpose();
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
      accumulator.noalias() += scores * detail::column_major_block<T>(Vh, k0, 0, bk, Vh.cols(), w.staged_values);
      running_max = block_max;
    }
    O.noalias() = running_sum.cwiseInverse().asDiagonal() * accumulator;
    lse = running_max + running_sum.array().log().matrix();
  }

  AttentionOptions options_;
  Index query_block_, key_block_;
  std::vector<Workspace> workspaces_;  // one per thread
  Matrix<T> logsumexp_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
void ExactAttention<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                                MatrixRef<T> O, const char* where) {
  forward_any(Q, K, V, O, where);
}

template <class T>
void ExactAttention<T>::forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                const ConstRowMajorRef<T>& V, RowMajorRef<T> O, const char* where) {
  forward_any(Q, K, V, O, where);
}

template <class T>
template <class In, class Out>
void ExactAttention<T>::forward_any(const In& Q, const In& K, const In& V, Out& O, const char* where) {
  const auto shape = detail::check_qkv(where, Q, K, V, options_, detail::CausalQueries::last_positions);
  detail::check_forward_output(where, shape, Q, K, V, O);
  detail::ensure_shape(logsumexp_, shape.n, shape.heads);
  const Index query_rows = std::min(query_block_, shape.n);  // never sized by the option alone
  const Index query_blocks = detail::block_count(shape.n, query_block_);
  const Index pairs_per_head = detail::balanced_block_pairs(query_blocks);
  const Index items = shape.heads * pairs_per_head;
  reserve(query_rows, shape, detail::parallel_threads(items));
  const Index first_position = detail::first_query_position(shape);
  const T c = static_cast<T>(options_.resolved_scale(shape.dk));
  const double scores_computed =
      static_cast<double>(shape.n) * static_cast<double>(shape.m) * (options_.causal ? 0.5 : 1.0);
  const double work = static_cast<double>(shape.heads) * scores_computed * static_cast<double>(shape.dk + shape.dv);
  detail::parallel_for(
      items,
      [&](Index item, int thread) {
        Workspace& w = workspaces_[static_cast<std::size_t>(thread)];
        const Index h = item / pairs_per_head;
        const auto Kh = K.middleCols(h * shape.dk, shape.dk);
        const auto Vh = V.middleCols(h * shape.dv, shape.dv);
        detail::for_each_block_of_pair(item % pairs_per_head, query_blocks, [&](Index block) {
          const Index q0 = block * query_block_;
          const Index bq = std::min(query_block_, shape.n - q0);
          for (Index i = 0; i < bq; ++i) w.positions[static_cast<std::size_t>(i)] = first_position + q0 + i;
          w.scaled_queries.topRows(bq).noalias() = c * Q.block(q0, h * shape.dk, bq, shape.dk);
          rows(w, bq, w.positions.data(), Kh, Vh, O.block(q0, h * shape.dv, bq, shape.dv),
               logsumexp_.col(h).segment(q0, bq));
        });
      },
      work);
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
  reserve(shape.n, shape, 1);  // a few rows: the calling thread alone
  Workspace& w = workspaces_.front();
  const T c = static_cast<T>(options_.resolved_scale(shape.dk));
  for (Index h = 0; h < shape.heads; ++h) {
    w.scaled_queries.noalias() = c * Q.middleCols(h * shape.dk, shape.dk);
    rows(w, shape.n, positions.data(), K.middleCols(h * shape.dk, shape.dk), V.middleCols(h * shape.dv, shape.dv),
         O.middleCols(h * shape.dv, shape.dv), logsumexp_.col(h));
  }
  check_finite_results(where, Q, K, V, O, shape);
}

}  // namespace polyattn
