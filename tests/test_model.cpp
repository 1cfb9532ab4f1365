#include <polyattn/nn/gpt.hpp>
#include <polyattn/nn/optimizer.hpp>
#include <polyattn/nn/serialization.hpp>

#include "gradient_check.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdio>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using Catch::Contains;
using polyattn::AttentionMethod;
using polyattn::Composition;
using polyattn::GPT;
using polyattn::GPTConfig;
using polyattn::Index;
using polyattn::LoRAOptions;
using polyattn::LoRATargets;
using polyattn::Matrix;
using polyattn::Parameter;
using polyattn::testing::gradient_error;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;
using polyattn::testing::random_ids;

namespace {

GPTConfig tiny_config(AttentionMethod method) {
  GPTConfig config;
  config.vocab_size = 7;
  config.context = 12;
  config.d_model = 8;
  config.heads = 2;
  config.layers = 2;
  config.mlp_hidden = 12;
  config.method = method;
  config.seed = 2024;
  return config;
}

// Checks every trainable parameter gradient of `model` at (tokens, targets) against central differences of the
// loss; returns how many parameters it checked.
std::size_t check_model_gradient(GPT<double>& model, const std::vector<Index>& tokens,
                                 const std::vector<Index>& targets, double tolerance) {
  polyattn::zero_grads(model.parameters());
  model.forward(tokens, targets);
  model.backward();
  const auto loss = [&] { return model.forward(tokens, targets); };
  std::size_t checked = 0;
  for (Parameter<double>* p : model.parameters()) {
    if (!p->trainable) continue;
    CAPTURE(p->name);
    CHECK(gradient_error(loss, p->value, p->grad) < tolerance);
    ++checked;
  }
  return checked;
}

bool ends_with(const std::string& name, const std::string& suffix) {
  return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_adapter(const Parameter<double>& p) { return ends_with(p.name, ".lora_A") || ends_with(p.name, ".lora_B"); }

// Gives every adapter of `model` a random B (a fresh adapter has B = 0, which hides the gradient of A and the
// update s A B from every check).
void randomize_adapters(GPT<double>& model, std::uint64_t seed) {
  for (Parameter<double>* p : model.parameters())
    if (ends_with(p->name, ".lora_B")) p->value = random_matrix<double>(p->rows(), p->cols(), seed++, 0.5);
}

}  // namespace

TEST_CASE("GPT gradient of every parameter matches central finite differences (exact attention)", "[model]") {
  // The loss (mean cross-entropy through 2 blocks) is smooth with O(1) derivatives. Central differences with
  // h = 1e-6 then have truncation error O(h^2) ~ 1e-12 and rounding error eps |L| / h ~ 4e-10 per entry, against
  // gradient entries of typical size 1e-2: about 1e-8 relative. 1e-6 leaves two digits of margin for the
  // smallest parameter gradients (positional rows, LayerNorm biases).
  const double tolerance = 1e-6;
  GPT<double> model(tiny_config(AttentionMethod::exact_reference));
  const std::vector<Index> tokens = random_ids(10, 7, 1);
  std::vector<Index> targets = random_ids(10, 7, 2);
  targets[3] = -1;  // an unscored position must contribute nothing
  check_model_gradient(model, tokens, targets, tolerance);
}

TEST_CASE("GPT gradient with the adjoint backend is the exact gradient of the approximate model", "[model]") {
  // The adjoint backend differentiates the polynomial forward pass exactly, so the model's gradient is the
  // true gradient of the approximate model: the same finite-difference accuracy as above applies. The layers
  // mix methods (adjoint, exact blocked) to exercise the per-layer choice.
  const double tolerance = 1e-6;
  GPTConfig config = tiny_config(AttentionMethod::adjoint);
  config.layer_methods = {AttentionMethod::adjoint, AttentionMethod::exact_blocked};
  config.approximation.degree = 2;
  config.approximation.chunk_size = 5;  // n = 12: causal chunks of 5, 5 and a partial one of 2
  GPT<double> model(config);
  REQUIRE(model.attention(0).method() == AttentionMethod::adjoint);
  REQUIRE(model.attention(1).method() == AttentionMethod::exact_blocked);
  check_model_gradient(model, random_ids(12, 7, 3), random_ids(12, 7, 4), tolerance);
  // The approximate model is a different function: its loss differs from the exact one.
  GPT<double> exact(tiny_config(AttentionMethod::exact_blocked));
  const std::vector<Index> tokens = random_ids(12, 7, 3), targets = random_ids(12, 7, 4);
  CHECK(std::abs(model.forward(tokens, targets) - exact.forward(tokens, targets)) > 1e-6);
}

TEST_CASE("GPT backward accumulates into the gradients", "[model]") {
  GPT<double> model(tiny_config(AttentionMethod::exact_blocked));
  const std::vector<Index> tokens = random_ids(9, 7, 5), targets = random_ids(9, 7, 6);
  polyattn::zero_grads(model.parameters());
  model.forward(tokens, targets);
  model.backward();
  std::vector<Matrix<double>> once;
  for (Parameter<double>* p : model.parameters()) once.push_back(p->grad);
  model.backward();
  std::size_t k = 0;
  for (Parameter<double>* p : model.parameters()) {
    CAPTURE(p->name);
    // the second pass repeats the same floating-point operations: exactly twice, up to the final addition
    CHECK(relative_error(p->grad, 2 * once[k++]) < 1e-15);
  }
}

TEST_CASE("GPT initialisation is deterministic in the seed and shared by float and double", "[model]") {
  GPT<double> a(tiny_config(AttentionMethod::exact_blocked)), b(tiny_config(AttentionMethod::adjoint));
  GPTConfig other = tiny_config(AttentionMethod::exact_blocked);
  other.seed = 2025;
  GPT<double> c(other);
  GPT<float> single(tiny_config(AttentionMethod::exact_blocked));
  const auto pa = a.parameters(), pb = b.parameters(), pc = c.parameters();
  const auto pf = single.parameters();
  REQUIRE(pa.size() == pb.size());
  bool any_different = false;
  std::set<std::string> names;
  for (std::size_t k = 0; k < pa.size(); ++k) {
    CAPTURE(pa[k]->name);
    names.insert(pa[k]->name);
    CHECK(pa[k]->value == pb[k]->value);  // the attention method does not change the initial point
    CHECK(pa[k]->value.cast<float>() == pf[k]->value);
    any_different = any_different || pa[k]->value != pc[k]->value;
  }
  CHECK(any_different);
  CHECK(names.size() == pa.size());  // every name is unique
  // wte, wpe; per block 2 + 4 + 2 + 4 parameters; ln_f (2) and lm_head
  CHECK(pa.size() == 2 + 2 * 12 + 3);
  CHECK(pa.front()->name == "wte");
  CHECK(pa.back()->name == "lm_head.weight");
  // 7x8 + 12x8, per block 4x(8x8) attention + 4x8 LayerNorm + 8x12 + 12 + 12x8 + 8 MLP, 2x8 + 8x7
  CHECK(polyattn::count_trainable(pa) == 56 + 96 + 2 * (256 + 32 + 96 + 12 + 96 + 8) + 16 + 56);
}

TEST_CASE("A short training run lowers the loss on a toy task", "[model]") {
  // Toy task: predict the previous token (target[i] = token[i-1]); position 0 is unscored. A model that ignores
  // the context can do no better than ln(vocab) = 2.08; one attention layer that looks one step back solves it.
  // From a fixed seed, 150 AdamW steps on fresh random sequences lower the mean loss of the last 10 steps by
  // 1.00 (exact) and 0.52 (adjoint, degree 2) nats against the first 10; requiring a drop of 0.3 nats, far
  // beyond step-to-step noise (~0.05 at 15 scored tokens), leaves margin for rounding differences between
  // compilers while failing for any broken gradient.
  for (const AttentionMethod method : {AttentionMethod::exact_blocked, AttentionMethod::adjoint}) {
    CAPTURE(polyattn::attention_method_name(method));
    GPTConfig config;
    config.vocab_size = 8;
    config.context = 16;
    config.d_model = 16;
    config.heads = 2;
    config.layers = 1;
    config.method = method;
    config.seed = 7;
    GPT<float> model(config);
    polyattn::AdamWOptions adam_options;
    adam_options.learning_rate = 1e-2;
    adam_options.weight_decay = 0;
    polyattn::AdamW<float> adam(model.parameters(), adam_options);
    std::mt19937_64 rng(11);
    double first = 0, last = 0;
    const int steps = 150;
    for (int step = 0; step < steps; ++step) {
      std::vector<Index> tokens(16), targets(16);
      for (Index& t : tokens) t = std::uniform_int_distribution<Index>(0, 7)(rng);
      targets[0] = -1;
      for (std::size_t i = 1; i < tokens.size(); ++i) targets[i] = tokens[i - 1];
      adam.zero_grad();
      const double loss = model.forward(tokens, targets);
      model.backward();
      polyattn::clip_grad_norm(model.parameters(), 1.0);
      adam.step();
      if (step < 10) first += loss / 10;
      if (step >= steps - 10) last += loss / 10;
    }
    CAPTURE(first, last);
    CHECK(first > 1.8);  // starts near ln 8
    CHECK(first - last > 0.3);
  }
}

TEST_CASE("Composition and Residual compose components and check widths", "[model]") {
  using polyattn::make_component;
  polyattn::LinearOptions wide{4, 6, true, 0, 1}, narrow{6, 4, true, 0, 2};
  auto branch = std::make_unique<Composition<double>>();
  branch->add(make_component<double>(4, 6, polyattn::Linear<double>(wide, "up")));
  branch->add(make_component<double>(6, 4, polyattn::Linear<double>(narrow, "down")));
  Composition<double> body;
  body.add(std::make_unique<polyattn::Residual<double>>(std::move(branch)));
  REQUIRE(body.input_width() == 4);
  REQUIRE(body.output_width() == 4);
  Matrix<double> X = random_matrix<double>(5, 4, 1), Y(5, 4), dX = Matrix<double>::Zero(5, 4);
  const Matrix<double> R = random_matrix<double>(5, 4, 2);
  body.forward(X, Y);
  std::vector<Parameter<double>*> parameters;
  body.collect_parameters(parameters);
  REQUIRE(parameters.size() == 4);
  const Matrix<double> up = parameters[0]->value, down = parameters[2]->value;
  // a linear map: the composition must be X + X W_up W_down (biases start at zero), to rounding
  REQUIRE(relative_error(Y, X + X * up * down) < 1e-14);
  body.backward(X, R, dX);
  const auto loss = [&] {
    Matrix<double> Z(5, 4);
    body.forward(X, Z);
    return (R.array() * Z.array()).sum();
  };
  // linear loss: no truncation error, rounding ~1e-10 relative
  CHECK(gradient_error(loss, X, dX) < 1e-8);
  for (Parameter<double>* p : parameters) CHECK(gradient_error(loss, p->value, p->grad) < 1e-8);

  Composition<double> empty;
  REQUIRE_THROWS_WITH(empty.forward(X, Y), Contains("no parts"));
  REQUIRE_THROWS_WITH(body.add(make_component<double>(6, 4, polyattn::Linear<double>(narrow, "bad"))),
                      Contains("width 6") && Contains("outputs width 4"));
  auto widening = make_component<double>(4, 6, polyattn::Linear<double>(wide, "up"));
  REQUIRE_THROWS_WITH(polyattn::Residual<double>(std::move(widening)), Contains("preserve the width"));
}

TEST_CASE("GPT rejects bad configurations and input", "[model]") {
  GPTConfig bad = tiny_config(AttentionMethod::exact_blocked);
  bad.heads = 3;
  REQUIRE_THROWS_WITH(GPT<double>(bad), Contains("'heads'"));
  bad = tiny_config(AttentionMethod::exact_blocked);
  bad.layer_methods = {AttentionMethod::adjoint};
  REQUIRE_THROWS_WITH(GPT<double>(bad), Contains("'layer_methods'"));
  bad = tiny_config(AttentionMethod::exact_blocked);
  bad.ignore_target = 3;
  REQUIRE_THROWS_WITH(GPT<double>(bad), Contains("'ignore_target'"));
  // The attention settings live in the configuration once, and are checked there.
  bad = tiny_config(AttentionMethod::exact_blocked);
  bad.attention_scale = -1.0;
  REQUIRE_THROWS_WITH(GPT<double>(bad), Contains("GPTConfig") && Contains("'attention_scale'"));
  bad = tiny_config(AttentionMethod::exact_blocked);
  bad.approximation.degree = -1;
  REQUIRE_THROWS_WITH(GPT<double>(bad), Contains("GPTConfig") && Contains("'degree'"));

  GPT<double> model(tiny_config(AttentionMethod::exact_blocked));
  REQUIRE_THROWS_WITH(model.backward(), Contains("GPT::backward") && Contains("forward"));
  REQUIRE_THROWS_WITH(model.forward(std::vector<Index>(13, 0)), Contains("'tokens'") && Contains("12"));
  REQUIRE_THROWS_WITH(model.forward(std::vector<Index>{}), Contains("'tokens'"));
  REQUIRE_THROWS_WITH(model.forward(std::vector<Index>{1, 7}), Contains("id 7 at position 1"));
  REQUIRE_THROWS_WITH(model.forward(std::vector<Index>{1, 2}, std::vector<Index>{1}), Contains("'targets'"));
  REQUIRE_THROWS_WITH(model.forward(std::vector<Index>{1, 2}, std::vector<Index>{1, -2}), Contains("id -2"));
  REQUIRE_THROWS_WITH(model.attention(2), Contains("'layer'"));
  // inference only: no loss, so no backward
  model.forward(std::vector<Index>{1, 2, 3});
  REQUIRE(model.logits().rows() == 3);
  REQUIRE(model.logits().cols() == 7);
  REQUIRE_THROWS_WITH(model.backward(), Contains("forward(tokens, targets)"));
}

TEST_CASE("GPT::add_lora adapts the chosen Linears, freezes everything else and keeps the logits", "[model][lora]") {
  GPT<double> model(tiny_config(AttentionMethod::exact_blocked));
  const std::vector<Index> tokens = random_ids(11, 7, 20);
  const Matrix<double> before = model.forward(tokens);
  const std::size_t plain_count = model.parameters().size();
  model.add_lora({2, 4.0, 0, 99});  // default targets: W_Q and W_V of every block
  const Matrix<double> after = model.forward(tokens);
  CHECK(after == before);  // B = 0 adds exact zeros

  const auto parameters = model.parameters();
  REQUIRE(parameters.size() == plain_count + 2 * 2 * 2);  // 2 blocks x (wq, wv) x (A, B)
  std::vector<std::string> trainable;
  for (const Parameter<double>* p : parameters)
    if (p->trainable) trainable.push_back(p->name);
  const std::vector<std::string> expected = {
      "block0.attn.wq.weight.lora_A", "block0.attn.wq.weight.lora_B", "block0.attn.wv.weight.lora_A",
      "block0.attn.wv.weight.lora_B", "block1.attn.wq.weight.lora_A", "block1.attn.wq.weight.lora_B",
      "block1.attn.wv.weight.lora_A", "block1.attn.wv.weight.lora_B"};
  CHECK(trainable == expected);
  CHECK(polyattn::count_trainable(parameters) == 4 * (8 * 2 + 2 * 8));
  // the adapter follows its weight in parameters()
  for (std::size_t k = 0; k < parameters.size(); ++k)
    if (ends_with(parameters[k]->name, ".lora_A")) {
      CAPTURE(parameters[k]->name);
      CHECK(parameters[k - 1]->name + ".lora_A" == parameters[k]->name);
    }
  // every adapter draws A from its own seed, independent of the other targets
  polyattn::SelfAttention<double>& block0 = model.attention(0);
  CHECK(block0.query.lora_A.value != block0.value.lora_A.value);
  CHECK(block0.query.lora_A.value != model.attention(1).query.lora_A.value);
  CHECK_FALSE(block0.key.has_lora());
  CHECK_FALSE(model.mlp(0).fc.has_lora());
  CHECK_FALSE(model.lm_head().has_lora());
  GPT<double> everywhere(tiny_config(AttentionMethod::exact_blocked));
  everywhere.add_lora({2, 4.0, 0, 99}, LoRATargets::all());
  CHECK(everywhere.attention(0).value.lora_A.value == block0.value.lora_A.value);
  CHECK(everywhere.attention(1).query.lora_A.value == model.attention(1).query.lora_A.value);
  CHECK(everywhere.parameters().size() == plain_count + 2 * (2 * 6 + 1));  // 13 Linears
  GPT<double> attention_only(tiny_config(AttentionMethod::exact_blocked));
  attention_only.add_lora({2, 4.0, 0, 99}, LoRATargets::attention());
  CHECK(attention_only.attention(1).output.has_lora());
  CHECK_FALSE(attention_only.mlp(1).proj.has_lora());
}

TEST_CASE("GPT LoRA gradients of every adapter match central finite differences", "[model][lora]") {
  // Adapters on every Linear (attention, MLP and head) with random B, so that every A and B has a non-trivial
  // gradient; the tolerance is that of the full-model check above (same smooth loss, same step).
  const double tolerance = 1e-6;
  GPT<double> model(tiny_config(AttentionMethod::exact_reference));
  model.add_lora({2, 3.0, 0, 5}, LoRATargets::all());
  randomize_adapters(model, 50);
  std::vector<Index> targets = random_ids(12, 7, 22);
  targets[5] = -1;
  const std::size_t checked = check_model_gradient(model, random_ids(12, 7, 21), targets, tolerance);
  CHECK(checked == 2 * (2 * 6 + 1));  // every adapter, nothing else
  for (const Parameter<double>* p : model.parameters()) {
    CAPTURE(p->name);
    CHECK(p->trainable == is_adapter(*p));
    if (!p->trainable) CHECK(p->grad.isZero(0));
    if (p->trainable) CHECK(p->grad.norm() > 0);
  }
}

TEST_CASE("GPT LoRA fine-tuning with AdamW changes only the adapters", "[model][lora]") {
  GPT<double> model(tiny_config(AttentionMethod::exact_blocked));
  model.add_lora({2, 8.0, 0, 7}, LoRATargets::attention());
  const auto parameters = model.parameters();
  std::vector<Matrix<double>> initial;
  for (const Parameter<double>* p : parameters) initial.push_back(p->value);
  polyattn::AdamWOptions adam_options;
  adam_options.learning_rate = 1e-2;
  adam_options.weight_decay = 0.1;  // decay must not reach the frozen weights either
  polyattn::AdamW<double> adam(parameters, adam_options);
  const std::vector<Index> tokens = random_ids(12, 7, 30), targets = random_ids(12, 7, 31);
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    adam.zero_grad();
    last = model.forward(tokens, targets);
    if (step == 0) first = last;
    model.backward();
    for (const Parameter<double>* p : parameters)
      if (!is_adapter(*p)) {
        CAPTURE(p->name);
        REQUIRE(p->grad.isZero(0));
      }
    adam.step();
  }
  CAPTURE(first, last);
  CHECK(last < first - 0.05);  // the adapters alone fit the fixed batch
  for (std::size_t k = 0; k < parameters.size(); ++k) {
    CAPTURE(parameters[k]->name);
    if (is_adapter(*parameters[k]))
      CHECK(parameters[k]->value != initial[k]);
    else
      CHECK(parameters[k]->value == initial[k]);
  }
}

TEST_CASE("GPT::merge_lora folds every adapter into its weight with the same logits", "[model][lora]") {
  GPT<double> model(tiny_config(AttentionMethod::exact_reference));
  model.add_lora({3, 6.0, 0, 11}, LoRATargets::all());
  randomize_adapters(model, 70);
  const std::vector<Index> tokens = random_ids(12, 7, 40);
  const Matrix<double> adapted = model.forward(tokens);
  GPT<double> plain(tiny_config(AttentionMethod::exact_reference));
  CHECK(relative_error(plain.forward(tokens), adapted) > 1e-3);  // the adapters do change the function

  model.merge_lora();
  // X (W + s A B) against X W + s (X A) B through two blocks: sums in another order, O(width * eps) relative.
  CHECK(relative_error(model.forward(tokens), adapted) < 1e-12);
  for (const Parameter<double>* p : model.parameters())
    if (ends_with(p->name, ".lora_B")) {
      CAPTURE(p->name);
      CHECK(p->value.isZero(0));
    }
  // The merged weights alone deploy to a model without adapters: copy them by name into `plain`.
  const auto merged = model.parameters();
  for (Parameter<double>* target : plain.parameters())
    for (const Parameter<double>* source : merged)
      if (source->name == target->name) target->value = source->value;
  CHECK(relative_error(plain.forward(tokens), adapted) < 1e-12);
  model.merge_lora();  // merging again adds s A 0: nothing changes
  CHECK(relative_error(model.forward(tokens), adapted) < 1e-12);
}

TEST_CASE("GPT with LoRA adapters saves and loads its parameters", "[model][lora]") {
  const LoRAOptions options{2, 4.0, 0, 13};
  GPT<double> trained(tiny_config(AttentionMethod::exact_blocked));
  trained.add_lora(options);
  randomize_adapters(trained, 90);
  const std::vector<Index> tokens = random_ids(10, 7, 50);
  const Matrix<double> expected = trained.forward(tokens);
  const std::string path = "polyattn_test_model_lora.bin";
  polyattn::save_parameters(path, trained.parameters());

  // The same architecture with adapters from another seed: loading restores the trained adapters exactly.
  GPT<double> fresh(tiny_config(AttentionMethod::exact_blocked));
  fresh.add_lora({2, 4.0, 0, 14});
  CHECK(fresh.forward(tokens) != expected);  // B = 0 before loading
  polyattn::load_parameters(path, fresh.parameters());
  CHECK(fresh.forward(tokens) == expected);
  const auto a = trained.parameters(), b = fresh.parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t k = 0; k < a.size(); ++k) CHECK(a[k]->trainable == b[k]->trainable);

  // A model without adapters, or with as many on other targets, does not match the file and is left unchanged.
  GPT<double> plain(tiny_config(AttentionMethod::exact_blocked));
  const Matrix<double> plain_logits = plain.forward(tokens);
  REQUIRE_THROWS_WITH(polyattn::load_parameters(path, plain.parameters()),
                      Contains("holds 37 parameters") && Contains("has 29"));
  CHECK(plain.forward(tokens) == plain_logits);
  LoRATargets query_and_key;
  query_and_key.wv = false;
  query_and_key.wk = true;
  GPT<double> other(tiny_config(AttentionMethod::exact_blocked));
  other.add_lora(options, query_and_key);
  const Matrix<double> other_logits = other.forward(tokens);
  REQUIRE_THROWS_WITH(polyattn::load_parameters(path, other.parameters()),
                      Contains("'block0.attn.wv.weight' in the file") && Contains("'block0.attn.wk.weight.lora_A'"));
  CHECK(other.forward(tokens) == other_logits);
  std::remove(path.c_str());
}

TEST_CASE("GPT::add_lora rejects bad options and targets and changes nothing", "[model][lora]") {
  GPT<double> model(tiny_config(AttentionMethod::exact_blocked));
  const std::size_t count = model.parameters().size();
  const auto unchanged = [&] {
    const auto parameters = model.parameters();
    bool all_trainable = true;
    for (const Parameter<double>* p : parameters) all_trainable = all_trainable && p->trainable;
    return parameters.size() == count && all_trainable;
  };
  LoRATargets none;
  none.wq = none.wv = false;
  REQUIRE_THROWS_WITH(model.add_lora({2, 8.0}, none), Contains("LoRATargets") && Contains("no layer"));
  REQUIRE_THROWS_WITH(model.add_lora({0, 8.0}), Contains("LoRAOptions") && Contains("'rank'"));
  // d_model 8, vocab 7: rank 8 fits the attention projections but not the head, checked before any change
  REQUIRE_THROWS_WITH(model.add_lora({8, 8.0}, LoRATargets::all()),
                      Contains("GPT::add_lora") && Contains("'lm_head.weight'") && Contains("min(in, out) = 7"));
  CHECK(unchanged());
  model.merge_lora();  // no adapters: nothing to do
  CHECK(unchanged());
  REQUIRE_THROWS_WITH(model.mlp(2), Contains("GPT::mlp") && Contains("'layer'"));

  model.add_lora({2, 8.0}, LoRATargets::attention());
  const Index adapters = polyattn::count_trainable(model.parameters());
  LoRATargets mlp_and_query;
  mlp_and_query.wv = false;
  mlp_and_query.fc = true;
  REQUIRE_THROWS_WITH(model.add_lora({2, 8.0}, mlp_and_query),
                      Contains("GPT::add_lora") && Contains("'block0.attn.wq.weight'") &&
                          Contains("already has an adapter"));
  CHECK(polyattn::count_trainable(model.parameters()) == adapters);
  CHECK_FALSE(model.mlp(0).fc.has_lora());
}
