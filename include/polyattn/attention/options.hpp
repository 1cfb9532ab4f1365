/// \file attention/options.hpp
/// What every attention routine, exact or approximate, needs to know about the problem.
#pragma once

#include "../common.hpp"
#include "../parallel/threads.hpp"
#include "block_product.hpp"

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace polyattn {

/// Shape of the attention problem shared by all methods.
///
/// With \f$h\f$ heads, `Q`, `K` and `V` are \f$n \times h d_h\f$; head \f$l\f$ owns columns
/// \f$[l d_h, (l+1) d_h)\f$ and computes \f$O_l = \mathrm{softmax}(c\, Q_l K_l^\top \,[+\,\text{mask}])\, V_l\f$.
///
/// \code
///   polyattn::AttentionOptions opt;
///   opt.heads = 4;
///   opt.causal = true;
///   opt.scale = 1.0 / 16;   // the paper's 1/d; leave empty for 1/sqrt(d_h)
/// \endcode
struct AttentionOptions {
  /// Score scale \f$c\f$. Default (empty): \f$1/\sqrt{d_h}\f$. The paper uses \f$1/d\f$; the authors'
  /// experiment uses 1.
  std::optional<double> scale;
  /// Causal mask, aligned bottom-right: with \f$n\f$ queries and \f$m \ge n\f$ keys, query \f$i\f$ attends to
  /// keys \f$j \le i + (m - n)\f$, i.e. the queries are the last \f$n\f$ of \f$m\f$ positions (a KV cache, or a
  /// shard of a sequence given all earlier keys). With \f$n = m\f$ this is the lower-triangular mask
  /// \f$j \le i\f$. Every query sees at least one key, so \f$n > m\f$ is an error. The exact methods
  /// (attention_reference, ExactAttention, ExactReferenceBackend, ExactBlockedBackend) accept \f$n \le m\f$;
  /// the polynomial methods (PolynomialAttention, paper, adjoint) need \f$n = m\f$.
  bool causal = false;
  /// Number of heads \f$h\f$; must divide the number of columns of Q and K (and of V).
  Index heads = 1;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::AttentionOptions";
    detail::require(heads >= 1, where, "'heads' must be >= 1, got ", heads);
    if (scale) detail::require_positive(where, "scale", *scale);
  }

  /// The scale used for heads of dimension `head_dim`.
  double resolved_scale(Index head_dim) const {
    return scale ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
  }
};

namespace detail {

/// Per-head dimensions of a checked (Q, K, V) triple.
struct HeadShape {
  Index n;        ///< number of queries
  Index m;        ///< number of keys
  Index dk;       ///< per-head query/key dimension
  Index dv;       ///< per-head value dimension
  Index heads;
};

/// Which numbers of queries a causal method accepts (see AttentionOptions::causal).
enum class CausalQueries {
  as_many_as_keys,  ///< \f$n = m\f$ only: the polynomial methods, whose prefix scans pair query i with key i
  last_positions    ///< \f$n \le m\f$, the queries being the last n positions: the exact methods
};

/// Validates the shapes of Q (n x h dk), K (m x h dk), V (m x h dv) against the options, but not their
/// entries; throws std::invalid_argument naming the argument. Under the causal mask `causal_queries` says
/// whether n < m is accepted (never n > m: a query would see no key). For callers that detect non-finite
/// entries in a pass they make anyway.
template <class DQ, class DK, class DV>
HeadShape check_qkv_shapes(const char* where, const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                           const Eigen::MatrixBase<DV>& V, const AttentionOptions& opt,
                           CausalQueries causal_queries = CausalQueries::as_many_as_keys) {
  opt.check();
  require_nonempty(where, "Q", Q);
  require_nonempty(where, "K", K);
  require_nonempty(where, "V", V);
  require(Q.cols() == K.cols(), where, "arguments 'Q' and 'K' must have the same number of columns, got ",
          Q.cols(), " and ", K.cols());
  require(V.rows() == K.rows(), where, "argument 'V' must have as many rows as 'K' (", K.rows(), "), got ",
          V.rows());
  require(Q.cols() % opt.heads == 0, where, "'heads' = ", opt.heads, " must divide the ", Q.cols(),
          " columns of 'Q'");
  require(V.cols() % opt.heads == 0, where, "'heads' = ", opt.heads, " must divide the ", V.cols(),
          " columns of 'V'");
  if (opt.causal && causal_queries == CausalQueries::as_many_as_keys)
    require(Q.rows() == K.rows(), where, "causal attention needs as many queries as keys, got 'Q' with ",
            Q.rows(), " rows and 'K' with ", K.rows(), " (only the exact methods accept fewer queries than keys)");
  if (opt.causal && causal_queries == CausalQueries::last_positions)
    require(Q.rows() <= K.rows(), where,
            "causal attention needs at most as many queries as keys (the queries are the last positions), got "
            "'Q' with ", Q.rows(), " rows and 'K' with ", K.rows());
  return {Q.rows(), K.rows(), Q.cols() / opt.heads, V.cols() / opt.heads, opt.heads};
}

/// check_qkv_shapes() and, in addition, every entry of Q, K and V finite.
template <class DQ, class DK, class DV>
HeadShape check_qkv(const char* where, const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                    const Eigen::MatrixBase<DV>& V, const AttentionOptions& opt,
                    CausalQueries causal_queries = CausalQueries::as_many_as_keys) {
  const HeadShape shape = check_qkv_shapes(where, Q, K, V, opt, causal_queries);
  require_finite_in_parallel(where, "Q", Q);
  require_finite_in_parallel(where, "K", K);
  require_finite_in_parallel(where, "V", V);
  return shape;
}

/// check_qkv_shapes() for one rank's shard of a sequence-parallel call, which may have no rows (the rank then
/// contributes zero states); the column conditions are the same.
template <class DQ, class DK, class DV>
HeadShape check_shard_shapes(const char* where, const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                             const Eigen::MatrixBase<DV>& V, const AttentionOptions& opt) {
  if (Q.rows() > 0 && K.rows() > 0) return check_qkv_shapes(where, Q, K, V, opt);
  require(Q.cols() > 0 && K.cols() > 0 && V.cols() > 0, where, "arguments 'Q', 'K', 'V' must have columns, got ",
          Q.rows(), "x", Q.cols(), ", ", K.rows(), "x", K.cols(), ", ", V.rows(), "x", V.cols());
  // One-row stand-ins check the column conditions; the row conditions follow.
  check_qkv_shapes(where, Eigen::MatrixXd::Zero(1, Q.cols()), Eigen::MatrixXd::Zero(1, K.cols()),
                   Eigen::MatrixXd::Zero(1, V.cols()), opt);
  require(V.rows() == K.rows(), where, "argument 'V' must have as many rows as 'K' (", K.rows(), "), got ", V.rows());
  if (opt.causal)
    require(Q.rows() == K.rows(), where, "causal attention needs as many queries as keys, got 'Q' with ", Q.rows(),
            " rows and 'K' with ", K.rows());
  return {Q.rows(), K.rows(), Q.cols() / opt.heads, V.cols() / opt.heads, opt.heads};
}

/// Throws unless `O` is the n x h d_v output of the checked (Q, K, V) of `shape` and shares no memory with them.
template <class DQ, class DK, class DV, class DO>
void check_forward_output(const char* where, const HeadShape& shape, const Eigen::MatrixBase<DQ>& Q,
                          const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
                          const Eigen::MatrixBase<DO>& O) {
  require_shape(where, "O", O, shape.n, shape.heads * shape.dv);
  require_disjoint(where, {memory_of("O", O)}, {memory_of("Q", Q), memory_of("K", K), memory_of("V", V)});
}

/// The largest row norm \f$\max_i \|x_i\|_2\f$ and the largest |entry| of a matrix (0 for an empty one).
struct RowStatistics {
  double max_row_norm = 0;  ///< NaN if an entry is NaN, +inf if one is infinite
  double max_abs = 0;       ///< meaningful only when max_row_norm is finite
};

/// The larger of two maxima of input passes, NaN when either is (a NaN entry was found).
inline double max_keeping_nan(double a, double b) { return std::isnan(a) ? a : std::isnan(b) ? b : std::max(a, b); }

/// Folds the statistics `s` of more rows into `into` (both before or both after the square root): maxima, and a
/// NaN squared norm makes both fields NaN for good. Exact, so any grouping of the rows gives the same result.
inline void combine_row_statistics(RowStatistics& into, const RowStatistics& s) {
  if (std::isnan(into.max_row_norm)) return;
  if (std::isnan(s.max_row_norm))
    into = {s.max_row_norm, s.max_row_norm};
  else
    into = {std::max(into.max_row_norm, s.max_row_norm), std::max(into.max_abs, s.max_abs)};
}

/// The largest squared row norm of the column-major `rows` (unit inner stride): NaN if an entry is NaN, else +inf
/// if one is infinite; 0 without rows. Each row's squares are summed in double in column order (so float input
/// never overflows them, and nn/generator.hpp can extend a row's norm the same way), 16 rows at a time in a
/// fixed-size loop that compilers vectorise (Eigen 3.4 does not vectorise float-to-double casts); the last rows
/// are zero-padded to 16, so that every row takes the same instructions. No allocation: the polynomial kernel
/// calls it on every chunk of queries and keys it reads.
template <class Rows>
double max_squared_row_norm(const Rows& rows) {
  using Scalar = typename Rows::Scalar;
  static_assert(!bool(Rows::IsRowMajor) && int(Rows::InnerStrideAtCompileTime) == 1,
                "polyattn::detail::max_squared_row_norm reads columns in place: pass column-major rows");
  constexpr Index step = 16;
  const auto add_squares = [](const Scalar* column, double* squares) {
    for (Index k = 0; k < step; ++k) {
      const double x = static_cast<double>(column[k]);
      squares[k] += x * x;
    }
  };
  const Index n = rows.rows(), d = rows.cols(), stride = rows.outerStride();
  const Scalar* base = rows.data();
  double largest[step] = {}, total[step] = {};
  for (Index i0 = 0; i0 < n; i0 += step) {
    double squares[step] = {};
    if (n - i0 >= step) {
      for (Index j = 0; j < d; ++j) add_squares(base + j * stride + i0, squares);
    } else {
      Scalar padded[step] = {};
      for (Index j = 0; j < d; ++j) {
        std::copy_n(base + j * stride + i0, n - i0, padded);
        add_squares(padded, squares);
      }
    }
    for (Index k = 0; k < step; ++k) {
      largest[k] = std::max(largest[k], squares[k]);
      total[k] += squares[k];  // NaN exactly when a row's sum is (they are >= 0 or NaN), which std::max drops
    }
  }
  double sum = 0, result = 0;
  for (Index k = 0; k < step; ++k) {
    sum += total[k];
    result = std::max(result, largest[k]);
  }
  return std::isnan(sum) ? sum : result;
}

/// The largest |entry| of `rows`: NaN if an entry is NaN, else +inf if one is infinite; 0 without entries. One
/// vectorised pass (Eigen's NaN-propagating maxCoeff is a scalar loop), and all_finite() tells whether the rows
/// need the NaN-aware one.
template <class Rows>
double max_abs_entry(const Rows& rows) {
  if (rows.size() == 0) return 0;
  return all_finite(rows) ? static_cast<double>(rows.cwiseAbs().maxCoeff())
                          : static_cast<double>(rows.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
}

/// The RowStatistics of column-major `rows` before the square root: `max_row_norm` holds the largest squared row
/// norm (max_squared_row_norm()).
template <class Rows>
RowStatistics squared_row_statistics(const Rows& rows) {
  return {max_squared_row_norm(rows), max_abs_entry(rows)};
}

/// RowStatistics of `X` in one pass, parallel over blocks of rows (maxima: the same for any thread count), each
/// block by squared_row_statistics(). A column-major `X` with unit inner stride is read in place; any other (a
/// row-major one, whose columns would be strided, or an expression) is copied piece by piece into a column-major
/// scratch first: the same sums, bitwise.
template <class Derived>
RowStatistics row_statistics(const Eigen::MatrixBase<Derived>& X) {
  using Scalar = typename Derived::Scalar;
  constexpr bool in_place = !bool(Derived::IsRowMajor) && int(Derived::InnerStrideAtCompileTime) == 1 &&
                            (int(Eigen::internal::traits<Derived>::Flags) & Eigen::DirectAccessBit) != 0;
  std::vector<RowStatistics> per_block(static_cast<std::size_t>(block_count(X.rows(), input_pass_rows)));
  for_input_row_blocks(X, [&](Index block, Index, const auto& rows) {
    if (rows.cols() == 0 || rows.rows() == 0) return;
    RowStatistics& statistics = per_block[static_cast<std::size_t>(block)];
    if constexpr (in_place) {
      statistics = squared_row_statistics(rows);
    } else {
      constexpr Index piece_rows = 512;
      Matrix<Scalar> piece(std::min(piece_rows, rows.rows()), rows.cols());
      for (Index i0 = 0; i0 < rows.rows(); i0 += piece_rows) {
        const Index count = std::min(piece_rows, rows.rows() - i0);
        if constexpr (bool(Derived::IsRowMajor) &&
                      (int(Eigen::internal::traits<Derived>::Flags) & Eigen::DirectAccessBit) != 0)
          transpose_into<Scalar>(rows.middleRows(i0, count).transpose(), piece.topRows(count));
        else
          piece.topRows(count) = rows.middleRows(i0, count);
        combine_row_statistics(statistics, squared_row_statistics(piece.topRows(count)));
      }
    }
  });
  RowStatistics result;
  for (const RowStatistics& s : per_block) combine_row_statistics(result, s);
  result.max_row_norm = std::sqrt(result.max_row_norm);
  return result;
}

/// The largest |entry| of `X`: NaN if an entry is NaN, else +inf if one is infinite; 0 when it has none (an empty
/// shard). Parallel over blocks of rows, each by max_abs_entry().
template <class Derived>
double max_abs(const Eigen::MatrixBase<Derived>& X) {
  std::vector<double> per_block(static_cast<std::size_t>(block_count(X.rows(), input_pass_rows)), 0.0);
  for_input_row_blocks(X, [&](Index block, Index, const auto& rows) {
    per_block[static_cast<std::size_t>(block)] = max_abs_entry(rows);
  });
  double result = 0;
  for (const double m : per_block) {
    if (std::isnan(m)) return m;
    result = std::max(result, m);
  }
  return result;
}

/// \f$\max_i \|x_i\|_2\f$ over the rows of `X` (row_statistics()).
template <class Derived>
double max_row_norm(const Eigen::MatrixBase<Derived>& X) {
  return row_statistics(X).max_row_norm;
}

/// Raises `radius` to a head's score radius \f$c\max_i\|q_i\|\max_j\|k_j\|\f$ from its largest query and key norms;
/// a NaN, once seen, is kept.
inline void include_head_radius(double& radius, double scale, double max_query_norm, double max_key_norm) {
  const double head_radius = scale * max_query_norm * max_key_norm;
  if (!(head_radius <= radius) && !std::isnan(radius)) radius = head_radius;
}

/// The score radius \f$R = \max_l c\max_i\|q_i\|\max_j\|k_j\|\f$ over the heads of `shape`, in double: every
/// score \f$c\,q_i^\top k_j\f$ lies in \f$[-R, R]\f$; NaN when an entry of Q or K is not finite. O(n d).
template <class DQ, class DK>
double score_radius(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const HeadShape& shape,
                    double scale) {
  double radius = 0;
  for (Index h = 0; h < shape.heads; ++h)
    include_head_radius(radius, scale, max_row_norm(Q.middleCols(h * shape.dk, shape.dk)),
                        max_row_norm(K.middleCols(h * shape.dk, shape.dk)));
  return radius;
}

/// Why exact attention of finite Q, K, V in scalar type T produced a non-finite result: the score radius or the
/// value magnitude against the largest T. For the message of a std::domain_error; O(n d).
template <class T, class DQ, class DK, class DV>
std::string exact_overflow_cause(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                 const Eigen::MatrixBase<DV>& V, const HeadShape& shape, double scale) {
  const double largest = static_cast<double>(std::numeric_limits<T>::max());
  const double radius = score_radius(Q, K, shape, scale);
  const double max_v = static_cast<double>(V.cwiseAbs().maxCoeff());
  const char* type = sizeof(T) == sizeof(float) ? "float" : "double";
  return concat("the scores or the sums of weighted values overflowed ", type, " (largest ", largest,
                "): score radius R = c max|q| max|k| = ", radius, ", max |V| = ", max_v, ", ", shape.m,
                " keys; scale Q, K or V down", sizeof(T) == sizeof(float) ? " or use double" : "");
}

}  // namespace detail
}  // namespace polyattn
