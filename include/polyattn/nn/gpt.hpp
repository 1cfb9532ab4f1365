/// \file nn/gpt.hpp
/// A GPT-style language model built as one Composition (composition.hpp) of the paper's general form
/// \f[ F = g_m \circ \mathrm{Attn}_m \circ g_{m-1} \circ \dots \circ g_1 \circ \mathrm{Attn}_1 \circ g_0 \f]
/// (Liang et al. 2024, Def. 1.3).
///
///
/// **The GPT block** is the composition
/// \f[ Z = X + \mathrm{Attn}(\mathrm{LN}_1(X)),\qquad Y = Z + \mathrm{MLP}(\mathrm{LN}_2(Z)), \f]
/// i.e. Residual(LN → attention) followed by Residual(LN → MLP). In the paper's form, \f$g_0\f$ is the token and
/// positional embedding, \f$\mathrm{Attn}_i\f$ the attention of block \f$i\f$ with its residual branch (Def. J.1),
/// \f$g_i\f$ the MLP half of block \f$i\f$ and the next block's LayerNorm, and \f$g_m\f$ also holds the final
/// LayerNorm, the language-model head and the loss. Every \f$g_i\f$ costs \f$O(n)\f$ in the sequence length, so
/// the cost of a training step is that of the attention method chosen per layer (Theorem 4.2: almost linear
/// with the paper's or the adjoint method).
///
/// **Loss.** Mean softmax cross-entropy of next-token prediction over the positions whose target is not
/// `ignore_target` (so a task can score only its answer positions); backward() differentiates that mean.
///
/// **Sequence parallel.** After GPT::set_state_exchange() every rank (process) of the exchange holds a contiguous
/// shard of one sequence, in rank order: rank \f$p\f$ passes tokens \f$[s_p, s_{p+1})\f$ and their targets
/// (uneven shards are fine; an empty one is refused, see below). The per-token layers (embedding, LayerNorm,
/// MLP, head, loss) run on the shard, the embedding at the global positions \f$s_p + i\f$ with
/// \f$s_p = \sum_{q<p} n_q\f$ (StateExchange::exclusive_prefix_sum() of the shard lengths), and every attention
/// layer combines with the other ranks (make_distributed_backend(), parallel/distributed_backend.hpp: states for the
/// polynomial methods, all keys and values for the exact ones). The loss is the mean over the scored positions of the whole sequence,
/// \f[ L = \frac{\sum_p \sum_{i \in S_p} \ell_i}{\sum_p |S_p|}, \f]
/// from one all-reduce of each rank's (sum, count, correct); backward() differentiates it with the global count
/// and sums the parameter gradients over the ranks in one all-reduce (all trainable gradients concatenated in
/// double), so that every rank holds \f$\partial L/\partial\theta\f$ of the whole sequence and the same optimizer
/// step keeps the parameters identical. Results equal the serial pass on the whole sequence up to the rounding of
/// the different summation order (tests/mpi/test_distributed_gpt.cpp).
///
/// No rank waits for one that failed: forward() first agrees on the configuration and validates every shard
/// (StateExchange::agree()), every attention layer checks before its collectives that no rank failed since the
/// last check (SelfAttention), and forward() and backward() end with such a check before the loss and gradient
/// reductions; an error on one rank thus makes every rank throw. Every rank must make the same calls.
///
/// \code
///   // every rank: the same config and seed, its own shard of tokens and targets (parallel/distributed.hpp)
///   config.method = polyattn::AttentionMethod::adjoint;
///   polyattn::GPT<float> model(config);
///   model.set_state_exchange(std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD));
///   polyattn::AdamW<float> adam(model.parameters(), {3e-3});
///   adam.zero_grad();
///   const double loss = model.forward(shard_tokens, shard_targets);   // the loss of the whole sequence
///   model.backward();                                                 // the gradient of the whole sequence
///   adam.step();                                                      // the same step on every rank
/// \endcode
///
/// \code
///   polyattn::GPTConfig config;
///   config.vocab_size = 256;
///   config.context = 1024;
///   config.d_model = 64;
///   config.heads = 4;
///   config.layers = 2;
///   config.method = polyattn::AttentionMethod::adjoint;
///   polyattn::GPT<float> model(config);
///   polyattn::AdamW<float> adam(model.parameters(), {3e-3});
///   adam.zero_grad();
///   const double loss = model.forward(tokens, targets);   // tokens, targets: std::vector<polyattn::Index>
///   model.backward();
///   adam.step();
/// \endcode
#pragma once

#include "composition.hpp"
#include "cross_entropy.hpp"
#include "embedding.hpp"
#include "layer_norm.hpp"
#include "linear.hpp"
#include "mlp.hpp"
#include "self_attention.hpp"
#include "serialization.hpp"
#include "../parallel/state_exchange.hpp"

#include <cstdint>
#include <cstdio>
#include <exception>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace polyattn {
/// Which Linear layers of a GPT get a LoRA adapter in GPT::add_lora(). The default adapts the query and value
/// projections of every block, the setting of the main experiments of Hu et al. (2021; their Sec. 7.1 compares
/// it with other choices at a fixed budget of trainable parameters); attention() adapts all four attention
/// projections, all() every Linear of the model.
struct LoRATargets {
  /// \f$W_Q\f$ of every block, "block<i>.attn.wq" (default true).
  bool wq = true;
  /// \f$W_K\f$ of every block, "block<i>.attn.wk" (default false).
  bool wk = false;
  /// \f$W_V\f$ of every block, "block<i>.attn.wv" (default true).
  bool wv = true;
  /// \f$W_O\f$ of every block, "block<i>.attn.wo" (default false).
  bool wo = false;
  /// The MLP's first layer of every block, "block<i>.mlp.fc" (default false).
  bool fc = false;
  /// The MLP's second layer of every block, "block<i>.mlp.proj" (default false).
  bool proj = false;
  /// The language-model head, "lm_head" (default false).
  bool lm_head = false;

  /// \f$W_Q, W_K, W_V, W_O\f$ of every block.
  static LoRATargets attention() {
    LoRATargets targets;
    targets.wk = targets.wo = true;
    return targets;
  }
  /// Every Linear: the four attention projections and the MLP of every block, and the head.
  static LoRATargets all() {
    LoRATargets targets = attention();
    targets.fc = targets.proj = targets.lm_head = true;
    return targets;
  }

  /// Throws std::invalid_argument unless at least one target is chosen.
  void check() const {
    detail::require(wq || wk || wv || wo || fc || proj || lm_head, "polyattn::LoRATargets",
                    "chooses no layer: set at least one of wq, wk, wv, wo, fc, proj, lm_head");
  }
};

/// Configuration of GPT.
struct GPTConfig {
  /// Number of token ids (256 for bytes). Required, >= 1.
  Index vocab_size = 256;
  /// Largest sequence length (rows of the positional embedding). Default 1024.
  Index context = 1024;
  /// Width \f$d\f$ of the residual stream. Default 64.
  Index d_model = 64;
  /// Attention heads per layer; must divide `d_model`. Default 4 (\f$d_h = 16\f$).
  Index heads = 4;
  /// Number of transformer blocks \f$m\f$. Default 2.
  Index layers = 2;
  /// Hidden width of the MLP; 0 (default) means \f$4d\f$.
  Index mlp_hidden = 0;
  /// Activation of the MLP (default GELU, tanh form).
  ActivationKind activation = ActivationKind::gelu;
  /// Attention method of every layer unless `layer_methods` is given. Default exact_blocked.
  AttentionMethod method = AttentionMethod::exact_blocked;
  /// Per-layer methods (size `layers`), overriding `method`; empty (default) uses `method` everywhere.
  std::vector<AttentionMethod> layer_methods;
  /// Score scale \f$c\f$ of every attention layer; empty (default) means \f$1/\sqrt{d_h}\f$.
  std::optional<double> attention_scale;
  /// Degree, polynomial, feature map, chunking and exact window of the layers using a polynomial method.
  ApproximationOptions approximation;
  /// Targets equal to this are not scored by the loss. Default -1.
  Index ignore_target = -1;
  /// Seed of the whole initialisation; every parameter draws from its own derived stream.
  std::uint64_t seed = 0;

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    constexpr const char* where = "polyattn::GPTConfig";
    detail::require(vocab_size >= 1, where, "'vocab_size' must be >= 1, got ", vocab_size);
    detail::require(context >= 1, where, "'context' must be >= 1, got ", context);
    detail::require(d_model >= 1, where, "'d_model' must be >= 1, got ", d_model);
    detail::require(heads >= 1 && d_model % heads == 0, where, "'heads' must be >= 1 and divide 'd_model' = ",
                    d_model, ", got ", heads);
    detail::require(layers >= 1, where, "'layers' must be >= 1, got ", layers);
    detail::require(mlp_hidden >= 0, where, "'mlp_hidden' must be >= 0 (0 = 4 d_model), got ", mlp_hidden);
    detail::require(layer_methods.empty() || static_cast<Index>(layer_methods.size()) == layers, where,
                    "'layer_methods' must be empty or have 'layers' = ", layers, " entries, got ",
                    layer_methods.size());
    detail::require(ignore_target < 0 || ignore_target >= vocab_size, where,
                    "'ignore_target' must not be a valid token id, got ", ignore_target);
    if (attention_scale) detail::require_positive(where, "attention_scale", *attention_scale);
    approximation.check(where);
  }

  /// The attention method of block `layer`.
  AttentionMethod method_of(Index layer) const {
    return layer_methods.empty() ? method : layer_methods.at(static_cast<std::size_t>(layer));
  }
};

/// A GPT-style decoder: embedding, `layers` pre-LN blocks (see the file documentation), final LayerNorm,
/// language-model head (no bias) and mean next-token cross-entropy.
///
/// Parameters (in parameters() order): `wte`, `wpe`, then per block `block<i>.ln1.{gain,bias}`,
/// `block<i>.attn.{wq,wk,wv,wo}.weight`, `block<i>.ln2.{gain,bias}`, `block<i>.mlp.{fc,proj}.{weight,bias}`,
/// then `ln_f.{gain,bias}` and `lm_head.weight`. Initialisation is deterministic in `config.seed`: the same
/// seed gives the same model in float and double (the float weights are the rounded double weights) whatever
/// the attention method, so runs that differ only in the method start from the same point. Projections into
/// the residual stream (W_O, the MLP's output) are scaled by \f$1/\sqrt{2m}\f$ as in GPT-2.
///
/// **Checkpoints.** save_parameters(path, model) and load_parameters(path, model) (below; format in
/// serialization.hpp) store and check the parameters together with checkpoint_fields(), so a checkpoint never
/// loads into a model that would compute something else (other heads, methods, ...). To evaluate a checkpoint
/// with another attention method, construct the model as saved, load, then call set_attention_method(). A
/// non-finite weight (a diverged run) makes forward() throw std::invalid_argument naming the parameter.
///
/// forward() keeps every activation backward() needs; backward() accumulates into the gradients (call the
/// optimizer's zero_grad() first). See the file documentation for a training loop.
///
/// **LoRA fine-tuning.** add_lora() gives the chosen Linears (LoRATargets; by default \f$W_Q\f$ and \f$W_V\f$
/// of every block) a low-rank adapter \f$W + s\,AB\f$ (see Linear) and freezes every other parameter, so that
/// only the adapters train. It changes parameters(): each adapted Linear's `<name>.weight.lora_A` and
/// `<name>.weight.lora_B` follow its weight (and bias), so build the optimizer, and save or load checkpoints,
/// after it. merge_lora() folds every adapter into its weight for deployment.
///
/// \code
///   polyattn::GPT<float> model(config);
///   polyattn::load_parameters("pretrained.bin", model);   // before the adapters: plain names, same config
///   model.add_lora({/*rank=*/4, /*alpha=*/8}, polyattn::LoRATargets::attention());
///   polyattn::AdamW<float> adam(model.parameters(), {1e-3});       // steps only the adapters
///   // ... train as above ...
///   polyattn::save_parameters("finetuned.bin", model);  // with the adapters and their scales
///   model.merge_lora();                                              // W += s A B, B = 0: same logits
/// \endcode
template <class T>
class GPT {
 public:
  explicit GPT(const GPTConfig& config);

  GPT(const GPT&) = delete;             // attention_layers_, mlp_layers_ and lm_head_ point into body_
  GPT& operator=(const GPT&) = delete;

  const GPTConfig& config() const { return config_; }

  /// Every parameter with its gradient, in a fixed order (see the class documentation).
  std::vector<Parameter<T>*> parameters() {
    std::vector<Parameter<T>*> out;
    embedding_.collect_parameters(out);
    body_.collect_parameters(out);
    return out;
  }

  /// The composition after the embedding (blocks, final LayerNorm, head): the driver.
  Composition<T>& body() { return body_; }
  /// The attention layer of block `layer`.
  SelfAttention<T>& attention(Index layer) {
    detail::require(layer >= 0 && layer < config_.layers, "polyattn::GPT::attention", "argument 'layer' must be in [0, ",
                    config_.layers, "), got ", layer);
    return *attention_layers_[static_cast<std::size_t>(layer)];
  }
  /// The MLP of block `layer`.
  MLP<T>& mlp(Index layer) {
    detail::require(layer >= 0 && layer < config_.layers, "polyattn::GPT::mlp", "argument 'layer' must be in [0, ",
                    config_.layers, "), got ", layer);
    return *mlp_layers_[static_cast<std::size_t>(layer)];
  }
  /// The language-model head (d x vocab, no bias).
  Linear<T>& lm_head() { return *lm_head_; }
  /// The token and position embedding (\f$g_0\f$).
  Embedding<T>& embedding() { return embedding_; }
  /// The LayerNorm before the attention of block `layer` ("block<i>.ln1").
  LayerNorm<T>& ln1(Index layer) {
    detail::require(layer >= 0 && layer < config_.layers, "polyattn::GPT::ln1", "argument 'layer' must be in [0, ",
                    config_.layers, "), got ", layer);
    return *ln1_layers_[static_cast<std::size_t>(layer)];
  }
  /// The LayerNorm before the MLP of block `layer` ("block<i>.ln2").
  LayerNorm<T>& ln2(Index layer) {
    detail::require(layer >= 0 && layer < config_.layers, "polyattn::GPT::ln2", "argument 'layer' must be in [0, ",
                    config_.layers, "), got ", layer);
    return *ln2_layers_[static_cast<std::size_t>(layer)];
  }
  /// The final LayerNorm, before the head ("ln_f").
  LayerNorm<T>& ln_f() { return *ln_f_; }

  /// Forgets what the last forward pass kept for backward(), which then throws until the next
  /// forward(tokens, targets). For code that runs the model's layers itself (Generator runs them on single rows,
  /// which overwrites what they kept).
  void discard_activations() { targets_.clear(); }

  /// Adds a LoRA adapter to every Linear chosen by `targets` and freezes every other parameter (embeddings,
  /// LayerNorms, the remaining Linears, the adapted weights and any adapter added before), so that exactly the
  /// new \f$A\f$, \f$B\f$ are trainable and the model's output is unchanged (\f$B = 0\f$). Every adapter
  /// uses `options` except its seed: the adapter of block \f$i\f$'s wq, wk, wv, wo, mlp.fc, mlp.proj draws
  /// \f$A\f$ from derive_seed(options.seed, 6i + 0..5), that of the head from derive_seed(options.seed, 6m),
  /// whatever the other targets. parameters() then lists the adapters (see the class documentation): construct
  /// the optimizer after this call.
  ///
  /// Throws std::invalid_argument, changing nothing, on bad options, no target, a rank above
  /// \f$\min(\text{in}, \text{out})\f$ of a chosen Linear, or a chosen Linear that already has an adapter.
  void add_lora(const LoRAOptions& options, const LoRATargets& targets = LoRATargets{});

  /// Folds every adapter into its weight (Linear::merge_lora(): \f$W \leftarrow W + sAB\f$, \f$B = 0\f$); the
  /// logits are unchanged and parameters() keeps its list. Does nothing without adapters.
  void merge_lora() {
    for (const auto& [linear, slot] : linears(LoRATargets::all()))
      if (linear->has_lora()) linear->merge_lora();
  }

  /// Switches every layer to `method` (weights unchanged). With a state exchange only `adjoint` is accepted
  /// (std::invalid_argument otherwise, changing nothing).
  void set_attention_method(AttentionMethod method) {
    for (SelfAttention<T>* layer : attention_layers_) layer->set_method(method);
  }

  /// Makes forward() and backward() sequence parallel over the ranks of `exchange` (see the file documentation):
  /// every attention layer exchanges its states through it, positions are global, and the loss, accuracy and
  /// parameter gradients are those of the whole sequence. Collective: every rank calls it with the same model.
  /// Throws std::invalid_argument on every rank, changing nothing, when the configuration, a block's attention
  /// method or the parameters (a checksum of their values) differ between ranks. Null restores the serial passes (not collective). Either way a backward()
  /// needs a forward() after this call.
  void set_state_exchange(std::shared_ptr<StateExchange> exchange);
  /// The exchange set by set_state_exchange() (null: serial).
  StateExchange* state_exchange() const { return exchange_.get(); }

  /// Computes the logits (n x vocab) of `tokens` (1 <= n <= context ids in [0, vocab)) without a loss. With a
  /// state exchange, `tokens` is this rank's shard (1 <= n, and the whole sequence at most `context` long) and
  /// the logits are its rows.
  const Matrix<T>& forward(const std::vector<Index>& tokens);

  /// Forward pass and mean cross-entropy of predicting `targets[i]` from `tokens[0..i]`, over the positions
  /// whose target is not `ignore_target` (0 when there are none). `targets` has the length of `tokens`. With a
  /// state exchange both are this rank's shard and the mean is over the whole sequence (the same on every rank).
  double forward(const std::vector<Index>& tokens, const std::vector<Index>& targets);

  /// Accumulates \f$\partial L/\partial\theta\f$ of the loss of the last forward(tokens, targets) into every
  /// parameter's gradient; with a state exchange the gradient of the whole sequence's loss, the same on every
  /// rank (the gradients accumulated before are kept, not summed over the ranks again).
  void backward();

  /// The configuration fields a checkpoint of this model stores and checks on load (serialization.hpp): every
  /// setting that changes the function the model computes: "model" (GPT), "vocab_size", "context", "d_model",
  /// "heads", "layers", "mlp_hidden" (resolved: 4 d_model for 0), "activation", the current method of every
  /// block ("block<i>.method", as set_attention_method() left it), "attention.scale" (resolved) and, when a
  /// block uses an approximate method, "attention.polynomial", "attention.degree", "attention.radius",
  /// "attention.range_policy", "attention.feature_map" and, when set, "attention.exact_window", and the scale of
  /// every LoRA adapter ("<weight name>.lora_scale"; the rank is in the shapes). Not stored: the seed
  /// (initialisation only), `ignore_target` (the loss, not the logits) and the chunking and error-estimate options
  /// (cost only).
  ModelFields checkpoint_fields();

  /// Logits of the last forward() (n x vocab).
  const Matrix<T>& logits() const { return logits_; }
  /// Loss of the last forward(tokens, targets).
  double loss() const { return loss_; }
  /// Fraction of scored positions of the last forward(tokens, targets) whose target attains the largest logit
  /// (of the whole sequence with a state exchange).
  double accuracy() const { return accuracy_; }

 private:
  static LayerNormOptions layer_norm_options(Index width) {
    LayerNormOptions options;
    options.features = width;
    return options;
  }

  // The embedding tables start at the scales the driver was tuned with: unit-variance tokens, small positions.
  static EmbeddingOptions embedding_options(const GPTConfig& config) {
    EmbeddingOptions options;
    options.vocab_size = config.vocab_size;
    options.max_positions = config.context;
    options.d_model = config.d_model;
    options.token_init_std = 1.0;
    options.position_init_std = 0.1;
    options.seed = derive_seed(config.seed, 0);
    return options;
  }

  // The Linears chosen by `targets`, each with its slot: 6i + 0..5 for block i's wq, wk, wv, wo, mlp.fc,
  // mlp.proj, and 6m for the head.
  std::vector<std::pair<Linear<T>*, std::uint64_t>> linears(const LoRATargets& targets) {
    std::vector<std::pair<Linear<T>*, std::uint64_t>> out;
    for (std::size_t layer = 0; layer < attention_layers_.size(); ++layer) {
      SelfAttention<T>& attention = *attention_layers_[layer];
      MLP<T>& mlp = *mlp_layers_[layer];
      const std::pair<Linear<T>*, bool> block[] = {{&attention.query, targets.wq}, {&attention.key, targets.wk},
                                                   {&attention.value, targets.wv}, {&attention.output, targets.wo},
                                                   {&mlp.fc, targets.fc},          {&mlp.proj, targets.proj}};
      for (std::size_t k = 0; k < 6; ++k)
        if (block[k].second) out.emplace_back(block[k].first, 6 * layer + k);
    }
    if (targets.lm_head) out.emplace_back(lm_head_, 6 * attention_layers_.size());
    return out;
  }

  static LoRAOptions adapter_options(const LoRAOptions& options, std::uint64_t slot) {
    LoRAOptions adapter = options;
    adapter.seed = derive_seed(options.seed, slot);
    return adapter;
  }

  // Throws std::invalid_argument naming the first parameter with a non-finite value, if any, and `cause`;
  // returns when every parameter is finite. Runs only after forward() has met a non-finite value.
  void report_non_finite_parameter(const char* where, const std::string& cause) {
    const std::vector<Parameter<T>*> list = parameters();
    if (const Parameter<T>* p = detail::first_non_finite(list))
      detail::require_finite_parameter(where, *p, detail::concat(": the model diverged or was corrupted (", cause, ")"));
  }

  static const GPTConfig& checked(const GPTConfig& config) {
    config.check();
    return config;
  }

  // `first_position` is the global position of ids[0] (non-zero only for a shard, set_state_exchange()).
  void check_ids(const char* where, const char* name, const std::vector<Index>& ids, bool allow_ignore,
                 Index first_position) const {
    const Index n = static_cast<Index>(ids.size());
    if (first_position == 0)
      detail::require(n >= 1 && n <= config_.context, where, "argument '", name, "' must have 1 to 'context' = ",
                      config_.context, " entries, got ", n);
    else
      detail::require(n >= 1 && n <= config_.context - first_position, where, "argument '", name,
                      "' must have 1 to 'context' - (this shard's first position) = ", config_.context, " - ",
                      first_position, " entries, got ", n);
    for (Index i = 0; i < n; ++i) {
      const Index id = ids[static_cast<std::size_t>(i)];
      detail::require((id >= 0 && id < config_.vocab_size) || (allow_ignore && id == config_.ignore_target), where,
                      "argument '", name, "' has id ", id, " at position ", i, ", expected [0, ", config_.vocab_size,
                      ")", allow_ignore ? " or 'ignore_target'" : "");
    }
  }

  // Validates the arguments of a forward pass (`targets` null: logits only) and sets first_position_; with an
  // exchange, after the prefix sum of the shard lengths, collectively (agree()): every rank continues or throws.
  void begin_forward(const char* where, const std::vector<Index>& tokens, const std::vector<Index>* targets);

  // Embedding, body and the finite check of the logits of `tokens` (validated) at first_position_.
  void compute_logits(const char* where, const std::vector<Index>& tokens);

  // The backward pass of this rank's rows, from the loss to the embedding.
  void backward_local();

  // Runs `local_work`; with an exchange, then checks collectively that it succeeded on every rank (succeeded()),
  // unless it threw from a collective check of an attention layer, which every rank threw from at once.
  template <class LocalWork>
  void collectively(const char* where, LocalWork&& local_work);

  // The settings every rank must share (agree()): the configuration fields that shape the per-token layers and
  // the messages (the attention layers agree on their own options), and the size of the gradient message.
  std::vector<StateExchange::Setting> shared_settings();

  std::uint64_t collective_failures() const {
    std::uint64_t count = 0;
    for (const SelfAttention<T>* layer : attention_layers_) count += layer->collective_failures();
    return count;
  }

  std::vector<Parameter<T>*> trainable_parameters() {
    std::vector<Parameter<T>*> trainable;
    for (Parameter<T>* p : parameters())
      if (p->trainable) trainable.push_back(p);
    return trainable;
  }

  static Index total_size(const std::vector<Parameter<T>*>& list) {
    Index size = 0;
    for (const Parameter<T>* p : list) size += p->size();
    return size;
  }

  // The gradients of `list`, concatenated in double (one message for all of them).
  static void pack_gradients(const std::vector<Parameter<T>*>& list, Eigen::MatrixXd& packed) {
    packed.resize(total_size(list), 1);
    Index offset = 0;
    for (const Parameter<T>* p : list) {
      packed.col(0).segment(offset, p->size()) =
          Eigen::Map<const Vector<T>>(p->grad.data(), p->size()).template cast<double>();
      offset += p->size();
    }
  }

  static void unpack_gradients(const Eigen::MatrixXd& packed, const std::vector<Parameter<T>*>& list) {
    Index offset = 0;
    for (Parameter<T>* p : list) {
      Eigen::Map<Vector<T>>(p->grad.data(), p->size()) = packed.col(0).segment(offset, p->size()).template cast<T>();
      offset += p->size();
    }
  }

  GPTConfig config_;
  Embedding<T> embedding_;
  Composition<T> body_;
  std::vector<SelfAttention<T>*> attention_layers_;
  std::vector<MLP<T>*> mlp_layers_;
  std::vector<LayerNorm<T>*> ln1_layers_, ln2_layers_;
  LayerNorm<T>* ln_f_ = nullptr;
  Linear<T>* lm_head_ = nullptr;
  CrossEntropy<T> loss_function_;
  std::vector<Index> tokens_, targets_;
  Matrix<T> embedded_, logits_, embedded_grad_, logits_grad_;
  double loss_ = 0, accuracy_ = 0;
  std::shared_ptr<StateExchange> exchange_;
  // Global position of tokens_[0] and the scored positions of the whole sequence, of the last forward pass.
  Index first_position_ = 0, scored_total_ = 0;
  // backward() with an exchange: the gradients accumulated before it, and the message summing its own.
  Eigen::MatrixXd earlier_gradients_, gradient_message_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the class again.
template <class T>
GPT<T>::GPT(const GPTConfig& config)
    : config_(checked(config)), embedding_(embedding_options(config_), ""),
      loss_function_(CrossEntropyOptions{config_.ignore_target}) {
  const Index d = config_.d_model;
  const double residual_gain = 1.0 / std::sqrt(2.0 * static_cast<double>(config_.layers));
  for (Index layer = 0; layer < config_.layers; ++layer) {
    const std::string name = "block" + std::to_string(layer);
    const std::uint64_t seed = derive_seed(config_.seed, static_cast<std::uint64_t>(1 + layer));
    SelfAttentionOptions attention;
    attention.d_model = d;
    attention.heads = config_.heads;
    attention.causal = true;
    attention.method = config_.method_of(layer);
    attention.scale = config_.attention_scale;
    attention.approximation = config_.approximation;
    attention.output_gain = residual_gain;
    attention.seed = derive_seed(seed, 0);
    auto attention_branch = std::make_unique<Composition<T>>();
    ln1_layers_.push_back(
        &attention_branch->add(make_component<T>(d, d, LayerNorm<T>(layer_norm_options(d), name + ".ln1"))).layer());
    attention_layers_.push_back(
        &attention_branch->add(make_component<T>(d, d, SelfAttention<T>(attention, name + ".attn"))).layer());
    auto mlp_branch = std::make_unique<Composition<T>>();
    ln2_layers_.push_back(
        &mlp_branch->add(make_component<T>(d, d, LayerNorm<T>(layer_norm_options(d), name + ".ln2"))).layer());
    MLPOptions mlp;
    mlp.d_model = d;
    mlp.hidden = config_.mlp_hidden;
    mlp.activation = config_.activation;
    mlp.output_gain = residual_gain;
    mlp.seed = derive_seed(seed, 1);
    mlp_layers_.push_back(&mlp_branch->add(make_component<T>(d, d, MLP<T>(mlp, name + ".mlp"))).layer());
    body_.add(std::make_unique<Residual<T>>(std::move(attention_branch)));
    body_.add(std::make_unique<Residual<T>>(std::move(mlp_branch)));
  }
  ln_f_ = &body_.add(make_component<T>(d, d, LayerNorm<T>(layer_norm_options(d), "ln_f"))).layer();
  const LinearOptions head{d, config_.vocab_size, false, 0, derive_seed(config_.seed, 1000)};
  lm_head_ = &body_.add(make_component<T>(d, config_.vocab_size, Linear<T>(head, "lm_head"))).layer();
}

template <class T>
void GPT<T>::add_lora(const LoRAOptions& options, const LoRATargets& targets) {
  constexpr const char* where = "polyattn::GPT::add_lora";
  targets.check();
  const std::vector<std::pair<Linear<T>*, std::uint64_t>> chosen = linears(targets);
  for (const auto& [linear, slot] : chosen) linear->check_lora_options(where, adapter_options(options, slot));
  for (Parameter<T>* p : parameters()) p->trainable = false;
  for (const auto& [linear, slot] : chosen) linear->add_lora(adapter_options(options, slot));
}

template <class T>
void GPT<T>::set_state_exchange(std::shared_ptr<StateExchange> exchange) {
  constexpr const char* where = "polyattn::GPT::set_state_exchange";
  targets_.clear();  // a backward() pairs with a forward() under the same exchange
  if (!exchange) {
    for (SelfAttention<T>* layer : attention_layers_) layer->set_state_exchange(nullptr);
    exchange_ = nullptr;
    first_position_ = 0;
    return;
  }
  std::exception_ptr failure;  // agree() makes every rank throw it
  double parameter_sum = 0, parameter_square_sum = 0;
  try {
    // Identical parameters are what keeps the ranks' optimizer steps identical; a checksum catches different
    // seeds or checkpoints.
    for (const Parameter<T>* p : parameters()) {
      parameter_sum += p->value.template cast<double>().sum();
      parameter_square_sum += p->value.template cast<double>().squaredNorm();
    }
  } catch (...) {
    failure = std::current_exception();
  }
  std::vector<StateExchange::Setting> settings = shared_settings();
  settings.push_back({"sum of the parameters", parameter_sum});
  settings.push_back({"sum of the squared parameters", parameter_square_sum});
  exchange->agree(where, failure, settings);
  for (SelfAttention<T>* layer : attention_layers_) layer->set_state_exchange(exchange);
  exchange_ = std::move(exchange);
}

template <class T>
std::vector<StateExchange::Setting> GPT<T>::shared_settings() {
  std::vector<StateExchange::Setting> settings{
      {"vocab_size", static_cast<double>(config_.vocab_size)},
      {"context", static_cast<double>(config_.context)},
      {"d_model", static_cast<double>(config_.d_model)},
      {"heads", static_cast<double>(config_.heads)},
      {"layers", static_cast<double>(config_.layers)},
      {"mlp_hidden", static_cast<double>(config_.mlp_hidden)},
      {"activation", static_cast<double>(static_cast<int>(config_.activation))},
      {"ignore_target", static_cast<double>(config_.ignore_target)},
      {"trainable parameter entries", static_cast<double>(total_size(trainable_parameters()))}};
  for (const SelfAttention<T>* layer : attention_layers_)
    settings.push_back({"attention method of a block", static_cast<double>(layer->method())});
  return settings;
}

template <class T>
template <class LocalWork>
void GPT<T>::collectively(const char* where, LocalWork&& local_work) {
  if (!exchange_) {
    local_work();
    return;
  }
  const std::uint64_t collective_failures_before = collective_failures();
  std::exception_ptr failure;
  try {
    local_work();
  } catch (...) {
    failure = std::current_exception();
  }
  // Reporting a failure that every rank already threw from would wait for ranks that are not coming.
  if (failure && collective_failures() != collective_failures_before) std::rethrow_exception(failure);
  // A local failure meets the other ranks here or at the check of their next attention layer.
  exchange_->succeeded(where, failure);
}

template <class T>
void GPT<T>::begin_forward(const char* where, const std::vector<Index>& tokens, const std::vector<Index>* targets) {
  Index first_position = 0;
  if (exchange_) {
    Eigen::MatrixXd tokens_before(1, 1);
    tokens_before(0, 0) = static_cast<double>(tokens.size());
    exchange_->exclusive_prefix_sum(tokens_before, false);
    first_position = static_cast<Index>(tokens_before(0, 0));
  }
  std::exception_ptr failure;  // with an exchange, agree() makes every rank throw it
  try {
    first_position_ = first_position;
    // An empty shard would need every per-token layer to accept zero rows; no use case needs it.
    if (exchange_)
      detail::require(!tokens.empty(), where, "argument 'tokens' is empty on rank ", exchange_->rank(),
                      ": every rank of the state exchange needs at least one token (empty shards are not supported)");
    if (targets) {
      detail::require(targets->size() == tokens.size(), where, "argument 'targets' must have the length of 'tokens' (",
                      tokens.size(), "), got ", targets->size());
      check_ids(where, "targets", *targets, true, first_position);
    }
    check_ids(where, "tokens", tokens, false, first_position);
  } catch (...) {
    if (!exchange_) throw;
    failure = std::current_exception();
  }
  if (!exchange_) return;
  std::vector<StateExchange::Setting> settings = shared_settings();
  settings.push_back({"forward with targets", targets ? 1.0 : 0.0});
  exchange_->agree(where, failure, settings);
}

template <class T>
const Matrix<T>& GPT<T>::forward(const std::vector<Index>& tokens) {
  constexpr const char* where = "polyattn::GPT::forward";
  begin_forward(where, tokens, nullptr);
  collectively(where, [&] { compute_logits(where, tokens); });
  return logits_;
}

template <class T>
void GPT<T>::compute_logits(const char* where, const std::vector<Index>& tokens) {
  const Index n = static_cast<Index>(tokens.size());
  tokens_ = tokens;
  embedded_.resize(n, config_.d_model);
  logits_.resize(n, config_.vocab_size);
  targets_.clear();
  embedding_.forward(tokens_, embedded_, first_position_);
  try {
    body_.forward(embedded_, logits_);
  } catch (const std::invalid_argument& error) {
    report_non_finite_parameter(where, error.what());  // a NaN weight surfaces as a layer's non-finite input
    throw;
  }
  // x * 0 is 0 exactly for finite x: one vectorised pass, a 1/d_model fraction of the head's cost.
  if (!((logits_.array() * T(0)).sum() == T(0))) {
    report_non_finite_parameter(where, "the logits have a non-finite entry");
    throw std::invalid_argument(detail::concat(where, ": the logits have a non-finite entry although every "
                                               "parameter is finite (an activation overflowed)"));
  }
}

template <class T>
double GPT<T>::forward(const std::vector<Index>& tokens, const std::vector<Index>& targets) {
  constexpr const char* where = "polyattn::GPT::forward";
  begin_forward(where, tokens, &targets);
  collectively(where, [&] {
    compute_logits(where, tokens);
    targets_ = targets;
    loss_ = loss_function_.forward(logits_, targets_);
    scored_total_ = loss_function_.scored();
    accuracy_ = loss_function_.accuracy();
  });
  if (!exchange_) return loss_;
  Eigen::MatrixXd totals(3, 1);  // one message: the loss sum, the scored and the correct positions
  totals << loss_function_.loss_sum(), static_cast<double>(loss_function_.scored()),
      static_cast<double>(loss_function_.correct());
  exchange_->all_reduce_sum(totals);
  scored_total_ = static_cast<Index>(totals(1, 0));
  loss_ = scored_total_ > 0 ? totals(0, 0) / totals(1, 0) : 0.0;
  accuracy_ = scored_total_ > 0 ? totals(2, 0) / totals(1, 0) : 0.0;
  return loss_;
}

template <class T>
void GPT<T>::backward_local() {
  const Index n = static_cast<Index>(tokens_.size());
  logits_grad_.setZero(n, config_.vocab_size);
  loss_function_.backward(logits_, targets_, logits_grad_, scored_total_);
  embedded_grad_.setZero(n, config_.d_model);
  body_.backward(embedded_, logits_grad_, embedded_grad_);
  embedding_.backward(tokens_, embedded_grad_, first_position_);
}

template <class T>
void GPT<T>::backward() {
  constexpr const char* where = "polyattn::GPT::backward";
  if (!exchange_) {
    detail::require(!targets_.empty(), where, "needs a preceding forward(tokens, targets)");
    backward_local();
    return;
  }
  // Only this pass's gradients are summed over the ranks: the ones accumulated before are every rank's already
  // and would be counted P times, so they wait aside.
  const std::vector<Parameter<T>*> trainable = trainable_parameters();
  pack_gradients(trainable, earlier_gradients_);
  for (Parameter<T>* p : trainable) p->grad.setZero();
  try {
    collectively(where, [&] {
      detail::require(!targets_.empty(), where, "needs a preceding forward(tokens, targets)");
      backward_local();
    });
  } catch (...) {
    unpack_gradients(earlier_gradients_, trainable);  // a failed pass adds nothing
    throw;
  }
  pack_gradients(trainable, gradient_message_);
  exchange_->all_reduce_sum(gradient_message_);
  gradient_message_ += earlier_gradients_;
  unpack_gradients(gradient_message_, trainable);
}

template <class T>
ModelFields GPT<T>::checkpoint_fields() {
  const auto number = [](double value) {
    char buffer[40];
    std::snprintf(buffer, sizeof(buffer), "%.17g", value);
    return std::string(buffer);
  };
  const auto name = [](auto value, std::initializer_list<std::pair<decltype(value), const char*>> names) {
    for (const auto& [known, text] : names)
      if (known == value) return std::string(text);
    return std::to_string(static_cast<long long>(value));
  };
  const ApproximationOptions& attention = config_.approximation;
  ModelFields fields{{"model", "GPT"},
                     {"vocab_size", std::to_string(config_.vocab_size)},
                     {"context", std::to_string(config_.context)},
                     {"d_model", std::to_string(config_.d_model)},
                     {"heads", std::to_string(config_.heads)},
                     {"layers", std::to_string(config_.layers)},
                     {"mlp_hidden", std::to_string(config_.mlp_hidden > 0 ? config_.mlp_hidden : 4 * config_.d_model)},
                     {"activation", name(config_.activation, {{ActivationKind::gelu, "gelu"},
                                                              {ActivationKind::relu, "relu"}})}};
  bool approximate = false;
  for (std::size_t layer = 0; layer < attention_layers_.size(); ++layer) {
    const AttentionMethod method = attention_layers_[layer]->method();
    approximate = approximate || method == AttentionMethod::paper || method == AttentionMethod::adjoint;
    fields.emplace_back("block" + std::to_string(layer) + ".method", attention_method_name(method));
  }
  AttentionOptions scale;
  scale.scale = config_.attention_scale;
  fields.emplace_back("attention.scale", number(scale.resolved_scale(config_.d_model / config_.heads)));
  if (approximate) {
    fields.emplace_back("attention.polynomial", name(attention.kind, {{PolynomialKind::taylor, "taylor"},
                                                                       {PolynomialKind::minimax, "minimax"}}));
    fields.emplace_back("attention.degree", std::to_string(attention.degree));
    fields.emplace_back("attention.radius", number(attention.radius));
    fields.emplace_back("attention.range_policy",
                        name(attention.range_policy, {{RangePolicy::raise_degree, "raise_degree"},
                                                      {RangePolicy::throw_error, "throw_error"},
                                                      {RangePolicy::mark_invalid, "mark_invalid"}}));
    fields.emplace_back("attention.feature_map", name(attention.feature_map, {{FeatureMapKind::symmetric, "symmetric"},
                                                                             {FeatureMapKind::kronecker, "kronecker"}}));
    if (attention.exact_window > 0)
      fields.emplace_back("attention.exact_window", std::to_string(attention.exact_window));
  }
  for (const auto& [linear, slot] : linears(LoRATargets::all()))
    if (linear->has_lora()) fields.emplace_back(linear->weight.name + ".lora_scale", number(linear->lora_scale()));
  return fields;
}

/// The bytes of a parameter file holding every parameter of `model` and its configuration
/// (GPT::checkpoint_fields()).
template <class T>
std::string serialize_parameters(GPT<T>& model) {
  return serialize_parameters(model.parameters(), model.checkpoint_fields());
}

/// Sets every parameter of `model` from the bytes of a parameter file written for a model of the same
/// configuration (checked field by field); throws std::invalid_argument, changing nothing, on any mismatch.
template <class T>
void deserialize_parameters(const std::string& bytes, GPT<T>& model, const std::string& source = "<memory>") {
  deserialize_parameters(bytes, model.parameters(), source, model.checkpoint_fields());
}

/// Writes every parameter of `model` and its configuration to `path` (atomically; see serialization.hpp).
template <class T>
void save_parameters(const std::string& path, GPT<T>& model) {
  save_parameters(path, model.parameters(), model.checkpoint_fields());
}

/// Sets every parameter of `model` from `path`, written by save_parameters(path, model) from a model of the same
/// configuration; any mismatch (a configuration field, a parameter, a non-finite value, a damaged file) throws,
/// naming the path and the first difference, and changes nothing.
template <class T>
void load_parameters(const std::string& path, GPT<T>& model) {
  load_parameters(path, model.parameters(), model.checkpoint_fields());
}

}  // namespace polyattn
