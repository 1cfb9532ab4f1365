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
/// - **Causal.** The chunked scan of chunked_scan.hpp, in chunks of scan_rows() rows. (1) Every chunk computes its
///   own key state \f$\Delta Z_t = \mathrm{diag}(\omega)M_{K,t}^\top[V_t,\mathbf 1]\f$, in parallel; (2) an
///   exclusive prefix sum in chunk order turns them into \f$Z^{<s}\f$ (parallel over rows of the state, each entry
///   summed in chunk order); (3) every chunk computes its rows from \f$Z^{<s}\f$ and its own masked block
///   \f$\mathrm{tril}(p(c\,Q_sK_s^\top))\f$, in parallel. Backward runs the same three phases in reverse with
///   \f$\Delta Y_t = M_{Q,t}^\top E_t\f$ and an exclusive suffix sum. The prefix states are either kept for every
///   chunk (the adjoint's checkpoints, which backward() reads) or computed window by window in a bounded
///   workspace; either way every \f$Z^{<s}\f$ is the same sum in the same order. The three phases repeat for
///   every window of chunks (window_chunks()), all in one parallel region (parallel_pass()): at 2^18 rows a pass
///   has about 500 loops, and forking a team for each cost 1.5-2.5% of the causal adjoint and 2-4% of the causal
///   forward on two threads.
///
/// No partition depends on the thread count and no thread's result depends on which blocks it ran, so outputs,
/// gradients and errors are bitwise the same for any number of threads (parallel/threads.hpp).
///
/// **Storage order.** Each head's inputs and results are HeadRows and HeadOutput (head_rows.hpp): a block of a
/// column-major matrix, read and written in place, or of a row-major one, whose chunks of rows are transposed
/// into the workspace's staged_* matrices when they are loaded and back when they are stored. Every product then
/// sees the same column-major operands in the same order: the results are bitwise the same in either order.
/// The states are stored transposed, \f$Z^\top = [V,\mathbf 1]^\top M_K\mathrm{diag}(\omega)\f$ ((d_v+1) x r) and
/// \f$Y^\top\f$ ((d_v+2) x r): transposed_product() writes a chunk's state in that layout straight from its
/// product (stored r x (d_v+1), every chunk's state cost a transpose), and each state is one contiguous slot.
///
/// **Sequence parallel.** With a StateExchange (parallel/state_exchange.hpp) the rows are one rank's shard of the
/// sequence, possibly empty, and the states are combined over ranks in double: non-causal, \f$Z\f$ and \f$Y\f$ are
/// summed over all ranks; causal, the forward scan starts from the keys of the earlier ranks and the backward
/// scan from the queries of the later ones, which needs the local total first: the kept chunk states are all
/// computed before any output, otherwise a pre-pass sums the shard (a cost the serial kernel never pays). The
/// forward pass returns the incoming state, so a backward() without checkpoints can rebuild its prefix states
/// without another exchange; kept or rebuilt, every prefix is the same sum in the same order, as serially.
/// Without an exchange every result is bitwise the serial kernel's.
///
/// **Exact window (near field).** With PolynomialAttentionOptions::exact_window \f$w > 0\f$ the pairs with
/// \f$0 \le i - j < w\f$ (causal) or \f$|i - j| < w\f$ (non-causal) are *near* and weighted by \f$e^{s_{ij}}\f$, the
/// other unmasked pairs are *far* and weighted by \f$p(s_{ij})\f$, under one normaliser. Row \f$i\f$ is computed as
/// \f[ \tilde o_i = \frac{\sum_{\text{near}} e^{s_{ij} - m_i}[v_j, 1] + e^{-m_i}F_i}{\cdots}, \qquad
///     F_i = \sum_{\text{far}} p(s_{ij})[v_j, 1], \qquad
///     m_i = \max\big(\max_{\text{near}} s_{ij},\ \log F_{i,d_v+1}\big), \f]
/// the last column giving the normaliser \f$\hat D_i\f$ (the \f$\log\f$ term only when row \f$i\f$ has far keys and
/// their sum is positive). The shift cancels in the ratio, so it changes rounding only: every near term is at most
/// 1 and \f$e^{-m_i}F_i\f$ at most 1 in its normaliser column, so (for a positive p) \f$1 \le \hat D_i \le 2w\f$
/// whatever the score radius. A plain shift by the near maximum would not do: with near scores of -100 and far
/// scores of 0 the far sum would be multiplied by \f$e^{100}\f$, which overflows float. A row without far keys
/// gets the far factor 0 (its \f$e^{-m}\f$ may overflow). The forward pass saves \f$m_i\f$ with \f$\hat D_i\f$
/// ("shifts").
/// The near pairs are evaluated directly on *tiles*: a block of query rows against the band of keys around them
/// (or, for the key rows of the backward pass, a block of keys against the queries around them), at
/// \f$O((w + b)d)\f$ per row. How the far field excludes them:
/// - **Causal: split.** The prefix state of chunk \f$s\f$ is *lagged* by \f$\ell = \lceil (w-1)/b\rceil\f$ chunks,
///   \f$Z^{<s-\ell}\f$ (every key in it is far for every row of the chunk), and the tile covers chunks
///   \f$s-\ell..s\f$ directly: \f$e^{s}\f$ on near pairs, \f$p(s)\f$ on the far ones. Backward mirrors it with the
///   suffix state \f$Y^{>s+\ell}\f$. The lag is a shift of which chunk's state goes into which scan slot, so the
///   scans, checkpoints and windows are unchanged. No term is added and removed again: the far sum has no
///   cancellation beyond today's, and a row without far keys has an exact zero. Cost: tiles of
///   \f$(\ell+1)b \le w - 1 + 2b\f$ keys instead of the \f$b\times b\f$ diagonal block.
/// - **Non-causal: subtraction.** The far keys of a row lie on both sides of its band, so a split would need a
///   prefix and a suffix state per chunk (memory \f$O((n/b)\,r d)\f$ and a second pass); instead the full state is
///   kept and the tile subtracts \f$p(s_{ij})[v_j,1]\f$ of the near pairs from \f$F_i\f$, a tile of \f$b + 2(w-1)\f$
///   keys per block of \f$b = 64\f$ rows. In exact arithmetic this is the far sum; its rounding is of the order of
///   the polynomial sum's own (\f$u\sum_j\bar p(|s_{ij}|)|v_j|\f$), which the near terms already contributed
///   before, and rows without far keys (\f$w > \max(i, n-1-i)\f$) get the far factor 0.
/// The backward pass differentiates the same function: the far terms through the states with the adjoints
/// scaled by \f$e^{-m_i}\f$ (\f$E_i = [g_i, -\kappa_i, 1]\,e^{-m_i}/\hat D_i\f$), the tile with the weights
/// \f$W_{ij}\f$ (\f$e^{s_{ij}-m_i}\f$ near, \f$\pm e^{-m_i}p(s_{ij})\f$ polynomial) and their derivatives
/// \f$W'_{ij}\f$ (\f$p'\f$ for \f$p\f$): \f$\partial S = W'\circ(\hat E[V,\mathbf 1]^\top)\f$ with
/// \f$\hat E_i = [g_i, -\kappa_i]/\hat D_i\f$, \f$\partial V \mathrel{+}= W^\top\hat E_g\f$. The shift is a constant of
/// the function (it cancels), so it has no gradient. Every tile writes only its own rows (the key side recomputes
/// the scores of the pairs the query side saw, at twice the tile cost), so the result stays bitwise the same
/// for any thread count. Not available with a state exchange (a window crossing a shard boundary would need
/// the neighbouring rank's keys).
#pragma once

#include "../parallel/state_exchange.hpp"
#include "../parallel/threads.hpp"
#include "block_product.hpp"
#include "chunked_scan.hpp"
#include "feature_map.hpp"
#include "head_rows.hpp"
#include "options.hpp"
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
  /// Sets the feature map and polynomial for the next calls (the map must outlive them). `chunk_size`,
  /// `scan_window_bytes` and `exact_window` are PolynomialAttentionOptions' (0: automatic for the first two);
  /// `where` and `radius` go into error messages. `exchange` (null: serial) combines the states with the other ranks' shards;
  /// every rank must then make the same calls (see the file documentation); it requires exact_window 0.
  void configure(const FeatureMap<T>& map, const Polynomial& poly, bool causal, Index chunk_size,
                 std::size_t scan_window_bytes, Index exact_window, const char* where, double radius,
                 StateExchange* exchange) {
    map_ = &map;
    poly_ = poly;
    coefficients_.assign(poly.coeffs.begin(), poly.coeffs.end());
    causal_ = causal;
    chunk_size_ = chunk_size;
    scan_window_bytes_ = scan_window_bytes;
    exact_window_ = exact_window;
    where_ = where;
    radius_ = radius;
    exchange_ = exchange;
  }

  /// Takes the configuration of `other` (configure()'s arguments), not its workspaces: a kernel for another
  /// thread's heads.
  void configure_as(const PolynomialKernel& other) {
    configure(*other.map_, other.poly_, other.causal_, other.chunk_size_, other.scan_window_bytes_,
              other.exact_window_, other.where_, other.radius_, other.exchange_);
  }

  /// Rows of a causal scan chunk for n rows (at least one, so that an empty shard has no chunks).
  Index scan_rows(Index n) const { return detail::scan_rows(chunk_size_, n); }
  /// Number of causal scan chunks of n rows (the last may be shorter).
  Index scan_chunks(Index n) const { return detail::scan_chunks(chunk_size_, n); }
  /// Rows of a non-causal block: monomials and their gradients (2 x rows x r) near 512 KiB, GEMM-shaped and in
  /// half of a 1 MiB L2 (384 rows in float at d = 16, g = 2: 2-3% faster than 832 rows, which filled it); a
  /// whole number of block_product()'s row tiles, whose rows after the last full SIMD packet would take scalar
  /// multiply-adds.
  Index block_rows() const {
    if (chunk_size_ > 0) return chunk_size_;
    constexpr Index tile = BlockProductTile<T>::row_packets * BlockProductTile<T>::lanes;
    const Index rows = (Index(1) << 18) / (static_cast<Index>(sizeof(T)) * map_->width()) / tile * tile;
    return std::clamp<Index>(rows, 64, 2048);
  }

  /// Writes \f$\tilde O_h\f$ and its normalisers \f$\tilde D\f$ (with an exact window the shifted \f$\hat D\f$, and
  /// the row shifts \f$m_i\f$ into `shifts`, which has no rows without a window). `states` receives, transposed (the
  /// layout of every state here: see the file documentation), non-causal \f$Z^\top\f$ ((d_v+1) x r); causal,
  /// \f$(Z^{<s})^\top\f$ (with a window \f$Z^{<s-\ell}\f$) of every chunk s ((d_v+1) x chunks r) when it has that
  /// many columns, and nothing when it has none. Causal, `incoming_state` ((d_v+1) x r) receives the state the scan
  /// starts from: the earlier ranks' keys, zero without an exchange;
  /// non-causal it has no columns. Throws std::domain_error when a normaliser is not positive or not finite; with
  /// an exchange only after this head's exchange.
  ///
  /// With `measure_inputs` (serial calls without an exact window only), forward() also takes the statistics of
  /// the rows it reads anyway, while they are in cache, for input_statistics(): a caller that needs them for its
  /// certificate then makes no passes of its own over Q_h, K_h and V_h.
  void forward(const HeadRows<T>& Qh, const HeadRows<T>& Kh, const HeadRows<T>& Vh, HeadOutput<T> Oh,
               Eigen::Ref<Vector<T>> normalisers, Eigen::Ref<Vector<T>> shifts, MatrixRef<T> states,
               MatrixRef<T> incoming_state, bool measure_inputs = false);

  /// What the last forward() or backward() with `measure_inputs` read, each maximum NaN if an entry is NaN, else
  /// +inf if one is infinite, and the same for any thread count. forward(): the largest squared row norms of Q_h
  /// and K_h (max_squared_row_norm()) and the largest |entry| of V_h, for the certificate's R and output bound.
  /// backward(): the largest |entry| of Q_h, K_h, G_h and O_h and the largest squared row norms of V_h and G_h, for
  /// the gradient bounds (and O_h's finiteness).
  struct InputStatistics {
    double max_query_norm2 = 0, max_key_norm2 = 0, max_abs_value = 0;  // forward()
    double max_abs_query = 0, max_abs_key = 0, max_value_norm2 = 0, max_gradient_norm2 = 0, max_abs_gradient = 0,
           max_abs_output = 0;  // backward()
    void include(const InputStatistics& other) {
      for (auto field : {&InputStatistics::max_query_norm2, &InputStatistics::max_key_norm2,
                         &InputStatistics::max_abs_value, &InputStatistics::max_abs_query,
                         &InputStatistics::max_abs_key, &InputStatistics::max_value_norm2,
                         &InputStatistics::max_gradient_norm2, &InputStatistics::max_abs_gradient,
                         &InputStatistics::max_abs_output})
        this->*field = max_keeping_nan(this->*field, other.*field);
    }
  };
  InputStatistics input_statistics() const {
    InputStatistics all;
    for (const Workspace& w : workspaces_) all.include(w.inputs);
    return all;
  }

  /// Writes dQ_h, dK_h, dV_h, the exact gradient of forward()'s \f$\tilde O_h\f$ for \f$G_h\f$, from what forward()
  /// saved: the normalisers and shifts, `states` (non-causal: \f$Z^\top\f$; causal: every \f$(Z^{<s})^\top\f$, or no
  /// columns, then they are recomputed from `incoming_state`). Returns \f$\max_j\sigma_j\f$, the largest column sum of
  /// \f$\tilde P\f$ (over all ranks with an exchange; \f$-\infty\f$ when there are no keys).
  /// With `measure_inputs` (serial calls without an exact window only), also takes input_statistics() of the rows
  /// it reads.
  double backward(const HeadRows<T>& Qh, const HeadRows<T>& Kh, const HeadRows<T>& Vh,
                  const HeadRows<T>& Oh, const HeadRows<T>& Gh, const Eigen::Ref<const Vector<T>>& normalisers,
                  const Eigen::Ref<const Vector<T>>& shifts, const ConstMatrixRef<T>& states,
                  const ConstMatrixRef<T>& incoming_state, HeadOutput<T> dQh, HeadOutput<T> dKh, HeadOutput<T> dVh,
                  bool measure_inputs = false);

  /// Whether every entry that the last forward() or backward() wrote (O_h, or dQ_h, dK_h, dV_h) is finite. Each
  /// block is checked when it is written, still in cache, so that the caller's check of the results need not
  /// read them again unless one is not.
  bool results_finite() const {
    return std::all_of(workspaces_.begin(), workspaces_.end(), [](const Workspace& w) { return w.results_finite; });
  }

 private:
  // forward() and backward() are defined after the class, not inline, so that code which includes
  // extern_templates.hpp calls the compiled instantiation instead of instantiating the kernel again.

  // One thread's chunk workspaces, sized for `rows` rows; chunks use their top rows.
  struct Workspace {
    Matrix<T> scaled_queries, scaled_keys, monomials, monomial_grads, values, products, adjoints,
        weighted_state_grads, block, derivative_block, score_grads, transposed_block;
    // Scratch of transposed_product() (a chunk's state [V, 1]^T M or E^T M).
    Matrix<T> transposed_operand;
    Vector<T> inverse_normalisers;
    // The column sums of the key monomials in w.monomials (load_keys_into_state()).
    Vector<T> key_sums;
    // Exact window only. A near-field tile (near_tile_rows() x near_band()): its scores, p and p' of them, its
    // weights W and W', and the score gradients; the band's scaled rows, values [V, 1] and query adjoints; per
    // query of the band its inverse normaliser, shift and far scale; per row of the tile its largest near score.
    Matrix<T> near_scores, near_poly, near_derivative, near_weights, near_derivative_weights, near_grads,
        near_operand, near_values, near_adjoints;
    Vector<T> near_inverse, near_shifts, near_scales, near_maxima;
    // Token-major heads only (head_rows.hpp): chunks of input rows transposed into column-major (Q or K, V or G,
    // O), and result rows computed column-major before they are stored transposed (dQ, dK, and O or dV).
    Matrix<T> staged_qk, staged_vg, staged_o, staged_dq, staged_dk, staged_ov;
    // Whether every result block this thread wrote in the current call was finite (results_finite()).
    bool results_finite = true;
    // The statistics of the input rows this thread read (forward()'s or backward()'s measure_inputs).
    InputStatistics inputs;
  };

  // Workspaces for parallel_threads(blocks) threads; a later call of the same shape reuses them. With an exact
  // window, also the near-field tiles of a sequence of n rows.
  std::vector<Workspace>& workspaces(Index blocks, Index rows, Index dk, Index dv, Index n) {
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
      ensure_shape(w.weighted_state_grads, dv + 2, r);
      if (w.inverse_normalisers.size() != rows) w.inverse_normalisers.resize(rows);
      if (w.key_sums.size() != r) w.key_sums.resize(r);
      if (causal_) {
        ensure_shape(w.block, rows, rows);
        ensure_shape(w.derivative_block, rows, rows);
        ensure_shape(w.score_grads, rows, rows);
        ensure_shape(w.transposed_block, rows, rows);
      }
      if (staged_) {
        const Index input_rows = near_width_ > 0 ? std::max(rows, near_band(n)) : rows;
        ensure_shape(w.staged_qk, input_rows, dk);
        ensure_shape(w.staged_vg, input_rows, dv);
        ensure_shape(w.staged_o, input_rows, dv);
        ensure_shape(w.staged_dq, rows, dk);
        ensure_shape(w.staged_dk, rows, dk);
        ensure_shape(w.staged_ov, rows, dv);
      }
      if (near_width_ > 0) {
        const Index tile = near_tile_rows(n), band = near_band(n);
        for (Matrix<T>* m : {&w.near_scores, &w.near_poly, &w.near_derivative, &w.near_weights,
                             &w.near_derivative_weights, &w.near_grads})
          ensure_shape(*m, tile, band);
        ensure_shape(w.near_operand, band, dk);
        ensure_shape(w.near_values, band, dv + 1);
        ensure_shape(w.near_adjoints, band, dv + 2);
        for (Vector<T>* v : {&w.near_inverse, &w.near_shifts, &w.near_scales})
          if (v->size() != band) v->resize(band);
        if (w.near_maxima.size() != tile) w.near_maxima.resize(tile);
      }
    }
    return workspaces_;
  }

  // Estimated multiply-adds of a loop over `rows` rows (features times the value width): small loops stay on the
  // calling thread (parallel_for).
  double work(Index rows, Index dv) const {
    return static_cast<double>(rows) * static_cast<double>(map_->width()) * static_cast<double>(dv + 2);
  }

  // Threads of a causal pass over n rows in windows of `window` chunks (parallel_pass()): those of its loops, which
  // are parallel unless the whole pass is small.
  int pass_threads(Index n, Index window, Index dv) const {
    return work(n, dv) < min_parallel_work ? 1 : parallel_threads(window);
  }

  static auto top(Matrix<T>& workspace, Index rows) { return workspace.topRows(rows); }

  // Monomials of the rows X into the top of w.monomials; the top of `scaled` receives sqrt(c) X.
  void expand(Workspace& w, const ConstMatrixRef<T>& X, Matrix<T>& scaled) const {
    map_->monomials(X, top(scaled, X.rows()), top(w.monomials, X.rows()));
  }

  // With measure_inputs, takes the statistics of rows of Q_h (queries), of K_h and V_h (keys) or of G_h and O_h
  // into w.inputs: the forward pass's or the backward pass's (input_statistics()).
  void measure_queries(Workspace& w, const ConstMatrixRef<T>& queries) const {
    if (measuring_ == Measuring::forward)
      w.inputs.max_query_norm2 = max_keeping_nan(w.inputs.max_query_norm2, max_squared_row_norm(queries));
    else if (measuring_ == Measuring::backward)
      w.inputs.max_abs_query = max_keeping_nan(w.inputs.max_abs_query, max_abs_entry(queries));
  }
  template <class Values>
  void measure_keys(Workspace& w, const ConstMatrixRef<T>& keys, const Values& values) const {
    if (measuring_ == Measuring::forward) {
      w.inputs.max_key_norm2 = max_keeping_nan(w.inputs.max_key_norm2, max_squared_row_norm(keys));
      w.inputs.max_abs_value = max_keeping_nan(w.inputs.max_abs_value, max_abs_entry(values));
    } else if (measuring_ == Measuring::backward) {
      w.inputs.max_abs_key = max_keeping_nan(w.inputs.max_abs_key, max_abs_entry(keys));
      w.inputs.max_value_norm2 = max_keeping_nan(w.inputs.max_value_norm2, max_squared_row_norm(values));
    }
  }
  void measure_output_grads(Workspace& w, const ConstMatrixRef<T>& Gb, const ConstMatrixRef<T>& Ob) const {
    if (measuring_ != Measuring::backward) return;
    w.inputs.max_gradient_norm2 = max_keeping_nan(w.inputs.max_gradient_norm2, max_squared_row_norm(Gb));
    w.inputs.max_abs_gradient = max_keeping_nan(w.inputs.max_abs_gradient, max_abs_entry(Gb));
    w.inputs.max_abs_output = max_keeping_nan(w.inputs.max_abs_output, max_abs_entry(Ob));
  }

  // Top of w.values = [V_b, 1] for the rows [first, first + rows) of V: one GEMM then yields the numerators and
  // the normaliser together.
  static void load_values(Workspace& w, const HeadRows<T>& Vh, Index first, Index rows) {
    auto values = top(w.values, rows);
    Vh.copy_rows(first, rows, values.leftCols(Vh.cols()));
    values.col(Vh.cols()).setOnes();
  }

  // The query rows [first, first + rows) into w: their monomials and sqrt(c) Q (expand()); with measure_inputs,
  // their statistics.
  void load_queries(Workspace& w, const HeadRows<T>& Qh, Index first, Index rows) const {
    const ConstMatrixRef<T> queries = Qh.block(first, rows, w.staged_qk);
    expand(w, queries, w.scaled_queries);
    measure_queries(w, queries);
  }

  // The key rows [first, first + rows) into w: their monomials and sqrt(c) K (expand()), with `key_sums` also the
  // monomials' column sums into w.key_sums, and [V, 1] (load_values()); with measure_inputs, their statistics.
  void load_keys(Workspace& w, const HeadRows<T>& Kh, const HeadRows<T>& Vh, Index first, Index rows,
                 bool key_sums = false) const {
    const ConstMatrixRef<T> keys = Kh.block(first, rows, w.staged_qk);
    if (key_sums)
      map_->monomials(keys, top(w.scaled_keys, rows), top(w.monomials, rows), w.key_sums);
    else
      expand(w, keys, w.scaled_keys);
    load_values(w, Vh, first, rows);
    measure_keys(w, keys, top(w.values, rows).leftCols(Vh.cols()));
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
    note_results(w, Ob);
  }

  // Records in w whether the result blocks are finite (results_finite()).
  template <class... Blocks>
  static void note_results(Workspace& w, const Blocks&... blocks) {
    w.results_finite = w.results_finite && (all_finite(blocks) && ...);
  }

  // `adjoints` = [G/D, -rowsum(G o O)/D, 1/D] for `inverse` = 1/D (the last column gives the column sums of P~).
  template <class Adjoints, class Inverse>
  static void write_adjoints(Adjoints adjoints, const ConstMatrixRef<T>& Gb, const ConstMatrixRef<T>& Ob,
                             const Inverse& inverse) {
    const Index dv = Gb.cols();
    adjoints.leftCols(dv).noalias() = inverse.asDiagonal() * Gb;
    adjoints.col(dv) = -Gb.cwiseProduct(Ob).rowwise().sum().cwiseProduct(inverse);
    adjoints.col(dv + 1) = inverse;
  }

  // Top of w.adjoints = the adjoints E of the polynomial terms of rows [first_row, first_row + rows):
  // [G, -rowsum(G o O), 1] / D; with an exact window D = D^ e^{m_i}, i.e. 1/D is the far scale over D^ (file docs).
  void load_adjoints(Workspace& w, const ConstMatrixRef<T>& Gb, const ConstMatrixRef<T>& Ob,
                     const Eigen::Ref<const Vector<T>>& normalisers, const Eigen::Ref<const Vector<T>>& shifts,
                     Index first_row, Index n) const {
    const Index rows = Gb.rows();
    auto inverse = w.inverse_normalisers.head(rows);
    inverse = normalisers.segment(first_row, rows).cwiseInverse();
    if (near_width_ > 0)
      for (Index i = 0; i < rows; ++i) inverse(i) *= far_scale(first_row + i, shifts(first_row + i), n);
    write_adjoints(top(w.adjoints, rows), Gb, Ob, inverse);
  }

  // The query rows [first, first + rows) into w for the backward pass: load_queries() and their adjoints E
  // (load_adjoints()); with measure_inputs, also the statistics of G and O.
  void load_query_adjoints(Workspace& w, const HeadRows<T>& Qh, const HeadRows<T>& Oh, const HeadRows<T>& Gh,
                           const Eigen::Ref<const Vector<T>>& normalisers, const Eigen::Ref<const Vector<T>>& shifts,
                           Index first, Index rows, Index n) const {
    load_queries(w, Qh, first, rows);
    const ConstMatrixRef<T> output_grads = Gh.block(first, rows, w.staged_vg);
    const ConstMatrixRef<T> outputs = Oh.block(first, rows, w.staged_o);
    load_adjoints(w, output_grads, outputs, normalisers, shifts, first, n);
    measure_output_grads(w, output_grads, outputs);
  }

  // dQb += the query gradient through a key state Z, given as Z^T: M'_Q = [G/D, -kappa/D] Z^T pulled back through
  // the monomials of the chunk (its query monomials and scaled queries must be in w).
  void add_query_grads_through(Workspace& w, const ConstMatrixRef<T>& state, MatrixRef<T> dQb) const {
    const Index rows = dQb.rows(), dv = state.rows() - 1;
    auto monomial_grads = top(w.monomial_grads, rows);
    block_product<T>(top(w.adjoints, rows).leftCols(dv + 1), state, monomial_grads);
    map_->monomials_backward(monomial_grads, top(w.scaled_queries, rows), top(w.monomials, rows), dQb);
  }

  // value = p(S) and, with `with_derivative`, derivative = p'(S), entrywise (the blocks are written through): one
  // pass down each column in SIMD packets (the same operations as Horner on whole blocks, which made a pass over
  // the blocks per coefficient).
  template <class Scores, class Values, class Derivatives>
  void polynomial_of(const Scores& scores, Values value, Derivatives derivative, bool with_derivative) const {
    const T* c = coefficients_.data();
    const Index degree = poly_.degree();
    for (Index j = 0; j < scores.cols(); ++j) {
      const T* s = scores.data() + j * scores.outerStride();
      T* p = value.data() + j * value.outerStride();
      T* dp = derivative.data() + j * derivative.outerStride();
      for_row_strips<T, 1>(scores.rows(), [&](Index i, Index, auto packet) {
        decltype(packet) v, d;
        horner<T>(c, degree, Eigen::internal::ploadu<decltype(packet)>(s + i), v, d, with_derivative);
        Eigen::internal::pstoreu(p + i, v);
        if (with_derivative) Eigen::internal::pstoreu(dp + i, d);
      });
    }
  }

  // Top-left rows x rows of w.block = tril(p(S)) for S = sqrt(c)Q_s (sqrt(c)K_s)^T from the tops of the scaled
  // queries and keys, and with `with_derivative` w.derivative_block = p'(S) (causal_polynomial_block()).
  void in_chunk_block(Workspace& w, Index rows, bool with_derivative) const {
    causal_polynomial_block<T>(coefficients_.data(), poly_.degree(), top(w.scaled_queries, rows),
                               top(w.scaled_keys, rows), w.block.topLeftCorner(rows, rows),
                               with_derivative ? &w.derivative_block : nullptr);
  }

  // ---- Exact window (near field); see the file documentation. ----

  // A rectangle of the score matrix S (row0.., col0..: queries x keys) or, with `keys_as_rows`, of its transpose
  // (rows are keys, columns queries).
  struct NearTile {
    Index row0, rows, col0, cols;
    bool keys_as_rows;
  };

  // An offset i - j larger than any in a sequence.
  static constexpr Index unbounded_offset = Index(1) << 60;

  // Chunks the causal prefix and suffix states lag behind: ceil((w - 1) / b), so that every key of Z^{<s-lag} is
  // far for every row of chunk s.
  Index near_lag(Index b) const { return near_width_ > 1 ? (near_width_ - 2) / b + 1 : 0; }
  // Rows of a near-field tile: the scan chunk (causal) or 64-row pieces of the blocks (non-causal).
  Index near_tile_rows(Index n) const {
    return causal_ ? scan_rows(n) : std::max<Index>(1, std::min({default_scan_rows, block_rows(), n}));
  }
  // Columns of the widest tile (the band around its rows).
  Index near_band(Index n) const {
    const Index b = near_tile_rows(n);
    return std::min(n, causal_ ? (near_lag(b) + 1) * b : b + 2 * (near_width_ - 1));
  }
  // Offsets i - j of the near pairs: [0, w) causal, (-w, w) non-causal.
  std::pair<Index, Index> near_offsets() const { return {causal_ ? 0 : 1 - near_width_, near_width_}; }
  // Whether query i of n has far keys.
  bool has_far(Index i, Index n) const { return i >= near_width_ || (!causal_ && i + near_width_ < n); }
  // e^{-m_i}, the factor of the far terms of query i with shift m_i; 0 without far keys (an empty far sum, and
  // e^{-m} could overflow).
  T far_scale(Index i, T shift, Index n) const { return has_far(i, n) ? std::exp(-shift) : T(0); }

  // The tile of the query rows [first, first + rows): every key they see near the diagonal and, causal, the far
  // keys of the chunks that the lagged prefix state leaves out.
  NearTile query_tile(Index first, Index rows, Index n) const {
    const Index b = scan_rows(n);
    const Index begin = std::max<Index>(0, causal_ ? first - near_lag(b) * b : first - (near_width_ - 1));
    const Index end = causal_ ? first + rows : std::min(n, first + rows + near_width_ - 1);
    return {first, rows, begin, end - begin, false};
  }
  // The tile of the key rows [first, first + rows): every query that sees them near the diagonal and, causal, the
  // queries of the chunks that the lagged suffix state leaves out.
  NearTile key_tile(Index first, Index rows, Index n) const {
    const Index b = scan_rows(n);
    const Index begin = causal_ ? first : std::max<Index>(0, first - (near_width_ - 1));
    const Index end = std::min(n, causal_ ? first + (near_lag(b) + 1) * b : first + rows + near_width_ - 1);
    return {first, rows, begin, end - begin, true};
  }

  // The rows [first, last) of column `col` of `tile` whose pair (i, j) has i - j in [lo, hi).
  static std::pair<Index, Index> rows_with_offset(const NearTile& tile, Index col, Index lo, Index hi) {
    const Index g = tile.col0 + col;
    // Rows are queries i = j + offset, or keys j = i - offset.
    const Index first = tile.keys_as_rows ? g - hi + 1 : g + lo, last = tile.keys_as_rows ? g - lo + 1 : g + hi;
    const Index begin = std::clamp(first - tile.row0, Index(0), tile.rows);
    return {begin, std::clamp(last - tile.row0, begin, tile.rows)};
  }

  // Top-left of `weights` = the tile's terms, zero elsewhere: on its polynomial pairs sign * `poly` (null: none;
  // causal: + on the far pairs, non-causal: - on the near pairs, whose p the full state holds), times the query's
  // far scale when `scales` is given; plus, on its near pairs, exp(S - m) for the queries' `shifts` (null: none).
  // `scales` and `shifts` are indexed by the tile's queries.
  void near_weights(const NearTile& tile, const Matrix<T>& scores, const Matrix<T>* poly, const Vector<T>* scales,
                    const Vector<T>* shifts, Matrix<T>& weights) const {
    auto out = weights.topLeftCorner(tile.rows, tile.cols);
    out.setZero();
    const auto [near_lo, near_hi] = near_offsets();
    const Index poly_lo = causal_ ? near_width_ : near_lo, poly_hi = causal_ ? unbounded_offset : near_hi;
    const T sign = causal_ ? T(1) : T(-1);
    for (Index c = 0; c < tile.cols; ++c) {
      if (poly) {
        const auto [r0, r1] = rows_with_offset(tile, c, poly_lo, poly_hi);
        auto part = out.col(c).segment(r0, r1 - r0);
        const auto p = poly->col(c).segment(r0, r1 - r0);
        if (!scales)
          part = sign * p;
        else if (tile.keys_as_rows)
          part = (sign * (*scales)(c)) * p;
        else
          part = sign * p.cwiseProduct(scales->segment(r0, r1 - r0));
      }
      if (shifts) {
        const auto [r0, r1] = rows_with_offset(tile, c, near_lo, near_hi);
        const auto s = scores.col(c).segment(r0, r1 - r0).array();
        if (tile.keys_as_rows)
          out.col(c).segment(r0, r1 - r0).array() += (s - (*shifts)(c)).exp();
        else
          out.col(c).segment(r0, r1 - r0).array() += (s - shifts->segment(r0, r1 - r0).array()).exp();
      }
    }
  }

  // For the queries [first, first + count): w.near_adjoints = E^ = [G/D^, -rowsum(G o O)/D^, 1/D^] (the adjoints of
  // the tile weights), w.near_shifts = m and w.near_scales = their far scales.
  void load_near_queries(Workspace& w, const HeadRows<T>& Gh, const HeadRows<T>& Oh,
                         const Eigen::Ref<const Vector<T>>& normalisers, const Eigen::Ref<const Vector<T>>& shifts,
                         Index first, Index count, Index n) const {
    auto inverse = w.near_inverse.head(count);
    inverse = normalisers.segment(first, count).cwiseInverse();
    write_adjoints(w.near_adjoints.topRows(count), Gh.block(first, count, w.staged_vg),
                   Oh.block(first, count, w.staged_o), inverse);
    w.near_shifts.head(count) = shifts.segment(first, count);
    for (Index i = 0; i < count; ++i) w.near_scales(i) = far_scale(first + i, shifts(first + i), n);
  }

  // The tile's scores: top-left of w.near_scores = `scaled_rows` times the tile's columns of `X` (scaled by
  // sqrt(c) into w.near_operand), transposed; p (and, `with_derivative`, p') of them into w.near_poly
  // (w.near_derivative).
  void near_scores(Workspace& w, const NearTile& tile, const ConstMatrixRef<T>& scaled_rows, const HeadRows<T>& X,
                   bool with_derivative) const {
    auto operand = w.near_operand.topRows(tile.cols);
    operand.noalias() = static_cast<T>(std::sqrt(map_->scale())) * X.block(tile.col0, tile.cols, w.staged_qk);
    auto scores = w.near_scores.topLeftCorner(tile.rows, tile.cols);
    block_product<T>(scaled_rows, operand.transpose(), scores);
    polynomial_of(scores, w.near_poly.topLeftCorner(tile.rows, tile.cols),
                  w.near_derivative.topLeftCorner(tile.rows, tile.cols), with_derivative);
  }

  // Forward: adds the near field of the query rows of `tile` (queries as rows, their sqrt(c) Q in
  // `scaled_queries`) to `products`, which holds their unscaled far sums from the state on entry, and rescales
  // each row by its shift m_i, written to `shifts`: products = e^{-m} (state part) + W [V, 1] with the tile's
  // weights W = e^{-m} (sign p) + exp(S - m) (file docs).
  void near_forward(Workspace& w, const NearTile& tile, const ConstMatrixRef<T>& scaled_queries,
                    const HeadRows<T>& Kh, const HeadRows<T>& Vh, MatrixRef<T> products,
                    Eigen::Ref<Vector<T>> shifts, Index n) const {
    const Index dv = Vh.cols(), rows = tile.rows, cols = tile.cols;
    near_scores(w, tile, scaled_queries, Kh, false);
    // m_i: the largest near score, or the log of the far normaliser (the state's and the tile's) when larger.
    near_weights(tile, w.near_scores, &w.near_poly, nullptr, nullptr, w.near_weights);
    auto maxima = w.near_maxima.head(rows);
    maxima.setConstant(-std::numeric_limits<T>::infinity());
    const auto [near_lo, near_hi] = near_offsets();
    for (Index c = 0; c < cols; ++c) {
      const auto [r0, r1] = rows_with_offset(tile, c, near_lo, near_hi);
      maxima.segment(r0, r1 - r0) = maxima.segment(r0, r1 - r0).cwiseMax(w.near_scores.col(c).segment(r0, r1 - r0));
    }
    auto far_normalisers = w.near_inverse.head(rows);  // scratch: the backward pass's inverse normalisers
    far_normalisers = products.col(dv) + w.near_weights.topLeftCorner(rows, cols).rowwise().sum();
    for (Index r = 0; r < rows; ++r) {
      const Index i = tile.row0 + r;
      T shift = maxima(r);
      if (has_far(i, n) && far_normalisers(r) > 0)
        shift = std::max(shift, static_cast<T>(std::log(far_normalisers(r))));
      w.near_shifts(r) = shift;
      w.near_scales(r) = far_scale(i, shift, n);
    }
    shifts = w.near_shifts.head(rows);
    near_weights(tile, w.near_scores, &w.near_poly, &w.near_scales, &w.near_shifts, w.near_weights);
    auto values = w.near_values.topRows(cols);
    Vh.copy_rows(tile.col0, cols, values.leftCols(dv));
    values.col(dv).setOnes();
    products.array().colwise() *= w.near_scales.head(rows).array();
    block_product_add<T>(w.near_weights.topLeftCorner(rows, cols), values, products);
  }

  // Backward, query side: dQ of the query rows of `tile` += c (W' o (E^ [V, 1]^T)) K over the tile's keys.
  void near_query_grads(Workspace& w, const NearTile& tile, const ConstMatrixRef<T>& scaled_queries,
                        const HeadRows<T>& Kh, const HeadRows<T>& Vh, const HeadRows<T>& Gh,
                        const HeadRows<T>& Oh, const Eigen::Ref<const Vector<T>>& normalisers,
                        const Eigen::Ref<const Vector<T>>& shifts, Index n, MatrixRef<T> dQ) const {
    const Index dv = Vh.cols(), rows = tile.rows, cols = tile.cols;
    load_near_queries(w, Gh, Oh, normalisers, shifts, tile.row0, rows, n);
    near_scores(w, tile, scaled_queries, Kh, true);
    near_weights(tile, w.near_scores, &w.near_derivative, &w.near_scales, &w.near_shifts, w.near_derivative_weights);
    auto values = w.near_values.topRows(cols);
    Vh.copy_rows(tile.col0, cols, values.leftCols(dv));
    values.col(dv).setOnes();
    auto grads = w.near_grads.topLeftCorner(rows, cols);
    block_product<T>(w.near_adjoints.topLeftCorner(rows, dv + 1), values.transpose(), grads);
    // sqrt(c) dS: then c dS K = (sqrt(c) dS)(sqrt(c) K).
    grads.array() *= static_cast<T>(std::sqrt(map_->scale())) *
                     w.near_derivative_weights.topLeftCorner(rows, cols).array();
    block_product_add<T>(grads, w.near_operand.topRows(cols), dQ);
  }

  // Backward, key side: dK, and dV and the column sums of P~ of the key rows of `tile` (keys as rows, their sqrt(c)
  // K and [V, 1] in `scaled_keys` and `values`) += their part from the tile's queries: c (W' o ([V, 1] E^T))^T Q,
  // and W^T E^ in the transposed tile, whose columns are dV's, an unused one and the column sums'.
  void near_key_grads(Workspace& w, const NearTile& tile, const ConstMatrixRef<T>& scaled_keys,
                      const ConstMatrixRef<T>& values, const HeadRows<T>& Qh, const HeadRows<T>& Gh,
                      const HeadRows<T>& Oh, const Eigen::Ref<const Vector<T>>& normalisers,
                      const Eigen::Ref<const Vector<T>>& shifts, Index n, MatrixRef<T> dK,
                      MatrixRef<T> value_grads) const {
    const Index dv = Gh.cols(), rows = tile.rows, cols = tile.cols;
    load_near_queries(w, Gh, Oh, normalisers, shifts, tile.col0, cols, n);
    near_scores(w, tile, scaled_keys, Qh, true);
    near_weights(tile, w.near_scores, &w.near_poly, &w.near_scales, &w.near_shifts, w.near_weights);
    near_weights(tile, w.near_scores, &w.near_derivative, &w.near_scales, &w.near_shifts, w.near_derivative_weights);
    const auto adjoints = w.near_adjoints.topRows(cols);
    const auto weights = w.near_weights.topLeftCorner(rows, cols);
    auto grads = w.near_grads.topLeftCorner(rows, cols);
    block_product<T>(values, adjoints.leftCols(dv + 1).transpose(), grads);
    grads.array() *= static_cast<T>(std::sqrt(map_->scale())) *
                     w.near_derivative_weights.topLeftCorner(rows, cols).array();
    // block_product rather than Eigen's products, whose last bits were seen to depend on the destination's memory
    // (the same rows in the caller's matrix and in a staged copy differed): results must not depend on it.
    block_product_add<T>(grads, w.near_operand.topRows(cols), dK);
    block_product_add<T>(weights, adjoints, value_grads);
  }

  // Chunks per window of the causal scan, whose slots are `width` x r (window_chunks()).
  Index window_chunks(Index chunks, Index width) const {
    const double slot_bytes = static_cast<double>(sizeof(T)) * static_cast<double>(map_->width() * width);
    return detail::window_chunks(chunks, slot_bytes, scan_window_bytes_);
  }

  // The key rows [first, first + rows) into w (load_keys()) and their transposed state [V, 1]^T M_K into `state`
  // ((d_v+1) x r): V^T M_K, and the normaliser row 1^T M_K summed while the monomials are written.
  void load_keys_into_state(Workspace& w, const HeadRows<T>& Kh, const HeadRows<T>& Vh, Index first, Index rows,
                            MatrixRef<T> state) const {
    const Index dv = Vh.cols();
    load_keys(w, Kh, Vh, first, rows, /*key_sums=*/true);
    transposed_product<T>(top(w.values, rows).leftCols(dv), top(w.monomials, rows), state.topRows(dv),
                          w.transposed_operand);
    state.row(dv) = w.key_sums.transpose();
  }

  // Writes the transposed key state [V, 1]^T M_K diag(w) of the rows [first_row, first_row + rows) into `slot`.
  void chunk_key_state(Workspace& w, const HeadRows<T>& Kh, const HeadRows<T>& Vh, Index first_row,
                       Index rows, MatrixRef<T> slot) const {
    load_keys_into_state(w, Kh, Vh, first_row, rows, slot);
    slot.array().rowwise() *= map_->weights().transpose().array();
  }

  void forward_full(const HeadRows<T>& Qh, const HeadRows<T>& Kh, const HeadRows<T>& Vh,
                    HeadOutput<T> Oh, Eigen::Ref<Vector<T>> normalisers, Eigen::Ref<Vector<T>> shifts,
                    MatrixRef<T> state) {
    const Index dv = Vh.cols(), m = Kh.rows(), n = Qh.rows(), b = block_rows(), r = map_->width();
    const Index key_blocks = block_count(m, b), query_blocks = block_count(n, b);
    auto& ws = workspaces(std::max(key_blocks, query_blocks), std::min(b, std::max(n, m)), Qh.cols(), dv, n);
    reserve_partials(key_blocks * (dv + 1) * r);
    parallel_for(key_blocks, [&](Index block, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index k0 = block * b, rows = std::min(b, m - k0);
      load_keys_into_state(w, Kh, Vh, k0, rows, partial(block, dv + 1));
    }, work(m, dv));
    sum_partials(key_blocks, state);
    state = state * map_->weights().asDiagonal();
    if (exchange_) combine_over_ranks(state, Ranks::all);
    parallel_for(query_blocks, [&](Index block, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index q0 = block * b, rows = std::min(b, n - q0);
      load_queries(w, Qh, q0, rows);
      block_product<T>(top(w.monomials, rows), state.transpose(), top(w.products, rows).leftCols(dv + 1));
      if (near_width_ > 0)
        for (Index t0 = 0, tile = near_tile_rows(n); t0 < rows; t0 += tile) {
          const Index tile_rows = std::min(tile, rows - t0);
          near_forward(w, query_tile(q0 + t0, tile_rows, n), top(w.scaled_queries, rows).middleRows(t0, tile_rows),
                       Kh, Vh, top(w.products, rows).leftCols(dv + 1).middleRows(t0, tile_rows),
                       shifts.segment(q0 + t0, tile_rows), n);
        }
      normalise(w, Oh.rows(q0, rows, w.staged_ov), normalisers, q0);
      Oh.store(q0, rows, w.staged_ov);
    }, work(n, dv));
  }

  void forward_causal(const HeadRows<T>& Qh, const HeadRows<T>& Kh, const HeadRows<T>& Vh,
                      HeadOutput<T> Oh, Eigen::Ref<Vector<T>> normalisers, Eigen::Ref<Vector<T>> shifts,
                      MatrixRef<T> checkpoints, MatrixRef<T> incoming_state) {
    const Index dv = Vh.cols(), n = Qh.rows(), b = scan_rows(n), chunks = scan_chunks(n), r = map_->width();
    const bool keep = checkpoints.cols() == chunks * r;
    const Index window = window_chunks(chunks, dv + 1);
    auto& ws = workspaces(window, b, Qh.cols(), dv, n);
    const T sqrt_c = static_cast<T>(std::sqrt(map_->scale()));
    if (!keep) ensure_shape(window_states_, dv + 1, window * r);
    carry_.setZero(dv + 1, r);
    // The scan starts from the earlier ranks' keys, which needs this shard's total before any output. Kept: a
    // pre-pass computes the chunk states and sums them in chunk order, window by window (each window's states
    // still in cache), and the output pass scans each window from the incoming state; otherwise the pre-pass sums
    // the keys window by window. Either way every Z^{<s} is the same sum in the same order.
    const bool kept_states_ready = exchange_ && keep;
    if (exchange_) {
      for_each_window(chunks, window, ScanOrder::prefix, [&](Index, Index first, Index count) {
        if (keep) {
          key_states(Kh, Vh, first, count, checkpoints.middleCols(first * r, count * r), ws);
          for (Index k = first; k < first + count; ++k) carry_ += checkpoints.middleCols(k * r, r);
        } else {
          prefix_states(Kh, Vh, first, count, window_states_.leftCols(count * r), ws);
        }
      });
      combine_over_ranks(carry_, Ranks::earlier);
    }
    incoming_state = carry_;
    // One parallel region for all windows (parallel_pass()): three loops per window.
    parallel_pass(pass_threads(n, window, dv), [&] {
      for_each_window(chunks, window, ScanOrder::prefix, [&](Index, Index first, Index count) {
        MatrixRef<T> slots = keep ? MatrixRef<T>(checkpoints.middleCols(first * r, count * r))
                                  : MatrixRef<T>(window_states_.leftCols(count * r));
        if (kept_states_ready)
          exclusive_scan<T>(slots, carry_, ScanOrder::prefix, work(count * b, dv));
        else
          prefix_states(Kh, Vh, first, count, slots, ws);
        parallel_for(count, [&](Index k, int thread) {
          Workspace& w = ws[static_cast<std::size_t>(thread)];
          const Index s = (first + k) * b, rows = std::min(b, n - s);
          auto products = top(w.products, rows).leftCols(dv + 1);
          load_queries(w, Qh, s, rows);
          if (near_width_ > 0) {
            block_product<T>(top(w.monomials, rows), slots.middleCols(k * r, r).transpose(), products);
            near_forward(w, query_tile(s, rows, n), top(w.scaled_queries, rows), Kh, Vh, products,
                         shifts.segment(s, rows), n);
          } else {
            load_values(w, Vh, s, rows);
            block_product<T>(top(w.monomials, rows), slots.middleCols(k * r, r).transpose(), products);
            top(w.scaled_keys, rows).noalias() = sqrt_c * Kh.block(s, rows, w.staged_qk);
            in_chunk_block(w, rows, false);
            causal_product_add<T>(w.block.topLeftCorner(rows, rows), top(w.values, rows), products);
          }
          normalise(w, Oh.rows(s, rows, w.staged_ov), normalisers, s);
          Oh.store(s, rows, w.staged_ov);
        }, work(count * b, dv));
      });
    });
  }

  double backward_full(const HeadRows<T>& Qh, const HeadRows<T>& Kh, const HeadRows<T>& Vh,
                       const HeadRows<T>& Oh, const HeadRows<T>& Gh,
                       const Eigen::Ref<const Vector<T>>& normalisers, const Eigen::Ref<const Vector<T>>& shifts,
                       const ConstMatrixRef<T>& state, HeadOutput<T> dQh, HeadOutput<T> dKh, HeadOutput<T> dVh) {
    const Index dv = Vh.cols(), m = Kh.rows(), n = Qh.rows(), b = block_rows(), r = map_->width();
    const Index key_blocks = block_count(m, b), query_blocks = block_count(n, b);
    auto& ws = workspaces(std::max(key_blocks, query_blocks), std::min(b, std::max(n, m)), Qh.cols(), dv, n);
    reserve_partials(query_blocks * (dv + 2) * r);
    parallel_for(query_blocks, [&](Index block, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index q0 = block * b, rows = std::min(b, n - q0);
      load_query_adjoints(w, Qh, Oh, Gh, normalisers, shifts, q0, rows, n);
      transposed_product<T>(top(w.adjoints, rows), top(w.monomials, rows), partial(block, dv + 2),
                            w.transposed_operand);
      auto dQb = dQh.rows(q0, rows, w.staged_dq);
      dQb.setZero();
      add_query_grads_through(w, state, dQb);
      if (near_width_ > 0)
        for (Index t0 = 0, tile = near_tile_rows(n); t0 < rows; t0 += tile) {
          const Index tile_rows = std::min(tile, rows - t0);
          near_query_grads(w, query_tile(q0 + t0, tile_rows, n),
                           top(w.scaled_queries, rows).middleRows(t0, tile_rows), Kh, Vh, Gh, Oh, normalisers, shifts,
                           n, dQb.middleRows(t0, tile_rows));
        }
      note_results(w, dQb);
      dQh.store(q0, rows, w.staged_dq);
    }, work(n, dv));
    ensure_shape(state_grads_, dv + 2, r);
    sum_partials(query_blocks, state_grads_);
    state_grads_ = state_grads_ * map_->weights().asDiagonal();
    if (exchange_) combine_over_ranks(state_grads_, Ranks::all);
    column_sums_.assign(static_cast<std::size_t>(key_blocks), 0.0);
    parallel_for(key_blocks, [&](Index block, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      const Index k0 = block * b, rows = std::min(b, m - k0);
      load_keys(w, Kh, Vh, k0, rows);
      const auto monomials = top(w.monomials, rows);
      auto monomial_grads = top(w.monomial_grads, rows);
      auto products = top(w.products, rows);
      block_product<T>(top(w.values, rows), state_grads_.topRows(dv + 1), monomial_grads);
      // dV and the column sums of P~ gather in `products` (its column dv, M_K times the normaliser adjoint, is unused).
      block_product<T>(monomials, state_grads_.transpose(), products);
      auto dKb = dKh.rows(k0, rows, w.staged_dk);
      dKb.setZero();
      map_->monomials_backward(monomial_grads, top(w.scaled_keys, rows), monomials, dKb);
      if (near_width_ > 0)
        for (Index t0 = 0, tile = near_tile_rows(n); t0 < rows; t0 += tile) {
          const Index tile_rows = std::min(tile, rows - t0);
          near_key_grads(w, key_tile(k0 + t0, tile_rows, n), top(w.scaled_keys, rows).middleRows(t0, tile_rows),
                         top(w.values, rows).middleRows(t0, tile_rows), Qh, Gh, Oh, normalisers, shifts, n,
                         dKb.middleRows(t0, tile_rows), products.middleRows(t0, tile_rows));
        }
      auto dVb = dVh.rows(k0, rows, w.staged_ov);
      dVb = products.leftCols(dv);
      column_sums_[static_cast<std::size_t>(block)] = static_cast<double>(products.col(dv + 1).maxCoeff());
      note_results(w, dKb, dVb);
      dKh.store(k0, rows, w.staged_dk);
      dVh.store(k0, rows, w.staged_ov);
    }, work(m, dv));
    return largest_column_sum();
  }

  double backward_causal(const HeadRows<T>& Qh, const HeadRows<T>& Kh, const HeadRows<T>& Vh,
                         const HeadRows<T>& Oh, const HeadRows<T>& Gh,
                         const Eigen::Ref<const Vector<T>>& normalisers, const Eigen::Ref<const Vector<T>>& shifts,
                         const ConstMatrixRef<T>& checkpoints, const ConstMatrixRef<T>& incoming_state,
                         HeadOutput<T> dQh, HeadOutput<T> dKh, HeadOutput<T> dVh) {
    const Index dv = Vh.cols(), n = Qh.rows(), b = scan_rows(n), chunks = scan_chunks(n), r = map_->width();
    const bool kept = checkpoints.cols() == chunks * r;
    const Index window = window_chunks(chunks, kept ? dv + 2 : 2 * dv + 3);
    const Index windows = block_count(chunks, window);
    auto& ws = workspaces(window, b, Qh.cols(), dv, n);
    const T sqrt_c = static_cast<T>(std::sqrt(map_->scale()));
    // Without checkpoints, one pass over the windows records the prefix state at the start of each, from the
    // forward pass's incoming state; the reverse pass then rebuilds the window's Z^{<s} from it (the same sums
    // in the same order as forward()).
    if (!kept) {
      ensure_shape(window_states_, dv + 1, window * r);
      ensure_shape(window_starts_, dv + 1, windows * r);
      carry_ = incoming_state;
      for_each_window(chunks, window, ScanOrder::prefix, [&](Index w0, Index first, Index count) {
        window_starts_.middleCols(w0 * r, r) = carry_;
        prefix_states(Kh, Vh, first, count, window_states_.leftCols(count * r), ws);
      });
    }
    // With an exchange the suffix scan starts from the later ranks' queries, which needs this shard's total first.
    // With checkpoints, a first pass over the windows computes every chunk's M_Q^T E slot (and dQ through
    // Z^{<s}) and keeps the slots, as many bytes again as the checkpoints; the main pass then only scans them.
    // Without checkpoints the first pass sums the slots and the main pass computes them again.
    const bool slots_kept = exchange_ && kept;
    ensure_shape(state_grad_slots_, dv + 2, (slots_kept ? chunks : window) * r);
    column_sums_.assign(static_cast<std::size_t>(chunks), 0.0);
    state_grads_.setZero(dv + 2, r);
    // The window's Z^{<s} (with an exact window Z^{<s-lag}), once prefix_states() has built it without checkpoints.
    const auto prefix_of_window = [&](Index first, Index count) {
      return kept ? ConstMatrixRef<T>(checkpoints.middleCols(first * r, count * r))
                  : ConstMatrixRef<T>(window_states_.leftCols(count * r));
    };
    const auto slots_of_window = [&](Index first, Index count) {
      return state_grad_slots_.middleCols((slots_kept ? first : 0) * r, count * r);
    };
    // The window's slots M_Q^T E and, for the earlier chunks, through Z^{<s}: dQ of a chunk's queries, while its
    // query monomials are at hand (with an exact window the pass holds chunk s + lag's queries, so the main pass
    // does it).
    const auto window_state_grads = [&](Index first, Index count) {
      const ConstMatrixRef<T> prefix = prefix_of_window(first, count);
      query_state_grads(Qh, Oh, Gh, normalisers, shifts, first, count, slots_of_window(first, count), ws,
                        [&](Workspace& w, Index k, Index s, Index rows) {
                          if (near_width_ > 0) return;
                          auto dQb = dQh.rows(s, rows, w.staged_dq);
                          dQb.setZero();
                          add_query_grads_through(w, prefix.middleCols(k * r, r), dQb);
                          dQh.store(s, rows, w.staged_dq);
                        });
    };
    if (exchange_) {
      for_each_window(chunks, window, ScanOrder::suffix, [&](Index, Index first, Index count) {
        auto slots = slots_of_window(first, count);
        if (slots_kept) {
          window_state_grads(first, count);
          // The sum exclusive_scan() would leave in its carry: the slots added from the last chunk to the first.
          for (Index k = count - 1; k >= 0; --k) state_grads_ += slots.middleCols(k * r, r);
        } else {
          query_state_grads(Qh, Oh, Gh, normalisers, shifts, first, count, slots, ws,
                            [](Workspace&, Index, Index, Index) {});
          exclusive_scan<T>(slots, state_grads_, ScanOrder::suffix, work(count * b, dv));
        }
      });
      combine_over_ranks(state_grads_, Ranks::later);
    }
    // One parallel region for all windows (parallel_pass()): three or four loops per window.
    parallel_pass(pass_threads(n, window, dv), [&] {
      for_each_window(chunks, window, ScanOrder::suffix, [&](Index w0, Index first, Index count) {
        if (!kept) {
          serial_step([&] { carry_ = window_starts_.middleCols(w0 * r, r); });
          prefix_states(Kh, Vh, first, count, window_states_.leftCols(count * r), ws);
        }
        auto slots = slots_of_window(first, count);
        const ConstMatrixRef<T> prefix = prefix_of_window(first, count);
        if (!slots_kept) window_state_grads(first, count);
        exclusive_scan<T>(slots, state_grads_, ScanOrder::suffix, work(count * b, dv));
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
          // Without an exact window dQb already holds the part through Z^{<s} (the pass above).
          auto dQb = dQh.rows(s, rows, w.staged_dq, /*load=*/near_width_ == 0);
          auto dKb = dKh.rows(s, rows, w.staged_dk);
          auto dVb = dVh.rows(s, rows, w.staged_ov);
          // Later chunks, through Y^{>s} (with an exact window Y^{>s+lag}): dK and dV of this chunk's keys.
          load_keys(w, Kh, Vh, s, rows);
          w.weighted_state_grads.noalias() = slots.middleCols(k * r, r) * map_->weights().asDiagonal();
          block_product<T>(values, w.weighted_state_grads.topRows(dv + 1), monomial_grads);
          // dV and the column sums of P~ gather in `products` (its column dv, M_K times the normaliser adjoint, is
          // unused).
          block_product<T>(monomials, w.weighted_state_grads.transpose(), products);
          dKb.setZero();
          map_->monomials_backward(monomial_grads, top(w.scaled_keys, rows), monomials, dKb);
          load_adjoints(w, Gh.block(s, rows, w.staged_vg), Oh.block(s, rows, w.staged_o), normalisers, shifts, s, n);
          if (near_width_ > 0) {
            expand(w, Qh.block(s, rows, w.staged_qk), w.scaled_queries);
            dQb.setZero();
            add_query_grads_through(w, prefix.middleCols(k * r, r), dQb);
            // The chunks the lagged states leave out, through the near-field tiles of its queries and of its keys.
            near_query_grads(w, query_tile(s, rows, n), top(w.scaled_queries, rows), Kh, Vh, Gh, Oh, normalisers,
                             shifts, n, dQb);
            near_key_grads(w, key_tile(s, rows, n), top(w.scaled_keys, rows), values, Qh, Gh, Oh, normalisers, shifts,
                           n, dKb, products);
          } else {
            // The chunk itself, through its masked block with p and p'.
            top(w.scaled_queries, rows).noalias() = sqrt_c * Qh.block(s, rows, w.staged_qk);
            in_chunk_block(w, rows, true);
            causal_block_product<T>(adjoints.leftCols(dv + 1), values.transpose(), score_grads);
            // sqrt(c) dS: then c dS K = (sqrt(c) dS)(sqrt(c) K) and likewise for dK. Zero above the diagonal, as the
            // block is, so that the products below sum the masked pairs' exact zeros in the diagonal tiles.
            const T* const derivatives = w.derivative_block.data();
            T* const grads = score_grads.data();
            const Index derivatives_stride = w.derivative_block.outerStride(), grads_stride = score_grads.outerStride();
            for_causal_packets<T>(rows, [=](Index j, Index i, auto packet, const auto* on_or_below) {
              using namespace Eigen::internal;
              using Packet = decltype(packet);
              T* const grad = grads + j * grads_stride + i;
              const Packet derivative = ploadu<Packet>(derivatives + j * derivatives_stride + i);
              const Packet scaled = pmul(pmul(pset1<Packet>(sqrt_c), derivative), ploadu<Packet>(grad));
              pstoreu(grad, masked(scaled, on_or_below));
            });
            causal_product_add<T>(score_grads, top(w.scaled_keys, rows), dQb);
            auto transposed = w.transposed_block.topLeftCorner(rows, rows);
            transpose_causal<T>(score_grads, transposed);
            transposed_causal_product_add<T>(transposed, top(w.scaled_queries, rows), dKb);
            transpose_causal<T>(block, transposed);
            transposed_causal_product_add<T>(transposed, adjoints, products);
          }
          dVb = products.leftCols(dv);
          column_sums_[static_cast<std::size_t>(first + k)] = static_cast<double>(products.col(dv + 1).maxCoeff());
          note_results(w, dQb, dKb, dVb);
          dQh.store(s, rows, w.staged_dq);
          dKh.store(s, rows, w.staged_dk);
          dVh.store(s, rows, w.staged_ov);
        }, work(count * b, dv));
      });
    });
    return largest_column_sum();
  }

  // The key states Delta Z_{t + offset} of chunks t in [first, first + count), transposed, into `slots` (count
  // slots of (d_v+1) x r); zero where t + offset is not a chunk.
  void key_states(const HeadRows<T>& Kh, const HeadRows<T>& Vh, Index first, Index count,
                  MatrixRef<T> slots, std::vector<Workspace>& ws, Index offset = 0) {
    const Index dv = Vh.cols(), n = Kh.rows(), b = scan_rows(n), chunks = scan_chunks(n), r = map_->width();
    parallel_for(count, [&](Index k, int thread) {
      auto slot = slots.middleCols(k * r, r);
      const Index chunk = first + k + offset;
      if (chunk < 0 || chunk >= chunks) {
        slot.setZero();
        return;
      }
      const Index s = chunk * b;
      chunk_key_state(ws[static_cast<std::size_t>(thread)], Kh, Vh, s, std::min(b, n - s), slot);
    }, work(count * b, dv));
  }

  // Z^{<s} of chunks [first, first + count) into `slots`, continuing the running prefix carry_; with an exact
  // window the lagged Z^{<s-lag}: the slot of chunk s receives Delta Z_{s-lag}, so the same scan sums them.
  void prefix_states(const HeadRows<T>& Kh, const HeadRows<T>& Vh, Index first, Index count,
                     MatrixRef<T> slots, std::vector<Workspace>& ws) {
    const Index b = scan_rows(Kh.rows());
    key_states(Kh, Vh, first, count, slots, ws, -near_lag(b));
    exclusive_scan<T>(slots, carry_, ScanOrder::prefix, work(count * b, Vh.cols()));
  }

  // E_t^T M_{Q,t} of chunks [first, first + count) into `slots` (count slots of (d_v+2) x r); with an exact window
  // the slot of chunk t receives those of chunk t + lag (zero past the last), so that the suffix scan gives
  // Y^{>t+lag}. Then calls `with_queries(w, k, s, rows)` for slot k, whose chunk's rows [s, s + rows) have their
  // query monomials, scaled queries and adjoints in w.
  template <class WithQueries>
  void query_state_grads(const HeadRows<T>& Qh, const HeadRows<T>& Oh, const HeadRows<T>& Gh,
                         const Eigen::Ref<const Vector<T>>& normalisers, const Eigen::Ref<const Vector<T>>& shifts,
                         Index first, Index count, MatrixRef<T> slots, std::vector<Workspace>& ws,
                         const WithQueries& with_queries) {
    const Index dv = Gh.cols(), n = Qh.rows(), b = scan_rows(n), chunks = scan_chunks(n), lag = near_lag(b);
    const Index r = map_->width();
    parallel_for(count, [&](Index k, int thread) {
      Workspace& w = ws[static_cast<std::size_t>(thread)];
      auto slot = slots.middleCols(k * r, r);
      const Index chunk = first + k + lag;
      if (chunk >= chunks) {
        slot.setZero();
        return;
      }
      const Index s = chunk * b, rows = std::min(b, n - s);
      // The one pass that reads every chunk's queries, outputs and their gradients (the main pass reads G and O
      // again): the place to measure them.
      load_query_adjoints(w, Qh, Oh, Gh, normalisers, shifts, s, rows, n);
      transposed_product<T>(top(w.adjoints, rows), top(w.monomials, rows), slot, w.transposed_operand);
      with_queries(w, k, s, rows);
    }, work(count * b, dv));
  }

  // partials_ with room for `size` numbers: grown, never shrunk, so that forward()'s and backward()'s block
  // partials ((d_v + 1) x r and (d_v + 2) x r per block) share one allocation instead of making a new one at every
  // call (fresh pages cost a page fault each: 0.2 s per call at 2^18 rows in blocks of 32).
  void reserve_partials(Index size) {
    if (partials_.size() < size) partials_.resize(size);
  }

  // The partial state of block `block`, `rows` x r, in partials_.
  Eigen::Map<Matrix<T>> partial(Index block, Index rows) {
    const Index r = map_->width();
    return Eigen::Map<Matrix<T>>(partials_.data() + block * rows * r, rows, r);
  }

  // `sum` = the first `blocks` block partials of partials_ (of sum's shape, which must be stored contiguously),
  // added in block order as flat arrays; zero when there are none (an empty shard).
  template <class Sum>
  void sum_partials(Index blocks, Sum& sum) {
    eigen_assert(sum.outerStride() == sum.rows());
    Eigen::Map<Vector<T>> total(sum.data(), sum.size());
    if (blocks == 0) {
      total.setZero();
      return;
    }
    total = partial(0, sum.rows()).reshaped();
    for (Index block = 1; block < blocks; ++block) total += partial(block, sum.rows()).reshaped();
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
  std::vector<T> coefficients_;  // poly_'s, in T: horner()'s
  bool causal_ = false;
  Index chunk_size_ = 0;
  std::size_t scan_window_bytes_ = 0;
  Index exact_window_ = 0;  // as configured
  Index near_width_ = 0;    // the exact window of the current call, at most its number of rows
  bool staged_ = false;     // whether the current call has a token-major head (workspaces() stages its rows)
  // Which pass takes input_statistics() (forward()'s or backward()'s measure_inputs), if any.
  enum class Measuring { none, forward, backward };
  Measuring measuring_ = Measuring::none;
  const char* where_ = "";
  double radius_ = 0;
  std::vector<Workspace> workspaces_;
  // Block partials (non-causal), causal window slots, prefix carries and state gradients.
  Vector<T> partials_;
  Matrix<T> window_states_, window_starts_, state_grad_slots_, carry_, state_grads_;
  std::vector<double> column_sums_;
  StateExchange* exchange_ = nullptr;
  Eigen::MatrixXd exchange_buffer_;  // the states being exchanged, in double
};

// Out of the class body so that they are not inline: see the note at the top of the class's private part.
template <class T>
void PolynomialKernel<T>::forward(const HeadRows<T>& Qh, const HeadRows<T>& Kh, const HeadRows<T>& Vh,
                                  HeadOutput<T> Oh, Eigen::Ref<Vector<T>> normalisers, Eigen::Ref<Vector<T>> shifts,
                                  MatrixRef<T> states, MatrixRef<T> incoming_state, bool measure_inputs) {
  // The causal scan reads every chunk's keys once only without a window (whose lag skips the last chunks) and
  // without an exchange (whose pre-pass reads them first).
  eigen_assert(!measure_inputs || (exact_window_ == 0 && !exchange_));
  near_width_ = std::min(exact_window_, Qh.rows());
  staged_ = Qh.is_token_major() || Kh.is_token_major() || Vh.is_token_major() || Oh.is_token_major();
  for (Workspace& w : workspaces_) {
    w.results_finite = true;
    w.inputs = {};
  }
  measuring_ = measure_inputs ? Measuring::forward : Measuring::none;
  if (causal_)
    forward_causal(Qh, Kh, Vh, Oh, normalisers, shifts, states, incoming_state);
  else
    forward_full(Qh, Kh, Vh, Oh, normalisers, shifts, states);
  measuring_ = Measuring::none;
}

template <class T>
double PolynomialKernel<T>::backward(const HeadRows<T>& Qh, const HeadRows<T>& Kh,
                                     const HeadRows<T>& Vh, const HeadRows<T>& Oh,
                                     const HeadRows<T>& Gh, const Eigen::Ref<const Vector<T>>& normalisers,
                                     const Eigen::Ref<const Vector<T>>& shifts, const ConstMatrixRef<T>& states,
                                     const ConstMatrixRef<T>& incoming_state, HeadOutput<T> dQh, HeadOutput<T> dKh,
                                     HeadOutput<T> dVh, bool measure_inputs) {
  // Every chunk's rows are read once at least only without a window and serially (as in forward()).
  eigen_assert(!measure_inputs || (exact_window_ == 0 && !exchange_));
  near_width_ = std::min(exact_window_, Qh.rows());
  staged_ = Qh.is_token_major() || Kh.is_token_major() || Vh.is_token_major() || Oh.is_token_major() ||
            Gh.is_token_major() || dQh.is_token_major() || dKh.is_token_major() || dVh.is_token_major();
  for (Workspace& w : workspaces_) {
    w.results_finite = true;
    w.inputs = {};
  }
  measuring_ = measure_inputs ? Measuring::backward : Measuring::none;
  const double column_sum =
      causal_ ? backward_causal(Qh, Kh, Vh, Oh, Gh, normalisers, shifts, states, incoming_state, dQh, dKh, dVh)
              : backward_full(Qh, Kh, Vh, Oh, Gh, normalisers, shifts, states, dQh, dKh, dVh);
  measuring_ = Measuring::none;
  return column_sum;
}

}  // namespace detail
}  // namespace polyattn
