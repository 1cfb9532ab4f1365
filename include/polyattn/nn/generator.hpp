/// \file nn/generator.hpp
/// Autoregressive generation from a trained causal GPT (gpt.hpp): a prompt, then one token at a time, with a
/// decoding state per attention layer so that a new token never recomputes the prefix.
///
/// **Decoding state.** A new token at position \f$i\f$ runs through the model as one row: the embedding at
/// position \f$i\f$, then per block LayerNorm, the four projections, attention against the state, LayerNorm and the
/// MLP, then the final LayerNorm and the head. Only attention looks at earlier positions; what it keeps depends on
/// the layer's method:
/// - **Exact methods** (exact_reference, exact_blocked): a KV cache, the rows \f$k_j, v_j\f$ of every position;
///   per head the new query's softmax over all of them,
///   \f$s = c\,K q,\ w = e^{s - \max s},\ o = V^\top w / \mathbf 1^\top w\f$, vectorised along the keys (the blocked
///   ExactAttention kernel is vectorised along queries, which a single query would leave scalar), the heads on
///   polyattn's threads once the context is long (each head one thread's work, so the result does not depend on
///   the thread count): \f$O(n d)\f$ time per token and \f$O(n d)\f$ memory at context length \f$n\f$.
/// - **Polynomial methods** (paper, adjoint: their forward pass is the polynomial method,
///   polynomial_attention.hpp). With monomials \f$m(\cdot)\f$ and weights \f$\omega\f$ of the feature map
///   (feature_map.hpp), \f$\varphi_Q(q)^\top\varphi_K(k) = m(\sqrt c\,q)^\top\mathrm{diag}(\omega)\,m(\sqrt c\,k)
///   = p(c\,q^\top k)\f$, so causal polynomial attention of query \f$i\f$ is
///   \f[ [\tilde N_i, \tilde D_i] = m(\sqrt c\,q_i)^\top Z_i,\qquad \tilde o_i = \tilde N_i / \tilde D_i,\qquad
///       Z_i = Z_{i-1} + \mathrm{diag}(\omega)\,m(\sqrt c\,k_i)\,[v_i^\top, 1], \f]
///   a recurrent model whose state \f$Z\f$ (\f$r \times (d_v+1)\f$ per head, the key state of the chunked scan in
///   polynomial_kernel.hpp) is all a new token needs: \f$O(r d_v)\f$ time and memory per head and token,
///   whatever the position.
///
/// **The same logits as the full forward.** prefill() runs GPT::forward() on the prompt (its logits are that
/// pass's last row) and builds each state from the layer's keys and values: the cache copies them, \f$Z\f$ sums
/// them. append() computes the same function of the prefix as GPT::forward() on the prefix does at its last
/// position; only the order of the additions differs (the chunked scan evaluates its diagonal block as
/// \f$p(c\,QK^\top)\f$ and earlier chunks through \f$Z\f$, the recurrence every key through \f$Z\f$; the exact
/// forward sums keys in blocks of its own), so the logits agree up to rounding (tests/test_generator.cpp checks
/// every method in float and double). The polynomial must be the one the full forward would choose on the prefix:
/// it depends on the score radius \f$R = c\max_i\|q_i\|\max_j\|k_j\|\f$ only through the options (only once
/// \f$R\f$ exceeds a configured `radius` > 0), so the generator tracks \f$R\f$ and re-applies the range policy
/// there. A polynomial refit to every call's \f$R\f$ (minimax with `radius` = 0) is refused; under
/// RangePolicy::throw_error a radius beyond `radius` throws as the forward pass does, and under raise_degree, when
/// the policy picks another polynomial, append() throws std::domain_error (the state holds the sums of the old
/// polynomial's features): prefill() the sequence again.
///
/// **Sampling** (TokenSampler, GenerationOptions): temperature 0 (or top_k 1) takes the most likely token;
/// otherwise the token is drawn from \f$\mathrm{softmax}(\ell / \tau)\f$ restricted to the top_k largest logits,
/// with a seeded generator, so the same seed gives the same tokens.
///
/// **Model state.** Generation runs the model's own layers (the weights are read, never copied); append() runs them
/// on single rows, which overwrites what the last forward pass kept, so it calls GPT::discard_activations():
/// backward() then needs a new forward(tokens, targets). The state is a function of the weights: after changing
/// them (an optimizer step, set_attention_method()), prefill() again. A Generator and its model must not be used
/// by two threads at once; serial models only (no state exchange).
///
/// \code
///   polyattn::GPT<float> model(config);                  // trained, or load_parameters("model.bin", model)
///   polyattn::Generator<float> generator(model);
///   polyattn::GenerationOptions options;
///   options.max_new_tokens = 200;
///   options.temperature = 0.8;
///   options.top_k = 40;
///   options.seed = 7;
///   std::vector<polyattn::Index> tokens = generator.generate(prompt, options);
///
///   // or step by step: the next-token logits (1 x vocab) of the prompt, then of each appended token
///   const polyattn::Matrix<float>& logits = generator.prefill(prompt);
///   generator.append(next_token);                        // O(r d) per polynomial layer, O(n d) per exact one
/// \endcode
#pragma once

#include "../attention/options.hpp"
#include "../attention/feature_map.hpp"
#include "../attention/polynomial_attention.hpp"
#include "../attention/polynomial_kernel.hpp"
#include "gpt.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace polyattn {

/// Options of Generator::generate() and TokenSampler.
struct GenerationOptions {
  /// Tokens to generate, >= 1 (default 64). The prompt and every new token but the last take a position each, so
  /// prompt length + max_new_tokens - 1 <= the model's context.
  Index max_new_tokens = 64;
  /// Softmax temperature \f$\tau \ge 0\f$ (default 1): logits are divided by it; 0 takes the most likely token.
  double temperature = 1.0;
  /// Sample among the top_k most likely tokens only; 0 (default) means all, 1 the most likely one. At most the
  /// vocabulary size.
  Index top_k = 0;
  /// Seed of the token draws (default 0).
  std::uint64_t seed = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::GenerationOptions";
    detail::require(max_new_tokens >= 1, where, "'max_new_tokens' must be >= 1, got ", max_new_tokens);
    detail::require(std::isfinite(temperature) && temperature >= 0, where,
                    "'temperature' must be finite and >= 0, got ", temperature);
    detail::require(top_k >= 0, where, "'top_k' must be >= 0 (0 = every token), got ", top_k);
  }
};

/// Draws tokens from next-token logits \f$\ell\f$ (see the file documentation): the largest logit (the lowest
/// id among equal ones) when the temperature is 0 or top_k is 1, otherwise token \f$t\f$ of the top_k largest
/// logits with probability \f$\propto e^{(\ell_t - \max\ell)/\tau}\f$, from a std::mt19937_64 seeded with
/// `seed`, whose 53 high bits make the uniform draw (the same tokens on every platform).
class TokenSampler {
 public:
  explicit TokenSampler(const GenerationOptions& options) : options_(checked(options)), random_(options.seed) {}

  const GenerationOptions& options() const { return options_; }

  /// The next token for `logits` (a row or column of vocabulary size >= top_k, finite entries).
  template <class Derived>
  Index next(const Eigen::MatrixBase<Derived>& logits) {
    constexpr const char* where = "polyattn::TokenSampler::next";
    const Index vocab = logits.size();
    detail::require(logits.rows() == 1 || logits.cols() == 1, where,
                    "argument 'logits' must be one row or column, got ", logits.rows(), "x", logits.cols());
    detail::require(vocab >= 1 && options_.top_k <= vocab, where, "argument 'logits' must have at least 'top_k' = ",
                    std::max<Index>(options_.top_k, 1), " entries, got ", vocab);
    detail::require_finite(where, "logits", logits);
    const auto logit = [&](Index t) { return static_cast<double>(logits(t)); };
    if (options_.temperature == 0 || options_.top_k == 1) {
      Index best = 0;
      for (Index t = 1; t < vocab; ++t)
        if (logit(t) > logit(best)) best = t;
      return best;
    }
    order_.resize(static_cast<std::size_t>(vocab));
    for (Index t = 0; t < vocab; ++t) order_[static_cast<std::size_t>(t)] = t;
    const std::size_t kept = options_.top_k > 0 ? static_cast<std::size_t>(options_.top_k) : order_.size();
    if (kept < order_.size()) {  // the kept tokens first, then in id order so that the draw does not depend on ties
      std::nth_element(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(kept) - 1, order_.end(),
                       [&](Index a, Index b) { return logit(a) > logit(b) || (logit(a) == logit(b) && a < b); });
      order_.resize(kept);
      std::sort(order_.begin(), order_.end());
    }
    double largest = -std::numeric_limits<double>::infinity();
    for (const Index t : order_) largest = std::max(largest, logit(t));
    weights_.resize(order_.size());
    double total = 0;
    for (std::size_t k = 0; k < order_.size(); ++k) {
      weights_[k] = std::exp((logit(order_[k]) - largest) / options_.temperature);  // in (0, 1], the largest 1
      total += weights_[k];
    }
    const double target = static_cast<double>(random_() >> 11) * 0x1.0p-53 * total;  // uniform in [0, total)
    double running = 0;
    for (std::size_t k = 0; k < order_.size(); ++k) {
      running += weights_[k];
      if (target < running) return order_[k];
    }
    return order_.back();  // target within rounding of total
  }

 private:
  static const GenerationOptions& checked(const GenerationOptions& options) {
    options.check();
    return options;
  }

  GenerationOptions options_;
  std::mt19937_64 random_;
  std::vector<Index> order_;
  std::vector<double> weights_;
};

/// Generation from a GPT with a KV cache per exact attention layer and a recurrent state per polynomial one (see
/// the file documentation). Holds one sequence; several generators may share a model (not at the same time).
template <class T>
class Generator {
 public:
  /// Generates from `model`, which must outlive the generator. Throws std::invalid_argument when the model has a
  /// state exchange (generation is serial).
  explicit Generator(GPT<T>& model);

  Generator(const Generator&) = delete;
  Generator& operator=(const Generator&) = delete;

  /// Starts a sequence with `prompt` (1 to context ids in [0, vocab)): GPT::forward() on it, then every layer's
  /// state from its keys and values. Returns the next-token logits (1 x vocab), the forward pass's last row.
  /// Throws std::invalid_argument for a bad prompt, a non-causal attention layer, a state exchange or a polynomial
  /// refit to every call's R (minimax with radius 0); what GPT::forward() throws. On any error the generator holds
  /// no sequence.
  const Matrix<T>& prefill(const std::vector<Index>& prompt);

  /// Appends `token` at position length() and returns its next-token logits (1 x vocab). Throws
  /// std::invalid_argument, changing nothing, without a sequence (no prefill(), or a failed call since), for a
  /// token id outside [0, vocab), a full context or a model whose methods changed since prefill();
  /// std::domain_error when the polynomial of a layer would change (see the file documentation), R exceeds
  /// `radius` under RangePolicy::throw_error, a normaliser is not positive or a result overflows T (the
  /// generator then holds no sequence).
  const Matrix<T>& append(Index token);

  /// prefill(prompt), then `options.max_new_tokens` tokens, each drawn (TokenSampler) from the logits of the
  /// previous step and appended except the last. Returns the new tokens. Throws std::invalid_argument for bad
  /// options, `top_k` above the vocabulary, or when prompt length + max_new_tokens - 1 exceeds the context.
  std::vector<Index> generate(const std::vector<Index>& prompt, const GenerationOptions& options);

  /// Tokens in the state (prompt and appended), 0 without a sequence.
  Index length() const { return length_; }
  /// Next-token logits of the last prefill() or append() (1 x vocab).
  const Matrix<T>& logits() const { return logits_; }
  /// Bytes of the decoding state: \f$2 n d\f$ numbers per exact layer (the cache's used rows), \f$h r (d_v+1)\f$
  /// per polynomial one.
  std::size_t state_bytes() const;
  /// Makes room in every KV cache of the current sequence for `tokens` positions (at most the context), so that
  /// appending up to there never reallocates (a later prefill() keeps the room); without it a cache grows by
  /// doubling.
  void reserve(Index tokens);

 private:
  // The decoding state of one attention layer.
  struct LayerState {
    AttentionMethod method = AttentionMethod::exact_blocked;
    bool recurrent = false;
    Index heads = 1, head_dim = 1;
    double scale = 1;
    // Exact: the cache (rows [0, length) used).
    Matrix<T> keys, values;
    // Polynomial: the options, polynomial and map in use, the score radius of the sequence so far, the per-head
    // largest query and key norms, and Z per head (r x heads (d_v+1)).
    PolynomialAttentionOptions options;
    Polynomial poly;
    std::unique_ptr<FeatureMap<T>> map;
    double radius = 0;
    std::vector<double> max_query_norm, max_key_norm;
    Matrix<T> states;
  };

  static bool is_polynomial(AttentionMethod method) {
    return method == AttentionMethod::paper || method == AttentionMethod::adjoint;
  }

  void require_serial(const char* where) const {
    detail::require(model_.state_exchange() == nullptr, where,
                    "the model has a state exchange: generation is serial (call set_state_exchange(nullptr))");
  }

  // Sets up layer `l`'s state from the model's last forward pass (its keys, values and queries, `n` rows).
  void start_layer(const char* where, Index l, Index n);
  // Attention of the rows queries_, keys_, values_ at position length_ against layer `l`'s state (appending to it)
  // into heads_.
  void attend(const char* where, Index l);
  // Appends the row to an exact layer's cache; every head's softmax over the cache.
  void attend_exact(const char* where, LayerState& state);
  // Every head of a polynomial layer: Z += diag(omega) m(sqrt(c) k) [v, 1], then [N, D] = m(sqrt(c) q) Z.
  void attend_polynomial(const char* where, LayerState& state);
  // Updates the score radius of the sequence with the new row; throws where the options would choose another
  // polynomial for it (or the forward pass would throw).
  void follow_radius(const char* where, Index l, LayerState& state);
  // Makes every KV cache at least `tokens` rows long, keeping its rows.
  void grow_caches(Index tokens);

  GPT<T>& model_;
  std::vector<LayerState> layers_;
  Index length_ = 0;
  // One-row workspaces: residual stream, normalised row, projections, attention heads, branch output, logits;
  // polynomial: the key and query of every head as rows (one expansion for all), their scaled rows and monomials,
  // [v, 1] and [N, D].
  Matrix<T> stream_, normed_, queries_, keys_, values_, heads_, branch_, logits_;
  Matrix<T> head_rows_, scaled_, monomials_, value_row_, products_;
  Matrix<T> block_scaled_, block_monomials_, block_values_;  // prefill: blocks of prompt rows
  Matrix<T> scores_;                                        // exact: the weights of every cached key, per head
  std::vector<Index> token_ = std::vector<Index>(1);
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
Generator<T>::Generator(GPT<T>& model) : model_(model) {
  detail::static_check_scalar<T>();
  require_serial("polyattn::Generator");
}

template <class T>
void Generator<T>::grow_caches(Index tokens) {
  for (LayerState& state : layers_)
    if (!state.recurrent && state.keys.rows() < tokens) {
      state.keys.conservativeResize(tokens, Eigen::NoChange);
      state.values.conservativeResize(tokens, Eigen::NoChange);
    }
}

template <class T>
void Generator<T>::reserve(Index tokens) {
  detail::require(tokens >= 0 && tokens <= model_.config().context, "polyattn::Generator::reserve",
                  "argument 'tokens' must be in [0, 'context' = ", model_.config().context, "], got ", tokens);
  grow_caches(tokens);
}

template <class T>
std::size_t Generator<T>::state_bytes() const {
  std::size_t numbers = 0;
  for (const LayerState& state : layers_)
    numbers += state.recurrent ? static_cast<std::size_t>(state.states.size())
                               : static_cast<std::size_t>(2 * length_ * state.keys.cols());
  return numbers * sizeof(T);
}

template <class T>
const Matrix<T>& Generator<T>::prefill(const std::vector<Index>& prompt) {
  constexpr const char* where = "polyattn::Generator::prefill";
  length_ = 0;
  require_serial(where);
  const GPTConfig& config = model_.config();
  detail::require(!prompt.empty() && static_cast<Index>(prompt.size()) <= config.context, where,
                  "argument 'prompt' must have 1 to 'context' = ", config.context, " tokens, got ", prompt.size());
  const Index n = static_cast<Index>(prompt.size());
  layers_.resize(static_cast<std::size_t>(config.layers));
  for (Index l = 0; l < config.layers; ++l) {
    const SelfAttentionOptions& options = model_.attention(l).options();
    detail::require(options.causal, where, "block ", l, " has non-causal attention: generation needs causal layers");
    const PolynomialAttentionOptions polynomial = options.backend_options();
    detail::require(!is_polynomial(model_.attention(l).method()) || polynomial.kind == PolynomialKind::taylor ||
                        polynomial.radius > 0,
                    where, "block ", l, " uses a minimax polynomial with 'radius' = 0, refit to every call's score "
                    "radius: a recurrent state needs one polynomial (set 'attention.radius' > 0 or use taylor)");
    // A window would need the last w keys in a cache beside a state that lags them; not implemented.
    detail::require(!is_polynomial(model_.attention(l).method()) || polynomial.exact_window == 0, where, "block ", l,
                    " uses an exact window of ", polynomial.exact_window,
                    " tokens, which generation does not support yet (the recurrent state holds every key's features)");
  }
  logits_ = model_.forward(prompt).bottomRows(1);
  for (Index l = 0; l < config.layers; ++l) start_layer(where, l, n);
  length_ = n;
  return logits_;
}

template <class T>
void Generator<T>::start_layer(const char* where, Index l, Index n) {
  SelfAttention<T>& attention = model_.attention(l);
  LayerState& state = layers_[static_cast<std::size_t>(l)];
  state.method = attention.method();
  state.recurrent = is_polynomial(state.method);
  state.options = attention.options().backend_options();
  state.heads = attention.heads();
  state.head_dim = attention.d_model() / state.heads;
  state.scale = state.options.attention.resolved_scale(state.head_dim);
  const Matrix<T>& K = attention.keys();
  const Matrix<T>& V = attention.values();
  if (!state.recurrent) {
    // A cache of the same width keeps its capacity from an earlier sequence.
    if (state.keys.rows() < n || state.keys.cols() != K.cols()) {
      state.keys.resize(n, K.cols());
      state.values.resize(n, V.cols());
    }
    state.keys.topRows(n) = K;
    state.values.topRows(n) = V;
    state.map.reset();
    state.states.resize(0, 0);
    return;
  }
  state.keys.resize(0, 0);
  state.values.resize(0, 0);
  const Index dk = state.head_dim, dv = state.head_dim;
  // The radius and polynomial of the forward pass just run (PolynomialAttention measures R the same way).
  const Matrix<T>& Q = attention.queries();
  state.max_query_norm.assign(static_cast<std::size_t>(state.heads), 0);
  state.max_key_norm.assign(static_cast<std::size_t>(state.heads), 0);
  state.radius = 0;
  for (Index h = 0; h < state.heads; ++h) {
    state.max_query_norm[static_cast<std::size_t>(h)] = detail::max_row_norm(Q.middleCols(h * dk, dk));
    state.max_key_norm[static_cast<std::size_t>(h)] = detail::max_row_norm(K.middleCols(h * dk, dk));
  }
  for (Index h = 0; h < state.heads; ++h)
    state.radius = std::max(state.radius, state.scale * state.max_query_norm[static_cast<std::size_t>(h)] *
                                              state.max_key_norm[static_cast<std::size_t>(h)]);
  // prefill() refused an exact window, so every pair is far.
  state.poly = detail::choose_polynomial(where, state.options, state.radius, state.radius).poly;
  state.map = detail::make_feature_map<T>(where, state.options, dk, state.poly, state.scale);
  const Index r = state.map->width();
  // Z = diag(omega) M_K^T [V, 1] per head, over blocks of prompt rows (n x r monomials never exist at once).
  constexpr Index block_rows = 256;
  state.states.setZero(r, state.heads * (dv + 1));
  for (Index h = 0; h < state.heads; ++h) {
    auto Z = state.states.middleCols(h * (dv + 1), dv + 1);
    for (Index i0 = 0; i0 < n; i0 += block_rows) {
      const Index rows = std::min(block_rows, n - i0);
      detail::ensure_shape(block_scaled_, rows, dk);
      detail::ensure_shape(block_monomials_, rows, r);
      detail::ensure_shape(block_values_, rows, dv + 1);
      state.map->monomials(K.block(i0, h * dk, rows, dk), block_scaled_, block_monomials_);
      block_values_.leftCols(dv) = V.block(i0, h * dv, rows, dv);
      block_values_.col(dv).setOnes();
      Z.noalias() += block_monomials_.transpose() * block_values_;
    }
    Z = state.map->weights().asDiagonal() * Z;
  }
}

template <class T>
const Matrix<T>& Generator<T>::append(Index token) {
  constexpr const char* where = "polyattn::Generator::append";
  const GPTConfig& config = model_.config();
  detail::require(length_ > 0, where, "holds no sequence: call prefill() first (a failed call discards the sequence)");
  require_serial(where);
  detail::require(token >= 0 && token < config.vocab_size, where, "argument 'token' must be in [0, ",
                  config.vocab_size, "), got ", token);
  detail::require(length_ < config.context, where, "the context is full: ", length_, " of 'context' = ",
                  config.context, " positions hold tokens");
  for (Index l = 0; l < config.layers; ++l)
    detail::require(model_.attention(l).method() == layers_[static_cast<std::size_t>(l)].method, where, "block ", l,
                    " switched its attention method since prefill(): prefill() again");
  bool cache_full = false;
  for (const LayerState& state : layers_) cache_full = cache_full || (!state.recurrent && state.keys.rows() <= length_);
  if (cache_full) grow_caches(std::min(config.context, 2 * length_));  // amortised O(1) per token
  model_.discard_activations();
  const Index d = config.d_model;
  try {
    stream_.resize(1, d);
    normed_.resize(1, d);
    queries_.resize(1, d);
    keys_.resize(1, d);
    values_.resize(1, d);
    heads_.resize(1, d);
    branch_.resize(1, d);
    logits_.resize(1, config.vocab_size);
    token_[0] = token;
    model_.embedding().forward(token_, stream_, length_);
    for (Index l = 0; l < config.layers; ++l) {
      SelfAttention<T>& attention = model_.attention(l);
      model_.ln1(l).forward(stream_, normed_);
      attention.query.forward(normed_, queries_);
      attention.key.forward(normed_, keys_);
      attention.value.forward(normed_, values_);
      attend(where, l);
      attention.output.forward(heads_, branch_);
      stream_ += branch_;
      model_.ln2(l).forward(stream_, normed_);
      model_.mlp(l).forward(normed_, branch_);
      stream_ += branch_;
    }
    model_.ln_f().forward(stream_, normed_);
    model_.lm_head().forward(normed_, logits_);
    detail::require_finite_result(where, "the logits", logits_, [] {
      return std::string("an activation overflowed (or a weight changed to a non-finite value since prefill())");
    });
  } catch (...) {
    length_ = 0;
    throw;
  }
  ++length_;
  return logits_;
}

template <class T>
void Generator<T>::attend(const char* where, Index l) {
  LayerState& state = layers_[static_cast<std::size_t>(l)];
  if (!state.recurrent) {
    attend_exact(where, state);
    return;
  }
  follow_radius(where, l, state);
  attend_polynomial(where, state);
  detail::require_finite_result(where, "the attention output", heads_, [&] {
    return detail::polynomial_overflow_cause<T>(values_, state.poly.degree(), state.radius);
  });
}

template <class T>
void Generator<T>::attend_exact(const char* where, LayerState& state) {
  const Index n = length_ + 1, dk = state.head_dim, dv = state.head_dim;
  state.keys.row(length_) = keys_;
  state.values.row(length_) = values_;
  detail::ensure_shape(scores_, state.keys.rows(), state.heads);
  const T c = static_cast<T>(state.scale);
  // Heads in parallel once they are worth a thread each (parallel_for's threshold), each writing its own columns.
  detail::parallel_for(state.heads, [&](Index h, int) {
    auto scores = scores_.col(h).head(n);
    scores.noalias() = state.keys.block(0, h * dk, n, dk) * (c * queries_.middleCols(h * dk, dk)).transpose();
    const T largest = scores.maxCoeff();
    scores = (scores.array() - largest).exp();
    const T total = scores.sum();
    heads_.middleCols(h * dv, dv).noalias() = scores.transpose() * state.values.block(0, h * dv, n, dv);
    heads_.middleCols(h * dv, dv) /= total;
  }, static_cast<double>(state.heads * n * (dk + dv)));
  detail::require_finite_result(where, "the attention output", heads_, [&] {
    const detail::HeadShape shape{1, n, dk, dv, state.heads};
    return detail::exact_overflow_cause<T>(queries_, state.keys.topRows(n), state.values.topRows(n), shape,
                                           state.scale);
  });
}

template <class T>
void Generator<T>::follow_radius(const char* where, Index l, LayerState& state) {
  const Index dk = state.head_dim;
  // The norm of a head's part of the row, summed in double in column order as detail::max_row_norm() does.
  const auto norm = [dk](const Matrix<T>& row, Index h) {
    double squares = 0;
    for (Index j = h * dk; j < (h + 1) * dk; ++j) {
      const double x = static_cast<double>(row(0, j));
      squares += x * x;
    }
    return std::sqrt(squares);
  };
  double radius = 0;
  for (Index h = 0; h < state.heads; ++h) {
    const auto u = static_cast<std::size_t>(h);
    state.max_query_norm[u] = std::max(state.max_query_norm[u], norm(queries_, h));
    state.max_key_norm[u] = std::max(state.max_key_norm[u], norm(keys_, h));
    radius = std::max(radius, state.scale * state.max_query_norm[u] * state.max_key_norm[u]);
  }
  if (radius <= state.radius) return;
  // The options make the polynomial depend on R only beyond a configured 'radius' > 0 (minimax with radius 0 was
  // refused by prefill()); a non-finite R throws there as in the forward pass. choose_polynomial() certifies the
  // polynomial (about 10^4 evaluations), so it runs only then.
  const bool policy_applies = !std::isfinite(radius) || (state.options.radius > 0 && radius > state.options.radius);
  state.radius = radius;
  if (!policy_applies) return;
  const detail::PolynomialChoice choice = detail::choose_polynomial(where, state.options, radius, radius);
  if (choice.poly.coeffs != state.poly.coeffs)
    throw std::domain_error(detail::concat(
        where, ": block ", l, ": the score radius of the sequence grew to R = ", radius, ", beyond 'radius' = ",
        state.options.radius, ", where the range policy replaces the degree-", state.poly.degree(),
        " polynomial by a degree-", choice.poly.degree(), " one; the recurrent state holds sums of the old "
        "polynomial's features: prefill() the sequence again, or pin the polynomial (RangePolicy::mark_invalid)"));
}

template <class T>
void Generator<T>::attend_polynomial(const char* where, LayerState& state) {
  const Index heads = state.heads, dk = state.head_dim, dv = state.head_dim, r = state.map->width();
  detail::ensure_shape(head_rows_, 2 * heads, dk);
  detail::ensure_shape(scaled_, 2 * heads, dk);
  detail::ensure_shape(monomials_, 2 * heads, r);
  detail::ensure_shape(value_row_, 1, dv + 1);
  detail::ensure_shape(products_, 1, dv + 1);
  for (Index h = 0; h < heads; ++h) {
    head_rows_.row(2 * h) = keys_.middleCols(h * dk, dk);
    head_rows_.row(2 * h + 1) = queries_.middleCols(h * dk, dk);
  }
  state.map->monomials(head_rows_, scaled_, monomials_);
  for (Index h = 0; h < heads; ++h) {
    auto Z = state.states.middleCols(h * (dv + 1), dv + 1);
    // The new key first: query i attends to keys j <= i.
    auto key_features = monomials_.row(2 * h);
    key_features.array() *= state.map->weights().transpose().array();
    value_row_.leftCols(dv) = values_.middleCols(h * dv, dv);
    value_row_(0, dv) = T(1);
    Z.noalias() += key_features.transpose() * value_row_;
    products_.noalias() = monomials_.row(2 * h + 1) * Z;
    const T normaliser = products_(0, dv);
    if (!(normaliser > 0) || !std::isfinite(static_cast<double>(normaliser)))
      throw std::domain_error(detail::bad_normaliser_message(where, length_, static_cast<double>(normaliser),
                                                             state.poly.degree(), state.radius,
                                                             sizeof(T) == sizeof(float) ? "float" : "double"));
    heads_.middleCols(h * dv, dv) = products_.leftCols(dv) / normaliser;
  }
}

template <class T>
std::vector<Index> Generator<T>::generate(const std::vector<Index>& prompt, const GenerationOptions& options) {
  constexpr const char* where = "polyattn::Generator::generate";
  TokenSampler sampler(options);
  const GPTConfig& config = model_.config();
  detail::require(options.top_k <= config.vocab_size, where, "'top_k' must be at most the vocabulary size ",
                  config.vocab_size, ", got ", options.top_k);
  const Index positions = static_cast<Index>(prompt.size()) + options.max_new_tokens - 1;
  detail::require(positions <= config.context, where, "the prompt (", prompt.size(), " tokens) and 'max_new_tokens' = ",
                  options.max_new_tokens, " need ", positions, " positions (every new token but the last is fed back), "
                  "more than 'context' = ", config.context);
  prefill(prompt);
  reserve(positions);
  std::vector<Index> tokens;
  tokens.reserve(static_cast<std::size_t>(options.max_new_tokens));
  for (Index t = 0; t < options.max_new_tokens; ++t) {
    tokens.push_back(sampler.next(logits_.row(0)));
    if (t + 1 < options.max_new_tokens) append(tokens.back());
  }
  return tokens;
}

}  // namespace polyattn
