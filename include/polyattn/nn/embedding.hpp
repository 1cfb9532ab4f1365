/// \file nn/embedding.hpp
/// Token embedding plus learned positional embedding, forward and backward.
#pragma once

#include "../parallel/threads.hpp"
#include "parameter.hpp"

#include <algorithm>
#include <string>
#include <vector>

namespace polyattn {

/// Options of Embedding.
struct EmbeddingOptions {
  /// Number of token ids \f$V\f$ (rows of the token table). Required, >= 1.
  Index vocab_size = 0;
  /// Longest sequence \f$N\f$ (rows of the position table). Required, >= 1.
  Index max_positions = 0;
  /// Width \f$d\f$ of the embeddings. Required, >= 1.
  Index d_model = 0;
  /// Standard deviation of the initial token table (default 0.02, GPT-2's).
  double token_init_std = 0.02;
  /// Standard deviation of the initial position table (default 0.01, GPT-2's).
  double position_init_std = 0.01;
  /// Seed; the tables draw from derive_seed(seed, 0) and derive_seed(seed, 1).
  std::uint64_t seed = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::EmbeddingOptions";
    detail::require(vocab_size >= 1, where, "'vocab_size' must be >= 1, got ", vocab_size);
    detail::require(max_positions >= 1, where, "'max_positions' must be >= 1, got ", max_positions);
    detail::require(d_model >= 1, where, "'d_model' must be >= 1, got ", d_model);
    detail::require(std::isfinite(token_init_std) && token_init_std >= 0, where,
                    "'token_init_std' must be finite and >= 0, got ", token_init_std);
    detail::require(std::isfinite(position_init_std) && position_init_std >= 0, where,
                    "'position_init_std' must be finite and >= 0, got ", position_init_std);
  }
};

/// Row \f$i\f$ of the output is the embedding of token \f$t_i\f$ at position \f$s + i\f$, where \f$s\f$ is the
/// `first_position` argument (0 unless the tokens are a shard of a longer sequence, as in GPT::set_state_exchange()):
/// \f[ Y_{i,\cdot} = E^{\text{tok}}_{t_i,\cdot} + E^{\text{pos}}_{s+i,\cdot},\qquad i = 0, \dots, n-1,\quad
///     s + n \le N. \f]
/// Tokens are discrete, so there is no input gradient; with \f$G = \partial L/\partial Y\f$ backward scatters
/// \f[ \partial L/\partial E^{\text{tok}}_{t,\cdot} \mathrel{+}= \textstyle\sum_{i:\,t_i = t} G_{i,\cdot},\qquad
///     \partial L/\partial E^{\text{pos}}_{s+i,\cdot} \mathrel{+}= G_{i,\cdot}. \f]
/// Every token id is checked against \f$[0, V)\f$ in both passes, so a bad id can never index out of the table.
///
/// Both passes run on num_threads() threads (parallel/threads.hpp): forward and the position gradient over
/// blocks of positions, the token gradient over blocks of table rows, after a stable counting sort of the
/// positions by token, so that each row of the table gradient adds its positions' rows in position order, as
/// the serial scatter does. Results are the same for any number of threads.
///
/// \code
///   polyattn::Embedding<float> embed({/*vocab_size=*/256, /*max_positions=*/1024, /*d_model=*/64});
///   std::vector<polyattn::Index> tokens = {72, 105, 33};
///   polyattn::Matrix<float> X(3, 64);
///   embed.forward(tokens, X);
///   embed.backward(tokens, dX);       // scatters into embed.token_table.grad and embed.position_table.grad
///   embed.forward(tokens, X, /*first_position=*/100);   // the same tokens at positions 100, 101, 102
/// \endcode
template <class T>
class Embedding {
 public:
  /// \f$E^{\text{tok}}\f$ (V x d), named "<name>wte" ("wte" by default).
  Parameter<T> token_table;
  /// \f$E^{\text{pos}}\f$ (N x d), named "<name>wpe" ("wpe" by default).
  Parameter<T> position_table;

  /// `name` prefixes the parameter names, e.g. "encoder." gives "encoder.wte".
  explicit Embedding(const EmbeddingOptions& options, const std::string& name = "");

  const EmbeddingOptions& options() const { return options_; }
  Index vocab_size() const { return options_.vocab_size; }
  Index max_positions() const { return options_.max_positions; }
  Index d_model() const { return options_.d_model; }

  /// Appends the token table and the position table to `out`.
  void collect_parameters(std::vector<Parameter<T>*>& out) {
    out.push_back(&token_table);
    out.push_back(&position_table);
  }

  /// Writes \f$Y\f$ (n x d) for the n token ids `tokens` at positions `first_position` + 0..n-1
  /// (1 <= n, 0 <= first_position, first_position + n <= max_positions).
  void forward(const std::vector<Index>& tokens, MatrixRef<T> Y, Index first_position = 0) const;

  /// Scatters `dY` \f$= \partial L/\partial Y\f$ (n x d) into the table gradients (trainable tables only), for
  /// the tokens and `first_position` of the forward pass.
  void backward(const std::vector<Index>& tokens, const ConstMatrixRef<T>& dY, Index first_position = 0);

  /// Positions per parallel block of forward() and of the position gradient: d additions per position, so 512
  /// positions make enough work per block to amortise the loop. Fixed, as every block size in polyattn.
  static constexpr Index position_block_rows = 512;
  /// Table rows per parallel block of the token gradient: small, because the work per row is proportional to
  /// how often its token occurs, which is skewed in text; many small blocks spread it over the threads.
  static constexpr Index token_block_rows = 16;

 private:
  Index check_tokens(const char* where, const std::vector<Index>& tokens, Index first_position) const {
    detail::require_parameter_shape(where, token_table, vocab_size(), d_model());
    detail::require_parameter_shape(where, position_table, max_positions(), d_model());
    detail::require(first_position >= 0 && first_position < max_positions(), where,
                    "argument 'first_position' must be in [0, ", max_positions(), ") (max_positions), got ",
                    first_position);
    const Index n = static_cast<Index>(tokens.size());
    if (first_position == 0)
      detail::require(n >= 1 && n <= max_positions(), where, "argument 'tokens' must have between 1 and ",
                      max_positions(), " (max_positions) entries, got ", n);
    else
      detail::require(n >= 1 && n <= max_positions() - first_position, where,
                      "argument 'tokens' must have between 1 and ", max_positions() - first_position,
                      " (max_positions - first_position) entries, got ", n);
    for (Index i = 0; i < n; ++i) {
      const Index token = tokens[static_cast<std::size_t>(i)];
      detail::require(token >= 0 && token < vocab_size(), where, "argument 'tokens' entry ", i, " must be in [0, ",
                      vocab_size(), "), got ", token);
    }
    return n;
  }

  EmbeddingOptions options_;
  // Counting sort of backward(): start of each token's positions (V + 1), fill cursors (V), the positions.
  std::vector<Index> token_start_, token_cursor_, positions_by_token_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
Embedding<T>::Embedding(const EmbeddingOptions& options, const std::string& name)
    : options_(options) {
  detail::static_check_scalar<T>();
  options_.check();
  token_table = Parameter<T>(name + "wte", options_.vocab_size, options_.d_model);
  position_table = Parameter<T>(name + "wpe", options_.max_positions, options_.d_model);
  init_normal(token_table, options_.token_init_std, derive_seed(options_.seed, 0));
  init_normal(position_table, options_.position_init_std, derive_seed(options_.seed, 1));
}

template <class T>
void Embedding<T>::forward(const std::vector<Index>& tokens, MatrixRef<T> Y, Index first_position) const {
  constexpr const char* where = "polyattn::Embedding::forward";
  const Index n = check_tokens(where, tokens, first_position);
  detail::require_shape(where, "Y", Y, n, d_model());
  detail::parallel_for(detail::block_count(n, position_block_rows), [&](Index block, int) {
    const Index begin = block * position_block_rows, end = std::min(n, begin + position_block_rows);
    // Column by column: Y and each table column are contiguous, the token gather stays inside one column.
    Y.middleRows(begin, end - begin) = position_table.value.middleRows(first_position + begin, end - begin);
    for (Index j = 0; j < d_model(); ++j)
      for (Index i = begin; i < end; ++i) Y(i, j) += token_table.value(tokens[static_cast<std::size_t>(i)], j);
  });
}

template <class T>
void Embedding<T>::backward(const std::vector<Index>& tokens, const ConstMatrixRef<T>& dY, Index first_position) {
  constexpr const char* where = "polyattn::Embedding::backward";
  const Index n = check_tokens(where, tokens, first_position);
  detail::require_shape(where, "dY", dY, n, d_model());
  detail::require_finite_in_parallel(where, "dY", dY);
  if (position_table.trainable)
    detail::parallel_for(detail::block_count(n, position_block_rows), [&](Index block, int) {
      const Index begin = block * position_block_rows, count = std::min(position_block_rows, n - begin);
      position_table.grad.middleRows(first_position + begin, count) += dY.middleRows(begin, count);
    });
  if (!token_table.trainable) return;
  // Stable counting sort: positions_by_token_[token_start_[t] .. token_start_[t + 1]) are the positions of
  // token t, increasing.
  const Index V = vocab_size();
  token_start_.assign(static_cast<std::size_t>(V) + 1, 0);
  for (const Index token : tokens) ++token_start_[static_cast<std::size_t>(token) + 1];
  for (std::size_t t = 0; t < static_cast<std::size_t>(V); ++t) token_start_[t + 1] += token_start_[t];
  token_cursor_.assign(token_start_.begin(), token_start_.end() - 1);
  positions_by_token_.resize(tokens.size());
  for (Index i = 0; i < n; ++i)
    positions_by_token_[static_cast<std::size_t>(token_cursor_[static_cast<std::size_t>(
        tokens[static_cast<std::size_t>(i)])]++)] = i;
  detail::parallel_for(detail::block_count(V, token_block_rows), [&](Index block, int) {
    const auto first = static_cast<std::size_t>(block * token_block_rows);
    const auto last = static_cast<std::size_t>(std::min(V, (block + 1) * token_block_rows));
    for (Index j = 0; j < d_model(); ++j)
      for (std::size_t t = first; t < last; ++t)
        for (Index k = token_start_[t]; k < token_start_[t + 1]; ++k)
          token_table.grad(static_cast<Index>(t), j) += dY(positions_by_token_[static_cast<std::size_t>(k)], j);
  });
}

}  // namespace polyattn
