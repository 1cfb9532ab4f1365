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
/// **Why the gradient error exceeds the forward error.** \f$p_{ij} = P_{ij}(g_i^\top v_j - \kappa_i)\f$ is a
/// difference of nearly equal terms: \f$\kappa_i\f$ is the \f$P\f$-weighted mean of \f$g_i^\top v_j\f$, so
/// \f$dQ = c\,pK\f$ is a covariance-like quantity much smaller than its terms, while the errors of
/// \f$\tilde P\f$ multiply the uncentred terms. In addition the gradient sees \f$p'\f$, whose error
/// \f$\varepsilon'\f$ is one Taylor order worse than \f$\varepsilon\f$. Measured against exact attention (n = 4096,
/// d = 12, c = 1, \f$q,k\sim N(0,1)/\sqrt d\f$, \f$v, G\sim N(0,1)\f$, Taylor, non-causal, double), relative
/// Frobenius errors: g = 2: \f$\tilde O\f$ 3.3%, dQ 8.4%, dK 8.3%, dV 2.2%; g = 4: \f$\tilde O\f$ 0.17%, dQ 0.52%,
/// dK 0.51%, dV 0.11%.
///
/// **Prefix states are checkpointed.** The causal backward runs one suffix scan, last chunk to first, and needs
/// the prefix state \f$Z^{<s}\f$ of every chunk for \f$\partial M_{Q,s}\f$. Recovering it as
/// \f$Z - \sum_{t\ge s}\f$ would cost an absolute rounding error of order \f$u\|Z\|\f$ in the early rows (relative
/// \f$\sim u\,n/s\f$ for chunk start s, by estimate 1e-4 in float for the first chunks at n = 65536), so forward()
/// stores every \f$Z^{<s}\f$: \f$r(d_v+1)\f$ numbers per chunk and head, \f$(n/b)\,h\,r(d_v+1)\f$ in all
/// (42 MB in float for n = 65536, 4 heads, d = 16, g = 2, b = 64). Above set_max_checkpoint_bytes() (256 MiB by default; high degrees at
/// long contexts) it stores nothing and backward() recomputes the states by a prefix scan instead, at the price
/// of one more feature expansion of every key and query and one more state product per chunk.
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
#include <cstddef>
#include <limits>
#include <memory>
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
  /// Default of set_max_checkpoint_bytes(): 256 MiB.
  static constexpr std::size_t default_max_checkpoint_bytes = std::size_t(256) << 20;

  explicit AdjointBackend(PolynomialAttentionOptions options = {})
      : options_(std::move(options)), exact_(options_.attention) {
    detail::static_check_scalar<T>();
    options_.check();
  }

  AttentionMethod method() const override { return AttentionMethod::adjoint; }
  const AttentionOptions& attention_options() const override { return options_.attention; }

  /// Largest memory the causal forward() may spend on prefix-state checkpoints (see the file documentation);
  /// when they would need more, backward() recomputes them instead. Takes effect at the next forward().
  void set_max_checkpoint_bytes(std::size_t bytes) { max_checkpoint_bytes_ = bytes; }
  /// Whether the last causal forward() stored its prefix states (always true without the mask).
  bool checkpointed() const { return checkpointed_; }
  const PolynomialAttentionOptions& options() const { return options_; }

  /// Feature map of the last forward() call.
  const FeatureMap<T>& feature_map() const {
    detail::require(map_ != nullptr, "polyattn::AdjointBackend::feature_map", "call forward() first");
    return *map_;
  }

  /// Writes \f$\tilde O\f$ (n x h d_v) and returns its certificate. Throws std::invalid_argument for bad
  /// shapes or non-finite input, std::domain_error when the measured radius exceeds the interval under
  /// RangePolicy::throw_error or when an approximate normaliser is not positive.
  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override {
    constexpr const char* where = "polyattn::AdjointBackend::forward";
    const auto shape = detail::check_qkv(where, Q, K, V, options_.attention);
    detail::check_forward_output(where, shape, Q, K, V, O);
    has_forward_ = false;
    const double c = options_.attention.resolved_scale(shape.dk);
    const double radius = detail::score_radius(Q, K, shape, c);  // in double: finite for any finite float input
    certificate_ = prepare(where, shape.dk, c, radius);
    const Index r = map_->width(), dv = shape.dv;
    normalisers_.resize(shape.n, shape.heads);
    const Index chunks = options_.attention.causal ? causal_chunks(shape.n) : 1;
    const double state_bytes = static_cast<double>(sizeof(T)) * static_cast<double>(r) *
                               static_cast<double>(shape.heads * chunks * (dv + 1));
    checkpointed_ = !options_.attention.causal || state_bytes <= static_cast<double>(max_checkpoint_bytes_);
    if (checkpointed_) states_.resize(r, shape.heads * chunks * (dv + 1));
    for (Index h = 0; h < shape.heads; ++h) {
      const ConstMatrixRef<T> Qh = Q.middleCols(h * shape.dk, shape.dk);
      const ConstMatrixRef<T> Kh = K.middleCols(h * shape.dk, shape.dk);
      const ConstMatrixRef<T> Vh = V.middleCols(h * dv, dv);
      MatrixRef<T> Oh = O.middleCols(h * dv, dv);
      if (options_.attention.causal)
        forward_causal(Qh, Kh, Vh, Oh, h);
      else
        forward_full(Qh, Kh, Vh, Oh, h);
    }
    detail::require_finite_result(where, "the output", O, [&] {
      return detail::polynomial_overflow_cause<T>(V, poly_.degree(), radius);
    });
    certificate_.output_bound =
        detail::apriori_output_bound(certificate_.poly_error, static_cast<double>(V.cwiseAbs().maxCoeff()));
    if (options_.estimate_error) estimate(Q, K, V, O, certificate_);
    forward_shape_ = {Q.rows(), K.rows(), Q.cols(), V.cols()};
    has_forward_ = true;
    return certificate_;
  }

  /// Writes the exact gradient of forward()'s \f$\tilde O\f$: dQ (n x h d_k), dK (m x h d_k), dV (m x h d_v)
  /// for G = dL/d\f$\tilde O\f$, and the bounds on their distance to the exact attention gradient. Throws
  /// std::invalid_argument for bad shapes, non-finite O or G, or no preceding forward().
  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override {
    constexpr const char* where = "polyattn::AdjointBackend::backward";
    const auto shape = detail::check_backward_arguments<T>(where, options_.attention, Q, K, V, O, G, dQ, dK, dV);
    detail::require_same_forward<T>(where, has_forward_, forward_shape_, Q, K, V);

    const double eps = certificate_.poly_error;
    GradientCertificate result;
    result.forward = certificate_;
    result.derivative_error = derivative_error_;
    for (Index h = 0; h < shape.heads; ++h) {
      const ConstMatrixRef<T> Qh = Q.middleCols(h * shape.dk, shape.dk);
      const ConstMatrixRef<T> Kh = K.middleCols(h * shape.dk, shape.dk);
      const ConstMatrixRef<T> Vh = V.middleCols(h * shape.dv, shape.dv);
      const ConstMatrixRef<T> Oh = O.middleCols(h * shape.dv, shape.dv);
      const ConstMatrixRef<T> Gh = G.middleCols(h * shape.dv, shape.dv);
      MatrixRef<T> dQh = dQ.middleCols(h * shape.dk, shape.dk);
      MatrixRef<T> dKh = dK.middleCols(h * shape.dk, shape.dk);
      MatrixRef<T> dVh = dV.middleCols(h * shape.dv, shape.dv);
      const double column_sum = options_.attention.causal ? backward_causal(Qh, Kh, Vh, Oh, Gh, dQh, dKh, dVh, h)
                                                          : backward_full(Qh, Kh, Vh, Oh, Gh, dQh, dKh, dVh, h);
      if (!certificate_.vacuous())
        detail::fold_adjoint_bounds(eps, derivative_error_, map_->scale(),
                                    detail::max_row_norm(Gh) * detail::max_row_norm(Vh),
                                    static_cast<double>(Qh.cwiseAbs().maxCoeff()),
                                    static_cast<double>(Kh.cwiseAbs().maxCoeff()),
                                    static_cast<double>(Gh.cwiseAbs().maxCoeff()), column_sum, result);
    }
    detail::check_backward_results<T>(where, options_.attention, shape, Q, K, V, G, dQ, dK, dV);
    if (certificate_.vacuous()) {
      const double infinity = std::numeric_limits<double>::infinity();
      result.dq_bound = result.dk_bound = result.dqk_bound = result.dv_bound = infinity;
    }
    return result;
  }

 private:
  // Applies the range policy and (re)builds the feature map when degree, interval or shape changed.
  Certificate prepare(const char* where, Index dk, double c, double radius) {
    detail::PolynomialChoice choice = detail::choose_polynomial(where, options_, radius);
    if (!map_ || map_->dim() != dk || map_->scale() != c || poly_.coeffs != choice.poly.coeffs) {
      map_ = detail::make_feature_map<T>(where, options_, dk, choice.poly, c);
      poly_ = choice.poly;
      derivative_ = poly_.derivative();
    }
    derivative_error_ = certify_exp(derivative_, choice.cert.interval).relative_error;
    choice.cert.features = map_->width();
    return choice.cert;
  }

  Index chunk_rows(Index n) const {
    if (options_.chunk_size > 0) return std::min(options_.chunk_size, n);
    // The in-chunk block costs O(b d) per row against O(r d) for the state products.
    if (options_.attention.causal) return std::min<Index>(64, n);
    // A chunk of monomials and their gradients (2 x rows x r) near 2 MiB: GEMM-shaped, still cache-friendly.
    const Index rows = (Index(1) << 20) / (static_cast<Index>(sizeof(T)) * map_->width());
    return std::min(n, std::clamp<Index>(rows, 64, 2048));
  }

  // Number of causal scan chunks of n rows (the last may be partial).
  Index causal_chunks(Index n) const {
    const Index b = chunk_rows(n);
    return (n + b - 1) / b;
  }

  // Sizes every chunk workspace for `rows` rows once per head; chunks use their top rows, so a short last
  // chunk does not reallocate (and page-fault) megabytes per call.
  void reserve_chunks(Index rows, Index dk, Index dv) {
    const Index r = map_->width();
    scaled_queries_.resize(rows, dk);
    scaled_keys_.resize(rows, dk);
    monomials_.resize(rows, r);
    monomial_grads_.resize(rows, r);
    values_.resize(rows, dv + 1);
    products_.resize(rows, dv + 2);
    adjoints_.resize(rows, dv + 2);
    inverse_normalisers_.resize(rows);
    if (options_.attention.causal) {
      block_.resize(rows, rows);
      block_value_.resize(rows, rows);
      derivative_block_.resize(rows, rows);
      score_grads_.resize(rows, rows);
      column_sums_.resize(rows);
    }
  }

  // The first `rows` rows of a chunk workspace.
  static auto top(Matrix<T>& workspace, Index rows) { return workspace.topRows(rows); }

  // Monomials of a chunk of rows into the top of monomials_; the top of `scaled` receives sqrt(c) X.
  void expand(const ConstMatrixRef<T>& X, Matrix<T>& scaled) {
    map_->monomials(X, top(scaled, X.rows()), top(monomials_, X.rows()));
  }

  // Top of values_ = [V_b, 1].
  void load_values(const ConstMatrixRef<T>& Vb) {
    auto values = top(values_, Vb.rows());
    values.leftCols(Vb.cols()) = Vb;
    values.col(Vb.cols()).setOnes();
  }

  // Divides the top of products_ (N and the normaliser column) into Ob and saves the normalisers.
  void normalise(MatrixRef<T> Ob, Index first_row, Index head) {
    const Index dv = Ob.cols();
    const auto products = top(products_, Ob.rows());
    const auto denominators = products.col(dv);
    if (!((denominators.array() > 0).all() && denominators.allFinite()))
      for (Index i = 0; i < denominators.size(); ++i)
        if (!(denominators(i) > 0) || !std::isfinite(static_cast<double>(denominators(i))))
          throw std::domain_error(detail::bad_normaliser_message(
              "polyattn::AdjointBackend::forward", first_row + i, static_cast<double>(denominators(i)),
              poly_.degree(), certificate_.radius, sizeof(T) == sizeof(float) ? "float" : "double"));
    normalisers_.col(head).segment(first_row, Ob.rows()) = denominators;
    Ob.noalias() = denominators.cwiseInverse().asDiagonal() * products.leftCols(dv);
  }

  void forward_full(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                    MatrixRef<T> Oh, Index head) {
    const Index dv = Vh.cols(), m = Kh.rows(), n = Qh.rows();
    const Index b = chunk_rows(std::max(n, m));
    reserve_chunks(b, Qh.cols(), dv);
    auto state = states_.middleCols(head * (dv + 1), dv + 1);
    state.setZero();
    for (Index k0 = 0; k0 < m; k0 += b) {
      const Index rows = std::min(b, m - k0);
      expand(Kh.middleRows(k0, rows), scaled_keys_);
      load_values(Vh.middleRows(k0, rows));
      state.noalias() += top(monomials_, rows).transpose() * top(values_, rows);
    }
    state = map_->weights().asDiagonal() * state;
    for (Index q0 = 0; q0 < n; q0 += b) {
      const Index rows = std::min(b, n - q0);
      expand(Qh.middleRows(q0, rows), scaled_queries_);
      top(products_, rows).leftCols(dv + 1).noalias() = top(monomials_, rows) * state;
      normalise(Oh.middleRows(q0, rows), q0, head);
    }
  }

  // Top of adjoints_ = [G/D, -rowsum(G o O)/D, 1/D] for one chunk (the last column gives the column sums of P~).
  void load_adjoints(const ConstMatrixRef<T>& Gb, const ConstMatrixRef<T>& Ob, Index first_row, Index head) {
    const Index dv = Gb.cols(), rows = Gb.rows();
    auto inverse = inverse_normalisers_.head(rows);
    auto adjoints = top(adjoints_, rows);
    inverse = normalisers_.col(head).segment(first_row, rows).cwiseInverse();
    adjoints.leftCols(dv).noalias() = inverse.asDiagonal() * Gb;
    adjoints.col(dv) = -Gb.cwiseProduct(Ob).rowwise().sum().cwiseProduct(inverse);
    adjoints.col(dv + 1) = inverse;
  }

  // Adds to dQb the query gradient through a key state Z (r x (d_v+1)): M'_Q = [G/D, -kappa/D] Z^T, pulled
  // back through the monomials; uses the query monomials, scaled queries and adjoints of the current chunk.
  void add_query_grads_through(const Eigen::Ref<const Matrix<T>>& state, MatrixRef<T> dQb) {
    const Index rows = dQb.rows(), dv = state.cols() - 1;
    auto monomial_grads = top(monomial_grads_, rows);
    monomial_grads.noalias() = top(adjoints_, rows).leftCols(dv + 1) * state.transpose();
    map_->monomials_backward(monomial_grads, top(scaled_queries_, rows), top(monomials_, rows), dQb);
  }

  // Z^{<s} of chunk `chunk` of `head` in states_ (causal, checkpointed).
  auto checkpoint(Index head, Index chunk, Index chunks, Index dv) {
    return states_.middleCols((head * chunks + chunk) * (dv + 1), dv + 1);
  }

  double backward_full(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                       const ConstMatrixRef<T>& Oh, const ConstMatrixRef<T>& Gh, MatrixRef<T> dQh, MatrixRef<T> dKh,
                       MatrixRef<T> dVh, Index head) {
    const Index dv = Vh.cols(), m = Kh.rows(), n = Qh.rows();
    const Index b = chunk_rows(std::max(n, m));
    reserve_chunks(b, Qh.cols(), dv);
    const auto state = states_.middleCols(head * (dv + 1), dv + 1);
    state_grads_.setZero(map_->width(), dv + 2);
    for (Index q0 = 0; q0 < n; q0 += b) {
      const Index rows = std::min(b, n - q0);
      expand(Qh.middleRows(q0, rows), scaled_queries_);
      load_adjoints(Gh.middleRows(q0, rows), Oh.middleRows(q0, rows), q0, head);
      state_grads_.noalias() += top(monomials_, rows).transpose() * top(adjoints_, rows);
      auto dQb = dQh.middleRows(q0, rows);
      dQb.setZero();
      add_query_grads_through(state, dQb);
    }
    state_grads_ = map_->weights().asDiagonal() * state_grads_;
    double column_sum = 0;
    for (Index k0 = 0; k0 < m; k0 += b) {
      const Index rows = std::min(b, m - k0);
      expand(Kh.middleRows(k0, rows), scaled_keys_);
      load_values(Vh.middleRows(k0, rows));
      const auto monomials = top(monomials_, rows);
      auto monomial_grads = top(monomial_grads_, rows);
      auto products = top(products_, rows);
      monomial_grads.noalias() = top(values_, rows) * state_grads_.leftCols(dv + 1).transpose();
      // One product for dV and the column sums of P~; its column dv (M_K times the normaliser adjoint) is unused.
      products.noalias() = monomials * state_grads_;
      dVh.middleRows(k0, rows) = products.leftCols(dv);
      column_sum = std::max(column_sum, static_cast<double>(products.col(dv + 1).maxCoeff()));
      auto dKb = dKh.middleRows(k0, rows);
      dKb.setZero();
      map_->monomials_backward(monomial_grads, top(scaled_keys_, rows), monomials, dKb);
    }
    return column_sum;
  }

  // Top-left rows x rows of block_ = tril(p(S)) for S = sqrt(c)Q_s (sqrt(c)K_s)^T from the tops of
  // scaled_queries_ and scaled_keys_; with `with_derivative`, derivative_block_ = p'(S) likewise.
  void in_chunk_block(Index rows, bool with_derivative) {
    auto block = block_.topLeftCorner(rows, rows);
    auto value = block_value_.topLeftCorner(rows, rows);
    auto derivative = derivative_block_.topLeftCorner(rows, rows);
    block.noalias() = top(scaled_queries_, rows) * top(scaled_keys_, rows).transpose();
    const std::vector<double>& a = poly_.coeffs;
    value.setConstant(static_cast<T>(a.back()));
    if (with_derivative) derivative.setZero();
    for (std::size_t t = a.size() - 1; t-- > 0;) {
      if (with_derivative) derivative.array() = derivative.array() * block.array() + value.array();
      value.array() = value.array() * block.array() + static_cast<T>(a[t]);
    }
    block = value;
    block.template triangularView<Eigen::StrictlyUpper>().setZero();
  }

  void forward_causal(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                      MatrixRef<T> Oh, Index head) {
    const Index r = map_->width(), dv = Vh.cols(), n = Qh.rows();
    const T sqrt_c = static_cast<T>(std::sqrt(map_->scale()));
    const Index b = chunk_rows(n);
    reserve_chunks(b, Qh.cols(), dv);
    const Index chunks = causal_chunks(n);
    causal_state_.setZero(r, dv + 1);
    for (Index s = 0; s < n; s += b) {
      const Index rows = std::min(b, n - s);
      const auto monomials = top(monomials_, rows);
      const auto values = top(values_, rows);
      auto products = top(products_, rows).leftCols(dv + 1);
      if (checkpointed_) checkpoint(head, s / b, chunks, dv) = causal_state_;
      expand(Qh.middleRows(s, rows), scaled_queries_);
      load_values(Vh.middleRows(s, rows));
      products.noalias() = monomials * causal_state_;
      top(scaled_keys_, rows).noalias() = sqrt_c * Kh.middleRows(s, rows);
      in_chunk_block(rows, false);
      products.noalias() += block_.topLeftCorner(rows, rows).template triangularView<Eigen::Lower>() * values;
      normalise(Oh.middleRows(s, rows), s, head);
      expand(Kh.middleRows(s, rows), scaled_keys_);
      chunk_state_.noalias() = monomials.transpose() * values;
      causal_state_.noalias() += map_->weights().asDiagonal() * chunk_state_;
    }
  }

  double backward_causal(const ConstMatrixRef<T>& Qh, const ConstMatrixRef<T>& Kh, const ConstMatrixRef<T>& Vh,
                         const ConstMatrixRef<T>& Oh, const ConstMatrixRef<T>& Gh, MatrixRef<T> dQh, MatrixRef<T> dKh,
                         MatrixRef<T> dVh, Index head) {
    const Index r = map_->width(), dv = Vh.cols(), n = Qh.rows();
    const T sqrt_c = static_cast<T>(std::sqrt(map_->scale()));
    const Index b = chunk_rows(n);
    reserve_chunks(b, Qh.cols(), dv);
    const Index chunks = causal_chunks(n);
    // Without checkpoints, a prefix scan recomputes Z^{<s} and takes dQ from the earlier chunks through it.
    if (!checkpointed_) {
      causal_state_.setZero(r, dv + 1);
      for (Index s = 0; s < n; s += b) {
        const Index rows = std::min(b, n - s);
        expand(Qh.middleRows(s, rows), scaled_queries_);
        load_adjoints(Gh.middleRows(s, rows), Oh.middleRows(s, rows), s, head);
        auto dQb = dQh.middleRows(s, rows);
        dQb.setZero();
        add_query_grads_through(causal_state_, dQb);
        expand(Kh.middleRows(s, rows), scaled_keys_);
        load_values(Vh.middleRows(s, rows));
        chunk_state_.noalias() = top(monomials_, rows).transpose() * top(values_, rows);
        causal_state_.noalias() += map_->weights().asDiagonal() * chunk_state_;
      }
    }
    // Suffix scan: dK, dV from the later chunks through Y^{>s}, dQ from the earlier ones through the checkpoint
    // Z^{<s}, then the chunk's own block.
    state_grads_.setZero(r, dv + 2);
    double column_sum = 0;
    for (Index s = ((n - 1) / b) * b; s >= 0; s -= b) {
      const Index rows = std::min(b, n - s);
      const auto monomials = top(monomials_, rows);
      const auto values = top(values_, rows);
      const auto adjoints = top(adjoints_, rows);
      const auto block = block_.topLeftCorner(rows, rows);
      auto monomial_grads = top(monomial_grads_, rows);
      auto products = top(products_, rows);
      auto score_grads = score_grads_.topLeftCorner(rows, rows);
      auto column_sums = column_sums_.head(rows);
      auto dQb = dQh.middleRows(s, rows);
      auto dKb = dKh.middleRows(s, rows);
      auto dVb = dVh.middleRows(s, rows);

      expand(Kh.middleRows(s, rows), scaled_keys_);
      load_values(Vh.middleRows(s, rows));
      weighted_state_grads_.noalias() = map_->weights().asDiagonal() * state_grads_;
      monomial_grads.noalias() = values * weighted_state_grads_.leftCols(dv + 1).transpose();
      products.noalias() = monomials * weighted_state_grads_;
      dVb = products.leftCols(dv);
      column_sums = products.col(dv + 1);
      dKb.setZero();
      map_->monomials_backward(monomial_grads, top(scaled_keys_, rows), monomials, dKb);

      expand(Qh.middleRows(s, rows), scaled_queries_);
      load_adjoints(Gh.middleRows(s, rows), Oh.middleRows(s, rows), s, head);
      if (checkpointed_) {
        dQb.setZero();
        add_query_grads_through(checkpoint(head, s / b, chunks, dv), dQb);
      }
      in_chunk_block(rows, true);
      score_grads.noalias() = adjoints.leftCols(dv + 1) * values.transpose();
      // sqrt(c) dS: then c dS K = (sqrt(c) dS)(sqrt(c) K) and likewise for dK.
      score_grads.array() *= sqrt_c * derivative_block_.topLeftCorner(rows, rows).array();
      dQb.noalias() += score_grads.template triangularView<Eigen::Lower>() * top(scaled_keys_, rows);
      dKb.noalias() += score_grads.transpose().template triangularView<Eigen::Upper>() * top(scaled_queries_, rows);
      dVb.noalias() += block.transpose().template triangularView<Eigen::Upper>() * adjoints.leftCols(dv);
      column_sums.noalias() += block.transpose().template triangularView<Eigen::Upper>() * adjoints.col(dv + 1);
      column_sum = std::max(column_sum, static_cast<double>(column_sums.maxCoeff()));
      state_grads_.noalias() += monomials.transpose() * adjoints;
    }
    return column_sum;
  }

  void estimate(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                const ConstMatrixRef<T>& O, Certificate& cert) {
    detail::estimate_sampled_error(exact_, options_, Q, K, V, O, cert);
  }

  PolynomialAttentionOptions options_;
  ExactAttention<T> exact_;
  std::unique_ptr<FeatureMap<T>> map_;
  Polynomial poly_, derivative_;
  double derivative_error_ = std::numeric_limits<double>::infinity();
  Certificate certificate_;
  bool has_forward_ = false;
  std::array<Index, 4> forward_shape_{};
  // Saved by forward() for backward(): normalisers (n x h) and key states: without the mask Z per head
  // (r x h(d_v+1)), with it Z^{<s} per head and chunk when checkpointed_.
  Matrix<T> normalisers_, states_;
  bool checkpointed_ = false;
  std::size_t max_checkpoint_bytes_ = default_max_checkpoint_bytes;
  // Chunk workspaces.
  Matrix<T> scaled_queries_, scaled_keys_, monomials_, monomial_grads_, values_, products_, adjoints_;
  Matrix<T> causal_state_, chunk_state_, state_grads_, weighted_state_grads_;
  Matrix<T> block_, block_value_, derivative_block_, score_grads_;
  Vector<T> inverse_normalisers_, column_sums_;
};

}  // namespace polyattn
