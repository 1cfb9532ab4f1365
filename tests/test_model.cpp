#include <polyattn/model.hpp>
#include <polyattn/optimizer.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

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
using polyattn::Matrix;
using polyattn::Parameter;
using polyattn::testing::gradient_error;
using polyattn::testing::random_matrix;
using polyattn::testing::relative_error;

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

std::vector<Index> random_ids(std::size_t n, Index vocab, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Index> ids(n);
  for (Index& id : ids) id = std::uniform_int_distribution<Index>(0, vocab - 1)(rng);
  return ids;
}

// Checks every parameter gradient of `model` at (tokens, targets) against central differences of the loss.
void check_model_gradient(GPT<double>& model, const std::vector<Index>& tokens, const std::vector<Index>& targets,
                          double tolerance) {
  polyattn::zero_grads(model.parameters());
  model.forward(tokens, targets);
  model.backward();
  const auto loss = [&] { return model.forward(tokens, targets); };
  for (Parameter<double>* p : model.parameters()) {
    CAPTURE(p->name);
    CHECK(gradient_error(loss, p->value, p->grad) < tolerance);
  }
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
  config.attention.degree = 2;
  config.attention.chunk_size = 5;  // n = 12: causal chunks of 5, 5 and a partial one of 2
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
