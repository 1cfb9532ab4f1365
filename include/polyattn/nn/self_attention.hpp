/// \file nn/self_attention.hpp
/// Multi-head causal self-attention with learned projections \f$W_Q, W_K, W_V, W_O\f$ and an attention
/// backend chosen per layer (exact, exact blocked, paper, adjoint), serial or sequence parallel.
#pragma once

#include "../attention/backend_factory.hpp"
#include "../parallel/distributed_backend.hpp"
#include "linear.hpp"

#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace polyattn {

/// Options of SelfAttention.
struct SelfAttentionOptions {
  /// Width \f$d\f$ of the residual stream (rows of every projection). Required, >= 1.
  Index d_model = 0;
  /// Number of heads \f$h\f$; must divide `d_model`, \f$d_h = d/h\f$. Default 1.
  Index heads = 1;
  /// Query \f$i\f$ attends to keys \f$j \le i\f$ (default true: a language model).
  bool causal = true;
  /// How attention and its gradient are computed (default exact_blocked: exact in \f$O(nd)\f$ memory).
  AttentionMethod method = AttentionMethod::exact_blocked;
  /// Score scale \f$c\f$; empty (default) means \f$1/\sqrt{d_h}\f$.
  std::optional<double> scale;
  /// Degree, polynomial, feature map, chunking and exact window of the polynomial methods (paper, adjoint);
  /// unused by the exact ones.
  ApproximationOptions approximation;
  /// Add a bias to each of the four projections (default false).
  bool bias = false;
  /// The projections start with \f$\mathcal N(0, 1/d)\f$ entries; \f$W_O\f$'s are further multiplied by
  /// `output_gain` (GPT-2 uses \f$1/\sqrt{2L}\f$ for \f$L\f$ blocks to keep the residual stream's variance).
  /// Default 1.
  double output_gain = 1.0;
  /// Seed of the four projections (each gets its own stream by derive_seed()).
  std::uint64_t seed = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::SelfAttentionOptions";
    detail::require(d_model >= 1, where, "'d_model' must be >= 1, got ", d_model);
    detail::require(heads >= 1 && d_model % heads == 0, where, "'heads' must be >= 1 and divide 'd_model' = ",
                    d_model, ", got ", heads);
    detail::require_positive(where, "output_gain", output_gain);
    backend_options().check();
  }

  /// The layer's scale, mask and heads with its approximation: what the backend is built from.
  PolynomialAttentionOptions backend_options() const {
    AttentionOptions attention;
    attention.scale = scale;
    attention.causal = causal;
    attention.heads = heads;
    return {attention, approximation};
  }
};

/// Multi-head self-attention on a sequence of row tokens \f$X\f$ (n x d):
/// \f[ Q = XW_Q,\quad K = XW_K,\quad V = XW_V,\quad
///     A_l = \mathrm{softmax}\big(c\,Q_lK_l^\top \circ M\big)V_l\ \ (l = 1..h),\quad Y = [A_1, \dots, A_h]\,W_O, \f]
/// with head \f$l\f$ owning columns \f$[l d_h, (l+1) d_h)\f$, \f$c = 1/\sqrt{d_h}\f$ by default and \f$M\f$ the
/// causal mask. With \f$G = \partial L/\partial Y\f$ the backward pass is the chain rule through the four
/// projections around the backend's raw-form gradient:
/// \f[ \partial L/\partial A = G W_O^\top,\quad (dQ, dK, dV) = \text{backend}(Q, K, V, A, \partial L/\partial A),\quad
///     \partial L/\partial X \mathrel{+}= dQ\,W_Q^\top + dK\,W_K^\top + dV\,W_V^\top, \f]
/// and \f$\partial L/\partial W_Q \mathrel{+}= X^\top dQ\f$ (likewise \f$W_K, W_V\f$), \f$\partial L/\partial W_O
/// \mathrel{+}= A^\top G\f$. In the paper's notation \f$W = W_QW_K^\top\f$ per head, \f$dW_Q = dW\,W_K\f$ and
/// \f$dW_K = dW^\top W_Q\f$, which is what the products above compute without forming \f$W\f$.
///
/// With an approximate backend the gradient is that backend's: the adjoint method returns the exact gradient
/// of the approximate layer, the paper's method a low-rank approximation of the exact gradient. The error
/// statements of the last calls are available from forward_certificate() and gradient_certificate().
///
/// forward() keeps \f$Q, K, V, A\f$ for backward(), which must be called with the same \f$X\f$.
///
/// **Sequence parallel.** After set_state_exchange() every rank passes its own contiguous rows of \f$X\f$ (the
/// projections are per row) and the backend combines with the other ranks (make_distributed_backend(),
/// parallel/distributed_backend.hpp: states for the polynomial methods, gathered keys for the exact ones). Each pass runs its local work, then one collective check
/// (StateExchange::succeeded()) right before the backend's collectives: a failure on one rank, here or in a
/// per-row layer before this one that its caller reports at its own check (GPT does), makes every rank throw
/// there instead of leaving the others waiting in the backend. collective_failures() counts the passes that threw
/// on every rank at once, so that a caller does not report those again. What runs after the backend (the output
/// projection in forward(), the input projections in backward()) is local: the caller reports its failure.
///
/// \code
///   polyattn::SelfAttentionOptions opt;
///   opt.d_model = 64;
///   opt.heads = 4;
///   opt.method = polyattn::AttentionMethod::adjoint;
///   polyattn::SelfAttention<float> attn(opt, "block0.attn");
///   attn.forward(X, Y);
///   attn.backward(X, dY, dX);      // projection gradients and dX accumulate
///   attn.set_state_exchange(exchange);  // then X, Y, dY, dX are this rank's rows of the sequence
/// \endcode
template <class T>
class SelfAttention {
 public:
  /// \f$W_Q\f$ (d x d), parameter "<name>.wq.weight".
  Linear<T> query;
  /// \f$W_K\f$ (d x d), parameter "<name>.wk.weight".
  Linear<T> key;
  /// \f$W_V\f$ (d x d), parameter "<name>.wv.weight".
  Linear<T> value;
  /// \f$W_O\f$ (d x d), parameter "<name>.wo.weight".
  Linear<T> output;

  explicit SelfAttention(const SelfAttentionOptions& options, const std::string& name = "attn");

  const SelfAttentionOptions& options() const { return options_; }
  Index d_model() const { return options_.d_model; }
  Index heads() const { return options_.heads; }
  AttentionMethod method() const { return options_.method; }

  /// Switches the attention method (the weights are kept). Takes effect at the next forward(). With a state
  /// exchange it is collective: every rank must call it with the same method.
  void set_method(AttentionMethod method);

  /// Makes forward() and backward() sequence parallel over the ranks of `exchange` (see the class
  /// documentation): the backend becomes make_distributed_backend() of the layer's method. Collective (every
  /// rank calls it, with the same method); throws std::invalid_argument on every rank, changing nothing, when
  /// the methods differ. Null restores the serial backend of the layer's method (not collective).
  void set_state_exchange(std::shared_ptr<StateExchange> exchange);
  /// The exchange set by set_state_exchange() (null: serial).
  StateExchange* state_exchange() const { return exchange_.get(); }
  /// Number of forward() and backward() calls, since construction, that threw on every rank of the exchange at
  /// once (from the collective check or the backend), as opposed to a failure of this rank alone.
  std::uint64_t collective_failures() const { return collective_failures_; }

  /// The backend in use (for its statistics; forward() and backward() drive it).
  AttentionBackend<T>& backend() { return *backend_; }

  /// Appends \f$W_Q, W_K, W_V, W_O\f$ (and their biases, if any) to `out`.
  void collect_parameters(std::vector<Parameter<T>*>& out) {
    query.collect_parameters(out);
    key.collect_parameters(out);
    value.collect_parameters(out);
    output.collect_parameters(out);
  }

  /// Writes \f$Y\f$ (n x d) for \f$X\f$ (n x d) and keeps \f$Q, K, V, A\f$ for backward().
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y);

  /// Accumulates the projection gradients and \f$\partial L/\partial X\f$ into `dX` for \f$G\f$ = `dY`, using
  /// what the preceding forward() (same \f$X\f$) kept.
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX);

  /// \f$Q = XW_Q\f$ (n x d) of the last forward() (Generator reads a prompt's queries, keys and values here).
  const Matrix<T>& queries() const { return queries_; }
  /// \f$K = XW_K\f$ (n x d) of the last forward().
  const Matrix<T>& keys() const { return keys_; }
  /// \f$V = XW_V\f$ (n x d) of the last forward().
  const Matrix<T>& values() const { return values_; }

  /// Error statement of the last forward() (zero error for exact methods).
  const Certificate& forward_certificate() const { return forward_certificate_; }
  /// Error statement of the last backward() (zero error for exact methods).
  const GradientCertificate& gradient_certificate() const { return gradient_certificate_; }

 private:
  static const SelfAttentionOptions& checked(const SelfAttentionOptions& options) {
    options.check();
    return options;
  }

  static LinearOptions projection(const SelfAttentionOptions& options, std::uint64_t stream) {
    const double stddev = 1.0 / std::sqrt(static_cast<double>(options.d_model));
    LinearOptions linear;
    linear.in_features = options.d_model;
    linear.out_features = options.d_model;
    linear.bias = options.bias;
    linear.init_std = stream == 3 ? options.output_gain * stddev : stddev;
    linear.seed = derive_seed(options.seed, stream);
    return linear;
  }

  // The backend for `method`: serial, or an AdjointBackend on exchange_ (`where` names the caller).
  std::unique_ptr<AttentionBackend<T>> make_backend(AttentionMethod method) const;

  SelfAttentionOptions options_;
  std::shared_ptr<StateExchange> exchange_;
  std::uint64_t collective_failures_ = 0;
  std::unique_ptr<AttentionBackend<T>> backend_;
  Matrix<T> queries_, keys_, values_, heads_out_;
  Matrix<T> heads_grad_, query_grad_, key_grad_, value_grad_;
  Certificate forward_certificate_;
  GradientCertificate gradient_certificate_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
SelfAttention<T>::SelfAttention(const SelfAttentionOptions& options, const std::string& name)
    : query(projection(checked(options), 0), name + ".wq"),
      key(projection(options, 1), name + ".wk"),
      value(projection(options, 2), name + ".wv"),
      output(projection(options, 3), name + ".wo"),
      options_(options),
      backend_(make_backend(options.method)) {}

template <class T>
std::unique_ptr<AttentionBackend<T>> SelfAttention<T>::make_backend(AttentionMethod method) const {
  if (!exchange_) return make_attention_backend<T>(method, options_.backend_options());
  return make_distributed_backend<T>(method, options_.backend_options(), exchange_);
}

template <class T>
void SelfAttention<T>::set_method(AttentionMethod method) {
  backend_ = make_backend(method);
  options_.method = method;
}

template <class T>
void SelfAttention<T>::set_state_exchange(std::shared_ptr<StateExchange> exchange) {
  std::swap(exchange_, exchange);
  try {
    backend_ = make_backend(options_.method);
  } catch (...) {
    std::swap(exchange_, exchange);  // changes nothing
    throw;
  }
}

template <class T>
void SelfAttention<T>::forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) {
  constexpr const char* where = "polyattn::SelfAttention::forward";
  std::exception_ptr local_failure;  // with an exchange, reported to every rank before the backend's collectives
  try {
    detail::require_nonempty(where, "X", X);
    detail::require_shape(where, "X", X, X.rows(), d_model());
    detail::require_shape(where, "Y", Y, X.rows(), d_model());
    const Index n = X.rows();
    queries_.resize(n, d_model());
    keys_.resize(n, d_model());
    values_.resize(n, d_model());
    heads_out_.resize(n, d_model());
    query.forward(X, queries_);
    key.forward(X, keys_);
    value.forward(X, values_);
  } catch (...) {
    if (!exchange_) throw;
    local_failure = std::current_exception();
  }
  try {
    if (exchange_) exchange_->succeeded(where, local_failure);
    forward_certificate_ = backend_->forward(queries_, keys_, values_, heads_out_);
  } catch (...) {
    if (exchange_) ++collective_failures_;  // both throw on every rank together
    throw;
  }
  output.forward(heads_out_, Y);
}

template <class T>
void SelfAttention<T>::backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) {
  constexpr const char* where = "polyattn::SelfAttention::backward";
  std::exception_ptr local_failure;  // with an exchange, reported to every rank before the backend's collectives
  try {
    detail::require(queries_.rows() == X.rows() && queries_.cols() == d_model(), where,
                    "needs a preceding forward() with the same X: saved ", queries_.rows(), "x", queries_.cols(),
                    " activations, got X of ", X.rows(), " rows");
    detail::require_shape(where, "X", X, X.rows(), d_model());
    detail::require_shape(where, "dY", dY, X.rows(), d_model());
    detail::require_shape(where, "dX", dX, X.rows(), d_model());
    const Index n = X.rows();
    heads_grad_.setZero(n, d_model());
    output.backward(heads_out_, dY, heads_grad_);
    query_grad_.resize(n, d_model());
    key_grad_.resize(n, d_model());
    value_grad_.resize(n, d_model());
  } catch (...) {
    if (!exchange_) throw;
    local_failure = std::current_exception();
  }
  try {
    if (exchange_) exchange_->succeeded(where, local_failure);
    gradient_certificate_ =
        backend_->backward(queries_, keys_, values_, heads_out_, heads_grad_, query_grad_, key_grad_, value_grad_);
  } catch (...) {
    if (exchange_) ++collective_failures_;  // both throw on every rank together
    throw;
  }
  query.backward(X, query_grad_, dX);
  key.backward(X, key_grad_, dX);
  value.backward(X, value_grad_, dX);
}

}  // namespace polyattn
