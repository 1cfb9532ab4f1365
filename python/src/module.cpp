// polyattn._core: the Python binding of polyattn's attention backends (pybind11). The package python/polyattn/
// re-exports it (polyattn.Attention, polyattn.Options, ...) and adds polyattn.torch on top.
//
// Arrays. polyattn's C++ API reads and writes matrices with one token per row and the heads side by side in
// columns (common.hpp). The binding takes 2-D (tokens, heads * d) arrays and, for polyattn.torch, 4-D (batch, heads,
// tokens, d) ones whose batch elements and heads are the column blocks, float32 or float64, of any strides, without
// copying them in Python. Used in place, with no copy at all:
// - an array whose memory is that matrix column-major (a Fortran-ordered 2-D array or a column block of one; a 4-D
//   array laid out as (batch, heads, d, tokens)), by every method;
// - an array whose memory is that matrix row-major (numpy's C order or a column block of it; a 4-D array with one
//   batch element and head, or the heads view (1, tokens, heads, d) of a projection), by every method when every
//   array of the call is (the backends stage each chunk or block of rows in cache, attention/head_rows.hpp).
// Any other layout is copied (transposed) into a column-major workspace inside the call, with the GIL released,
// and outputs in such a layout are computed in a workspace and copied into them.
//
// Errors. std::invalid_argument becomes ValueError and std::domain_error polyattn.DomainError (a subclass of
// ArithmeticError), with the C++ message; arguments of the wrong type or dtype raise TypeError.
#include <polyattn/extern_templates.hpp>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using polyattn::AttentionBackend;
using polyattn::AttentionMethod;
using polyattn::Certificate;
using polyattn::GradientCertificate;
using polyattn::Index;
using polyattn::PolynomialAttentionOptions;
using polyattn::detail::concat;

template <class T>
using RowMajorMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// ---------------------------------------------------------------------------------------------------------------
// Names of the option values, as Python spells them (the C++ enumerators).

template <class Enum>
struct EnumName {
  Enum value;
  const char* name;
};

constexpr std::array<EnumName<polyattn::PolynomialKind>, 2> polynomial_kind_names{
    {{polyattn::PolynomialKind::taylor, "taylor"}, {polyattn::PolynomialKind::minimax, "minimax"}}};
constexpr std::array<EnumName<polyattn::FeatureMapKind>, 2> feature_map_names{
    {{polyattn::FeatureMapKind::symmetric, "symmetric"}, {polyattn::FeatureMapKind::kronecker, "kronecker"}}};
constexpr std::array<EnumName<polyattn::RangePolicy>, 3> range_policy_names{
    {{polyattn::RangePolicy::raise_degree, "raise_degree"},
     {polyattn::RangePolicy::throw_error, "throw_error"},
     {polyattn::RangePolicy::mark_invalid, "mark_invalid"}}};

template <class Enum, std::size_t N>
Enum parse_name(const std::array<EnumName<Enum>, N>& names, const char* argument, const std::string& name) {
  std::string valid;
  for (const EnumName<Enum>& entry : names) {
    if (name == entry.name) return entry.value;
    valid += valid.empty() ? entry.name : concat(", ", entry.name);
  }
  throw std::invalid_argument(
      concat("polyattn.Options: argument '", argument, "' must be one of ", valid, "; got '", name, "'"));
}

template <class Enum, std::size_t N>
const char* name_of(const std::array<EnumName<Enum>, N>& names, Enum value) {
  for (const EnumName<Enum>& entry : names)
    if (entry.value == value) return entry.name;
  return "?";
}

// ---------------------------------------------------------------------------------------------------------------
// Arrays in and out.

enum class Scalar { float32, float64 };

const char* scalar_name(Scalar scalar) { return scalar == Scalar::float32 ? "float32" : "float64"; }

// The scalar type of a float32 or float64 array; TypeError otherwise.
Scalar scalar_of(const char* where, const char* name, const py::array& array) {
  if (py::isinstance<py::array_t<float>>(array)) return Scalar::float32;
  if (py::isinstance<py::array_t<double>>(array)) return Scalar::float64;
  throw py::type_error(concat(where, ": argument '", name, "' must be a float32 or float64 array, got dtype ",
                              std::string(py::str(array.dtype()))));
}

// The common scalar type of named arrays; TypeError when they differ.
Scalar common_scalar(const char* where, std::initializer_list<std::pair<const char*, const py::array*>> arrays) {
  const auto first = *arrays.begin();
  const Scalar scalar = scalar_of(where, first.first, *first.second);
  for (const auto& [name, array] : arrays)
    if (scalar_of(where, name, *array) != scalar)
      throw py::type_error(concat(where, ": every array must have the dtype of '", first.first, "' (",
                                  scalar_name(scalar), "), got '", name, "' of dtype ",
                                  std::string(py::str(array->dtype()))));
  return scalar;
}

// Bytes copied between callers' arrays and column-major workspaces since the module was loaded (copy_to() and
// copy_from()): the tests read it (polyattn._core._copied_bytes()) to check which layouts are used in place.
std::atomic<std::uint64_t> copied_bytes{0};

// The n x C matrix of the C++ API held by a caller's array of any strides: a 2-D (tokens, heads * d) array, or a
// 4-D (batch, heads, tokens, d) one whose batch elements and heads are the matrix's column blocks, side by side
// (C = batch * heads * d). Construct it with the GIL held (it checks the array and keeps a reference); the copies
// may run without the GIL.
template <class T>
class ArrayMatrix {
 public:
  ArrayMatrix(const char* where, const char* name, py::array array) : array_(std::move(array)) {
    polyattn::detail::require(array_.ndim() == 2 || array_.ndim() == 4, where, "argument '", name,
                              "' must be a 2-D (tokens, heads * head dimension) or 4-D (batch, heads, tokens, head "
                              "dimension) array, got ", array_.ndim(), " dimensions");
    const py::ssize_t size = array_.itemsize();
    const auto extent = [&](py::ssize_t axis) { return static_cast<Index>(array_.shape(axis)); };
    for (py::ssize_t axis = 0; axis < array_.ndim(); ++axis)
      if (extent(axis) > 1 && array_.strides(axis) % size != 0) {  // e.g. a field of a structured array
        array_ = py::module_::import("numpy").attr("ascontiguousarray")(array_);
        break;
      }
    // The stride of an axis of extent 1 is never used, and numpy may report anything for it.
    const auto stride = [&](py::ssize_t axis) {
      return extent(axis) > 1 ? static_cast<Index>(array_.strides(axis) / size) : Index(0);
    };
    // Only outputs are written, and only after OutputArray checked that they are writeable.
    T* data = const_cast<T*>(static_cast<const T*>(array_.data()));
    if (array_.ndim() == 2) {
      rows_ = extent(0);
      cols_ = extent(1);
      blocks_.push_back({data, 0, cols_, stride(0), stride(1)});
    } else {
      batch_ = extent(0);
      heads_ = extent(1);
      rows_ = extent(2);
      const Index d = extent(3);
      cols_ = batch_ * heads_ * d;
      for (Index b = 0; b < batch_; ++b)
        for (Index h = 0; h < heads_; ++h)
          blocks_.push_back({data + b * stride(0) + h * stride(1), (b * heads_ + h) * d, d, stride(2), stride(3)});
    }
    outer_stride_ = detect_column_major();
    if (outer_stride_ == 0) row_stride_ = detect_row_major();
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  int ndim() const { return static_cast<int>(array_.ndim()); }
  Index batch() const { return batch_; }
  Index heads() const { return heads_; }
  const py::array& array() const { return array_; }

  // True when entry (i, j) lies at data + i + j * outer stride: the C++ API can use the array itself.
  bool column_major() const { return outer_stride_ > 0; }
  Eigen::Map<polyattn::Matrix<T>, 0, Eigen::OuterStride<>> map() const {
    return {blocks_.front().data, rows_, cols_, Eigen::OuterStride<>(outer_stride_)};
  }
  // True (and column_major() false) when entry (i, j) lies at data + i * row stride + j: the array is a row-major
  // matrix, which every backend reads and writes in place (numpy's C order, a column block of it, and 4-D
  // arrays whose heads are its column blocks: one head, or the heads view (1, n, heads, d) of a projection).
  bool row_major() const { return row_stride_ > 0; }
  Eigen::Map<polyattn::RowMajorMatrix<T>, 0, Eigen::OuterStride<>> row_map() const {
    return {blocks_.front().data, rows_, cols_, Eigen::OuterStride<>(row_stride_)};
  }

  // Copies the array into `matrix` (rows x cols, column-major). A block whose tokens are contiguous rows (C order,
  // numpy's and torch's default) is a column-major cols x rows matrix, transposed by polyattn's transpose_into() in
  // SIMD tiles (65536 x 16 floats: 0.30 ms against 0.43 for the loop below); any other layout 64 rows at a time:
  // each column of the block is written contiguously while the block's source rows stay in cache. (Row by row,
  // scattering each row over the columns, compiles to scatter instructions: 2.4 against 0.2 ms.)
  void copy_to(polyattn::MatrixRef<T> matrix) const {
    copied_bytes += static_cast<std::uint64_t>(rows_ * cols_) * sizeof(T);
    for (const Block& block : blocks_) {
      if (rows_contiguous(block)) {
        polyattn::detail::transpose_into<T>(rows_as_columns(block), matrix.middleCols(block.first, block.cols));
        continue;
      }
      for (Index i0 = 0; i0 < rows_; i0 += rows_per_copy_block) {
        const Index count = std::min(rows_per_copy_block, rows_ - i0);
        for (Index j = 0; j < block.cols; ++j) {
          T* out = matrix.data() + (block.first + j) * matrix.outerStride() + i0;
          const T* in = block.data + i0 * block.row_stride + j * block.col_stride;
          for (Index i = 0; i < count; ++i) out[i] = in[i * block.row_stride];
        }
      }
    }
  }

  // Copies `matrix` (rows x cols, column-major) into the array; the inverse of copy_to().
  void copy_from(const polyattn::ConstMatrixRef<T>& matrix) const {
    copied_bytes += static_cast<std::uint64_t>(rows_ * cols_) * sizeof(T);
    for (const Block& block : blocks_) {
      if (rows_contiguous(block)) {
        polyattn::detail::transpose_into<T>(matrix.middleCols(block.first, block.cols), rows_as_columns(block));
        continue;
      }
      for (Index i0 = 0; i0 < rows_; i0 += rows_per_copy_block) {
        const Index count = std::min(rows_per_copy_block, rows_ - i0);
        for (Index j = 0; j < block.cols; ++j) {
          const T* in = matrix.data() + (block.first + j) * matrix.outerStride() + i0;
          T* out = block.data + i0 * block.row_stride + j * block.col_stride;
          for (Index i = 0; i < count; ++i) out[i * block.row_stride] = in[i];
        }
      }
    }
  }

 private:
  // Columns [first, first + cols) of the matrix: entry (i, j) at data[i * row_stride + j * col_stride] (elements,
  // either sign).
  struct Block {
    T* data;
    Index first, cols, row_stride, col_stride;
  };

  // Whether each row of `block` is contiguous and the rows follow each other at a positive stride, without overlap.
  bool rows_contiguous(const Block& block) const {
    return (block.cols <= 1 || block.col_stride == 1) && (rows_ <= 1 || block.row_stride >= block.cols);
  }
  // Such a block as the column-major cols x rows matrix it is in memory (one column per row of the block).
  Eigen::Map<polyattn::Matrix<T>, 0, Eigen::OuterStride<>> rows_as_columns(const Block& block) const {
    const Index stride = std::max<Index>(rows_ > 1 ? block.row_stride : 1, block.cols);
    return {block.data, block.cols, rows_, Eigen::OuterStride<>(stride)};
  }

  // The outer stride S when every column c starts at column 0's address + c S (S >= rows, rows contiguous), else 0.
  Index detect_column_major() const {
    if (rows_ == 0 || cols_ == 0) return 0;
    std::vector<const T*> columns;
    for (const Block& block : blocks_) {
      if (rows_ > 1 && block.row_stride != 1) return 0;
      for (Index j = 0; j < block.cols; ++j) columns.push_back(block.data + j * block.col_stride);
    }
    const Index outer = cols_ > 1 ? static_cast<Index>(columns[1] - columns[0]) : rows_;
    if (outer < std::max<Index>(rows_, 1)) return 0;
    for (Index c = 0; c < cols_; ++c)
      if (columns[static_cast<std::size_t>(c)] != columns[0] + c * outer) return 0;
    return outer;
  }

  // The row stride S when every block's entry (i, j) lies at block 0's address + i S + (block.first + j), else 0.
  Index detect_row_major() const {
    if (rows_ == 0 || cols_ == 0) return 0;
    const T* const base = blocks_.front().data;
    const Index stride = rows_ > 1 ? blocks_.front().row_stride : cols_;
    if (stride < cols_) return 0;
    for (const Block& block : blocks_)
      if (!rows_contiguous(block) || (rows_ > 1 && block.row_stride != stride) || block.data != base + block.first)
        return 0;
    return stride;
  }

  static constexpr Index rows_per_copy_block = 64;
  py::array array_;
  Index rows_ = 0, cols_ = 0, batch_ = 1, heads_ = 1, outer_stride_ = 0, row_stride_ = 0;
  std::vector<Block> blocks_;
};

// Column-major workspaces for the copies of arrays in other layouts, kept between calls up to `budget_bytes` in all.
// Fresh memory costs a page fault per 4 KiB page when first written, and the allocator returns freed blocks of this
// size to the system: for a 65536 x 16 float call through polyattn.torch that was 4000 faults per forward pass,
// costing more than the copies themselves.
template <class T>
class WorkspacePool {
 public:
  static constexpr std::size_t budget_bytes = std::size_t(64) << 20;

  struct Buffer {
    std::unique_ptr<T[]> data;
    std::size_t capacity = 0;
  };

  static WorkspacePool& instance() {
    static WorkspacePool pool;
    return pool;
  }

  // The smallest idle buffer of at least `size` elements, or a new one.
  Buffer take(std::size_t size) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it)
        if (it->capacity >= size && (best == idle_.end() || it->capacity < best->capacity)) best = it;
      if (best != idle_.end()) {
        Buffer buffer = std::move(*best);
        idle_.erase(best);
        idle_bytes_ -= buffer.capacity * sizeof(T);
        return buffer;
      }
    }
    return {std::unique_ptr<T[]>(new T[size]), size};
  }

  // Keeps `buffer` for later calls unless that would exceed the budget.
  void give(Buffer buffer) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (idle_bytes_ + buffer.capacity * sizeof(T) > budget_bytes) return;
    idle_bytes_ += buffer.capacity * sizeof(T);
    idle_.push_back(std::move(buffer));
  }

 private:
  std::mutex mutex_;
  std::vector<Buffer> idle_;
  std::size_t idle_bytes_ = 0;
};

// A rows x cols column-major matrix in a pooled buffer, returned to the pool when destroyed.
template <class T>
class Workspace {
 public:
  Workspace(Index rows, Index cols)
      : buffer_(WorkspacePool<T>::instance().take(static_cast<std::size_t>(rows * cols))), rows_(rows), cols_(cols) {}
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() { WorkspacePool<T>::instance().give(std::move(buffer_)); }
  Eigen::Map<polyattn::Matrix<T>> matrix() { return {buffer_.data.get(), rows_, cols_}; }

 private:
  typename WorkspacePool<T>::Buffer buffer_;
  Index rows_, cols_;
};

// An input as the C++ API reads it: the array itself when column-major, else its copy in `workspace`.
template <class T>
polyattn::ConstMatrixRef<T> read(const ArrayMatrix<T>& array, std::optional<Workspace<T>>& workspace) {
  if (array.column_major()) return array.map();
  workspace.emplace(array.rows(), array.cols());
  array.copy_to(workspace->matrix());
  return workspace->matrix();
}

// An output: the caller's `out` (checked: dtype, shape, writeable) or a new array of `shape`, Fortran-ordered when
// `fortran`, else C-ordered. The C++ API writes into the array itself when it is column-major, else into a
// workspace that finish() copies into it.
template <class T>
class OutputArray {
 public:
  OutputArray(const char* where, const char* name, const std::optional<py::array>& out,
              const std::vector<py::ssize_t>& shape, bool fortran)
      : array_(where, name, out ? *out : new_array(shape, fortran)) {
    if (!out) return;
    if (!py::isinstance<py::array_t<T>>(array_.array()))
      throw py::type_error(concat(where, ": argument '", name, "' must have the inputs' dtype ",
                                  scalar_name(std::is_same<T, float>::value ? Scalar::float32 : Scalar::float64),
                                  ", got ", std::string(py::str(array_.array().dtype()))));
    polyattn::detail::require(out->writeable(), where, "argument '", name, "' must be writeable");
    polyattn::detail::require(array_.array().ptr() == out->ptr(), where, "argument '", name,
                              "' must have strides that are multiples of its item size");
    const std::vector<py::ssize_t> actual(out->shape(), out->shape() + out->ndim());
    polyattn::detail::require(actual == shape, where, "argument '", name, "' must have shape ", shape_text(shape),
                              ", got ", shape_text(actual));
  }

  // Where the C++ call writes: the array itself, or a workspace (in `slot` when given, so that the caller can keep
  // the column-major result) that finish() copies into it.
  polyattn::MatrixRef<T> target(std::optional<Workspace<T>>* slot = nullptr) {
    if (array_.column_major()) return array_.map();
    if (slot) workspace_ = slot;
    workspace_->emplace(array_.rows(), array_.cols());
    return (*workspace_)->matrix();
  }
  void finish() {
    if (*workspace_) array_.copy_from((*workspace_)->matrix());
  }
  const py::array& array() const { return array_.array(); }
  // The array as its own row-major matrix (ArrayMatrix::row_major()), written in place.
  const ArrayMatrix<T>& matrix() const { return array_; }

 private:
  static py::array new_array(const std::vector<py::ssize_t>& shape, bool fortran) {
    return fortran ? py::array(py::array_t<T, py::array::f_style>(shape))
                   : py::array(py::array_t<T, py::array::c_style>(shape));
  }
  static std::string shape_text(const std::vector<py::ssize_t>& shape) {
    std::string text = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) text += concat(i ? ", " : "", shape[i]);
    return text + (shape.size() == 1 ? ",)" : ")");
  }
  ArrayMatrix<T> array_;
  std::optional<Workspace<T>> own_workspace_;
  std::optional<Workspace<T>>* workspace_ = &own_workspace_;
};

// Throws std::invalid_argument unless the named output arrays share no memory. The C++ call checks this itself for
// the outputs it writes in place, but not for those computed in workspaces and copied into the caller's arrays.
void require_disjoint_outputs(const char* where, std::initializer_list<std::pair<const char*, py::array>> outputs) {
  const py::object shares_memory = py::module_::import("numpy").attr("shares_memory");
  for (auto a = outputs.begin(); a != outputs.end(); ++a)
    for (auto b = outputs.begin(); b != a; ++b)
      polyattn::detail::require(!shares_memory(b->second, a->second).cast<bool>(), where, "outputs '", b->first,
                                "' and '", a->first, "' overlap in memory; outputs must not alias each other");
}

// The shape of an output laid out like `like` with `cols` columns (2-D) or head dimension `d` (4-D).
template <class T>
std::vector<py::ssize_t> output_shape(const ArrayMatrix<T>& like, Index rows, Index d) {
  if (like.ndim() == 2) return {static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(d)};
  return {static_cast<py::ssize_t>(like.batch()), static_cast<py::ssize_t>(like.heads()),
          static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(d)};
}

// The head dimension of a 4-D array, or the columns of a 2-D one.
template <class T>
Index last_extent(const ArrayMatrix<T>& array) {
  return static_cast<Index>(array.array().shape(array.ndim() - 1));
}

// ---------------------------------------------------------------------------------------------------------------
// polyattn.Attention: one backend per scalar type, created on first use.

class Attention {
 public:
  Attention(const std::string& method, const PolynomialAttentionOptions& options)
      : method_(polyattn::parse_attention_method(method)), options_(options) {
    options_.check();
  }

  const char* method() const { return polyattn::attention_method_name(method_); }
  const PolynomialAttentionOptions& options() const { return options_; }

  py::tuple forward(py::array q, py::array k, py::array v, const std::optional<py::array>& out, bool keep_copies) {
    constexpr const char* where = "polyattn.Attention.forward";
    if (common_scalar(where, {{"q", &q}, {"k", &k}, {"v", &v}}) == Scalar::float32)
      return forward_typed<float>(where, {std::move(q), std::move(k), std::move(v)}, out, keep_copies);
    return forward_typed<double>(where, {std::move(q), std::move(k), std::move(v)}, out, keep_copies);
  }

  py::tuple backward(py::array q, py::array k, py::array v, py::array o, py::array g,
                     const std::optional<py::array>& dq, const std::optional<py::array>& dk,
                     const std::optional<py::array>& dv) {
    constexpr const char* where = "polyattn.Attention.backward";
    if (common_scalar(where, {{"q", &q}, {"k", &k}, {"v", &v}, {"o", &o}, {"g", &g}}) == Scalar::float32)
      return backward_typed<float>(where, {std::move(q), std::move(k), std::move(v), std::move(o), std::move(g)},
                                   {dq, dk, dv});
    return backward_typed<double>(where, {std::move(q), std::move(k), std::move(v), std::move(o), std::move(g)},
                                  {dq, dk, dv});
  }

  // (wall-clock, process CPU) seconds of each of `repeats` forward+backward calls on one backend, entirely in C++
  // on copies of the inputs, column-major or (`row_major`) row-major, after one untimed call (so
  // that every timed call finds its outputs and workspaces in memory, as Google Benchmark's iterations do): what
  // the call costs without Python, for the binding-overhead benchmark.
  std::vector<std::pair<double, double>> time_forward_backward(py::array q, py::array k, py::array v, py::array g,
                                                               int repeats, bool row_major) {
    constexpr const char* where = "polyattn.Attention._time_forward_backward";
    polyattn::detail::require(repeats >= 1, where, "argument 'repeats' must be >= 1, got ", repeats);
    if (common_scalar(where, {{"q", &q}, {"k", &k}, {"v", &v}, {"g", &g}}) == Scalar::float32)
      return time_typed<float>(where, {std::move(q), std::move(k), std::move(v), std::move(g)}, repeats, row_major);
    return time_typed<double>(where, {std::move(q), std::move(k), std::move(v), std::move(g)}, repeats, row_major);
  }

 private:
  template <class T>
  AttentionBackend<T>& backend() {
    auto& slot = std::get<std::unique_ptr<AttentionBackend<T>>>(backends_);
    if (!slot) slot = polyattn::make_attention_backend<T>(method_, options_);
    return *slot;
  }

  // When every array is row-major (ArrayMatrix::row_major()), calls `call(backend)`, whose row-major overloads read
  // and write the arrays in place, bitwise as on column-major copies, and returns true. Otherwise returns false: the
  // caller then copies the arrays that are not column-major.
  template <class T, class Call>
  bool call_in_place(std::initializer_list<const ArrayMatrix<T>*> arrays, const Call& call) {
    for (const ArrayMatrix<T>* array : arrays)
      if (!array->row_major()) return false;
    call(backend<T>());
    return true;
  }

  // Arrays of one call: all 2-D, or all 4-D with the same batch and heads, whose product must be the option
  // `heads` (each batch element's head is a head of the C++ call).
  template <class T, std::size_t N>
  std::array<ArrayMatrix<T>, N> arrays(const char* where, std::array<py::array, N> arrays,
                                       const std::array<const char*, N>& names) const {
    std::array<ArrayMatrix<T>, N> result = make_arrays<T>(where, std::move(arrays), names,
                                                          std::make_index_sequence<N>());
    const ArrayMatrix<T>& first = result[0];
    for (std::size_t i = 1; i < N; ++i)
      polyattn::detail::require(result[i].ndim() == first.ndim() && result[i].batch() == first.batch() &&
                                    result[i].heads() == first.heads(),
                                where, "arguments '", names[0], "' and '", names[i],
                                "' must both be 2-D or both 4-D with the same batch and heads, got ",
                                shape_of(first), " and ", shape_of(result[i]));
    if (first.ndim() == 4)
      polyattn::detail::require(first.batch() * first.heads() == options_.attention.heads, where,
                                "4-D arrays (batch, heads, tokens, head dimension) need the option heads = batch * "
                                "heads = ", first.batch() * first.heads(), ", got ", options_.attention.heads);
    return result;
  }

  template <class T, std::size_t N, std::size_t... I>
  static std::array<ArrayMatrix<T>, N> make_arrays(const char* where, std::array<py::array, N> arrays,
                                                   const std::array<const char*, N>& names,
                                                   std::index_sequence<I...>) {
    return {ArrayMatrix<T>(where, names[I], std::move(arrays[I]))...};
  }

  template <class T>
  static std::string shape_of(const ArrayMatrix<T>& array) {
    std::string text = "(";
    for (py::ssize_t i = 0; i < array.array().ndim(); ++i) text += concat(i ? ", " : "", array.array().shape(i));
    return text + ")";
  }

  // Column-major copies of a forward call's q, k, v and o that the next backward() may read instead of copying the
  // same arrays again (Attention.forward's keep_copies), with the identity of each array.
  template <class T>
  struct KeptCopies {
    struct Kept {
      std::optional<Workspace<T>> copy;
      const void* data = nullptr;
      std::vector<py::ssize_t> shape, strides;
    };
    std::array<Kept, 4> inputs;  // q, k, v, o

    // Records which array inputs[i].copy (if the call made one) is the copy of.
    void remember(std::size_t i, const py::array& array) {
      Kept& kept = inputs[i];
      if (!kept.copy) return;  // the C++ call read the array itself
      kept.data = array.data();
      kept.shape.assign(array.shape(), array.shape() + array.ndim());
      kept.strides.assign(array.strides(), array.strides() + array.ndim());
    }
    // The kept copy of `array` (the same memory, shape and strides), else null.
    std::optional<Workspace<T>>* find(std::size_t i, const py::array& array) {
      Kept& kept = inputs[i];
      // The four-iterator std::equal also compares the lengths (the number of dimensions).
      if (!kept.copy || kept.data != array.data() ||
          !std::equal(kept.shape.begin(), kept.shape.end(), array.shape(), array.shape() + array.ndim()) ||
          !std::equal(kept.strides.begin(), kept.strides.end(), array.strides(), array.strides() + array.ndim()))
        return nullptr;
      return &kept.copy;
    }
    void clear() {
      for (Kept& kept : inputs) {
        kept.copy.reset();
        kept.data = nullptr;
        kept.shape.clear();
        kept.strides.clear();
      }
    }
  };

  template <class T>
  py::tuple forward_typed(const char* where, std::array<py::array, 3> inputs, const std::optional<py::array>& out,
                          bool keep_copies) {
    auto [Q, K, V] = arrays<T>(where, std::move(inputs), {"q", "k", "v"});
    // New outputs follow q: Fortran order for a column-major 2-D q, else C order.
    const bool fortran = Q.ndim() == 2 && Q.column_major();
    OutputArray<T> O(where, "out", out, output_shape(Q, Q.rows(), last_extent(V)), fortran);
    Certificate certificate;
    {
      py::gil_scoped_release release;
      const std::lock_guard<std::mutex> lock(mutex_);
      KeptCopies<T>& kept = std::get<KeptCopies<T>>(kept_);
      kept.clear();
      // With keep_copies the copies are made in the kept slots, else in these, freed on return.
      std::array<std::optional<Workspace<T>>, 4> local;
      const auto slot = [&](std::size_t i) -> std::optional<Workspace<T>>& {
        return keep_copies ? kept.inputs[i].copy : local[i];
      };
      const bool in_place = call_in_place<T>({&Q, &K, &V, &O.matrix()}, [&](auto& attention) {
        auto O_rows = O.matrix().row_map();
        certificate = attention.forward(Q.row_map(), K.row_map(), V.row_map(), O_rows);
      });
      if (!in_place) {
        certificate =
            backend<T>().forward(read(Q, slot(0)), read(K, slot(1)), read(V, slot(2)), O.target(&slot(3)));
        O.finish();
      }
      if (keep_copies) {
        kept.remember(0, Q.array());
        kept.remember(1, K.array());
        kept.remember(2, V.array());
        kept.remember(3, O.array());
      }
    }
    return py::make_tuple(O.array(), certificate);
  }

  template <class T>
  py::tuple backward_typed(const char* where, std::array<py::array, 5> inputs,
                           const std::array<std::optional<py::array>, 3>& outputs) {
    auto [Q, K, V, O, G] = arrays<T>(where, std::move(inputs), {"q", "k", "v", "o", "g"});
    const bool fortran = Q.ndim() == 2 && Q.column_major();
    OutputArray<T> dQ(where, "dq", outputs[0], output_shape(Q, Q.rows(), last_extent(Q)), fortran),
        dK(where, "dk", outputs[1], output_shape(K, K.rows(), last_extent(K)), fortran),
        dV(where, "dv", outputs[2], output_shape(V, V.rows(), last_extent(V)), fortran);
    require_disjoint_outputs(where, {{"dq", dQ.array()}, {"dk", dK.array()}, {"dv", dV.array()}});
    GradientCertificate certificate;
    {
      py::gil_scoped_release release;
      const std::lock_guard<std::mutex> lock(mutex_);
      // The copies a forward(keep_copies=True) kept of these very arrays, else new ones.
      KeptCopies<T>& kept = std::get<KeptCopies<T>>(kept_);
      std::array<std::optional<Workspace<T>>, 4> copies;
      const auto input = [&](std::size_t i, const ArrayMatrix<T>& array) -> polyattn::ConstMatrixRef<T> {
        if (std::optional<Workspace<T>>* copy = kept.find(i, array.array())) return (*copy)->matrix();
        return read(array, copies[i]);
      };
      const bool in_place = call_in_place<T>(
          {&Q, &K, &V, &O, &G, &dQ.matrix(), &dK.matrix(), &dV.matrix()}, [&](auto& attention) {
            auto dQ_rows = dQ.matrix().row_map();
            auto dK_rows = dK.matrix().row_map();
            auto dV_rows = dV.matrix().row_map();
            certificate = attention.backward(Q.row_map(), K.row_map(), V.row_map(), O.row_map(), G.row_map(),
                                             dQ_rows, dK_rows, dV_rows);
          });
      if (!in_place) {
        std::optional<Workspace<T>> g_copy;
        certificate = backend<T>().backward(input(0, Q), input(1, K), input(2, V), input(3, O), read(G, g_copy),
                                            dQ.target(), dK.target(), dV.target());
        dQ.finish();
        dK.finish();
        dV.finish();
      }
      kept.clear();
    }
    return py::make_tuple(dQ.array(), dK.array(), dV.array(), certificate);
  }

  template <class T>
  std::vector<std::pair<double, double>> time_typed(const char* where, std::array<py::array, 4> inputs, int repeats,
                                                    bool row_major) {
    auto [Qa, Ka, Va, Ga] = arrays<T>(where, std::move(inputs), {"q", "k", "v", "g"});
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    polyattn::Matrix<T> Q(Qa.rows(), Qa.cols()), K(Ka.rows(), Ka.cols()), V(Va.rows(), Va.cols()),
        G(Ga.rows(), Ga.cols());
    Qa.copy_to(Q);
    Ka.copy_to(K);
    Va.copy_to(V);
    Ga.copy_to(G);
    return row_major ? time_calls<polyattn::RowMajorMatrix<T>>(backend<T>(), Q, K, V, G, repeats)
                     : time_calls<polyattn::Matrix<T>>(backend<T>(), Q, K, V, G, repeats);
  }

  // time_typed()'s loop on copies of Q, K, V, G of type Stored.
  template <class Stored, class Backend>
  static std::vector<std::pair<double, double>> time_calls(Backend& attention, const Stored& Q, const Stored& K,
                                                           const Stored& V, const Stored& G, int repeats) {
    Stored O(Q.rows(), V.cols()), dQ(Q.rows(), Q.cols()), dK(K.rows(), K.cols()), dV(V.rows(), V.cols());
    attention.forward(Q, K, V, O);
    attention.backward(Q, K, V, O, G, dQ, dK, dV);
    std::vector<std::pair<double, double>> seconds;
    for (int repeat = 0; repeat < repeats; ++repeat) {
      const auto start = std::chrono::steady_clock::now();
      const std::clock_t cpu_start = std::clock();
      attention.forward(Q, K, V, O);
      attention.backward(Q, K, V, O, G, dQ, dK, dV);
      seconds.emplace_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                           static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC);
    }
    return seconds;
  }

  AttentionMethod method_;
  PolynomialAttentionOptions options_;
  std::tuple<std::unique_ptr<AttentionBackend<float>>, std::unique_ptr<AttentionBackend<double>>> backends_;
  std::tuple<KeptCopies<float>, KeptCopies<double>> kept_;
  // The C++ backends keep workspaces and must not run two calls at once; the GIL is released while they compute.
  std::mutex mutex_;
};

// The value of an optional float as Python prints it.
std::string repr_optional(const std::optional<double>& value) {
  return value ? std::string(py::repr(py::float_(*value))) : "None";
}

std::string repr(const PolynomialAttentionOptions& o) {
  return concat("polyattn.Options(causal=", o.attention.causal ? "True" : "False", ", heads=", o.attention.heads,
                ", scale=", repr_optional(o.attention.scale), ", degree=", o.degree, ", polynomial='",
                name_of(polynomial_kind_names, o.kind), "', feature_map='", name_of(feature_map_names, o.feature_map),
                "', radius=", std::string(py::repr(py::float_(o.radius))), ", range_policy='",
                name_of(range_policy_names, o.range_policy), "', chunk_size=", o.chunk_size,
                ", estimate_error=", o.estimate_error ? "True" : "False", ", estimate_rows=", o.estimate_rows,
                ", seed=", o.seed, ", max_features=", o.max_features, ", scan_window_bytes=", o.scan_window_bytes,
                ", max_checkpoint_bytes=", o.max_checkpoint_bytes, ")");
}

std::string repr(const Certificate& c) {
  const auto number = [](double x) { return std::string(py::repr(py::float_(x))); };
  return concat("polyattn.Certificate(radius=", number(c.radius), ", interval=", number(c.interval),
                ", degree=", c.degree, ", features=", c.features, ", poly_error=", number(c.poly_error),
                ", positive=", c.positive ? "True" : "False", ", output_bound=", number(c.output_bound),
                ", valid=", c.valid ? "True" : "False", ", sampled_rows=", c.sampled_rows,
                ", sampled_max_error=", number(c.sampled_max_error),
                ", sampled_mean_error=", number(c.sampled_mean_error), ")");
}

std::string repr(const GradientCertificate& c) {
  const auto number = [](double x) { return std::string(py::repr(py::float_(x))); };
  return concat("polyattn.GradientCertificate(forward=", repr(c.forward), ", dv_bound=", number(c.dv_bound),
                ", dqk_bound=", number(c.dqk_bound), ", dq_bound=", number(c.dq_bound), ", dk_bound=",
                number(c.dk_bound), ", derivative_error=", number(c.derivative_error), ")");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "polyattn's attention backends for numpy arrays (the C++ extension behind the polyattn package).";

  // Registered after pybind11's own translators, so it takes precedence over std::domain_error -> ValueError.
  py::register_exception<std::domain_error>(m, "DomainError", PyExc_ArithmeticError);
  m.attr("DomainError").attr("__doc__") =
      "A computation that cannot hold mathematically or numerically (C++ std::domain_error): finite input whose "
      "scores or sums overflow the dtype, a polynomial not positive on the scores, a score radius outside the "
      "configured interval under range_policy='throw_error'. The message says what and why.";

  m.attr("methods") = py::make_tuple("exact_reference", "exact_blocked", "paper", "adjoint");

  const PolynomialAttentionOptions defaults;
  py::class_<PolynomialAttentionOptions>(m, "Options",
                                         "Options of an attention call (C++ PolynomialAttentionOptions); the exact "
                                         "methods read only causal, heads and scale.")
      .def(py::init([](bool causal, Index heads, std::optional<double> scale, int degree,
                       const std::string& polynomial, const std::string& feature_map, double radius,
                       const std::string& range_policy, Index chunk_size, bool estimate_error, Index estimate_rows,
                       std::uint64_t seed, Index max_features, std::size_t scan_window_bytes,
                       std::size_t max_checkpoint_bytes) {
             PolynomialAttentionOptions options;
             options.attention.causal = causal;
             options.attention.heads = heads;
             options.attention.scale = scale;
             options.degree = degree;
             options.kind = parse_name(polynomial_kind_names, "polynomial", polynomial);
             options.feature_map = parse_name(feature_map_names, "feature_map", feature_map);
             options.radius = radius;
             options.range_policy = parse_name(range_policy_names, "range_policy", range_policy);
             options.chunk_size = chunk_size;
             options.estimate_error = estimate_error;
             options.estimate_rows = estimate_rows;
             options.seed = seed;
             options.max_features = max_features;
             options.scan_window_bytes = scan_window_bytes;
             options.max_checkpoint_bytes = max_checkpoint_bytes;
             options.check();
             return options;
           }),
           py::kw_only(), py::arg("causal") = defaults.attention.causal, py::arg("heads") = defaults.attention.heads,
           py::arg("scale") = defaults.attention.scale, py::arg("degree") = defaults.degree,
           py::arg("polynomial") = name_of(polynomial_kind_names, defaults.kind),
           py::arg("feature_map") = name_of(feature_map_names, defaults.feature_map),
           py::arg("radius") = defaults.radius,
           py::arg("range_policy") = name_of(range_policy_names, defaults.range_policy),
           py::arg("chunk_size") = defaults.chunk_size, py::arg("estimate_error") = defaults.estimate_error,
           py::arg("estimate_rows") = defaults.estimate_rows, py::arg("seed") = defaults.seed,
           py::arg("max_features") = defaults.max_features,
           py::arg("scan_window_bytes") = defaults.scan_window_bytes,
           py::arg("max_checkpoint_bytes") = defaults.max_checkpoint_bytes,
           "Checks every value (ValueError naming the field). causal: mask, query i sees keys j <= i + (m - n); "
           "heads: Q, K, V split into that many column blocks; scale: score scale c (None: 1/sqrt(head dim)); "
           "degree: degree g of the polynomial; polynomial: 'taylor' or 'minimax'; feature_map: 'symmetric' or "
           "'kronecker'; radius: interval the polynomial is chosen for (0: the measured R of each call); "
           "range_policy: 'raise_degree', 'throw_error' or 'mark_invalid' when R > radius; chunk_size: rows per "
           "block (0: automatic); estimate_error, estimate_rows, seed: exact attention on sampled rows; "
           "max_features, scan_window_bytes, max_checkpoint_bytes: memory limits (see polynomial_attention.hpp).")
      .def_property_readonly("causal", [](const PolynomialAttentionOptions& o) { return o.attention.causal; })
      .def_property_readonly("heads", [](const PolynomialAttentionOptions& o) { return o.attention.heads; })
      .def_property_readonly("scale", [](const PolynomialAttentionOptions& o) { return o.attention.scale; })
      .def_readonly("degree", &PolynomialAttentionOptions::degree)
      .def_property_readonly("polynomial",
                             [](const PolynomialAttentionOptions& o) { return name_of(polynomial_kind_names, o.kind); })
      .def_property_readonly("feature_map", [](const PolynomialAttentionOptions& o) {
        return name_of(feature_map_names, o.feature_map);
      })
      .def_readonly("radius", &PolynomialAttentionOptions::radius)
      .def_property_readonly("range_policy", [](const PolynomialAttentionOptions& o) {
        return name_of(range_policy_names, o.range_policy);
      })
      .def_readonly("chunk_size", &PolynomialAttentionOptions::chunk_size)
      .def_readonly("estimate_error", &PolynomialAttentionOptions::estimate_error)
      .def_readonly("estimate_rows", &PolynomialAttentionOptions::estimate_rows)
      .def_readonly("seed", &PolynomialAttentionOptions::seed)
      .def_readonly("max_features", &PolynomialAttentionOptions::max_features)
      .def_readonly("scan_window_bytes", &PolynomialAttentionOptions::scan_window_bytes)
      .def_readonly("max_checkpoint_bytes", &PolynomialAttentionOptions::max_checkpoint_bytes)
      .def("__repr__", [](const PolynomialAttentionOptions& o) { return repr(o); });

  py::class_<Certificate>(m, "Certificate", "What a forward call states about its error (C++ Certificate).")
      .def_readonly("radius", &Certificate::radius, "measured score radius R = c max|q| max|k| (max over heads)")
      .def_readonly("interval", &Certificate::interval, "the polynomial's certified interval [-interval, interval]")
      .def_readonly("degree", &Certificate::degree, "degree used")
      .def_readonly("features", &Certificate::features, "feature width r")
      .def_readonly("poly_error", &Certificate::poly_error, "eps: certified max |p(x) exp(-x) - 1| on the interval")
      .def_readonly("positive", &Certificate::positive, "p certified positive on the interval")
      .def_readonly("output_bound", &Certificate::output_bound,
                    "bound on every entry of the output's error, unless vacuous (inf when eps >= 1)")
      .def_readonly("valid", &Certificate::valid, "False when R exceeded the interval (range_policy='mark_invalid')")
      .def_readonly("sampled_rows", &Certificate::sampled_rows, "rows of the a-posteriori estimate (0: not run)")
      .def_readonly("sampled_max_error", &Certificate::sampled_max_error, "largest sampled relative row error")
      .def_readonly("sampled_mean_error", &Certificate::sampled_mean_error, "mean sampled relative row error")
      .def_property_readonly("vacuous", &Certificate::vacuous, "True when no a-priori bound holds")
      .def("__repr__", [](const Certificate& c) { return repr(c); });

  py::class_<GradientCertificate>(m, "GradientCertificate",
                                  "What a backward call states about its error (C++ GradientCertificate); exact "
                                  "methods leave every bound at 0.")
      .def_readonly("forward", &GradientCertificate::forward, "the forward pass's Certificate")
      .def_readonly("dv_bound", &GradientCertificate::dv_bound, "bound on every entry of the dV error")
      .def_readonly("dqk_bound", &GradientCertificate::dqk_bound, "bound on every entry of the dQ and dK errors")
      .def_readonly("dq_bound", &GradientCertificate::dq_bound, "bound on every entry of the dQ error")
      .def_readonly("dk_bound", &GradientCertificate::dk_bound, "bound on every entry of the dK error")
      .def_readonly("derivative_error", &GradientCertificate::derivative_error,
                    "eps': certified max |p'(x) exp(-x) - 1| (adjoint), 0 (exact), NaN (paper: not applicable)")
      .def("__repr__", [](const GradientCertificate& c) { return repr(c); });

  py::class_<Attention>(m, "Attention",
                        "Attention by one method (exact_reference, exact_blocked, paper, adjoint) on float32 or "
                        "float64 arrays: q, k 2-D (tokens, heads * d_k) and v (tokens, heads * d_v), heads side by "
                        "side; or all 4-D (batch, heads, tokens, d) with the option heads = batch * heads. forward() "
                        "saves what backward() needs, so call backward() with the same q, k, v and the o forward() "
                        "returned. One object runs one call at a time (calls from several threads wait for each "
                        "other).")
      .def(py::init<const std::string&, const PolynomialAttentionOptions&>(), py::arg("method"), py::arg("options"))
      .def(py::init([](const std::string& method, const py::kwargs& options) {
             return std::make_unique<Attention>(
                 method, py::type::of<PolynomialAttentionOptions>()(**options).cast<PolynomialAttentionOptions>());
           }),
           py::arg("method") = "adjoint", "Attention(method='adjoint', **options): options as for polyattn.Options")
      .def_property_readonly("method", &Attention::method)
      .def_property_readonly("options", &Attention::options)
      .def("forward", &Attention::forward, py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(),
           py::arg("out") = py::none(), py::arg("keep_copies") = false,
           "Returns (o, Certificate); o has v's heads * d_v (or d_v) for q's tokens. New outputs are "
           "Fortran-ordered when q is (then computed in place), else C-ordered; `out`, a writeable array of that "
           "shape and dtype in any layout, receives o instead. keep_copies=True keeps the column-major copies this "
           "call makes of q, k, v and o (arrays not in that layout) for the next backward() on the same arrays, "
           "which then skips copying them again: only for callers that guarantee the arrays are not modified in "
           "between (polyattn.torch: autograd's saved tensors).")
      .def("backward", &Attention::backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("g"),
           py::kw_only(), py::arg("dq") = py::none(), py::arg("dk") = py::none(), py::arg("dv") = py::none(),
           "Given g = dL/do for the o of the last forward(q, k, v), returns (dq, dk, dv, GradientCertificate); "
           "overwrites dq, dk, dv when given.")
      .def("_time_forward_backward", &Attention::time_forward_backward, py::arg("q"), py::arg("k"), py::arg("v"),
           py::arg("g"), py::arg("repeats"), py::arg("row_major") = false,
           "(wall-clock, process CPU) seconds of each of `repeats` forward+backward calls run in C++ on one backend, "
           "after an untimed one, on column-major (or, row_major=True, row-major) copies of the "
           "inputs made first (for benchmarks).");

  m.def("set_num_threads", &polyattn::set_num_threads, py::arg("threads"),
        "Threads polyattn's loops use; 0 restores the default (OMP_NUM_THREADS, else every core). Results do not "
        "depend on it.");
  m.def("num_threads", &polyattn::num_threads, "Threads polyattn's loops use (1 without OpenMP).");
  m.def("_copied_bytes", [] { return copied_bytes.load(); },
        "Bytes the binding has copied between arrays and column-major workspaces since it was loaded (for tests: "
        "arrays used in place add nothing).");
}
