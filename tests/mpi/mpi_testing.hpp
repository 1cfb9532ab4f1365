// Helpers shared by the MPI tests: this process's place in MPI_COMM_WORLD, how a sequence is split over the
// ranks, and the message of an expected std::invalid_argument.
#pragma once

#include <polyattn/common.hpp>

#include <mpi.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace polyattn::testing {

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// Rows [first, first + rows) of the sequence on this rank.
struct Shard {
  Index first, rows;
};

// How the rows are split over the ranks.
enum class Split {
  uneven,     // rank p gets a share proportional to p + 1
  empty_rank  // as uneven, but rank 1 gets no rows when there are at least 3 ranks
};

inline Shard shard_of(Index n, Split split = Split::uneven) {
  const int ranks = world_size(), rank = world_rank();
  std::vector<Index> weights(static_cast<std::size_t>(ranks));
  for (int p = 0; p < ranks; ++p) weights[static_cast<std::size_t>(p)] = p + 1;
  if (split == Split::empty_rank && ranks >= 3) weights[1] = 0;
  Index total = 0;
  for (const Index w : weights) total += w;
  std::vector<Index> cuts{0};
  Index running = 0;
  for (const Index w : weights) {
    running += w;
    cuts.push_back(n * running / total);
  }
  const auto p = static_cast<std::size_t>(rank);
  return {cuts[p], cuts[p + 1] - cuts[p]};
}

// Runs `call` and returns the message of the std::invalid_argument it threw ("" if none, "other" for another
// exception type).
template <class Call>
std::string invalid_argument_message(Call&& call) {
  try {
    call();
  } catch (const std::invalid_argument& error) {
    return error.what();
  } catch (...) {
    return "other";
  }
  return "";
}

}  // namespace polyattn::testing
