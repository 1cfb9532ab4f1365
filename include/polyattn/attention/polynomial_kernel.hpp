/// \file attention/polynomial_kernel.hpp
/// The one implementation of the polynomial attention forward pass (PolynomialAttention) and of its exact
/// gradient (AdjointBackend), for one head, on all of polyattn's threads.
///
/// With monomials \f$M_Q = m(\sqrt c\,Q)\f$, \f$M_K = m(\sqrt c\,K)\f$ and weights \f$\omega\f$ (feature_map.hpp), the
/// forward pass is \f$Z = \mathrm{diag}(\omega)M_K^\top[V,\mathbf 1]\f$, \f$[N, \tilde D] = M_QZ\f$, \f$\tilde O = \tilde D^{-1}N\f$
/// (adjoint_gradients.hpp derives the backward pass). Both are sums over keys, so they parallelise over blocks
/// of rows whose partial results are combined in block order:
///
/// - **Non-causal.** Key blocks of block_rows() rows each compute their partial state; the partials are added in
///   block order; then query blocks compute their rows of \f$\tilde O\f$ independently. Backward mirrors it with
///   the state gradient \f$Y = \mathrm{diag}(\omega)M_Q^\top E\f$.
/// - **Causal.** The sequence is cut into scan chunks of scan_rows() rows. (1) Every chunk computes its own key
///   state \f$\Delta Z_t = \mathrm{diag}(\omega)M_{K,t}^\top[V_t,\mathbf 1]\f$, in parallel; (2) an exclusive prefix
///   sum in chunk order turns them into \f$Z^{<s}\f$ (parallel over rows of the state, each entry summed in chunk
///   order); (3) every chunk computes its rows from \f$Z^{<s}\f$ and its own masked block
///   \f$\mathrm{tril}(p(c\,Q_sK_s^\top))\f$, in parallel. Backward runs the same three phases in reverse with
///   \f$\Delta Y_t = M_{Q,t}^\top E_t\f$ and an exclusive suffix sum. The prefix states are either kept for every
///   chunk (the adjoint's checkpoints, which backward() reads) or computed window by window in a bounded
///   workspace; either way every \f$Z^{<s}\f$ is the same sum in the same order.
///
/// No partition depends on the thread count and no thread's result depends on which blocks it ran, so outputs,
/// gradients and errors are bitwise the same for any number of threads (parallel/threads.hpp).
///
/// **Sequence parallel.** With a StateExchange (parallel/state_exchange.hpp) the rows are one rank's shard of the
/// sequence, possibly empty, and the states are combined over ranks in double: non-causal, \f$Z\f$ and \f$Y\f$ are
/// summed over all ranks; causal, the forward scan starts from the keys of the earlier ranks and the backward
/// scan from the queries of the later ones, which needs the local total first: the kept chunk states are all
/// computed before any output, otherwise a pre-pass sums the shard (a cost the serial kernel never pays). The
/// forward pass returns the incoming state, so a backward() without checkpoints can rebuild its prefix states
/// without another exchange; kept or rebuilt, every prefix is the same sum in the same order, as serially.
/// Without an exchange every result is bitwise the serial kernel's.
#pragma once

#include "../parallel/state_exchange.hpp"
#include "../parallel/threads.hpp"
#include "feature_map.hpp"
#include "polynomial.hpp"

#include <algorithm>
#include <cstddef>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace polyattn {
namespace detail {

/// The message for a normaliser that is not positive: p negative on the scores, or overflow.
inline std::string bad_normaliser_message(const char* where, Index row, double value, int degree, double radius,
                                          const char* type) {
  if (std::isfinite(value))
    return concat(where, ": approximate normaliser of row ", row, " is ", value, " (not positive): the degree-",
                  degree, " polynomial is not positive on the scores; use an even degree or a larger one");
  return concat(where, ": approximate normaliser of row ", row, " is ", value, ": the degree-", degree,
                " polynomial features of the scores or their sums overflowed ", type,
                " (score radius R = c max|q| max|k| = ", radius, "); scale Q and K down, lower the degree",
                std::string(type) == "float" ? " or use double" : "");
}

/// Forward pass and exact gradient of polynomial attention for one head (see the file documentation). Keeps
/// one workspace per thread and the block partials between calls.
template <class T>
class PolynomialKernel {
 public:
  /// Default rows of a causal scan chunk: the masked in-chunk block costs O(b d) per row against O(r d) for
  /// the state products; 64 balances the two for d <= 32 and r ~ 150.
  static constexpr Index default_scan_rows = 64;

  /// Sets the feature map and polynomial for the next calls (the map must outlive them). `chunk_size` and
  /// `scan_window_bytes` are PolynomialAttentionOptions' (chunk_size 0: automatic); `where` and `radius` go into
  /// error messages. `exchange` (null: serial) combines the states with the other ranks' shards; every rank must
  /// then make the same calls (see the file documentation).
  void configure(const FeatureMap<T>& map, const Polynomial& poly, bool causal, Index chunk_size,
                 std::size_t scan_window_bytes, const char* where, double radius, StateExchange* exchange) {
    map_ = &map;
    poly_ = poly;
    causal_ = causal;
    chunk_size_ = chunk_size;
    scan_window_bytes_ = scan_window_bytes;
    where_ = where;
    radius_ = radius;
    exchange_ = exchange;
  }

  /// Rows of a causal scan chunk for n rows (at least one, so that an empty shard has no chunks).
  Index scan_rows(Index n) const {
    return std::max<Index>(1, std::min(n, chunk_size_ > 0 ? chunk_size_ : default_scan_rows));
  }
  /// Number of causal scan chunks of n rows (the last may be shorter).
  Index scan_chunks(Index n) const { return block_count(n, scan_rows(n)); }
  /// Rows of a non-causal block: monomials and their gradients (2 x rows x r) near 1 MiB, GEMM-shaped and
  /// still in L2.
  Index block_rows() const {
    if (chunk_size_ > 0) return chunk_size_;
    const Index rows = (Index(1) << 19) / (static_cast<Index>(sizeof(T)) * map_->width());
    return std::clamp<Index>(rows, 64, 2048);
  }

  /// Writes \f$\tilde O_h\f$ and its normalisers \f$\tilde D\f$. `states` receives, non-causal, \f$Z\f$ (r x (d_v+1));
  /// causal, \f$Z^{<s}\f$ of every chunk s (r x chunks(d_v+1)) when it has that many columns, and nothing when
  /// it has none. Causal, `incoming_state` (r x (d_v+1)) receives the state the scan starts from: the earlier
  /// ranks' keys, zero without an exchange; non-causal it has no columns. Throws std::domain_error when a
  /// normaliser is not positive or not finite; with an exchange only after this head's exchange.
  void forward(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh, MatrixRef<T> Oh,
               Eigen::Ref<Vector<T>> normalisers, MatrixRef<T> states, MatrixRef<T> incoming_state);

  /// Writes dQ_h, dK_h, dV_h, the exact gradient of forward()'s \f$\tilde O_h\f$ for \f$G_h\f$, from what forward()
  /// saved: the normalisers, `states` (non-causal: \f$Z\f$; causal: every \f$Z^{<s}\f$, or no columns, then
  /// they are recomputed from `incoming_state`). Returns \f$\max_j\sigma_j\f$, the largest column sum of
  /// \f$\tilde P\f$ (over all ranks with an exchange; \f$-\infty\f$ when there are no keys).
  double backward(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                  const ConstMatrixRef<T>& Oh, const ConstMatrixRef<T>& Gh, const Eigen::Ref<const Vector<T>>& normalisers,
                  const ConstMatrixRef<T>& states, const ConstMatrixRef<T>& incoming_state, MatrixRef<T> dQh,
                  MatrixRef<T> dKh, MatrixRef<T> dVh);

 private:
  // forward() and backward() are defined after the class, not inline, so that code which includes
  // extern_templates.hpp calls the compiled instantiation instead of instantiating the kernel again.

  // One thread's chunk workspaces, sized for `rows` rows; chunks use their top rows.
  struct Workspace {
    Matrix<T> scaled_queries, scaled_keys, monomials, monomial_grads, values, products, adjoints, chunk_state,
        weighted_state_grads, block, block_value, derivative_block, score_grads;
    Vector<T> inverse_normalisers, column_sums;
  };

  // Workspaces for parallel_threads(blocks) threads; a later call of the same shape reuses them.
  std::vector<Workspace>& workspaces(Index blocks, Index rows, Index dk, Index dv) {
    const auto threads = static_cast<std::size_t>(parallel_threads(blocks));
    if (workspaces_.size() < threads) workspaces_.resize(threads);
    const Index r = map_->width();
    for (std::size_t t = 0; t < threads; ++t) {
      Workspace& w = workspaces_[t];
      ensure_shape(w.scaled_queries, rows, dk);
      ensure_shape(w.scaled_keys, rows, dk);
      ensure_shape(w.monomials, rows, r);
      ensure_shape(w.monomial_grads, rows, r);
      ensure_shape(w.values, rows, dv + 1);
      ensure_shape(w.products, rows, dv + 2);
      ensure_shape(w.adjoints, rows, dv + 2);
      ensure_shape(w.chunk_state, r, dv + 1);
      ensure_shape(w.weighted_state_grads, r, dv + 2);
      if (w.inverse_normalisers.size() != rows) w.inverse_normalisers.resize(rows);
      if (w.column_sums.size() != rows) w.column_sums.resize(rows);
      if (causal_) {
        ensure_shape(w.block, rows, rows);
        ensure_shape(w.block_value, rows, rows);
        ensure_shape(w.derivative_block, rows, rows);
        ensure_shape(w.score_grads, rows, rows);
      }
    }
    return workspaces_;
  }

  // Estimated multiply-adds of a loop over `rows` rows (features times the value width): small loops stay on the
  // calling thread (parallel_for).
  double work(Index rows, Index dv) const {
    return static_cast<double>(rows) * static_cast<double>(map_->width()) * static_cast<double>(dv + 2);
  }

  static auto top(Matrix<T>& workspace, Index rows) { return workspace.topRows(rows); }

  // Monomials of the rows X into the top of w.monomials; the top of `scaled` receives sqrt(c) X.
  void expand(Workspace& w, const ConstMatrixRef<T>& X, Matrix<T>& scaled) const {
    map_->monomials(X, top(scaled, X.rows()), top(w.monomials, X.rows()));
  }

  // Top of w.values = [V_b, 1]: one GEMM then yields the numerators and the normaliser together.
  static void load_values(Workspace& w, const ConstMatrixRef<T>& Vb) {
    auto values = top(w.values, Vb.rows());
    values.leftCols(Vb.cols()) = Vb;
    values.col(Vb.cols()).setOnes();
  }

  // Divides the top of w.products (N and the normaliser column) into Ob and saves the normalisers.
  void normalise(Workspace& w, MatrixRef<T> Ob, Eigen::Ref<Vector<T>> normalisers, Index first_row) const {
    const Index dv = Ob.cols(), rows = Ob.rows();
    const auto denominators = top(w.products, rows).col(dv);
    if (!((denominators.array() > 0).all() && denominators.allFinite()))
      for (Index i = 0; i < rows; ++i)
        if (!(denominators(i) > 0) || !std::isfinite(static_cast<double>(denominators(i))))
          throw std::domain_error(bad_normaliser_message(where_, first_row + i, static_cast<double>(denominators(i)),
                                                         poly_.degree(), radius_,
                                                         sizeof(T) == sizeof(float) ? "float" : "double"));
    normalisers.segment(first_row, rows) = denominators;
    auto inverse = w.inverse_normalisers.head(rows);
    inverse = denominators.cwiseInverse();
    Ob.noalias() = inverse.asDiagonal() * top(w.products, rows).leftCols(dv);
  }

  // Top of w.adjoints = [G/D, -rowsum(G o O)/D, 1/D] (the last column gives the column sums of P~).
  static void load_adjoints(Workspace& w, const ConstMatrixRef<T>& Gb, const ConstMatrixRef<T>& Ob,
                            const Eigen::Ref<const Vector<T>>& normalisers, Index first_row) {
    const Index dv = Gb.cols(), rows = Gb.rows();
    auto inverse = w.inverse_normalisers.head(rows);
    auto adjoints = top(w.adjoints, rows);
    inverse = normalisers.segment(first_row, rows).cwiseInverse();
    adjoints.leftCols(dv).noalias() = inverse.asDiagonal() * Gb;
    adjoints.col(dv) = -Gb.cwiseProduct(Ob).rowwise().sum().cwiseProduct(inverse);
    adjoints.col(dv + 1) = inverse;
  }

  // dQb += the query gradient through a key state Z: M'_Q = [G/D, -kappa/D] Z^T pulled back through the
  // monomials of the chunk (its query monomials and scaled queries must be in w).
  void add_query_grads_through(Workspace& w, const ConstMatrixRef<T>& state, MatrixRef<T> dQb) const {
    const Index rows = dQb.rows(), dv = state.cols() - 1;
    auto monomial_grads = top(w.monomial_grads, rows);
    monomial_grads.noalias() = top(w.adjoints, rows).leftCols(dv + 1) * state.transpose();
    map_->monomials_backward(monomial_grads, top(w.scaled_queries, rows), top(w.monomials, rows), dQb);
  }

  // Top-left rows x rows of w.block = tril(p(S)) for S = sqrt(c)Q_s (sqrt(c)K_s)^T from the tops of the
  // scaled queries and keys; with `with_derivative`, w.derivative_block = p'(S) likewise (Horner for both).
  void in_chunk_block(Workspace& w, Index rows, bool with_derivative) const {
    auto block = w.block.topLeftCorner(rows, rows);
    auto value = w.block_value.topLeftCorner(rows, rows);
    auto derivative = w.derivative_block.topLeftCorner(rows, rows);
    block.noalias() = top(w.scaled_queries, rows) * top(w.scaled_keys, rows).transpose();
    const std::vector<double>& a = poly_.coeffs;
    value.setConstant(static_cast<T>(a.back()));
    if (with_derivative) derivative.setZero();
    for (std::size_t t = a.size() - 1; t-- > 0;) {
      if (with_derivative) derivative.array() = derivative.array() * block.array() + value.array();
      value.array() = value.array() * block.array() + static_cast<T>(a[t]);
    }
    block = value;
    block.template triangularView<Eigen::StrictlyUpper>().setZero();
  }

  // The running sum `carry` over the slots (rows x width each, side by side) made exclusive: slot s receives the
  // sum of the slots before it (in `order`: +1 forward, -1 backward) plus the incoming carry, and `carry` ends as
  // the sum of all. Parallel over blocks of columns of the state, so that every slot is read as contiguous
  // memory; each entry is summed in slot order.
  static void exclusive_scan(MatrixRef<T> slots, Index width, Matrix<T>& carry, int order) {
    const Index count = slots.cols() / width, rows = slots.rows();
    constexpr Index columns_per_block = 4;
    parallel_for(block_count(width, columns_per_block), [&](Index block, int) {
      const Index c0 = block * columns_per_block, nc = std::min(columns_per_block, width - c0);
      auto running = carry.block(0, c0, rows, nc);
      for (Index k = 0; k < count; ++k) {
        auto slot = slots.block(0, (order > 0 ? k : count - 1 - k) * width + c0, rows, nc);
        // slot <- running and running <- running + slot, in two vectorised passes over a few KiB.
        slot.swap(running);
        running += slot;
      }
    }, static_cast<double>(slots.size()));
  }

  // Chunks per window of the causal scan: as many slots of r x width as fit scan_window_bytes (at least one).
  // The window bounds memory only: every prefix is the same sum in the same order whatever its size.
  Index window_chunks(Index chunks, Index width) const {
    const double slot_bytes = static_cast<double>(sizeof(T)) * static_cast<double>(map_->width() * width);
    return std::clamp<Index>(static_cast<Index>(static_cast<double>(scan_window_bytes_) / slot_bytes), 1,
                             std::max<Index>(chunks, 1));
  }

  // Writes diag(w) M_K^T [V, 1] of chunk `chunk` (rows from first_row) into `slot`.
  void chunk_key_state(Workspace& w, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh, Index first_row,
                       Index rows, MatrixRef<T> slot) const {
    expand(w, Kh.middleRows(first_row, rows), w.scaled_keys);
    load_values(w, Vh.middleRows(first_row, rows));
    w.chunk_state.noalias() = top(w.monomials, rows).transpose() * top(w.values, rows);
    slot.noalias() = map_->weights().asDiagonal() * w.chunk_state;
  }

  void forward_full(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                    MatrixRef<T> Oh, Eigen::Ref<Vector<T>> normalisers, MatrixRef<T> state) {
    const Index dv = Vh.cols(), m = Kh.rows(), n = Qh.rows(), b = block_rows(), r = map_->width();
    const Index key_blocks = block_count(m, b), query_blocks = block_count(n, b);
    auto& ws = workspaces(std::max(key_blocks, query_blocks), std::min(b, std::max(n, m)), Qh.cols(), dv);
    ensure_shape(partials_, r, key_blocks * (dv + 1));
    parallel_for(key_blocks, [&](Index block, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index k0 = block * b, rows = std::min(b, m - k0);
      expand(w, Kh.middleRows(k0, rows), w.scaled_keys);
      load_values(w, Vh.middleRows(k0, rows));
      partials_.middleCols(block * (dv + 1), dv + 1).noalias() = top(w.monomials, rows).transpose() * top(w.values, rows);
    }, work(m, dv));
    sum_partials(key_blocks, state);
    state = map_->weights().asDiagonal() * state;
    if (exchange_) combine_over_ranks(state, Ranks::all);
    parallel_for(query_blocks, [&](Index block, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index q0 = block * b, rows = std::min(b, n - q0);
      expand(w, Qh.middleRows(q0, rows), w.scaled_queries);
      top(w.products, rows).leftCols(dv + 1).noalias() = top(w.monomials, rows) * state;
      normalise(w, Oh.middleRows(q0, rows), normalisers, q0);
    }, work(n, dv));
  }

  void forward_causal(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                      MatrixRef<T> Oh, Eigen::Ref<Vector<T>> normalisers, MatrixRef<T> checkpoints,
                      MatrixRef<T> incoming_state) {
    const Index dv = Vh.cols(), n = Qh.rows(), b = scan_rows(n), chunks = scan_chunks(n), r = map_->width();
    const bool keep = checkpoints.cols() == chunks * (dv + 1);
    const Index window = keep ? chunks : window_chunks(chunks, dv + 1);
    auto& ws = workspaces(window, b, Qh.cols(), dv);
    const T sqrt_c = static_cast<T>(std::sqrt(map_->scale()));
    if (!keep) ensure_shape(window_states_, r, window * (dv + 1));
    carry_.setZero(r, dv + 1);
    // The scan starts from the earlier ranks' keys, which needs this shard's total before any output. Kept: the
    // chunk states are computed now and summed in chunk order, then scanned from the incoming state; otherwise
    // a pre-pass sums the keys window by window. Either way every Z^{<s} is the same sum in the same order.
    const bool kept_states_ready = exchange_ && keep;
    if (exchange_) {
      if (keep) {
        key_states(Kh, Vh, 0, chunks, checkpoints, ws);
        for (Index k = 0; k < chunks; ++k) carry_ += checkpoints.middleCols(k * (dv + 1), dv + 1);
      } else {
        for (Index first = 0; first < chunks; first += window)
          prefix_states(Kh, Vh, first, std::min(window, chunks - first), window_states_, ws);
      }
      combine_over_ranks(carry_, Ranks::earlier);
    }
    incoming_state = carry_;
    if (kept_states_ready) exclusive_scan(checkpoints, dv + 1, carry_, +1);
    for (Index first = 0; first < chunks; first += window) {
      const Index count = std::min(window, chunks - first);
      MatrixRef<T> slots = keep ? MatrixRef<T>(checkpoints.middleCols(first * (dv + 1), count * (dv + 1)))
                                : MatrixRef<T>(window_states_.leftCols(count * (dv + 1)));
      if (!kept_states_ready) prefix_states(Kh, Vh, first, count, slots, ws);
      parallel_for(count, [&](Index k, int thread) {
        Workspace& w = ws[static_cast<std::size_t>(thread)];
        const Index s = (first + k) * b, rows = std::min(b, n - s);
        auto products = top(w.products, rows).leftCols(dv + 1);
        expand(w, Qh.middleRows(s, rows), w.scaled_queries);
        load_values(w, Vh.middleRows(s, rows));
        products.noalias() = top(w.monomials, rows) * slots.middleCols(k * (dv + 1), dv + 1);
        top(w.scaled_keys, rows).noalias() = sqrt_c * Kh.middleRows(s, rows);
        in_chunk_block(w, rows, false);
        products.noalias() +=
            w.block.topLeftCorner(rows, rows).template triangularView<Eigen::Lower>() * top(w.values, rows);
        normalise(w, Oh.middleRows(s, rows), normalisers, s);
      }, work(count * b, dv));
    }
  }

  double backward_full(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                       const ConstMatrixRef<T>& Oh, const ConstMatrixRef<T>& Gh,
                       const Eigen::Ref<const Vector<T>>& normalisers, const ConstMatrixRef<T>& state,
                       MatrixRef<T> dQh, MatrixRef<T> dKh, MatrixRef<T> dVh) {
    const Index dv = Vh.cols(), m = Kh.rows(), n = Qh.rows(), b = block_rows(), r = map_->width();
    const Index key_blocks = block_count(m, b), query_blocks = block_count(n, b);
    auto& ws = workspaces(std::max(key_blocks, query_blocks), std::min(b, std::max(n, m)), Qh.cols(), dv);
    ensure_shape(partials_, r, query_blocks * (dv + 2));
    parallel_for(query_blocks, [&](Index block, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index q0 = block * b, rows = std::min(b, n - q0);
      expand(w, Qh.middleRows(q0, rows), w.scaled_queries);
      load_adjoints(w, Gh.middleRows(q0, rows), Oh.middleRows(q0, rows), normalisers, q0);
      partials_.middleCols(block * (dv + 2), dv + 2).noalias() =
          top(w.monomials, rows).transpose() * top(w.adjoints, rows);
      auto dQb = dQh.middleRows(q0, rows);
      dQb.setZero();
      add_query_grads_through(w, state, dQb);
    }, work(n, dv));
    ensure_shape(state_grads_, r, dv + 2);
    sum_partials(query_blocks, state_grads_);
    state_grads_ = map_->weights().asDiagonal() * state_grads_;
    if (exchange_) combine_over_ranks(state_grads_, Ranks::all);
    column_sums_.assign(static_cast<std::size_t>(key_blocks), 0.0);
    parallel_for(key_blocks, [&](Index block, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index k0 = block * b, rows = std::min(b, m - k0);
      expand(w, Kh.middleRows(k0, rows), w.scaled_keys);
      load_values(w, Vh.middleRows(k0, rows));
      const auto monomials = top(w.monomials, rows);
      auto monomial_grads = top(w.monomial_grads, rows);
      auto products = top(w.products, rows);
      monomial_grads.noalias() = top(w.values, rows) * state_grads_.leftCols(dv + 1).transpose();
      // One product for dV and the column sums of P~; its column dv (M_K times the normaliser adjoint) is unused.
      products.noalias() = monomials * state_grads_;
      dVh.middleRows(k0, rows) = products.leftCols(dv);
      column_sums_[static_cast<std::size_t>(block)] = static_cast<double>(products.col(dv + 1).maxCoeff());
      auto dKb = dKh.middleRows(k0, rows);
      dKb.setZero();
      map_->monomials_backward(monomial_grads, top(w.scaled_keys, rows), monomials, dKb);
    }, work(m, dv));
    return largest_column_sum();
  }

  double backward_causal(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                         const ConstMatrixRef<T>& Oh, const ConstMatrixRef<T>& Gh,
                         const Eigen::Ref<const Vector<T>>& normalisers, const ConstMatrixRef<T>& checkpoints,
                         const ConstMatrixRef<T>& incoming_state, MatrixRef<T> dQh, MatrixRef<T> dKh,
                         MatrixRef<T> dVh) {
    const Index dv = Vh.cols(), n = Qh.rows(), b = scan_rows(n), chunks = scan_chunks(n), r = map_->width();
    const bool kept = checkpoints.cols() == chunks * (dv + 1);
    const Index window = window_chunks(chunks, kept ? dv + 2 : 2 * dv + 3);
    const Index windows = block_count(chunks, window);
    auto& ws = workspaces(window, b, Qh.cols(), dv);
    const T sqrt_c = static_cast<T>(std::sqrt(map_->scale()));
    // Without checkpoints, one pass over the windows records the prefix state at the start of each, from the
    // forward pass's incoming state; the reverse pass then rebuilds the window's Z^{<s} from it (the same sums
    // in the same order as forward()).
    if (!kept) {
      ensure_shape(window_states_, r, window * (dv + 1));
      ensure_shape(window_starts_, r, windows * (dv + 1));
      carry_ = incoming_state;
      for (Index w0 = 0; w0 < windows; ++w0) {
        window_starts_.middleCols(w0 * (dv + 1), dv + 1) = carry_;
        const Index first = w0 * window, count = std::min(window, chunks - first);
        prefix_states(Kh, Vh, first, count, window_states_.leftCols(count * (dv + 1)), ws);
      }
    }
    ensure_shape(state_grad_slots_, r, window * (dv + 2));
    column_sums_.assign(static_cast<std::size_t>(chunks), 0.0);
    state_grads_.setZero(r, dv + 2);
    // The suffix scan starts from the later ranks' queries: a pre-pass sums this shard's first.
    if (exchange_) {
      for (Index w0 = windows - 1; w0 >= 0; --w0) {
        const Index first = w0 * window, count = std::min(window, chunks - first);
        auto slots = state_grad_slots_.leftCols(count * (dv + 2));
        query_state_grads(Qh, Oh, Gh, normalisers, first, count, slots, ws);
        exclusive_scan(slots, dv + 2, state_grads_, -1);
      }
      combine_over_ranks(state_grads_, Ranks::later);
    }
    for (Index w0 = windows - 1; w0 >= 0; --w0) {
      const Index first = w0 * window, count = std::min(window, chunks - first);
      if (!kept) {
        carry_ = window_starts_.middleCols(w0 * (dv + 1), dv + 1);
        prefix_states(Kh, Vh, first, count, window_states_.leftCols(count * (dv + 1)), ws);
      }
      auto slots = state_grad_slots_.leftCols(count * (dv + 2));
      query_state_grads(Qh, Oh, Gh, normalisers, first, count, slots, ws);
      exclusive_scan(slots, dv + 2, state_grads_, -1);
      parallel_for(count, [&](Index k, int thread) {
        Workspace& w = ws[static_cast<std::size_t>(thread)];
        const Index s = (first + k) * b, rows = std::min(b, n - s);
        const auto monomials = top(w.monomials, rows);
        const auto values = top(w.values, rows);
        const auto adjoints = top(w.adjoints, rows);
        const auto block = w.block.topLeftCorner(rows, rows);
        auto monomial_grads = top(w.monomial_grads, rows);
        auto products = top(w.products, rows);
        auto score_grads = w.score_grads.topLeftCorner(rows, rows);
        auto dQb = dQh.middleRows(s, rows);
        auto dKb = dKh.middleRows(s, rows);
        auto dVb = dVh.middleRows(s, rows);
        // Later chunks, through Y^{>s}: dK and dV of this chunk's keys.
        expand(w, Kh.middleRows(s, rows), w.scaled_keys);
        load_values(w, Vh.middleRows(s, rows));
        w.weighted_state_grads.noalias() = map_->weights().asDiagonal() * slots.middleCols(k * (dv + 2), dv + 2);
        monomial_grads.noalias() = values * w.weighted_state_grads.leftCols(dv + 1).transpose();
        products.noalias() = monomials * w.weighted_state_grads;
        dVb = products.leftCols(dv);
        auto column_sums = w.column_sums.head(rows);
        column_sums = products.col(dv + 1);
        dKb.setZero();
        map_->monomials_backward(monomial_grads, top(w.scaled_keys, rows), monomials, dKb);
        // Earlier chunks, through Z^{<s}: dQ of this chunk's queries.
        expand(w, Qh.middleRows(s, rows), w.scaled_queries);
        load_adjoints(w, Gh.middleRows(s, rows), Oh.middleRows(s, rows), normalisers, s);
        dQb.setZero();
        add_query_grads_through(w,
                                kept ? ConstMatrixRef<T>(checkpoints.middleCols((first + k) * (dv + 1), dv + 1))
                                     : ConstMatrixRef<T>(window_states_.middleCols(k * (dv + 1), dv + 1)),
                                dQb);
        // The chunk itself, through its masked block with p and p'.
        in_chunk_block(w, rows, true);
        score_grads.noalias() = adjoints.leftCols(dv + 1) * values.transpose();
        // sqrt(c) dS: then c dS K = (sqrt(c) dS)(sqrt(c) K) and likewise for dK.
        score_grads.array() *= sqrt_c * w.derivative_block.topLeftCorner(rows, rows).array();
        dQb.noalias() += score_grads.template triangularView<Eigen::Lower>() * top(w.scaled_keys, rows);
        dKb.noalias() += score_grads.transpose().template triangularView<Eigen::Upper>() * top(w.scaled_queries, rows);
        dVb.noalias() += block.transpose().template triangularView<Eigen::Upper>() * adjoints.leftCols(dv);
        column_sums.noalias() += block.transpose().template triangularView<Eigen::Upper>() * adjoints.col(dv + 1);
        column_sums_[static_cast<std::size_t>(first + k)] = static_cast<double>(column_sums.maxCoeff());
      }, work(count * b, dv));
    }
    return largest_column_sum();
  }

  // The key states Delta Z_t of chunks [first, first + count) into `slots` (count slots of r x (d_v+1)).
  void key_states(const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh, Index first, Index count,
                  MatrixRef<T> slots, std::vector<Workspace>& ws) {
    const Index dv = Vh.cols(), n = Kh.rows(), b = scan_rows(n);
    parallel_for(count, [&](Index k, int thread) {
      const Index s = (first + k) * b;
      chunk_key_state(ws[static_cast<std::size_t>(thread)], Kh, Vh, s, std::min(b, n - s),
                      slots.middleCols(k * (dv + 1), dv + 1));
    }, work(count * b, dv));
  }

  // Z^{<s} of chunks [first, first + count) into `slots`, continuing the running prefix carry_.
  void prefix_states(const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh, Index first, Index count,
                     MatrixRef<T> slots, std::vector<Workspace>& ws) {
    key_states(Kh, Vh, first, count, slots, ws);
    exclusive_scan(slots, Vh.cols() + 1, carry_, +1);
  }

  // M_{Q,t}^T E_t of chunks [first, first + count) into `slots` (count slots of r x (d_v+2)); the chunks' query
  // monomials and adjoints are left in the workspaces.
  void query_state_grads(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Oh, const ConstMatrixRef<T>& Gh,
                         const Eigen::Ref<const Vector<T>>& normalisers, Index first, Index count,
                         MatrixRef<T> slots, std::vector<Workspace>& ws) {
    const Index dv = Gh.cols(), n = Qh.rows(), b = scan_rows(n);
    parallel_for(count, [&](Index k, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index s = (first + k) * b, rows = std::min(b, n - s);
      expand(w, Qh.middleRows(s, rows), w.scaled_queries);
      load_adjoints(w, Gh.middleRows(s, rows), Oh.middleRows(s, rows), normalisers, s);
      slots.middleCols(k * (dv + 2), dv + 2).noalias() = top(w.monomials, rows).transpose() * top(w.adjoints, rows);
    }, work(count * b, dv));
  }

  // `sum` = the first `blocks` block partials of partials_ (sum.cols() columns each), added in block order;
  // zero when there are none (an empty shard).
  template <class Sum>
  void sum_partials(Index blocks, Sum& sum) const {
    const Index width = sum.cols();
    if (blocks == 0) {
      sum.setZero();
      return;
    }
    sum = partials_.leftCols(width);
    for (Index block = 1; block < blocks; ++block) sum += partials_.middleCols(block * width, width);
  }

  // Which ranks' states combine_over_ranks() adds: all of them, or those before or after this one.
  enum class Ranks { all, earlier, later };

  // Replaces `states` by their sum over `ranks`, added in double (the exchange's contract) and rounded back to T.
  void combine_over_ranks(MatrixRef<T> states, Ranks ranks) {
    exchange_buffer_ = states.template cast<double>();
    if (ranks == Ranks::all)
      exchange_->all_reduce_sum(exchange_buffer_);
    else
      exchange_->exclusive_prefix_sum(exchange_buffer_, ranks == Ranks::later);
    states = exchange_buffer_.template cast<T>();
  }

  // The largest column sum of P~ over the chunks or blocks of column_sums_ (-inf for none), over all ranks with
  // an exchange.
  double largest_column_sum() const {
    const double local = column_sums_.empty() ? -std::numeric_limits<double>::infinity()
                                              : *std::max_element(column_sums_.begin(), column_sums_.end());
    return exchange_ ? exchange_->all_reduce_max(local) : local;
  }

  const FeatureMap<T>* map_ = nullptr;
  Polynomial poly_;
  bool causal_ = false;
  Index chunk_size_ = 0;
  std::size_t scan_window_bytes_ = std::size_t(16) << 20;
  const char* where_ = "";
  double radius_ = 0;
  std::vector<Workspace> workspaces_;
  // Block partials (non-causal), causal window slots, prefix carries and state gradients.
  Matrix<T> partials_, window_states_, window_starts_, state_grad_slots_, carry_, state_grads_;
  std::vector<double> column_sums_;
  StateExchange* exchange_ = nullptr;
  Eigen::MatrixXd exchange_buffer_;  // the states being exchanged, in double
};

// Out of the class body so that they are not inline: see the note at the top of the class's private part.
template <class T>
void PolynomialKernel<T>::forward(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                                  MatrixRef<T> Oh, Eigen::Ref<Vector<T>> normalisers, MatrixRef<T> states,
                                  MatrixRef<T> incoming_state) {
  if (causal_)
    forward_causal(Qh, Kh, Vh, Oh, normalisers, states, incoming_state);
  else
    forward_full(Qh, Kh, Vh, Oh, normalisers, states);
}

template <class T>
double PolynomialKernel<T>::backward(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh,
                                     const ConstMatrixRef<T>& Vh, const ConstMatrixRef<T>& Oh,
                                     const ConstMatrixRef<T>& Gh, const Eigen::Ref<const Vector<T>>& normalisers,
                                     const ConstMatrixRef<T>& states, const ConstMatrixRef<T>& incoming_state,
                                     MatrixRef<T> dQh, MatrixRef<T> dKh, MatrixRef<T> dVh) {
  return causal_ ? backward_causal(Qh, Kh, Vh, Oh, Gh, normalisers, states, incoming_state, dQh, dKh, dVh)
                 : backward_full(Qh, Kh, Vh, Oh, Gh, normalisers, states, dQh, dKh, dVh);
}

}  // namespace detail
}  // namespace polyattn
