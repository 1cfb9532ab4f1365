/// \file nn/linear.hpp
/// Affine layer \f$Y = XW + \mathbf 1 b^\top\f$ on row tokens, forward and backward, with an optional low-rank
/// adapter (LoRA) on the weight.
#pragma once

#include "../parallel/threads.hpp"
#include "lora.hpp"
#include "parameter.hpp"

#include <algorithm>
#include <string>
#include <vector>

namespace polyattn {

/// Options of Linear.
struct LinearOptions {
  /// Input width (rows of \f$W\f$). Required, >= 1.
  Index in_features = 0;
  /// Output width (columns of \f$W\f$). Required, >= 1.
  Index out_features = 0;
  /// Add the bias row \f$b^\top\f$ (default true).
  bool bias = true;
  /// Standard deviation of the initial weights; 0 (default) means \f$1/\sqrt{\text{in\_features}}\f$
  /// (init_fan_in). The bias starts at zero.
  double init_std = 0;
  /// Seed of the initial weights.
  std::uint64_t seed = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::LinearOptions";
    detail::require(in_features >= 1, where, "'in_features' must be >= 1, got ", in_features);
    detail::require(out_features >= 1, where, "'out_features' must be >= 1, got ", out_features);
    detail::require(std::isfinite(init_std) && init_std >= 0, where, "'init_std' must be finite and >= 0, got ",
                    init_std);
  }
};

/// \f$Y = XW + \mathbf 1 b^\top\f$ with \f$X\f$ (n x in), \f$W\f$ (in x out), \f$b\f$ (out), one token per row.
///
/// Backward, for \f$G = \partial L/\partial Y\f$, accumulates
/// \f[ \partial L/\partial W \mathrel{+}= X^\top G,\qquad \partial L/\partial b \mathrel{+}= G^\top\mathbf 1,\qquad
///     \partial L/\partial X \mathrel{+}= G W^\top. \f]
/// Parameters marked `trainable = false` get no gradient (the product is skipped).
///
/// **Low-rank adapter (LoRA, Hu et al. 2021).** add_lora() freezes \f$W\f$ and \f$b\f$ and adds a trainable
/// low-rank update of the weight,
/// \f[ Y = XW + \mathbf 1 b^\top + s\,(XA)B,\qquad s = \alpha / r, \f]
/// with \f$A\f$ (in x r) drawn from \f$\mathcal N(0, \sigma^2)\f$ and \f$B\f$ (r x out) starting at zero, so
/// that a fresh adapter leaves the output unchanged. Backward then also accumulates
/// \f[ \partial L/\partial A \mathrel{+}= s\,X^\top (G B^\top),\qquad
///     \partial L/\partial B \mathrel{+}= s\,(XA)^\top G,\qquad
///     \partial L/\partial X \mathrel{+}= s\,(G B^\top) A^\top, \f]
/// at \f$O(n\,r\,(\text{in}+\text{out}))\f$ beyond the plain layer; forward() keeps \f$XA\f$ (n x r) for it.
/// merge_lora() folds the update into the weight, \f$W \leftarrow W + sAB\f$, and resets \f$B = 0\f$; merged()
/// returns a plain, trainable Linear with weight \f$W + sAB\f$, which costs one GEMM again at inference.
///
/// \code
///   polyattn::Linear<float> fc({/*in=*/64, /*out=*/256}, "block0.mlp.fc");
///   polyattn::Matrix<float> Y(n, 256), dX = polyattn::Matrix<float>::Zero(n, 64);
///   fc.forward(X, Y);
///   fc.backward(X, dY, dX);           // fc.weight.grad, fc.bias.grad and dX accumulate
///
///   fc.add_lora({/*rank=*/4, /*alpha=*/8});   // weight and bias frozen; fc.lora_A, fc.lora_B trainable
///   fc.forward(X, Y);
///   fc.backward(X, dY, dX);           // fc.lora_A.grad, fc.lora_B.grad and dX accumulate
///   polyattn::Linear<float> deployed = fc.merged();
/// \endcode
template <class T>
class Linear {
 public:
  /// \f$W\f$ (in x out), named "<name>.weight".
  Parameter<T> weight;
  /// \f$b^\top\f$ (1 x out), named "<name>.bias"; 0 x 0 when the layer has no bias.
  Parameter<T> bias;
  /// The adapter's \f$A\f$ (in x r), named "<name>.weight.lora_A"; 0 x 0 without an adapter.
  Parameter<T> lora_A;
  /// The adapter's \f$B\f$ (r x out), named "<name>.weight.lora_B"; 0 x 0 without an adapter.
  Parameter<T> lora_B;

  explicit Linear(const LinearOptions& options, const std::string& name = "linear");

  const LinearOptions& options() const { return options_; }
  Index in_features() const { return options_.in_features; }
  Index out_features() const { return options_.out_features; }
  bool has_bias() const { return options_.bias; }

  /// Whether add_lora() has given the layer an adapter.
  bool has_lora() const { return lora_rank_ > 0; }
  /// Rank \f$r\f$ of the adapter; 0 without one.
  Index lora_rank() const { return lora_rank_; }
  /// \f$s = \alpha / r\f$ of the adapter; 0 without one (no update).
  double lora_scale() const { return has_lora() ? lora_options_.scale() : 0.0; }

  /// Adds a LoRA adapter: freezes `weight` and `bias` (`trainable = false`), sets `lora_A` (in x r) to
  /// \f$\mathcal N(0, \sigma^2)\f$ entries drawn from `options.seed` (\f$\sigma\f$ = `options.init_std`, or
  /// \f$1/\sqrt{\text{in}}\f$ when it is 0) and `lora_B` (r x out) to zero, so the output is unchanged.
  /// collect_parameters() lists the two new parameters from now on: build optimizers afterwards.
  ///
  /// Throws std::invalid_argument, changing nothing, on bad options, a rank above \f$\min(\text{in},
  /// \text{out})\f$ or when the layer already has an adapter.
  void add_lora(const LoRAOptions& options);

  /// Throws std::invalid_argument (naming `where`) unless add_lora(`options`) would succeed.
  void check_lora_options(const char* where, const LoRAOptions& options) const;

  /// Folds the adapter into the weight, \f$W \leftarrow W + sAB\f$, and resets \f$B = 0\f$: the output is
  /// unchanged. The adapter stays (so parameters() and optimizers keep their lists, and a further update can be
  /// trained on top; \f$A\f$ keeps its values), and so does the freezing of the weight and bias. Throws
  /// std::invalid_argument without an adapter.
  void merge_lora();

  /// A plain Linear without adapter, with weight \f$W + sAB\f$ (just \f$W\f$ without an adapter), the same bias
  /// and the same forward output, whose weight and bias are trainable.
  Linear<T> merged() const;

  /// Appends the weight, the bias (if any) and the adapter's \f$A\f$, \f$B\f$ (if any) to `out`.
  void collect_parameters(std::vector<Parameter<T>*>& out) {
    out.push_back(&weight);
    if (has_bias()) out.push_back(&bias);
    if (has_lora()) {
      out.push_back(&lora_A);
      out.push_back(&lora_B);
    }
  }

  /// Writes \f$Y = XW + \mathbf 1 b^\top\f$ (plus \f$s\,(XA)B\f$ with an adapter) (n x out) for \f$X\f$ (n x in).
  /// Saves \f$XA\f$ with an adapter, nothing otherwise: backward takes X again.
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y);

  /// Accumulates \f$X^\top G\f$ into `weight.grad`, \f$G^\top\mathbf 1\f$ into `bias.grad`, the adapter's
  /// gradients into `lora_A.grad` and `lora_B.grad`, and \f$\partial L/\partial X\f$ into `dX`, for the X of the
  /// preceding forward() and \f$G\f$ = `dY`. Frozen parameters get no gradient.
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX);

  /// Token rows per parallel block of forward() and backward(): at least 512, so that each block's products
  /// stay efficient GEMMs (\f$X_b^\top G_b\f$ sums over 512 rows), and at least in_features(), so that the
  /// per-block partial weight gradients (in x out each) take no more memory than \f$G\f$ (n x out) itself.
  /// Depends on the layer's shape only, never on the thread count.
  Index block_rows() const { return std::max<Index>(512, in_features()); }

 private:
  void check_parameters(const char* where) const {
    detail::require_parameter_shape(where, weight, in_features(), out_features());
    if (has_bias()) detail::require_parameter_shape(where, bias, 1, out_features());
    if (has_lora()) {
      detail::require_parameter_shape(where, lora_A, in_features(), lora_rank_);
      detail::require_parameter_shape(where, lora_B, lora_rank_, out_features());
    }
  }

  // Block 0 accumulates its gradient term straight into `grad` (with one block this is the serial code); block
  // b > 0 writes slot b - 1 of `partials`, which add_partials() adds in block order after the loop.
  template <class Term>
  static void accumulate(Index block, Matrix<T>& grad, Matrix<T>& partials, const Term& term) {
    if (block == 0)
      grad.noalias() += term;
    else
      partials.middleCols((block - 1) * grad.cols(), grad.cols()).noalias() = term;
  }
  static void add_partials(Matrix<T>& grad, const Matrix<T>& partials) {
    for (Index slot = 0; slot < partials.cols() / grad.cols(); ++slot)
      grad += partials.middleCols(slot * grad.cols(), grad.cols());
  }

  // Empty adapter parameters and workspaces: the state of a layer without adapter.
  void remove_adapter() {
    lora_A = Parameter<T>(weight.name + ".lora_A", 0, 0);
    lora_B = Parameter<T>(weight.name + ".lora_B", 0, 0);
    lora_options_ = LoRAOptions{};
    lora_rank_ = 0;
    input_times_A_.resize(0, 0);
    output_grad_times_Bt_.resize(0, 0);
  }

  LinearOptions options_;
  LoRAOptions lora_options_;
  Index lora_rank_ = 0;
  Matrix<T> input_times_A_, output_grad_times_Bt_;
  // Gradient terms of blocks 1, 2, ... of backward() (slots side by side), reused across calls.
  Matrix<T> weight_partials_, bias_partials_, lora_A_partials_, lora_B_partials_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
Linear<T>::Linear(const LinearOptions& options, const std::string& name)
    : options_(options) {
  detail::static_check_scalar<T>();
  options_.check();
  weight = Parameter<T>(name + ".weight", options_.in_features, options_.out_features);
  const double stddev =
      options_.init_std > 0 ? options_.init_std : 1.0 / std::sqrt(static_cast<double>(options_.in_features));
  init_normal(weight, stddev, options_.seed);
  bias = options_.bias ? Parameter<T>(name + ".bias", 1, options_.out_features, true, false)
                       : Parameter<T>(name + ".bias", 0, 0, true, false);
  remove_adapter();
}

template <class T>
void Linear<T>::add_lora(const LoRAOptions& options) {
  constexpr const char* where = "polyattn::Linear::add_lora";
  check_lora_options(where, options);
  const std::string& base_name = weight.name;
  lora_A = Parameter<T>(base_name + ".lora_A", in_features(), options.rank);
  lora_B = Parameter<T>(base_name + ".lora_B", options.rank, out_features());
  const double stddev =
      options.init_std > 0 ? options.init_std : 1.0 / std::sqrt(static_cast<double>(in_features()));
  init_normal(lora_A, stddev, options.seed);
  lora_options_ = options;
  lora_rank_ = options.rank;
  weight.trainable = false;
  bias.trainable = false;
}

template <class T>
void Linear<T>::check_lora_options(const char* where, const LoRAOptions& options) const {
  options.check();
  detail::require(!has_lora(), where, "'", weight.name, "' already has an adapter (rank ", lora_rank_,
                  "); merge_lora() folds it into the weight");
  const Index max_rank = std::min(in_features(), out_features());
  detail::require(options.rank <= max_rank, where, "'rank' of the adapter of '", weight.name,
                  "' must be <= min(in, out) = ", max_rank, ", got ", options.rank);
}

template <class T>
void Linear<T>::merge_lora() {
  constexpr const char* where = "polyattn::Linear::merge_lora";
  detail::require(has_lora(), where, "'", weight.name, "' has no adapter (add_lora() first)");
  check_parameters(where);
  weight.value.noalias() += static_cast<T>(lora_scale()) * lora_A.value * lora_B.value;
  lora_B.value.setZero();
}

template <class T>
Linear<T> Linear<T>::merged() const {
  check_parameters("polyattn::Linear::merged");
  Linear<T> result = *this;
  if (has_lora()) result.weight.value.noalias() += static_cast<T>(lora_scale()) * lora_A.value * lora_B.value;
  result.remove_adapter();
  result.weight.trainable = true;
  result.bias.trainable = true;
  return result;
}

template <class T>
void Linear<T>::forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) {
  constexpr const char* where = "polyattn::Linear::forward";
  check_parameters(where);
  detail::require_nonempty(where, "X", X);
  detail::require_shape(where, "X", X, X.rows(), in_features());
  detail::require_shape(where, "Y", Y, X.rows(), out_features());
  detail::require_finite_in_parallel(where, "X", X);
  const Index n = X.rows(), rows = block_rows();
  const T s = static_cast<T>(lora_scale());
  if (has_lora()) input_times_A_.resize(n, lora_rank_);
  detail::parallel_for(detail::block_count(n, rows), [&](Index block, int) {
    const Index begin = block * rows, count = std::min(rows, n - begin);
    const auto Xb = X.middleRows(begin, count);
    auto Yb = Y.middleRows(begin, count);
    Yb.noalias() = Xb * weight.value;
    if (has_bias()) Yb.rowwise() += bias.value.row(0);
    if (has_lora()) {
      auto XAb = input_times_A_.middleRows(begin, count);
      XAb.noalias() = Xb * lora_A.value;
      Yb.noalias() += s * XAb * lora_B.value;
    }
  });
}

template <class T>
void Linear<T>::backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) {
  constexpr const char* where = "polyattn::Linear::backward";
  check_parameters(where);
  detail::require_nonempty(where, "X", X);
  detail::require_shape(where, "X", X, X.rows(), in_features());
  detail::require_shape(where, "dY", dY, X.rows(), out_features());
  detail::require_shape(where, "dX", dX, X.rows(), in_features());
  if (has_lora())
    detail::require(input_times_A_.rows() == X.rows() && input_times_A_.cols() == lora_rank_, where,
                    "needs the forward pass of the same 'X' first: saved XA is ", input_times_A_.rows(), "x",
                    input_times_A_.cols(), ", expected ", X.rows(), "x", lora_rank_);
  detail::require_finite_in_parallel(where, "dY", dY);
  const Index n = X.rows(), rows = block_rows(), blocks = detail::block_count(n, rows);
  const bool weight_grad = weight.trainable, bias_grad = has_bias() && bias.trainable;
  const bool A_grad = has_lora() && lora_A.trainable, B_grad = has_lora() && lora_B.trainable;
  const T s = static_cast<T>(lora_scale());
  if (weight_grad) weight_partials_.resize(in_features(), (blocks - 1) * out_features());
  if (bias_grad) bias_partials_.resize(1, (blocks - 1) * out_features());
  if (A_grad) lora_A_partials_.resize(in_features(), (blocks - 1) * lora_rank_);
  if (B_grad) lora_B_partials_.resize(lora_rank_, (blocks - 1) * out_features());
  if (has_lora()) output_grad_times_Bt_.resize(n, lora_rank_);
  detail::parallel_for(blocks, [&](Index block, int) {
    const Index begin = block * rows, count = std::min(rows, n - begin);
    const auto Xb = X.middleRows(begin, count);
    const auto Gb = dY.middleRows(begin, count);
    auto dXb = dX.middleRows(begin, count);
    if (weight_grad) accumulate(block, weight.grad, weight_partials_, Xb.transpose() * Gb);
    if (bias_grad) accumulate(block, bias.grad, bias_partials_, Gb.colwise().sum());
    dXb.noalias() += Gb * weight.value.transpose();
    if (!has_lora()) return;
    const auto XAb = input_times_A_.middleRows(begin, count);
    auto GBtb = output_grad_times_Bt_.middleRows(begin, count);
    GBtb.noalias() = Gb * lora_B.value.transpose();
    if (B_grad) accumulate(block, lora_B.grad, lora_B_partials_, s * XAb.transpose() * Gb);
    if (A_grad) accumulate(block, lora_A.grad, lora_A_partials_, s * Xb.transpose() * GBtb);
    dXb.noalias() += s * GBtb * lora_A.value.transpose();
  });
  if (weight_grad) add_partials(weight.grad, weight_partials_);
  if (bias_grad) add_partials(bias.grad, bias_partials_);
  if (A_grad) add_partials(lora_A.grad, lora_A_partials_);
  if (B_grad) add_partials(lora_B.grad, lora_B_partials_);
}

}  // namespace polyattn
