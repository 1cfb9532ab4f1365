/// \file parallel/gathered_keys.hpp
/// Exact attention on a shard of the sequence: the simple baseline of sequence parallelism, so that the exact
/// methods run wherever the polynomial ones do and comparisons at scale stay honest.
///
/// Rank p holds rows \f$[s_p, s_p + n_p)\f$ of Q, K, V (and of O, G, dQ, dK, dV), in rank order. Exact attention
/// has no small state (every query needs every key), so
/// - **forward:** every rank gathers the keys and values of all ranks (one all-gather of \f$[K, V]\f$) and computes
///   its own rows of O exactly: against all keys, or under the causal mask against keys \f$[0, s_p + n_p)\f$, where
///   its queries are the last positions (the exact backends' bottom-right causal mask,
///   detail::CausalQueries::last_positions);
/// - **backward:** every rank computes its rows of dQ and the contribution of its queries to dK and dV of every key
///   it saw; the contributions are summed, in double, and each rank keeps its own rows (one reduce-scatter of
///   \f$[dK, dV]\f$).
///
/// The cost is that of the serial method per rank: the causal rank P-1 does the most work. Per call the exchange
/// moves O(n d) numbers per rank (the polynomial methods: O(r d), independent of n). Results agree with the serial
/// pass up to the rounding of the dK, dV sums over ranks; each rank's O and dQ are bitwise those of the serial
/// method on the same keys.
///
/// \code
///   auto exchange = std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD);  // parallel/distributed.hpp
///   polyattn::GatheredKeysBackend<double> attention(
///       std::make_unique<polyattn::ExactBlockedBackend<double>>(options), exchange);
///   attention.forward(Q_rows, K_rows, V_rows, O_rows);  // this rank's rows
///   attention.backward(Q_rows, K_rows, V_rows, O_rows, G_rows, dQ_rows, dK_rows, dV_rows);
/// \endcode
#pragma once

#include "../attention/backend.hpp"
#include "../attention/exact_gradients.hpp"
#include "state_exchange.hpp"

#include <exception>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

namespace polyattn {

/// An exact backend (exact_reference or exact_blocked) made sequence parallel by gathering keys and values (see
/// the file documentation). Every call is collective over the exchange: all ranks call forward() and backward()
/// together, and an error on one rank makes every rank throw.
template <class T>
class GatheredKeysBackend final : public AttentionBackend<T> {
 public:
  /// Wraps `exact`, which must be an exact method; throws std::invalid_argument for a null or polynomial backend
  /// or a null exchange (not collective: every rank passes the same kind of arguments).
  GatheredKeysBackend(std::unique_ptr<AttentionBackend<T>> exact, std::shared_ptr<StateExchange> exchange);

  AttentionMethod method() const override { return exact_->method(); }
  const AttentionOptions& attention_options() const override { return exact_->attention_options(); }
  StateExchange* state_exchange() const { return exchange_.get(); }

  /// Writes this rank's rows of O; see the file documentation. Throws std::invalid_argument on every rank when
  /// any rank's arguments are invalid or a setting differs between ranks.
  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override;

  /// Writes this rank's rows of dQ, dK, dV (dK and dV summed over the ranks whose queries see these keys).
  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override;

  // The row-major calls through column-major copies (AttentionBackend's defaults).
  using AttentionBackend<T>::forward;
  using AttentionBackend<T>::backward;

 private:
  // What every rank must share: the head shape and the attention options.
  std::vector<StateExchange::Setting> settings(const detail::HeadShape& shape) const {
    const AttentionOptions& opt = attention_options();
    return {{"method", static_cast<double>(method())},
            {"heads", static_cast<double>(shape.heads)},
            {"head dimension d_k (columns of Q and K per head)", static_cast<double>(shape.dk)},
            {"head dimension d_v (columns of V per head)", static_cast<double>(shape.dv)},
            {"causal", opt.causal ? 1.0 : 0.0},
            {"scale", opt.resolved_scale(shape.dk)}};
  }

  // Keys this rank's queries see: all of them, or under the mask those up to its last position.
  Index visible_keys() const {
    if (!attention_options().causal) return total_rows_;
    return first_row_ + rows_per_rank_[static_cast<std::size_t>(exchange_->rank())];
  }

  std::unique_ptr<AttentionBackend<T>> exact_;
  std::shared_ptr<StateExchange> exchange_;
  std::vector<Index> rows_per_rank_;
  Index first_row_ = 0, total_rows_ = 0;
  detail::ForwardRecord forward_record_;
  Certificate certificate_;
  RowMajorMatrixXd local_, gathered_;  // [K, V] of this rank and of all ranks; then [dK, dV]
  Matrix<T> keys_, values_, key_grads_, value_grads_;
};

// Out of the class body so that they are not inline (extern_templates.hpp).
template <class T>
GatheredKeysBackend<T>::GatheredKeysBackend(std::unique_ptr<AttentionBackend<T>> exact,
                                            std::shared_ptr<StateExchange> exchange)
    : exact_(std::move(exact)), exchange_(std::move(exchange)) {
  constexpr const char* where = "polyattn::GatheredKeysBackend";
  detail::static_check_scalar<T>();
  detail::require(exact_ != nullptr, where, "argument 'exact' must not be null");
  detail::require(exchange_ != nullptr, where, "argument 'exchange' must not be null");
  const AttentionMethod m = exact_->method();
  detail::require(m == AttentionMethod::exact_reference || m == AttentionMethod::exact_blocked, where,
                  "argument 'exact' must be an exact method (exact_reference or exact_blocked), got '",
                  attention_method_name(m), "'");
}

template <class T>
Certificate GatheredKeysBackend<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                            const ConstMatrixRef<T>& V, MatrixRef<T> O) {
  constexpr const char* where = "polyattn::GatheredKeysBackend::forward";
  forward_record_.clear();
  detail::HeadShape shape{};
  std::exception_ptr failure;  // agree() makes every rank throw it
  try {
    shape = detail::check_shard_shapes(where, Q, K, V, attention_options());
    detail::require(Q.rows() == K.rows(), where, "every rank passes its own rows of one sequence, so 'Q' and 'K' must ",
                    "have the same number of rows, got ", Q.rows(), " and ", K.rows());
    detail::require_shape(where, "O", O, Q.rows(), V.cols());
    detail::require_finite(where, "K", K);
    detail::require_finite(where, "V", V);
  } catch (...) {
    failure = std::current_exception();
  }
  exchange_->agree(where, failure, settings(shape));
  rows_per_rank_ = exchange_->rows_per_rank(K.rows());
  const auto rank = static_cast<std::size_t>(exchange_->rank());
  first_row_ = std::accumulate(rows_per_rank_.begin(), rows_per_rank_.begin() + static_cast<std::ptrdiff_t>(rank),
                               Index(0));
  total_rows_ = std::accumulate(rows_per_rank_.begin(), rows_per_rank_.end(), Index(0));
  const Index key_cols = K.cols(), value_cols = V.cols();
  local_.resize(K.rows(), key_cols + value_cols);
  local_.leftCols(key_cols) = K.template cast<double>();
  local_.rightCols(value_cols) = V.template cast<double>();
  exchange_->all_gather_rows(local_, rows_per_rank_, gathered_);
  const Index seen = visible_keys();
  keys_ = gathered_.topLeftCorner(seen, key_cols).template cast<T>();
  values_ = gathered_.topRightCorner(seen, value_cols).template cast<T>();
  Certificate certificate = detail::exact_method_certificate();
  try {
    if (Q.rows() > 0) certificate = exact_->forward(Q, keys_, values_, O);
  } catch (...) {
    failure = std::current_exception();
  }
  exchange_->succeeded(where, failure);
  certificate_ = certificate;
  forward_record_.record(Q, K, V);
  return certificate_;
}

template <class T>
GradientCertificate GatheredKeysBackend<T>::backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                                     const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                                     const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                                     MatrixRef<T> dV) {
  constexpr const char* where = "polyattn::GatheredKeysBackend::backward";
  detail::check_backward_call<T>(
      where, attention_options(), exchange_.get(), forward_record_, Q, K, V, O, G, dQ, dK, dV,
      [&](const detail::HeadShape& s) { return settings(s); }, [](const detail::HeadShape&) {});
  const Index seen = visible_keys(), key_cols = K.cols(), value_cols = V.cols();
  GradientCertificate result;
  result.forward = certificate_;
  key_grads_.resize(seen, key_cols);
  value_grads_.resize(seen, value_cols);
  std::exception_ptr failure;  // succeeded() makes every rank throw it
  try {
    if (Q.rows() > 0) result = exact_->backward(Q, keys_, values_, O, G, dQ, key_grads_, value_grads_);
  } catch (...) {
    failure = std::current_exception();
  }
  exchange_->succeeded(where, failure);
  // Keys after this rank's last query (causal) get nothing from it; an empty shard contributes nothing at all.
  gathered_.setZero(total_rows_, key_cols + value_cols);
  if (Q.rows() > 0) {
    gathered_.topLeftCorner(seen, key_cols) = key_grads_.template cast<double>();
    gathered_.topRightCorner(seen, value_cols) = value_grads_.template cast<double>();
  }
  local_.resize(K.rows(), key_cols + value_cols);
  exchange_->reduce_scatter_rows(gathered_, rows_per_rank_, local_);
  dK = local_.leftCols(key_cols).template cast<T>();
  dV = local_.rightCols(value_cols).template cast<T>();
  return result;
}

}  // namespace polyattn
