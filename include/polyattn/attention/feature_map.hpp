/// \file attention/feature_map.hpp
/// Polynomial feature maps \f$\varphi_Q, \varphi_K\f$ with
/// \f$\varphi_Q(q)^\top \varphi_K(k) = p(c\, q^\top k)\f$ for a polynomial \f$p(z)=\sum_{t\le g} a_t z^t\f$.
///
/// Expanding \f$(c\,q^\top k)^t = \sum_{|\alpha| = t} \binom{t}{\alpha} (\sqrt{c}q)^\alpha (\sqrt{c}k)^\alpha\f$
/// gives one feature per monomial \f$x^\alpha\f$ of total degree \f$\le g\f$ in \f$x = \sqrt{c}\,q\f$:
/// \f[ p(c\,q^\top k) = \sum_\alpha \omega_\alpha\, m_\alpha(\sqrt{c}q)\, m_\alpha(\sqrt{c}k),
///     \qquad \omega_\alpha = a_{|\alpha|}\binom{|\alpha|}{\alpha}. \f]
/// - FeatureMapKind::symmetric: one feature per multiset \f$\alpha\f$, width \f$r = \binom{d+g}{g}\f$.
/// - FeatureMapKind::kronecker: one feature per ordered tuple (plain Kronecker powers
///   \f$x^{\otimes t}\f$, all weights \f$a_t\f$), width \f$\sum_{t\le g} d^t\f$. This is the map of the
///   paper's authors' experiment, kept so that their setup can be reproduced exactly.
///
/// Every monomial of degree \f$t\f$ is the product of one of degree \f$t-1\f$ (its parent) and one
/// coordinate, so a chunk of rows is expanded column by column in \f$O(r)\f$ per row, and the
/// backward pass walks the same plan in reverse.
///
/// Usage:
/// \code
///   polyattn::FeatureMap<float> map(polyattn::FeatureMapKind::symmetric, 16,
///                                   polyattn::taylor_exp(2), 0.25);
///   polyattn::Matrix<float> Fq(n, map.width()), Fk(n, map.width());
///   map.features(Q, polyattn::FeatureSide::query, Fq);
///   map.features(K, polyattn::FeatureSide::key, Fk);   // Fq * Fk^T ~ p(0.25 * Q K^T)
///
///   // Raw monomials of a chunk of keys, sqrt(c) K and the column sums 1^T M (a key state's normaliser row):
///   polyattn::Matrix<float> scaled(b, 16), M(b, map.width());
///   polyattn::Vector<float> sums(map.width());
///   map.monomials(K.topRows(b), scaled, M, sums);
/// \endcode
#pragma once

#include "../common.hpp"
#include "polynomial.hpp"

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace polyattn {

enum class FeatureMapKind { symmetric, kronecker };

enum class FeatureSide { query, key };

/// Default cap on the feature width r; wider maps throw instead of exhausting memory.
inline constexpr Index default_max_features = Index(1) << 20;
/// Hard ceiling on the feature width r whatever the requested cap (2^26, 64 times the default): the map's
/// plan costs about 50 bytes per feature and every chunk workspace 64 or more rows of r scalars, so wider maps
/// cannot be allocated on any realistic machine and are rejected before any allocation.
inline constexpr Index max_feature_width = Index(1) << 26;

/// Number of features of a map without building it (1 when `dim` <= 0 or `degree` <= 0). Saturates at
/// `cap + 1` (at `cap` when `cap` is the largest Index) without any intermediate overflow.
inline Index feature_width(FeatureMapKind kind, Index dim, int degree, Index cap = default_max_features) {
  const Index saturated = cap < std::numeric_limits<Index>::max() ? cap + 1 : cap;
  if (dim <= 0) return 1;
  Index total = 1;
  Index level = 1;  // number of monomials of the current degree
  for (int t = 1; t <= degree; ++t) {
    // Next level = level * factor, checked as level <= cap / factor so that nothing overflows.
    Index factor = dim;
    if (kind == FeatureMapKind::symmetric) {
      // C(dim + t - 1, t) = C(dim + t - 2, t - 1) * (dim + t - 1) / t with an exact division; with
      // g = gcd(level, t), t / g divides dim + t - 1, so divide before multiplying.
      const Index g = std::gcd(level, Index(t));
      level /= g;
      factor = (dim + t - 1) / (Index(t) / g);
    }
    if (level > cap / factor) return saturated;
    level *= factor;
    if (total > cap - level) return saturated;
    total += level;
  }
  return total;
}

template <class T>
class FeatureMap {
  static_assert(std::is_floating_point<T>::value, "FeatureMap<T>: T must be float or double.");

 public:
  /// \param kind symmetric (width \f$\binom{d+g}{g}\f$) or kronecker (width \f$\sum_t d^t\f$).
  /// \param dim input dimension d (per head), > 0.
  /// \param poly the polynomial p; its degree is g.
  /// \param scale the score scale c > 0.
  /// \param max_features width cap; a wider map (or one wider than max_feature_width, whatever the cap) throws
  /// std::invalid_argument naming 'degree' before allocating anything.
  FeatureMap(FeatureMapKind kind, Index dim, const Polynomial& poly, double scale,
             Index max_features = default_max_features);

  FeatureMapKind kind() const { return kind_; }
  Index dim() const { return dim_; }
  int degree() const { return degree_; }
  double scale() const { return scale_; }
  /// Feature width r.
  Index width() const { return static_cast<Index>(parent_.size()); }
  /// \f$\omega_\alpha\f$: the weight of each raw monomial, so that \f$p = \sum \omega_\alpha m_\alpha m_\alpha\f$.
  const Vector<T>& weights() const { return weights_; }
  /// Degree of each feature.
  const std::vector<int>& feature_degrees() const { return degree_of_; }

  /// Raw monomials \f$M_{i\alpha} = m_\alpha(\sqrt{c}\,x_i)\f$ of the rows of `X` (rows x dim) into
  /// `M` (rows x width). `scaled` receives \f$\sqrt{c}X\f$ (needed again by backward). Outputs must not share
  /// memory with `X` or each other (std::invalid_argument), here and in features() and monomials_backward().
  template <class Derived>
  void monomials(const Eigen::MatrixBase<Derived>& X, MatrixRef<T> scaled, MatrixRef<T> M) const {
    monomials_into(X, scaled, M, nullptr);
  }

  /// monomials() and their column sums \f$\mathbf 1^\top M\f$ into `column_sums` (width entries): the normaliser row
  /// of a key state \f$[V, \mathbf 1]^\top M\f$, summed while each column's rows are in registers rather than in a
  /// pass over M of its own. Each column is summed in strips of (up to) 4 SIMD packets of rows, the strips in order.
  template <class Derived>
  void monomials(const Eigen::MatrixBase<Derived>& X, MatrixRef<T> scaled, MatrixRef<T> M,
                 Eigen::Ref<Vector<T>> column_sums) const {
    monomials_into(X, scaled, M, &column_sums);
  }

  /// Weighted features: \f$\varphi_Q = \mathrm{sign}(\omega)\sqrt{|\omega|}\circ m\f$,
  /// \f$\varphi_K = \sqrt{|\omega|}\circ m\f$, so \f$\varphi_Q(q)^\top\varphi_K(k) = p(c\,q^\top k)\f$.
  template <class Derived>
  void features(const Eigen::MatrixBase<Derived>& X, FeatureSide side, MatrixRef<T> F) const {
    check_rows("polyattn::FeatureMap::features", X, F);
    if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit))
      detail::require_disjoint("polyattn::FeatureMap::features", {detail::memory_of("F", F)},
                               {detail::memory_of("X", X)});
    Matrix<T> scaled = static_cast<T>(std::sqrt(scale_)) * X;
    expand<false>(scaled, F, nullptr);
    const Vector<T>& w = side == FeatureSide::query ? query_weights_ : key_weights_;
    F.array().rowwise() *= w.transpose().array();
  }

  /// Backward of monomials(): given \f$\partial L/\partial M\f$ (destroyed: used as workspace), the
  /// scaled input and M from the forward pass, accumulates \f$\partial L/\partial X\f$ into `dX`.
  void monomials_backward(MatrixRef<T> dM, const ConstMatrixRef<T>& scaled, const ConstMatrixRef<T>& M,
                          MatrixRef<T> dX) const;

 private:
  template <class Derived>
  void check_rows(const char* where, const Eigen::MatrixBase<Derived>& X, const MatrixRef<T>& F) const {
    detail::require(X.cols() == dim_, where, "argument 'X' must have ", dim_, " columns, got ", X.cols());
    detail::require_shape(where, "output", F, X.rows(), width());
  }

  // Both monomials(), without the column sums when `column_sums` is null: the checks, sqrt(c) X into `scaled`,
  // then expand().
  template <class Derived>
  void monomials_into(const Eigen::MatrixBase<Derived>& X, MatrixRef<T> scaled, MatrixRef<T> M,
                      Eigen::Ref<Vector<T>>* column_sums) const {
    constexpr const char* where = "polyattn::FeatureMap::monomials";
    check_rows(where, X, M);
    if (column_sums)
      detail::require(column_sums->size() == width(), where, "argument 'column_sums' must have ", width(),
                      " entries, got ", column_sums->size());
    if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit))
      detail::require_disjoint(where,
                               {detail::memory_of("scaled", scaled), detail::memory_of("M", M),
                                // without sums an empty view, which overlaps nothing
                                column_sums ? detail::memory_of("column_sums", *column_sums)
                                            : detail::memory_of("column_sums", M.leftCols(0))},
                               {detail::memory_of("X", X)});
    scaled.noalias() = static_cast<T>(std::sqrt(scale_)) * X;
    if (column_sums) {
      column_sums->setZero();
      expand<true>(scaled, M, column_sums->data());
    } else {
      expand<false>(scaled, M, nullptr);
    }
  }

  // M = the monomials of the rows `scaled`; with Sums, also adds their column sums into `sums`.
  template <bool Sums>
  void expand(const ConstMatrixRef<T>& scaled, MatrixRef<T> M, T* sums) const;

  // Builds degree t from degree t-1. Symmetric: x_j times every degree-(t-1) monomial whose smallest
  // variable is >= j (graded order, so those form a contiguous range starting at first_with_lead[j]);
  // the multinomial coefficient updates as binom(t; alpha + e_j) = binom(t-1; alpha) * t / (alpha_j + 1).
  void build_plan(const Polynomial& poly) {
    std::vector<double> multinomial{1.0};
    std::vector<Index> lead{0}, lead_power{0};
    parent_.assign(1, 0);
    variable_.assign(1, 0);
    degree_of_.assign(1, 0);
    Index level_begin = 0, level_end = 1;
    for (int t = 1; t <= degree_; ++t) {
      for (Index j = 0; j < dim_; ++j) {
        for (Index m = level_begin; m < level_end; ++m) {
          const auto um = static_cast<std::size_t>(m);
          const bool symmetric = kind_ == FeatureMapKind::symmetric;
          if (symmetric && t > 1 && lead[um] < j) continue;
          const Index power = (t > 1 && lead[um] == j) ? lead_power[um] + 1 : 1;
          parent_.push_back(m);
          variable_.push_back(j);
          degree_of_.push_back(t);
          lead.push_back(j);
          lead_power.push_back(power);
          multinomial.push_back(symmetric ? multinomial[um] * t / static_cast<double>(power) : 1.0);
        }
      }
      level_begin = level_end;
      level_end = static_cast<Index>(parent_.size());
    }
    const Index r = width();
    weights_.resize(r);
    query_weights_.resize(r);
    key_weights_.resize(r);
    for (Index k = 0; k < r; ++k) {
      const auto uk = static_cast<std::size_t>(k);
      const double w = poly.coeffs[static_cast<std::size_t>(degree_of_[uk])] * multinomial[uk];
      weights_(k) = static_cast<T>(w);
      key_weights_(k) = static_cast<T>(std::sqrt(std::abs(w)));
      query_weights_(k) = static_cast<T>(w < 0 ? -std::sqrt(-w) : std::sqrt(w));
    }
  }

  FeatureMapKind kind_;
  Index dim_;
  int degree_;
  double scale_;
  std::vector<Index> parent_, variable_;
  std::vector<int> degree_of_;
  Vector<T> weights_, query_weights_, key_weights_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
FeatureMap<T>::FeatureMap(FeatureMapKind kind, Index dim, const Polynomial& poly, double scale, Index max_features)
    : kind_(kind), dim_(dim), degree_(poly.degree()), scale_(scale) {
  constexpr const char* where = "polyattn::FeatureMap";
  detail::require(dim > 0, where, "'dim' must be > 0, got ", dim);
  detail::require(poly.degree() >= 0, where, "'degree' must be >= 0, got ", poly.degree());
  detail::require_positive(where, "scale", scale);
  detail::require(max_features >= 1, where, "'max_features' must be >= 1, got ", max_features);
  const Index cap = std::min(max_features, max_feature_width);
  const Index width = feature_width(kind, dim, degree_, cap);  // saturates at cap + 1 without overflow
  detail::require(width <= cap, where, "'degree' ", degree_, " with dim ", dim, " needs more than ",
                  cap == max_features ? "max_features = " : "the largest allocatable width max_feature_width = ",
                  cap, " features (", kind == FeatureMapKind::symmetric ? "C(d+g, g)" : "sum_t d^t", ")");
  build_plan(poly);
}

template <class T>
void FeatureMap<T>::monomials_backward(MatrixRef<T> dM, const ConstMatrixRef<T>& scaled, const ConstMatrixRef<T>& M,
                                       MatrixRef<T> dX) const {
  constexpr const char* where = "polyattn::FeatureMap::monomials_backward";
  detail::require_shape(where, "dM", dM, M.rows(), width());
  detail::require_shape(where, "scaled", scaled, M.rows(), dim_);
  detail::require_shape(where, "dX", dX, M.rows(), dim_);
  detail::require_disjoint(where, {detail::memory_of("dM", dM), detail::memory_of("dX", dX)},
                           {detail::memory_of("scaled", scaled), detail::memory_of("M", M)});
  const T root_scale = static_cast<T>(std::sqrt(scale_));
  // Row by row the same operations in the same order as a column-by-column pass (rows are independent), done on
  // strips of 4 packets of rows so that the strip's columns stay in L1 and no per-column setup dominates (a chunk
  // of 64 rows is 4 packets of floats). What the loops read is in locals, as in expand().
  T* const grads = dM.data();
  const T* const values = M.data();
  const T* const x_data = scaled.data();
  T* const x_grads = dX.data();
  const Index grads_ld = dM.outerStride(), values_ld = M.outerStride(), x_ld = scaled.outerStride(),
              x_grads_ld = dX.outerStride();
  const Index* const parents = parent_.data();
  const Index* const variables = variable_.data();
  const Index r = width();
  detail::for_row_strips<T, 4>(M.rows(), [=](Index i0, Index i1, auto packet) {
    using Packet = decltype(packet);
    using namespace Eigen::internal;
    constexpr Index lanes = sizeof(Packet) / sizeof(T);
    const Packet factor = pset1<Packet>(root_scale);
    const Index packets = (i1 - i0) / lanes;
    for (Index k = r - 1; k >= 1;) {
      // Features come in runs of one variable (build_plan() takes the variables in order within each degree): a
      // run's terms of dX add up in registers, in the same order as through memory.
      const Index var = variables[k];
      const T* x = x_data + var * x_ld + i0;
      T* x_grad = x_grads + var * x_grads_ld + i0;
      Packet x_grad_sum[4];
      for (Index p = 0; p < packets; ++p) x_grad_sum[p] = ploadu<Packet>(x_grad + p * lanes);
      for (; k >= 1 && variables[k] == var; --k) {
        const T* grad = grads + k * grads_ld + i0;
        const T* parent_value = values + parents[k] * values_ld + i0;
        T* parent_grad = grads + parents[k] * grads_ld + i0;
        for (Index p = 0; p < packets; ++p) {
          const Packet g = ploadu<Packet>(grad + p * lanes);
          x_grad_sum[p] = padd(x_grad_sum[p], pmul(pmul(factor, g), ploadu<Packet>(parent_value + p * lanes)));
          pstoreu(parent_grad + p * lanes,
                  padd(ploadu<Packet>(parent_grad + p * lanes), pmul(g, ploadu<Packet>(x + p * lanes))));
        }
      }
      for (Index p = 0; p < packets; ++p) pstoreu(x_grad + p * lanes, x_grad_sum[p]);
    }
  });
}

template <class T>
template <bool Sums>
void FeatureMap<T>::expand(const ConstMatrixRef<T>& scaled, MatrixRef<T> M, T* sums) const {
  // Everything the loops read is in locals: a SIMD store may alias anything, so members and references would be
  // read again after each one.
  T* const out = M.data();
  const Index ld = M.outerStride(), r = width();
  const T* const x_data = scaled.data();
  const Index x_ld = scaled.outerStride();
  const Index* const parents = parent_.data();
  const Index* const variables = variable_.data();
  detail::for_row_strips<T, 4>(M.rows(), [=](Index i0, Index i1, auto packet) {
    using Packet = decltype(packet);
    using namespace Eigen::internal;
    constexpr Index lanes = sizeof(Packet) / sizeof(T);
    const Packet one = pset1<Packet>(T(1));
    for (Index i = i0; i < i1; i += lanes) pstoreu(out + i, one);
    if constexpr (Sums) sums[0] += static_cast<T>(i1 - i0);
    for (Index k = 1; k < r; ++k) {
      const T* parent = out + parents[k] * ld;
      const T* x = x_data + variables[k] * x_ld;
      T* column = out + k * ld;
      Packet sum = pset1<Packet>(T(0));
      for (Index i = i0; i < i1; i += lanes) {
        const Packet value = pmul(ploadu<Packet>(parent + i), ploadu<Packet>(x + i));
        pstoreu(column + i, value);
        if constexpr (Sums) sum = padd(sum, value);
      }
      if constexpr (Sums) sums[k] += predux(sum);
    }
  });
}

}  // namespace polyattn
