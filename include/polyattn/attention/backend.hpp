/// \file attention/backend.hpp
/// One interface for every way polyattn computes attention and its gradients, so that a model can
/// choose the method per layer at run time.
///
/// All methods work on the raw form: \f$Q, K\f$ (\f$n\times h d_k\f$), \f$V\f$ (\f$n\times h d_v\f$),
/// \f$O = \mathrm{softmax}(c\,QK^\top\,[\circ M])V\f$ per head, and given \f$G = \partial L/\partial O\f$
/// \f[ \partial L/\partial Q = c\,p\,K,\quad \partial L/\partial K = c\,p^\top Q,\quad
///     \partial L/\partial V = P^\top G,\qquad p = P\circ(GV^\top) - \mathrm{diag}(\mathrm{rowsum}(O\circ G))P. \f]
/// The layer forms (the paper's \f$X, W = W_QW_K^\top, W_V\f$ and the practical \f$W_Q, W_K, W_V\f$) are
/// chain rules on top of these three products.
///
/// \code
///   std::unique_ptr<polyattn::AttentionBackend<float>> attn = polyattn::make_attention_backend<float>(
///       polyattn::AttentionMethod::adjoint, options);
///   attn->forward(Q, K, V, O);
///   attn->backward(Q, K, V, O, G, dQ, dK, dV);
/// \endcode
#pragma once

#include "certificate.hpp"
#include "options.hpp"
#include "../parallel/state_exchange.hpp"

#include <array>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace polyattn {

/// How attention and its gradient are computed.
enum class AttentionMethod {
  exact_reference,  ///< materialised \f$n\times n\f$ matrices: the readable reference, \f$O(n^2)\f$ memory
  exact_blocked,    ///< streaming online softmax, FlashAttention-style recomputing backward, \f$O(nd)\f$ memory
  paper,            ///< Algorithm 1 of Liang et al. 2024: low-rank \f$p \approx U_pV_p^\top\f$, \f$O(nrd^2)\f$
  adjoint,          ///< exact gradient of the polynomial forward pass, \f$O(nrd)\f$
};

/// Every method, in the order of the enumeration.
inline constexpr std::array<AttentionMethod, 4> all_attention_methods{
    AttentionMethod::exact_reference, AttentionMethod::exact_blocked, AttentionMethod::paper,
    AttentionMethod::adjoint};

/// The method's name as spelled in the enumeration ("exact_blocked", "adjoint", ...).
inline const char* attention_method_name(AttentionMethod method) {
  switch (method) {
    case AttentionMethod::exact_reference: return "exact_reference";
    case AttentionMethod::exact_blocked: return "exact_blocked";
    case AttentionMethod::paper: return "paper";
    case AttentionMethod::adjoint: return "adjoint";
  }
  throw std::invalid_argument(detail::concat("polyattn::attention_method_name: argument 'method' has the invalid value ",
                                             static_cast<int>(method)));
}

/// Inverse of attention_method_name(); throws std::invalid_argument listing the valid names.
inline AttentionMethod parse_attention_method(const std::string& name) {
  for (const AttentionMethod method : all_attention_methods)
    if (name == attention_method_name(method)) return method;
  throw std::invalid_argument(detail::concat("polyattn::parse_attention_method: argument 'name' must be one of "
                                             "exact_reference, exact_blocked, paper, adjoint; got '",
                                             name, "'"));
}

namespace detail {

/// The shapes of a backward() call's O, G (n x h d_v), dQ (n x h d_k), dK (m x h d_k), dV (m x h d_v) for the
/// head shape `shape` of its Q, K, V, and the outputs' memory, which must share none with each other or with Q, K,
/// V, O, G.
template <class In, class Out>
void check_backward_outputs(const char* where, const HeadShape& shape, const In& Q, const In& K, const In& V,
                            const In& O, const In& G, const Out& dQ, const Out& dK, const Out& dV) {
  require_shape(where, "O", O, shape.n, shape.heads * shape.dv);
  require_shape(where, "G", G, shape.n, shape.heads * shape.dv);
  require_shape(where, "dQ", dQ, shape.n, shape.heads * shape.dk);
  require_shape(where, "dK", dK, shape.m, shape.heads * shape.dk);
  require_shape(where, "dV", dV, shape.m, shape.heads * shape.dv);
  require_disjoint(where, {memory_of("dQ", dQ), memory_of("dK", dK), memory_of("dV", dV)},
                   {memory_of("Q", Q), memory_of("K", K), memory_of("V", V), memory_of("O", O), memory_of("G", G)});
}

/// `kappa` = \f$\mathrm{rowsum}(O\circ G)\f$ of a head's n x d_v blocks, summed in column order whatever their
/// storage order, so that the gradients of row-major inputs are bitwise those of column-major ones (Eigen's
/// rowwise().sum() of a row-major product adds each row's entries in another order). `kappa` keeps its storage
/// from call to call.
template <class DO, class DG, class T>
void rowsum_of_product(const Eigen::MatrixBase<DO>& O, const Eigen::MatrixBase<DG>& G, Vector<T>& kappa) {
  kappa = O.col(0).cwiseProduct(G.col(0));
  for (Index j = 1; j < O.cols(); ++j) kappa += O.col(j).cwiseProduct(G.col(j));
}

/// Every entry of a backward() call's inputs Q, K, V, O, G finite; the first non-finite one is named.
template <class In>
void require_finite_backward_inputs(const char* where, const In& Q, const In& K, const In& V, const In& O,
                                    const In& G) {
  for (const auto& [name, X] : {std::pair<const char*, const In*>{"Q", &Q}, {"K", &K}, {"V", &V}, {"O", &O},
                                {"G", &G}})
    require_finite_in_parallel(where, name, *X);
}

/// The shapes and aliasing of a backward() call's arguments: Q, K, V as check_qkv_shapes() (with
/// `causal_queries`), then check_backward_outputs(). Returns the head shape. Reads no entries: a caller whose own
/// passes over the inputs find any non-finite entry may skip check_backward_arguments()'s.
template <class T, class In = ConstMatrixRef<T>, class Out = MatrixRef<T>>
HeadShape check_backward_shapes(const char* where, const AttentionOptions& opt, const NonDeduced<In>& Q,
                                const NonDeduced<In>& K, const NonDeduced<In>& V, const NonDeduced<In>& O,
                                const NonDeduced<In>& G, const NonDeduced<Out>& dQ, const NonDeduced<Out>& dK,
                                const NonDeduced<Out>& dV,
                                CausalQueries causal_queries = CausalQueries::as_many_as_keys) {
  const HeadShape shape = check_qkv_shapes(where, Q, K, V, opt, causal_queries);
  check_backward_outputs(where, shape, Q, K, V, O, G, dQ, dK, dV);
  return shape;
}

/// Checks the arguments of a backward() call: check_backward_shapes(), then every entry of Q, K, V, O, G finite
/// (the first non-finite one is named). Returns the head shape.
template <class T, class In = ConstMatrixRef<T>, class Out = MatrixRef<T>>
HeadShape check_backward_arguments(const char* where, const AttentionOptions& opt, const NonDeduced<In>& Q,
                                   const NonDeduced<In>& K, const NonDeduced<In>& V, const NonDeduced<In>& O,
                                   const NonDeduced<In>& G, const NonDeduced<Out>& dQ, const NonDeduced<Out>& dK,
                                   const NonDeduced<Out>& dV,
                                   CausalQueries causal_queries = CausalQueries::as_many_as_keys) {
  const HeadShape shape = check_backward_shapes<T, In, Out>(where, opt, Q, K, V, O, G, dQ, dK, dV, causal_queries);
  require_finite_backward_inputs(where, Q, K, V, O, G);
  return shape;
}

/// check_backward_arguments() for one rank's shard of a sequence-parallel call, which may have no rows.
template <class T, class In = ConstMatrixRef<T>, class Out = MatrixRef<T>>
HeadShape check_shard_backward_arguments(const char* where, const AttentionOptions& opt, const NonDeduced<In>& Q,
                                         const NonDeduced<In>& K, const NonDeduced<In>& V, const NonDeduced<In>& O,
                                         const NonDeduced<In>& G, const NonDeduced<Out>& dQ,
                                         const NonDeduced<Out>& dK, const NonDeduced<Out>& dV) {
  if (Q.rows() > 0 && K.rows() > 0)
    return check_backward_arguments<T, In, Out>(where, opt, Q, K, V, O, G, dQ, dK, dV);
  const HeadShape shape = check_shard_shapes(where, Q, K, V, opt);
  check_backward_outputs(where, shape, Q, K, V, O, G, dQ, dK, dV);
  // Without queries only K and V have entries (non-causal); without keys only Q, O and G.
  require_finite_backward_inputs(where, Q, K, V, O, G);
  return shape;
}

/// Throws std::domain_error naming what overflowed unless the gradients dQ, dK, dV of finite inputs are finite.
/// O(n d).
template <class T, class In = ConstMatrixRef<T>, class Out = MatrixRef<T>>
void check_backward_results(const char* where, const AttentionOptions& opt, const HeadShape& shape,
                            const NonDeduced<In>& Q, const NonDeduced<In>& K, const NonDeduced<In>& V,
                            const NonDeduced<In>& G, const NonDeduced<Out>& dQ, const NonDeduced<Out>& dK,
                            const NonDeduced<Out>& dV) {
  const auto cause = [&] {
    const double largest = static_cast<double>(std::numeric_limits<T>::max());
    return concat("the gradient's intermediate products overflowed ", sizeof(T) == sizeof(float) ? "float" : "double",
                  " (largest ", largest, "): score radius R = c max|q| max|k| = ",
                  score_radius(Q, K, shape, opt.resolved_scale(shape.dk)), ", max |V| = ",
                  static_cast<double>(V.cwiseAbs().maxCoeff()), ", max |G| = ",
                  static_cast<double>(G.cwiseAbs().maxCoeff()), "; scale the inputs or the loss down");
  };
  require_finite_result(where, "the gradient 'dQ'", dQ, cause);
  require_finite_result(where, "the gradient 'dK'", dK, cause);
  require_finite_result(where, "the gradient 'dV'", dV, cause);
}

/// What a backend keeps of its last forward() for the backward() that pairs with it: whether one succeeded (since
/// the backend was made or reconfigured) and the shapes of its Q, K, V.
class ForwardRecord {
 public:
  /// Nothing to pair with: before a forward(), while one runs (it may throw) and after a configuration change.
  void clear() { recorded_ = false; }
  /// A forward() on Q, K, V succeeded.
  template <class DQ, class DK, class DV>
  void record(const Eigen::EigenBase<DQ>& Q, const Eigen::EigenBase<DK>& K, const Eigen::EigenBase<DV>& V) {
    shape_ = {Q.rows(), K.rows(), Q.cols(), V.cols()};
    recorded_ = true;
  }
  /// Throws unless a forward() was recorded on Q, K, V of these shapes.
  template <class DQ, class DK, class DV>
  void require_same(const char* where, const Eigen::EigenBase<DQ>& Q, const Eigen::EigenBase<DK>& K,
                    const Eigen::EigenBase<DV>& V) const {
    require(recorded_, where, "call forward() first");
    require(shape_ == std::array<Index, 4>{Q.rows(), K.rows(), Q.cols(), V.cols()}, where,
            "'Q', 'K', 'V' must have the shapes of the last forward() call (", shape_[0], "x", shape_[2], ", ",
            shape_[1], "x", shape_[2], ", ", shape_[1], "x", shape_[3], ")");
  }

 private:
  bool recorded_ = false;
  std::array<Index, 4> shape_{};  // rows of Q, rows of K, columns of Q, columns of V
};

/// The checks a backward() starts with: its arguments (check_backward_arguments(), for a shard
/// check_shard_backward_arguments()), that `record` holds a forward() of the same shapes, and `local_checks(shape)`
/// (further local work that may throw). With an `exchange` (null: serial), a failure on any rank throws on every
/// rank, before any collective of the pass: StateExchange::agree() with `settings(shape)`, which also checks that
/// every rank has the same settings. Returns the head shape.
template <class T, class In = ConstMatrixRef<T>, class Out = MatrixRef<T>, class Settings, class LocalChecks>
HeadShape check_backward_call(const char* where, const AttentionOptions& opt, StateExchange* exchange,
                              const ForwardRecord& record, const NonDeduced<In>& Q, const NonDeduced<In>& K,
                              const NonDeduced<In>& V, const NonDeduced<In>& O, const NonDeduced<In>& G,
                              const NonDeduced<Out>& dQ, const NonDeduced<Out>& dK, const NonDeduced<Out>& dV,
                              const Settings& settings, LocalChecks&& local_checks) {
  if (!exchange) {
    const HeadShape shape = check_backward_arguments<T, In, Out>(where, opt, Q, K, V, O, G, dQ, dK, dV);
    record.require_same(where, Q, K, V);
    local_checks(shape);
    return shape;
  }
  HeadShape shape{};
  std::exception_ptr failure;  // agree() makes every rank throw it
  try {
    shape = check_shard_backward_arguments<T, In, Out>(where, opt, Q, K, V, O, G, dQ, dK, dV);
    record.require_same(where, Q, K, V);
    local_checks(shape);
  } catch (...) {
    failure = std::current_exception();
  }
  exchange->agree(where, failure, settings(shape));
  return shape;
}

}  // namespace detail

/// Attention forward and backward behind a virtual interface.
///
/// **Threads.** A backend runs its loops on polyattn's threads (parallel/threads.hpp) with results that do not
/// depend on the thread count. One backend object must not be used by two threads at once (it keeps workspaces);
/// distinct objects are independent (tests/test_concurrency.cpp, also run under ThreadSanitizer).
///
/// forward() saves what backward() needs; backward() must be called with the same Q, K, V and the O that
/// forward() wrote, and *overwrites* dQ, dK, dV (they are intermediate products: a layer accumulates
/// them into its own parameter gradients).
///
/// **Errors.** Every method throws std::invalid_argument naming the called function and the argument for bad
/// shapes, non-finite entries or **aliasing**: an output (O of forward(); dQ, dK, dV of backward()) must not share
/// any memory with an input (Q, K, V; and O, G for backward()) or with another output, not even partly (two
/// disjoint column blocks of one matrix are fine). std::domain_error reports what cannot hold mathematically or
/// numerically: finite input whose scores, features or sums overflow the scalar type (never a silent NaN or
/// inf), a polynomial not positive on the scores, a radius outside the configured interval.
template <class T>
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  virtual AttentionMethod method() const = 0;

  /// Scale, mask and number of heads the backend splits Q, K, V by (layers check their weights against it).
  virtual const AttentionOptions& attention_options() const = 0;

  /// Writes \f$O\f$ (n x h d_v) and returns the error statement of the call.
  virtual Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                              MatrixRef<T> O) = 0;

  /// Writes \f$\partial L/\partial Q\f$, \f$\partial L/\partial K\f$, \f$\partial L/\partial V\f$ for
  /// \f$G = \partial L/\partial O\f$. **Overwrites** dQ, dK, dV: a backend computes the gradient of one call.
  /// (The layers built on backends, nn/attention_layers.hpp and nn/, **accumulate** into their weight and input
  /// gradients instead, llm.c style, so that a step can sum over uses; they zero nothing themselves.)
  virtual GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                       const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                       const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                       MatrixRef<T> dV) = 0;

  /// forward() on row-major matrices (a row's entries adjacent: C-ordered numpy arrays, contiguous torch
  /// tensors). The single-process backends read and write them in place, with results bitwise those of
  /// column-major ones; this default, for a backend without such an overload, goes through column-major copies.
  virtual Certificate forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                              const ConstRowMajorRef<T>& V, RowMajorRef<T> O) {
    const Matrix<T> Q_columns = Q, K_columns = K, V_columns = V;
    Matrix<T> O_columns(O.rows(), O.cols());
    const Certificate certificate = forward(Q_columns, K_columns, V_columns, O_columns);
    O = O_columns;
    return certificate;
  }

  /// backward() on row-major matrices: see the row-major forward().
  virtual GradientCertificate backward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                       const ConstRowMajorRef<T>& V, const ConstRowMajorRef<T>& O,
                                       const ConstRowMajorRef<T>& G, RowMajorRef<T> dQ, RowMajorRef<T> dK,
                                       RowMajorRef<T> dV) {
    const Matrix<T> Q_columns = Q, K_columns = K, V_columns = V, O_columns = O, G_columns = G;
    Matrix<T> dQ_columns(dQ.rows(), dQ.cols()), dK_columns(dK.rows(), dK.cols()), dV_columns(dV.rows(), dV.cols());
    const GradientCertificate certificate =
        backward(Q_columns, K_columns, V_columns, O_columns, G_columns, dQ_columns, dK_columns, dV_columns);
    dQ = dQ_columns;
    dK = dK_columns;
    dV = dV_columns;
    return certificate;
  }
};

}  // namespace polyattn
