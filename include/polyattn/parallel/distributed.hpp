/// \file parallel/distributed.hpp
/// Sequence-parallel attention over MPI: every rank holds a contiguous shard of the sequence (rows of Q, K, V, O,
/// G, uneven or empty), and the polynomial method's states are combined over the ranks
/// (parallel/state_exchange.hpp). Not included by polyattn.hpp, because it needs `<mpi.h>`: link
/// `polyattn::mpi` (polyattn and MPI::MPI_CXX) and include this header.
///
/// Rank p of the communicator holds rows \f$[s_p, s_{p+1})\f$, in rank order. Per head, with
/// \f$S_p\f$ the sum over rank p's rows:
/// - non-causal: \f$Z = \sum_p S_p(Z)\f$ and \f$Y = \sum_p S_p(Y)\f$ (MPI_Allreduce);
/// - causal: rank p's forward scan starts from \f$\sum_{q<p} S_q(Z)\f$ (MPI_Exscan) and its backward scan from
///   \f$\sum_{q>p} S_q(Y)\f$ (MPI_Exscan on a communicator with the ranks reversed).
///
/// States are r x (d_v+1) or r x (d_v+2) numbers per head, exchanged in double; the cost per call is a few
/// small collectives per head, independent of the sequence length. Results agree with the serial pass on the
/// whole sequence up to the rounding of the different summation order (tests/mpi/). polyattn calls MPI only
/// from the thread that called it, never inside its OpenMP loops, so MPI_Init (or MPI_THREAD_FUNNELED) suffices.
///
/// \code
///   MPI_Init(&argc, &argv);
///   {
///     polyattn::PolynomialAttentionOptions options;
///     options.attention.causal = true;
///     auto attention = polyattn::make_distributed_backend<float>(polyattn::AttentionMethod::adjoint, options,
///                                                                MPI_COMM_WORLD);
///     attention->forward(Q_rows, K_rows, V_rows, O_rows);                           // this rank's rows
///     attention->backward(Q_rows, K_rows, V_rows, O_rows, G_rows, dQ_rows, dK_rows, dV_rows);
///   }  // destroy the backend (it frees its communicators) before MPI_Finalize
///   MPI_Finalize();
/// \endcode
#pragma once

#include "distributed_backend.hpp"
#include "state_exchange.hpp"

#include <mpi.h>

#include <climits>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>

namespace polyattn {

/// StateExchange over an MPI communicator, whose rank order is the sequence order. The constructor and the
/// destructor are collective over the communicator (it is duplicated, so polyattn's messages never meet the
/// caller's, and split once with the ranks reversed for the backward scans). Destroy it before MPI_Finalize.
///
/// It counts what this rank contributes (bytes_sent(), collectives()), so that a caller can measure the
/// exchange's share of a step and model it on another network.
class MpiStateExchange final : public StateExchange {
 public:
  explicit MpiStateExchange(MPI_Comm comm) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    detail::require(initialized != 0, where_, "MPI_Init must be called first");
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &ranks_), "MPI_Comm_size");
    check(MPI_Comm_split(comm_, 0, ranks_ - 1 - rank_, &reversed_), "MPI_Comm_split");
  }
  MpiStateExchange(const MpiStateExchange&) = delete;
  MpiStateExchange& operator=(const MpiStateExchange&) = delete;
  ~MpiStateExchange() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;  // too late to free: MPI_Finalize released the communicators
    MPI_Comm_free(&reversed_);
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int ranks() const override { return ranks_; }

  /// Payload this rank has passed to the collectives of this exchange since its construction: for every
  /// all_reduce_sum(), exclusive_prefix_sum(), all_reduce_max() and all_reduce_min() call, the number of doubles
  /// it contributes times 8 (the states, and the few numbers of agree(), succeeded() and the maxima). It is not
  /// the traffic on the wire, which depends on MPI's algorithm and P (a ring all-reduce sends about 2(P-1)/P
  /// times the payload per rank, a tree or a scan up to log2(P) times); the constructor's communicator set-up
  /// is not counted.
  std::size_t bytes_sent() const { return bytes_sent_; }
  /// Number of those collective calls; each costs at least one network latency whatever its size.
  std::size_t collectives() const { return collectives_; }

  void all_reduce_sum(Eigen::Ref<Eigen::MatrixXd> values) override {
    in_contiguous_memory(values, [&](double* data, int count) {
      check(MPI_Allreduce(MPI_IN_PLACE, data, count, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce");
    });
  }

  void exclusive_prefix_sum(Eigen::Ref<Eigen::MatrixXd> local_total_in_prefix_out, bool reverse) override {
    const MPI_Comm order = reverse ? reversed_ : comm_;
    in_contiguous_memory(local_total_in_prefix_out, [&](double* data, int count) {
      check(MPI_Exscan(MPI_IN_PLACE, data, count, MPI_DOUBLE, MPI_SUM, order), "MPI_Exscan");
    });
    // MPI_Exscan leaves the first rank's buffer undefined; nothing comes before it.
    if ((reverse ? ranks_ - 1 - rank_ : rank_) == 0) local_total_in_prefix_out.setZero();
  }

  double all_reduce_max(double value) override {
    tally(1);
    check(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_MAX, comm_), "MPI_Allreduce");
    return value;
  }

  void all_reduce_min(Eigen::Ref<Eigen::VectorXd> values) override {
    const int count = count_of(values.size());
    tally(count);
    check(MPI_Allreduce(MPI_IN_PLACE, values.data(), count, MPI_DOUBLE, MPI_MIN, comm_), "MPI_Allreduce");
  }

  void all_gather_rows(const Eigen::Ref<const RowMajorMatrixXd>& local, const std::vector<Index>& rows_per_rank,
                       RowMajorMatrixXd& gathered) override {
    const Index total = row_layout("all_gather_rows", local.rows(), local.cols(), rows_per_rank);
    gathered.resize(total, local.cols());
    // A Ref may have padded rows; MPI needs this rank's block contiguous.
    const double* send = local.data();
    if (local.outerStride() != local.cols()) {
      row_buffer_ = local;
      send = row_buffer_.data();
    }
    const int count = counts_[static_cast<std::size_t>(rank_)];
    tally(count);
    check(MPI_Allgatherv(send, count, MPI_DOUBLE, gathered.data(), counts_.data(), displacements_.data(), MPI_DOUBLE,
                         comm_),
          "MPI_Allgatherv");
  }

  void reduce_scatter_rows(const Eigen::Ref<const RowMajorMatrixXd>& all_rows, const std::vector<Index>& rows_per_rank,
                           Eigen::Ref<RowMajorMatrixXd> local) override {
    const Index total = row_layout("reduce_scatter_rows", local.rows(), local.cols(), rows_per_rank);
    detail::require(all_rows.rows() == total && all_rows.cols() == local.cols(), where_,
                    "reduce_scatter_rows needs 'all_rows' of ", total, "x", local.cols(), ", got ", all_rows.rows(),
                    "x", all_rows.cols());
    const double* send = all_rows.data();
    if (all_rows.outerStride() != all_rows.cols()) {
      row_buffer_ = all_rows;
      send = row_buffer_.data();
    }
    tally(count_of(all_rows.size()));
    const bool contiguous = local.outerStride() == local.cols();
    if (!contiguous) received_.resize(local.rows(), local.cols());
    check(MPI_Reduce_scatter(send, contiguous ? local.data() : received_.data(), counts_.data(), MPI_DOUBLE, MPI_SUM,
                             comm_),
          "MPI_Reduce_scatter");
    if (!contiguous) local = received_;
  }

 private:
  static constexpr const char* where_ = "polyattn::MpiStateExchange";

  // Throws std::runtime_error when an MPI call fails (only reached when the communicator's error handler
  // returns errors instead of aborting, MPI's default).
  static void check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw std::runtime_error(detail::concat(where_, ": ", call, " failed: ", std::string(text, length)));
  }

  // MPI counts are int; states are far smaller, so a larger one is a caller's error.
  static int count_of(Index size) {
    detail::require(size <= INT_MAX, where_, "a state of ", size, " numbers exceeds MPI's count limit ", INT_MAX);
    return static_cast<int>(size);
  }

  // Checks `rows_per_rank` against this rank's `rows` x `cols` block, fills counts_ and displacements_ (in
  // doubles) and returns the total number of rows.
  Index row_layout(const char* call, Index rows, Index cols, const std::vector<Index>& rows_per_rank) {
    detail::require(static_cast<int>(rows_per_rank.size()) == ranks_, where_, call, " needs 'rows_per_rank' with ",
                    ranks_, " entries (one per rank), got ", rows_per_rank.size());
    detail::require(rows_per_rank[static_cast<std::size_t>(rank_)] == rows, where_, call, " on rank ", rank_,
                    " got ", rows, " local rows but 'rows_per_rank' says ", rows_per_rank[static_cast<std::size_t>(rank_)]);
    counts_.resize(rows_per_rank.size());
    displacements_.resize(rows_per_rank.size());
    Index total = 0;
    for (std::size_t p = 0; p < rows_per_rank.size(); ++p) {
      displacements_[p] = count_of(total * cols);
      counts_[p] = count_of(rows_per_rank[p] * cols);
      total += rows_per_rank[p];
    }
    count_of(total * cols);
    return total;
  }

  // Counts one collective call to which this rank contributes `count` doubles.
  void tally(int count) {
    bytes_sent_ += static_cast<std::size_t>(count) * sizeof(double);
    ++collectives_;
  }

  // Calls collective(data, count) on the entries of `values`, in place when they are contiguous.
  template <class Collective>
  void in_contiguous_memory(Eigen::Ref<Eigen::MatrixXd> values, Collective&& collective) {
    const int count = count_of(values.size());
    tally(count);
    if (values.outerStride() == values.rows()) {
      collective(values.data(), count);
      return;
    }
    buffer_ = values;
    collective(buffer_.data(), count);
    values = buffer_;
  }

  MPI_Comm comm_ = MPI_COMM_NULL, reversed_ = MPI_COMM_NULL;
  int rank_ = 0, ranks_ = 1;
  Eigen::MatrixXd buffer_;  // a copy of non-contiguous states
  RowMajorMatrixXd row_buffer_, received_;  // copies of non-contiguous rows
  std::vector<int> counts_, displacements_;  // of the row collectives, in doubles
  std::size_t bytes_sent_ = 0, collectives_ = 0;
};

/// make_distributed_backend() over the ranks of `comm`, through a new MpiStateExchange.
template <class T>
std::unique_ptr<AttentionBackend<T>> make_distributed_backend(AttentionMethod method,
                                                              const PolynomialAttentionOptions& options,
                                                              MPI_Comm comm) {
  return make_distributed_backend<T>(method, options, std::make_shared<MpiStateExchange>(comm));
}

}  // namespace polyattn
