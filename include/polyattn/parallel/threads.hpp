/// \file parallel/threads.hpp
/// Threads inside polyattn: one setting for how many, and one loop that runs independent blocks on them.
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

/// Calls `body(block, thread)` for every block in [0, blocks), spread over parallel_threads(blocks) threads, or
/// on the calling thread alone when the loop's estimated `work` is below min_parallel_work; `thread` in
/// [0, parallel_threads(blocks)) indexes per-thread workspaces. The blocks must be independent; results that
/// blocks share must be combined by the caller, in block order, after the loop. An exception thrown by a block
/// is rethrown on the calling thread (the one of the lowest block when several throw) once all blocks finished.
template <class Body>
void parallel_for(Index blocks, Body&& body, double work = std::numeric_limits<double>::infinity()) {
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
