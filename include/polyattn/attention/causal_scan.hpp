/// \file attention/causal_scan.hpp
/// Products of a causally masked low-rank matrix with a tall matrix in \f$O(nkm)\f$, without forming the
/// \f$n\times n\f$ matrix.
///
/// For factors \f$U, V_f \in \mathbb R^{n\times k}\f$, \f$H \in \mathbb R^{n\times m}\f$ and the causal mask
/// \f$M_{ij} = [i \ge j]\f$:
/// - **prefix scan**: \f$Y = (M\circ UV_f^\top)H\f$, i.e. \f$y_i = u_i^\top \sum_{j\le i} v_j h_j^\top\f$.
///   The rows are taken in chunks of \f$b\f$; a running \f$k\times m\f$ state
///   \f$Z = \sum_{j \in \text{earlier chunks}} v_j h_j^\top\f$ serves the earlier chunks and the chunk itself
///   goes through its lower-triangular \f$b\times b\f$ block \f$\mathrm{tril}(U_bV_{f,b}^\top)H_b\f$.
/// - **suffix scan**: \f$Y = (M\circ UV_f^\top)^\top H = (M^\top\circ V_fU^\top)H\f$, i.e.
///   \f$y_j = v_j^\top\sum_{i\ge j} u_i h_i^\top\f$: the same with the chunks taken last to first, the state
///   \f$\sum_{i\in\text{later chunks}} u_i h_i^\top\f$ and the upper-triangular block
///   \f$\mathrm{triu}(V_{f,b}U_b^\top)H_b\f$.
///
/// Cost \f$O(nkm + nbk + nbm)\f$, memory \f$O(km + b^2)\f$ beyond the inputs.
///
/// The paper (Liang et al. 2024, Lemmas I.3/I.4 and Algorithm 2, taken from Conv-basis) gives only the
/// prefix scan, because its gradient formulas only multiply by \f$f\f$. The correct gradients also need
/// \f$P^\top H\f$ and \f$p^\top H\f$ (\f$\partial L/\partial V = P^\top G\f$, \f$\partial L/\partial K = c\,p^\top Q\f$),
/// and under the mask those are suffix scans: \f$(M\circ UV_f^\top)^\top \ne M\circ(V_fU^\top)\f$.
///
/// Besides the whole-matrix products, the scan can be driven one chunk at a time (start(), begin_chunk(),
/// add_factors(), end_chunk()) so that a caller can generate the factors of each chunk on the fly, and
/// split a wide factor into column tiles (each tile owns rows \f$[\text{offset}, \text{offset}+k_t)\f$ of the
/// state), never holding all \f$n\times k\f$ of it.
///
/// \code
///   polyattn::CausalScan<double> scan({/*chunk_size=*/64});
///   polyattn::Matrix<double> Y(n, H.cols());
///   scan.prefix_product(U, Vf, H, Y);   // Y = (M o U Vf^T) H
///   scan.suffix_product(U, Vf, H, Y);   // Y = (M o U Vf^T)^T H
///
///   // The same prefix product, chunk by chunk, with the factor split into two column tiles:
///   scan.start(polyattn::ScanDirection::prefix, k, H.cols());
///   for (Index s = 0; s < n; s += b) {
///     const Index rows = std::min(b, n - s);
///     scan.begin_chunk(rows);
///     auto Yb = Y.middleRows(s, rows);
///     Yb.setZero();
///     scan.add_factors(0, U.block(s, 0, rows, k1), Vf.block(s, 0, rows, k1), H.middleRows(s, rows), Yb);
///     scan.add_factors(k1, U.block(s, k1, rows, k - k1), Vf.block(s, k1, rows, k - k1), H.middleRows(s, rows), Yb);
///     scan.end_chunk(H.middleRows(s, rows), Yb);
///   }
/// \endcode
#pragma once

#include "../common.hpp"
#include "block_product.hpp"

#include <algorithm>

namespace polyattn {

/// Which masked product a scan computes.
enum class ScanDirection {
  prefix,  ///< \f$(M\circ UV_f^\top)H\f$: chunks first to last
  suffix,  ///< \f$(M\circ UV_f^\top)^\top H\f$: chunks last to first
};

/// Parameters of CausalScan.
struct CausalScanOptions {
  /// Rows per chunk b of the whole-matrix products (default 64). Larger chunks mean fewer, larger GEMMs
  /// but an in-chunk block costing \f$O(b^2(k + m))\f$ per chunk.
  Index chunk_size = 64;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    detail::require(chunk_size >= 1, "polyattn::CausalScanOptions", "'chunk_size' must be >= 1, got ", chunk_size);
  }
};

/// Chunked prefix and suffix scans for causally masked low-rank products (see the file documentation).
/// Keeps its state and in-chunk block between calls.
template <class T>
class CausalScan {
 public:
  explicit CausalScan(CausalScanOptions options = {}) : options_(options) {
    detail::static_check_scalar<T>();
    options_.check();
  }

  const CausalScanOptions& options() const { return options_; }

  /// Writes \f$Y = (M\circ UV_f^\top)H\f$ for U, Vf (n x k), H (n x m), Y (n x m).
  void prefix_product(const ConstMatrixRef<T>& U, const ConstMatrixRef<T>& Vf, const ConstMatrixRef<T>& H,
                      MatrixRef<T> Y);

  /// Writes \f$Y = (M\circ UV_f^\top)^\top H = (M^\top\circ V_fU^\top)H\f$ for U, Vf (n x k), H, Y (n x m).
  void suffix_product(const ConstMatrixRef<T>& U, const ConstMatrixRef<T>& Vf, const ConstMatrixRef<T>& H,
                      MatrixRef<T> Y);

  /// Starts a chunk-by-chunk scan of factors with `rank` columns in total and a right-hand side with `cols`
  /// columns: zeroes the state. The caller then visits the chunks in order (first to last for a prefix
  /// scan, last to first for a suffix scan), calling begin_chunk(), add_factors() for each column tile
  /// and end_chunk() for each.
  void start(ScanDirection direction, Index rank, Index cols);

  /// start() from `initial_state` (rank x cols) instead of zero: the sum \f$\sum_j v_j h_j^\top\f$ (prefix) or
  /// \f$\sum_i u_i h_i^\top\f$ (suffix) over rows that precede (follow) the scanned ones but are held elsewhere,
  /// e.g. by the other ranks of a sequence-parallel call.
  void start(ScanDirection direction, const ConstMatrixRef<T>& initial_state);

  /// Begins a chunk of `rows` rows: clears the in-chunk block.
  void begin_chunk(Index rows) {
    detail::require(rows >= 1 && state_.size() > 0, "polyattn::CausalScan::begin_chunk",
                    "call start() first and give 'rows' >= 1, got ", rows);
    block_.setZero(rows, rows);  // no allocation when the chunk has the last one's rows
    chunk_rows_ = rows;
  }

  /// Adds columns [offset, offset + k_t) of the factors to the current chunk: `U` and `Vf` are this chunk's
  /// rows of those columns (rows x k_t), `H` this chunk's rows of the right-hand side (rows x m). Adds the
  /// earlier (prefix) or later (suffix) chunks' contribution to `Y` (rows x m) and folds this chunk into
  /// the state; the chunk's own masked block is added by end_chunk().
  void add_factors(Index offset, const ConstMatrixRef<T>& U, const ConstMatrixRef<T>& Vf, const ConstMatrixRef<T>& H,
                   MatrixRef<T> Y);

  /// Ends the chunk: adds its masked block times `H` (rows x m) to `Y` (rows x m).
  void end_chunk(const ConstMatrixRef<T>& H, MatrixRef<T> Y);

 private:
  void product(ScanDirection direction, const char* where, const ConstMatrixRef<T>& U, const ConstMatrixRef<T>& Vf,
               const ConstMatrixRef<T>& H, MatrixRef<T> Y) {
    detail::require_nonempty(where, "U", U);
    detail::require_shape(where, "Vf", Vf, U.rows(), U.cols());
    detail::require_nonempty(where, "H", H);
    detail::require_shape(where, "H", H, U.rows(), H.cols());
    detail::require_shape(where, "Y", Y, U.rows(), H.cols());
    detail::require_finite(where, "U", U);
    detail::require_finite(where, "Vf", Vf);
    detail::require_finite(where, "H", H);
    const Index n = U.rows(), b = std::min(options_.chunk_size, n);
    const Index chunks = (n + b - 1) / b;
    start(direction, U.cols(), H.cols());
    for (Index step = 0; step < chunks; ++step) {
      const Index chunk = direction == ScanDirection::prefix ? step : chunks - 1 - step;
      const Index first = chunk * b, rows = std::min(b, n - first);
      auto Yb = Y.middleRows(first, rows);
      const auto Hb = H.middleRows(first, rows);
      Yb.setZero();
      begin_chunk(rows);
      add_factors(0, U.middleRows(first, rows), Vf.middleRows(first, rows), Hb, Yb);
      end_chunk(Hb, Yb);
    }
  }

  CausalScanOptions options_;
  ScanDirection direction_ = ScanDirection::prefix;
  Matrix<T> state_, block_;
  // Rows of the chunk begun and not yet ended (0: none).
  Index chunk_rows_ = 0;
  // A column tile's factor, transposed for the state update (add_factors()); grown, never shrunk.
  Matrix<T> transposed_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
void CausalScan<T>::prefix_product(const ConstMatrixRef<T>& U, const ConstMatrixRef<T>& Vf, const ConstMatrixRef<T>& H,
                                   MatrixRef<T> Y) {
  product(ScanDirection::prefix, "polyattn::CausalScan::prefix_product", U, Vf, H, Y);
}

template <class T>
void CausalScan<T>::suffix_product(const ConstMatrixRef<T>& U, const ConstMatrixRef<T>& Vf, const ConstMatrixRef<T>& H,
                                   MatrixRef<T> Y) {
  product(ScanDirection::suffix, "polyattn::CausalScan::suffix_product", U, Vf, H, Y);
}

template <class T>
void CausalScan<T>::start(ScanDirection direction, Index rank, Index cols) {
  constexpr const char* where = "polyattn::CausalScan::start";
  detail::require(rank >= 1, where, "'rank' must be >= 1, got ", rank);
  detail::require(cols >= 1, where, "'cols' must be >= 1, got ", cols);
  direction_ = direction;
  state_.setZero(rank, cols);
  chunk_rows_ = 0;
}

template <class T>
void CausalScan<T>::start(ScanDirection direction, const ConstMatrixRef<T>& initial_state) {
  start(direction, initial_state.rows(), initial_state.cols());
  state_ = initial_state;
}

template <class T>
void CausalScan<T>::add_factors(Index offset, const ConstMatrixRef<T>& U, const ConstMatrixRef<T>& Vf,
                                const ConstMatrixRef<T>& H, MatrixRef<T> Y) {
  constexpr const char* where = "polyattn::CausalScan::add_factors";
  const Index rows = chunk_rows_, width = U.cols();
  detail::require(rows >= 1, where, "call begin_chunk() first");
  detail::require(offset >= 0 && offset + width <= state_.rows(), where, "columns [", offset, ", ",
                  offset + width, ") of 'U' exceed the rank ", state_.rows(), " given to start()");
  detail::require_shape(where, "U", U, rows, width);
  detail::require_shape(where, "Vf", Vf, rows, width);
  detail::require_shape(where, "H", H, rows, state_.cols());
  detail::require_shape(where, "Y", Y, rows, state_.cols());
  const bool prefix = direction_ == ScanDirection::prefix;
  const ConstMatrixRef<T>& out_factor = prefix ? U : Vf;  // multiplies the state for the output rows
  const ConstMatrixRef<T>& in_factor = prefix ? Vf : U;   // carries this chunk's rows into the state
  auto state = state_.middleRows(offset, width);
  // The register-tiled products of the polynomial kernel (block_product.hpp): Eigen's GEMM packs both factors of
  // these small products, which cost the paper method a fifth of its time. The chunk's block gets both triangles;
  // end_chunk() clears the one the mask drops.
  detail::block_product_add<T>(out_factor, state, Y);
  detail::block_product_add<T>(out_factor, in_factor.transpose(), block_);
  detail::transposed_product_add<T>(in_factor, H, state, transposed_);
}

template <class T>
void CausalScan<T>::end_chunk(const ConstMatrixRef<T>& H, MatrixRef<T> Y) {
  constexpr const char* where = "polyattn::CausalScan::end_chunk";
  detail::require(chunk_rows_ >= 1, where, "call begin_chunk() first");
  detail::require_shape(where, "H", H, chunk_rows_, state_.cols());
  detail::require_shape(where, "Y", Y, chunk_rows_, state_.cols());
  if (direction_ == ScanDirection::prefix) {
    block_.template triangularView<Eigen::StrictlyUpper>().setZero();
    detail::causal_product_add<T>(block_, H, Y);
  } else {
    // The upper triangle U = L^T of the suffix scan's block: Y += U H.
    block_.template triangularView<Eigen::StrictlyLower>().setZero();
    detail::transposed_causal_product_add<T>(block_, H, Y);
  }
  chunk_rows_ = 0;
}

}  // namespace polyattn
