/// \file attention/backend_factory.hpp
/// Run-time choice of the attention method: one factory that builds any AttentionBackend from a method
/// name and one options object, so that a model can pick the method per layer (and tools per flag).
///
/// | method            | forward + backward cost        | memory       | gradient it returns                  |
/// |-------------------|--------------------------------|--------------|--------------------------------------|
/// | `exact_reference` | \f$O(n^2 d)\f$                 | \f$O(n^2)\f$ | exact                                |
/// | `exact_blocked`   | \f$O(n^2 d)\f$                 | \f$O(nd)\f$  | exact                                |
/// | `paper`           | \f$O(n r d^2)\f$               | \f$O(nd + rd)\f$ per chunk | low-rank approximation of the exact one |
/// | `adjoint`         | \f$O(n r d)\f$                 | \f$O(nd + rd)\f$ per chunk | exact gradient of the polynomial forward |
///
/// (\f$r\f$ = feature width of the degree-\f$g\f$ polynomial, \f$\binom{d_h+g}{g}\f$ with symmetric monomials.)
/// \code
///   polyattn::PolynomialAttentionOptions options;
///   options.attention.causal = true;
///   options.attention.heads = 4;
///   options.degree = 2;
///   auto attn = polyattn::make_attention_backend<float>(polyattn::parse_attention_method("adjoint"), options);
///   attn->forward(Q, K, V, O);
///   attn->backward(Q, K, V, O, G, dQ, dK, dV);
/// \endcode
#pragma once

#include "adjoint_gradients.hpp"
#include "backend.hpp"
#include "exact_gradients.hpp"
#include "paper_gradients.hpp"

#include <array>
#include <memory>
#include <string>

namespace polyattn {

/// A new backend computing attention by `method`, configured by `options` (exact methods read only
/// `options.attention`). Throws std::invalid_argument for invalid options or an invalid method value.
template <class T>
std::unique_ptr<AttentionBackend<T>> make_attention_backend(AttentionMethod method,
                                                            const PolynomialAttentionOptions& options) {
  detail::static_check_scalar<T>();
  constexpr const char* where = "polyattn::make_attention_backend";
  options.check();
  switch (method) {
    case AttentionMethod::exact_reference: return std::make_unique<ExactReferenceBackend<T>>(options.attention);
    case AttentionMethod::exact_blocked: return std::make_unique<ExactBlockedBackend<T>>(options.attention);
    case AttentionMethod::paper: return std::make_unique<PaperBackend<T>>(options);
    case AttentionMethod::adjoint: return std::make_unique<AdjointBackend<T>>(options);
  }
  throw std::invalid_argument(detail::concat(where, ": argument 'method' has the invalid value ",
                                             static_cast<int>(method)));
}

/// make_attention_backend() with only the attention options (scale, mask, heads): what the exact methods need. The
/// polynomial methods (paper, adjoint) get PolynomialAttentionOptions' defaults for everything else (degree 2
/// Taylor, symmetric features, automatic blocks). The scale defaults to \f$1/\sqrt{d_h}\f$ (AttentionOptions::scale).
template <class T>
std::unique_ptr<AttentionBackend<T>> make_attention_backend(AttentionMethod method, const AttentionOptions& options) {
  PolynomialAttentionOptions polynomial;
  polynomial.attention = options;
  return make_attention_backend<T>(method, polynomial);
}

}  // namespace polyattn
