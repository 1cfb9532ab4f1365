/// \file attention/adjoint_gradients.hpp
/// The adjoint method: the exact gradient of the polynomial attention forward pass in \f$O(nrd)\f$.
///
/// The forward pass is PolynomialAttention's (polynomial_attention.hpp): per head, with raw monomials
/// \f$M_Q = m(\sqrt c\,Q)\f$, \f$M_K = m(\sqrt c\,K)\f$ and weights \f$\omega\f$ (feature_map.hpp), so that
/// \f$M_Q\,\mathrm{diag}(\omega)M_K^\top = p(c\,QK^\top)\f$,
/// \f[ Z = \mathrm{diag}(\omega)M_K^\top[V, \mathbf 1] \in \mathbb R^{r\times(d_v+1)},\qquad
///     [N, \tilde D] = M_Q Z,\qquad \tilde O = \tilde D^{-1}N. \f]
/// The backward pass differentiates exactly this function (reverse-mode, "adjoint"), so it is the true
/// gradient of \f$\tilde O\f$, not an approximation of the exact attention gradient term by term (compare
/// paper_gradients.hpp). For \f$G = \partial L/\partial\tilde O\f$:
/// \f[ \partial N = \tilde D^{-1}G,\quad \partial\tilde D = -\tilde D^{-1}\mathrm{rowsum}(G\circ\tilde O),\quad
///     E = [\partial N, \partial\tilde D],\quad \partial M_Q = E Z^\top,\quad \partial Z = M_Q^\top E, \f]
/// \f[ Y = \mathrm{diag}(\omega)\,\partial Z,\quad \partial M_K = [V, \mathbf 1]\,Y^\top,\quad
///     \partial V = M_K Y_V, \f]
/// and \f$\partial Q, \partial K\f$ follow through FeatureMap::monomials_backward(): every degree-\f$t\f$
/// monomial is a degree-\f$(t-1)\f$ parent times one coordinate, so its backward is \f$O(r)\f$ per row.
/// Cost \f$O(nr(d_v+1))\f$ per head, the same order as the forward pass; features are generated chunk by
/// chunk, so beyond inputs and outputs the memory is \f$O(br + rd)\f$ for chunk size \f$b\f$ (plus the
/// forward pass's \f$n\f$ normalisers per head), never \f$O(nr)\f$.
///
/// **Causal mask.** Row chunk \f$s\f$ sees the earlier chunks through the prefix state
/// \f$Z^{<s}\f$ and itself through the masked block \f$B_s = \mathrm{tril}(p(S_s))\f$, \f$S_s = c\,Q_sK_s^\top\f$.
/// The backward pass is two scans:
/// - forward (prefix) scan: \f$\partial M_{Q,s} = E_s (Z^{<s})^\top\f$ gives \f$\partial Q\f$ from earlier chunks;
/// - reverse (suffix) scan with \f$Y^{>s} = \mathrm{diag}(\omega)\sum_{t>s}M_{Q,t}^\top E_t\f$:
///   \f$\partial M_{K,s} = [V_s,\mathbf 1](Y^{>s})^\top\f$, \f$\partial V_s = M_{K,s}Y^{>s}_V\f$;
/// - in the chunk, directly with \f$p\f$ and \f$p'\f$: \f$\partial S_s = \mathrm{tril}\big(E_s[V_s,\mathbf 1]^\top\big)
///   \circ p'(S_s)\f$, \f$\partial Q_s \mathrel{+}= c\,\partial S_sK_s\f$, \f$\partial K_s \mathrel{+}= c\,\partial S_s^\top Q_s\f$,
///   \f$\partial V_s \mathrel{+}= B_s^\top\partial N_s\f$.
///
/// **Gradient bound** (GradientCertificate). The adjoint gradient is, entry by entry,
/// \f$\partial S_{ij} = \tilde P'_{ij}(g_i^\top v_j - \tilde\kappa_i)\f$ with \f$\tilde P'_{ij} = p'(S_{ij})/\tilde D_i\f$ and
/// \f$\tilde\kappa = \mathrm{rowsum}(G\circ\tilde O)\f$, against the exact
/// \f$p_{ij} = P_{ij}(g_i^\top v_j - \kappa_i)\f$. Let \f$\varepsilon\f$ be the forward certificate's bound on
/// \f$|p(x)e^{-x} - 1|\f$ and \f$\varepsilon'\f$ the certified bound on \f$|p'(x)e^{-x} - 1|\f$ over the same interval
/// (for Taylor \f$p\f$, \f$p'\f$ is the degree-\f$(g-1)\f$ truncation). For \f$\varepsilon < 1\f$, with
/// \f$\delta = \frac{2\varepsilon}{1-\varepsilon}\f$, \f$\rho = \frac{1+\varepsilon}{1-\varepsilon}\f$:
/// \f$|\tilde P_{ij} - P_{ij}| \le \delta P_{ij}\f$, \f$P_{ij} \le \rho\tilde P_{ij}\f$ and
/// \f$|\tilde P'_{ij}/P_{ij} - 1| \le \frac{\varepsilon + \varepsilon'}{1-\varepsilon}\f$. With
/// \f$a = \max_i\|g_i\|_2\max_j\|v_j\|_2\f$ (so \f$|g_i^\top v_j|, |\kappa_i| \le a\f$ and
/// \f$|\tilde\kappa_i - \kappa_i| \le \delta a\f$) and \f$\sigma_j = (\tilde P^\top\mathbf 1)_j\f$ (computed in the backward pass),
/// \f[ \beta = \frac{2(\varepsilon+\varepsilon')}{1-\varepsilon} + \delta\,\frac{1+\varepsilon'}{1-\varepsilon},\qquad
///     \sum_j|\partial S_{ij} - p_{ij}| \le \beta a,\qquad \sum_i|\partial S_{ij} - p_{ij}| \le \beta a\rho\sigma_j, \f]
/// \f[ |\widetilde{dQ} - dQ| \le c\,\beta\,a\max|K|,\qquad |\widetilde{dK} - dK| \le c\,\beta\,a\,\rho\max|Q|\max_j\sigma_j,
///     \qquad |\widetilde{dV} - dV| = |(\tilde P - P)^\top G| \le \rho\,\delta\max|G|\max_j\sigma_j \f]
/// entrywise, per head (the certificate reports the maximum over heads), with or without the causal mask
/// (the sums then run over \f$j \le i\f$). They cover the polynomial approximation in exact arithmetic, not
/// floating-point rounding, and are \f$+\infty\f$ when the forward certificate is vacuous().
///
/// **Exact window** (PolynomialAttentionOptions::exact_window = w > 0). The forward pass weights the window's pairs
/// by \f$e^{s_{ij}}\f$ and the far ones by \f$p(s_{ij})\f$ (polynomial_attention.hpp); backward() is the exact gradient
/// of that function: with \f$A'_{ij} = e^{s_{ij}}\f$ on the window and \f$p'(s_{ij})\f$ elsewhere,
/// \f$\partial S = (\tilde D^{-1}A')\circ(GV^\top - \tilde\kappa\mathbf 1^\top)\f$ and \f$\partial V = \tilde P^\top G\f$ as
/// above. The far terms go through the states as without a window (with the per-row shift of the forward pass);
/// the window's pairs through direct tiles (polynomial_kernel.hpp). The bounds below hold unchanged with
/// \f$\varepsilon, \varepsilon'\f$ certified on the far radius: on a window pair \f$\tilde A = A\f$ and
/// \f$\tilde P'_{ij}/P_{ij} = D/\tilde D\f$, within both entrywise hypotheses.
///
/// **Why the gradient error exceeds the forward error.** \f$p_{ij} = P_{ij}(g_i^\top v_j - \kappa_i)\f$ is a
/// difference of nearly equal terms: \f$\kappa_i\f$ is the \f$P\f$-weighted mean of \f$g_i^\top v_j\f$, so
/// \f$dQ = c\,pK\f$ is a covariance-like quantity much smaller than its terms, while the errors of
/// \f$\tilde P\f$ multiply the uncentred terms. In addition the gradient sees \f$p'\f$, whose error
/// \f$\varepsilon'\f$ is one Taylor order worse than \f$\varepsilon\f$. Measured against exact attention (n = 4096,
/// d = 12, c = 1, \f$q,k\sim N(0,1)/\sqrt d\f$, \f$v, G\sim N(0,1)\f$, Taylor, non-causal, double), relative
/// Frobenius errors: g = 2: \f$\tilde O\f$ 3.3%, dQ 8.4%, dK 8.3%, dV 2.2%; g = 4: \f$\tilde O\f$ 0.17%, dQ 0.52%,
/// dK 0.51%, dV 0.11%.
///
/// **Prefix states are checkpointed.** The causal backward needs the prefix state \f$Z^{<s}\f$ of every chunk for
/// \f$\partial M_{Q,s}\f$. Recovering it as \f$Z - \sum_{t\ge s}\f$ would cost an absolute rounding error of order
/// \f$u\|Z\|\f$ in the early rows, so forward() keeps every \f$Z^{<s}\f$ (the forward scan computes them anyway):
/// \f$r(d_v+1)\f$ numbers per chunk and head, \f$(n/b)\,h\,r(d_v+1)\f$ in all (42 MB in float for n = 65536, 4 heads,
/// d = 16, g = 2, b = 64). Above PolynomialAttentionOptions::max_checkpoint_bytes (256 MiB by default; high degrees
/// at long contexts) it keeps nothing and backward() recomputes them window by window, the same sums in the same
/// order, so the gradient is bitwise the same, at the price of two more passes over the keys.
///
/// **Threads.** Forward and backward run on polyattn's threads through detail::PolynomialKernel
/// (polynomial_kernel.hpp): blocks of rows and scan chunks in parallel, partial states combined in block order,
/// so the result does not depend on the thread count. When the thread count divides the number of heads
/// (detail::head_threads()), whole heads run concurrently instead, one per thread, each with a kernel of its own.
///
/// **Sequence parallel.** With set_state_exchange() (or make_distributed_backend(), parallel/distributed.hpp)
/// every rank passes its own rows of Q, K, V, O, G and receives its rows of O, dQ, dK, dV. Besides the forward
/// pass's key states (polynomial_attention.hpp), the state gradient \f$Y\f$ is a sum over queries: without the
/// mask the ranks add their \f$Y\f$; under it each rank's suffix scan starts from the sum over the later ranks.
/// \f$\max_j\sigma_j\f$ and the norms in the bounds are taken over all ranks, so every rank returns the
/// certificate of the whole sequence. An error on one rank makes every rank throw.
///
/// \code
///   polyattn::PolynomialAttentionOptions opt;
///   opt.attention.causal = true;
///   opt.attention.heads = 2;
///   opt.degree = 2;
///   polyattn::AdjointBackend<float> attn(opt);
///   polyattn::Matrix<float> O(n, V.cols()), dQ(n, Q.cols()), dK(n, K.cols()), dV(n, V.cols());
///   polyattn::Certificate cert = attn.forward(Q, K, V, O);               // same O and certificate as
///                                                                        // PolynomialAttention
///   polyattn::GradientCertificate grad = attn.backward(Q, K, V, O, G, dQ, dK, dV);  // exact gradient of O
/// \endcode
#pragma once

#include "backend.hpp"
#include "exact_attention.hpp"
#include "feature_map.hpp"
#include "polynomial_attention.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace polyattn {

namespace detail {

/// The entrywise gradient bounds of the file documentation for one head, folded (by maximum) into `bounds`.
/// `eps`, `eps_derivative`: \f$\varepsilon, \varepsilon'\f$; `a` = \f$\max\|g_i\|\max\|v_j\|\f$; `column_sum` =
/// \f$\max_j\sigma_j\f$.
inline void fold_adjoint_bounds(double eps, double eps_derivative, double c, double a, double max_q, double max_k,
                                double max_g, double column_sum, GradientCertificate& bounds) {
  const double delta = 2 * eps / (1 - eps), rho = (1 + eps) / (1 - eps);
  const double beta = 2 * (eps + eps_derivative) / (1 - eps) + delta * (1 + eps_derivative) / (1 - eps);
  bounds.dq_bound = std::max(bounds.dq_bound, c * beta * a * max_k);
  bounds.dk_bound = std::max(bounds.dk_bound, c * beta * a * rho * max_q * column_sum);
  bounds.dv_bound = std::max(bounds.dv_bound, rho * delta * max_g * column_sum);
  bounds.dqk_bound = std::max(bounds.dq_bound, bounds.dk_bound);
}

}  // namespace detail

/// Polynomial attention whose backward() is the exact gradient of its forward() (see the file
/// documentation): \f$O(nrd)\f$ time forward and backward, causal by chunked prefix and suffix scans,
/// multi-head, float and double. Keeps its workspaces between calls.
///
/// forward() computes the same function and returns the same Certificate as PolynomialAttention::forward();
/// it saves the per-head normalisers (and, without the mask, the \f$r\times(d_v+1)\f$ key states) that
/// backward() needs. backward() must be called with the Q, K, V of the last forward() and the O it wrote;
/// it overwrites dQ, dK, dV.
///
/// \code
///   polyattn::PolynomialAttentionOptions opt;
///   opt.degree = 4;
///   polyattn::AdjointBackend<double> attn(opt);
///   attn.forward(Q, K, V, O);
///   polyattn::GradientCertificate grad = attn.backward(Q, K, V, O, G, dQ, dK, dV);
///   // grad.dv_bound bounds every |dV - dV_exact| entry unless grad.forward.vacuous()
/// \endcode
template <class T>
class AdjointBackend final : public AttentionBackend<T> {
 public:
  explicit AdjointBackend(PolynomialAttentionOptions options = {}) : attention_(std::move(options)) {}

  /// Makes the next forward() and backward() calls sequence parallel: every argument is this rank's rows, and
  /// every rank of `exchange` must make the same calls with the same options (see the file documentation). Null
  /// restores the serial passes. Call it before forward(): a backward() pairs with the forward() before it.
  void set_state_exchange(std::shared_ptr<StateExchange> exchange) {
    attention_.set_state_exchange(std::move(exchange));
    forward_record_.clear();
  }
  /// The exchange set by set_state_exchange() (null: serial).
  StateExchange* state_exchange() const { return attention_.state_exchange(); }

  AttentionMethod method() const override { return AttentionMethod::adjoint; }
  const AttentionOptions& attention_options() const override { return options().attention; }
  const PolynomialAttentionOptions& options() const { return attention_.options(); }

  /// Whether the last forward() kept its prefix states for backward() (always true without the mask; causal,
  /// when they fit PolynomialAttentionOptions::max_checkpoint_bytes).
  bool checkpointed() const { return saved_.checkpointed; }

  /// Feature map of the last forward() call.
  const FeatureMap<T>& feature_map() const { return attention_.feature_map(); }

  /// Writes \f$\tilde O\f$ (n x h d_v), bitwise the output of PolynomialAttention::forward() (it is that pass),
  /// and returns its certificate; keeps the normalisers and key states backward() needs. Throws as
  /// PolynomialAttention::forward() does, naming AdjointBackend::forward.
  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override;

  /// Writes the exact gradient of forward()'s \f$\tilde O\f$: dQ (n x h d_k), dK (m x h d_k), dV (m x h d_v)
  /// for G = dL/d\f$\tilde O\f$, and the bounds on their distance to the exact attention gradient. Throws
  /// std::invalid_argument for bad shapes, non-finite O or G, or no preceding forward(); std::domain_error when
  /// finite input overflows T. With a state exchange an error on one rank makes every rank throw.
  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override;

  /// forward() and backward() on row-major matrices, read and written in place (attention/head_rows.hpp): the
  /// results are bitwise those of the column-major calls. A backward() pairs with the forward() before it in
  /// either storage order.
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
  // The part of backward() after the checks: the kernel over the heads and the bounds. `maxima` holds per head
  // max |g_i|, max |v_j|, max |Q|, max |K|, max |G| (over all ranks with an exchange; nothing when the certificate is
  // vacuous). With `measure_inputs` (serially, without an exact window) it is empty: the kernel takes them from the
  // blocks it reads, and the result is empty when an input is not finite or the kernel threw, so that backward()
  // redoes the call on the checked path, which names the cause.
  template <class In, class Out>
  std::optional<GradientCertificate> backward_heads(const char* where, const detail::HeadShape& shape, const In& Q,
                                                    const In& K, const In& V, const In& O, const In& G, Out& dQ,
                                                    Out& dK, Out& dV, const std::vector<double>& maxima,
                                                    bool measure_inputs);

  PolynomialAttention<T> attention_;
  typename PolynomialAttention<T>::Saved saved_;
  Certificate certificate_;
  double derivative_error_ = std::numeric_limits<double>::infinity();
  detail::ForwardRecord forward_record_;
};


// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the backend again.
template <class T>
Certificate AdjointBackend<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                       const ConstMatrixRef<T>& V, MatrixRef<T> O) {
  return forward_any(Q, K, V, O);
}

template <class T>
Certificate AdjointBackend<T>::forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                       const ConstRowMajorRef<T>& V, RowMajorRef<T> O) {
  return forward_any(Q, K, V, O);
}

template <class T>
GradientCertificate AdjointBackend<T>::backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                                const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                                const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                                MatrixRef<T> dV) {
  return backward_any(Q, K, V, O, G, dQ, dK, dV);
}

template <class T>
GradientCertificate AdjointBackend<T>::backward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                                const ConstRowMajorRef<T>& V, const ConstRowMajorRef<T>& O,
                                                const ConstRowMajorRef<T>& G, RowMajorRef<T> dQ, RowMajorRef<T> dK,
                                                RowMajorRef<T> dV) {
  return backward_any(Q, K, V, O, G, dQ, dK, dV);
}

template <class T>
template <class In, class Out>
Certificate AdjointBackend<T>::forward_any(const In& Q, const In& K, const In& V, Out& O) {
  forward_record_.clear();
  certificate_ = attention_.forward(Q, K, V, O, "polyattn::AdjointBackend::forward", &saved_);
  derivative_error_ = certify_exp(attention_.map_poly_.derivative(), certificate_.interval).relative_error;
  forward_record_.record(Q, K, V);
  return certificate_;
}

template <class T>
template <class In, class Out>
GradientCertificate AdjointBackend<T>::backward_any(const In& Q, const In& K, const In& V, const In& O, const In& G,
                                                    Out& dQ, Out& dK, Out& dV) {
  constexpr const char* where = "polyattn::AdjointBackend::backward";
  const AttentionOptions& opt = options().attention;
  StateExchange* const exchange = attention_.state_exchange();
  if (!exchange && options().exact_window == 0) {
    // The input passes of the bounds and checks (5 of 16 MiB each at n = 2^18, d = 16) cost 2-3% of a backward
    // call; the kernel takes the same maxima from the blocks it has in cache.
    const detail::HeadShape shape = detail::check_backward_shapes<T, In, Out>(where, opt, Q, K, V, O, G, dQ, dK, dV);
    forward_record_.require_same(where, Q, K, V);
    std::optional<GradientCertificate> result;
    try {
      result = backward_heads(where, shape, Q, K, V, O, G, dQ, dK, dV, {}, true);
    } catch (...) {
      // Whatever failed, the checked path below fails the same way, after the input checks that name a cause.
    }
    if (result) return *result;
  }
  // Per head, the largest |g_i|, |v_j|, |Q|, |K|, |G| of the bounds (over all ranks with an exchange).
  // Needed for the bounds only, but with an exchange always: every rank takes part in their reduction.
  std::vector<double> maxima;
  const auto measure_heads = [&](const detail::HeadShape& s) {
    for (Index h = 0; h < s.heads; ++h) {
      const detail::RowStatistics g = detail::row_statistics(G.middleCols(h * s.dv, s.dv));
      maxima.insert(maxima.end(), {g.max_row_norm, detail::max_row_norm(V.middleCols(h * s.dv, s.dv)),
                                   detail::max_abs(Q.middleCols(h * s.dk, s.dk)),
                                   detail::max_abs(K.middleCols(h * s.dk, s.dk)), g.max_abs});
    }
  };
  detail::HeadShape shape;
  if (!exchange && !certificate_.vacuous()) {
    // The passes of the bounds find any non-finite entry of Q, K, V, G (as NaN or inf), so these inputs are read
    // once, not also by the finite checks, which run only to name the entry: 5 passes instead of 9.
    shape = detail::check_backward_shapes<T, In, Out>(where, opt, Q, K, V, O, G, dQ, dK, dV);
    measure_heads(shape);
    if (!std::all_of(maxima.begin(), maxima.end(), [](double x) { return std::isfinite(x); }))
      detail::require_finite_backward_inputs(where, Q, K, V, O, G);
    detail::require_finite_in_parallel(where, "O", O);
    forward_record_.require_same(where, Q, K, V);
  } else {
    shape = detail::check_backward_call<T, In, Out>(
        where, opt, exchange, forward_record_, Q, K, V, O, G, dQ, dK, dV,
        [&](const detail::HeadShape& s) { return attention_.shard_settings(s); },
        [&](const detail::HeadShape& s) {
          if (exchange) measure_heads(s);
        });
  }
  if (exchange) exchange->maxima_over_ranks(maxima);
  return *backward_heads(where, shape, Q, K, V, O, G, dQ, dK, dV, maxima, false);
}

template <class T>
template <class In, class Out>
std::optional<GradientCertificate> AdjointBackend<T>::backward_heads(const char* where, const detail::HeadShape& shape,
                                                                     const In& Q, const In& K, const In& V,
                                                                     const In& O, const In& G, Out& dQ, Out& dK,
                                                                     Out& dV, const std::vector<double>& maxima,
                                                                     bool measure_inputs) {
  const AttentionOptions& opt = options().attention;
  StateExchange* const exchange = attention_.state_exchange();
  constexpr std::size_t per_head = 5;
  const double eps = certificate_.poly_error;
  GradientCertificate result;
  result.forward = certificate_;
  result.derivative_error = derivative_error_;
  const Index dk = shape.dk, dv = shape.dv;
  const Index state_cols = saved_.states.cols() / shape.heads;
  const Index incoming_cols = saved_.incoming_states.cols() / shape.heads;
  std::exception_ptr failure;  // with an exchange, thrown on every rank by succeeded() after the last exchange
  try {
    std::vector<double> column_sums(static_cast<std::size_t>(shape.heads));  // per head, the largest column sum of P~
    const double work = static_cast<double>(Q.rows()) * static_cast<double>(shape.heads) *
                        static_cast<double>(attention_.map_->width()) * static_cast<double>(dv + 2);
    const auto reports = attention_.for_each_head(shape.heads, work, [&](Index h, detail::PolynomialKernel<T>& kernel) {
      column_sums[static_cast<std::size_t>(h)] = kernel.backward(
          detail::head_rows(Q.middleCols(h * dk, dk)), detail::head_rows(K.middleCols(h * dk, dk)),
          detail::head_rows(V.middleCols(h * dv, dv)), detail::head_rows(O.middleCols(h * dv, dv)),
          detail::head_rows(G.middleCols(h * dv, dv)), saved_.normalisers.col(h), saved_.shifts.col(h),
          saved_.states.middleCols(h * state_cols, state_cols),
          saved_.incoming_states.middleCols(h * incoming_cols, incoming_cols),
          detail::head_output(dQ.middleCols(h * dk, dk)), detail::head_output(dK.middleCols(h * dk, dk)),
          detail::head_output(dV.middleCols(h * dv, dv)), measure_inputs);
    });
    const bool gradients_finite = attention_.all_heads_finite(reports);
    for (Index h = 0; h < shape.heads; ++h) {
      const double column_sum = column_sums[static_cast<std::size_t>(h)];
      std::array<double, per_head> head{};
      if (measure_inputs) {
        // As measure_heads() in backward_any() finds them; the largest |O| only tells that O is finite.
        const auto& inputs = reports[static_cast<std::size_t>(h)].inputs;
        head = {std::sqrt(inputs.max_gradient_norm2), std::sqrt(inputs.max_value_norm2), inputs.max_abs_query,
                inputs.max_abs_key, inputs.max_abs_gradient};
        if (!std::all_of(head.begin(), head.end(), [](double x) { return std::isfinite(x); }) ||
            !std::isfinite(inputs.max_abs_output))
          return {};
      } else if (!certificate_.vacuous()) {
        std::copy_n(maxima.begin() + static_cast<std::ptrdiff_t>(per_head * static_cast<std::size_t>(h)), per_head,
                    head.begin());
      }
      if (!certificate_.vacuous())
        detail::fold_adjoint_bounds(eps, derivative_error_, attention_.map_->scale(), head[0] * head[1], head[2],
                                    head[3], head[4], column_sum, result);
    }
    if (!gradients_finite) detail::check_backward_results<T, In, Out>(where, opt, shape, Q, K, V, G, dQ, dK, dV);
  } catch (...) {
    if (!exchange) throw;
    failure = std::current_exception();
  }
  if (exchange) exchange->succeeded(where, failure);
  if (certificate_.vacuous()) {
    const double infinity = std::numeric_limits<double>::infinity();
    result.dq_bound = result.dk_bound = result.dqk_bound = result.dv_bound = infinity;
  }
  return result;
}

}  // namespace polyattn
