/// \file nn/lora.hpp
/// Options of the low-rank adapter (LoRA, Hu et al. 2021) that every Linear layer can carry.
///
/// The adapter itself is part of Linear (linear.hpp): Linear::add_lora() freezes the layer's weight and bias
/// and adds a trainable update \f$s\,AB\f$ to the weight, so any Linear, including those inside SelfAttention,
/// MLP and GPT, can be fine-tuned at low rank. GPT::add_lora() (nn/gpt.hpp) adapts a chosen set of a model's
/// Linears and freezes everything else.
#pragma once

#include "parameter.hpp"

#include <cstdint>

namespace polyattn {

/// Options of a LoRA adapter (Linear::add_lora(), GPT::add_lora()).
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

  /// \f$s = \alpha / r\f$.
  double scale() const { return alpha / static_cast<double>(rank); }
};

}  // namespace polyattn
