/// \file nn/mlp.hpp
/// The transformer feed-forward block: Linear, element-wise activation, Linear.
#pragma once

#include "activation.hpp"
#include "linear.hpp"

#include <algorithm>
#include <string>
#include <vector>

namespace polyattn {

/// Options of MLP.
struct MLPOptions {
  /// Width \f$d\f$ of input and output. Required, >= 1.
  Index d_model = 0;
  /// Hidden width \f$h\f$; 0 (default) means \f$4d\f$, as in GPT-2.
  Index hidden = 0;
  /// Nonlinearity between the two layers (default GELU).
  ActivationKind activation = ActivationKind::gelu;
  /// Both Linear layers have a bias (default true).
  bool bias = true;
  /// The output projection starts at \f$\mathcal N(0, \text{gain}^2/h)\f$ (default 1). GPT-2 uses
  /// \f$1/\sqrt{2m}\f$ for \f$m\f$ blocks, so that the residual stream does not grow with depth.
  double output_gain = 1;
  /// Seed; the two layers draw from derive_seed(seed, 0) and derive_seed(seed, 1).
  std::uint64_t seed = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::MLPOptions";
    detail::require(d_model >= 1, where, "'d_model' must be >= 1, got ", d_model);
    detail::require(hidden >= 0, where, "'hidden' must be >= 0 (0 = 4 d_model), got ", hidden);
    detail::require(activation == ActivationKind::gelu || activation == ActivationKind::relu, where,
                    "'activation' must be gelu or relu, got ", static_cast<int>(activation));
    detail::require_positive(where, "output_gain", output_gain);
  }

  /// The hidden width actually used.
  Index resolved_hidden() const { return hidden > 0 ? hidden : 4 * d_model; }
};

/// \f$Y = f(XW_1 + \mathbf 1 b_1^\top)\,W_2 + \mathbf 1 b_2^\top\f$ with \f$W_1\f$ (d x h), \f$W_2\f$ (h x d) and
/// \f$f\f$ GELU or ReLU. With \f$H = XW_1 + \mathbf 1b_1^\top\f$, \f$A = f(H)\f$ and \f$G = \partial L/\partial Y\f$,
/// backward runs the chain in reverse:
/// \f[ \partial L/\partial A = G W_2^\top,\qquad \partial L/\partial H = f'(H)\circ\partial L/\partial A,\qquad
///     \partial L/\partial X \mathrel{+}= (\partial L/\partial H)\, W_1^\top, \f]
/// accumulating \f$A^\top G\f$, \f$X^\top\partial L/\partial H\f$ and the column sums into the parameter gradients.
/// Forward saves \f$H\f$ and \f$A\f$ (n x h each); all intermediate buffers are members reused across calls.
/// Every step runs on num_threads() threads over row blocks (the two Linears and the activation are parallel,
/// and backward zeroes its n x h buffers in parallel too), with the same results for any number of threads.
///
/// \code
///   polyattn::MLP<float> mlp({/*d_model=*/64}, "block0.mlp");          // hidden 256, GELU
///   polyattn::Matrix<float> Y(n, 64), dX = polyattn::Matrix<float>::Zero(n, 64);
///   mlp.forward(X, Y);
///   mlp.backward(X, dY, dX);
/// \endcode
template <class T>
class MLP {
 public:
  /// \f$X \mapsto XW_1 + \mathbf 1 b_1^\top\f$, parameters "<name>.fc.weight" and "<name>.fc.bias".
  Linear<T> fc;
  /// \f$A \mapsto AW_2 + \mathbf 1 b_2^\top\f$, parameters "<name>.proj.weight" and "<name>.proj.bias".
  Linear<T> proj;

  explicit MLP(const MLPOptions& options, const std::string& name = "mlp");

  const MLPOptions& options() const { return options_; }
  Index d_model() const { return options_.d_model; }
  Index hidden() const { return options_.resolved_hidden(); }

  /// Appends the parameters of `fc` then `proj` to `out`.
  void collect_parameters(std::vector<Parameter<T>*>& out) {
    fc.collect_parameters(out);
    proj.collect_parameters(out);
  }

  /// Writes \f$Y\f$ (n x d) for \f$X\f$ (n x d); saves \f$H\f$ and \f$A\f$.
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y);

  /// Accumulates into the parameter gradients of `fc` and `proj` and into `dX`, for the X of the preceding
  /// forward() and `dY` \f$= \partial L/\partial Y\f$.
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX);

 private:
  // Checks the options before any member is built from them.
  static LinearOptions first_layer(const MLPOptions& options) {
    options.check();
    return {options.d_model, options.resolved_hidden(), options.bias, 0, derive_seed(options.seed, 0)};
  }
  static LinearOptions second_layer(const MLPOptions& options) {
    const double stddev = options.output_gain / std::sqrt(static_cast<double>(options.resolved_hidden()));
    return {options.resolved_hidden(), options.d_model, options.bias, stddev, derive_seed(options.seed, 1)};
  }

  // Rows per block of the parallel zeroing in backward (any fixed size: zeroing is exact).
  static constexpr Index zero_block_rows = 512;

  Activation<T> activation_;
  MLPOptions options_;
  Matrix<T> pre_activation_, activated_, activated_grad_, pre_activation_grad_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
MLP<T>::MLP(const MLPOptions& options, const std::string& name)
    : fc(first_layer(options), name + ".fc"), proj(second_layer(options), name + ".proj"),
      activation_(options.activation), options_(options) {}

template <class T>
void MLP<T>::forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) {
  constexpr const char* where = "polyattn::MLP::forward";
  detail::require_nonempty(where, "X", X);
  detail::require_shape(where, "X", X, X.rows(), d_model());
  detail::require_shape(where, "Y", Y, X.rows(), d_model());
  detail::require_finite_in_parallel(where, "X", X);
  pre_activation_.resize(X.rows(), hidden());
  activated_.resize(X.rows(), hidden());
  fc.forward(X, pre_activation_);
  activation_.forward(pre_activation_, activated_);
  proj.forward(activated_, Y);
}

template <class T>
void MLP<T>::backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) {
  constexpr const char* where = "polyattn::MLP::backward";
  detail::require_nonempty(where, "X", X);
  detail::require_shape(where, "X", X, X.rows(), d_model());
  detail::require_shape(where, "dY", dY, X.rows(), d_model());
  detail::require_shape(where, "dX", dX, X.rows(), d_model());
  detail::require(activated_.rows() == X.rows(), where, "needs the forward pass of the same 'X' first: saved ",
                  activated_.rows(), " rows, got ", X.rows());
  detail::require_finite_in_parallel(where, "dY", dY);
  const Index n = X.rows();
  activated_grad_.resize(n, hidden());
  pre_activation_grad_.resize(n, hidden());
  detail::parallel_for(detail::block_count(n, zero_block_rows), [&](Index block, int) {
    const Index begin = block * zero_block_rows, count = std::min(zero_block_rows, n - begin);
    activated_grad_.middleRows(begin, count).setZero();
    pre_activation_grad_.middleRows(begin, count).setZero();
  });
  proj.backward(activated_, dY, activated_grad_);
  activation_.backward(pre_activation_, activated_grad_, pre_activation_grad_);
  fc.backward(X, pre_activation_grad_, dX);
}

}  // namespace polyattn
