/// \file attention/chunked_scan.hpp
/// The chunked causal scan that every causal pass of the polynomial methods runs: the polynomial forward and the
/// adjoint gradient (polynomial_kernel.hpp) and the paper's gradient (paper_gradients.hpp).
///
/// A causal sum \f$y_i = \sum_{j\le i} f(i, j)\f$ (prefix) or \f$y_j = \sum_{i\ge j} f(i, j)\f$ (suffix) over n rows
/// is cut into chunks of scan_rows() rows. A chunk takes the pairs with the earlier (later) chunks through a
/// *state*, a sum over those chunks' rows, and its own pairs through its masked \f$b\times b\f$ block. A pass runs
/// in windows of window_chunks() chunks, in scan order, each window in three steps, all on polyattn's threads:
/// 1. every chunk of the window writes the sum over its own rows into its *slot*, in parallel over chunks;
/// 2. exclusive_scan() turns the slots into the sums over the chunks before (after) each, continuing a running
///    carry from window to window, in parallel over the slots' entries, each entry summed in chunk order;
/// 3. every chunk computes its rows from its slot and its masked block, in parallel over chunks.
/// Every state is the same sum in the same order whatever the window and the thread count, so results are
/// bitwise the same for any number of threads. The methods differ in what their states hold, not in the scan:
/// - polynomial forward and adjoint: \f$Z = \mathrm{diag}(\omega)M_K^\top[V, \mathbf 1]\f$ (prefix) and
///   \f$Y = \mathrm{diag}(\omega)M_Q^\top E\f$ (suffix), \f$r(d_v+1)\f$ and \f$r(d_v+2)\f$ numbers;
/// - paper gradient: \f$V_p^\top K\f$ and \f$V_1^\top\mathbf 1\f$ (prefix), \f$U_p^\top Q\f$ and \f$U_1^\top[G,
///   \mathbf 1]\f$ (suffix), \f$r(d_v+1)d_k\f$ numbers and more.
///
/// The masked block is the polynomial itself on the chunk's own pairs, \f$\mathrm{tril}(p(S))\f$ with
/// \f$S = \sqrt c\,Q_s(\sqrt c\,K_s)^\top\f$, evaluated by Horner (causal_polynomial_block()) at \f$O(b^2 d)\f$ per
/// chunk: every method's low-rank factors multiply to it (\f$\varphi_Q\varphi_K^\top = p(cQK^\top)\f$), but through
/// them it would cost \f$O(b^2 r)\f$, and \f$O(b^2 r d)\f$ through the paper's rank-\f$r(d_v+1)\f$ factors. So one
/// chunk size suits every method (default_scan_rows). (With an exact window the kernel's states lag by whole chunks
/// and near-field tiles take the block's place: polynomial_kernel.hpp.)
///
/// Sequence parallel (parallel/state_exchange.hpp): a rank's scan starts its carry from the other ranks' sum, which
/// the callers obtain by a first pass over their shard's slots and one exclusive scan over the ranks.
#pragma once

#include "../common.hpp"
#include "../parallel/threads.hpp"
#include "block_product.hpp"

#include <algorithm>
#include <cstddef>

namespace polyattn {
namespace detail {

/// The order in which a scan visits the chunks: prefix, first to last (sums over the chunks before); suffix, last
/// to first (sums over the chunks after).
enum class ScanOrder { prefix, suffix };

/// Default rows b of a scan chunk. The masked block costs \f$O(bd)\f$ per row against \f$O(rd_v)\f$ for the state
/// products (the paper's \f$O(rd_vd_k)\f$) and \f$O(rd_v/b)\f$ for the slots: 64 balances them for d <= 32 and
/// r ~ 150.
inline constexpr Index default_scan_rows = 64;

/// Rows of a scan chunk for n rows: `chunk_size` (PolynomialAttentionOptions::chunk_size, 0: default_scan_rows),
/// at most n and at least one, so that an empty shard has no chunks.
inline Index scan_rows(Index chunk_size, Index n) {
  return std::max<Index>(1, std::min(n, chunk_size > 0 ? chunk_size : default_scan_rows));
}

/// Number of scan chunks of n rows (the last may be shorter).
inline Index scan_chunks(Index chunk_size, Index n) { return block_count(n, scan_rows(chunk_size, n)); }

/// Chunks per window of a scan whose slots take `slot_bytes` each: as many as fit `window_bytes`
/// (PolynomialAttentionOptions::scan_window_bytes), at least one; automatic (0): 128 KiB of slots per thread, at
/// least one slot (12 chunks of the adjoint's forward at d_v = 16, r = 153), so that a thread's chunks of a pass,
/// their rows, slots and results, are still in its core's L2 when the next step reads them. The window bounds
/// memory and sets the length of the steps only: every state is the same sum whatever its size, so it may follow
/// the thread count.
inline Index window_chunks(Index chunks, double slot_bytes, std::size_t window_bytes) {
  constexpr double automatic_bytes_per_thread = 128 << 10;
  const Index per_thread = std::max<Index>(1, static_cast<Index>(automatic_bytes_per_thread / slot_bytes));
  const Index fitting = window_bytes > 0 ? static_cast<Index>(static_cast<double>(window_bytes) / slot_bytes)
                                         : parallel_threads(chunks) * per_thread;
  return std::clamp<Index>(fitting, 1, std::max<Index>(chunks, 1));
}

/// Calls `body(index, first, count)` for the windows of `window` chunks that cover `chunks` chunks, in scan
/// `order`: window `index` holds the chunks [first, first + count).
template <class Body>
void for_each_window(Index chunks, Index window, ScanOrder order, const Body& body) {
  const Index windows = block_count(chunks, window);
  for (Index step = 0; step < windows; ++step) {
    const Index index = order == ScanOrder::prefix ? step : windows - 1 - step, first = index * window;
    body(index, first, std::min(window, chunks - first));
  }
}

/// The slots (each of carry's shape, side by side, stored contiguously) made exclusive in `order`: a slot receives
/// the sum of the slots before it (prefix: those to its left; suffix: to its right) plus the incoming `carry`,
/// and `carry` ends as the sum of all. Parallel over ranges of the slots' entries, each entry summed in slot order,
/// whenever the window's chunk loops are (`work`: theirs): by its own few additions per entry it would stay on one
/// thread, which then streamed every slot while the others waited (at 2^18 on two threads, 1-2% of the causal
/// forward and of the adjoint).
template <class T>
void exclusive_scan(MatrixRef<T> slots, Matrix<T>& carry, ScanOrder order, double work) {
  const Index size = carry.size(), count = slots.cols() / carry.cols();
  eigen_assert(slots.outerStride() == slots.rows() && carry.rows() == slots.rows());
  constexpr Index entries_per_block = 256;
  parallel_for(block_count(size, entries_per_block), [&](Index block, int) {
    const Index e0 = block * entries_per_block, entries = std::min(entries_per_block, size - e0);
    auto running = Eigen::Map<Vector<T>>(carry.data() + e0, entries);
    for (Index k = 0; k < count; ++k) {
      const Index slot_index = order == ScanOrder::prefix ? k : count - 1 - k;
      auto slot = Eigen::Map<Vector<T>>(slots.data() + slot_index * size + e0, entries);
      // slot <- running and running <- running + slot, in two vectorised passes over 1 KiB.
      slot.swap(running);
      running += slot;
    }
  }, work);
}

/// v = p(x) and, with `with_derivative`, d = p'(x) for a SIMD packet (or scalar) x by Horner, the running value and
/// derivative in registers, for the `degree` + 1 coefficients `c` (passed as a pointer so that the loops that call
/// it keep them in registers).
template <class T, class Packet>
EIGEN_STRONG_INLINE void horner(const T* c, Index degree, const Packet& x, Packet& v, Packet& d,
                                bool with_derivative) {
  using namespace Eigen::internal;
  v = pset1<Packet>(c[degree]);
  d = pset1<Packet>(T(0));
  for (Index t = degree; t-- > 0;) {
    if (with_derivative) d = padd(pmul(d, x), v);
    v = padd(pmul(v, x), pset1<Packet>(c[t]));
  }
}

/// A chunk's masked block: `block` (rows x rows) = tril(p(S)) for \f$S = \hat Q\hat K^\top\f$ of the chunk's scaled
/// queries and keys (\f$\sqrt c\,Q_s\f$, \f$\sqrt c\,K_s\f$, rows x d), and with a `derivatives` matrix p'(S) in its
/// top-left rows x rows, on their causal panels only (block_product.hpp: zero above the diagonal within the
/// panels; the rest is neither written nor to be read). `c` holds the degree + 1 coefficients of p in T.
template <class T>
void causal_polynomial_block(const T* c, Index degree, const ConstMatrixRef<T>& scaled_queries,
                             const ConstMatrixRef<T>& scaled_keys, MatrixRef<T> block, Matrix<T>* derivatives) {
  const Index rows = block.rows();
  causal_block_product<T>(scaled_queries, scaled_keys.transpose(), block);
  const bool with_derivative = derivatives != nullptr;
  T* const values = block.data();
  T* const derivative_values = with_derivative ? derivatives->data() : nullptr;
  const Index values_stride = block.outerStride();
  const Index derivatives_stride = with_derivative ? derivatives->outerStride() : 0;
  for_causal_packets<T>(rows, [=](Index j, Index i, auto packet, const auto* on_or_below) {
    using namespace Eigen::internal;
    using Packet = decltype(packet);
    T* const value = values + j * values_stride + i;
    Packet v, d;
    horner(c, degree, ploadu<Packet>(value), v, d, with_derivative);
    pstoreu(value, masked(v, on_or_below));
    if (with_derivative) pstoreu(derivative_values + j * derivatives_stride + i, d);
  });
}

}  // namespace detail
}  // namespace polyattn
