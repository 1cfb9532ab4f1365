/// \file gradient_check.hpp
/// One harness that checks every hand-written gradient in polyattn against central finite differences.
///
/// The analytic gradient is computed once; each entry of each parameter is then perturbed by \f$\pm h\f$
/// and \f$(L(\theta + h e_k) - L(\theta - h e_k)) / 2h\f$ is compared with it. The comparison is the
/// relative Frobenius error \f$\|g - \hat g\|_F / \|\hat g\|_F\f$, so a test states one tolerance per check.
/// Central differences in double have truncation error \f$O(h^2 L''')\f$ and rounding error
/// \f$O(\epsilon_{mach} |L| / h)\f$; with \f$h = 10^{-6}\f$ and \f$O(1)\f$ losses both are near \f$10^{-10}\f$
/// relative, which is why double-precision checks use tolerances around \f$10^{-7}\f$.
#pragma once

#include <polyattn/attention/backend.hpp>
#include <polyattn/common.hpp>
#include <polyattn/nn/parameter.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace polyattn::testing {

/// Relative Frobenius error of `actual` against `expected`; the absolute error when `expected` is zero.
template <class DA, class DE>
double relative_error(const Eigen::MatrixBase<DA>& actual, const Eigen::MatrixBase<DE>& expected) {
  const double diff = (actual.template cast<double>() - expected.template cast<double>()).norm();
  const double scale = expected.template cast<double>().norm();
  return scale > 0 ? diff / scale : diff;
}

/// Central-difference gradient of the scalar `loss()` with respect to every entry of `param`, which is
/// perturbed in place and restored exactly.
template <class Loss>
Matrix<double> numerical_gradient(Loss&& loss, Matrix<double>& param, double step = 1e-6) {
  Matrix<double> gradient(param.rows(), param.cols());
  for (Index j = 0; j < param.cols(); ++j)
    for (Index i = 0; i < param.rows(); ++i) {
      const double saved = param(i, j);
      param(i, j) = saved + step;
      const double up = loss();
      param(i, j) = saved - step;
      const double down = loss();
      param(i, j) = saved;
      gradient(i, j) = (up - down) / (2 * step);
    }
  return gradient;
}

/// Relative error of `analytic` against the central-difference gradient of `loss` in `param`.
template <class Loss, class Derived>
double gradient_error(Loss&& loss, Matrix<double>& param, const Eigen::MatrixBase<Derived>& analytic,
                      double step = 1e-6) {
  return relative_error(analytic, numerical_gradient(loss, param, step));
}

/// The scalar \f$L = \langle R, f(X)\rangle = \sum_{ij} R_{ij}\, f(X)_{ij}\f$ of a layer's output \f$Y = f(X)\f$
/// (sized like R). A random linear functional of the output has \f$\partial L/\partial Y = R\f$ exactly, so a
/// backward pass with dY = R gives \f$\partial L/\partial X\f$ and every parameter gradient of that L, and finite
/// differences of L check all of them at once, whatever the layer.
template <class Layer>
double projected_loss(Layer& layer, const Matrix<double>& X, const Matrix<double>& R) {
  Matrix<double> Y(R.rows(), R.cols());
  layer.forward(X, Y);
  return (R.array() * Y.array()).sum();
}

/// The trainable parameters of `layer` (those of `collect_parameters()` with `trainable == true`), in the order
/// the layer lists them: the ones whose gradients a backward pass writes and a gradient check should compare.
template <class Layer>
std::vector<Parameter<double>*> trainable_parameters(Layer& layer) {
  std::vector<Parameter<double>*> all, trainable;
  layer.collect_parameters(all);
  for (Parameter<double>* p : all)
    if (p->trainable) trainable.push_back(p);
  return trainable;
}

/// Checks a layer's backward pass against central finite differences of projected_loss(layer, X, R): zeroes every
/// parameter gradient of the layer, runs forward(X, Y) and backward(X, dY = R, dX) once, then CHECKs that dX and the
/// `.grad` of each listed parameter are within `tolerance` (relative, see gradient_error) of the differences in
/// X and in that parameter's `.value`. One assertion per quantity, so a failure names the quantity (the
/// parameter's name is captured) and CHECK reports every failing one, not only the first. X is taken by value:
/// the differences perturb the copy. Parameters left out of the list are not compared (frozen ones, or ones whose
/// exact gradient is zero and so has no relative error); their `.grad` still holds this backward pass afterwards.
template <class Layer>
void check_gradients(Layer& layer, Matrix<double> X, const Matrix<double>& R,
                     const std::vector<Parameter<double>*>& parameters, double tolerance) {
  std::vector<Parameter<double>*> all;
  layer.collect_parameters(all);
  zero_grads(all);
  Matrix<double> Y(R.rows(), R.cols());
  Matrix<double> dX = Matrix<double>::Zero(X.rows(), X.cols());
  layer.forward(X, Y);
  layer.backward(X, R, dX);
  const auto loss = [&] { return projected_loss(layer, X, R); };
  CHECK(gradient_error(loss, X, dX) < tolerance);
  for (Parameter<double>* p : parameters) {
    CAPTURE(p->name);
    CHECK(gradient_error(loss, p->value, p->grad) < tolerance);
  }
}

/// Outputs and input gradients of one forward and backward pass in double and in float.
struct FloatDoublePass {
  Matrix<double> Y, dX;
  Matrix<float> Yf, dXf;
};

/// Runs forward(X) and backward(X, dY) of `reference` (double) and of `single` (float) on the same X and dY, the
/// float layer on their float roundings, and returns both outputs and input gradients (dX starts at zero; the
/// parameter gradients accumulate in the layers as usual). With the float weights the rounded double weights,
/// relative_error(Yf, Y), relative_error(dXf, dX) and the parameter gradients then measure what float costs.
template <class DoubleLayer, class FloatLayer>
FloatDoublePass float_double_pass(DoubleLayer& reference, FloatLayer& single, const Matrix<double>& X,
                                  const Matrix<double>& dY) {
  FloatDoublePass pass{Matrix<double>(dY.rows(), dY.cols()), Matrix<double>::Zero(X.rows(), X.cols()),
                       Matrix<float>(dY.rows(), dY.cols()), Matrix<float>::Zero(X.rows(), X.cols())};
  reference.forward(X, pass.Y);
  reference.backward(X, dY, pass.dX);
  const Matrix<float> Xf = X.cast<float>(), dYf = dY.cast<float>();
  single.forward(Xf, pass.Yf);
  single.backward(Xf, dYf, pass.dXf);
  return pass;
}

/// Seeded matrix with i.i.d. N(0, sigma^2) entries; the same seed gives the same matrix in float and double.
template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed, double sigma = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, sigma);
  Matrix<T> m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = static_cast<T>(normal(rng));
  return m;
}

/// The inputs of one attention call and its upstream gradient: Q, K ~ N(0, qk_sigma^2) (n x h d_k), V, G ~ N(0, 1)
/// (n x h d_v).
template <class T>
struct AttentionProblem {
  Matrix<T> Q, K, V, G;
};

template <class T>
AttentionProblem<T> random_problem(Index n, Index heads, Index dk, Index dv, std::uint64_t seed, double qk_sigma) {
  return {random_matrix<T>(n, heads * dk, seed, qk_sigma), random_matrix<T>(n, heads * dk, seed + 1, qk_sigma),
          random_matrix<T>(n, heads * dv, seed + 2), random_matrix<T>(n, heads * dv, seed + 3)};
}

/// What forward_backward() returns.
template <class T>
struct AttentionResult {
  Matrix<T> O, dQ, dK, dV;
  Certificate certificate;
  GradientCertificate gradient;
};

/// forward() then backward() of `backend` on `x`; the outputs start as NaN, so that a backend that reads them
/// instead of overwriting them fails.
template <class T>
AttentionResult<T> forward_backward(AttentionBackend<T>& backend, const AttentionProblem<T>& x) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  AttentionResult<T> r{Matrix<T>::Constant(x.Q.rows(), x.V.cols(), nan),
                       Matrix<T>::Constant(x.Q.rows(), x.Q.cols(), nan),
                       Matrix<T>::Constant(x.K.rows(), x.K.cols(), nan),
                       Matrix<T>::Constant(x.V.rows(), x.V.cols(), nan),
                       {},
                       {}};
  r.certificate = backend.forward(x.Q, x.K, x.V, r.O);
  r.gradient = backend.backward(x.Q, x.K, x.V, r.O, x.G, r.dQ, r.dK, r.dV);
  return r;
}

/// CHECKs the gradients dQ, dK, dV of `result` against central finite differences of \f$L = \langle G, O\rangle\f$,
/// with O = `evaluator.forward(Q, K, V, O)` (a backend, or the forward-only PolynomialAttention) at the entries of `x`,
/// which the differences perturb and restore. One assertion per gradient, each within `tolerance` (gradient_error).
template <class Evaluator>
void check_attention_gradients(Evaluator& evaluator, AttentionProblem<double>& x,
                               const AttentionResult<double>& result, double tolerance) {
  Matrix<double> O(x.Q.rows(), x.V.cols());
  const auto loss = [&] {
    evaluator.forward(x.Q, x.K, x.V, O);
    return (x.G.array() * O.array()).sum();
  };
  CHECK(gradient_error(loss, x.Q, result.dQ) < tolerance);
  CHECK(gradient_error(loss, x.K, result.dK) < tolerance);
  CHECK(gradient_error(loss, x.V, result.dV) < tolerance);
}

}  // namespace polyattn::testing
