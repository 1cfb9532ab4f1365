/// \file parallel/state_exchange.hpp
/// Sequence parallelism without a dependency on MPI: the collectives that attention needs when every rank
/// (process) holds a contiguous shard of the sequence, and the checks that keep the ranks in step.
///
/// The polynomial method's key state \f$Z = \mathrm{diag}(\omega)M_K^\top[V, \mathbf 1]\f$ and the adjoint's
/// state gradient \f$Y = \mathrm{diag}(\omega)M_Q^\top E\f$ are sums over rows (polynomial_kernel.hpp). With the
/// rows split over ranks \f$0, \dots, P-1\f$ in sequence order, each rank computes the sum \f$S_p\f$ over its own
/// rows, and
/// - without the mask every rank needs \f$\sum_p S_p\f$: all_reduce_sum();
/// - with the mask rank \f$p\f$'s forward scan starts from \f$\sum_{q<p} S_q\f$ and its backward (suffix) scan from
///   \f$\sum_{q>p} S_q\f$: exclusive_prefix_sum() with `reverse` false or true.
///
/// The states are exchanged in double whatever the scalar type of the attention (the kernel converts), so that
/// adding P partial states costs no more accuracy than the sums inside a rank.
///
/// The exact methods have no small state: every query needs every key. Their sequence-parallel form is the simple
/// baseline (parallel/gathered_keys.hpp): all_gather_rows() of the keys and values, and reduce_scatter_rows() of
/// the key-side gradients, O(n d) numbers per rank instead of O(r d).
///
/// **Every call is collective**: all ranks must call the same sequence of methods with the same shapes.
/// PolynomialAttention and AdjointBackend guarantee this by agree() before their first exchange (all ranks then
/// either continue or throw) and succeeded() after their last one, so that an error on one rank makes every rank
/// throw instead of leaving the others waiting. parallel/distributed.hpp implements the interface over an MPI
/// communicator (MpiStateExchange).
///
/// \code
///   // with MPI (parallel/distributed.hpp): every rank passes its own rows of Q, K, V and gets its rows of O
///   polyattn::PolynomialAttention<float> attention(options);
///   attention.set_state_exchange(std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD));
///   attention.forward(Q_shard, K_shard, V_shard, O_shard);
/// \endcode
#pragma once

#include "../common.hpp"

#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace polyattn {

/// Rows in the order MPI sends them (row-major, each row contiguous), for the row collectives of StateExchange.
using RowMajorMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Collectives over the ranks that share one sequence (see the file documentation). Implementations: MpiStateExchange
/// (parallel/distributed.hpp); a test may implement it over threads or a single rank.
class StateExchange {
 public:
  virtual ~StateExchange() = default;

  /// This rank's position in the sequence order, in [0, ranks()).
  virtual int rank() const = 0;
  /// Number of ranks.
  virtual int ranks() const = 0;

  /// Replaces `values` by their entrywise sum over all ranks (the same shape on every rank).
  virtual void all_reduce_sum(Eigen::Ref<Eigen::MatrixXd> values) = 0;

  /// Replaces this rank's local total by the entrywise sum of the totals of the ranks before it (`reverse` false)
  /// or after it (`reverse` true); the first rank in that order receives zeros.
  virtual void exclusive_prefix_sum(Eigen::Ref<Eigen::MatrixXd> local_total_in_prefix_out, bool reverse) = 0;

  /// The maximum of `value` over all ranks.
  virtual double all_reduce_max(double value) = 0;

  /// Replaces `values` by their entrywise minimum over all ranks (the building block of agree() and succeeded()).
  virtual void all_reduce_min(Eigen::Ref<Eigen::VectorXd> values) = 0;

  /// Gathers every rank's rows in rank order: `local` holds this rank's rows (rows_per_rank[rank()] x cols, the
  /// same cols on every rank) and `rows_per_rank` every rank's count (rows_per_rank() gives it); `gathered`
  /// becomes (their sum) x cols.
  virtual void all_gather_rows(const Eigen::Ref<const RowMajorMatrixXd>& local, const std::vector<Index>& rows_per_rank,
                               RowMajorMatrixXd& gathered) = 0;

  /// Sums `all_rows` ((sum of rows_per_rank) x cols, the same shape on every rank) over the ranks and writes this
  /// rank's rows of the sum, rows \f$[s_p, s_p + \f$ rows_per_rank[rank()]\f$)\f$ with \f$s_p\f$ the rows of the ranks
  /// before it, into `local`.
  virtual void reduce_scatter_rows(const Eigen::Ref<const RowMajorMatrixXd>& all_rows,
                                   const std::vector<Index>& rows_per_rank, Eigen::Ref<RowMajorMatrixXd> local) = 0;

  /// Every rank's `local_rows`, in rank order, in one all_reduce_sum().
  std::vector<Index> rows_per_rank(Index local_rows) {
    Eigen::MatrixXd counts = Eigen::MatrixXd::Zero(ranks(), 1);
    counts(rank(), 0) = static_cast<double>(local_rows);
    all_reduce_sum(counts);
    std::vector<Index> rows(static_cast<std::size_t>(ranks()));
    for (int p = 0; p < ranks(); ++p) rows[static_cast<std::size_t>(p)] = static_cast<Index>(counts(p, 0));
    return rows;
  }

  /// A setting every rank must hold the same value of, with its name for the error message.
  struct Setting {
    const char* name;
    double value;
  };

  /// The collective check before a call's first exchange, in one all_reduce_min(). `local_failure` is the
  /// exception of this rank's own validation (null when it passed); `settings` must have the same length on
  /// every rank, also on one whose validation failed (its values are then ignored). When any rank failed, every
  /// rank throws: the failing ones their own exception, the others std::invalid_argument naming `where` and the
  /// lowest failing rank. Otherwise, when a setting differs between ranks, every rank throws
  /// std::invalid_argument naming `where`, the setting and its smallest and largest value.
  void agree(const char* where, std::exception_ptr local_failure, const std::vector<Setting>& settings) {
    const auto count = static_cast<Index>(settings.size());
    // Minima of [failing rank, settings, -settings] give the lowest failing rank and every setting's range.
    Eigen::VectorXd reduced(1 + 2 * count);
    reduced(0) = local_failure ? rank() : ranks();
    for (Index i = 0; i < count; ++i) {
      reduced(1 + i) = settings[static_cast<std::size_t>(i)].value;
      reduced(1 + count + i) = -settings[static_cast<std::size_t>(i)].value;
    }
    all_reduce_min(reduced);
    if (local_failure) std::rethrow_exception(local_failure);
    if (reduced(0) < ranks())
      throw std::invalid_argument(detail::concat(where, ": rank ", static_cast<int>(reduced(0)), " of ", ranks(),
                                                 " failed validation (its own exception names the argument); every "
                                                 "rank throws so that none waits in a collective"));
    for (Index i = 0; i < count; ++i) {
      const Setting& setting = settings[static_cast<std::size_t>(i)];
      const double smallest = reduced(1 + i), largest = -reduced(1 + count + i);
      if (smallest != largest)
        throw std::invalid_argument(detail::concat(where, ": '", setting.name, "' differs across the ", ranks(),
                                                   " ranks (from ", smallest, " to ", largest, "; this rank has ",
                                                   setting.value, "): every rank must use the same settings"));
    }
  }

  /// Replaces every entry of `values` by its maximum over all ranks, in one all_reduce_min() (the same length on
  /// every rank: call it after agree()).
  void maxima_over_ranks(std::vector<double>& values) {
    Eigen::VectorXd negated = -Eigen::Map<const Eigen::VectorXd>(values.data(), static_cast<Index>(values.size()));
    all_reduce_min(negated);
    Eigen::Map<Eigen::VectorXd>(values.data(), static_cast<Index>(values.size())) = -negated;
  }

  /// The collective check after a call's last exchange, in one all_reduce_min(): when any rank failed
  /// (`local_failure` not null), every rank throws, the failing ones their own exception, the others the same
  /// standard type (std::domain_error, std::invalid_argument, else std::runtime_error) naming `where` and the
  /// lowest failing rank, so that no rank continues into the next collective alone.
  void succeeded(const char* where, std::exception_ptr local_failure) {
    enum Kind { kind_domain_error, kind_invalid_argument, kind_other, kinds };
    int kind = kind_other;
    if (local_failure) {
      try {
        std::rethrow_exception(local_failure);
      } catch (const std::domain_error&) {
        kind = kind_domain_error;
      } catch (const std::invalid_argument&) {
        kind = kind_invalid_argument;
      } catch (...) {
      }
    }
    Eigen::VectorXd lowest(1);
    lowest(0) = local_failure ? rank() * kinds + kind : ranks() * kinds;
    all_reduce_min(lowest);
    if (local_failure) std::rethrow_exception(local_failure);
    const auto code = static_cast<int>(lowest(0));
    if (code >= ranks() * kinds) return;
    const std::string message = detail::concat(where, ": rank ", code / kinds, " of ", ranks(),
                                               " failed (its own exception says why); every rank throws so that "
                                               "none waits in a collective");
    if (code % kinds == kind_domain_error) throw std::domain_error(message);
    if (code % kinds == kind_invalid_argument) throw std::invalid_argument(message);
    throw std::runtime_error(message);
  }
};

}  // namespace polyattn
