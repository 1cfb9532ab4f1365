/// \file attention/exact_gradients.hpp
/// Exact gradients of softmax attention.
///
/// With \f$S = c\,QK^\top\f$ (\f$-\infty\f$ above the diagonal when causal), \f$P = \mathrm{softmax}_{\text{rows}}(S)\f$,
/// \f$O = PV\f$ and \f$G = \partial L/\partial O\f$:
/// \f[ \kappa = \mathrm{rowsum}(O\circ G),\quad p = P\circ(GV^\top) - \mathrm{diag}(\kappa)P = \partial L/\partial S,\f]
/// \f[ \partial L/\partial Q = c\,pK,\qquad \partial L/\partial K = c\,p^\top Q,\qquad \partial L/\partial V = P^\top G. \f]
/// (\f$\kappa_i = \sum_j P_{ij}(GV^\top)_{ij}\f$ because \f$O = PV\f$; the paper calls it \f$K\f$.)
///
/// - attention_backward_reference() and ExactReferenceBackend form each head's \f$n\times m\f$ matrices:
///   the readable reference, \f$O(nm)\f$ memory.
/// - ExactBlockedBackend recomputes \f$P\f$ block by block from the forward pass's log-sum-exp, as
///   FlashAttention-2 does: \f$O(nd + b_qb_k)\f$ memory and five GEMM-shaped products per block. It is the
///   honest exact baseline the approximate backends are timed against.
#pragma once

#include "backend.hpp"
#include "exact_attention.hpp"

#include <algorithm>

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
    const auto Qh = Q.middleCols(h * shape.dk, shape.dk);
    const auto Kh = K.middleCols(h * shape.dk, shape.dk);
    const auto Vh = V.middleCols(h * shape.dv, shape.dv);
    const auto Gh = G.middleCols(h * shape.dv, shape.dv);
    Matrix<T> P = c * Qh * Kh.transpose();
    if (opt.causal) P.template triangularView<Eigen::StrictlyUpper>().setConstant(-std::numeric_limits<T>::infinity());
    const Vector<T> row_max = P.rowwise().maxCoeff();
    P.colwise() -= row_max;  // apart from exp(): Eigen 3.4 vectorises exp() of a plain matrix only
    P = P.array().exp();
    const Vector<T> inverse_row_sum = P.rowwise().sum().cwiseInverse();
    P = inverse_row_sum.asDiagonal() * P;
    const Matrix<T> O = P * Vh;
    const Vector<T> kappa = O.cwiseProduct(Gh).rowwise().sum();
    Matrix<T> p = P.cwiseProduct(Gh * Vh.transpose());
    p -= kappa.asDiagonal() * P;
    dQ.middleCols(h * shape.dk, shape.dk).noalias() = c * p * Kh;
    dK.middleCols(h * shape.dk, shape.dk).noalias() = c * p.transpose() * Qh;
    dV.middleCols(h * shape.dv, shape.dv).noalias() = P.transpose() * Gh;
  }
  check_backward_results<T>(where, opt, shape, Q, K, V, G, dQ, dK, dV);
}

}  // namespace detail

/// Materialised exact attention backward (the reference): forms each head's \f$n\times m\f$ matrices.
/// Writes dQ (n x h d_k), dK (m x h d_k), dV (m x h d_v) for G = dL/dO (n x h d_v);
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
  const auto shape = detail::check_qkv(where, Q, K, V, opt);
  detail::require_shape(where, "G", G, shape.n, shape.heads * shape.dv);
  detail::require_finite(where, "G", G);
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
/// as the ground truth in tests; its certificate reports zero error.
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
  /// Uses only `options.attention`, so one options object configures every method.
  explicit ExactReferenceBackend(const PolynomialAttentionOptions& options) : ExactReferenceBackend(options.attention) {}

  AttentionMethod method() const override { return AttentionMethod::exact_reference; }
  const AttentionOptions& attention_options() const override { return options_; }
  const AttentionOptions& options() const { return options_; }

  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override;

  /// Recomputes everything from Q, K, V; `O` is only checked (the interface passes it).
  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override;

 private:
  AttentionOptions options_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
Certificate ExactReferenceBackend<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                              const ConstMatrixRef<T>& V, MatrixRef<T> O) {
  constexpr const char* where = "polyattn::ExactReferenceBackend::forward";
  const auto shape = detail::check_qkv(where, Q, K, V, options_);
  detail::check_forward_output(where, shape, Q, K, V, O);
  O.noalias() = detail::attention_reference(where, Q, K, V, options_);
  return detail::exact_method_certificate();
}

template <class T>
GradientCertificate ExactReferenceBackend<T>::backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                                       const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                                       const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                                       MatrixRef<T> dV) {
  constexpr const char* where = "polyattn::ExactReferenceBackend::backward";
  const auto shape = detail::check_backward_arguments<T>(where, options_, Q, K, V, O, G, dQ, dK, dV);
  detail::attention_backward_reference_unchecked<T>(where, shape, Q, K, V, G, options_, dQ, dK, dV);
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
/// block \f$k\f$ (under a causal mask only \f$k \le b\f$, the diagonal block masked) contribute
/// \f[ P = e^{c\,Q_bK_k^\top - \ell_b},\quad dV_k \mathrel{+}= P^\top G_b,\quad
///     dS = P\circ(G_bV_k^\top - \kappa_b\mathbf 1^\top),\quad dQ_b \mathrel{+}= c\,dS\,K_k,\quad
///     dK_k \mathrel{+}= c\,dS^\top Q_b. \f]
/// The loop runs over key blocks outside, so \f$dK_k, dV_k\f$ live in a small workspace and \f$dQ\f$
/// accumulates in the output. The cost is \f$3d_k + 2d_v\f$ multiply-adds per computed score plus one
/// exponential, against \f$d_k + d_v\f$ and one exponential in the forward pass.
///
/// backward() uses the log-sum-exp of the last forward() call: call it with the Q, K, V passed to that
/// forward() and the O it wrote.
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
  /// Uses only `options.attention`, so one options object configures every method.
  explicit ExactBlockedBackend(const PolynomialAttentionOptions& options, const ExactBlockedOptions& blocks = {})
      : ExactBlockedBackend(options.attention, blocks) {}

  AttentionMethod method() const override { return AttentionMethod::exact_blocked; }
  const AttentionOptions& attention_options() const override { return options_; }
  const AttentionOptions& options() const { return options_; }
  const ExactBlockedOptions& blocks() const { return blocks_; }

  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override;

  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override;

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

  // One head; scaled_queries_ and kappa_ hold c Q_h and rowsum(O_h o G_h). Writes dK_h, dV_h and
  // dQ_h / c (the caller applies c once instead of once per block).
  template <class KeyBlock, class ValueBlock, class GradBlock, class LseColumn, class DQBlock, class DKBlock,
            class DVBlock>
  void backward_head(const KeyBlock& Kh, const ValueBlock& Vh, const GradBlock& Gh, const LseColumn& lse,
                     DQBlock&& dQh, DKBlock&& dKh, DVBlock&& dVh) {
    const Index n = scaled_queries_.rows(), m = Kh.rows();
    const Index query_block = probabilities_.rows(), key_block = probabilities_.cols();
    dQh.setZero();
    for (Index k0 = 0; k0 < m; k0 += key_block) {
      const Index bk = std::min(key_block, m - k0);
      const auto Kk = Kh.middleRows(k0, bk);
      const auto Vk = Vh.middleRows(k0, bk);
      auto dKk = key_grads_.topRows(bk);
      auto dVk = value_grads_.topRows(bk);
      dKk.setZero();
      dVk.setZero();
      // Under the mask, query blocks that end before this key block starts see none of its keys.
      const Index first_query = options_.causal ? (k0 / query_block) * query_block : 0;
      for (Index q0 = first_query; q0 < n; q0 += query_block) {
        const Index bq = std::min(query_block, n - q0);
        const auto Qb = scaled_queries_.middleRows(q0, bq);
        const auto Gb = Gh.middleRows(q0, bq);
        auto P = probabilities_.topLeftCorner(bq, bk);
        auto dS = score_grads_.topLeftCorner(bq, bk);
        P.noalias() = Qb * Kk.transpose();
        // Two statements on purpose: Eigen 3.4 evaluates exp() of a colwise-replicated difference with
        // scalar expf, ten times slower than its vectorised exp of a plain block.
        P.colwise() -= lse.segment(q0, bq);
        P = P.array().exp().matrix();
        if (options_.causal && k0 + bk - 1 > q0) mask_future(P, q0, k0);
        dVk.noalias() += P.transpose() * Gb;
        dS.noalias() = Gb * Vk.transpose();
        dS.colwise() -= kappa_.segment(q0, bq);
        dS = dS.cwiseProduct(P);
        dQh.middleRows(q0, bq).noalias() += dS * Kk;
        dKk.noalias() += dS.transpose() * Qb;
      }
      dKh.middleRows(k0, bk) = dKk;
      dVh.middleRows(k0, bk) = dVk;
    }
  }

  // Zeroes P(i, j) where key k0 + j comes after query q0 + i (exp overflow there is discarded, not used).
  template <class Block>
  static void mask_future(Block& P, Index q0, Index k0) {
    for (Index j = 0; j < P.cols(); ++j) {
      const Index masked_rows = std::clamp<Index>(k0 + j - q0, 0, P.rows());
      P.col(j).head(masked_rows).setZero();
    }
  }

  AttentionOptions options_;
  ExactBlockedOptions blocks_;
  ExactAttention<T> forward_;
  Matrix<T> scaled_queries_, probabilities_, score_grads_, key_grads_, value_grads_;
  Vector<T> kappa_;
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
GradientCertificate ExactBlockedBackend<T>::backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                                     const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                                     const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                                     MatrixRef<T> dV) {
  constexpr const char* where = "polyattn::ExactBlockedBackend::backward";
  const auto shape = detail::check_backward_arguments<T>(where, options_, Q, K, V, O, G, dQ, dK, dV);
  const Matrix<T>& logsumexp = forward_.logsumexp();
  detail::require(logsumexp.rows() == shape.n && logsumexp.cols() == shape.heads, where,
                  "needs the log-sum-exp of a preceding forward() with the same shapes: saved ", logsumexp.rows(),
                  "x", logsumexp.cols(), ", expected ", shape.n, "x", shape.heads, " (rows x heads)");
  const Index bq = std::min(blocks_.query_block, shape.n);
  const Index bk = std::min(blocks_.key_block, shape.m);
  probabilities_.resize(bq, bk);
  score_grads_.resize(bq, bk);
  key_grads_.resize(bk, shape.dk);
  value_grads_.resize(bk, shape.dv);
  const T c = static_cast<T>(options_.resolved_scale(shape.dk));
  for (Index h = 0; h < shape.heads; ++h) {
    scaled_queries_.noalias() = c * Q.middleCols(h * shape.dk, shape.dk);
    kappa_.noalias() = O.middleCols(h * shape.dv, shape.dv).cwiseProduct(G.middleCols(h * shape.dv, shape.dv))
                           .rowwise()
                           .sum();
    backward_head(K.middleCols(h * shape.dk, shape.dk), V.middleCols(h * shape.dv, shape.dv),
                  G.middleCols(h * shape.dv, shape.dv), logsumexp.col(h), dQ.middleCols(h * shape.dk, shape.dk),
                  dK.middleCols(h * shape.dk, shape.dk), dV.middleCols(h * shape.dv, shape.dv));
    dQ.middleCols(h * shape.dk, shape.dk) *= c;
  }
  detail::check_backward_results<T>(where, options_, shape, Q, K, V, G, dQ, dK, dV);
  return {detail::exact_method_certificate(), 0, 0};
}

}  // namespace polyattn
