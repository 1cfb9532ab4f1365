/// \file attention/paper_gradients.hpp
/// Attention gradients by Algorithm 1 of Liang, Sha, Shi, Song, Zhou 2024 ("Multi-Layer Transformers
/// Gradient Can be Approximated in Almost Linear Time"), implemented faithfully but with the verified
/// formulas where the paper's printed ones are wrong.
///
/// **Method.** The forward pass is the polynomial method (polynomial_attention.hpp): \f$\tilde P = U_1V_1^\top\f$
/// (\f$\circ M\f$ when causal) with \f$U_1 = \tilde D^{-1}\varphi_Q(Q)\f$, \f$V_1 = \varphi_K(K)\f$, rank \f$r\f$.
/// The backward pass takes each term of the *exact* gradient
/// \f[ \kappa = \mathrm{rowsum}(O\circ G),\quad p = P\circ(GV^\top) - \mathrm{diag}(\kappa)P,\quad
///     dQ = c\,pK,\quad dK = c\,p^\top Q,\quad dV = P^\top G \f]
/// and replaces \f$P\f$ by \f$\tilde P\f$ (and \f$O\f$ by \f$\tilde O\f$). By the row-wise Kronecker product
/// \f$\oslash\f$ (the paper's Fact C.2, \f$(A\oslash B)_{i,\,l_1 + l_2 k_1} = A_{il_1}B_{il_2}\f$),
/// \f$\tilde P\circ(GV^\top) = (U_1\oslash G)(V_1\oslash V)^\top\f$, so
/// \f[ \tilde p = U_pV_p^\top,\qquad U_p = [\,U_1\oslash G,\; -\mathrm{diag}(\kappa)U_1\,],\quad
///     V_p = [\,V_1\oslash V,\; V_1\,] \f]
/// of rank \f$r(d_v+1)\f$, and every product is evaluated right to left:
/// \f$dQ = c\,U_p(V_p^\top K)\f$, \f$dK = c\,V_p(U_p^\top Q)\f$, \f$dV = V_1(U_1^\top G)\f$.
/// The factors are generated chunk by chunk of rows, and \f$U_p\f$, \f$V_p\f$ themselves (\f$r(d_v+1)\f$ columns)
/// never are: a product with a Kronecker factor is one with \f$U_1\f$ or \f$V_1\f$ and \f$d_v+1\f$ row-scaled copies
/// of a \f$d_k\f$-column block,
/// \f$V_p^\top K = V_1^\top[\mathrm{diag}(V_{:,0})K, \dots, \mathrm{diag}(V_{:,d_v-1})K, K]\f$ and
/// \f$U_pZ = \sum_j\mathrm{diag}(G_{:,j})\,U_1Z_j - \mathrm{diag}(\kappa)\,U_1Z_{d_v}\f$ for the state's column
/// blocks \f$Z_j\f$ (kronecker_right_factor(), add_kronecker_product()): the same multiply-adds, without writing and
/// reading \f$r(d_v+1)\f$ numbers per row (materialised, \f$U_p\f$ and \f$V_p\f$ took a fifth of the time). So beyond
/// inputs and outputs the memory is \f$O(b(r + d_vd_k) + w\,r d_v d_k)\f$ for chunk \f$b\f$ and \f$w\f$ states
/// (non-causal: one; causal: a window of the chunked scan, by default 128 KiB per thread and at least one state per
/// thread): never \f$O(nr)\f$, let alone \f$O(nrd)\f$.
/// Cost \f$O(n r d_v d_k)\f$ = \f$O(nrd^2)\f$ per head.
///
/// **Causal mask.** \f$\tilde P = M\circ U_1V_1^\top\f$ and \f$\tilde p = M\circ U_pV_p^\top\f$. The normaliser
/// \f$\tilde D = (M\circ\varphi_Q\varphi_K^\top)\mathbf 1\f$ and \f$dQ\f$ are prefix scans; \f$dK\f$ and \f$dV\f$
/// multiply by the *transposed* masked matrices and are suffix scans. The paper (Lemmas I.3–I.8, Algorithm 2)
/// only gives the prefix scan, because its printed formulas only multiply by \f$f\f$; the correct \f$dK\f$,
/// \f$dV\f$ (and the paper's \f$dX\f$, \f$dW_V\f$) need the suffix scan. Both run on the chunked scan of the
/// polynomial methods (chunked_scan.hpp), in its chunks (64 rows by default): the prefix pass scans the states
/// \f$V_p^\top K\f$ and \f$V_1^\top\mathbf 1\f$ and gives \f$\tilde D\f$ and dQ, the suffix pass scans \f$U_p^\top Q\f$
/// and \f$U_1^\top[G, \mathbf 1]\f$ and gives dK and dV. A chunk's own pairs are the same matrices evaluated
/// directly: with the masked block \f$B = \mathrm{tril}(p(cQ_sK_s^\top))\f$
/// (\f$= \mathrm{tril}(\varphi_Q\varphi_K^\top)\f$, by Horner in \f$O(b^2d)\f$), \f$\tilde P_s = \tilde D_s^{-1}B\f$ and
/// \f$\tilde p_s = \tilde P_s\circ(G_sV_s^\top - \kappa_s\mathbf 1^\top)\f$,
/// instead of \f$\mathrm{tril}(U_pV_p^\top)\f$ from the rank-\f$r(d_v+1)\f$ factors (\f$O(b^2rd)\f$, which forced
/// chunks of 16 rows; the causal pass then cost 2.5x the non-causal one, now 1.2x at \f$2^{16}\f$ rows).
///
/// **Erratum.** The paper's Lemma G.3 and Algorithm 1 line 22 give \f$\partial L/\partial W_V = X^\top f G\f$ and
/// its term D8 of \f$\partial L/\partial X\f$ is \f$f\,G\,W_V^\top\f$; both need \f$f^\top\f$ (\f$X^\top f^\top G\f$,
/// \f$f^\top G W_V^\top\f$), as do the key-side terms D6/D7 (\f$p^\top XW\f$). Finite differences confirm the
/// transposed forms (max abs difference 0.1–2.9 for the printed ones). This file implements the verified
/// formulas above: in raw form \f$dV = \tilde P^\top G\f$ and \f$dK = c\,\tilde p^\top Q\f$, from which the layer
/// form follows by the chain rule (\f$dW_V = X^\top dV\f$, \f$dX \mathrel{+}= dV\,W_V^\top + \dots\f$).
///
/// **Not the gradient of the approximate forward.** Each exact-gradient term is approximated separately
/// with the low-rank \f$\tilde P\f$; the result is *not* the derivative of \f$\tilde O\f$ (that is
/// AttentionMethod::adjoint, which also differentiates \f$\tilde D^{-1}\f$ and the feature map, at cost
/// \f$O(nrd)\f$ instead of \f$O(nrd^2)\f$). The two agree only as \f$\varepsilon\to 0\f$; finite differences of
/// the approximate loss do not check this method.
///
/// **Gradient bound** (GradientCertificate). With \f$\varepsilon\f$ from the forward certificate and
/// \f$\varepsilon < 1\f$: \f$|\tilde P_{ij} - P_{ij}| \le \delta P_{ij}\f$, \f$\delta = \frac{2\varepsilon}{1-\varepsilon}\f$, and
/// \f$P_{ij} \le \rho\tilde P_{ij}\f$, \f$\rho = \frac{1+\varepsilon}{1-\varepsilon}\f$. Let
/// \f$a = \max_i\|g_i\|_2\max_j\|v_j\|_2 \ge |(GV^\top)_{ij}|, |\kappa_i|\f$. Then
/// \f$|\tilde\kappa_i - \kappa_i| \le \delta a\f$ and \f$\sum_j|\tilde p_{ij} - p_{ij}| \le 3\delta a\f$ (rows of
/// \f$P, \tilde P\f$ sum to one), so with \f$\sigma_j = (\tilde P^\top\mathbf 1)_j\f$ (computed alongside dV):
/// \f[ |\widetilde{dQ} - dQ| \le 3c\,\delta\,a\max|K|,\quad |\widetilde{dK} - dK| \le (2\rho+1)\,c\,\delta\,a
///     \max|Q|\max_j\sigma_j,\quad |\widetilde{dV} - dV| \le \rho\,\delta\max|G|\max_j\sigma_j \f]
/// entrywise, per head (the certificate reports the maximum over heads; dqk_bound covers dQ and dK). The
/// bound covers the approximation of \f$P\f$ in exact arithmetic, not floating-point rounding, and is
/// \f$+\infty\f$ when the forward certificate is vacuous().
///
/// **Threads.** Without the mask each pass splits the rows into blocks of whole chunks (at least 1024 rows, at
/// most 64 blocks: the partition depends on n only) that polyattn's threads share (parallel/threads.hpp); sums over
/// rows are taken per block and added in block order. Under the mask the chunked scan runs its windows of chunks
/// on the threads (chunked_scan.hpp). Either way results are bitwise the same for any number of threads
/// (tests/test_parallel_attention.cpp).
///
/// **Sequence parallel.** With set_state_exchange() (or make_distributed_backend(), parallel/distributed_backend.hpp)
/// every rank passes its own rows of Q, K, V, O, G and receives its rows of O, dQ, dK, dV. The backward pass's
/// states are sums over rows, like the forward pass's key state: without the mask the ranks add the states of the
/// key pass (\f$V_1^\top\mathbf 1\f$, \f$V_p^\top K\f$) and of the query pass (\f$U_p^\top Q\f$, \f$U_1^\top[G, \mathbf 1]\f$),
/// one all-reduce each per head; under the mask the prefix scan starts from the sum over the earlier ranks and the
/// suffix scan from the sum over the later ones (an exclusive scan of the shard totals each, which costs one more
/// pass over the local keys, and one over the local queries). States travel in double. The bounds use
/// maxima over all ranks, so every rank returns the certificate of the whole sequence; an error on one rank makes
/// every rank throw.
///
/// \code
///   polyattn::PolynomialAttentionOptions opt;
///   opt.attention.causal = true;
///   opt.attention.heads = 2;
///   opt.degree = 4;
///   polyattn::PaperBackend<float> paper(opt);
///   polyattn::Matrix<float> O(n, V.cols()), dQ(n, Q.cols()), dK(n, K.cols()), dV(n, V.cols());
///   polyattn::Certificate cert = paper.forward(Q, K, V, O);
///   polyattn::GradientCertificate grad = paper.backward(Q, K, V, O, G, dQ, dK, dV);
///   // grad.dqk_bound bounds every |dQ - dQ_exact| and |dK - dK_exact| entry unless cert.vacuous()
/// \endcode
#pragma once

#include "backend.hpp"
#include "chunked_scan.hpp"
#include "head_rows.hpp"
#include "polynomial_attention.hpp"
#include "../parallel/threads.hpp"

#include <algorithm>
#include <cstddef>
#include <exception>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace polyattn {

namespace detail {

/// The right factor H that turns a product with the row-wise Kronecker factor
/// \f$F = [A\oslash S,\ \mathrm{diag}(t)A]\f$ (A: rows x r, S: rows x k, t: rows) into one with A alone:
/// \f$F^\top X = A^\top H\f$ for
/// \f$H = [\mathrm{diag}(S_{:,0})X, \dots, \mathrm{diag}(S_{:,k-1})X, \mathrm{diag}(t)X]\f$ (rows x (k+1)m for X:
/// rows x m). Column block j of \f$A^\top H\f$ (r x m) is rows \f$[jr, (j+1)r)\f$ of \f$F^\top X\f$: the states
/// keep that layout, r x (k+1)m.
template <class T, class DX, class DS, class DT>
void kronecker_right_factor(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DS>& S,
                            const Eigen::MatrixBase<DT>& tail, Matrix<T>& H) {
  const Index m = X.cols(), k = S.cols();
  H.resize(X.rows(), (k + 1) * m);
  for (Index j = 0; j < k; ++j) H.middleCols(j * m, m).noalias() = S.col(j).asDiagonal() * X;
  H.rightCols(m).noalias() = tail.asDiagonal() * X;
}

/// Y += F Z for the Kronecker factor F of kronecker_right_factor() and a state Z in its layout (r x (k+1)m), given
/// M = A Z (rows x (k+1)m): \f$FZ = \sum_{j<k}\mathrm{diag}(S_{:,j})M_j + \mathrm{diag}(t)M_k\f$ with \f$M_j\f$ the
/// column block j of M (Y: rows x m).
template <class T, class DS, class DT>
void add_kronecker_product(const Matrix<T>& M, const Eigen::MatrixBase<DS>& S, const Eigen::MatrixBase<DT>& tail,
                           MatrixRef<T> Y) {
  const Index m = Y.cols(), k = S.cols();
  for (Index j = 0; j < k; ++j) Y.noalias() += S.col(j).asDiagonal() * M.middleCols(j * m, m);
  Y.noalias() += tail.asDiagonal() * M.rightCols(m);
}

}  // namespace detail

/// Polynomial-method forward pass and the paper's Algorithm 1 backward pass (see the file documentation).
/// Keeps its workspaces between calls.
template <class T>
class PaperBackend final : public AttentionBackend<T> {
 public:
  explicit PaperBackend(const PolynomialAttentionOptions& options);

  AttentionMethod method() const override { return AttentionMethod::paper; }
  const AttentionOptions& attention_options() const override { return attention_.options().attention; }

  const PolynomialAttentionOptions& options() const { return attention_.options(); }

  /// Makes the next forward() and backward() calls sequence parallel: every argument is this rank's rows, and
  /// every rank of `exchange` must make the same calls with the same options (see the file documentation). Null
  /// restores the serial passes. Call it before forward(): a backward() pairs with the forward() before it.
  void set_state_exchange(std::shared_ptr<StateExchange> exchange) {
    attention_.set_state_exchange(std::move(exchange));
    forward_record_.clear();
  }
  /// The exchange set by set_state_exchange() (null: serial).
  StateExchange* state_exchange() const { return attention_.state_exchange(); }

  /// Writes \f$\tilde O\f$ exactly as PolynomialAttention::forward() does and returns its certificate.
  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override;

  /// Writes the Algorithm 1 approximations of dQ (n x h d_k), dK (m x h d_k), dV (m x h d_v) for
  /// G = dL/dO; Q, K, V and O must be those of the last forward(). Throws std::invalid_argument for bad
  /// shapes, non-finite O or G, or no preceding forward(); std::domain_error for a non-positive normaliser.
  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override;

  /// forward() and backward() on row-major matrices (C-ordered arrays, blocks of them), read and written in
  /// place: each chunk of rows is transposed in cache (`attention/head_rows.hpp`), and the results are bitwise
  /// those of the column-major calls.
  Certificate forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K, const ConstRowMajorRef<T>& V,
                      RowMajorRef<T> O) override;
  GradientCertificate backward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                               const ConstRowMajorRef<T>& V, const ConstRowMajorRef<T>& O,
                               const ConstRowMajorRef<T>& G, RowMajorRef<T> dQ, RowMajorRef<T> dK,
                               RowMajorRef<T> dV) override;

 private:
  // forward() and backward() on column-major (ConstMatrixRef, MatrixRef) or row-major (ConstRowMajorRef,
  // RowMajorRef) matrices.
  template <class In, class Out>
  Certificate forward_any(const In& Q, const In& K, const In& V, Out& O);
  template <class In, class Out>
  GradientCertificate backward_any(const In& Q, const In& K, const In& V, const In& O, const In& G, Out& dQ, Out& dK,
                                   Out& dV);

  // Rows of a chunk of the non-causal passes (the unit of factor generation): chunk_size, or 256 rows, whose tiles
  // are products of hundreds of rows. At least one row, also for an empty shard. (The causal passes take the
  // chunked scan's chunks, detail::scan_rows().)
  Index chunk_rows(Index n) const {
    const Index requested = options().chunk_size;
    return std::max<Index>(1, std::min(requested > 0 ? requested : 256, n));
  }

  // How the non-causal passes split n rows: chunks of `chunk` rows (the unit of factor generation), grouped into
  // `blocks` blocks of `block` rows that the threads share. Whole chunks of at least 1024 rows per block, at most 64
  // blocks: the partition, and so every sum's order, depends on n alone, never on the thread count, and the
  // per-block states stay small.
  struct Partition {
    Index chunk, block, blocks;
    Index rows_of_block(Index k, Index n) const { return std::min(block, n - k * block); }
  };
  Partition partition(Index n) const {
    constexpr Index min_block_rows = 1024, max_blocks = 64;
    const Index b = chunk_rows(n);
    const Index chunks = detail::block_count(n, b);
    const Index per_block =
        std::max(detail::block_count(min_block_rows, b), detail::block_count(chunks, max_blocks));
    return {b, per_block * b, detail::block_count(n, per_block * b)};
  }

  // What one thread needs to generate and multiply the factors of a chunk.
  struct Workspace {
    Matrix<T> scaled, u1, v1, ones, chunk_normaliser, value_rhs, value_out;
    // The Kronecker factors' right factor H (kronecker_right_factor()) and the products M = U_1 Z or V_1 Z with a
    // state (add_kronecker_product()): rows x (d_v+1) d_k each.
    Matrix<T> kronecker_rows, kronecker_products;
    Vector<T> normaliser, inverse;
    // Causal chunks: the scaled rows sqrt(c) Q_c and sqrt(c) K_c, the masked block tril(p(S)) (then P~), the block
    // of p~ and the transpose of either (b x b each, chunks use their top-left corner).
    Matrix<T> scaled_queries, scaled_keys, block, weights, transposed_block;
    // A chunk's rows of Q, K, V, G transposed into column-major (token-major heads only), and its rows of dQ, dK,
    // dV as computed, before they are written into the results (rows_of(), result_rows(), store_rows()).
    Matrix<T> staged_q, staged_k, staged_v, staged_g, staged_dq, staged_dk, staged_dv;
    // Scratch of detail::transposed_product_add() (a factor transposed for a state update).
    Matrix<T> transposed;
  };

  // Rows [first, first + count) of a head as a column-major matrix (HeadRows::block(), staged in `scratch`).
  static ConstMatrixRef<T> rows_of(const detail::HeadRows<T>& X, Index first, Index count, Matrix<T>& scratch) {
    if (X.is_token_major() && (scratch.rows() < count || scratch.cols() != X.cols())) scratch.resize(count, X.cols());
    return X.block(first, count, scratch);
  }
  // Where `count` rows of a result with `cols` columns are computed: the top of `scratch`, whatever the layout of
  // the result, because Eigen's small products vectorise by their destination's stride and alignment (a block of
  // the caller's matrix would give other last bits than a staged copy). store_rows() writes them into the result.
  static MatrixRef<T> result_rows(Index count, Index cols, Matrix<T>& scratch) {
    if (scratch.rows() < count || scratch.cols() != cols) scratch.resize(count, cols);
    return scratch.topLeftCorner(count, cols);
  }
  static void store_rows(detail::HeadOutput<T>& X, Index first, Index count, Matrix<T>& scratch) {
    if (X.is_token_major())
      X.store(first, count, scratch);
    else
      X.rows(first, count, scratch) = scratch.topLeftCorner(count, X.cols());
  }

  // One workspace per thread of a loop over `blocks` blocks.
  void prepare_workspaces(Index blocks) {
    workspaces_.resize(static_cast<std::size_t>(std::max(1, detail::parallel_threads(blocks))));
  }

  // The causal blocks of every workspace, for chunks of up to b rows of d_k columns.
  void prepare_chunk_workspaces(Index b, Index dk) {
    for (Workspace& w : workspaces_) {
      for (Matrix<T>* m : {&w.block, &w.weights, &w.transposed_block}) detail::ensure_shape(*m, b, b);
      detail::ensure_shape(w.scaled_queries, b, dk);
      detail::ensure_shape(w.scaled_keys, b, dk);
    }
  }

  // The chunk's masked block tril(p(S)), S = sqrt(c) Q_c (sqrt(c) K_c)^T, into the top-left corner of w.block, on
  // its causal panels (detail::causal_polynomial_block(): the rest is not written).
  void masked_polynomial_block(Workspace& w, const FeatureMap<T>& map, const ConstMatrixRef<T>& Qc,
                               const ConstMatrixRef<T>& Kc) const {
    const Index rows = Qc.rows();
    const T sqrt_c = static_cast<T>(std::sqrt(map.scale()));
    w.scaled_queries.topRows(rows).noalias() = sqrt_c * Qc;
    w.scaled_keys.topRows(rows).noalias() = sqrt_c * Kc;
    detail::causal_polynomial_block<T>(coefficients_.data(), static_cast<Index>(coefficients_.size()) - 1,
                                       w.scaled_queries.topRows(rows), w.scaled_keys.topRows(rows),
                                       w.block.topLeftCorner(rows, rows), nullptr);
  }

  // For the chunk of rows from `first` whose masked block tril(p(S)) is in w.block: P~ = D~^{-1} tril(p(S)) in its
  // place and p~ = P~ o (G V^T - kappa 1^T) into w.weights, on the causal panels (D~ from row_normaliser_).
  void chunk_weights(Workspace& w, Index rows, const ConstMatrixRef<T>& Gc, const ConstMatrixRef<T>& Vc, Index first) {
    auto weights = w.weights.topLeftCorner(rows, rows);
    detail::causal_block_product<T>(Gc, Vc.transpose(), weights);
    w.inverse = row_normaliser_.segment(first, rows).cwiseInverse();
    T* const probabilities = w.block.data();
    T* const grads = weights.data();
    const T* const inverse = w.inverse.data();
    const T* const kappa = kappa_.data() + first;
    const Index probabilities_stride = w.block.outerStride(), grads_stride = weights.outerStride();
    detail::for_causal_packets<T>(rows, [=](Index j, Index i, auto packet, const auto* on_or_below) {
      using namespace Eigen::internal;
      using Packet = decltype(packet);
      T* const probability = probabilities + j * probabilities_stride + i;
      T* const grad = grads + j * grads_stride + i;
      const Packet p = pmul(ploadu<Packet>(probability), ploadu<Packet>(inverse + i));
      pstoreu(probability, p);
      pstoreu(grad, detail::masked(pmul(p, psub(ploadu<Packet>(grad), ploadu<Packet>(kappa + i))), on_or_below));
    });
  }

  // Writes M_Q diag(omega) of a chunk of queries into w.u1 (so that u1 * v1^T = phi_Q phi_K^T).
  template <class Derived>
  static void weighted_query_monomials(Workspace& w, const FeatureMap<T>& map, const Eigen::MatrixBase<Derived>& Qc) {
    w.scaled.resize(Qc.rows(), Qc.cols());
    w.u1.resize(Qc.rows(), map.width());
    map.monomials(Qc, w.scaled, w.u1);
    w.u1 = w.u1 * map.weights().asDiagonal();
  }

  // Writes the monomials M_K of a chunk of keys into w.v1.
  template <class Derived>
  static void key_monomials(Workspace& w, const FeatureMap<T>& map, const Eigen::MatrixBase<Derived>& Kc) {
    w.scaled.resize(Kc.rows(), Kc.cols());
    w.v1.resize(Kc.rows(), map.width());
    map.monomials(Kc, w.scaled, w.v1);
  }

  // Divides w.u1 by the chunk's normaliser (rows of first_row...), which must be positive.
  void normalise_query_factor(Workspace& w, const Vector<T>& normaliser, Index first_row) const {
    for (Index i = 0; i < normaliser.size(); ++i)
      if (!(normaliser(i) > 0) || !std::isfinite(static_cast<double>(normaliser(i))))
        throw std::domain_error(detail::bad_normaliser_message(
            "polyattn::PaperBackend::backward", first_row + i, static_cast<double>(normaliser(i)),
            certificate_.degree, certificate_.radius, sizeof(T) == sizeof(float) ? "float" : "double"));
    w.u1 = normaliser.cwiseInverse().asDiagonal() * w.u1;
  }

  // The state F^T X of a chunk's Kronecker factor F = [A (/) S, diag(t) A] into (Accumulate: added to) Z, in the
  // states' layout r x (d_v+1) d_k (detail::kronecker_right_factor()): V_p^T K or U_p^T Q.
  template <bool Accumulate, class DS, class DT>
  static void kronecker_state(Workspace& w, const ConstMatrixRef<T>& A, const ConstMatrixRef<T>& X,
                              const Eigen::MatrixBase<DS>& S, const Eigen::MatrixBase<DT>& tail, MatrixRef<T> Z) {
    detail::kronecker_right_factor<T>(X, S, tail, w.kronecker_rows);
    detail::transposed_product_into<Accumulate, T>(A, w.kronecker_rows, Z, w.transposed);
  }

  // Y += F Z for a chunk's Kronecker factor F = [A (/) S, diag(t) A] and a state Z in that layout: U_p (V_p^T K) or
  // V_p (U_p^T Q), through M = A Z (detail::add_kronecker_product()).
  template <class DS, class DT, class State>
  static void add_kronecker_times_state(Workspace& w, const ConstMatrixRef<T>& A, const Eigen::MatrixBase<DS>& S,
                                        const Eigen::MatrixBase<DT>& tail, const State& Z, MatrixRef<T> Y) {
    w.kronecker_products.resize(A.rows(), Z.cols());
    detail::block_product<T>(A, Z, w.kronecker_products);
    detail::add_kronecker_product<T>(w.kronecker_products, S, tail, Y);
  }

  // Runs `pass`. With an exchange an error is kept for succeeded() instead of thrown, and the later passes are
  // skipped, so that this rank still joins the remaining collectives.
  template <class Pass>
  void deferring_errors(const Pass& pass) {
    if (deferred_failure_) return;
    try {
      pass();
    } catch (...) {
      if (!state_exchange()) throw;
      deferred_failure_ = std::current_exception();
    }
  }

  // Runs `body(block, workspace)` for every block on polyattn's threads, deferring_errors().
  template <class Body>
  void for_each_block(Index blocks, Body&& body) {
    prepare_workspaces(blocks);
    deferring_errors([&] {
      detail::parallel_for(blocks, [&](Index block, int thread) {
        body(block, workspaces_[static_cast<std::size_t>(thread)]);
      });
    });
  }

  // Replaces `left` and `right` (exchanged side by side in one message) by their sums over all ranks. No-op without
  // an exchange.
  void sum_over_ranks(MatrixRef<T> left, MatrixRef<T> right) {
    StateExchange* const exchange = state_exchange();
    if (!exchange) return;
    const Index rows = std::max(left.rows(), right.rows());
    packed_.setZero(rows, left.cols() + right.cols());
    packed_.topLeftCorner(left.rows(), left.cols()) = left.template cast<double>();
    packed_.topRightCorner(right.rows(), right.cols()) = right.template cast<double>();
    exchange->all_reduce_sum(packed_);
    left = packed_.topLeftCorner(left.rows(), left.cols()).template cast<T>();
    right = packed_.topRightCorner(right.rows(), right.cols()).template cast<T>();
  }

  // Replaces a scan's `carry` by its sum over the earlier (prefix `order`) or later (suffix) ranks.
  void combine_over_ranks(detail::ScanOrder order, Matrix<T>& carry) {
    packed_ = carry.template cast<double>();
    state_exchange()->exclusive_prefix_sum(packed_, order == detail::ScanOrder::suffix);
    carry = packed_.template cast<T>();
  }

  // Per-block states: block k's `left` (rows x cols) and `right` (r x right_cols) sums, stacked by block.
  struct BlockStates {
    Matrix<T> left, right;
    void reset(Index blocks, Index rows, Index cols, Index r, Index right_cols) {
      left.setZero(blocks * rows, cols);
      right.setZero(blocks * r, right_cols);
    }
    auto left_of(Index k, Index rows) { return left.middleRows(k * rows, rows); }
    auto right_of(Index k, Index r) { return right.middleRows(k * r, r); }
  };

  // Adds the blocks' sums in block order into `left`, `right` (which must hold zero) and then sums them over the
  // ranks.
  void reduce_blocks(BlockStates& states, Index blocks, MatrixRef<T> left, MatrixRef<T> right) {
    const Index rows = left.rows(), r = right.rows();
    for (Index k = 0; k < blocks; ++k) {
      left += states.left_of(k, rows);
      right += states.right_of(k, r);
    }
    sum_over_ranks(left, right);
  }

  // Adds into block_states_ (reset by the caller) every block's key sums: V_p^T K (r x (dv+1) dk) and V_1^T 1 (r).
  void key_sums_by_block(const FeatureMap<T>& map, const detail::HeadRows<T>& K, const detail::HeadRows<T>& V,
                         const Partition& part) {
    const Index n = K.rows(), r = map.width(), b = part.chunk;
    for_each_block(part.blocks, [&](Index k, Workspace& w) {
      auto query_state = block_states_.left_of(k, r);
      auto key_sum = block_states_.right_of(k, r);
      for (Index k0 = k * part.block, end = k0 + part.rows_of_block(k, n); k0 < end; k0 += b) {
        const Index rows = std::min(b, end - k0);
        const ConstMatrixRef<T> Kc = rows_of(K, k0, rows, w.staged_k), Vc = rows_of(V, k0, rows, w.staged_v);
        key_monomials(w, map, Kc);
        key_sum.noalias() += w.v1.colwise().sum().transpose();
        kronecker_state<true>(w, w.v1, Kc, Vc, Vector<T>::Ones(rows), query_state);
      }
    });
  }

  // Non-causal head: three passes (keys, queries, keys), each over blocks in parallel, accumulating per block the
  // r x (dv+1) dk states V_p^T K, U_p^T Q and the r x (dv+1) state U_1^T [G, 1], which are then added in block order.
  // Returns max_j (P~^T 1)_j.
  double head_full(const FeatureMap<T>& map, const detail::HeadRows<T>& Q, const detail::HeadRows<T>& K,
                   const detail::HeadRows<T>& V, const detail::HeadRows<T>& G, detail::HeadOutput<T> dQ,
                   detail::HeadOutput<T> dK, detail::HeadOutput<T> dV) {
    const Index n = Q.rows(), dk = Q.cols(), dv = V.cols(), r = map.width(), groups = dv + 1;
    const Partition part = partition(n);
    const Index b = part.chunk;
    const T c = static_cast<T>(map.scale());
    block_states_.reset(part.blocks, r, groups * dk, r, 1);
    key_sums_by_block(map, K, V, part);
    query_state_.setZero(r, groups * dk);
    key_sum_.setZero(r);
    reduce_blocks(block_states_, part.blocks, query_state_, key_sum_);

    block_states_.reset(part.blocks, r, groups * dk, r, dv + 1);
    for_each_block(part.blocks, [&](Index k, Workspace& w) {
      auto key_state = block_states_.left_of(k, r);
      auto value_state = block_states_.right_of(k, r);
      for (Index q0 = k * part.block, end = q0 + part.rows_of_block(k, n); q0 < end; q0 += b) {
        const Index rows = std::min(b, end - q0);
        const ConstMatrixRef<T> Qc = rows_of(Q, q0, rows, w.staged_q), Gc = rows_of(G, q0, rows, w.staged_g);
        weighted_query_monomials(w, map, Qc);
        w.normaliser.noalias() = w.u1 * key_sum_;
        normalise_query_factor(w, w.normaliser, q0);
        MatrixRef<T> dQc = result_rows(rows, dk, w.staged_dq);
        dQc.setZero();
        add_kronecker_times_state(w, w.u1, Gc, -kappa_.segment(q0, rows), query_state_, dQc);
        kronecker_state<true>(w, w.u1, Qc, Gc, -kappa_.segment(q0, rows), key_state);
        dQc *= c;
        store_rows(dQ, q0, rows, w.staged_dq);
        detail::transposed_product_add<T>(w.u1, Gc, value_state.leftCols(dv), w.transposed);
        value_state.col(dv).noalias() += w.u1.colwise().sum().transpose();
      }
    });
    key_state_.setZero(r, groups * dk);
    value_state_.setZero(r, dv + 1);
    reduce_blocks(block_states_, part.blocks, key_state_, value_state_);

    block_column_sums_.setZero(part.blocks);
    for_each_block(part.blocks, [&](Index k, Workspace& w) {
      for (Index k0 = k * part.block, end = k0 + part.rows_of_block(k, n); k0 < end; k0 += b) {
        const Index rows = std::min(b, end - k0);
        key_monomials(w, map, rows_of(K, k0, rows, w.staged_k));
        detail::block_product<T>(w.v1, value_state_.leftCols(dv), result_rows(rows, dv, w.staged_dv));
        store_rows(dV, k0, rows, w.staged_dv);
        block_column_sums_(k) = std::max(block_column_sums_(k),
                                         static_cast<double>((w.v1 * value_state_.col(dv)).maxCoeff()));
        const ConstMatrixRef<T> Vc = rows_of(V, k0, rows, w.staged_v);
        MatrixRef<T> dKc = result_rows(rows, dk, w.staged_dk);
        dKc.setZero();
        add_kronecker_times_state(w, w.v1, Vc, Vector<T>::Ones(rows), key_state_, dKc);
        dKc *= c;
        store_rows(dK, k0, rows, w.staged_dk);
      }
    });
    return part.blocks > 0 ? block_column_sums_.maxCoeff() : 0.0;
  }

  // Causal head: the chunked scan of chunked_scan.hpp, twice. The prefix pass scans the key states V_p^T K and
  // V_1^T 1 and gives every row its normaliser D~ (kept for the suffix pass) and dQ; the suffix pass scans the query
  // states U_p^T Q and U_1^T [G, 1] and gives dK, dV and the column sums of P~. A chunk's own pairs go through its
  // masked block: P~ = D~^{-1} tril(p(S)) and p~ = P~ o (G V^T - kappa 1^T) (chunk_weights()). With an exchange a
  // first pass over the shard's slots gives its total, whose exclusive scan over the ranks starts the carry.
  // Returns max_j (P~^T 1)_j.
  double head_causal(const FeatureMap<T>& map, const detail::HeadRows<T>& Q, const detail::HeadRows<T>& K,
                     const detail::HeadRows<T>& V, const detail::HeadRows<T>& G, detail::HeadOutput<T> dQ,
                     detail::HeadOutput<T> dK, detail::HeadOutput<T> dV) {
    const Index n = Q.rows(), dk = Q.cols(), dv = V.cols(), r = map.width(), kron = r * (dv + 1);
    const Index b = detail::scan_rows(options().chunk_size, n), chunks = detail::block_count(n, b);
    const Index prefix_size = kron * dk + r, suffix_size = kron * dk + r * (dv + 1);
    const double slot_bytes = static_cast<double>(sizeof(T)) * static_cast<double>(suffix_size);
    const Index window = detail::window_chunks(chunks, slot_bytes, options().scan_window_bytes);
    const double work = static_cast<double>(n) * static_cast<double>(kron * dk);
    const int threads = work < detail::min_parallel_work ? 1 : detail::parallel_threads(window);
    prepare_workspaces(window);
    const Polynomial& poly = attention_.map_poly_;
    coefficients_.assign(poly.coeffs.begin(), poly.coeffs.end());
    row_normaliser_.resize(n);
    chunk_column_sums_.assign(static_cast<std::size_t>(chunks), -std::numeric_limits<double>::infinity());

    prepare_chunk_workspaces(b, dk);
    // One scan in `order` over the windows, each in the three steps of chunked_scan.hpp: `slot_of(chunk, slot, w)`
    // writes the chunks' own sums into their slots of `slot_size` numbers, exclusive_scan() turns them into the
    // earlier (later) chunks' sums continuing carry_, and with `outputs`, `rows_of(chunk, slot, w)` computes the
    // chunks' rows from them.
    const auto scan = [&](detail::ScanOrder order, Index slot_size, const auto& slot_of, const auto& rows_of,
                          bool outputs) {
      // Runs `step` for the chunks of a window, in parallel.
      const auto for_chunks = [&](Index first, Index count, const auto& step) {
        detail::parallel_for(count, [&](Index k, int thread) {
          step(first + k, slots_.data() + k * slot_size, workspaces_[static_cast<std::size_t>(thread)]);
        }, work * static_cast<double>(count) / static_cast<double>(chunks));
      };
      detail::for_each_window(chunks, window, order, [&](Index, Index first, Index count) {
        for_chunks(first, count, slot_of);
        detail::exclusive_scan<T>(Eigen::Map<Matrix<T>>(slots_.data(), slot_size, count), carry_, order,
                                  work * static_cast<double>(count) / static_cast<double>(chunks));
        if (outputs) for_chunks(first, count, rows_of);
      });
    };

    const auto key_slot = [&](Index chunk, T* slot, Workspace& w) {
      const Index s = chunk * b, rows = std::min(b, n - s);
      const ConstMatrixRef<T> Kc = rows_of(K, s, rows, w.staged_k), Vc = rows_of(V, s, rows, w.staged_v);
      key_monomials(w, map, Kc);
      kronecker_state<false>(w, w.v1, Kc, Vc, Vector<T>::Ones(rows), Eigen::Map<Matrix<T>>(slot, r, (dv + 1) * dk));
      Eigen::Map<Vector<T>>(slot + kron * dk, r) = w.v1.colwise().sum().transpose();
    };
    const auto prefix_rows = [&](Index chunk, const T* slot, Workspace& w) {
      const Index s = chunk * b, rows = std::min(b, n - s);
      const ConstMatrixRef<T> Qc = rows_of(Q, s, rows, w.staged_q), Kc = rows_of(K, s, rows, w.staged_k);
      const ConstMatrixRef<T> Vc = rows_of(V, s, rows, w.staged_v), Gc = rows_of(G, s, rows, w.staged_g);
      const Eigen::Map<const Matrix<T>> query_state(slot, r, (dv + 1) * dk);
      const Eigen::Map<const Vector<T>> key_sum(slot + kron * dk, r);
      weighted_query_monomials(w, map, Qc);
      masked_polynomial_block(w, map, Qc, Kc);
      // D~ = phi_Q (earlier keys' V_1^T 1) + the chunk's masked block times 1.
      w.chunk_normaliser.resize(rows, 1);
      w.chunk_normaliser.col(0).noalias() = w.u1 * key_sum;
      w.ones.setOnes(rows, 1);
      detail::causal_product_add<T>(w.block.topLeftCorner(rows, rows), w.ones, w.chunk_normaliser);
      w.normaliser = w.chunk_normaliser.col(0);
      normalise_query_factor(w, w.normaliser, s);
      row_normaliser_.segment(s, rows) = w.normaliser;
      MatrixRef<T> dQc = result_rows(rows, dk, w.staged_dq);
      dQc.setZero();
      add_kronecker_times_state(w, w.u1, Gc, -kappa_.segment(s, rows), query_state, dQc);
      chunk_weights(w, rows, Gc, Vc, s);
      detail::causal_product_add<T>(w.weights.topLeftCorner(rows, rows), Kc, dQc);
      dQc *= static_cast<T>(map.scale());
      store_rows(dQ, s, rows, w.staged_dq);
    };
    const auto query_slot = [&](Index chunk, T* slot, Workspace& w) {
      const Index s = chunk * b, rows = std::min(b, n - s);
      const ConstMatrixRef<T> Qc = rows_of(Q, s, rows, w.staged_q), Gc = rows_of(G, s, rows, w.staged_g);
      Eigen::Map<Matrix<T>> key_state(slot, r, (dv + 1) * dk), value_state(slot + kron * dk, r, dv + 1);
      weighted_query_monomials(w, map, Qc);
      w.u1 = row_normaliser_.segment(s, rows).cwiseInverse().asDiagonal() * w.u1;
      kronecker_state<false>(w, w.u1, Qc, Gc, -kappa_.segment(s, rows), key_state);
      detail::transposed_product<T>(w.u1, Gc, value_state.leftCols(dv), w.transposed);
      value_state.col(dv) = w.u1.colwise().sum().transpose();
    };
    const auto suffix_rows = [&](Index chunk, const T* slot, Workspace& w) {
      const Index s = chunk * b, rows = std::min(b, n - s);
      const ConstMatrixRef<T> Qc = rows_of(Q, s, rows, w.staged_q), Kc = rows_of(K, s, rows, w.staged_k);
      const ConstMatrixRef<T> Vc = rows_of(V, s, rows, w.staged_v), Gc = rows_of(G, s, rows, w.staged_g);
      const Eigen::Map<const Matrix<T>> key_state(slot, r, (dv + 1) * dk), value_state(slot + kron * dk, r, dv + 1);
      key_monomials(w, map, Kc);
      MatrixRef<T> dKc = result_rows(rows, dk, w.staged_dk);
      dKc.setZero();
      add_kronecker_times_state(w, w.v1, Vc, Vector<T>::Ones(rows), key_state, dKc);
      // [dV, P~^T 1]: the later chunks through V_1 (U_1^T [G, 1]), the chunk itself through P~^T [G, 1].
      w.value_out.resize(rows, dv + 1);
      detail::block_product<T>(w.v1, value_state, w.value_out);
      masked_polynomial_block(w, map, Qc, Kc);
      chunk_weights(w, rows, Gc, Vc, s);
      auto transposed = w.transposed_block.topLeftCorner(rows, rows);
      detail::transpose_causal<T>(w.weights.topLeftCorner(rows, rows), transposed);
      detail::transposed_causal_product_add<T>(transposed, Qc, dKc);
      dKc *= static_cast<T>(map.scale());
      store_rows(dK, s, rows, w.staged_dk);
      w.value_rhs.resize(rows, dv + 1);
      w.value_rhs.leftCols(dv) = Gc;
      w.value_rhs.col(dv).setOnes();
      detail::transpose_causal<T>(w.block.topLeftCorner(rows, rows), transposed);
      detail::transposed_causal_product_add<T>(transposed, w.value_rhs, w.value_out);
      result_rows(rows, dv, w.staged_dv) = w.value_out.leftCols(dv);
      store_rows(dV, s, rows, w.staged_dv);
      chunk_column_sums_[static_cast<std::size_t>(chunk)] = static_cast<double>(w.value_out.col(dv).maxCoeff());
    };

    if (slots_.size() < suffix_size * window) slots_.resize(suffix_size * window);
    for (const detail::ScanOrder order : {detail::ScanOrder::prefix, detail::ScanOrder::suffix}) {
      const bool prefix = order == detail::ScanOrder::prefix;
      const Index slot_size = prefix ? prefix_size : suffix_size;
      const auto pass = [&](bool outputs) {
        if (prefix)
          scan(order, slot_size, key_slot, prefix_rows, outputs);
        else
          scan(order, slot_size, query_slot, suffix_rows, outputs);
      };
      carry_.setZero(slot_size, 1);
      if (state_exchange()) {
        deferring_errors([&] { detail::parallel_pass(threads, [&] { pass(false); }); });
        combine_over_ranks(order, carry_);
      }
      deferring_errors([&] { detail::parallel_pass(threads, [&] { pass(true); }); });
    }
    return chunks > 0 ? *std::max_element(chunk_column_sums_.begin(), chunk_column_sums_.end()) : 0.0;
  }

  PolynomialAttention<T> attention_;
  Certificate certificate_;
  detail::ForwardRecord forward_record_;
  std::vector<Workspace> workspaces_;  // one per thread
  BlockStates block_states_;
  Eigen::VectorXd block_column_sums_;
  Matrix<T> query_state_, key_state_, value_state_;
  Vector<T> kappa_, key_sum_, row_normaliser_;
  // Causal heads: the slots of a window of scan chunks, the scan's carry, p's coefficients in T, and per chunk the
  // largest column sum of P~ over its keys.
  Vector<T> slots_;
  Matrix<T> carry_;
  std::vector<T> coefficients_;
  std::vector<double> chunk_column_sums_;
  Eigen::MatrixXd packed_;               // states on their way through the exchange
  std::exception_ptr deferred_failure_;  // this rank's error of a sequence-parallel backward(), see succeeded()
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
PaperBackend<T>::PaperBackend(const PolynomialAttentionOptions& options) : attention_(options) {
  detail::static_check_scalar<T>();
  detail::require(options.exact_window == 0, "polyattn::PaperBackend", "'exact_window' must be 0, got ",
                  options.exact_window, ": the paper's gradient evaluates p on every pair (use the adjoint method)");
}

template <class T>
Certificate PaperBackend<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                                     MatrixRef<T> O) {
  return forward_any(Q, K, V, O);
}

template <class T>
Certificate PaperBackend<T>::forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                     const ConstRowMajorRef<T>& V, RowMajorRef<T> O) {
  return forward_any(Q, K, V, O);
}

template <class T>
GradientCertificate PaperBackend<T>::backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                              const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                              const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                              MatrixRef<T> dV) {
  return backward_any(Q, K, V, O, G, dQ, dK, dV);
}

template <class T>
GradientCertificate PaperBackend<T>::backward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                              const ConstRowMajorRef<T>& V, const ConstRowMajorRef<T>& O,
                                              const ConstRowMajorRef<T>& G, RowMajorRef<T> dQ, RowMajorRef<T> dK,
                                              RowMajorRef<T> dV) {
  return backward_any(Q, K, V, O, G, dQ, dK, dV);
}

template <class T>
template <class In, class Out>
Certificate PaperBackend<T>::forward_any(const In& Q, const In& K, const In& V, Out& O) {
  forward_record_.clear();
  certificate_ = attention_.forward(Q, K, V, O, "polyattn::PaperBackend::forward", nullptr);
  forward_record_.record(Q, K, V);
  return certificate_;
}

template <class T>
template <class In, class Out>
GradientCertificate PaperBackend<T>::backward_any(const In& Q, const In& K, const In& V, const In& O, const In& G,
                                                  Out& dQ, Out& dK, Out& dV) {
  constexpr const char* where = "polyattn::PaperBackend::backward";
  const AttentionOptions& opt = options().attention;
  StateExchange* const exchange = state_exchange();
  const detail::HeadShape shape = detail::check_backward_call<T, In, Out>(
      where, opt, exchange, forward_record_, Q, K, V, O, G, dQ, dK, dV,
      [&](const detail::HeadShape& s) { return attention_.shard_settings(s); }, [](const detail::HeadShape&) {});

  const FeatureMap<T>& map = attention_.feature_map();
  // Per head: max |g_i|, max |v_j|, max |Q|, max |K|, max |G| and max_j (P~^T 1)_j (over all ranks with an exchange).
  constexpr std::size_t per_head = 6;
  std::vector<double> maxima;
  deferred_failure_ = nullptr;
  try {
    for (Index h = 0; h < shape.heads; ++h) {
      const auto Qh = Q.middleCols(h * shape.dk, shape.dk);
      const auto Kh = K.middleCols(h * shape.dk, shape.dk);
      const auto Vh = V.middleCols(h * shape.dv, shape.dv);
      const auto Gh = G.middleCols(h * shape.dv, shape.dv);
      detail::rowsum_of_product(O.middleCols(h * shape.dv, shape.dv), Gh, kappa_);
      const detail::HeadRows<T> Qr = detail::head_rows(Qh), Kr = detail::head_rows(Kh), Vr = detail::head_rows(Vh),
                                Gr = detail::head_rows(Gh);
      const detail::HeadOutput<T> dQr = detail::head_output(dQ.middleCols(h * shape.dk, shape.dk)),
                                  dKr = detail::head_output(dK.middleCols(h * shape.dk, shape.dk)),
                                  dVr = detail::head_output(dV.middleCols(h * shape.dv, shape.dv));
      const double column_sum = opt.causal ? head_causal(map, Qr, Kr, Vr, Gr, dQr, dKr, dVr)
                                           : head_full(map, Qr, Kr, Vr, Gr, dQr, dKr, dVr);
      const detail::RowStatistics g = detail::row_statistics(Gh);
      maxima.insert(maxima.end(), {g.max_row_norm, detail::max_row_norm(Vh), detail::max_abs(Qh),
                                   detail::max_abs(Kh), g.max_abs, column_sum});
    }
    if (deferred_failure_) std::rethrow_exception(deferred_failure_);
    detail::check_backward_results<T, In, Out>(where, opt, shape, Q, K, V, G, dQ, dK, dV);
  } catch (...) {
    if (!exchange) throw;
    deferred_failure_ = std::current_exception();
    maxima.assign(per_head * static_cast<std::size_t>(shape.heads), 0.0);
  }
  if (exchange) {
    exchange->maxima_over_ranks(maxima);
    exchange->succeeded(where, deferred_failure_);
  }

  const double c = map.scale();
  const double eps = certificate_.poly_error;
  const double delta = 2 * eps / (1 - eps), rho = (1 + eps) / (1 - eps);
  GradientCertificate result;
  result.forward = certificate_;
  for (Index h = 0; h < shape.heads; ++h) {
    const double* head = maxima.data() + per_head * static_cast<std::size_t>(h);
    const double a = head[0] * head[1], max_q = head[2], max_k = head[3], max_g = head[4], column_sum = head[5];
    result.dqk_bound = std::max({result.dqk_bound, 3 * c * delta * a * max_k,
                                 (2 * rho + 1) * c * delta * a * max_q * column_sum});
    result.dv_bound = std::max(result.dv_bound, rho * delta * max_g * column_sum);
  }
  if (certificate_.vacuous()) {
    result.dqk_bound = std::numeric_limits<double>::infinity();
    result.dv_bound = std::numeric_limits<double>::infinity();
  }
  // The paper's analysis bounds dQ and dK together, and it never differentiates p.
  result.dq_bound = result.dk_bound = result.dqk_bound;
  result.derivative_error = std::numeric_limits<double>::quiet_NaN();
  return result;
}

}  // namespace polyattn
