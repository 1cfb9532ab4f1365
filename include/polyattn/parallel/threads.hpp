/// \file parallel/threads.hpp
/// Threads inside polyattn: one setting for how many, one loop that runs independent blocks on them
/// (parallel_for()), and one region that runs a pass of many such loops without forking a team for each
/// (parallel_pass()).
///
/// **Setting.** polyattn's parallel loops use num_threads() threads: the value given to set_num_threads(), or by
/// default `omp_get_max_threads()` (so `OMP_NUM_THREADS` applies, and all cores when it is unset). Built without
/// OpenMP (the `polyattn::polyattn` target without `OpenMP::OpenMP_CXX`), everything runs on the calling thread
/// and num_threads() is 1.
///
/// **Reproducibility.** Every parallel loop in polyattn partitions its work into blocks whose boundaries depend
/// on the problem only, never on the thread count; each block is computed the same way whichever thread runs it,
/// and partial results are combined in block order. So outputs and gradients are bitwise identical for any
/// number of threads (tests/test_parallel_*.cpp check 1, 2, 3 and 4). This is also why polyattn's targets define
/// `EIGEN_DONT_PARALLELIZE`: Eigen's own OpenMP GEMM chooses its blocking from the thread count, and forking a
/// team per small product inside polyattn's loops costs more than it gains.
///
/// **Thread safety.** Distinct polyattn objects (backends, layers, models, optimizers) may be used from different
/// threads at the same time. One object must not be used by two threads at once: objects keep workspaces.
/// set_num_threads() is meant to be called before the work starts; it is safe to call at any time (an atomic),
/// and a loop already running keeps the count it started with.
///
/// \code
///   polyattn::set_num_threads(4);   // or OMP_NUM_THREADS=4; 0 restores the default
///   attention.forward(Q, K, V, O);  // the same O for 1, 2, 3 or 4 threads
/// \endcode
#pragma once

#include "../common.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <limits>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace polyattn {

namespace detail {
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> setting{0};  // 0: follow omp_get_max_threads()
  return setting;
}
}  // namespace detail

/// Number of threads polyattn's parallel loops use (see the file documentation); 1 without OpenMP.
inline int num_threads() {
#ifdef _OPENMP
  const int setting = detail::thread_setting().load(std::memory_order_relaxed);
  return setting > 0 ? setting : std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

/// Sets the number of threads polyattn uses; 0 restores the default (`omp_get_max_threads()`). Throws
/// std::invalid_argument for a negative count. Without OpenMP the setting is accepted and has no effect.
inline void set_num_threads(int threads) {
  detail::require(threads >= 0, "polyattn::set_num_threads", "argument 'threads' must be >= 0 (0 = default), got ",
                  threads);
  detail::thread_setting().store(threads, std::memory_order_relaxed);
}

namespace detail {

/// Threads that parallel_for() will use for `blocks` blocks: at most num_threads() and `blocks`, and 1 when
/// called from inside a parallel region (polyattn never nests teams). Size per-thread workspaces with it.
inline int parallel_threads(Index blocks) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
#endif
  return static_cast<int>(std::max<Index>(1, std::min<Index>(num_threads(), blocks)));
}

/// Work (about that many multiply-adds, ~0.1 ms) below which a loop runs on the calling thread: waking a team
/// costs microseconds, and far more when other processes hold the cores.
inline constexpr double min_parallel_work = double(1 << 18);

/// The threads of one parallel_pass(), each holding its own Team: its number, and the loops of the pass so far.
/// While a thread runs a pass, parallel_for() hands its loops to the thread's team (current_team()), which
/// splits each loop over the threads already running instead of forking new ones.
class Team {
 public:
  /// The exception a pass keeps: the earliest loop's lowest failed block's.
  struct Failure {
    std::atomic<Index> loop{std::numeric_limits<Index>::max()};
    Index block = std::numeric_limits<Index>::max();
    std::exception_ptr error;
    void keep(Index failed_loop, Index failed_block, std::exception_ptr e) {
#ifdef _OPENMP
#pragma omp critical(polyattn_team_failure)
#endif
      {
        const Index kept = loop.load(std::memory_order_relaxed);
        if (failed_loop < kept || (failed_loop == kept && failed_block < block)) {
          loop.store(failed_loop, std::memory_order_relaxed);
          block = failed_block;
          error = std::move(e);
        }
      }
    }
  };

  Team(int thread, int size, Failure& failure) : thread_(thread), size_(size), failure_(&failure) {}
  int thread() const { return thread_; }

  /// parallel_for()'s loop, split over the team as parallel_for() would split it (static, contiguous: thread t
  /// gets the blocks it would get there), ending with the team's barrier. Every thread of the team must make
  /// the same calls in the same order. A block's exception is kept (the earliest loop's lowest block) and thrown
  /// by parallel_pass() at its end; the blocks of the loops after it are skipped, because they read its results.
  /// The blocks run without a team, so that a loop inside a block runs on its thread alone, as it does inside
  /// parallel_for().
  template <class Body>
  void for_each(Index blocks, Body& body) {
    const Index loop = loops_++;
    current_team() = nullptr;
    const auto run = [&](Index block) {
      if (failure_->loop.load(std::memory_order_relaxed) < loop) return;
      try {
        body(block, thread_);
      } catch (...) {
        failure_->keep(loop, block, std::current_exception());
      }
    };
    if (size_ <= 1) {
      for (Index block = 0; block < blocks; ++block) run(block);
    } else {
#ifdef _OPENMP
#pragma omp for schedule(static)
      for (Index block = 0; block < blocks; ++block) run(block);
#endif
    }
    current_team() = this;
  }

  /// Runs `step` on one thread of the team while the others wait (the part of a pass between two loops that
  /// writes what the whole team reads next), then the team's barrier.
  template <class Step>
  void single(const Step& step) {
    if (size_ <= 1) {
      step();
      return;
    }
#ifdef _OPENMP
#pragma omp single
    step();
#endif
  }

  /// The thread's team while it runs a pass, else null.
  static Team*& current_team() {
    static thread_local Team* team = nullptr;
    return team;
  }

 private:
  int thread_, size_;
  Failure* failure_;
  Index loops_ = 0;
};

/// Runs `pass()`, a sequence of parallel loops (parallel_for() calls and Team::single() steps), in one parallel
/// region of `threads` threads (1: on the calling thread, its loops as parallel_for() runs them): every thread
/// runs `pass()`, and each parallel_for() in it splits its blocks over the threads already running, with a
/// barrier after each loop, instead of forking and joining a team per loop. Worth it for passes of many short
/// loops: a causal scan makes three per window of chunks, about 500 in a forward pass at 2^18 rows, and an
/// empty loop costs 1.2 us on two threads. The loops split exactly as parallel_for() alone would, so results
/// are the same bits; each loop's `work` estimate is ignored (the pass's thread count is chosen once).
/// `pass()` must make the same loops in the same order on every thread, and must not throw outside their blocks:
/// it may only compute what every thread computes alike (views, counts) between them.
template <class Pass>
void parallel_pass(int threads, const Pass& pass) {
#ifdef _OPENMP
  if (threads > 1 && !omp_in_parallel() && !Team::current_team()) {
    Team::Failure failure;
#pragma omp parallel num_threads(threads)
    {
      Team team(omp_get_thread_num(), omp_get_num_threads(), failure);
      Team::current_team() = &team;
      pass();
      Team::current_team() = nullptr;
    }
    if (failure.error) std::rethrow_exception(failure.error);
    return;
  }
#endif
  (void)threads;
  pass();
}

/// Inside a parallel_pass(): `step` on one thread of the team, then a barrier; elsewhere `step` now.
template <class Step>
void serial_step(const Step& step) {
  if (Team* team = Team::current_team())
    team->single(step);
  else
    step();
}

/// Calls `body(block, thread)` for every block in [0, blocks), spread over parallel_threads(blocks) threads, or
/// on the calling thread alone when the loop's estimated `work` is below min_parallel_work; `thread` in
/// [0, parallel_threads(blocks)) indexes per-thread workspaces. The blocks must be independent; results that
/// blocks share must be combined by the caller, in block order, after the loop. An exception thrown by a block
/// is rethrown on the calling thread (the one of the lowest block when several throw) once all blocks finished.
/// Inside a parallel_pass() the loop runs on the pass's threads (Team::for_each()).
template <class Body>
void parallel_for(Index blocks, Body&& body, double work = std::numeric_limits<double>::infinity()) {
  if (Team* team = Team::current_team()) {
    team->for_each(blocks, body);
    return;
  }
  const int threads = work < min_parallel_work ? 1 : parallel_threads(blocks);
  if (threads <= 1) {
    for (Index block = 0; block < blocks; ++block) body(block, 0);
    return;
  }
#ifdef _OPENMP
  std::exception_ptr first_error;
  Index first_failed = blocks;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (Index block = 0; block < blocks; ++block) {
    try {
      body(block, omp_get_thread_num());
    } catch (...) {
#pragma omp critical(polyattn_parallel_for_error)
      if (block < first_failed) {
        first_failed = block;
        first_error = std::current_exception();
      }
    }
  }
  if (first_error) std::rethrow_exception(first_error);
#endif
}

/// Threads over which `heads` independent attention heads run at once, one head per thread: num_threads() when
/// it divides `heads`, so that every thread gets as many heads, else 1 (and 1 inside a parallel region). Then each
/// head's loops run on one thread, without the barriers between a head's passes; otherwise the heads run one
/// after another, each on all threads.
inline int head_threads(Index heads) {
  const int threads = parallel_threads(heads);
  return threads > 1 && heads % threads == 0 ? threads : 1;
}

/// Number of blocks of `block_rows` rows that cover `rows` rows (the last may be shorter).
inline Index block_count(Index rows, Index block_rows) { return (rows + block_rows - 1) / block_rows; }

/// Rows per block of the parallel passes over a whole input (row_statistics(), max_abs(),
/// require_finite_in_parallel()): 8192 rows of a column-major matrix are a 32 KiB run per column in float.
constexpr Index input_pass_rows = 8192;

/// Calls body(block, first_row, rows) for the blocks of input_pass_rows rows of `X` (the last may be shorter), in
/// parallel: the passes that read a whole input, which on one thread would be the serial part of a parallel call.
template <class Derived, class Body>
void for_input_row_blocks(const Eigen::MatrixBase<Derived>& X, const Body& body) {
  parallel_for(block_count(X.rows(), input_pass_rows), [&](Index block, int) {
    const Index i0 = block * input_pass_rows;
    body(block, i0, X.middleRows(i0, std::min(input_pass_rows, X.rows() - i0)));
  }, static_cast<double>(X.size()));
}

/// require_finite() over blocks of rows in parallel, for the inputs that a parallel call reads in full (every
/// attention call checks Q, K, V, and in the backward pass O and G; the per-token layers of nn/ their X and dY): on
/// one thread the check would be the serial part of the call. The entry named is the first non-finite one of the
/// first block that has one, in column order within the block.
template <class Derived>
void require_finite_in_parallel(const char* where, const char* name, const Eigen::MatrixBase<Derived>& X) {
  for_input_row_blocks(X, [&](Index, Index first_row, const auto& rows) {
    require_finite(where, name, rows, first_row);
  });
}

}  // namespace detail
}  // namespace polyattn
