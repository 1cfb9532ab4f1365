/// \file common.hpp
/// Types and argument checks shared by every polyattn header.
///
/// All matrices are Eigen's default column-major `Matrix<T, Dynamic, Dynamic>`, one token per row.
/// Column-major keeps a head's columns `middleCols(h * d_h, d_h)` contiguous, which is what
/// multi-head attention slices. Inputs are taken as `Eigen::Ref<const Matrix<T>>`, so blocks and
/// expressions bind without a copy whenever their layout allows it.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
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
/// Row-major matrices (one token per row, as in row-major C++ code, numpy's C order and PyTorch): the polynomial
/// methods (PolynomialAttention, AdjointBackend) read and write them in place (attention/head_rows.hpp).
template <class T>
using RowMajorMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using ConstRowMajorRef = Eigen::Ref<const RowMajorMatrix<T>>;
template <class T>
using RowMajorRef = Eigen::Ref<RowMajorMatrix<T>>;

namespace detail {

/// `X` in a parameter that must not take part in template argument deduction (std::type_identity_t of C++20).
template <class X>
struct TypeIdentity {
  using type = X;
};
template <class X>
using NonDeduced = typename TypeIdentity<X>::type;

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

/// Throws unless every entry of `m` is finite, naming the first offending entry; `first_row` is the row of the
/// argument where `m` starts when `m` is a block of rows of it.
template <class Derived>
void require_finite(const char* where, const char* name, const Eigen::MatrixBase<Derived>& m, Index first_row = 0) {
  // x * 0 is 0 for finite x and NaN for inf or NaN, so one vectorised sum tests every entry (allFinite() and
  // maxCoeff<PropagateNaN>() are scalar loops, which cost 7% of a training step).
  using Scalar = typename Derived::Scalar;
  if (m.size() == 0 || (m.array() * Scalar(0)).sum() == Scalar(0)) return;
  for (Index j = 0; j < m.cols(); ++j)
    for (Index i = 0; i < m.rows(); ++i)
      if (!std::isfinite(static_cast<double>(m(i, j))))
        throw std::invalid_argument(concat(where, ": argument '", name, "' has a non-finite entry (",
                                           static_cast<double>(m(i, j)), ") at (", first_row + i, ", ", j, ")"));
}

/// Throws unless `value` is finite and strictly positive.
inline void require_positive(const char* where, const char* name, double value) {
  if (!(std::isfinite(value) && value > 0))
    throw std::invalid_argument(concat(where, ": '", name, "' must be finite and > 0, got ", value));
}

/// The memory a dense matrix or block occupies: first element, shape and strides (in elements), so that
/// overlap can be tested without keeping the expression type. Build it with memory_of().
struct MemoryView {
  const char* name;         ///< the argument's name, for the error message
  std::uintptr_t address;   ///< address of the first element
  std::size_t scalar_size;  ///< sizeof(Scalar)
  Index inner_size, outer_size, inner_stride, outer_stride;  ///< along / across the storage order
};

/// The MemoryView of `m` (any Eigen expression with direct access: Matrix, Map, Ref, Block).
template <class Derived>
MemoryView memory_of(const char* name, const Eigen::DenseBase<Derived>& m) {
  const bool row_major = Derived::IsRowMajor;
  return {name,
          reinterpret_cast<std::uintptr_t>(m.derived().data()),
          sizeof(typename Derived::Scalar),
          row_major ? m.cols() : m.rows(),
          row_major ? m.rows() : m.cols(),
          m.derived().innerStride(),
          m.derived().outerStride()};
}

/// True when `a` and `b` share at least one element's memory. Exact for two column blocks (or row blocks) of
/// matrices with the same outer stride and unit inner stride, which covers every head slice and row chunk of one
/// matrix; otherwise conservative (the two address ranges overlap). O(1).
inline bool memory_overlaps(const MemoryView& a, const MemoryView& b) {
  if (a.inner_size == 0 || a.outer_size == 0 || b.inner_size == 0 || b.outer_size == 0) return false;
  const auto span = [](const MemoryView& v) {  // bytes from the first to one past the last element
    return static_cast<std::uintptr_t>((v.outer_size - 1) * v.outer_stride + (v.inner_size - 1) * v.inner_stride + 1) *
           static_cast<std::uintptr_t>(v.scalar_size);
  };
  const std::uintptr_t a_end = a.address + span(a), b_end = b.address + span(b);
  if (a_end <= b.address || b_end <= a.address) return false;
  const Index s = a.outer_stride;
  const bool same_grid = a.scalar_size == b.scalar_size && a.inner_stride == 1 && b.inner_stride == 1 &&
                         b.outer_stride == s && s >= 1 && a.inner_size <= s && b.inner_size <= s;
  const auto size = static_cast<std::intptr_t>(a.scalar_size);
  const auto bytes = static_cast<std::intptr_t>(b.address - a.address);  // wraps to the signed difference
  if (!same_grid || bytes % size != 0) return true;
  // b starts `offset` = q s + rem elements after a (0 <= rem < s); b's outer slice k lies in a's slice q + k at
  // rows [rem, rem + b.inner_size) and, when that passes s, in slice q + k + 1 at rows [0, rem + b.inner_size - s).
  const Index offset = static_cast<Index>(bytes / size);
  Index q = offset / s, rem = offset % s;
  if (rem < 0) {
    rem += s;
    --q;
  }
  const auto slices_meet = [&](Index first) { return first < a.outer_size && first + b.outer_size > 0; };
  return (rem < a.inner_size && slices_meet(q)) || (rem + b.inner_size > s && slices_meet(q + 1));
}

/// Throws std::invalid_argument("<where>: output 'X' overlaps argument 'Y' in memory ...") unless every output
/// is disjoint from every input and from every other output. O(outputs x (inputs + outputs)), no data access.
inline void require_disjoint(const char* where, std::initializer_list<MemoryView> outputs,
                             std::initializer_list<MemoryView> inputs) {
  for (auto out = outputs.begin(); out != outputs.end(); ++out) {
    for (const MemoryView& in : inputs)
      if (memory_overlaps(*out, in))
        throw std::invalid_argument(concat(where, ": output '", out->name, "' overlaps input '", in.name,
                                           "' in memory; outputs must not alias inputs or other outputs"));
    for (auto other = outputs.begin(); other != out; ++other)
      if (memory_overlaps(*out, *other))
        throw std::invalid_argument(concat(where, ": outputs '", other->name, "' and '", out->name,
                                           "' overlap in memory; outputs must not alias inputs or other outputs"));
  }
}

/// Calls body(i0, i1, Packet()) for strips [i0, i1) of `rows` rows: strips of `Packets` SIMD packets of T (the
/// last may have fewer packets), then the rows left over one at a time with the scalar T as the packet. For
/// column-wise loops over small blocks in Eigen's packet functions, where an Eigen expression per column would
/// cost more in setup than its few packets of work.
template <class T, int Packets, class Body>
void for_row_strips(Index rows, const Body& body) {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  constexpr Index lanes = Eigen::internal::packet_traits<T>::size, strip = Packets * lanes;
  const Index packed = rows / lanes * lanes;
  for (Index i0 = 0; i0 < packed; i0 += strip) body(i0, std::min(packed, i0 + strip), Packet());
  for (Index i = packed; i < rows; ++i) body(i, i + 1, T());
}

/// True when every entry of `m` is finite (one vectorised pass: x * 0 is NaN exactly for inf and NaN).
template <class Derived>
bool all_finite(const Eigen::MatrixBase<Derived>& m) {
  using Scalar = typename Derived::Scalar;
  return m.size() == 0 || (m.array() * Scalar(0)).sum() == Scalar(0);
}

/// Throws std::domain_error("<where>: <what> has a non-finite entry ... although every input is finite: <cause>")
/// unless every entry of the result `m` is finite; `cause()` (called only then) returns what overflowed. For
/// results of finite inputs whose intermediate values overflowed the scalar type.
template <class Derived, class Cause>
void require_finite_result(const char* where, const char* what, const Eigen::MatrixBase<Derived>& m,
                           const Cause& cause) {
  if (all_finite(m)) return;
  for (Index j = 0; j < m.cols(); ++j)
    for (Index i = 0; i < m.rows(); ++i)
      if (!std::isfinite(static_cast<double>(m(i, j))))
        throw std::domain_error(concat(where, ": ", what, " has a non-finite entry (", static_cast<double>(m(i, j)),
                                       ") at (", i, ", ", j, ") although every input is finite: ", cause()));
}

/// Resizes `m` only when its shape differs, so a workspace reused with the same shape is never
/// reallocated (fresh pages cost a page fault each; freed large blocks go back to the kernel).
template <class Derived>
void ensure_shape(Eigen::PlainObjectBase<Derived>& m, Index rows, Index cols) {
  if (m.rows() != rows || m.cols() != cols) m.resize(rows, cols);
}

}  // namespace detail
}  // namespace polyattn
