/// \file nn/composition.hpp
/// The multi-layer driver: the paper's general form
/// \f[ F = g_m \circ \mathrm{Attn}_m \circ g_{m-1} \circ \dots \circ g_1 \circ \mathrm{Attn}_1 \circ g_0 \f]
/// (Liang et al. 2024, Def. 1.3) as a Composition of Components, each with a forward and a backward pass;
/// gpt.hpp builds a GPT-style language model as one such composition.
///
/// **Components.** A Component maps an \f$n\times d_{in}\f$ matrix (one token per row) to \f$n\times d_{out}\f$;
/// forward() saves what backward() needs, backward() accumulates parameter gradients and
/// \f$\partial L/\partial X\f$ (llm.c style). Any layer with `forward(X, Y)`, `backward(X, dY, dX)` and
/// `collect_parameters(out)` becomes one through make_component() (Linear, with or without a LoRA adapter,
/// LayerNorm, SelfAttention, the MLP, ...). Composition applies its parts in order and, in backward(), runs them
/// in reverse, feeding each the gradient of its output; Residual computes \f$X + f(X)\f$. A composition is itself
/// a component, so blocks nest.
#pragma once

#include "../common.hpp"
#include "parameter.hpp"

#include <memory>
#include <utility>
#include <vector>

namespace polyattn {


/// One stage \f$X \mapsto Y\f$ of a Composition (\f$n\times d_{in} \to n\times d_{out}\f$, one token per row).
template <class T>
class Component {
 public:
  virtual ~Component() = default;
  virtual Index input_width() const = 0;
  virtual Index output_width() const = 0;
  /// Writes \f$Y\f$ (n x output_width()) for \f$X\f$ (n x input_width()), saving what backward() needs.
  virtual void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) = 0;
  /// Accumulates the parameter gradients and \f$\partial L/\partial X\f$ into `dX`, for \f$\partial L/\partial Y\f$
  /// = `dY` and the X of the preceding forward().
  virtual void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) = 0;
  /// Appends this component's parameters to `out`.
  virtual void collect_parameters(std::vector<Parameter<T>*>& out) = 0;
};

/// Adapts a layer with `forward(X, Y)`, `backward(X, dY, dX)` and `collect_parameters(out)` to a Component.
template <class T, class Layer>
class LayerComponent final : public Component<T> {
 public:
  LayerComponent(Index input_width, Index output_width, Layer layer)
      : layer_(std::move(layer)), input_width_(input_width), output_width_(output_width) {
    detail::require(input_width >= 1 && output_width >= 1, "polyattn::LayerComponent",
                    "widths must be >= 1, got ", input_width, " -> ", output_width);
  }
  Index input_width() const override { return input_width_; }
  Index output_width() const override { return output_width_; }
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) override { layer_.forward(X, Y); }
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) override {
    layer_.backward(X, dY, dX);
  }
  void collect_parameters(std::vector<Parameter<T>*>& out) override { layer_.collect_parameters(out); }
  /// The adapted layer (stays at the same address for the component's lifetime).
  Layer& layer() { return layer_; }

 private:
  Layer layer_;
  Index input_width_, output_width_;
};

/// A heap-allocated LayerComponent owning `layer`.
template <class T, class Layer>
std::unique_ptr<LayerComponent<T, Layer>> make_component(Index input_width, Index output_width, Layer layer) {
  return std::make_unique<LayerComponent<T, Layer>>(input_width, output_width, std::move(layer));
}

/// \f$Y = f_k \circ \dots \circ f_1(X)\f$: the driver. forward() keeps every intermediate activation (the inputs
/// the parts' backward passes take again); backward() runs the parts in reverse, each accumulating into the
/// gradient of its input, which is zeroed first except for the caller's `dX`.
///
/// \code
///   polyattn::Composition<double> body;
///   body.add(polyattn::make_component<double>(8, 8, polyattn::LayerNorm<double>({8}, "ln")));
///   body.add(polyattn::make_component<double>(8, 4, polyattn::Linear<double>({8, 4}, "fc")));
///   body.forward(X, Y);
///   body.backward(X, dY, dX);
/// \endcode
template <class T>
class Composition final : public Component<T> {
 public:
  Composition() { detail::static_check_scalar<T>(); }

  /// Appends a part; its input width must equal the previous part's output width.
  template <class Part>
  Part& add(std::unique_ptr<Part> part) {
    detail::require(part != nullptr, "polyattn::Composition::add", "argument 'part' is null");
    if (!parts_.empty())
      detail::require(part->input_width() == parts_.back()->output_width(), "polyattn::Composition::add",
                      "argument 'part' takes width ", part->input_width(), " but the previous part outputs width ",
                      parts_.back()->output_width());
    Part& added = *part;
    parts_.push_back(std::move(part));
    activations_.resize(parts_.size() - 1);
    gradients_.resize(parts_.size() - 1);
    return added;
  }

  Index size() const { return static_cast<Index>(parts_.size()); }
  Component<T>& part(Index k) { return *parts_.at(static_cast<std::size_t>(k)); }
  Index input_width() const override { return nonempty().front()->input_width(); }
  Index output_width() const override { return nonempty().back()->output_width(); }

  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) override {
    constexpr const char* where = "polyattn::Composition::forward";
    nonempty();
    detail::require_shape(where, "X", X, X.rows(), input_width());
    detail::require_shape(where, "Y", Y, X.rows(), output_width());
    const std::size_t last = parts_.size() - 1;
    for (std::size_t k = 0; k < last; ++k) {
      activations_[k].resize(X.rows(), parts_[k]->output_width());
      if (k == 0)
        parts_[k]->forward(X, activations_[k]);
      else
        parts_[k]->forward(activations_[k - 1], activations_[k]);
    }
    if (last == 0)
      parts_[last]->forward(X, Y);
    else
      parts_[last]->forward(activations_[last - 1], Y);
  }

  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) override {
    constexpr const char* where = "polyattn::Composition::backward";
    nonempty();
    detail::require_shape(where, "X", X, X.rows(), input_width());
    detail::require_shape(where, "dY", dY, X.rows(), output_width());
    detail::require_shape(where, "dX", dX, X.rows(), input_width());
    for (std::size_t k = 0; k + 1 < parts_.size(); ++k)
      detail::require(activations_[k].rows() == X.rows(), where, "needs a preceding forward() with the same X (",
                      X.rows(), " rows), saved activations have ", activations_[k].rows());
    for (std::size_t k = parts_.size(); k-- > 0;) {
      const bool first = k == 0, last = k + 1 == parts_.size();
      if (!first) gradients_[k - 1].setZero(X.rows(), parts_[k]->input_width());
      const ConstMatrixRef<T> input = first ? X : ConstMatrixRef<T>(activations_[k - 1]);
      const ConstMatrixRef<T> output_grad = last ? dY : ConstMatrixRef<T>(gradients_[k]);
      if (first)
        parts_[k]->backward(input, output_grad, dX);
      else
        parts_[k]->backward(input, output_grad, gradients_[k - 1]);
    }
  }

  void collect_parameters(std::vector<Parameter<T>*>& out) override {
    for (auto& part : parts_) part->collect_parameters(out);
  }

 private:
  const std::vector<std::unique_ptr<Component<T>>>& nonempty() const {
    detail::require(!parts_.empty(), "polyattn::Composition", "has no parts: add() at least one");
    return parts_;
  }

  std::vector<std::unique_ptr<Component<T>>> parts_;
  std::vector<Matrix<T>> activations_, gradients_;  // [k]: output of part k and its gradient, k < size - 1
};

/// \f$Y = X + f(X)\f$ for a width-preserving component \f$f\f$ (a residual connection); backward adds
/// \f$\partial L/\partial Y\f$ to \f$\partial L/\partial X\f$ besides \f$f\f$'s own backward.
template <class T>
class Residual final : public Component<T> {
 public:
  explicit Residual(std::unique_ptr<Component<T>> body) : body_(std::move(body)) {
    detail::require(body_ != nullptr, "polyattn::Residual", "argument 'body' is null");
    detail::require(body_->input_width() == body_->output_width(), "polyattn::Residual",
                    "argument 'body' must preserve the width, got ", body_->input_width(), " -> ",
                    body_->output_width());
  }
  Index input_width() const override { return body_->input_width(); }
  Index output_width() const override { return body_->output_width(); }
  void forward(const ConstMatrixRef<T>& X, MatrixRef<T> Y) override {
    body_->forward(X, Y);
    Y += X;
  }
  void backward(const ConstMatrixRef<T>& X, const ConstMatrixRef<T>& dY, MatrixRef<T> dX) override {
    detail::require_shape("polyattn::Residual::backward", "dX", dX, dY.rows(), dY.cols());
    dX += dY;
    body_->backward(X, dY, dX);
  }
  void collect_parameters(std::vector<Parameter<T>*>& out) override { body_->collect_parameters(out); }
  Component<T>& body() { return *body_; }

 private:
  std::unique_ptr<Component<T>> body_;
};

}  // namespace polyattn
