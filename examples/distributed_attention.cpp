/// \file distributed_attention.cpp
/// Sequence-parallel attention over MPI (parallel/distributed.hpp): under `mpirun -np P`, a sequence of N tokens is
/// split evenly over the P ranks, and each rank times the forward and backward pass on its own rows (--method:
/// adjoint by default; paper, exact_blocked and exact_reference also run sharded, see
/// parallel/distributed_backend.hpp).
///
/// Every rank draws its own rows of Q, K, V and G (uniform, float) from (seed, rank), so no rank ever holds the
/// whole sequence; the attention is one layer's: h heads of dimension d, causal unless --non-causal, the
/// symmetric feature map with degree-2 Taylor polynomial (PolynomialAttentionOptions::degree = 2, used as given
/// because radius = 0: r = C(d+2, 2) features, 153 for d = 16). After one warm-up call, each of --repeats rounds
/// runs forward() then backward() between barriers; rank 0 prints every rank's rows, median forward and backward
/// times (wall-clock, and the process's CPU time of the pair), the bytes it contributed to the state exchanges
/// per call (MpiStateExchange::bytes_sent()) and its peak resident memory, then a summary line with the slowest
/// rank's medians.
///
/// --gpt-step times a GPT training step instead (2 layers, d_model 64, 4 heads, vocabulary 256, degree 2, context
/// N, float, AdamW): each rank embeds its own tokens, every attention layer exchanges with the other ranks, and
/// the parameter gradients are all-reduced (GPT::set_state_exchange); the bytes include that all-reduce.
///
/// --exchange-only times the exchanges alone: the collectives a causal and a non-causal call make per head, on
/// one r x (d+1) state in double (MPI_Exscan in sequence order and reversed, MPI_Allreduce), as the median over
/// --repeats rounds of 1000 calls each.
///
/// Usage: mpirun -np P distributed_attention [--tokens N] [--heads H] [--head-dim D] [--causal | --non-causal]
///                                           [--method M] [--repeats R] [--seed S] [--gpt-step | --exchange-only]
///                                           (--help: ranges, defaults)
#include <polyattn/extern_templates.hpp>
#include <polyattn/parallel/distributed.hpp>

#include <mpi.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <iostream>
#include <memory>
#include <random>
#include <vector>

#include "cli.hpp"

namespace {

using polyattn::Index;
using polyattn::Matrix;

constexpr const char* program = "distributed_attention";
constexpr int degree = 2;
constexpr Index max_tokens = Index(1) << 28;
constexpr int exchange_calls_per_round = 1000;

struct Settings {
  Index tokens = Index(1) << 20;
  Index heads = 1;
  Index head_dim = 16;
  bool causal = true;
  int repeats = 5;
  std::uint64_t seed = 1;
  polyattn::AttentionMethod method = polyattn::AttentionMethod::adjoint;
  bool gpt_step = false;
  bool exchange_only = false;
};

void print_usage(std::ostream& out) {
  out << "usage: mpirun -np P distributed_attention [--tokens N] [--heads H] [--head-dim D] [--causal | --non-causal]\n"
         "                                          [--method M] [--repeats R] [--seed S] [--gpt-step | --exchange-only]\n"
         "\n"
         "Sequence-parallel attention (float; polynomial methods: degree-2 Taylor polynomial, symmetric features):\n"
         "the N tokens are split evenly over the P ranks, each rank draws its own rows of Q, K, V, G from (seed, rank),\n"
         "and forward + backward are timed after one warm-up. Rank 0 prints every rank's rows, median forward and\n"
         "backward times, bytes it sent in exchanges per call and peak RSS, then a summary of the slowest rank.\n"
         "Run one OpenMP thread per rank (OMP_NUM_THREADS=1) unless ranks x threads <= cores.\n"
         "\n"
         "Options (default in parentheses):\n"
         "  --tokens N        sequence length, split over the ranks, 1.."
      << max_tokens
      << " (1048576)\n"
         "  --heads H         heads, 1..64 (1)\n"
         "  --head-dim D      dimension per head of Q, K and V, 1..64 (16)\n"
         "  --causal          causal mask (the default)\n"
         "  --non-causal      no mask\n"
         "  --method M        adjoint, paper, exact_blocked or exact_reference (adjoint)\n"
         "  --gpt-step        time a GPT training step on the N tokens (2 layers, d_model 64, 4 heads, vocabulary\n"
         "                    256, causal, AdamW) with attention M instead of one attention layer (--heads\n"
         "                    and --head-dim do not apply)\n"
         "  --repeats R       timed rounds after the warm-up, 1..1000 (5)\n"
         "  --seed S          seed of the inputs, 0..2^62 (1)\n"
         "  --exchange-only   time only the state exchanges of one head: MPI_Exscan (both orders) and\n"
         "                    MPI_Allreduce of r x (D+1) doubles, median of R rounds of "
      << exchange_calls_per_round
      << " calls\n"
         "  --help            this text\n";
}

constexpr const char* method_names = "adjoint, paper, exact_blocked or exact_reference";

polyattn::AttentionMethod parse_method(const std::string& name) {
  try {
    return polyattn::parse_attention_method(name);
  } catch (const std::invalid_argument&) {
    throw polyattn_examples::UsageError(std::string("--method expects ") + method_names + ", got '" + name + "'");
  }
}

// Throws UsageError for a bad command line; returns false after printing --help.
bool parse(int argc, char** argv, Settings& settings, bool print_help) {
  polyattn_examples::Arguments args(argc, argv);
  while (args.next()) {
    if (args.is("--help") || args.is("-h")) {
      if (print_help) print_usage(std::cout);
      return false;
    }
    if (args.is("--tokens")) settings.tokens = args.integer<Index>(1, max_tokens);
    else if (args.is("--heads")) settings.heads = args.integer<Index>(1, 64);
    else if (args.is("--head-dim")) settings.head_dim = args.integer<Index>(1, 64);
    else if (args.is("--causal")) settings.causal = true;
    else if (args.is("--non-causal")) settings.causal = false;
    else if (args.is("--repeats")) settings.repeats = args.integer<int>(1, 1000);
    else if (args.is("--seed")) settings.seed = args.integer<std::uint64_t>(0, 1LL << 62);
    else if (args.is("--method")) settings.method = parse_method(args.value(method_names));
    else if (args.is("--gpt-step")) settings.gpt_step = true;
    else if (args.is("--exchange-only")) settings.exchange_only = true;
    else args.reject();
  }
  if (settings.gpt_step && settings.exchange_only)
    throw polyattn_examples::UsageError("--gpt-step and --exchange-only exclude each other");
  if (settings.gpt_step && !settings.causal)
    throw polyattn_examples::UsageError("--gpt-step trains a causal language model; drop --non-causal");
  return true;
}

// Rows [first, first + rows) of the sequence on this rank: an even split, the first N mod P ranks one row more.
struct Shard {
  Index first, rows;
};

Shard shard_of(Index tokens, int rank, int ranks) {
  const Index first = tokens * rank / ranks, end = tokens * (rank + 1) / ranks;
  return {first, end - first};
}

Matrix<float> uniform_matrix(Index rows, Index cols, float half_width, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> uniform(-half_width, half_width);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = uniform(rng);
  return m;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t middle = values.size() / 2;
  return values.size() % 2 ? values[middle] : (values[middle - 1] + values[middle]) / 2;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// CPU time (user + system) of all threads of this process so far, in seconds. On a machine shared with other
// work it shows how the work divides over the ranks when the wall-clock time cannot.
double process_cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const auto seconds = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_usec);
  };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

// Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB).
double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024;
}

// What every rank reports to rank 0, as doubles for one MPI_Gather.
bool polynomial(polyattn::AttentionMethod method) {
  return method == polyattn::AttentionMethod::adjoint || method == polyattn::AttentionMethod::paper;
}

struct RankReport {
  double rows, threads, forward_seconds, backward_seconds, step_seconds, step_cpu_seconds, forward_bytes,
      backward_bytes, forward_collectives, backward_collectives, peak_rss_mib;
};
constexpr int report_fields = sizeof(RankReport) / sizeof(double);

std::vector<RankReport> gather_reports(const RankReport& mine, int rank, int ranks) {
  std::vector<RankReport> all(rank == 0 ? static_cast<std::size_t>(ranks) : 0);
  MPI_Gather(&mine, report_fields, MPI_DOUBLE, all.data(), report_fields, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return all;
}

// After one warm-up round, times settings.repeats rounds of `forward` then `backward` between barriers: this
// rank's medians and what it sent through `exchange` per round.
template <class Forward, class Backward>
RankReport time_steps(const Settings& settings, Index rows, const polyattn::MpiStateExchange& exchange,
                      Forward&& forward, Backward&& backward) {
  forward();
  backward();
  std::vector<double> forward_times, backward_times, step_times, step_cpu_times;
  std::size_t forward_bytes = 0, backward_bytes = 0, forward_collectives = 0, backward_collectives = 0;
  for (int round = 0; round < settings.repeats; ++round) {
    MPI_Barrier(MPI_COMM_WORLD);  // every rank starts the step together, as in training
    const std::size_t bytes_before = exchange.bytes_sent(), collectives_before = exchange.collectives();
    const double cpu_start = process_cpu_seconds();
    const auto start = std::chrono::steady_clock::now();
    forward();
    forward_times.push_back(seconds_since(start));
    const std::size_t bytes_between = exchange.bytes_sent(), collectives_between = exchange.collectives();
    const auto backward_start = std::chrono::steady_clock::now();
    backward();
    backward_times.push_back(seconds_since(backward_start));
    step_times.push_back(seconds_since(start));
    step_cpu_times.push_back(process_cpu_seconds() - cpu_start);
    forward_bytes = bytes_between - bytes_before;
    backward_bytes = exchange.bytes_sent() - bytes_between;
    forward_collectives = collectives_between - collectives_before;
    backward_collectives = exchange.collectives() - collectives_between;
  }
  return {static_cast<double>(rows),
          static_cast<double>(polyattn::num_threads()),
          median(forward_times),
          median(backward_times),
          median(step_times),
          median(step_cpu_times),
          static_cast<double>(forward_bytes),
          static_cast<double>(backward_bytes),
          static_cast<double>(forward_collectives),
          static_cast<double>(backward_collectives),
          peak_rss_mib()};
}

// Prints every rank's line of `reports` and the summary of the slowest rank's medians.
void print_reports(const std::vector<RankReport>& reports, const Settings& settings, double threads) {
  std::printf("%5s %10s %11s %11s %11s %11s %22s %22s %12s\n", "rank", "rows", "forward s", "backward s",
              "fwd+bwd s", "fwd+bwd CPU", "bytes sent fwd (coll.)", "bytes sent bwd (coll.)", "peak RSS MiB");
  RankReport slowest{};
  for (std::size_t p = 0; p < reports.size(); ++p) {
    const RankReport& r = reports[p];
    std::printf("%5zu %10.0f %11.4f %11.4f %11.4f %11.4f %16.0f (%3.0f) %16.0f (%3.0f) %12.1f\n", p, r.rows,
                r.forward_seconds, r.backward_seconds, r.step_seconds, r.step_cpu_seconds, r.forward_bytes,
                r.forward_collectives, r.backward_bytes, r.backward_collectives, r.peak_rss_mib);
    slowest.forward_seconds = std::max(slowest.forward_seconds, r.forward_seconds);
    slowest.backward_seconds = std::max(slowest.backward_seconds, r.backward_seconds);
    slowest.step_seconds = std::max(slowest.step_seconds, r.step_seconds);
    slowest.step_cpu_seconds = std::max(slowest.step_cpu_seconds, r.step_cpu_seconds);
    slowest.forward_bytes = std::max(slowest.forward_bytes, r.forward_bytes);
    slowest.backward_bytes = std::max(slowest.backward_bytes, r.backward_bytes);
    slowest.peak_rss_mib = std::max(slowest.peak_rss_mib, r.peak_rss_mib);
  }
  std::printf("summary: P = %d, threads/rank = %d, N = %ld, %s: forward %.4f s, backward %.4f s, forward+backward "
              "%.4f s, CPU %.4f s (slowest rank's medians); %.0f bytes sent per rank per forward+backward; peak "
              "RSS %.1f MiB (largest rank)\n",
              static_cast<int>(reports.size()), static_cast<int>(threads), static_cast<long>(settings.tokens),
              settings.causal ? "causal" : "non-causal", slowest.forward_seconds, slowest.backward_seconds,
              slowest.step_seconds, slowest.step_cpu_seconds, slowest.forward_bytes + slowest.backward_bytes,
              slowest.peak_rss_mib);
}

void run_attention(const Settings& settings, int rank, int ranks) {
  const Shard shard = shard_of(settings.tokens, rank, ranks);
  const Index width = settings.heads * settings.head_dim;
  // The time does not depend on the values; small Q and K keep the score radius R = c max|q| max|k| below 1
  // at d = 16, where the degree-2 polynomial is accurate (the header line reports R and the certified error).
  std::seed_seq seeds{settings.seed & 0xffffffffu, settings.seed >> 32, static_cast<std::uint64_t>(rank)};
  std::mt19937_64 rng(seeds);
  const Matrix<float> Q = uniform_matrix(shard.rows, width, 0.5f, rng);
  const Matrix<float> K = uniform_matrix(shard.rows, width, 0.5f, rng);
  const Matrix<float> V = uniform_matrix(shard.rows, width, 1.0f, rng);
  const Matrix<float> G = uniform_matrix(shard.rows, width, 1.0f, rng);
  Matrix<float> O(shard.rows, width), dQ(shard.rows, width), dK(shard.rows, width), dV(shard.rows, width);

  polyattn::PolynomialAttentionOptions options;
  options.attention.causal = settings.causal;
  options.attention.heads = settings.heads;
  options.degree = degree;
  auto exchange = std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD);
  auto backend = polyattn::make_distributed_backend<float>(settings.method, options, exchange);

  // The warm-up call allocates the workspaces and checkpoints and gives the certificate.
  polyattn::Certificate certificate;
  const RankReport mine = time_steps(
      settings, shard.rows, *exchange, [&] { certificate = backend->forward(Q, K, V, O); },
      [&] { backend->backward(Q, K, V, O, G, dQ, dK, dV); });
  const std::vector<RankReport> reports = gather_reports(mine, rank, ranks);
  if (rank != 0) return;

  const Index features = polyattn::feature_width(polyattn::FeatureMapKind::symmetric, settings.head_dim, degree);
  std::printf("distributed %s attention: %d ranks x %d threads, %ld tokens, %s, %ld head(s) of d = %ld, float",
              polyattn::attention_method_name(settings.method), ranks, static_cast<int>(mine.threads),
              static_cast<long>(settings.tokens), settings.causal ? "causal" : "non-causal",
              static_cast<long>(settings.heads), static_cast<long>(settings.head_dim));
  if (polynomial(settings.method))
    std::printf(", degree %d (r = %ld)", degree, static_cast<long>(features));
  std::printf(", median of %d after a warm-up; score radius R = %.3f, certified polynomial error %.2g\n",
              settings.repeats, certificate.radius, certificate.poly_error);
  print_reports(reports, settings, mine.threads);
}

// A GPT training step on the rank's shard of the tokens (see the file documentation).
void run_gpt_step(const Settings& settings, int rank, int ranks) {
  const Shard shard = shard_of(settings.tokens, rank, ranks);
  polyattn::GPTConfig config;
  config.vocab_size = 256;
  config.context = settings.tokens;
  config.d_model = 64;
  config.heads = 4;
  config.layers = 2;
  config.method = settings.method;
  config.approximation.degree = degree;
  config.seed = 1;
  // Tokens and next-token targets of this rank's positions, drawn from (seed, rank); the time does not depend on them.
  std::seed_seq seeds{settings.seed & 0xffffffffu, settings.seed >> 32, static_cast<std::uint64_t>(rank)};
  std::mt19937_64 rng(seeds);
  std::uniform_int_distribution<Index> id(0, config.vocab_size - 1);
  std::vector<Index> tokens(static_cast<std::size_t>(shard.rows)), targets(tokens.size());
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = id(rng);
    targets[i] = id(rng);
  }
  polyattn::GPT<float> model(config);
  auto exchange = std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD);
  model.set_state_exchange(exchange);
  polyattn::AdamW<float> optimizer(model.parameters(), {1e-3});
  double loss = 0;
  const RankReport mine = time_steps(
      settings, shard.rows, *exchange,
      [&] {
        optimizer.zero_grad();
        loss = model.forward(tokens, targets);
      },
      [&] {
        model.backward();
        optimizer.step();
      });
  const std::vector<RankReport> reports = gather_reports(mine, rank, ranks);
  if (rank != 0) return;
  Index parameter_count = 0;
  for (const polyattn::Parameter<float>* p : model.parameters()) parameter_count += p->value.size();
  std::printf("distributed GPT training step (forward = embedding to loss; backward = gradients, their all-reduce "
              "and the AdamW step): %d ranks x %d threads, context %ld tokens, 2 layers, d_model 64, 4 heads, %s "
              "attention",
              ranks, static_cast<int>(mine.threads), static_cast<long>(settings.tokens),
              polyattn::attention_method_name(settings.method));
  if (polynomial(settings.method)) std::printf(" of degree %d", degree);
  std::printf(", float, %ld parameters, median of %d after a warm-up; loss %.4f\n",
              static_cast<long>(parameter_count), settings.repeats, loss);
  print_reports(reports, settings, mine.threads);
}

// Median seconds per call of `collective` over settings.repeats rounds of exchange_calls_per_round calls.
template <class Collective>
double time_collective(const Settings& settings, Collective&& collective) {
  for (int call = 0; call < exchange_calls_per_round / 10; ++call) collective();  // warm-up
  std::vector<double> per_call;
  for (int round = 0; round < settings.repeats; ++round) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto start = std::chrono::steady_clock::now();
    for (int call = 0; call < exchange_calls_per_round; ++call) collective();
    per_call.push_back(seconds_since(start) / exchange_calls_per_round);
  }
  return median(per_call);
}

void run_exchange_only(const Settings& settings, int rank, int ranks) {
  const Index features = polyattn::feature_width(polyattn::FeatureMapKind::symmetric, settings.head_dim, degree);
  polyattn::MpiStateExchange exchange(MPI_COMM_WORLD);
  // A forward state, r x (d+1); the backward one (r x (d+2)) is 6% larger at d = 16.
  const Eigen::MatrixXd state = Eigen::MatrixXd::Constant(features, settings.head_dim + 1, 1.0 + rank);
  Eigen::MatrixXd buffer = state;
  const auto exscan = [&](bool reverse) {
    return time_collective(settings, [&] {
      buffer = state;
      exchange.exclusive_prefix_sum(buffer, reverse);
    });
  };
  const double forward_scan = exscan(false), reversed_scan = exscan(true);
  const double all_reduce = time_collective(settings, [&] {
    buffer = state;
    exchange.all_reduce_sum(buffer);
  });
  // The slowest rank's medians: a collective finishes when its last rank does.
  double slowest[3] = {forward_scan, reversed_scan, all_reduce};
  MPI_Allreduce(MPI_IN_PLACE, slowest, 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (rank != 0) return;
  const double bytes = static_cast<double>(state.size() * static_cast<Index>(sizeof(double)));
  std::printf("state exchange alone: %d ranks, one state r x (d+1) = %ld x %ld doubles = %.0f bytes, median of %d "
              "rounds of %d calls (slowest rank)\n",
              ranks, static_cast<long>(features), static_cast<long>(settings.head_dim + 1), bytes, settings.repeats,
              exchange_calls_per_round);
  std::printf("MPI_Exscan in sequence order: %.2f us per call\n", 1e6 * slowest[0]);
  std::printf("MPI_Exscan reversed:          %.2f us per call\n", 1e6 * slowest[1]);
  std::printf("MPI_Allreduce:                %.2f us per call\n", 1e6 * slowest[2]);
  std::printf("summary: P = %d, %.0f-byte state: exscan %.2f us, reversed exscan %.2f us, allreduce %.2f us\n", ranks,
              bytes, 1e6 * slowest[0], 1e6 * slowest[1], 1e6 * slowest[2]);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  Settings settings;
  int status = 0;
  bool run = false;
  // Every rank parses the same command line and so reaches the same verdict; only rank 0 speaks.
  try {
    run = parse(argc, argv, settings, rank == 0);
  } catch (const polyattn_examples::UsageError& error) {
    status = rank == 0 ? polyattn_examples::usage_error(program, error) : polyattn_examples::usage_exit_code;
  }
  if (run) {
    try {
      if (settings.exchange_only)
        run_exchange_only(settings, rank, ranks);
      else if (settings.gpt_step)
        run_gpt_step(settings, rank, ranks);
      else
        run_attention(settings, rank, ranks);
    } catch (const std::exception& error) {
      // polyattn throws on every rank together, but an allocation failure on one rank would leave the others
      // waiting in a collective: abort them all.
      std::fprintf(stderr, "%s: rank %d of %d: %s\n", program, rank, ranks, error.what());
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  }
  MPI_Finalize();
  return status;
}
