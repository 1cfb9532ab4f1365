/// \file nn/parameter.hpp
/// A trainable tensor with its gradient, and deterministic seeded initialisation.
///
/// Every layer owns its weights as Parameter members and appends pointers to them with
/// `collect_parameters()`, so a model lists every parameter with its gradient in one
/// `std::vector<Parameter<T>*>` that optimizers, gradient clipping and serialisation walk.
///
/// Initialisation draws standard normals from `std::mt19937_64` (whose output the C++ standard fixes)
/// through the Box–Muller transform written out here, not `std::normal_distribution` (whose algorithm
/// is left to the library). The same seed therefore gives the same weights with every standard library,
/// and the float weights are the rounded double weights.
#pragma once

#include "../common.hpp"

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace polyattn {

/// A named matrix of weights \f$\theta\f$ and the gradient \f$\partial L/\partial\theta\f$ of the same shape.
///
/// Backward passes *accumulate* into `grad`; call zero_grad() (or zero_grads() on a list) before each
/// backward pass. Optimizers skip parameters with `trainable == false` (frozen weights, e.g. the base
/// weight under a LoRA adapter) and apply weight decay only where `weight_decay == true`.
///
/// \code
///   polyattn::Parameter<float> w("block0.mlp.fc.weight", 64, 256);
///   polyattn::init_fan_in(w, /*seed=*/42);       // N(0, 1/64)
///   w.zero_grad();
/// \endcode
template <class T>
struct Parameter {
  /// Unique, human-readable name, e.g. "block0.attn.wq.weight"; used in messages and files.
  std::string name;
  /// The weights.
  Matrix<T> value;
  /// \f$\partial L/\partial\,\text{value}\f$, same shape as `value`.
  Matrix<T> grad;
  /// False freezes the parameter: optimizers leave it untouched and layers skip its gradient.
  bool trainable = true;
  /// False exempts the parameter from (decoupled) weight decay; biases and LayerNorm gains use false.
  bool weight_decay = true;

  Parameter() { detail::static_check_scalar<T>(); }

  /// A `rows x cols` parameter with zero value and zero gradient.
  Parameter(std::string parameter_name, Index rows, Index cols, bool is_trainable = true, bool decays = true)
      : name(std::move(parameter_name)), trainable(is_trainable), weight_decay(decays) {
    detail::static_check_scalar<T>();
    detail::require(rows >= 0 && cols >= 0, "polyattn::Parameter", "'", name,
                    "' needs non-negative dimensions, got ", rows, "x", cols);
    value.setZero(rows, cols);
    grad.setZero(rows, cols);
  }

  Index rows() const { return value.rows(); }
  Index cols() const { return value.cols(); }
  Index size() const { return value.size(); }

  /// Sets the gradient to zero (resizing it to the value's shape if the value was reassigned).
  void zero_grad() { grad.setZero(value.rows(), value.cols()); }

  /// Throws std::invalid_argument unless `value` and `grad` have the same shape.
  void check() const {
    detail::require(grad.rows() == value.rows() && grad.cols() == value.cols(), "polyattn::Parameter::check",
                    "'", name, "' has value ", value.rows(), "x", value.cols(), " but grad ", grad.rows(), "x",
                    grad.cols());
  }
};

/// Sets the gradient of every parameter in the list to zero.
template <class T>
void zero_grads(const std::vector<Parameter<T>*>& parameters) {
  for (Parameter<T>* p : parameters) p->zero_grad();
}

/// Number of scalars in the trainable parameters of the list.
template <class T>
Index count_trainable(const std::vector<Parameter<T>*>& parameters) {
  Index total = 0;
  for (const Parameter<T>* p : parameters)
    if (p->trainable) total += p->size();
  return total;
}

/// An independent seed for stream `stream` of a base seed (SplitMix64 finaliser), so that a model seeded
/// once gives every parameter its own reproducible random stream.
inline std::uint64_t derive_seed(std::uint64_t seed, std::uint64_t stream) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (stream + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

namespace detail {

/// Throws std::invalid_argument unless the value and the gradient of `p` are both `rows x cols`. Layers call it
/// because parameters are public (optimizers and loaders write them) and a reshaped one must not reach Eigen.
template <class T>
void require_parameter_shape(const char* where, const Parameter<T>& p, Index rows, Index cols) {
  if (p.value.rows() != rows || p.value.cols() != cols || p.grad.rows() != rows || p.grad.cols() != cols)
    throw std::invalid_argument(concat(where, ": parameter '", p.name, "' must be ", rows, "x", cols,
                                       " (value and grad), got value ", p.value.rows(), "x", p.value.cols(),
                                       " and grad ", p.grad.rows(), "x", p.grad.cols()));
}

/// Standard normal variates from mt19937_64 by Box–Muller; reproducible across standard libraries.
class SeededNormal {
 public:
  explicit SeededNormal(std::uint64_t seed) : engine_(seed) {}

  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    constexpr double two_pi = 6.283185307179586476925286766559;
    constexpr double inv_2_53 = 1.0 / 9007199254740992.0;
    // u1 in (0, 1] keeps log(u1) finite; u2 in [0, 1).
    const double u1 = static_cast<double>((engine_() >> 11) + 1) * inv_2_53;
    const double u2 = static_cast<double>(engine_() >> 11) * inv_2_53;
    const double radius = std::sqrt(-2.0 * std::log(u1));
    spare_ = radius * std::sin(two_pi * u2);
    has_spare_ = true;
    return radius * std::cos(two_pi * u2);
  }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace detail

/// Fills `m` (column by column) with i.i.d. \f$\mathcal N(0, \sigma^2)\f$ entries drawn from `seed`.
template <class T>
void fill_normal(Matrix<T>& m, double stddev, std::uint64_t seed) {
  detail::static_check_scalar<T>();
  detail::require(std::isfinite(stddev) && stddev >= 0, "polyattn::fill_normal",
                  "'stddev' must be finite and >= 0, got ", stddev);
  detail::SeededNormal normal(seed);
  for (Index j = 0; j < m.cols(); ++j)
    for (Index i = 0; i < m.rows(); ++i) m(i, j) = static_cast<T>(stddev * normal());
}

/// \f$\theta_{ij} \sim \mathcal N(0, \sigma^2)\f$ i.i.d. from `seed`; the gradient is zeroed.
template <class T>
void init_normal(Parameter<T>& p, double stddev, std::uint64_t seed) {
  fill_normal(p.value, stddev, seed);
  p.zero_grad();
}

/// Fan-in scaled normal for a weight used as \f$XW\f$ (\f$W\f$ is in x out):
/// \f$\theta_{ij} \sim \mathcal N(0, \text{gain}^2/\text{in})\f$, which keeps \f$\mathrm{Var}((XW)_{ij}) =
/// \text{gain}^2\,\mathrm{Var}(X_{ij})\f$ for independent unit-variance inputs. Use gain \f$< 1\f$ (e.g.
/// \f$1/\sqrt{2L}\f$ for \f$L\f$ residual blocks, as GPT-2 does) on projections that feed a residual stream.
template <class T>
void init_fan_in(Parameter<T>& p, std::uint64_t seed, double gain = 1.0) {
  detail::require(p.rows() >= 1, "polyattn::init_fan_in", "'", p.name, "' needs at least one row (fan-in), got ",
                  p.rows());
  init_normal(p, gain / std::sqrt(static_cast<double>(p.rows())), seed);
}

/// Every entry of the value set to `constant`; the gradient is zeroed.
template <class T>
void init_constant(Parameter<T>& p, T constant) {
  p.value.setConstant(constant);
  p.zero_grad();
}

}  // namespace polyattn
