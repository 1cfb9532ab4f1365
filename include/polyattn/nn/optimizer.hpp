/// \file nn/optimizer.hpp
/// First-order optimizers over a list of Parameter pointers, and global gradient-norm clipping.
///
/// Optimizers keep one state matrix per parameter, allocated at the first step and reused afterwards. They
/// skip every parameter with `trainable == false`: its value, gradient and state are never touched. Before
/// changing anything a step checks every trainable gradient; a non-finite one throws std::domain_error naming
/// the parameter and leaves all parameters as they were.
///
/// The optimizer stores the pointers it was given: the parameters must outlive it and must not move.
#pragma once

#include "parameter.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace polyattn {

namespace detail {

/// Throws std::invalid_argument on a null or repeated pointer (a repeated one would be stepped twice).
template <class T>
void require_distinct_parameters(const char* where, const std::vector<Parameter<T>*>& parameters) {
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    require(parameters[i] != nullptr, where, "argument 'parameters' has a null pointer at index ", i);
    parameters[i]->check();
    for (std::size_t j = 0; j < i; ++j)
      require(parameters[i] != parameters[j], where, "argument 'parameters' lists '", parameters[i]->name,
              "' twice (indices ", j, " and ", i, ")");
  }
}

/// Throws std::domain_error naming the first trainable parameter whose gradient has a non-finite entry.
template <class T>
void require_finite_gradients(const char* where, const std::vector<Parameter<T>*>& parameters) {
  for (const Parameter<T>* p : parameters)
    if (p->trainable && !all_finite(p->grad))
      throw std::domain_error(concat(where, ": the gradient of parameter '", p->name,
                                     "' has a non-finite entry; no parameter was changed"));
}

/// Allocates (zeroed) or checks the per-parameter optimizer state.
template <class T>
void prepare_state(const char* where, const Parameter<T>& p, Matrix<T>& state) {
  require_parameter_shape(where, p, p.rows(), p.cols());
  if (state.size() == 0 && p.size() != 0) state.setZero(p.rows(), p.cols());
  require(state.rows() == p.rows() && state.cols() == p.cols(), where, "parameter '", p.name,
          "' changed shape since the optimizer state was created: state ", state.rows(), "x", state.cols(),
          ", value ", p.rows(), "x", p.cols());
}

}  // namespace detail

/// \f$\big(\sum_{p\ \text{trainable}} \|\nabla p\|_F^2\big)^{1/2}\f$, accumulated without overflow.
template <class T>
double global_grad_norm(const std::vector<Parameter<T>*>& parameters) {
  double norm = 0;
  for (const Parameter<T>* p : parameters)
    if (p->trainable) norm = std::hypot(norm, static_cast<double>(p->grad.stableNorm()));
  return norm;
}

/// Global gradient-norm clipping: with \f$\nu\f$ = global_grad_norm(), every trainable gradient is multiplied
/// by \f$\min(1, \nu_{\max}/\nu)\f$, so the global norm becomes \f$\min(\nu, \nu_{\max})\f$ and the direction of
/// the joint gradient is kept. Returns \f$\nu\f$ (before clipping), the figure to log.
///
/// Throws std::invalid_argument unless `max_norm` is finite and > 0, and std::domain_error (changing nothing)
/// when \f$\nu\f$ is not finite.
///
/// \code
///   const double norm = polyattn::clip_grad_norm(parameters, 1.0);
///   optimizer.step();
/// \endcode
template <class T>
double clip_grad_norm(const std::vector<Parameter<T>*>& parameters, double max_norm) {
  constexpr const char* where = "polyattn::clip_grad_norm";
  detail::require_positive(where, "max_norm", max_norm);
  const double norm = global_grad_norm(parameters);
  if (!std::isfinite(norm)) {
    detail::require_finite_gradients(where, parameters);
    throw std::domain_error(detail::concat(where, ": the global gradient norm overflows (", norm, ")"));
  }
  if (norm > max_norm) {
    const T factor = static_cast<T>(max_norm / norm);
    for (Parameter<T>* p : parameters)
      if (p->trainable) p->grad *= factor;
  }
  return norm;
}

/// Common interface of the optimizers, so that a training loop can choose one at run time.
///
/// \code
///   std::unique_ptr<polyattn::Optimizer<float>> optimizer;
///   if (use_adam) optimizer = std::make_unique<polyattn::AdamW<float>>(parameters, polyattn::AdamWOptions{});
///   else optimizer = std::make_unique<polyattn::SGD<float>>(parameters, polyattn::SGDOptions{});
///   optimizer->set_learning_rate(schedule(step));
///   optimizer->step();
/// \endcode
template <class T>
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  /// Updates every trainable parameter from its gradient.
  virtual void step() = 0;
  virtual double learning_rate() const = 0;
  /// For schedules (warm-up, cosine decay): takes effect at the next step.
  virtual void set_learning_rate(double learning_rate) = 0;
  /// The parameters this optimizer updates.
  const std::vector<Parameter<T>*>& parameters() const { return parameters_; }
  /// Sets every gradient (trainable or not) to zero.
  void zero_grad() { zero_grads(parameters_); }

 protected:
  explicit Optimizer(std::vector<Parameter<T>*> parameters, const char* where) : parameters_(std::move(parameters)) {
    detail::static_check_scalar<T>();
    detail::require_distinct_parameters(where, parameters_);
  }
  std::vector<Parameter<T>*> parameters_;
};

/// Options of SGD.
struct SGDOptions {
  /// Step size \f$\eta\f$ (default 0.01), finite and >= 0.
  double learning_rate = 0.01;
  /// Momentum \f$\mu \in [0, 1)\f$ (default 0.9); 0 is plain gradient descent.
  double momentum = 0.9;
  /// Decoupled weight decay \f$\lambda \ge 0\f$ (default 0), applied to parameters with `weight_decay == true`.
  double weight_decay = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::SGDOptions";
    detail::require(std::isfinite(learning_rate) && learning_rate >= 0, where,
                    "'learning_rate' must be finite and >= 0, got ", learning_rate);
    detail::require(momentum >= 0 && momentum < 1, where, "'momentum' must be in [0, 1), got ", momentum);
    detail::require(std::isfinite(weight_decay) && weight_decay >= 0, where,
                    "'weight_decay' must be finite and >= 0, got ", weight_decay);
  }
};

/// Stochastic gradient descent with heavy-ball momentum (the PyTorch form) and decoupled weight decay:
/// \f[ v \leftarrow \mu v + g,\qquad \theta \leftarrow \theta - \eta\,(v + \lambda\theta), \f]
/// with \f$v_0 = 0\f$, so the first step is \f$\theta - \eta(g + \lambda\theta)\f$.
///
/// \code
///   polyattn::SGD<float> sgd(parameters, {/*learning_rate=*/0.1, /*momentum=*/0.9});
///   sgd.zero_grad();  /* forward, backward */  sgd.step();
/// \endcode
template <class T>
class SGD : public Optimizer<T> {
 public:
  SGD(std::vector<Parameter<T>*> parameters, const SGDOptions& options)
      : Optimizer<T>(std::move(parameters), "polyattn::SGD"), options_(options) {
    options_.check();
    velocity_.resize(this->parameters_.size());
  }

  const SGDOptions& options() const { return options_; }
  double learning_rate() const override { return options_.learning_rate; }
  void set_learning_rate(double learning_rate) override {
    SGDOptions changed = options_;
    changed.learning_rate = learning_rate;
    changed.check();
    options_ = changed;
  }

  void step() override;

  /// Momentum buffer \f$v\f$ of parameter `k` (empty before its first step).
  const Matrix<T>& velocity(std::size_t k) const { return velocity_.at(k); }

 private:
  SGDOptions options_;
  std::vector<Matrix<T>> velocity_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
void SGD<T>::step() {
  constexpr const char* where = "polyattn::SGD::step";
  detail::require_finite_gradients(where, this->parameters_);
  for (std::size_t k = 0; k < this->parameters_.size(); ++k)
    if (this->parameters_[k]->trainable) detail::prepare_state(where, *this->parameters_[k], velocity_[k]);
  const T eta = static_cast<T>(options_.learning_rate);
  const T mu = static_cast<T>(options_.momentum);
  for (std::size_t k = 0; k < this->parameters_.size(); ++k) {
    Parameter<T>& p = *this->parameters_[k];
    if (!p.trainable) continue;
    const T decay = p.weight_decay ? static_cast<T>(options_.weight_decay) : T(0);
    velocity_[k] = mu * velocity_[k] + p.grad;
    p.value -= eta * (velocity_[k] + decay * p.value);
  }
}

/// Options of AdamW.
struct AdamWOptions {
  /// Step size \f$\eta\f$ (default 1e-3), finite and >= 0.
  double learning_rate = 1e-3;
  /// First-moment decay \f$\beta_1 \in [0, 1)\f$ (default 0.9).
  double beta1 = 0.9;
  /// Second-moment decay \f$\beta_2 \in [0, 1)\f$ (default 0.999).
  double beta2 = 0.999;
  /// \f$\epsilon > 0\f$ added to \f$\sqrt{\hat v}\f$ (default 1e-8).
  double epsilon = 1e-8;
  /// Decoupled weight decay \f$\lambda \ge 0\f$ (default 0.01), applied to parameters with `weight_decay == true`.
  double weight_decay = 0.01;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::AdamWOptions";
    detail::require(std::isfinite(learning_rate) && learning_rate >= 0, where,
                    "'learning_rate' must be finite and >= 0, got ", learning_rate);
    detail::require(beta1 >= 0 && beta1 < 1, where, "'beta1' must be in [0, 1), got ", beta1);
    detail::require(beta2 >= 0 && beta2 < 1, where, "'beta2' must be in [0, 1), got ", beta2);
    detail::require_positive(where, "epsilon", epsilon);
    detail::require(std::isfinite(weight_decay) && weight_decay >= 0, where,
                    "'weight_decay' must be finite and >= 0, got ", weight_decay);
  }
};

/// Adam with decoupled weight decay (Loshchilov & Hutter 2019, as in PyTorch's AdamW). At step \f$t\f$:
/// \f[ m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
///     \theta \leftarrow \theta - \eta\Big(\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}
///     + \lambda\theta\Big). \f]
/// The first step is therefore \f$\theta - \eta\,(g/(|g| + \epsilon) + \lambda\theta)\f$. The step count \f$t\f$
/// is kept per parameter, so a parameter unfrozen later starts its bias correction afresh.
///
/// \code
///   std::vector<polyattn::Parameter<float>*> parameters;
///   model.collect_parameters(parameters);
///   polyattn::AdamW<float> adam(parameters, {/*learning_rate=*/3e-4});
///   for (int step = 0; step < steps; ++step) {
///     adam.zero_grad();
///     /* forward, backward */
///     polyattn::clip_grad_norm(parameters, 1.0);
///     adam.step();
///   }
/// \endcode
template <class T>
class AdamW : public Optimizer<T> {
 public:
  AdamW(std::vector<Parameter<T>*> parameters, const AdamWOptions& options)
      : Optimizer<T>(std::move(parameters), "polyattn::AdamW"), options_(options) {
    options_.check();
    first_moment_.resize(this->parameters_.size());
    second_moment_.resize(this->parameters_.size());
    steps_.assign(this->parameters_.size(), 0);
  }

  const AdamWOptions& options() const { return options_; }
  double learning_rate() const override { return options_.learning_rate; }
  void set_learning_rate(double learning_rate) override {
    AdamWOptions changed = options_;
    changed.learning_rate = learning_rate;
    changed.check();
    options_ = changed;
  }

  void step() override;

  /// Number of steps taken by parameter `k`.
  std::int64_t steps(std::size_t k) const { return steps_.at(k); }
  /// First moment \f$m\f$ of parameter `k` (empty before its first step).
  const Matrix<T>& first_moment(std::size_t k) const { return first_moment_.at(k); }
  /// Second moment \f$v\f$ of parameter `k` (empty before its first step).
  const Matrix<T>& second_moment(std::size_t k) const { return second_moment_.at(k); }

 private:
  AdamWOptions options_;
  std::vector<Matrix<T>> first_moment_, second_moment_;
  std::vector<std::int64_t> steps_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
void AdamW<T>::step() {
  constexpr const char* where = "polyattn::AdamW::step";
  detail::require_finite_gradients(where, this->parameters_);
  for (std::size_t k = 0; k < this->parameters_.size(); ++k)
    if (this->parameters_[k]->trainable) {
      detail::prepare_state(where, *this->parameters_[k], first_moment_[k]);
      detail::prepare_state(where, *this->parameters_[k], second_moment_[k]);
    }
  const T beta1 = static_cast<T>(options_.beta1), beta2 = static_cast<T>(options_.beta2);
  const T epsilon = static_cast<T>(options_.epsilon);
  for (std::size_t k = 0; k < this->parameters_.size(); ++k) {
    Parameter<T>& p = *this->parameters_[k];
    if (!p.trainable) continue;
    const double t = static_cast<double>(++steps_[k]);
    // Folding the bias corrections into scalars keeps the update a single pass over the arrays:
    // mhat / (sqrt(vhat) + eps) = (m / c1) / (sqrt(v) / sqrt(c2) + eps).
    const T inv_first_correction = static_cast<T>(1 / (1 - std::pow(options_.beta1, t)));
    const T inv_sqrt_second_correction = static_cast<T>(1 / std::sqrt(1 - std::pow(options_.beta2, t)));
    const T eta = static_cast<T>(options_.learning_rate);
    const T decay = p.weight_decay ? static_cast<T>(options_.weight_decay) : T(0);
    auto m = first_moment_[k].array();
    auto v = second_moment_[k].array();
    const auto g = p.grad.array();
    m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * g.square();
    p.value.array() -= eta * ((inv_first_correction * m) / (inv_sqrt_second_correction * v.sqrt() + epsilon) +
                              decay * p.value.array());
  }
}

}  // namespace polyattn
