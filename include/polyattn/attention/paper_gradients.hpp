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
/// The factors are generated chunk by chunk of rows and, within a chunk, tile by tile of the
/// \f$r(d_v+1)\f$ Kronecker columns (PaperGradientOptions::kronecker_tile value columns, each worth
/// \f$r\f$ Kronecker columns), so beyond inputs and outputs the memory is
/// \f$O(b\,r\,t + r d_v d_k)\f$ for chunk \f$b\f$ and tile \f$t\f$: never \f$O(nr)\f$, let alone \f$O(nrd)\f$.
/// Cost \f$O(n r d_v d_k)\f$ = \f$O(nrd^2)\f$ per head.
///
/// **Causal mask.** \f$\tilde P = M\circ U_1V_1^\top\f$ and \f$\tilde p = M\circ U_pV_p^\top\f$. The normaliser
/// \f$\tilde D = (M\circ\varphi_Q\varphi_K^\top)\mathbf 1\f$ and \f$dQ\f$ are prefix scans; \f$dK\f$ and \f$dV\f$
/// multiply by the *transposed* masked matrices and are suffix scans (causal_scan.hpp). The paper
/// (Lemmas I.3–I.8, Algorithm 2) only gives the prefix scan, because its printed formulas only multiply
/// by \f$f\f$; the correct \f$dK\f$, \f$dV\f$ (and the paper's \f$dX\f$, \f$dW_V\f$) need the suffix scan.
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
#include "causal_scan.hpp"
#include "polynomial_attention.hpp"

#include <algorithm>
#include <array>
#include <limits>

namespace polyattn {

/// Parameters of PaperBackend beyond those of the forward pass.
struct PaperGradientOptions {
  /// Value columns per Kronecker tile t: \f$U_p\f$ and \f$V_p\f$ are built \f$r\,t\f$ columns at a time
  /// (the \f$-\mathrm{diag}(\kappa)U_1\f$ / \f$V_1\f$ block counts as one more value column). 0 (default) picks
  /// t so that a tile of one chunk holds about \f$2^{18}\f$ entries.
  Index kronecker_tile = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    detail::require(kronecker_tile >= 0, "polyattn::PaperGradientOptions",
                    "'kronecker_tile' must be >= 0 (0 = automatic), got ", kronecker_tile);
  }
};

namespace detail {

/// Groups [first_group, first_group + groups) of the Kronecker factor \f$[X\oslash S,\ \mathrm{diag}(t)X]\f$
/// into `out` (X.rows() x groups·r, r = X.cols()): group \f$j <\f$ S.cols() is \f$\mathrm{diag}(S_{:,j})X\f$
/// (columns \f$l + jr\f$ of \f$X\oslash S\f$), group S.cols() is \f$\mathrm{diag}(t)X\f$.
template <class T, class DX, class DS, class DT>
void kronecker_groups(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DS>& S, const Eigen::MatrixBase<DT>& tail,
                      Index first_group, Index groups, Matrix<T>& out) {
  const Index r = X.cols();
  out.resize(X.rows(), groups * r);
  for (Index g = 0; g < groups; ++g) {
    const Index j = first_group + g;
    auto block = out.middleCols(g * r, r);
    if (j < S.cols())
      block.noalias() = S.col(j).asDiagonal() * X;
    else
      block.noalias() = tail.asDiagonal() * X;
  }
}

}  // namespace detail

/// Polynomial-method forward pass and the paper's Algorithm 1 backward pass (see the file documentation).
/// Keeps its workspaces between calls.
template <class T>
class PaperBackend final : public AttentionBackend<T> {
 public:
  explicit PaperBackend(const PolynomialAttentionOptions& options, PaperGradientOptions gradient_options = {});

  AttentionMethod method() const override { return AttentionMethod::paper; }
  const AttentionOptions& attention_options() const override { return attention_.options().attention; }

  const PolynomialAttentionOptions& options() const { return attention_.options(); }
  const PaperGradientOptions& gradient_options() const { return gradient_options_; }

  /// Writes \f$\tilde O\f$ exactly as PolynomialAttention::forward() does and returns its certificate.
  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O) override;

  /// Writes the Algorithm 1 approximations of dQ (n x h d_k), dK (m x h d_k), dV (m x h d_v) for
  /// G = dL/dO; Q, K, V and O must be those of the last forward(). Throws std::invalid_argument for bad
  /// shapes, non-finite O or G, or no preceding forward(); std::domain_error for a non-positive normaliser.
  GradientCertificate backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                               const ConstMatrixRef<T>& O, const ConstMatrixRef<T>& G, MatrixRef<T> dQ,
                               MatrixRef<T> dK, MatrixRef<T> dV) override;

 private:
  Index chunk_rows(Index n) const {
    const Index requested = options().chunk_size;
    if (requested > 0) return std::min(requested, n);
    // Causal chunks pay O(b^2 r d) for the in-chunk block against O(b r d^2) for the state products.
    return std::min<Index>(options().attention.causal ? 16 : 256, n);
  }

  Index tile_groups(Index chunk, Index r, Index groups) const {
    if (gradient_options_.kronecker_tile > 0) return std::min(gradient_options_.kronecker_tile, groups);
    return std::clamp<Index>((Index(1) << 18) / (chunk * r), 1, groups);
  }

  // Writes M_Q diag(omega) of a chunk of queries into u1_ (so that u1_ * v1_^T = phi_Q phi_K^T).
  template <class Derived>
  void weighted_query_monomials(const FeatureMap<T>& map, const Eigen::MatrixBase<Derived>& Qc) {
    scaled_.resize(Qc.rows(), Qc.cols());
    u1_.resize(Qc.rows(), map.width());
    map.monomials(Qc, scaled_, u1_);
    u1_ = u1_ * map.weights().asDiagonal();
  }

  // Writes the monomials M_K of a chunk of keys into v1_.
  template <class Derived>
  void key_monomials(const FeatureMap<T>& map, const Eigen::MatrixBase<Derived>& Kc) {
    scaled_.resize(Kc.rows(), Kc.cols());
    v1_.resize(Kc.rows(), map.width());
    map.monomials(Kc, scaled_, v1_);
  }

  // Divides u1_ by the chunk's normaliser (rows of first_row...), which must be positive.
  void normalise_query_factor(const Vector<T>& normaliser, Index first_row) {
    for (Index i = 0; i < normaliser.size(); ++i)
      if (!(normaliser(i) > 0) || !std::isfinite(static_cast<double>(normaliser(i))))
        throw std::domain_error(detail::bad_normaliser_message(
            "polyattn::PaperBackend::backward", first_row + i, static_cast<double>(normaliser(i)),
            certificate_.degree, certificate_.radius, sizeof(T) == sizeof(float) ? "float" : "double"));
    u1_ = normaliser.cwiseInverse().asDiagonal() * u1_;
  }

  // Non-causal head: three passes (keys, queries, keys) accumulating the r(dv+1) x dk states V_p^T K,
  // U_p^T Q and the r x (dv+1) state U_1^T [G, 1]. Returns max_j (P~^T 1)_j.
  double head_full(const FeatureMap<T>& map, const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                   const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                   MatrixRef<T> dV) {
    const Index n = Q.rows(), m = K.rows(), dk = Q.cols(), dv = V.cols(), r = map.width();
    const Index groups = dv + 1, b = chunk_rows(std::max(n, m)), tile = tile_groups(b, r, groups);
    const T c = static_cast<T>(map.scale());
    key_sum_.setZero(r);
    query_state_.setZero(r * groups, dk);
    for (Index k0 = 0; k0 < m; k0 += b) {
      const Index rows = std::min(b, m - k0);
      const auto Kc = K.middleRows(k0, rows);
      key_monomials(map, Kc);
      key_sum_.noalias() += v1_.colwise().sum().transpose();
      for (Index g0 = 0; g0 < groups; g0 += tile) {
        const Index tg = std::min(tile, groups - g0);
        detail::kronecker_groups(v1_, V.middleRows(k0, rows), Vector<T>::Ones(rows), g0, tg, vp_);
        query_state_.middleRows(g0 * r, tg * r).noalias() += vp_.transpose() * Kc;
      }
    }
    key_state_.setZero(r * groups, dk);
    value_state_.setZero(r, dv + 1);
    for (Index q0 = 0; q0 < n; q0 += b) {
      const Index rows = std::min(b, n - q0);
      const auto Qc = Q.middleRows(q0, rows);
      const auto Gc = G.middleRows(q0, rows);
      weighted_query_monomials(map, Qc);
      normaliser_.noalias() = u1_ * key_sum_;
      normalise_query_factor(normaliser_, q0);
      auto dQc = dQ.middleRows(q0, rows);
      dQc.setZero();
      for (Index g0 = 0; g0 < groups; g0 += tile) {
        const Index tg = std::min(tile, groups - g0);
        detail::kronecker_groups(u1_, Gc, -kappa_.segment(q0, rows), g0, tg, up_);
        dQc.noalias() += up_ * query_state_.middleRows(g0 * r, tg * r);
        key_state_.middleRows(g0 * r, tg * r).noalias() += up_.transpose() * Qc;
      }
      dQc *= c;
      value_state_.leftCols(dv).noalias() += u1_.transpose() * Gc;
      value_state_.col(dv).noalias() += u1_.colwise().sum().transpose();
    }
    double column_sum = 0;
    for (Index k0 = 0; k0 < m; k0 += b) {
      const Index rows = std::min(b, m - k0);
      key_monomials(map, K.middleRows(k0, rows));
      dV.middleRows(k0, rows).noalias() = v1_ * value_state_.leftCols(dv);
      column_sum = std::max(column_sum, static_cast<double>((v1_ * value_state_.col(dv)).maxCoeff()));
      auto dKc = dK.middleRows(k0, rows);
      dKc.setZero();
      for (Index g0 = 0; g0 < groups; g0 += tile) {
        const Index tg = std::min(tile, groups - g0);
        detail::kronecker_groups(v1_, V.middleRows(k0, rows), Vector<T>::Ones(rows), g0, tg, vp_);
        dKc.noalias() += vp_ * key_state_.middleRows(g0 * r, tg * r);
      }
      dKc *= c;
    }
    return column_sum;
  }

  // Causal head: a forward loop over chunks runs the prefix scans for the normaliser D~ (kept for the
  // second loop) and for dQ; a reverse loop runs the suffix scans for dK and for [dV, P~^T 1].
  // Returns max_j (P~^T 1)_j.
  double head_causal(const FeatureMap<T>& map, const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                     const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                     MatrixRef<T> dV) {
    const Index n = Q.rows(), dk = Q.cols(), dv = V.cols(), r = map.width();
    const Index groups = dv + 1, b = chunk_rows(n), tile = tile_groups(b, r, groups);
    const Index chunks = (n + b - 1) / b;
    const T c = static_cast<T>(map.scale());
    row_normaliser_.resize(n);
    normaliser_scan_.start(ScanDirection::prefix, r, 1);
    query_scan_.start(ScanDirection::prefix, r * groups, dk);
    for (Index s = 0; s < n; s += b) {
      const Index rows = std::min(b, n - s);
      const auto Kc = K.middleRows(s, rows);
      const auto Vc = V.middleRows(s, rows);
      const auto Gc = G.middleRows(s, rows);
      weighted_query_monomials(map, Q.middleRows(s, rows));
      key_monomials(map, Kc);
      ones_.setOnes(rows, 1);
      chunk_normaliser_.setZero(rows, 1);
      normaliser_scan_.begin_chunk(rows);
      normaliser_scan_.add_factors(0, u1_, v1_, ones_, chunk_normaliser_);
      normaliser_scan_.end_chunk(ones_, chunk_normaliser_);
      normaliser_ = chunk_normaliser_.col(0);
      normalise_query_factor(normaliser_, s);
      row_normaliser_.segment(s, rows) = normaliser_;
      auto dQc = dQ.middleRows(s, rows);
      dQc.setZero();
      query_scan_.begin_chunk(rows);
      for (Index g0 = 0; g0 < groups; g0 += tile) {
        const Index tg = std::min(tile, groups - g0);
        detail::kronecker_groups(u1_, Gc, -kappa_.segment(s, rows), g0, tg, up_);
        detail::kronecker_groups(v1_, Vc, Vector<T>::Ones(rows), g0, tg, vp_);
        query_scan_.add_factors(g0 * r, up_, vp_, Kc, dQc);
      }
      query_scan_.end_chunk(Kc, dQc);
      dQc *= c;
    }
    key_scan_.start(ScanDirection::suffix, r * groups, dk);
    value_scan_.start(ScanDirection::suffix, r, dv + 1);
    double column_sum = 0;
    for (Index chunk = chunks - 1; chunk >= 0; --chunk) {
      const Index s = chunk * b, rows = std::min(b, n - s);
      const auto Qc = Q.middleRows(s, rows);
      const auto Vc = V.middleRows(s, rows);
      const auto Gc = G.middleRows(s, rows);
      weighted_query_monomials(map, Qc);
      u1_ = row_normaliser_.segment(s, rows).cwiseInverse().asDiagonal() * u1_;
      key_monomials(map, K.middleRows(s, rows));
      auto dKc = dK.middleRows(s, rows);
      dKc.setZero();
      key_scan_.begin_chunk(rows);
      for (Index g0 = 0; g0 < groups; g0 += tile) {
        const Index tg = std::min(tile, groups - g0);
        detail::kronecker_groups(u1_, Gc, -kappa_.segment(s, rows), g0, tg, up_);
        detail::kronecker_groups(v1_, Vc, Vector<T>::Ones(rows), g0, tg, vp_);
        key_scan_.add_factors(g0 * r, up_, vp_, Qc, dKc);
      }
      key_scan_.end_chunk(Qc, dKc);
      dKc *= c;
      value_rhs_.resize(rows, dv + 1);
      value_rhs_.leftCols(dv) = Gc;
      value_rhs_.col(dv).setOnes();
      value_out_.setZero(rows, dv + 1);
      value_scan_.begin_chunk(rows);
      value_scan_.add_factors(0, u1_, v1_, value_rhs_, value_out_);
      value_scan_.end_chunk(value_rhs_, value_out_);
      dV.middleRows(s, rows) = value_out_.leftCols(dv);
      column_sum = std::max(column_sum, static_cast<double>(value_out_.col(dv).maxCoeff()));
    }
    return column_sum;
  }

  PolynomialAttention<T> attention_;
  PaperGradientOptions gradient_options_;
  Certificate certificate_;
  bool has_forward_ = false;
  std::array<Index, 4> forward_shape_{};  // rows of Q, rows of K, columns of Q, columns of V
  CausalScan<T> normaliser_scan_, query_scan_, key_scan_, value_scan_;
  Matrix<T> scaled_, u1_, v1_, up_, vp_, query_state_, key_state_, value_state_, ones_, chunk_normaliser_,
      value_rhs_, value_out_;
  Vector<T> kappa_, key_sum_, normaliser_, row_normaliser_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
PaperBackend<T>::PaperBackend(const PolynomialAttentionOptions& options, PaperGradientOptions gradient_options)
    : attention_(options), gradient_options_(gradient_options) {
  detail::static_check_scalar<T>();
  gradient_options_.check();
  detail::require(options.exact_window == 0, "polyattn::PaperBackend", "'exact_window' must be 0, got ",
                  options.exact_window, ": the paper's gradient evaluates p on every pair (use the adjoint method)");
}

template <class T>
Certificate PaperBackend<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                                     MatrixRef<T> O) {
  has_forward_ = false;
  certificate_ = attention_.forward(Q, K, V, O, "polyattn::PaperBackend::forward", nullptr);
  forward_shape_ = {Q.rows(), K.rows(), Q.cols(), V.cols()};
  has_forward_ = true;
  return certificate_;
}

template <class T>
GradientCertificate PaperBackend<T>::backward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                              const ConstMatrixRef<T>& V, const ConstMatrixRef<T>& O,
                                              const ConstMatrixRef<T>& G, MatrixRef<T> dQ, MatrixRef<T> dK,
                                              MatrixRef<T> dV) {
  constexpr const char* where = "polyattn::PaperBackend::backward";
  const AttentionOptions& opt = options().attention;
  const auto shape = detail::check_backward_arguments<T>(where, opt, Q, K, V, O, G, dQ, dK, dV);
  detail::require_same_forward<T>(where, has_forward_, forward_shape_, Q, K, V);

  const FeatureMap<T>& map = attention_.feature_map();
  const double c = map.scale();
  const double eps = certificate_.poly_error;
  const double delta = 2 * eps / (1 - eps), rho = (1 + eps) / (1 - eps);
  GradientCertificate result;
  result.forward = certificate_;
  for (Index h = 0; h < shape.heads; ++h) {
    const auto Qh = Q.middleCols(h * shape.dk, shape.dk);
    const auto Kh = K.middleCols(h * shape.dk, shape.dk);
    const auto Vh = V.middleCols(h * shape.dv, shape.dv);
    const auto Gh = G.middleCols(h * shape.dv, shape.dv);
    auto dQh = dQ.middleCols(h * shape.dk, shape.dk);
    auto dKh = dK.middleCols(h * shape.dk, shape.dk);
    auto dVh = dV.middleCols(h * shape.dv, shape.dv);
    kappa_.noalias() = O.middleCols(h * shape.dv, shape.dv).cwiseProduct(Gh).rowwise().sum();
    const double column_sum =
        opt.causal ? head_causal(map, Qh, Kh, Vh, Gh, dQh, dKh, dVh) : head_full(map, Qh, Kh, Vh, Gh, dQh, dKh, dVh);
    const double a = detail::max_row_norm(Gh) * detail::max_row_norm(Vh);
    const double max_q = static_cast<double>(Qh.cwiseAbs().maxCoeff());
    const double max_k = static_cast<double>(Kh.cwiseAbs().maxCoeff());
    const double max_g = static_cast<double>(Gh.cwiseAbs().maxCoeff());
    result.dqk_bound = std::max({result.dqk_bound, 3 * c * delta * a * max_k,
                                 (2 * rho + 1) * c * delta * a * max_q * column_sum});
    result.dv_bound = std::max(result.dv_bound, rho * delta * max_g * column_sum);
  }
  detail::check_backward_results<T>(where, opt, shape, Q, K, V, G, dQ, dK, dV);
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
