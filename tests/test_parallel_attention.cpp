// Attention on polyattn's threads (parallel/threads.hpp): outputs, gradients and certificates are bitwise the same
// for 1, 2, 3 and 4 threads, for every method, with and without the causal mask, in float and double; and the
// polynomial forward pass is one kernel, so the adjoint's output is PolynomialAttention's to the bit; the exact
// blocked backend also with small uneven blocks and with fewer queries than keys. The CI script also runs this file
// under ThreadSanitizer.
#include <polyattn/attention/backend_factory.hpp>
#include <polyattn/attention/exact_gradients.hpp>
#include <polyattn/parallel/threads.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

using polyattn::AttentionMethod;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::testing::random_matrix;
using polyattn::testing::ThreadCountGuard;

namespace {

template <class T>
struct Run {
  Matrix<T> O, dQ, dK, dV;
  double radius, dqk_bound, dv_bound;
  bool operator==(const Run& other) const {
    return O == other.O && dQ == other.dQ && dK == other.dK && dV == other.dV && radius == other.radius &&
           dqk_bound == other.dqk_bound && dv_bound == other.dv_bound;
  }
};

template <class T>
Run<T> run_attention(AttentionMethod method, const polyattn::PolynomialAttentionOptions& options, Index n,
                     Index head_dim, std::uint64_t seed) {
  const Index width = options.attention.heads * head_dim;
  const Matrix<T> Q = random_matrix<T>(n, width, seed, 0.4), K = random_matrix<T>(n, width, seed + 1, 0.4);
  const Matrix<T> V = random_matrix<T>(n, width, seed + 2), G = random_matrix<T>(n, width, seed + 3);
  auto backend = polyattn::make_attention_backend<T>(method, options);
  Run<T> run{Matrix<T>(n, width), Matrix<T>(n, width), Matrix<T>(n, width), Matrix<T>(n, width), 0, 0, 0};
  run.radius = backend->forward(Q, K, V, run.O).radius;
  const polyattn::GradientCertificate certificate = backend->backward(Q, K, V, run.O, G, run.dQ, run.dK, run.dV);
  run.dqk_bound = certificate.dqk_bound;
  run.dv_bound = certificate.dv_bound;
  return run;
}

template <class T>
void check_thread_counts_agree(AttentionMethod method, bool causal, Index heads, Index chunk_size, Index n) {
  ThreadCountGuard guard;
  polyattn::PolynomialAttentionOptions options;
  options.attention.causal = causal;
  options.attention.heads = heads;
  options.degree = 2;
  options.chunk_size = chunk_size;
  INFO("method " << polyattn::attention_method_name(method) << ", causal " << causal << ", heads " << heads
                 << ", chunk " << chunk_size << ", n " << n);
  polyattn::set_num_threads(1);
  const Run<T> serial = run_attention<T>(method, options, n, 8, 2024);
  for (const int threads : {2, 3, 4}) {
    polyattn::set_num_threads(threads);
    INFO("threads " << threads);
    REQUIRE(run_attention<T>(method, options, n, 8, 2024) == serial);
  }
}

template <class T>
void check_every_method() {
  for (const AttentionMethod method : polyattn::all_attention_methods)
    for (const bool causal : {false, true}) {
      check_thread_counts_agree<T>(method, causal, 2, 40, 731);  // many small blocks, a short last one
      check_thread_counts_agree<T>(method, causal, 1, 0, 1500);  // the automatic block sizes
      // Polynomial forward passes: on 2 and 4 threads the heads run concurrently (head_threads()), on 3 one after
      // another.
      check_thread_counts_agree<T>(method, causal, 4, 32, 300);
    }
}

// The exact blocked backend with blocks far smaller than n that do not divide it (many work items, short last
// blocks, query and key blocks of different sizes in each pass), on n queries and m >= n keys.
template <class T>
Run<T> exact_blocked_forward_backward(const polyattn::AttentionOptions& options, Index n, Index m) {
  const Index width = options.heads * 8;
  const Matrix<T> Q = random_matrix<T>(n, width, 31, 0.4), K = random_matrix<T>(m, width, 32, 0.4);
  const Matrix<T> V = random_matrix<T>(m, width, 33), G = random_matrix<T>(n, width, 34);
  polyattn::ExactBlockedOptions blocks;
  blocks.forward_query_block = 48;
  blocks.forward_key_block = 80;
  blocks.query_block = 56;
  blocks.key_block = 40;
  polyattn::ExactBlockedBackend<T> backend(options, blocks);
  Run<T> run{Matrix<T>(n, width), Matrix<T>(n, width), Matrix<T>(m, width), Matrix<T>(m, width), 0, 0, 0};
  run.radius = backend.forward(Q, K, V, run.O).radius;
  const polyattn::GradientCertificate certificate = backend.backward(Q, K, V, run.O, G, run.dQ, run.dK, run.dV);
  run.dqk_bound = certificate.dqk_bound;
  run.dv_bound = certificate.dv_bound;
  return run;
}

template <class T>
void check_exact_blocked_thread_counts_agree() {
  ThreadCountGuard guard;
  struct Case {
    Index n, m;
  };
  // n = m; fewer queries than keys (causal: the queries are the last positions); one query block (then only the
  // key blocks of the backward pass are parallel). Every other loop here exceeds min_parallel_work, so the threads
  // really share the blocks.
  for (const Case shape : {Case{700, 700}, Case{515, 733}, Case{40, 733}})
    for (const bool causal : {false, true})
      for (const Index heads : {1, 2}) {
        const polyattn::AttentionOptions options{std::nullopt, causal, heads};
        INFO("n " << shape.n << ", m " << shape.m << ", causal " << causal << ", heads " << heads);
        polyattn::set_num_threads(1);
        const Run<T> serial = exact_blocked_forward_backward<T>(options, shape.n, shape.m);
        for (const int threads : {2, 3, 4}) {
          polyattn::set_num_threads(threads);
          INFO("threads " << threads);
          REQUIRE(exact_blocked_forward_backward<T>(options, shape.n, shape.m) == serial);
        }
      }
}

}  // namespace

TEST_CASE("The exact blocked backend gives bitwise the same results on 1, 2, 3 and 4 threads for uneven blocks",
          "[threads]") {
  check_exact_blocked_thread_counts_agree<float>();
  check_exact_blocked_thread_counts_agree<double>();
}

TEST_CASE("Every method gives bitwise the same results on 1, 2, 3 and 4 threads (float)", "[threads]") {
  check_every_method<float>();
}

TEST_CASE("Every method gives bitwise the same results on 1, 2, 3 and 4 threads (double)", "[threads]") {
  check_every_method<double>();
}

TEST_CASE("The adjoint's output is PolynomialAttention's output to the bit", "[threads]") {
  for (const bool causal : {false, true}) {
    polyattn::PolynomialAttentionOptions options;
    options.attention.causal = causal;
    options.attention.heads = 2;
    options.degree = 4;
    const Index n = 300, width = 2 * 6;
    const Matrix<double> Q = random_matrix<double>(n, width, 7, 0.5), K = random_matrix<double>(n, width, 8, 0.5);
    const Matrix<double> V = random_matrix<double>(n, width, 9);
    Matrix<double> from_attention(n, width), from_adjoint(n, width);
    polyattn::PolynomialAttention<double>(options).forward(Q, K, V, from_attention);
    polyattn::AdjointBackend<double>(options).forward(Q, K, V, from_adjoint);
    INFO("causal " << causal);
    REQUIRE(from_adjoint == from_attention);
  }
}

TEST_CASE("Heads run concurrently only when the thread count divides them", "[threads]") {
  ThreadCountGuard guard;
  polyattn::set_num_threads(2);
  CHECK(polyattn::detail::head_threads(4) == 2);
  CHECK(polyattn::detail::head_threads(2) == 2);
  CHECK(polyattn::detail::head_threads(3) == 1);
  CHECK(polyattn::detail::head_threads(1) == 1);
  polyattn::set_num_threads(4);
  CHECK(polyattn::detail::head_threads(2) == 2);  // as many threads as heads
  CHECK(polyattn::detail::head_threads(6) == 1);
  CHECK(polyattn::detail::head_threads(8) == 4);
}

TEST_CASE("Concurrent heads throw the error of the lowest failing head, as one after another do", "[threads]") {
  // Degree 1 (1 + s) is negative for scores below -1. Head 0 has such a row late in the sequence, head 1 early; the
  // heads' error names head 0's row whether the heads run in order (1 thread) or concurrently (2 threads, which
  // run head 1 while head 0 is still going).
  ThreadCountGuard guard;
  const Index n = 20000, head_dim = 2;
  Matrix<double> Q = Matrix<double>::Constant(n, 2 * head_dim, 0.1), K = Matrix<double>::Constant(n, 2 * head_dim, 0.1);
  const Matrix<double> V = random_matrix<double>(n, 2 * head_dim, 5);
  Q.row(17000).head(head_dim).setConstant(-30.0);
  Q.row(3).tail(head_dim).setConstant(-30.0);
  for (const bool causal : {false, true})
    for (const AttentionMethod method : {AttentionMethod::paper, AttentionMethod::adjoint}) {
      polyattn::PolynomialAttentionOptions options;
      options.attention.causal = causal;
      options.attention.heads = 2;
      options.degree = 1;
      std::vector<std::string> messages;
      for (const int threads : {1, 2}) {
        polyattn::set_num_threads(threads);
        auto backend = polyattn::make_attention_backend<double>(method, options);
        Matrix<double> O(n, 2 * head_dim);
        try {
          backend->forward(Q, K, V, O);
          messages.emplace_back("no error");
        } catch (const std::domain_error& error) {
          messages.emplace_back(error.what());
        }
      }
      INFO("method " << polyattn::attention_method_name(method) << ", causal " << causal);
      CHECK_THAT(messages[0], Catch::Matchers::Contains("normaliser of row 17000"));
      CHECK(messages[1] == messages[0]);
    }
}

namespace {

// Two causal heads in chunks of 16 rows: 250 rows make 16 scan chunks.
polyattn::PolynomialAttentionOptions causal_scan_options() {
  polyattn::PolynomialAttentionOptions options;
  options.attention.causal = true;
  options.attention.heads = 2;
  options.chunk_size = 16;
  return options;
}

}  // namespace

TEST_CASE("The causal adjoint gives the same bits with or without checkpoints, for any scan window", "[threads]") {
  ThreadCountGuard guard;
  polyattn::PolynomialAttentionOptions options = causal_scan_options();
  const Run<double> checkpointed = run_attention<double>(AttentionMethod::adjoint, options, 250, 4, 11);
  // Kept checkpoints (the default budget), or none: the backward pass recomputes the prefix states window by window.
  for (const std::size_t checkpoint_bytes : {options.max_checkpoint_bytes, std::size_t(0)})
    // Automatic windows (all 16 chunks at once), one chunk per window (1 byte), a few chunks (5000 bytes).
    for (const std::size_t window_bytes : {std::size_t(0), std::size_t(1), std::size_t(5000)})
      for (const int threads : {1, 3}) {
        options.max_checkpoint_bytes = checkpoint_bytes;
        options.scan_window_bytes = window_bytes;
        polyattn::set_num_threads(threads);
        INFO("checkpoint bytes " << checkpoint_bytes << ", window bytes " << window_bytes << ", threads " << threads);
        REQUIRE(run_attention<double>(AttentionMethod::adjoint, options, 250, 4, 11) == checkpointed);
      }
}

TEST_CASE("The causal paper backward gives the same bits for any scan window", "[threads]") {
  ThreadCountGuard guard;
  polyattn::PolynomialAttentionOptions options = causal_scan_options();
  polyattn::set_num_threads(1);
  const Run<double> automatic = run_attention<double>(AttentionMethod::paper, options, 250, 4, 12);
  // One chunk per window (1 byte), a few chunks (a paper slot of r (d_v + 1) d_k + r (d_v + 1) doubles is 3 KiB at
  // d = 4, g = 2), all 16 chunks at once.
  for (const std::size_t window_bytes : {std::size_t(1), std::size_t(10000), std::size_t(1) << 20})
    for (const int threads : {1, 3}) {
      options.scan_window_bytes = window_bytes;
      polyattn::set_num_threads(threads);
      INFO("window bytes " << window_bytes << ", threads " << threads);
      REQUIRE(run_attention<double>(AttentionMethod::paper, options, 250, 4, 12) == automatic);
    }
}

TEST_CASE("The exact window gives the same bits on 1, 2, 3 and 4 threads and with or without checkpoints",
          "[threads][exact_window]") {
  // Windows across chunk boundaries (50 rows with chunks of 40: the causal states lag by 2 chunks) and with the
  // automatic blocks; the near-field tiles of one chunk read other chunks' rows but write only their own.
  ThreadCountGuard guard;
  struct Case {
    Index chunk, n, window;
  };
  for (const bool causal : {false, true})
    for (const Case shape : {Case{40, 731, 50}, Case{0, 1500, 64}}) {
      const Index n = shape.n;
      polyattn::PolynomialAttentionOptions options;
      options.attention.causal = causal;
      options.attention.heads = 2;
      options.chunk_size = shape.chunk;
      options.exact_window = shape.window;
      INFO("causal " << causal << ", chunk " << shape.chunk << ", n " << n << ", window " << shape.window);
      polyattn::set_num_threads(1);
      const Run<float> serial = run_attention<float>(AttentionMethod::adjoint, options, n, 8, 2025);
      const Run<double> serial_double = run_attention<double>(AttentionMethod::adjoint, options, n, 8, 2025);
      for (const int threads : {2, 3, 4}) {
        polyattn::set_num_threads(threads);
        INFO("threads " << threads);
        REQUIRE(run_attention<float>(AttentionMethod::adjoint, options, n, 8, 2025) == serial);
        REQUIRE(run_attention<double>(AttentionMethod::adjoint, options, n, 8, 2025) == serial_double);
      }
      if (!causal) continue;
      options.max_checkpoint_bytes = 0;  // the prefix states recomputed, one chunk per scan window
      options.scan_window_bytes = 1;
      REQUIRE(run_attention<double>(AttentionMethod::adjoint, options, n, 8, 2025) == serial_double);
    }
}
