/// \file linear.hpp
/// Affine layer \f$Y = XW + \mathbf 1 b^\top\f$ on row tokens, forward and backward.
#pragma once

#include "parameter.hpp"

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
/// \code
///   polyattn::Linear<float> fc({/*in=*/64, /*out=*/256}, "block0.mlp.fc");
///   polyattn::Matrix<float> Y(n, 256), dX = polyattn::Matrix<float>::Zero(n, 64);
///   fc.forward(X, Y);
///   fc.backward(X, dY, dX);           // fc.weight.grad, fc.bias.grad and dX accumulate
/// \endcode
template <class T>
class Linear {
 public:
  /// \f$W\f$ (in x out), named "<name>.weight".
  Parameter<T> weight;
  /// \f$b^\top\f$ (1 x out), named "<name>.bias"; 0 x 0 when the layer has no bias.
  Parameter<T> bias;

  explicit Linear(const LinearOptions& options, const std::string& name = "linear") : options_(options) {
    detail::static_check_scalar<T>();
    options_.check();
    weight = Parameter<T>(name + ".weight", options_.in_features, options_.out_features);
    const double stddev =
        options_.init_std > 0 ? options_.init_std : 1.0 / std::sqrt(static_cast<double>(options_.in_features));
    init_normal(weight, stddev, options_.seed);
    bias = options_.bias ? Parameter<T>(name + ".bias", 1, options_.out_features, true, false)
                         : Parameter<T>(name + ".bias", 0, 0, true, false);
  }

  const LinearOptions& options() const { return options_; }
  Index in_features() const { return options_.in_features; }
  Index out_features() const { return options_.out_features; }
  bool has_bias() const { return options_.bias; }

  /// Appends the weight (and the bias, if any) to `out`.
  void collect_parameters(std::vector<Parameter<T>*>& out) {
    out.push_back(&weight);
    if (has_bias()) out.push_back(&bias);
  }

  /// Writes \f$Y = XW + \mathbf 1 b^\top\f$ (n x out) for \f$X\f$ (n x in). Saves nothing: backward takes X again.
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) const {
    constexpr const char* where = "polyattn::Linear::forward";
    check_parameters(where);
    detail::require_nonempty(where, "X", X);
    detail::require_shape(where, "X", X, X.rows(), in_features());
    detail::require_shape(where, "Y", Y, X.rows(), out_features());
    detail::require_finite(where, "X", X);
    Y.noalias() = X * weight.value;
    if (has_bias()) Y.rowwise() += bias.value.row(0);
  }

  /// Accumulates \f$X^\top G\f$ into `weight.grad`, \f$G^\top\mathbf 1\f$ into `bias.grad` and \f$GW^\top\f$
  /// into `dX`, for the X of forward() and \f$G\f$ = `dY`.
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) {
    constexpr const char* where = "polyattn::Linear::backward";
    check_parameters(where);
    detail::require_nonempty(where, "X", X);
    detail::require_shape(where, "X", X, X.rows(), in_features());
    detail::require_shape(where, "dY", dY, X.rows(), out_features());
    detail::require_shape(where, "dX", dX, X.rows(), in_features());
    detail::require_finite(where, "dY", dY);
    if (weight.trainable) weight.grad.noalias() += X.transpose() * dY;
    if (has_bias() && bias.trainable) bias.grad.row(0) += dY.colwise().sum();
    dX.noalias() += dY * weight.value.transpose();
  }

 private:
  void check_parameters(const char* where) const {
    detail::require_parameter_shape(where, weight, in_features(), out_features());
    if (has_bias()) detail::require_parameter_shape(where, bias, 1, out_features());
  }

  LinearOptions options_;
};

}  // namespace polyattn
