/// \file attention/head_rows.hpp
/// One head's rows as the polynomial kernel reads and writes them, in either storage order of the caller's matrix.
///
/// polyattn's matrices hold one token per row. Stored column-major (Matrix, the default), a head's block of rows
/// is read in place. Stored row-major (RowMajorMatrix: the layout of row-major C++ code, of numpy's C-ordered
/// arrays and of PyTorch's tensors), the head's n x d block is, in memory, the column-major d x n matrix of its
/// transpose: the kernel then transposes each chunk of rows it needs into a small column-major workspace, in SIMD
/// tiles while the chunk is in cache (transpose_into()), and writes its result rows back the same way. A caller
/// with row-major data thus never copies whole matrices, and the results are bitwise those of the column-major
/// call: a transposition moves values without rounding them.
#pragma once

#include "block_product.hpp"

namespace polyattn {
namespace detail {

/// Read access to one head's n x d input rows, stored column-major (`rows`, n x d) or token-major (`columns`, the
/// d x n transpose: token i is column i).
template <class T>
class HeadRows {
 public:
  /// A column-major n x d block, read in place.
  HeadRows(const ConstMatrixRef<T>& rows) : matrix_(rows), token_major_(false) {}  // NOLINT: implicit on purpose
  /// A token-major head: `columns` is the d x n transpose of its rows.
  static HeadRows token_major(const ConstMatrixRef<T>& columns) { return HeadRows(columns, true); }

  Index rows() const { return token_major_ ? matrix_.cols() : matrix_.rows(); }
  Index cols() const { return token_major_ ? matrix_.rows() : matrix_.cols(); }
  bool is_token_major() const { return token_major_; }

  /// Rows [first, first + count) as a column-major count x d matrix: the block itself, or (token-major) its copy
  /// in the top of `scratch` (count x d at least; the returned matrix lives there until it is overwritten).
  ConstMatrixRef<T> block(Index first, Index count, Matrix<T>& scratch) const {
    if (!token_major_) return matrix_.middleRows(first, count);
    auto rows = scratch.topLeftCorner(count, matrix_.rows());
    transpose_into<T>(matrix_.middleCols(first, count), rows);
    return rows;
  }
  /// Copies rows [first, first + count) into `destination` (count x d, column-major).
  void copy_rows(Index first, Index count, MatrixRef<T> destination) const {
    if (token_major_)
      transpose_into<T>(matrix_.middleCols(first, count), destination);
    else
      destination = matrix_.middleRows(first, count);
  }

 private:
  HeadRows(const ConstMatrixRef<T>& matrix, bool token_major) : matrix_(matrix), token_major_(token_major) {}
  ConstMatrixRef<T> matrix_;
  bool token_major_;
};

/// Write access to one head's n x d result rows, stored column-major or token-major as in HeadRows. A block of rows
/// is computed where rows() says (in place, or token-major in a scratch matrix) and then store()d.
template <class T>
class HeadOutput {
 public:
  /// A column-major n x d block, written in place.
  HeadOutput(MatrixRef<T> rows) : matrix_(rows), token_major_(false) {}  // NOLINT: implicit on purpose
  /// A token-major head: `columns` is the d x n transpose of its rows.
  static HeadOutput token_major(MatrixRef<T> columns) { return HeadOutput(columns, true); }

  Index rows() const { return token_major_ ? matrix_.cols() : matrix_.rows(); }
  Index cols() const { return token_major_ ? matrix_.rows() : matrix_.cols(); }
  bool is_token_major() const { return token_major_; }

  /// Where rows [first, first + count) are computed: the block itself, or (token-major) the top of `scratch`.
  /// With `load`, token-major, the scratch first receives the rows' current values (a block computed in two
  /// passes); in place it holds them anyway.
  MatrixRef<T> rows(Index first, Index count, Matrix<T>& scratch, bool load = false) {
    if (!token_major_) return matrix_.middleRows(first, count);
    auto rows = scratch.topLeftCorner(count, matrix_.rows());
    if (load) transpose_into<T>(matrix_.middleCols(first, count), rows);
    return rows;
  }
  /// Token-major: writes the rows computed in `scratch` by rows(first, count, scratch) into the head. In place:
  /// nothing to do.
  void store(Index first, Index count, const Matrix<T>& scratch) {
    if (token_major_) transpose_into<T>(scratch.topLeftCorner(count, matrix_.rows()), matrix_.middleCols(first, count));
  }

 private:
  HeadOutput(MatrixRef<T> matrix, bool token_major) : matrix_(matrix), token_major_(token_major) {}
  MatrixRef<T> matrix_;
  bool token_major_;
};

/// The HeadRows of a head's block of an input matrix: read in place when the matrix is column-major, token-major
/// (through its transpose, no copy) when it is row-major.
template <class Derived>
HeadRows<typename Derived::Scalar> head_rows(const Eigen::MatrixBase<Derived>& block) {
  using T = typename Derived::Scalar;
  // A strided view would make the Ref below a temporary copy, which the HeadRows would outlive.
  static_assert(int(Derived::InnerStrideAtCompileTime) == 1,
                "polyattn::detail::head_rows reads a head in place: pass a block of a Matrix, RowMajorMatrix or Ref");
  if constexpr (bool(Derived::IsRowMajor))
    return HeadRows<T>::token_major(block.transpose());
  else
    return HeadRows<T>(block);
}

/// The HeadOutput of a head's block of an output matrix (see head_rows()).
template <class Derived>
HeadOutput<typename Derived::Scalar> head_output(const Eigen::MatrixBase<Derived>& block) {
  using T = typename Derived::Scalar;
  static_assert(int(Derived::InnerStrideAtCompileTime) == 1,
                "polyattn::detail::head_output writes a head in place: pass a block of a Matrix, RowMajorMatrix or "
                "Ref");
  Derived& writable = block.const_cast_derived();  // Eigen's idiom for an output expression passed as a temporary
  if constexpr (bool(Derived::IsRowMajor))
    return HeadOutput<T>::token_major(writable.transpose());
  else
    return HeadOutput<T>(writable);
}

}  // namespace detail
}  // namespace polyattn
