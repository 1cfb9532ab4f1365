/// \file attention/exact_gradients.hpp
/// Exact gradients of softmax attention.
///
/// With \f$S = c\,QK^\top\f$ (causal: \f$-\infty\f$ where key \f$j > i + (m - n)\f$, the queries being the last
/// \f$n\f$ of \f$m \ge n\f$ positions; above the diagonal when \f$n = m\f$),
/// \f$P = \mathrm{softmax}_{\text{rows}}(S)\f$, \f$O = PV\f$ and \f$G = \partial L/\partial O\f$:
/// \f[ \kappa = \mathrm{rowsum}(O\circ G),\quad p = P\circ(GV^\top) - \mathrm{diag}(\kappa)P = \partial L/\partial S,\f]
/// \f[ \partial L/\partial Q = c\,pK,\qquad \partial L/\partial K = c\,p^\top Q,\qquad \partial L/\partial V = P^\top G. \f]
/// (\f$\kappa_i = \sum_j P_{ij}(GV^\top)_{ij}\f$ because \f$O = PV\f$; the paper calls it \f$K\f$.)
///
/// - attention_backward_reference() and ExactReferenceBackend form each head's \f$n\times m\f$ matrices:
///   the readable reference, \f$O(nm)\f$ memory.
/// - ExactBlockedBackend recomputes \f$P\f$ block by block from the forward pass's log-sum-exp, as
///   FlashAttention-2 does: \f$O(nd + b_qb_k)\f$ memory and seven GEMM-shaped products per block pair, on
///   polyattn's threads. It is the honest exact baseline the approximate backends are timed against.
#pragma once

#include "backend.hpp"
#include "exact_attention.hpp"

#include <algorithm>
#include <vector>

namespace polyattn {

namespace detail {

// The loop of attention_backward_reference() on checked arguments; throws std::domain_error as `where` when the
// gradients of finite input overflow.
template <class T>
void attention_backward_reference_unchecked(const char* where, const HeadShape& shape, const ConstMatrixRef<T>& Q,
                                            const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                                            const ConstMatrixRef<T>& G, const AttentionOptions& opt, MatrixRef<T> dQ,
                                            MatrixRef<T> dK, MatrixRef<T> dV) {
  const T c = static_cast<T>(opt.resolved_scale(shape.dk));
  for (Index h = 0; h < shape.heads; ++h) {
    // Copies, and below products into temporaries, so that the bits do not depend on where the caller's matrices
    // lie: see attention_reference().
    const Matrix<T> Qh = Q.middleCols(h * shape.dk, shape.dk);
    const Matrix<T> Kh = K.middleCols(h * shape.dk, shape.dk);
    const Matrix<T> Vh = V.middleCols(h * shape.dv, shape.dv);
    const Matrix<T> Gh = G.middleCols(h * shape.dv, shape.dv);
    Matrix<T> P = c * Qh * Kh.transpose();
    if (opt.causal) mask_scores_causally(P);
    const Vector<T> row_max = P.rowwise().maxCoeff();
    P.colwise() -= row_max;  // apart from exp(): Eigen 3.4 vectorises exp() of a plain matrix only
    P = P.array().exp();
    const Vector<T> inverse_row_sum = P.rowwise().sum().cwiseInverse();
    P = inverse_row_sum.asDiagonal() * P;
    const Matrix<T> O = P * Vh;
    const Vector<T> kappa = O.cwiseProduct(Gh).rowwise().sum();
    Matrix<T> p = P.cwiseProduct(Gh * Vh.transpose());
    p -= kappa.asDiagonal() * P;
    dQ.middleCols(h * shape.dk, shape.dk) = Matrix<T>(c * p * Kh);
    dK.middleCols(h * shape.dk, shape.dk) = Matrix<T>(c * p.transpose() * Qh);
    dV.middleCols(h * shape.dv, shape.dv) = Matrix<T>(P.transpose() * Gh);
  }
  check_backward_results<T>(where, opt, shape, Q, K, V, G, dQ, dK, dV);
}

}  // namespace detail

/// Materialised exact attention backward (the reference): forms each head's \f$n\times m\f$ matrices.
/// Writes dQ (n x h d_k), dK (m x h d_k), dV (m x h d_v) for G = dL/dO (n x h d_v); causal, Q may have fewer
/// rows than K (the queries are the last positions, AttentionOptions::causal);
/// the outputs must share no memory with the inputs or each other (std::invalid_argument).
///
/// \code
///   polyattn::Matrix<double> dQ(n, dk), dK(n, dk), dV(n, dv);
///   polyattn::attention_backward_reference(Q, K, V, G, {std::nullopt, true, 1}, dQ, dK, dV);
/// \endcode
template <class T>
void attention_backward_reference(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                                  const ConstMatrixRef<T>& G, const AttentionOptions& opt, MatrixRef<T> dQ,
                                  MatrixRef<T> dK, MatrixRef<T> dV) {
  detail::static_check_scalar<T>();
  constexpr const char* where = "polyattn::attention_backward_reference";
  const auto shape = detail::check_qkv(where, Q, K, V, opt, detail::CausalQueries::last_positions);
  detail::require_shape(where, "G", G, shape.n, shape.heads * shape.dv);
  detail::require_finite_in_parallel(where, "G", G);
  detail::require_shape(where, "dQ", dQ, shape.n, shape.heads * shape.dk);
  detail::require_shape(where, "dK", dK, shape.m, shape.heads * shape.dk);
  detail::require_shape(where, "dV", dV, shape.m, shape.heads * shape.dv);
  detail::require_disjoint(where, {detail::memory_of("dQ", dQ), detail::memory_of("dK", dK), detail::memory_of("dV", dV)},
                           {detail::memory_of("Q", Q), detail::memory_of("K", K), detail::memory_of("V", V),
                            detail::memory_of("G", G)});
  detail::attention_backward_reference_unchecked<T>(where, shape, Q, K, V, G, opt, dQ, dK, dV);
}

namespace detail {

/// The statement of an exact method: no approximation, so every error bound is zero.
inline Certificate exact_method_certificate() {
  Certificate certificate;
  certificate.poly_error = 0;
  certificate.output_bound = 0;
  certificate.positive = true;
  certificate.valid = true;
  return certificate;
}

}  // namespace detail

/// Exact attention through the materialised reference routines: attention_reference() forward and
/// attention_backward_reference() backward, \f$O(nm)\f$ memory per head. Use it for small problems and
/// as the ground truth in tests; its certificate reports zero error. Causal, Q may have fewer rows than K.
///
/// \code
///   polyattn::ExactReferenceBackend<double> exact(polyattn::AttentionOptions{1.0 / 16, true, 2});
///   exact.forward(Q, K, V, O);
///   exact.backward(Q, K, V, O, G, dQ, dK, dV);
/// \endcode
template <class T>
class ExactReferenceBackend final : public AttentionBackend<T> {
 public:
  explicit ExactReferenceBackend(const AttentionOptions& options = {}) : options_(options) {
    detail::static_check_scalar<T>();
    options_.check();
  }

  AttentionMethod method() const override { return AttentionMethod::exact_reference; }
  const AttentionOptions& attention_options() const override { return options_; }
  const AttentionOptions& options() const { return options_; }

  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override;

  /// Recomputes everything from Q, K, V; `O` is only checked (the interface passes it).
  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override;

  /// forward() and backward() on row-major matrices (C-ordered arrays, blocks of them). The reference forms
  /// n x m matrices anyway: it runs on column-major copies of the inputs (O(nd) more memory against its O(nm)) and
  /// copies the results out, so that they are bitwise those of the column-major calls.
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

  AttentionOptions options_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
Certificate ExactReferenceBackend<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                              const ConstMatrixRef<T>& V, MatrixRef<T> O) {
  return forward_any(Q, K, V, O);
}

template <class T>
Certificate ExactReferenceBackend<T>::forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                              const ConstRowMajorRef<T>& V, RowMajorRef<T> O) {
  return forward_any(Q, K, V, O);
}

template <class T>
GradientCertificate ExactReferenceBackend<T>::backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                                       const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                                       const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                                       MatrixRef<T> dV) {
  return backward_any(Q, K, V, O, G, dQ, dK, dV);
}

template <class T>
GradientCertificate ExactReferenceBackend<T>::backward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                                       const ConstRowMajorRef<T>& V, const ConstRowMajorRef<T>& O,
                                                       const ConstRowMajorRef<T>& G, RowMajorRef<T> dQ,
                                                       RowMajorRef<T> dK, RowMajorRef<T> dV) {
  return backward_any(Q, K, V, O, G, dQ, dK, dV);
}

template <class T>
template <class In, class Out>
Certificate ExactReferenceBackend<T>::forward_any(const In& Q, const In& K, const In& V, Out& O) {
  constexpr const char* where = "polyattn::ExactReferenceBackend::forward";
  const auto shape = detail::check_qkv(where, Q, K, V, options_, detail::CausalQueries::last_positions);
  detail::check_forward_output(where, shape, Q, K, V, O);
  if constexpr (bool(In::IsRowMajor))  // column-major copies: see the row-major forward()
    O.noalias() = detail::attention_reference(where, Matrix<T>(Q), Matrix<T>(K), Matrix<T>(V), options_);
  else
    O.noalias() = detail::attention_reference(where, Q, K, V, options_);
  return detail::exact_method_certificate();
}

template <class T>
template <class In, class Out>
GradientCertificate ExactReferenceBackend<T>::backward_any(const In& Q, const In& K, const In& V, const In& O,
                                                           const In& G, Out& dQ, Out& dK, Out& dV) {
  constexpr const char* where = "polyattn::ExactReferenceBackend::backward";
  const auto shape = detail::check_backward_arguments<T, In, Out>(where, options_, Q, K, V, O, G, dQ, dK, dV,
                                                                  detail::CausalQueries::last_positions);
  if constexpr (bool(In::IsRowMajor)) {  // column-major copies: see the row-major backward()
    Matrix<T> dQ_columns(dQ.rows(), dQ.cols()), dK_columns(dK.rows(), dK.cols()), dV_columns(dV.rows(), dV.cols());
    detail::attention_backward_reference_unchecked<T>(where, shape, Matrix<T>(Q), Matrix<T>(K), Matrix<T>(V),
                                                      Matrix<T>(G), options_, dQ_columns, dK_columns, dV_columns);
    dQ = dQ_columns;
    dK = dK_columns;
    dV = dV_columns;
  } else {
    detail::attention_backward_reference_unchecked<T>(where, shape, Q, K, V, G, options_, dQ, dK, dV);
  }
  return {detail::exact_method_certificate(), 0, 0};
}

/// Block sizes of ExactBlockedBackend. The backward defaults were chosen by measurement for
/// \f$d_h \in \{8, 16\}\f$ in float on AVX-512 (Zen 4): \f$b_q, b_k \in [64, 256]\f$ perform within the noise of
/// a shared machine, 64 x 64 is slower (GEMM packing dominates), and the two \f$b_q\times b_k\f$ workspaces
/// (256 KB in float) stay in L2.
struct ExactBlockedOptions {
  /// Queries per block of the forward pass (ExactAttention). Default 128.
  Index forward_query_block = 128;
  /// Keys per block of the forward pass (ExactAttention). Default 256.
  Index forward_key_block = 256;
  /// Queries per block \f$b_q\f$ of the backward pass. Default 256.
  Index query_block = 256;
  /// Keys per block \f$b_k\f$ of the backward pass. Default 128.
  Index key_block = 128;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::ExactBlockedOptions";
    detail::require(forward_query_block >= 1, where, "'forward_query_block' must be >= 1, got ", forward_query_block);
    detail::require(forward_key_block >= 1, where, "'forward_key_block' must be >= 1, got ", forward_key_block);
    detail::require(query_block >= 1, where, "'query_block' must be >= 1, got ", query_block);
    detail::require(key_block >= 1, where, "'key_block' must be >= 1, got ", key_block);
  }
};

/// Exact attention in \f$O(nd)\f$ memory: ExactAttention forward (online softmax, keeps the per-row
/// log-sum-exp \f$\ell_i = \log\sum_j e^{S_{ij}}\f$) and a FlashAttention-2 style backward that recomputes
/// \f$P\f$ block by block instead of storing it.
///
/// Per head, with \f$\kappa = \mathrm{rowsum}(O\circ G)\f$ computed once, every query block \f$b\f$ and key
/// block \f$k\f$ (under a causal mask only the pairs where some query of \f$b\f$ sees some key of \f$k\f$, the
/// partly visible ones masked) contribute
/// \f[ P = e^{c\,Q_bK_k^\top - \ell_b},\quad dS = P\circ(G_bV_k^\top - \kappa_b\mathbf 1^\top),\quad
///     dQ_b \mathrel{+}= c\,dS\,K_k,\quad dV_k \mathrel{+}= P^\top G_b,\quad dK_k \mathrel{+}= c\,dS^\top Q_b. \f]
/// Two passes make every sum belong to one block, so blocks run on polyattn's threads without atomics or
/// per-thread copies of the gradients: the first loops over query blocks, each summing its \f$dQ_b\f$ over key
/// blocks in order; the second over key blocks, each summing \f$dK_k, dV_k\f$ over query blocks in order. Both
/// recompute \f$P\f$ and \f$dS\f$: \f$4d_k + 3d_v\f$ multiply-adds per computed score and two exponentials,
/// against \f$d_k + d_v\f$ and one in the forward pass (a single pass would need \f$3d_k + 2d_v\f$ and one, but
/// would have to add every key block's \f$dQ\f$ into shared rows). Under the mask, early and late blocks are
/// paired so that threads get equal work. The partition and the order of every sum depend on the shapes and
/// block sizes only, so the gradients are bitwise the same for any number of threads.
///
/// backward() uses the log-sum-exp of the last forward() call: call it with the Q, K, V passed to that
/// forward() and the O it wrote. Causal, Q may have fewer rows than K (the queries are the last positions,
/// AttentionOptions::causal).
///
/// \code
///   polyattn::ExactBlockedBackend<float> exact(polyattn::AttentionOptions{std::nullopt, /*causal=*/true, 2});
///   exact.forward(Q, K, V, O);
///   exact.backward(Q, K, V, O, G, dQ, dK, dV);   // overwrites dQ, dK, dV
/// \endcode
template <class T>
class ExactBlockedBackend final : public AttentionBackend<T> {
 public:
  explicit ExactBlockedBackend(const AttentionOptions& options = {}, const ExactBlockedOptions& blocks = {})
      : options_(checked(options)),
        blocks_(checked(blocks)),
        forward_(options_, blocks_.forward_query_block, blocks_.forward_key_block) {
    detail::static_check_scalar<T>();
  }

  AttentionMethod method() const override { return AttentionMethod::exact_blocked; }
  const AttentionOptions& attention_options() const override { return options_; }
  const AttentionOptions& options() const { return options_; }
  const ExactBlockedOptions& blocks() const { return blocks_; }

  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override;

  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override;

  /// forward() and backward() on row-major matrices (C-ordered arrays, blocks of them), read and written in
  /// place; the results are bitwise those of the column-major calls.
  Certificate forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K, const ConstRowMajorRef<T>& V,
                      RowMajorRef<T> O) override;
  GradientCertificate backward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                               const ConstRowMajorRef<T>& V, const ConstRowMajorRef<T>& O,
                               const ConstRowMajorRef<T>& G, RowMajorRef<T> dQ, RowMajorRef<T> dK,
                               RowMajorRef<T> dV) override;

  /// Per-row, per-head log-sum-exp of the last forward() call (n x h).
  const Matrix<T>& logsumexp() const { return forward_.logsumexp(); }

 private:
  static const AttentionOptions& checked(const AttentionOptions& options) {
    options.check();
    return options;
  }
  static const ExactBlockedOptions& checked(const ExactBlockedOptions& blocks) {
    blocks.check();
    return blocks;
  }

  // One thread's scratch: a block of probabilities P, one of score gradients dS, and the dK, dV sums of one key
  // block (contiguous: the output's columns lie m entries apart, often a multiple of 4 KiB, and accumulating there
  // would make a GEMM's column accesses collide in the same cache sets).
  struct Workspace {
    Matrix<T> probabilities, score_grads, key_grads, value_grads, query_grads;
    // Blocks of row-major keys, values and output gradients (column_major_block()).
    Matrix<T> staged_keys, staged_values, staged_output_grads;
  };

  // The problem of one backward() call as the block loops see it, besides c Q (n x h d_k) and
  // kappa = rowsum(O_h o G_h) of every head, which the members scaled_queries_ and kappa_ hold.
  struct Blocking {
    detail::HeadShape shape;
    Index first_position;  // of query 0 under the causal mask
  };

  // backward() on column-major (ConstMatrixRef, MatrixRef) or row-major (ConstRowMajorRef, RowMajorRef) matrices.
  template <class In, class Out>
  GradientCertificate backward_any(const In& Q, const In& K, const In& V, const In& O, const In& G, Out& dQ, Out& dK,
                                   Out& dV);

  // The column-major blocks K_k and G_b that score_block_gradients() multiplied (column_major_block(): in place,
  // or staged in the workspace), for the product that follows it.
  struct BlockOperands {
    ConstMatrixRef<T> keys, output_grads;
  };

  // Writes P = exp(Qs_b K_k^T - lse_b) (masked) and dS = P o (G_b V_k^T - kappa_b 1^T) of query rows
  // [q0, q0 + bq) and key rows [k0, k0 + bk) of head h into the top-left corners of the workspace.
  template <class In>
  BlockOperands score_block_gradients(Workspace& w, const Blocking& b, Index h, const In& K, const In& V,
                                      const In& G, Index q0, Index bq, Index k0, Index bk) const;

  // dQ of query block `block` of head h, over the key blocks it sees in order.
  template <class In, class Out>
  void query_block_gradient(Workspace& w, const Blocking& b, Index h, Index block, const In& K, const In& V,
                            const In& G, Out& dQ) const;

  // dK and dV of key block `block` of head h, over the query blocks that see it in order.
  template <class In, class Out>
  void key_block_gradients(Workspace& w, const Blocking& b, Index h, Index block, const In& K, const In& V,
                           const In& G, Out& dK, Out& dV) const;

  // Zeroes P(i, j) where key k0 + j comes after the query at position first_position + i (exp overflow there is
  // discarded, not used).
  template <class Block>
  static void mask_future(Block& P, Index first_position, Index k0) {
    for (Index j = 0; j < P.cols(); ++j) {
      const Index masked_rows = std::clamp<Index>(k0 + j - first_position, 0, P.rows());
      P.col(j).head(masked_rows).setZero();
    }
  }

  AttentionOptions options_;
  ExactBlockedOptions blocks_;
  ExactAttention<T> forward_;
  Matrix<T> scaled_queries_;
  std::vector<Vector<T>> kappa_;  // rowsum(O_h o G_h) of every head (rowsum_of_product())
  std::vector<Workspace> workspaces_;  // one per thread
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
Certificate ExactBlockedBackend<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                            const ConstMatrixRef<T>& V, MatrixRef<T> O) {
  forward_.forward(Q, K, V, O, "polyattn::ExactBlockedBackend::forward");
  return detail::exact_method_certificate();
}

template <class T>
Certificate ExactBlockedBackend<T>::forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                            const ConstRowMajorRef<T>& V, RowMajorRef<T> O) {
  forward_.forward(Q, K, V, O, "polyattn::ExactBlockedBackend::forward");
  return detail::exact_method_certificate();
}

template <class T>
GradientCertificate ExactBlockedBackend<T>::backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                                     const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                                     const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                                     MatrixRef<T> dV) {
  return backward_any(Q, K, V, O, G, dQ, dK, dV);
}

template <class T>
GradientCertificate ExactBlockedBackend<T>::backward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                                     const ConstRowMajorRef<T>& V, const ConstRowMajorRef<T>& O,
                                                     const ConstRowMajorRef<T>& G, RowMajorRef<T> dQ,
                                                     RowMajorRef<T> dK, RowMajorRef<T> dV) {
  return backward_any(Q, K, V, O, G, dQ, dK, dV);
}

template <class T>
template <class In>
auto ExactBlockedBackend<T>::score_block_gradients(Workspace& w, const Blocking& b, Index h, const In& K,
                                                   const In& V, const In& G, Index q0, Index bq, Index k0,
                                                   Index bk) const -> BlockOperands {
  const detail::HeadShape& shape = b.shape;
  auto P = w.probabilities.topLeftCorner(bq, bk);
  auto dS = w.score_grads.topLeftCorner(bq, bk);
  const BlockOperands operands{
      detail::column_major_block<T>(K, k0, h * shape.dk, bk, shape.dk, w.staged_keys),
      detail::column_major_block<T>(G, q0, h * shape.dv, bq, shape.dv, w.staged_output_grads)};
  P.noalias() = scaled_queries_.block(q0, h * shape.dk, bq, shape.dk) * operands.keys.transpose();
  // Two statements on purpose: Eigen 3.4 evaluates exp() of a colwise-replicated difference with
  // scalar expf, ten times slower than its vectorised exp of a plain block.
  P.colwise() -= forward_.logsumexp().col(h).segment(q0, bq);
  P = P.array().exp().matrix();
  if (options_.causal && k0 + bk - 1 > b.first_position + q0) mask_future(P, b.first_position + q0, k0);
  dS.noalias() = operands.output_grads *
                 detail::column_major_block<T>(V, k0, h * shape.dv, bk, shape.dv, w.staged_values).transpose();
  dS.colwise() -= kappa_[static_cast<std::size_t>(h)].segment(q0, bq);
  dS = dS.cwiseProduct(P);
  return operands;
}

template <class T>
template <class In, class Out>
void ExactBlockedBackend<T>::query_block_gradient(Workspace& w, const Blocking& b, Index h, Index block,
                                                  const In& K, const In& V, const In& G, Out& dQ) const {
  const detail::HeadShape& shape = b.shape;
  const Index q0 = block * blocks_.query_block;
  const Index bq = std::min(blocks_.query_block, shape.n - q0);
  // Under the mask the block's last query, at position first_position + q0 + bq - 1, sees the most keys.
  const Index key_end = options_.causal ? b.first_position + q0 + bq : shape.m;
  // Summed in the workspace, as dK and dV are (and whatever the layout of dQ).
  auto dQb = w.query_grads.topRows(bq);
  dQb.setZero();
  for (Index k0 = 0; k0 < key_end; k0 += blocks_.key_block) {
    const Index bk = std::min(blocks_.key_block, key_end - k0);
    const BlockOperands operands = score_block_gradients(w, b, h, K, V, G, q0, bq, k0, bk);
    dQb.noalias() += w.score_grads.topLeftCorner(bq, bk) * operands.keys;
  }
  // The scale once per block instead of once per product.
  dQ.block(q0, h * shape.dk, bq, shape.dk) = static_cast<T>(options_.resolved_scale(shape.dk)) * dQb;
}

template <class T>
template <class In, class Out>
void ExactBlockedBackend<T>::key_block_gradients(Workspace& w, const Blocking& b, Index h, Index block,
                                                 const In& K, const In& V, const In& G, Out& dK, Out& dV) const {
  const detail::HeadShape& shape = b.shape;
  const Index k0 = block * blocks_.key_block;
  const Index bk = std::min(blocks_.key_block, shape.m - k0);
  auto dKk = w.key_grads.topRows(bk);
  auto dVk = w.value_grads.topRows(bk);
  dKk.setZero();
  dVk.setZero();
  // Under the mask, query blocks that end before position k0 see none of these keys (and with fewer queries
  // than keys, every query sees the first m - n + 1 keys).
  const Index first_query =
      options_.causal ? (std::max<Index>(0, k0 - b.first_position) / blocks_.query_block) * blocks_.query_block : 0;
  for (Index q0 = first_query; q0 < shape.n; q0 += blocks_.query_block) {
    const Index bq = std::min(blocks_.query_block, shape.n - q0);
    const BlockOperands operands = score_block_gradients(w, b, h, K, V, G, q0, bq, k0, bk);
    dVk.noalias() += w.probabilities.topLeftCorner(bq, bk).transpose() * operands.output_grads;
    dKk.noalias() += w.score_grads.topLeftCorner(bq, bk).transpose() *
                     scaled_queries_.block(q0, h * shape.dk, bq, shape.dk);
  }
  dK.block(k0, h * shape.dk, bk, shape.dk) = dKk;
  dV.block(k0, h * shape.dv, bk, shape.dv) = dVk;
}

template <class T>
template <class In, class Out>
GradientCertificate ExactBlockedBackend<T>::backward_any(const In& Q, const In& K, const In& V, const In& O,
                                                         const In& G, Out& dQ, Out& dK, Out& dV) {
  constexpr const char* where = "polyattn::ExactBlockedBackend::backward";
  const auto shape = detail::check_backward_arguments<T, In, Out>(where, options_, Q, K, V, O, G, dQ, dK, dV,
                                                                  detail::CausalQueries::last_positions);
  const Matrix<T>& logsumexp = forward_.logsumexp();
  detail::require(logsumexp.rows() == shape.n && logsumexp.cols() == shape.heads, where,
                  "needs the log-sum-exp of a preceding forward() with the same shapes: saved ", logsumexp.rows(),
                  "x", logsumexp.cols(), ", expected ", shape.n, "x", shape.heads, " (rows x heads)");
  const Blocking blocking{shape, detail::first_query_position(shape)};
  const T c = static_cast<T>(options_.resolved_scale(shape.dk));
  scaled_queries_.noalias() = c * Q;
  kappa_.resize(static_cast<std::size_t>(shape.heads));
  for (Index h = 0; h < shape.heads; ++h)
    detail::rowsum_of_product(O.middleCols(h * shape.dv, shape.dv), G.middleCols(h * shape.dv, shape.dv),
                              kappa_[static_cast<std::size_t>(h)]);

  const Index query_blocks = detail::block_count(shape.n, blocks_.query_block);
  const Index key_blocks = detail::block_count(shape.m, blocks_.key_block);
  const Index query_pairs = detail::balanced_block_pairs(query_blocks);
  const Index key_pairs = detail::balanced_block_pairs(key_blocks);
  const int threads = detail::parallel_threads(shape.heads * std::max(query_pairs, key_pairs));
  if (workspaces_.size() < static_cast<std::size_t>(threads)) workspaces_.resize(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t) {
    Workspace& w = workspaces_[static_cast<std::size_t>(t)];
    detail::ensure_shape(w.probabilities, std::min(blocks_.query_block, shape.n),
                         std::min(blocks_.key_block, shape.m));
    detail::ensure_shape(w.score_grads, w.probabilities.rows(), w.probabilities.cols());
    detail::ensure_shape(w.key_grads, w.probabilities.cols(), shape.dk);
    detail::ensure_shape(w.value_grads, w.probabilities.cols(), shape.dv);
    detail::ensure_shape(w.query_grads, w.probabilities.rows(), shape.dk);
    detail::ensure_shape(w.staged_keys, w.probabilities.cols(), shape.dk);
    detail::ensure_shape(w.staged_values, w.probabilities.cols(), shape.dv);
    detail::ensure_shape(w.staged_output_grads, w.probabilities.rows(), shape.dv);
  }
  // Multiply-adds of each pass: the scores computed (about half under the mask) times P, G V^T and the product
  // of the pass.
  const double scores_computed = static_cast<double>(shape.heads) * static_cast<double>(shape.n) *
                                 static_cast<double>(shape.m) * (options_.causal ? 0.5 : 1.0);
  const auto dk = static_cast<double>(shape.dk), dv = static_cast<double>(shape.dv);
  detail::parallel_for(
      shape.heads * query_pairs,
      [&](Index item, int thread) {
        Workspace& w = workspaces_[static_cast<std::size_t>(thread)];
        detail::for_each_block_of_pair(item % query_pairs, query_blocks, [&](Index block) {
          query_block_gradient(w, blocking, item / query_pairs, block, K, V, G, dQ);
        });
      },
      scores_computed * (2 * dk + dv));
  detail::parallel_for(
      shape.heads * key_pairs,
      [&](Index item, int thread) {
        Workspace& w = workspaces_[static_cast<std::size_t>(thread)];
        detail::for_each_block_of_pair(item % key_pairs, key_blocks, [&](Index block) {
          key_block_gradients(w, blocking, item / key_pairs, block, K, V, G, dK, dV);
        });
      },
      scores_computed * (2 * dk + 2 * dv));
  detail::check_backward_results<T, In, Out>(where, options_, shape, Q, K, V, G, dQ, dK, dV);
  return {detail::exact_method_certificate(), 0, 0};
}

}  // namespace polyattn
