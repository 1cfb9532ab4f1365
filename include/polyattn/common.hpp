/// ile common.hpp
/// Types and argument checks shared by every polyattn header.
///
/// All matrices are Eigen's default column-major `Matrix<T, Dynamic, Dynamic>`, one token per row.
/// Column-major keeps a head's columns `middleCols(h * d_h, d_h)` contiguous, which is what
/// multi-head attention slices. Inputs are taken as `Eigen::Ref<const Matrix<T>>`, so blocks and
/// expressions bind without a copy whenever their layout allows it.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace polyattn {

using Index = Eigen::Index;

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic>;
template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;
template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;

namespace detail {

template <class T>
constexpr void static_check_scalar() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "polyattn supports float and double only: instantiate with float (speed) or "
                "double (reference accuracy and finite-difference checks).");
}

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// Throws std::invalid_argument("<where>: <message>") unless `condition` holds.
template <class... Parts>
void require(bool condition, const char* where, const Parts&... message) {
  if (!condition) throw std::invalid_argument(concat(where, ": ", message...));
}

/// Throws unless `m` is `rows x cols`; the message names the argument and both shapes.
template <class Derived>
void require_shape(const char* where, const char* name, const Eigen::EigenBase<Derived>& m,
                   Index rows, Index cols) {
  if (m.rows() != rows || m.cols() != cols)
    throw std::invalid_argument(concat(where, ": argument '", name, "' must be ", rows, "x", cols,
                                       ", got ", m.rows(), "x", m.cols()));
}

/// Throws unless `m` has at least one row and one column.
template <class Derived>
void require_nonempty(const char* where, const char* name, const Eigen::EigenBase<Derived>& m) {
  if (m.rows() == 0 || m.cols() == 0)
    throw std::invalid_argument(concat(where, ": argument '", name,
                                       "' must be non-empty, got ", m.rows(), "x", m.cols()));
}

/// Throws unless every entry of `m` is finite, naming the first offending entry.
template <class Derived>
void require_finite(const char* where, const char* name, const Eigen::MatrixBase<Derived>& m) {
  // x * 0 is 0 for finite x and NaN for inf or NaN, so one vectorised sum tests every entry (allFinite() and
  // maxCoeff<PropagateNaN>() are scalar loops, which cost 7% of a training step).
  using Scalar = typename Derived::Scalar;
  if (m.size() == 0 || (m.array() * Scalar(0)).sum() == Scalar(0)) return;
  for (Index j = 0; j < m.cols(); ++j)
    for (Index i = 0; i < m.rows(); ++i)
      if (!std::isfinite(static_cast<double>(m(i, j))))
        throw std::invalid_argument(concat(where, ": argument '", name, "' has a non-finite entry (",
                                           static_cast<double>(m(i, j)), ") at (", i, ", ", j, ")"));
}

/// Throws unless `value` is finite and strictly positive.
inline void require_positive(const char* where, const char* name, double value) {
  if (!(std::isfinite(value) && value > 0))
    throw std::invalid_argument(concat(where, ": '", name, "' must be finite and > 0, got ", value));
}

}  // namespace detail
}  // namespace polyattn
