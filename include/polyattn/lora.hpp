/// \file lora.hpp
/// Low-rank adaptation (LoRA, Hu et al. 2021) of a Linear layer with frozen base weights.
#pragma once

#include "linear.hpp"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace polyattn {

/// Options of LoRALinear.
struct LoRAOptions {
  /// Rank \f$r\f$ of the update \f$AB\f$; \f$1 \le r \le \min(\text{in}, \text{out})\f$ (a larger rank adds
  /// nothing a full update could not do, and costs more). Default 4.
  Index rank = 4;
  /// \f$\alpha\f$: the update is scaled by \f$s = \alpha / r\f$, so that changing the rank does not change the
  /// effective learning rate of the adapter. Default 8 (\f$s = 2\f$ at the default rank).
  double alpha = 8;
  /// Standard deviation of the initial \f$A\f$; 0 (default) means \f$1/\sqrt{\text{in}}\f$. \f$B\f$ starts at
  /// zero, so a fresh adapter leaves the layer's output unchanged.
  double init_std = 0;
  /// Seed of the initial \f$A\f$.
  std::uint64_t seed = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::LoRAOptions";
    detail::require(rank >= 1, where, "'rank' must be >= 1, got ", rank);
    detail::require_positive(where, "alpha", alpha);
    detail::require(std::isfinite(init_std) && init_std >= 0, where, "'init_std' must be finite and >= 0, got ",
                    init_std);
  }
};

/// A Linear layer with frozen base weights plus a trainable low-rank update:
/// \f[ Y = X W + \mathbf 1 b^\top + s\, X A B,\qquad s = \alpha / r, \f]
/// \f$A\f$ (in x r), \f$B\f$ (r x out). Only \f$A\f$ and \f$B\f$ are trainable; with \f$G = \partial L/\partial Y\f$,
/// backward accumulates
/// \f[ \partial L/\partial A \mathrel{+}= s\, X^\top (G B^\top),\qquad
///     \partial L/\partial B \mathrel{+}= s\,(XA)^\top G,\qquad
///     \partial L/\partial X \mathrel{+}= G W^\top + s\,(G B^\top) A^\top, \f]
/// at \f$O(n\,r\,(\text{in}+\text{out}))\f$ beyond the base layer. The base weight and bias are marked
/// `trainable = false`, so they get no gradient and optimizers never change them. merge() folds the update into
/// the base weight, \f$W \leftarrow W + sAB\f$, after which inference costs one GEMM again.
///
/// \code
///   polyattn::Linear<float> wq({64, 64, false}, "block0.attn.wq");      // pretrained
///   polyattn::LoRALinear<float> adapted(std::move(wq), {/*rank=*/4, /*alpha=*/8});
///   adapted.forward(X, Y);
///   adapted.backward(X, dY, dX);      // adapted.A.grad, adapted.B.grad and dX accumulate
///   polyattn::Linear<float> deployed = adapted.merged();
/// \endcode
template <class T>
class LoRALinear {
 public:
  /// The adapted layer; its weight and bias are frozen by the constructor.
  Linear<T> base;
  /// \f$A\f$ (in x r), named "<base weight name>.lora_A".
  Parameter<T> A;
  /// \f$B\f$ (r x out), named "<base weight name>.lora_B".
  Parameter<T> B;

  LoRALinear(Linear<T> base_layer, const LoRAOptions& options) : base(std::move(base_layer)), options_(options) {
    options_.check();
    const Index max_rank = std::min(base.in_features(), base.out_features());
    detail::require(options_.rank <= max_rank, "polyattn::LoRALinear", "'rank' must be <= min(in, out) = ",
                    max_rank, ", got ", options_.rank);
    base.weight.trainable = false;
    base.bias.trainable = false;
    A = Parameter<T>(base.weight.name + ".lora_A", base.in_features(), options_.rank);
    B = Parameter<T>(base.weight.name + ".lora_B", options_.rank, base.out_features());
    const double stddev =
        options_.init_std > 0 ? options_.init_std : 1.0 / std::sqrt(static_cast<double>(base.in_features()));
    init_normal(A, stddev, options_.seed);
  }

  const LoRAOptions& options() const { return options_; }
  Index in_features() const { return base.in_features(); }
  Index out_features() const { return base.out_features(); }
  Index rank() const { return options_.rank; }
  /// \f$s = \alpha / r\f$.
  double scale() const { return options_.alpha / static_cast<double>(options_.rank); }

  /// Appends the frozen base parameters and the trainable \f$A\f$, \f$B\f$ to `out`.
  void collect_parameters(std::vector<Parameter<T>*>& out) {
    base.collect_parameters(out);
    out.push_back(&A);
    out.push_back(&B);
  }

  /// Writes \f$Y = XW + \mathbf 1 b^\top + s\,XAB\f$ (n x out); saves \f$XA\f$ (n x r) for backward.
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) {
    constexpr const char* where = "polyattn::LoRALinear::forward";
    check_adapter(where);
    detail::require_nonempty(where, "X", X);
    detail::require_shape(where, "X", X, X.rows(), in_features());
    detail::require_shape(where, "Y", Y, X.rows(), out_features());
    detail::require_finite(where, "X", X);
    base.forward(X, Y);
    input_times_A_.noalias() = X * A.value;
    Y.noalias() += static_cast<T>(scale()) * input_times_A_ * B.value;
  }

  /// Accumulates the gradients of \f$A\f$, \f$B\f$ (and of the base parameters only if unfrozen) and of `dX`,
  /// for the X of the preceding forward() and `dY` \f$= \partial L/\partial Y\f$.
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) {
    constexpr const char* where = "polyattn::LoRALinear::backward";
    check_adapter(where);
    detail::require_nonempty(where, "X", X);
    detail::require_shape(where, "X", X, X.rows(), in_features());
    detail::require_shape(where, "dY", dY, X.rows(), out_features());
    detail::require_shape(where, "dX", dX, X.rows(), in_features());
    detail::require(input_times_A_.rows() == X.rows() && input_times_A_.cols() == rank(), where,
                    "needs the forward pass of the same 'X' first: saved XA is ", input_times_A_.rows(), "x",
                    input_times_A_.cols(), ", expected ", X.rows(), "x", rank());
    detail::require_finite(where, "dY", dY);
    base.backward(X, dY, dX);
    const T s = static_cast<T>(scale());
    output_grad_times_Bt_.noalias() = dY * B.value.transpose();
    if (B.trainable) B.grad.noalias() += s * input_times_A_.transpose() * dY;
    if (A.trainable) A.grad.noalias() += s * X.transpose() * output_grad_times_Bt_;
    dX.noalias() += s * output_grad_times_Bt_ * A.value.transpose();
  }

  /// A plain, trainable Linear with weight \f$W + sAB\f$ and the base bias: the same forward, one GEMM.
  Linear<T> merged() const {
    check_adapter("polyattn::LoRALinear::merged");
    Linear<T> result = base;
    result.weight.value.noalias() += static_cast<T>(scale()) * A.value * B.value;
    result.weight.trainable = true;
    result.bias.trainable = true;
    return result;
  }

  /// Folds the update into the base weight, \f$W \leftarrow W + sAB\f$, and resets \f$B = 0\f$: the forward
  /// output is unchanged and a further adapter can be trained on top (A keeps its values).
  void merge() {
    check_adapter("polyattn::LoRALinear::merge");
    base.weight.value.noalias() += static_cast<T>(scale()) * A.value * B.value;
    B.value.setZero();
  }

 private:
  void check_adapter(const char* where) const {
    detail::require_parameter_shape(where, A, in_features(), rank());
    detail::require_parameter_shape(where, B, rank(), out_features());
  }

  LoRAOptions options_;
  Matrix<T> input_times_A_, output_grad_times_Bt_;
};

}  // namespace polyattn
