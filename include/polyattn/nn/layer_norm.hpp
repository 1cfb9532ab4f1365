/// \file nn/layer_norm.hpp
/// Layer normalisation over the features of each token (Ba, Kiros & Hinton 2016), forward and backward.
#pragma once

#include "../parallel/threads.hpp"
#include "parameter.hpp"

#include <algorithm>
#include <string>
#include <vector>

namespace polyattn {

/// Options of LayerNorm.
struct LayerNormOptions {
  /// Number of features \f$d\f$ normalised together (columns of the input). Required, >= 1.
  Index features = 0;
  /// \f$\epsilon\f$ added to the variance (default 1e-5, as in GPT-2); keeps constant rows finite.
  double epsilon = 1e-5;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::LayerNormOptions";
    detail::require(features >= 1, where, "'features' must be >= 1, got ", features);
    detail::require_positive(where, "epsilon", epsilon);
  }
};

/// Row-wise layer normalisation with a learned gain \f$\gamma\f$ and bias \f$\beta\f$. For each token row \f$x\f$:
/// \f[ \mu = \tfrac1d\textstyle\sum_k x_k,\quad \sigma^2 = \tfrac1d\sum_k (x_k-\mu)^2,\quad
///     r = (\sigma^2+\epsilon)^{-1/2},\quad \hat x = r\,(x - \mu),\quad y = \gamma\circ\hat x + \beta. \f]
/// With \f$g = \partial L/\partial y\f$ and \f$\hat g = \gamma\circ g\f$, backward accumulates
/// \f[ \partial L/\partial x \mathrel{+}=
///     r\,\big(\hat g - \overline{\hat g} - \hat x\,\overline{\hat g\circ\hat x}\big),
///     \qquad \partial L/\partial\gamma \mathrel{+}= \textstyle\sum_{\text{rows}} g\circ\hat x,\qquad
///     \partial L/\partial\beta \mathrel{+}= \sum_{\text{rows}} g, \f]
/// where \f$\bar{\cdot}\f$ is the mean over the \f$d\f$ features. The variance is computed in two passes (about
/// the mean), so rows with a large common offset keep their relative accuracy. Forward saves \f$\hat x\f$
/// (n x d) and \f$r\f$ (n) for backward.
///
/// Both passes run on num_threads() threads over blocks of block_rows rows (parallel/threads.hpp); the
/// column sums of the gain and bias gradients are formed per block and added in block order, so results are the
/// same for any number of threads.
///
/// \code
///   polyattn::LayerNorm<float> ln({/*features=*/64}, "block0.ln1");
///   polyattn::Matrix<float> Y(n, 64), dX = polyattn::Matrix<float>::Zero(n, 64);
///   ln.forward(X, Y);
///   ln.backward(X, dY, dX);           // ln.gain.grad, ln.bias.grad and dX accumulate
/// \endcode
template <class T>
class LayerNorm {
 public:
  /// \f$\gamma\f$ (1 x d), initialised to 1, named "<name>.gain"; exempt from weight decay.
  Parameter<T> gain;
  /// \f$\beta\f$ (1 x d), initialised to 0, named "<name>.bias"; exempt from weight decay.
  Parameter<T> bias;

  explicit LayerNorm(const LayerNormOptions& options, const std::string& name = "layer_norm");

  const LayerNormOptions& options() const { return options_; }
  Index features() const { return options_.features; }

  /// Appends the gain and the bias to `out`.
  void collect_parameters(std::vector<Parameter<T>*>& out) {
    out.push_back(&gain);
    out.push_back(&bias);
  }

  /// Writes \f$Y\f$ (n x d) for \f$X\f$ (n x d); saves \f$\hat X\f$ and \f$r\f$.
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y);

  /// Accumulates into `gain.grad`, `bias.grad` and `dX` for the X of the preceding forward() and
  /// `dY` \f$= \partial L/\partial Y\f$.
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX);

  /// Rows per parallel block: 512 rows of d features is enough work per block (a few microseconds at d = 64)
  /// to amortise the loop, and keeps n / 512 blocks for load balance. Fixed, so results never depend on the
  /// thread count.
  static constexpr Index block_rows = 512;

  /// \f$\hat X\f$ of the last forward call (n x d).
  const Matrix<T>& normalized() const { return normalized_; }
  /// \f$r = (\sigma^2 + \epsilon)^{-1/2}\f$ per row of the last forward call.
  const Vector<T>& inverse_std() const { return inverse_std_; }

 private:
  void check_parameters(const char* where) const {
    detail::require_parameter_shape(where, gain, 1, features());
    detail::require_parameter_shape(where, bias, 1, features());
  }

  LayerNormOptions options_;
  Matrix<T> normalized_, scaled_grad_, gain_partials_, bias_partials_;
  Vector<T> row_mean_, inverse_std_, mean_scaled_grad_, mean_scaled_grad_normalized_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
LayerNorm<T>::LayerNorm(const LayerNormOptions& options, const std::string& name)
    : options_(options) {
  detail::static_check_scalar<T>();
  options_.check();
  gain = Parameter<T>(name + ".gain", 1, options_.features, true, false);
  init_constant(gain, T(1));
  bias = Parameter<T>(name + ".bias", 1, options_.features, true, false);
}

template <class T>
void LayerNorm<T>::forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) {
  constexpr const char* where = "polyattn::LayerNorm::forward";
  check_parameters(where);
  detail::require_nonempty(where, "X", X);
  detail::require_shape(where, "X", X, X.rows(), features());
  detail::require_shape(where, "Y", Y, X.rows(), features());
  detail::require_finite_in_parallel(where, "X", X);
  const Index n = X.rows();
  row_mean_.resize(n);
  normalized_.resize(n, features());
  inverse_std_.resize(n);
  detail::parallel_for(detail::block_count(n, block_rows), [&](Index block, int) {
    const Index begin = block * block_rows, count = std::min(block_rows, n - begin);
    auto mean = row_mean_.segment(begin, count);
    auto normalized = normalized_.middleRows(begin, count);
    auto inverse_std = inverse_std_.segment(begin, count);
    mean = X.middleRows(begin, count).rowwise().mean();
    normalized = X.middleRows(begin, count).colwise() - mean;
    inverse_std = (normalized.array().square().rowwise().mean() + static_cast<T>(options_.epsilon)).rsqrt();
    normalized.array().colwise() *= inverse_std.array();
    Y.middleRows(begin, count) =
        (normalized.array().rowwise() * gain.value.array().row(0)).rowwise() + bias.value.array().row(0);
  });
}

template <class T>
void LayerNorm<T>::backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) {
  constexpr const char* where = "polyattn::LayerNorm::backward";
  check_parameters(where);
  detail::require_nonempty(where, "X", X);
  detail::require_shape(where, "X", X, X.rows(), features());
  detail::require_shape(where, "dY", dY, X.rows(), features());
  detail::require_shape(where, "dX", dX, X.rows(), features());
  detail::require(normalized_.rows() == X.rows() && normalized_.cols() == features(), where,
                  "needs the forward pass of the same 'X' first: saved state is for ", normalized_.rows(),
                  " rows, got ", X.rows());
  detail::require_finite_in_parallel(where, "dY", dY);
  const Index n = X.rows(), d = features(), blocks = detail::block_count(n, block_rows);
  // Row b of the partials holds the column sums of block b + 1; block 0 adds straight into the gradient.
  if (gain.trainable) gain_partials_.resize(blocks - 1, d);
  if (bias.trainable) bias_partials_.resize(blocks - 1, d);
  scaled_grad_.resize(n, d);
  mean_scaled_grad_.resize(n);
  mean_scaled_grad_normalized_.resize(n);
  detail::parallel_for(blocks, [&](Index block, int) {
    const Index begin = block * block_rows, count = std::min(block_rows, n - begin);
    const auto G = dY.middleRows(begin, count);
    const auto normalized = normalized_.middleRows(begin, count);
    auto scaled_grad = scaled_grad_.middleRows(begin, count);
    auto mean_scaled_grad = mean_scaled_grad_.segment(begin, count);
    auto mean_scaled_grad_normalized = mean_scaled_grad_normalized_.segment(begin, count);
    if (gain.trainable) {
      if (block == 0)
        gain.grad.row(0) += (G.array() * normalized.array()).colwise().sum().matrix();
      else
        gain_partials_.row(block - 1) = (G.array() * normalized.array()).colwise().sum().matrix();
    }
    if (bias.trainable) {
      if (block == 0)
        bias.grad.row(0) += G.colwise().sum();
      else
        bias_partials_.row(block - 1) = G.colwise().sum();
    }
    scaled_grad = G.array().rowwise() * gain.value.array().row(0);
    mean_scaled_grad = scaled_grad.rowwise().mean();
    mean_scaled_grad_normalized = (scaled_grad.array() * normalized.array()).rowwise().mean();
    dX.middleRows(begin, count).array() +=
        ((scaled_grad.array().colwise() - mean_scaled_grad.array()) -
         normalized.array().colwise() * mean_scaled_grad_normalized.array())
            .colwise() *
        inverse_std_.segment(begin, count).array();
  });
  for (Index slot = 0; slot + 1 < blocks; ++slot) {
    if (gain.trainable) gain.grad.row(0) += gain_partials_.row(slot);
    if (bias.trainable) bias.grad.row(0) += bias_partials_.row(slot);
  }
}

}  // namespace polyattn
