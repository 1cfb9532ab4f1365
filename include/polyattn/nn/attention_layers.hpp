/// \file nn/attention_layers.hpp
/// The two parameterisations of an attention layer, forward and backward, as chain rules on top of any
/// AttentionBackend. A backend computes the raw-form gradients \f$dQ, dK, dV\f$; the layers add the
/// \f$O(nd^2)\f$ products that turn them into gradients of their weights and input, so every method (exact,
/// paper, adjoint) gets both layer forms for free and with the same cost order as its raw backward.
///
/// **The paper's layer** (Liang et al. 2024, Def. 1.2): \f$X\in\mathbb R^{n\times d}\f$, \f$W = W_QW_K^\top\f$,
/// \f$W_V\f$, \f$S = c\,XWX^\top\f$ (\f$\circ M\f$ when causal), \f$P = \mathrm{softmax}_{\text{rows}}(S)\f$,
/// \f$O = PXW_V\f$. It is the raw form with \f$Q = XW\f$, \f$K = X\f$, \f$V = XW_V\f$, so with
/// \f$p = \partial L/\partial S = P\circ(GV^\top) - \mathrm{diag}(\mathrm{rowsum}(O\circ G))P\f$:
/// \f[ \partial L/\partial W = X^\top dQ = c\,X^\top pX,\qquad \partial L/\partial W_V = X^\top dV = X^\top P^\top G,\f]
/// \f[ \partial L/\partial X = dQ\,W^\top + dK + dV\,W_V^\top = c\,(pXW^\top + p^\top XW) + P^\top GW_V^\top. \f]
///
/// **Erratum.** The paper's printed Lemma G.3 and line 22 of its Algorithm 1 give
/// \f$\partial L/\partial W_V = X^\top f(X)\,G\f$ and its term \f$D_8 = f(X)\,GW_V^\top\f$ of
/// \f$\partial L/\partial X\f$; both miss a transpose: \f$f(X)\f$ (our \f$P\f$) must be \f$f(X)^\top = P^\top\f$,
/// because \f$O = PV\f$ sends the gradient \f$P^\top G\f$ to \f$V\f$. Finite differences disagree with the printed
/// forms by \f$O(1)\f$ and agree with the formulas above (tests/test_attention_layers.cpp), which are the ones
/// implemented here.
///
/// **The practical layer**: \f$Q = XW_Q\f$, \f$K = XW_K\f$ (\f$d_{model}\times hd_h\f$), \f$V = XW_V\f$
/// (\f$d_{model}\times hd_v\f$):
/// \f[ \partial L/\partial W_Q = X^\top dQ,\quad \partial L/\partial W_K = X^\top dK,\quad \partial L/\partial W_V = X^\top dV,
///     \quad \partial L/\partial X = dQ\,W_Q^\top + dK\,W_K^\top + dV\,W_V^\top. \f]
/// For one head the two forms are related through \f$W = W_QW_K^\top\f$ (same scale \f$c\f$):
/// \f$\partial L/\partial W_Q = (\partial L/\partial W)\,W_K\f$ and \f$\partial L/\partial W_K = (\partial L/\partial W)^\top W_Q\f$.
///
/// Both layers follow the llm.c convention: forward() saves what backward() needs; backward() takes the same
/// inputs in the same order and **accumulates** into \f$dX\f$ and every weight gradient (zero them before the
/// first backward of a step), while the backend's \f$dQ, dK, dV\f$ are overwritten workspaces of the layer.
/// As for the backends, an output (O; dX and the weight gradients) must not share memory with an input or
/// another output: std::invalid_argument naming both. The number of heads is the backend's
/// (AttentionBackend::attention_options()); weights laid out for another head count are rejected where their
/// shape shows it (MergedQKAttentionLayer) or when the layer is built with an explicit head count.
#pragma once

#include "../attention/backend.hpp"

namespace polyattn {

/// The paper's attention layer \f$O = \mathrm{softmax}(c\,XWX^\top)XW_V\f$ on top of any backend.
///
/// With \f$h\f$ heads, `W` is the horizontal concatenation \f$[W_1 \mid \dots \mid W_h]\f$ of the per-head
/// \f$d\times d\f$ matrices \f$W_l = W_{Q,l}W_{K,l}^\top\f$ (so `W` is \f$d\times hd\f$ and \f$Q = XW\f$ in one
/// product), and `W_V` is \f$d\times hd_v\f$, head \f$l\f$ owning columns \f$[ld_v, (l+1)d_v)\f$. Head \f$l\f$
/// computes \f$O_l = \mathrm{softmax}(c\,XW_lX^\top)XW_{V,l}\f$; `dW` has the same block layout. The number of
/// heads is `W.cols() / X.cols()` and must equal the backend's AttentionOptions::heads; the backend's default
/// scale is \f$1/\sqrt d\f$ (the per-head key width is \f$d\f$ here), so set AttentionOptions::scale to
/// \f$1/d\f$ for the paper's normalisation.
///
/// \code
///   polyattn::ExactBlockedBackend<double> exact(polyattn::AttentionOptions{1.0 / d, /*causal=*/true, 1});
///   polyattn::MergedQKAttentionLayer<double> layer(exact);
///   layer.forward(X, W, W_V, O);
///   dX.setZero(); dW.setZero(); dW_V.setZero();
///   layer.backward(X, W, W_V, G, dX, dW, dW_V);   // accumulates
/// \endcode
template <class T>
class MergedQKAttentionLayer {
 public:
  /// The layer keeps a reference: `attention` must outlive it.
  explicit MergedQKAttentionLayer(AttentionBackend<T>& attention) : attention_(&attention) {
    detail::static_check_scalar<T>();
  }

  AttentionBackend<T>& attention() const { return *attention_; }

  /// Writes \f$O\f$ (n x h d_v) for \f$X\f$ (n x d), \f$W\f$ (d x h d), \f$W_V\f$ (d x h d_v); saves
  /// \f$Q = XW\f$, \f$K\f$, \f$V = XW_V\f$ and \f$O\f$ for backward().
  Certificate forward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W, const ConstMatrixRef<T>& W_V,
                      MatrixRef<T> O);

  /// Accumulates \f$\partial L/\partial X\f$ into `dX`, \f$\partial L/\partial W\f$ into `dW` and
  /// \f$\partial L/\partial W_V\f$ into `dW_V` for \f$G = \partial L/\partial O\f$, with the X, W, W_V of the
  /// last forward().
  GradientCertificate backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W, const ConstMatrixRef<T>& W_V,
                               const ConstMatrixRef<T>& G, MatrixRef<T> dX, MatrixRef<T> dW, MatrixRef<T> dW_V);

 private:
  // Returns the number of heads implied by W's shape, which must be the backend's.
  Index check_weights(const char* where, const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W,
                      const ConstMatrixRef<T>& W_V) const {
    detail::require_nonempty(where, "X", X);
    const Index d = X.cols();
    detail::require(W.rows() == d && W.cols() >= d && W.cols() % d == 0, where, "argument 'W' must be ", d,
                    "x(heads*", d, ") (the per-head ", d, "x", d, " blocks side by side), got ", W.rows(), "x",
                    W.cols());
    const Index heads = W.cols() / d;
    const Index backend_heads = attention_->attention_options().heads;
    detail::require(heads == backend_heads, where, "argument 'W' (", W.rows(), "x", W.cols(), ") holds ", heads,
                    " heads of ", d, "x", d, " blocks, but the backend was built with 'heads' = ", backend_heads,
                    " (expected 'W' to be ", d, "x", backend_heads * d, ")");
    detail::require(W_V.rows() == d && W_V.cols() >= heads && W_V.cols() % heads == 0, where,
                    "argument 'W_V' must be ", d, "x(", heads, "*d_v) for the ", heads, " heads of 'W', got ",
                    W_V.rows(), "x", W_V.cols());
    detail::require_finite_in_parallel(where, "X", X);
    detail::require_finite(where, "W", W);
    detail::require_finite(where, "W_V", W_V);
    return heads;
  }

  AttentionBackend<T>* attention_;
  Matrix<T> queries_, keys_, values_, output_, query_grads_, key_grads_, value_grads_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
Certificate MergedQKAttentionLayer<T>::forward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W,
                                               const ConstMatrixRef<T>& W_V, MatrixRef<T> O) {
  constexpr const char* where = "polyattn::MergedQKAttentionLayer::forward";
  const Index heads = check_weights(where, X, W, W_V);
  detail::require_shape(where, "O", O, X.rows(), W_V.cols());
  detail::require_disjoint(where, {detail::memory_of("O", O)},
                           {detail::memory_of("X", X), detail::memory_of("W", W), detail::memory_of("W_V", W_V)});
  const Index n = X.rows(), d = X.cols();
  queries_.noalias() = X * W;
  keys_.resize(n, heads * d);
  for (Index l = 0; l < heads; ++l) keys_.middleCols(l * d, d) = X;
  values_.noalias() = X * W_V;
  const Certificate certificate = attention_->forward(queries_, keys_, values_, O);
  output_ = O;
  return certificate;
}

template <class T>
GradientCertificate MergedQKAttentionLayer<T>::backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W,
                                                        const ConstMatrixRef<T>& W_V, const ConstMatrixRef<T>& G,
                                                        MatrixRef<T> dX, MatrixRef<T> dW, MatrixRef<T> dW_V) {
  constexpr const char* where = "polyattn::MergedQKAttentionLayer::backward";
  const Index heads = check_weights(where, X, W, W_V);
  const Index n = X.rows(), d = X.cols();
  detail::require(queries_.rows() == n && queries_.cols() == W.cols() && values_.cols() == W_V.cols(), where,
                  "needs a preceding forward() with the same shapes of 'X', 'W' and 'W_V'");
  detail::require_shape(where, "G", G, n, W_V.cols());
  detail::require_shape(where, "dX", dX, n, d);
  detail::require_shape(where, "dW", dW, d, W.cols());
  detail::require_shape(where, "dW_V", dW_V, d, W_V.cols());
  detail::require_finite_in_parallel(where, "G", G);
  detail::require_disjoint(where, {detail::memory_of("dX", dX), detail::memory_of("dW", dW), detail::memory_of("dW_V", dW_V)},
                           {detail::memory_of("X", X), detail::memory_of("W", W), detail::memory_of("W_V", W_V),
                            detail::memory_of("G", G)});
  query_grads_.resize(n, W.cols());
  key_grads_.resize(n, W.cols());
  value_grads_.resize(n, W_V.cols());
  const GradientCertificate certificate =
      attention_->backward(queries_, keys_, values_, output_, G, query_grads_, key_grads_, value_grads_);
  dW.noalias() += X.transpose() * query_grads_;
  dW_V.noalias() += X.transpose() * value_grads_;
  dX.noalias() += query_grads_ * W.transpose();
  dX.noalias() += value_grads_ * W_V.transpose();
  for (Index l = 0; l < heads; ++l) dX += key_grads_.middleCols(l * d, d);
  return certificate;
}

/// The practical attention layer \f$O = \mathrm{attention}(XW_Q, XW_K, XW_V)\f$ on top of any backend:
/// separate projections \f$W_Q, W_K\f$ (\f$d_{model}\times hd_h\f$) and \f$W_V\f$ (\f$d_{model}\times hd_v\f$);
/// the backend's AttentionOptions (heads, scale, mask) split and mix the heads.
///
/// \code
///   polyattn::ExactBlockedBackend<float> exact(polyattn::AttentionOptions{std::nullopt, true, /*heads=*/4});
///   polyattn::ProjectedAttentionLayer<float> layer(exact);
///   layer.forward(X, W_Q, W_K, W_V, O);
///   layer.backward(X, W_Q, W_K, W_V, G, dX, dW_Q, dW_K, dW_V);   // accumulates
/// \endcode
template <class T>
class ProjectedAttentionLayer {
 public:
  /// The layer keeps a reference: `attention` must outlive it. The heads are the backend's: Q, K, V are split
  /// into AttentionOptions::heads column blocks.
  explicit ProjectedAttentionLayer(AttentionBackend<T>& attention) : attention_(&attention) {
    detail::static_check_scalar<T>();
  }
  /// As above, stating the number of heads the weights are laid out for: throws std::invalid_argument unless it
  /// is the backend's AttentionOptions::heads (the weights' shapes alone cannot show a head-count mismatch).
  ProjectedAttentionLayer(AttentionBackend<T>& attention, Index heads) : ProjectedAttentionLayer(attention) {
    const Index backend_heads = attention.attention_options().heads;
    detail::require(heads == backend_heads, "polyattn::ProjectedAttentionLayer", "argument 'heads' = ", heads,
                    " must equal the backend's 'heads' = ", backend_heads);
  }

  /// Number of heads (the backend's).
  Index heads() const { return attention_->attention_options().heads; }

  AttentionBackend<T>& attention() const { return *attention_; }

  /// Writes \f$O\f$ (n x h d_v) for \f$X\f$ (n x d_model); saves \f$Q, K, V\f$ and \f$O\f$ for backward().
  Certificate forward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W_Q, const ConstMatrixRef<T>& W_K,
                      const ConstMatrixRef<T>& W_V, MatrixRef<T> O);

  /// Accumulates \f$\partial L/\partial X\f$, \f$\partial L/\partial W_Q\f$, \f$\partial L/\partial W_K\f$ and
  /// \f$\partial L/\partial W_V\f$ for \f$G = \partial L/\partial O\f$, with the inputs of the last forward().
  GradientCertificate backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W_Q, const ConstMatrixRef<T>& W_K,
                               const ConstMatrixRef<T>& W_V, const ConstMatrixRef<T>& G, MatrixRef<T> dX,
                               MatrixRef<T> dW_Q, MatrixRef<T> dW_K, MatrixRef<T> dW_V);

 private:
  static void check_weights(const char* where, const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W_Q,
                            const ConstMatrixRef<T>& W_K, const ConstMatrixRef<T>& W_V) {
    detail::require_nonempty(where, "X", X);
    detail::require_nonempty(where, "W_Q", W_Q);
    detail::require_nonempty(where, "W_V", W_V);
    detail::require_shape(where, "W_Q", W_Q, X.cols(), W_Q.cols());
    detail::require_shape(where, "W_K", W_K, X.cols(), W_Q.cols());
    detail::require_shape(where, "W_V", W_V, X.cols(), W_V.cols());
    detail::require_finite_in_parallel(where, "X", X);
    detail::require_finite(where, "W_Q", W_Q);
    detail::require_finite(where, "W_K", W_K);
    detail::require_finite(where, "W_V", W_V);
  }

  AttentionBackend<T>* attention_;
  Matrix<T> queries_, keys_, values_, output_, query_grads_, key_grads_, value_grads_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
Certificate ProjectedAttentionLayer<T>::forward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W_Q,
                                                const ConstMatrixRef<T>& W_K, const ConstMatrixRef<T>& W_V,
                                                MatrixRef<T> O) {
  constexpr const char* where = "polyattn::ProjectedAttentionLayer::forward";
  check_weights(where, X, W_Q, W_K, W_V);
  detail::require_shape(where, "O", O, X.rows(), W_V.cols());
  detail::require_disjoint(where, {detail::memory_of("O", O)},
                           {detail::memory_of("X", X), detail::memory_of("W_Q", W_Q), detail::memory_of("W_K", W_K),
                            detail::memory_of("W_V", W_V)});
  queries_.noalias() = X * W_Q;
  keys_.noalias() = X * W_K;
  values_.noalias() = X * W_V;
  const Certificate certificate = attention_->forward(queries_, keys_, values_, O);
  output_ = O;
  return certificate;
}

template <class T>
GradientCertificate ProjectedAttentionLayer<T>::backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& W_Q,
                                                         const ConstMatrixRef<T>& W_K, const ConstMatrixRef<T>& W_V,
                                                         const ConstMatrixRef<T>& G, MatrixRef<T> dX, MatrixRef<T> dW_Q,
                                                         MatrixRef<T> dW_K, MatrixRef<T> dW_V) {
  constexpr const char* where = "polyattn::ProjectedAttentionLayer::backward";
  check_weights(where, X, W_Q, W_K, W_V);
  const Index n = X.rows();
  detail::require(queries_.rows() == n && queries_.cols() == W_Q.cols() && values_.cols() == W_V.cols(), where,
                  "needs a preceding forward() with the same shapes of 'X', 'W_Q', 'W_K' and 'W_V'");
  detail::require_shape(where, "G", G, n, W_V.cols());
  detail::require_shape(where, "dX", dX, n, X.cols());
  detail::require_shape(where, "dW_Q", dW_Q, W_Q.rows(), W_Q.cols());
  detail::require_shape(where, "dW_K", dW_K, W_K.rows(), W_K.cols());
  detail::require_shape(where, "dW_V", dW_V, W_V.rows(), W_V.cols());
  detail::require_finite_in_parallel(where, "G", G);
  detail::require_disjoint(where,
                           {detail::memory_of("dX", dX), detail::memory_of("dW_Q", dW_Q), detail::memory_of("dW_K", dW_K),
                            detail::memory_of("dW_V", dW_V)},
                           {detail::memory_of("X", X), detail::memory_of("W_Q", W_Q), detail::memory_of("W_K", W_K),
                            detail::memory_of("W_V", W_V), detail::memory_of("G", G)});
  query_grads_.resize(n, W_Q.cols());
  key_grads_.resize(n, W_K.cols());
  value_grads_.resize(n, W_V.cols());
  const GradientCertificate certificate =
      attention_->backward(queries_, keys_, values_, output_, G, query_grads_, key_grads_, value_grads_);
  dW_Q.noalias() += X.transpose() * query_grads_;
  dW_K.noalias() += X.transpose() * key_grads_;
  dW_V.noalias() += X.transpose() * value_grads_;
  dX.noalias() += query_grads_ * W_Q.transpose();
  dX.noalias() += key_grads_ * W_K.transpose();
  dX.noalias() += value_grads_ * W_V.transpose();
  return certificate;
}

}  // namespace polyattn
