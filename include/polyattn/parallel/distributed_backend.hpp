/// \file parallel/distributed_backend.hpp
/// Every attention method on one rank's shard of a sequence, behind the AttentionBackend interface, over any
/// StateExchange (parallel/state_exchange.hpp; over MPI: MpiStateExchange in parallel/distributed.hpp).
///
/// | method            | what the ranks exchange per head and call                                   | size      |
/// |-------------------|-----------------------------------------------------------------------------|-----------|
/// | `adjoint`         | key state Z forward; state gradient Y backward (all-reduce or exclusive scan) | O(r d)  |
/// | `paper`           | key state Z forward; four low-rank states backward (polynomial states)       | O(r d^2) |
/// | `exact_reference`, `exact_blocked` | all K, V forward (all-gather); dK, dV backward (reduce-scatter) | O(n d) |
///
/// (parallel/gathered_keys.hpp explains the exact methods' baseline.) Every rank passes its own contiguous rows of
/// Q, K, V, O, G, in rank order, uneven or empty, and gets its rows of O, dQ, dK, dV; the results agree with the
/// serial method on the whole sequence up to the rounding of the sums over ranks (tests/mpi/).
///
/// \code
///   auto exchange = std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD);
///   auto attention = polyattn::make_distributed_backend<float>(polyattn::AttentionMethod::paper, options, exchange);
///   attention->forward(Q_rows, K_rows, V_rows, O_rows);
/// \endcode
#pragma once

#include "../attention/backend_factory.hpp"
#include "gathered_keys.hpp"
#include "state_exchange.hpp"

#include <exception>
#include <memory>
#include <stdexcept>

namespace polyattn {

/// A backend computing attention by `method` on this rank's shard of the sequence, combining with the other ranks
/// through `exchange` (see the file documentation); collective: every rank calls it, and then forward() and
/// backward(), with the same method and options. For the forward pass alone, a PolynomialAttention with
/// `set_state_exchange(exchange)` avoids keeping the adjoint's checkpoints. Throws std::invalid_argument on every
/// rank for invalid options or a method that differs between ranks; a null `exchange` throws std::invalid_argument
/// at once. Pass the exchange yourself to read its counters (MpiStateExchange::bytes_sent()); like a backend it
/// serves one thread at a time.
template <class T>
std::unique_ptr<AttentionBackend<T>> make_distributed_backend(AttentionMethod method,
                                                              const PolynomialAttentionOptions& options,
                                                              std::shared_ptr<StateExchange> exchange) {
  detail::static_check_scalar<T>();
  constexpr const char* where = "polyattn::make_distributed_backend";
  detail::require(exchange != nullptr, where, "argument 'exchange' must not be null");
  std::unique_ptr<AttentionBackend<T>> backend;
  std::exception_ptr failure;  // agree() makes every rank throw it
  try {
    options.check();
    switch (method) {
      case AttentionMethod::adjoint: {
        auto adjoint = std::make_unique<AdjointBackend<T>>(options);
        adjoint->set_state_exchange(exchange);
        backend = std::move(adjoint);
        break;
      }
      case AttentionMethod::paper: {
        auto paper = std::make_unique<PaperBackend<T>>(options);
        paper->set_state_exchange(exchange);
        backend = std::move(paper);
        break;
      }
      case AttentionMethod::exact_reference:
      case AttentionMethod::exact_blocked:
        backend = std::make_unique<GatheredKeysBackend<T>>(make_attention_backend<T>(method, options), exchange);
        break;
      default:
        throw std::invalid_argument(detail::concat(where, ": argument 'method' has the invalid value ",
                                                   static_cast<int>(method)));
    }
  } catch (...) {
    failure = std::current_exception();
  }
  exchange->agree(where, failure, {{"method", static_cast<double>(method)}});
  return backend;
}

}  // namespace polyattn
