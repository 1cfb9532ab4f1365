// Sequence-parallel attention, every method (parallel/distributed.hpp), against the serial pass. Every rank builds the
// same full Q, K, V, G from one seed, runs the distributed backend on its shard of the rows and compares its rows
// with the serial backend's on the whole sequence. Every collective call comes before the first check, and
// checks never abort a test case early (CHECK, not REQUIRE), so the ranks stay in step even when one fails.
// Run by CTest with 1, 2, 3 and 4 ranks.
#include <polyattn/parallel/distributed.hpp>

#include "gradient_check.hpp"
#include "mpi/mpi_testing.hpp"

#include <catch2/catch.hpp>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

using polyattn::AttentionMethod;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::PolynomialAttentionOptions;
using polyattn::testing::invalid_argument_message;
using polyattn::testing::random_matrix;
using polyattn::testing::Shard;
using polyattn::testing::shard_of;
using polyattn::testing::Split;
using polyattn::testing::world_rank;
using polyattn::testing::world_size;
using Catch::Matchers::Contains;

namespace {

// max |a - b| over the shard, relative to max |full| over the whole serial result (so an empty shard is 0).
template <class T, class A, class B>
double relative_error(const A& a, const B& b, const Matrix<T>& full) {
  if (a.size() == 0) return 0;
  return (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff() /
         full.template cast<double>().cwiseAbs().maxCoeff();
}

template <class T>
struct Problem {
  Matrix<T> Q, K, V, G;
};

template <class T>
Problem<T> make_problem(Index n, Index width, std::uint64_t seed) {
  return {random_matrix<T>(n, width, seed, 0.4), random_matrix<T>(n, width, seed + 1, 0.4),
          random_matrix<T>(n, width, seed + 2), random_matrix<T>(n, width, seed + 3)};
}

// The serial and the distributed tolerances: double as the project requires; float from its epsilon. The two
// passes add the same terms in another order (the distributed one adds per-rank partial states, in double), so
// each state entry differs by a few roundings of its largest partial sums, and the outputs and gradients, a few
// products of states with row features, by a small multiple of epsilon relative to their largest entry
// (measured: at most 3.6 eps for O, dQ, dK, dV, in float and double, with 1 to 4 ranks). 32 eps leaves room for
// other data without hiding a missing or misplaced state, which costs whole percent.
template <class T>
double tolerance() {
  return std::is_same<T, double>::value ? 1e-12 : 32 * static_cast<double>(std::numeric_limits<float>::epsilon());
}

template <class T>
void check_against_serial(AttentionMethod method, const PolynomialAttentionOptions& options, Index n, Index head_dim,
                          Split split) {
  const Index width = options.attention.heads * head_dim;
  const Problem<T> p = make_problem<T>(n, width, 4242);
  auto serial = polyattn::make_attention_backend<T>(method, options);
  Matrix<T> O(n, width), dQ(n, width), dK(n, width), dV(n, width);
  const polyattn::Certificate serial_cert = serial->forward(p.Q, p.K, p.V, O);
  const polyattn::GradientCertificate serial_grad = serial->backward(p.Q, p.K, p.V, O, p.G, dQ, dK, dV);

  const Shard s = shard_of(n, split);
  const auto rows = [&](const Matrix<T>& X) { return X.middleRows(s.first, s.rows); };
  auto backend = polyattn::make_distributed_backend<T>(method, options, MPI_COMM_WORLD);
  Matrix<T> O_s(s.rows, width), dQ_s(s.rows, width), dK_s(s.rows, width), dV_s(s.rows, width);
  // The inputs are row blocks of the full matrices (Refs with an outer stride), as a caller slicing one would pass.
  const polyattn::Certificate cert = backend->forward(rows(p.Q), rows(p.K), rows(p.V), O_s);
  const polyattn::GradientCertificate grad =
      backend->backward(rows(p.Q), rows(p.K), rows(p.V), O_s, rows(p.G), dQ_s, dK_s, dV_s);
  // The forward pass alone, without the adjoint's checkpoints (the causal pre-pass).
  polyattn::PolynomialAttention<T> attention(options);
  attention.set_state_exchange(std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD));
  Matrix<T> O_forward(s.rows, width);
  attention.forward(rows(p.Q), rows(p.K), rows(p.V), O_forward);

  INFO("rank " << world_rank() << " of " << world_size() << ": " << polyattn::attention_method_name(method)
               << ", rows " << s.first << " + " << s.rows << ", causal " << options.attention.causal << ", heads " << options.attention.heads << ", chunk "
               << options.chunk_size << ", checkpoint bytes " << options.max_checkpoint_bytes << ", window bytes "
               << options.scan_window_bytes);
  const double tol = tolerance<T>();
  CHECK(relative_error<T>(O_s, rows(O), O) <= tol);
  if (method == AttentionMethod::paper || method == AttentionMethod::adjoint)
    CHECK(relative_error<T>(O_forward, rows(O), O) <= tol);
  CHECK(relative_error<T>(dQ_s, rows(dQ), dQ) <= tol);
  CHECK(relative_error<T>(dK_s, rows(dK), dK) <= tol);
  CHECK(relative_error<T>(dV_s, rows(dV), dV) <= tol);
  // R and max |V| are maxima, exact over ranks: the certificate of the whole sequence on every rank.
  CHECK(cert.radius == serial_cert.radius);
  CHECK(cert.poly_error == serial_cert.poly_error);
  CHECK(cert.output_bound == serial_cert.output_bound);
  CHECK(grad.dv_bound == Approx(serial_grad.dv_bound).epsilon(tol));
  CHECK(grad.dqk_bound == Approx(serial_grad.dqk_bound).epsilon(tol));
}

template <class T>
void check_every_configuration(AttentionMethod method) {
  const bool polynomial = method == AttentionMethod::paper || method == AttentionMethod::adjoint;
  for (const bool causal : {false, true})
    for (const Index heads : {1, 2})
      for (const Split split : {Split::uneven, Split::empty_rank}) {
        PolynomialAttentionOptions options;
        options.attention.causal = causal;
        options.attention.heads = heads;
        options.degree = 2;
        options.chunk_size = 16;  // the shards (rows 203 split unevenly) are not multiples of it
        check_against_serial<T>(method, options, 203, 4, split);
        if (!polynomial) continue;  // the exact methods have no chunking option
        options.chunk_size = 0;  // automatic blocks: every shard fits one
        check_against_serial<T>(method, options, 203, 4, split);
        if (causal && method == AttentionMethod::adjoint) {
          // No checkpoints: backward() recomputes the prefix states from the forward pass's incoming state,
          // window by window: one chunk per window (1 byte), or a few with a partial last window (2000 bytes).
          options.chunk_size = 16;
          options.max_checkpoint_bytes = 0;
          for (const std::size_t window_bytes : {std::size_t(1), std::size_t(2000)}) {
            options.scan_window_bytes = window_bytes;
            check_against_serial<T>(method, options, 203, 4, split);
          }
        }
      }
}

template <class T>
void check_every_method() {
  for (const AttentionMethod method : polyattn::all_attention_methods) check_every_configuration<T>(method);
}

}  // namespace

TEST_CASE("distributed attention matches the serial pass in double, every method", "[mpi]") {
  check_every_method<double>();
}

TEST_CASE("distributed attention matches the serial pass in float, every method", "[mpi]") {
  check_every_method<float>();
}

TEST_CASE("kept and recomputed causal prefix states give bitwise the same result on every rank", "[mpi]") {
  // As serially (max_checkpoint_bytes changes memory, never results): with checkpoints the shard's chunk states
  // are summed before the exchange and then scanned from the incoming state, without them a pre-pass sums them
  // and backward() rebuilds them from the incoming state; both add the same terms in the same order.
  PolynomialAttentionOptions kept;
  kept.attention.causal = true;
  kept.attention.heads = 2;
  kept.chunk_size = 16;
  PolynomialAttentionOptions recomputed = kept;
  recomputed.max_checkpoint_bytes = 0;
  recomputed.scan_window_bytes = 1;
  const Index n = 203, width = 8;
  const Problem<double> p = make_problem<double>(n, width, 99);
  const Shard s = shard_of(n, Split::empty_rank);
  const auto rows = [&](const Matrix<double>& X) { return X.middleRows(s.first, s.rows); };
  struct Result {
    Matrix<double> O, dQ, dK, dV;
  };
  const auto run = [&](const PolynomialAttentionOptions& options) {
    auto backend = polyattn::make_distributed_backend<double>(AttentionMethod::adjoint, options, MPI_COMM_WORLD);
    Result r{Matrix<double>(s.rows, width), Matrix<double>(s.rows, width), Matrix<double>(s.rows, width),
             Matrix<double>(s.rows, width)};
    backend->forward(rows(p.Q), rows(p.K), rows(p.V), r.O);
    backend->backward(rows(p.Q), rows(p.K), rows(p.V), r.O, rows(p.G), r.dQ, r.dK, r.dV);
    return r;
  };
  const Result with_checkpoints = run(kept), without = run(recomputed);
  polyattn::PolynomialAttention<double> attention(kept);
  attention.set_state_exchange(std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD));
  Matrix<double> O_forward(s.rows, width);
  attention.forward(rows(p.Q), rows(p.K), rows(p.V), O_forward);

  CHECK(with_checkpoints.O == without.O);
  CHECK(with_checkpoints.O == O_forward);
  CHECK(with_checkpoints.dQ == without.dQ);
  CHECK(with_checkpoints.dK == without.dK);
  CHECK(with_checkpoints.dV == without.dV);
}

TEST_CASE("options that differ across ranks make every rank throw", "[mpi]") {
  PolynomialAttentionOptions options;
  options.attention.causal = true;
  options.degree = world_rank() == 0 ? 4 : 2;
  const Problem<double> p = make_problem<double>(40, 4, 7);
  const Shard s = shard_of(40, Split::uneven);
  auto backend = polyattn::make_distributed_backend<double>(AttentionMethod::adjoint, options, MPI_COMM_WORLD);
  Matrix<double> O(s.rows, 4);
  const std::string message =
      invalid_argument_message([&] { backend->forward(p.Q.middleRows(s.first, s.rows), p.K.middleRows(s.first, s.rows),
                                                      p.V.middleRows(s.first, s.rows), O); });
  if (world_size() == 1) {
    CHECK(message.empty());
  } else {
    CHECK_THAT(message, Contains("polyattn::AdjointBackend::forward: 'degree' differs across the") &&
                            Contains("(from 2 to 4; this rank has"));
  }
}

TEST_CASE("an invalid method, or a method that differs across ranks, is refused on every rank", "[mpi]") {
  const std::string invalid = invalid_argument_message([&] {
    polyattn::make_distributed_backend<float>(static_cast<AttentionMethod>(7), PolynomialAttentionOptions{},
                                              MPI_COMM_WORLD);
  });
  const AttentionMethod mine = world_rank() == 0 ? AttentionMethod::exact_blocked : AttentionMethod::paper;
  const std::string differing = invalid_argument_message(
      [&] { polyattn::make_distributed_backend<float>(mine, PolynomialAttentionOptions{}, MPI_COMM_WORLD); });
  CHECK_THAT(invalid, Contains("polyattn::make_distributed_backend: argument 'method' has the invalid value 7"));
  if (world_size() == 1)
    CHECK(differing.empty());
  else
    CHECK_THAT(differing, Contains("polyattn::make_distributed_backend: 'method' differs across the"));
}

TEST_CASE("exact methods: shapes or masks that differ across ranks make every rank throw", "[mpi]") {
  PolynomialAttentionOptions options;
  options.attention.causal = world_rank() == 0;
  const Problem<double> p = make_problem<double>(40, 4, 7);
  const Shard s = shard_of(40, Split::uneven);
  const auto rows = [&](const Matrix<double>& X) { return X.middleRows(s.first, s.rows); };
  auto backend = polyattn::make_distributed_backend<double>(AttentionMethod::exact_blocked, options, MPI_COMM_WORLD);
  Matrix<double> O(s.rows, 4);
  const std::string mask = invalid_argument_message([&] { backend->forward(rows(p.Q), rows(p.K), rows(p.V), O); });
  // Keys that do not match the queries' rows on the last rank (its own validation fails).
  options.attention.causal = false;
  auto same_mask = polyattn::make_distributed_backend<double>(AttentionMethod::exact_blocked, options, MPI_COMM_WORLD);
  const bool last = world_rank() == world_size() - 1;
  const std::string rows_message = invalid_argument_message([&] {
    same_mask->forward(rows(p.Q), last ? p.K.topRows(s.rows + 1) : rows(p.K), last ? p.V.topRows(s.rows + 1) : rows(p.V),
                       O);
  });
  if (world_size() == 1) {
    CHECK(mask.empty());
  } else {
    CHECK_THAT(mask, Contains("polyattn::GatheredKeysBackend::forward: 'causal' differs across the"));
  }
  if (last)
    CHECK_THAT(rows_message, Contains("polyattn::GatheredKeysBackend::forward: every rank passes its own rows of one "
                                      "sequence, so 'Q' and 'K' must have the same number of rows"));
  else
    CHECK_THAT(rows_message, Contains("polyattn::GatheredKeysBackend::forward: rank " +
                                      std::to_string(world_size() - 1) + " of " + std::to_string(world_size()) +
                                      " failed validation"));
}

TEST_CASE("a non-finite input on one rank makes every rank throw, and the ranks stay in step", "[mpi]") {
  PolynomialAttentionOptions options;
  options.attention.causal = true;
  options.attention.heads = 2;
  const Index n = 50, width = 8;
  const Problem<double> p = make_problem<double>(n, width, 11);
  const Shard s = shard_of(n, Split::empty_rank);
  const int bad_rank = world_size() - 1;  // the last rank always has rows
  Matrix<double> Q_s = p.Q.middleRows(s.first, s.rows);
  if (world_rank() == bad_rank) Q_s(0, 0) = std::numeric_limits<double>::quiet_NaN();
  auto backend = polyattn::make_distributed_backend<double>(AttentionMethod::adjoint, options, MPI_COMM_WORLD);
  Matrix<double> O_s(s.rows, width), dQ_s(s.rows, width), dK_s(s.rows, width), dV_s(s.rows, width);
  const std::string message = invalid_argument_message(
      [&] { backend->forward(Q_s, p.K.middleRows(s.first, s.rows), p.V.middleRows(s.first, s.rows), O_s); });
  // Then a valid call on every rank, which must still agree with the serial pass.
  Q_s = p.Q.middleRows(s.first, s.rows);
  backend->forward(Q_s, p.K.middleRows(s.first, s.rows), p.V.middleRows(s.first, s.rows), O_s);
  auto serial = polyattn::make_attention_backend<double>(AttentionMethod::adjoint, options);
  Matrix<double> O(n, width);
  serial->forward(p.Q, p.K, p.V, O);

  if (world_rank() == bad_rank)
    CHECK_THAT(message, Contains("polyattn::AdjointBackend::forward: argument 'Q' has a non-finite entry"));
  else
    CHECK_THAT(message, Contains("polyattn::AdjointBackend::forward: rank " + std::to_string(bad_rank) + " of " +
                                 std::to_string(world_size()) + " failed validation"));
  CHECK(relative_error<double>(O_s, O.middleRows(s.first, s.rows), O) <= tolerance<double>());
}

TEST_CASE("a non-positive normaliser on one rank makes every rank throw std::domain_error", "[mpi]") {
  // Degree 1 (1 + x, negative below -1): a query opposed to the sum of the keys gets a negative normaliser
  // D_i = m + c q_i . sum_j k_j; only the last rank holds one.
  PolynomialAttentionOptions options;
  options.degree = 1;
  const Index n = 48, width = 4;
  const Problem<double> p = make_problem<double>(n, width, 19);
  const Shard s = shard_of(n, Split::uneven);
  const int bad_rank = world_size() - 1;
  Matrix<double> Q_s = p.Q.middleRows(s.first, s.rows);
  if (world_rank() == bad_rank) Q_s.row(0) = -100.0 * p.K.colwise().sum().normalized();
  auto backend = polyattn::make_distributed_backend<double>(AttentionMethod::adjoint, options, MPI_COMM_WORLD);
  Matrix<double> O_s(s.rows, width);
  std::string message;
  bool domain_error = false;
  try {
    backend->forward(Q_s, p.K.middleRows(s.first, s.rows), p.V.middleRows(s.first, s.rows), O_s);
  } catch (const std::domain_error& error) {
    domain_error = true;
    message = error.what();
  }
  CHECK(domain_error);
  if (world_rank() == bad_rank)
    CHECK_THAT(message, Contains("approximate normaliser of row 0"));
  else
    CHECK_THAT(message, Contains("polyattn::AdjointBackend::forward: rank " + std::to_string(bad_rank) + " of " +
                                 std::to_string(world_size()) + " failed"));
}
