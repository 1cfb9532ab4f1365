/// \file gradient_check.hpp
/// One harness that checks every hand-written gradient in polyattn against central finite differences.
///
/// The analytic gradient is computed once; each entry of each parameter is then perturbed by \f$\pm h\f$
/// and \f$(L(\theta + h e_k) - L(\theta - h e_k)) / 2h\f$ is compared with it. The comparison is the
/// relative Frobenius error \f$\|g - \hat g\|_F / \|\hat g\|_F\f$, so a test states one tolerance per check.
/// Central differences in double have truncation error \f$O(h^2 L''')\f$ and rounding error
/// \f$O(\epsilon_{mach} |L| / h)\f$; with \f$h = 10^{-6}\f$ and \f$O(1)\f$ losses both are near \f$10^{-10}\f$
/// relative, which is why double-precision checks use tolerances around \f$10^{-7}\f$.
#pragma once

#include <polyattn/common.hpp>

#include <cstdint>
#include <limits>
#include <random>

namespace polyattn::testing {

/// Relative Frobenius error of `actual` against `expected`; the absolute error when `expected` is zero.
template <class DA, class DE>
double relative_error(const Eigen::MatrixBase<DA>& actual, const Eigen::MatrixBase<DE>& expected) {
  const double diff = (actual.template cast<double>() - expected.template cast<double>()).norm();
  const double scale = expected.template cast<double>().norm();
  return scale > 0 ? diff / scale : diff;
}

/// Central-difference gradient of the scalar `loss()` with respect to every entry of `param`, which is
/// perturbed in place and restored exactly.
template <class Loss>
Matrix<double> numerical_gradient(Loss&& loss, Matrix<double>& param, double step = 1e-6) {
  Matrix<double> gradient(param.rows(), param.cols());
  for (Index j = 0; j < param.cols(); ++j)
    for (Index i = 0; i < param.rows(); ++i) {
      const double saved = param(i, j);
      param(i, j) = saved + step;
      const double up = loss();
      param(i, j) = saved - step;
      const double down = loss();
      param(i, j) = saved;
      gradient(i, j) = (up - down) / (2 * step);
    }
  return gradient;
}

/// Relative error of `analytic` against the central-difference gradient of `loss` in `param`.
template <class Loss, class Derived>
double gradient_error(Loss&& loss, Matrix<double>& param, const Eigen::MatrixBase<Derived>& analytic,
                      double step = 1e-6) {
  return relative_error(analytic, numerical_gradient(loss, param, step));
}

/// Seeded matrix with i.i.d. N(0, sigma^2) entries; the same seed gives the same matrix in float and double.
template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed, double sigma = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, sigma);
  Matrix<T> m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = static_cast<T>(normal(rng));
  return m;
}

}  // namespace polyattn::testing
