// Sequence-parallel GPT training (GPT::set_state_exchange, nn/gpt.hpp) against the serial model on the whole
// sequence. Every rank builds the same model (same seed) and the same tokens, runs the serial reference on the
// whole sequence and the sharded model on its own uneven shard, and compares the loss, its logits rows, every
// parameter gradient and the parameters after optimizer steps. Every collective call comes before the checks,
// and checks never abort a test case early (CHECK, not REQUIRE), so the ranks stay in step even when one fails.
// A GPT is always causal (GPTConfig has no mask option), so there is no non-causal case. Run by CTest with 1, 2,
// 3 and 4 ranks.
#include <polyattn/parallel/distributed.hpp>
#include <polyattn/polyattn.hpp>

#include "mpi/mpi_testing.hpp"

#include <catch2/catch.hpp>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using polyattn::AttentionMethod;
using polyattn::GPT;
using polyattn::GPTConfig;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::Parameter;
using polyattn::testing::invalid_argument_message;
using polyattn::testing::Shard;
using polyattn::testing::shard_of;
using polyattn::testing::world_rank;
using polyattn::testing::world_size;
using Catch::Matchers::Contains;

namespace {

std::shared_ptr<polyattn::StateExchange> world_exchange() {
  return std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD);
}

// The project's bound for double results that differ only in the order of their sums.
constexpr double tolerance = 1e-12;

GPTConfig small_config() {
  GPTConfig config;
  config.vocab_size = 13;
  config.context = 40;
  config.d_model = 8;
  config.heads = 2;
  config.layers = 2;
  config.method = AttentionMethod::adjoint;
  config.seed = 2024;
  return config;
}

template <class Vector>
Vector slice(const Vector& whole, Shard shard) {
  return Vector(whole.begin() + shard.first, whole.begin() + shard.first + shard.rows);
}

// A random sequence of n + 1 ids: tokens are the first n, targets the last n (next-token prediction). Every
// seventh target is ignored, so the mean is over fewer positions than tokens.
struct Sequence {
  std::vector<Index> tokens, targets;
};

Sequence make_sequence(Index n, const GPTConfig& config) {
  std::mt19937_64 generator(99);
  std::uniform_int_distribution<Index> id(0, config.vocab_size - 1);
  std::vector<Index> ids(static_cast<std::size_t>(n + 1));
  for (Index& value : ids) value = id(generator);
  Sequence sequence{std::vector<Index>(ids.begin(), ids.end() - 1), std::vector<Index>(ids.begin() + 1, ids.end())};
  for (std::size_t i = 3; i < sequence.targets.size(); i += 7) sequence.targets[i] = config.ignore_target;
  return sequence;
}

// ||a - b|| / ||b|| (||a - b|| when b is zero).
double relative_difference(const Matrix<double>& a, const Matrix<double>& b) {
  const double difference = (a - b).norm(), reference = b.norm();
  return reference > 0 ? difference / reference : difference;
}

// The largest relative difference between the gradients (or values) of two lists of parameters, with the name of
// the parameter where it occurs.
struct Worst {
  double difference = 0;
  std::string name;
};

template <class T>
Worst compare_parameters(GPT<T>& model, GPT<T>& reference, Matrix<T> Parameter<T>::*member) {
  const std::vector<Parameter<T>*> mine = model.parameters(), theirs = reference.parameters();
  Worst worst;
  for (std::size_t k = 0; k < mine.size(); ++k) {
    const double difference =
        relative_difference((mine[k]->*member).template cast<double>(), (theirs[k]->*member).template cast<double>());
    if (difference >= worst.difference) worst = {difference, mine[k]->name};
  }
  return worst;
}

// Every method, and a model that mixes the two kinds (exact keys gathered, polynomial states exchanged).
std::vector<GPTConfig> every_method() {
  std::vector<GPTConfig> configs;
  for (const AttentionMethod method : polyattn::all_attention_methods) {
    GPTConfig config = small_config();
    config.method = method;
    configs.push_back(config);
  }
  GPTConfig mixed = small_config();
  mixed.layer_methods = {AttentionMethod::exact_blocked, AttentionMethod::paper};
  configs.push_back(mixed);
  return configs;
}

std::string methods_of(const GPTConfig& config) {
  if (config.layer_methods.empty()) return polyattn::attention_method_name(config.method);
  std::string names;
  for (const AttentionMethod method : config.layer_methods)
    names += std::string(names.empty() ? "" : ", ") + polyattn::attention_method_name(method);
  return names;
}

void check_training_against_serial(const GPTConfig& config) {
  const Index n = 31;
  const Sequence sequence = make_sequence(n, config);
  const Shard shard = shard_of(n);
  GPT<double> reference(config), model(config);
  model.set_state_exchange(world_exchange());
  polyattn::AdamW<double> reference_adam(reference.parameters(), {1e-2});
  polyattn::AdamW<double> adam(model.parameters(), {1e-2});

  // One step: the loss, the logits of this shard and the gradients.
  reference_adam.zero_grad();
  adam.zero_grad();
  const double reference_loss = reference.forward(sequence.tokens, sequence.targets);
  const double loss = model.forward(slice(sequence.tokens, shard), slice(sequence.targets, shard));
  const Matrix<double> logits = model.logits();
  const Matrix<double> reference_logits = reference.logits().middleRows(shard.first, shard.rows);
  reference.backward();
  model.backward();
  const Worst gradient = compare_parameters(model, reference, &Parameter<double>::grad);
  // backward() accumulates: a second pass without zero_grad() doubles the gradient on every rank.
  reference.forward(sequence.tokens, sequence.targets);
  model.forward(slice(sequence.tokens, shard), slice(sequence.targets, shard));
  reference.backward();
  model.backward();
  const Worst accumulated = compare_parameters(model, reference, &Parameter<double>::grad);
  // Two optimizer steps on every rank keep the parameters identical to the serial model's.
  for (int step = 0; step < 2; ++step) {
    reference_adam.zero_grad();
    adam.zero_grad();
    reference.forward(sequence.tokens, sequence.targets);
    model.forward(slice(sequence.tokens, shard), slice(sequence.targets, shard));
    reference.backward();
    model.backward();
    reference_adam.step();
    adam.step();
  }
  const Worst parameters = compare_parameters(model, reference, &Parameter<double>::value);
  const double stepped_reference_loss = reference.forward(sequence.tokens, sequence.targets);
  const double stepped_loss = model.forward(slice(sequence.tokens, shard), slice(sequence.targets, shard));

  INFO("rank " << world_rank() << " of " << world_size() << ": tokens " << shard.first << " + " << shard.rows
                << ", attention " << methods_of(config));
  CHECK(std::abs(loss - reference_loss) <= tolerance * std::abs(reference_loss));
  CHECK(model.accuracy() == reference.accuracy());
  CHECK(relative_difference(logits, reference_logits) <= tolerance);
  INFO("largest gradient difference " << gradient.difference << " in " << gradient.name << ", accumulated "
                                      << accumulated.difference << " in " << accumulated.name
                                      << ", parameters after two steps " << parameters.difference << " in "
                                      << parameters.name);
  CHECK(gradient.difference <= tolerance);
  CHECK(accumulated.difference <= tolerance);
  CHECK(parameters.difference <= tolerance);
  CHECK(stepped_loss < loss);  // the steps trained
  CHECK(std::abs(stepped_loss - stepped_reference_loss) <= tolerance * std::abs(stepped_reference_loss));
}

void check_float_training_against_serial(const GPTConfig& config) {
  const Index n = 31;
  const Sequence sequence = make_sequence(n, config);
  const Shard shard = shard_of(n);
  GPT<float> reference(config), model(config);
  model.set_state_exchange(world_exchange());
  const double reference_loss = reference.forward(sequence.tokens, sequence.targets);
  const double loss = model.forward(slice(sequence.tokens, shard), slice(sequence.targets, shard));
  reference.backward();
  model.backward();
  const Worst gradient = compare_parameters(model, reference, &Parameter<float>::grad);

  // The passes round differently (the states are exchanged in double, sums run in another order), by a few float
  // epsilons per operation; 1e-5 is ~100 epsilon, far below what a misplaced position or state would cost.
  const double float_tolerance = 1e-5;
  INFO("rank " << world_rank() << " of " << world_size() << ", attention " << methods_of(config)
               << ": largest gradient difference " << gradient.difference << " in " << gradient.name << ", loss "
               << loss << " vs " << reference_loss);
  CHECK(std::abs(loss - reference_loss) <= float_tolerance * std::abs(reference_loss));
  CHECK(gradient.difference <= float_tolerance);
}

}  // namespace

TEST_CASE("sharded GPT training matches the serial model on the whole sequence in double, every method", "[mpi]") {
  for (const GPTConfig& config : every_method()) check_training_against_serial(config);
}

TEST_CASE("sharded GPT training matches the serial model in float, up to float rounding, every method", "[mpi]") {
  for (const GPTConfig& config : every_method()) check_float_training_against_serial(config);
}

TEST_CASE("attention methods that differ across ranks make every rank throw, changing nothing", "[mpi]") {
  GPTConfig config = small_config();
  // Rank 0 alone asks for an exact method in block 1: every rank throws, none waits.
  if (world_rank() == 0) config.layer_methods = {AttentionMethod::adjoint, AttentionMethod::exact_blocked};
  GPT<double> model(config);
  const std::string message = invalid_argument_message([&] { model.set_state_exchange(world_exchange()); });
  // A refused exchange changes nothing: the model still runs serially.
  const Sequence sequence = make_sequence(5, config);
  const double loss = model.forward(sequence.tokens, sequence.targets);

  if (world_size() == 1) {
    CHECK(message.empty());
    CHECK(model.state_exchange() != nullptr);
  } else {
    CHECK_THAT(message, Contains("polyattn::GPT::set_state_exchange: 'attention method of a block' differs across"));
    CHECK(model.state_exchange() == nullptr);
  }
  CHECK(std::isfinite(loss));
}

TEST_CASE("configurations or parameters that differ across ranks make every rank throw", "[mpi]") {
  GPTConfig config = small_config();
  if (world_rank() == world_size() - 1) config.mlp_hidden = 16;  // 4 d_model = 32 elsewhere
  GPT<double> different_width(config);
  const std::string width_message =
      invalid_argument_message([&] { different_width.set_state_exchange(world_exchange()); });

  config = small_config();
  if (world_rank() == world_size() - 1) config.seed = 7;
  GPT<double> different_seed(config);
  const std::string seed_message =
      invalid_argument_message([&] { different_seed.set_state_exchange(world_exchange()); });

  if (world_size() == 1) {
    CHECK(width_message.empty());
    CHECK(seed_message.empty());
  } else {
    CHECK_THAT(width_message, Contains("polyattn::GPT::set_state_exchange: 'mlp_hidden' differs across the"));
    CHECK_THAT(seed_message, Contains("polyattn::GPT::set_state_exchange: 'sum of the parameters' differs across"));
  }
}

TEST_CASE("bad shards make every rank throw, and the ranks stay in step", "[mpi]") {
  const GPTConfig config = small_config();
  const Index n = 20;
  const Sequence sequence = make_sequence(n, config);
  const Shard shard = shard_of(n);
  const int bad_rank = world_size() - 1;
  const bool bad = world_rank() == bad_rank;
  GPT<double> model(config), reference(config);
  model.set_state_exchange(world_exchange());
  std::vector<Index> tokens = slice(sequence.tokens, shard), targets = slice(sequence.targets, shard);

  // An empty shard on the last rank.
  const std::string empty_message = invalid_argument_message(
      [&] { model.forward(bad ? std::vector<Index>{} : tokens, bad ? std::vector<Index>{} : targets); });
  // A token id outside the vocabulary on the last rank.
  std::vector<Index> bad_tokens = tokens;
  if (bad) bad_tokens.back() = config.vocab_size;
  const std::string id_message = invalid_argument_message([&] { model.forward(bad_tokens, targets); });
  // A whole sequence one longer than the context: the last rank's positions run past it.
  std::vector<Index> long_tokens = tokens, long_targets = targets;
  if (bad) {
    long_tokens.resize(static_cast<std::size_t>(config.context - shard.first + 1), 0);
    long_targets.resize(long_tokens.size(), 0);
  }
  const std::string context_message = invalid_argument_message([&] { model.forward(long_tokens, long_targets); });
  // Logits on some ranks, a loss on others: the passes would make different collectives.
  const std::string mixed_message = invalid_argument_message([&] {
    if (bad)
      model.forward(tokens);
    else
      model.forward(tokens, targets);
  });

  // A NaN weight on the last rank only surfaces in its MLP (a per-token layer between two attention layers):
  // the other ranks learn of it at the next attention layer's check.
  const std::vector<Parameter<double>*> list = model.parameters();
  Parameter<double>& gain = **std::find_if(list.begin(), list.end(),
                                           [](const Parameter<double>* p) { return p->name == "block0.ln2.gain"; });
  const double saved_gain = gain.value(0, 0);
  if (bad) gain.value(0, 0) = std::numeric_limits<double>::quiet_NaN();
  const std::string forward_nan_message = invalid_argument_message([&] { model.forward(tokens, targets); });
  gain.value(0, 0) = saved_gain;

  // A NaN in the head's weight on the last rank only, after a good forward pass: its backward pass fails in the
  // final LayerNorm, the other ranks at the last attention layer's check; no gradient is added.
  model.forward(tokens, targets);
  Parameter<double>& head = model.lm_head().weight;
  const double saved_head = head.value(0, 0);
  if (bad) head.value(0, 0) = std::numeric_limits<double>::quiet_NaN();
  const std::string backward_nan_message = invalid_argument_message([&] { model.backward(); });
  head.value(0, 0) = saved_head;
  double gradient_norm_after_failure = 0;
  for (const Parameter<double>* p : model.parameters()) gradient_norm_after_failure += p->grad.norm();

  // Then a good step on every rank, which must still match the serial model.
  const double loss = model.forward(tokens, targets);
  model.backward();
  const double reference_loss = reference.forward(sequence.tokens, sequence.targets);
  reference.backward();
  const Worst gradient = compare_parameters(model, reference, &Parameter<double>::grad);

  const std::string others_fail = "rank " + std::to_string(bad_rank) + " of " + std::to_string(world_size());
  INFO("rank " << world_rank() << " of " << world_size());
  if (bad) {
    CHECK_THAT(empty_message, Contains("polyattn::GPT::forward: argument 'tokens' is empty on rank") &&
                                  Contains("empty shards are not supported"));
    CHECK_THAT(id_message, Contains("polyattn::GPT::forward: argument 'tokens' has id 13 at position"));
    CHECK_THAT(context_message, Contains("polyattn::GPT::forward: argument 'targets' must have 1 to 'context'"));
    CHECK_THAT(forward_nan_message, Contains("'block0.ln2.gain'"));
    CHECK_THAT(backward_nan_message, Contains("polyattn::LayerNorm::backward"));
  } else {
    CHECK_THAT(empty_message, Contains("polyattn::GPT::forward: " + others_fail + " failed validation"));
    CHECK_THAT(id_message, Contains("polyattn::GPT::forward: " + others_fail + " failed validation"));
    CHECK_THAT(context_message, Contains("polyattn::GPT::forward: " + others_fail + " failed validation"));
    // Told at the check of the next attention layer: block 1's in forward, in backward the last block's.
    CHECK_THAT(forward_nan_message, Contains("polyattn::SelfAttention::forward: " + others_fail + " failed"));
    CHECK_THAT(backward_nan_message, Contains("polyattn::SelfAttention::backward: " + others_fail + " failed"));
  }
  if (world_size() == 1) {
    CHECK(mixed_message.empty());
  } else {
    CHECK_THAT(mixed_message, Contains("polyattn::GPT::forward: 'forward with targets' differs across the"));
  }
  CHECK(gradient_norm_after_failure == 0);
  CHECK(std::abs(loss - reference_loss) <= tolerance * std::abs(reference_loss));
  CHECK(gradient.difference <= tolerance);
}
