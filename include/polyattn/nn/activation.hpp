/// \file nn/activation.hpp
/// Element-wise activations (GELU in its tanh approximation, ReLU), forward and backward.
#pragma once

#include "../parallel/threads.hpp"
#include "parameter.hpp"

#include <algorithm>
#include <vector>

namespace polyattn {

/// Which element-wise nonlinearity Activation applies.
enum class ActivationKind {
  /// \f$\mathrm{GELU}(x) \approx \tfrac12 x\,(1 + \tanh(\sqrt{2/\pi}\,(x + 0.044715\,x^3)))\f$ (GPT-2's form).
  gelu,
  /// \f$\max(0, x)\f$; its derivative is taken as 0 at \f$x = 0\f$.
  relu,
};

/// Element-wise activation \f$Y = f(X)\f$; backward accumulates \f$\partial L/\partial X \mathrel{+}= f'(X)\circ G\f$.
///
/// For GELU, with \f$k = \sqrt{2/\pi}\f$, \f$a = 0.044715\f$, \f$u = k(x + a x^3)\f$ and \f$t = \tanh u\f$:
/// \f[ f(x) = \tfrac12 x (1 + t),\qquad f'(x) = \tfrac12 (1 + t) + \tfrac12 x\,(1 - t^2)\,k\,(1 + 3 a x^2). \f]
/// Both are evaluated through \f$E = \exp(-2u) \in [0, \infty]\f$, which forward saves for backward:
/// \f[ \tfrac12(1 + t) = \frac1{1+E},\qquad \tfrac14(1 - t^2) = \frac1{2 + E + 1/E}. \f]
/// Unlike \f$1 + \tanh u\f$ and \f$1 - \tanh^2 u\f$ these do not cancel, so \f$f\f$ and \f$f'\f$ keep full
/// relative accuracy in the tails (in float \f$1+t\f$ at \f$x = -3\f$ would lose four digits), and they need no
/// branch, so Eigen vectorises them. Huge inputs saturate without NaN: \f$x^3\f$ may overflow and \f$E\f$ become
/// 0 or \f$\infty\f$, where both fractions take their limits (1 or 0, and 0); in the derivative the factor
/// \f$x(1 + 3ax^2)\f$ is evaluated at \f$x\f$ clamped to \f$[-10, 10]\f$, beyond which
/// \f$1/(2 + E + 1/E) < 10^{-37}\f$ makes the term vanish to working precision anyway.
/// Activation has no parameters; collect_parameters() exists so it composes like every other layer. Both passes
/// run on num_threads() threads over blocks of block_rows rows (parallel/threads.hpp); being element-wise, every
/// entry is computed the same way whatever the thread count.
///
/// \code
///   polyattn::Activation<float> gelu(polyattn::ActivationKind::gelu);
///   gelu.forward(H, A);
///   gelu.backward(H, dA, dH);          // dH += GELU'(H) o dA
/// \endcode
template <class T>
class Activation {
 public:
  explicit Activation(ActivationKind kind = ActivationKind::gelu) : kind_(kind) { detail::static_check_scalar<T>(); }

  ActivationKind kind() const { return kind_; }

  /// Appends nothing: an activation has no parameters.
  void collect_parameters(std::vector<Parameter<T>*>&) {}

  /// Writes \f$Y = f(X)\f$ (same shape as X).
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y);

  /// Accumulates \f$f'(X)\circ\f$ `dY` into `dX`, for the X of the preceding forward().
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX);

  /// Rows per parallel block: element-wise work, so any fixed size gives the same results; 512 rows (128K
  /// entries at width 256) amortise the loop and leave n / 512 blocks for load balance.
  static constexpr Index block_rows = 512;

 private:
  static constexpr double root_two_over_pi = 0.79788456080286535587989211986876;
  static constexpr double gelu_cubic = 0.044715;
  static constexpr double gelu_saturation = 10;

  ActivationKind kind_;
  Matrix<T> exp_term_;  // E = exp(-2u) of the last forward (GELU only)
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
void Activation<T>::forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) {
  constexpr const char* where = "polyattn::Activation::forward";
  detail::require_nonempty(where, "X", X);
  detail::require_shape(where, "Y", Y, X.rows(), X.cols());
  detail::require_finite_in_parallel(where, "X", X);
  const Index n = X.rows();
  if (kind_ == ActivationKind::gelu) exp_term_.resize(n, X.cols());
  detail::parallel_for(detail::block_count(n, block_rows), [&](Index block, int) {
    const Index begin = block * block_rows, count = std::min(block_rows, n - begin);
    const auto x = X.middleRows(begin, count).array();
    auto y = Y.middleRows(begin, count).array();
    if (kind_ == ActivationKind::relu) {
      y = x.max(T(0));
      return;
    }
    auto e = exp_term_.middleRows(begin, count).array();
    e = (T(-2 * root_two_over_pi) * (x + T(gelu_cubic) * x.cube())).exp();
    y = x / (T(1) + e);
  });
}

template <class T>
void Activation<T>::backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) {
  constexpr const char* where = "polyattn::Activation::backward";
  detail::require_nonempty(where, "X", X);
  detail::require_shape(where, "dY", dY, X.rows(), X.cols());
  detail::require_shape(where, "dX", dX, X.rows(), X.cols());
  detail::require_finite_in_parallel(where, "dY", dY);
  if (kind_ == ActivationKind::gelu)
    detail::require(exp_term_.rows() == X.rows() && exp_term_.cols() == X.cols(), where,
                    "needs the forward pass of the same 'X' first: saved state is ", exp_term_.rows(), "x",
                    exp_term_.cols(), ", got 'X' ", X.rows(), "x", X.cols());
  const Index n = X.rows();
  detail::parallel_for(detail::block_count(n, block_rows), [&](Index block, int) {
    const Index begin = block * block_rows, count = std::min(block_rows, n - begin);
    const auto x = X.middleRows(begin, count).array();
    const auto g = dY.middleRows(begin, count).array();
    auto dx = dX.middleRows(begin, count).array();
    if (kind_ == ActivationKind::relu) {
      dx += (x > T(0)).select(g, T(0));
      return;
    }
    const auto clamped = x.max(T(-gelu_saturation)).min(T(gelu_saturation));
    const auto e = exp_term_.middleRows(begin, count).array();
    dx += g * (T(1) / (T(1) + e) + T(2 * root_two_over_pi) * clamped *
                                       (T(1) + T(3 * gelu_cubic) * clamped.square()) / (T(2) + e + T(1) / e));
  });
}

}  // namespace polyattn
