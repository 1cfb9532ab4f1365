#include <polyattn/nn/generator.hpp>

#include "test_support.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using Catch::Contains;
using polyattn::AttentionMethod;
using polyattn::GenerationOptions;
using polyattn::Generator;
using polyattn::GPT;
using polyattn::GPTConfig;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::TokenSampler;
using polyattn::testing::random_ids;

namespace {

// Two blocks of 3 heads of width 4 (r = C(4 + 2, 2) = 15 features at degree 2) over 48 positions in scan chunks
// of 8: the full forward passes through several chunks, their prefix states and their in-chunk blocks.
GPTConfig generation_config(AttentionMethod method) {
  GPTConfig config;
  config.vocab_size = 11;
  config.context = 48;
  config.d_model = 12;
  config.heads = 3;
  config.layers = 2;
  config.mlp_hidden = 16;
  config.method = method;
  config.approximation.chunk_size = 8;
  config.seed = 7;
  return config;
}

// Largest |difference| of two logit rows, relative to the largest |logit| of the reference.
template <class A, class B>
double logit_error(const Eigen::MatrixBase<A>& actual, const Eigen::MatrixBase<B>& expected) {
  return (actual.template cast<double>() - expected.template cast<double>()).cwiseAbs().maxCoeff() /
         expected.template cast<double>().cwiseAbs().maxCoeff();
}

// The generator and the full forward compute every logit by the same operations, except for the order of the
// additions: attention sums over at most n keys and, polynomial, r features (the scan adds chunk by chunk and
// evaluates its diagonal block as p(c q.k), the recurrence adds key by key through the features); the exact forward
// adds keys in blocks; the projections' and the MLP's sums (d_model, hidden) may be blocked differently for one row
// than for many. Two orders of a sum of L terms differ by at most 2 (L - 1) u sum |terms| (Higham, Thm. 3.1, for
// each order against the exact sum). Every logit passes through `layers` blocks, each with an attention sum
// (n + r terms), three projections of d terms and the MLP (d then hidden terms), and the head (d terms); each
// rounding is carried forward with an O(1) gain (LayerNorm rescales by the spread of a row, which is O(1) in
// these models, and the weights are O(1 / sqrt(width))). Summing the bound over that path, with the sum of
// |terms| at most the largest |logit| times the same O(1) gain:
//   |logit_gen - logit_full| <= 2 u [layers (n + r + 4 d + hidden) + d] max |logit|.
template <class T>
double rounding_tolerance(const GPTConfig& config, Index features) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const auto layers = static_cast<double>(config.layers), n = static_cast<double>(config.context),
             d = static_cast<double>(config.d_model), hidden = static_cast<double>(config.mlp_hidden);
  return 2 * u * (layers * (n + static_cast<double>(features) + 4 * d + hidden) + d);
}

Index feature_count(const GPTConfig& config) {
  return polyattn::feature_width(config.approximation.feature_map, config.d_model / config.heads,
                                 config.approximation.degree);
}

}  // namespace

TEMPLATE_TEST_CASE("Generated logits equal the full forward on the same prefix, for every method", "[generator]",
                   float, double) {
  using T = TestType;
  for (const AttentionMethod method : polyattn::all_attention_methods) {
    CAPTURE(polyattn::attention_method_name(method));
    const GPTConfig config = generation_config(method);
    GPT<T> model(config);
    const std::vector<Index> tokens = random_ids(static_cast<std::size_t>(config.context), config.vocab_size, 3);
    const Matrix<T> full = model.forward(tokens);
    const double tolerance = rounding_tolerance<T>(config, feature_count(config));
    Generator<T> generator(model);
    // One-token prompt, prompts ending inside a chunk, on a chunk boundary and after several chunks.
    for (const Index prompt : {Index(1), Index(5), Index(8), Index(19)}) {
      CAPTURE(prompt);
      const std::vector<Index> prefix(tokens.begin(), tokens.begin() + prompt);
      const Matrix<T>& prefilled = generator.prefill(prefix);
      CHECK(generator.length() == prompt);
      CHECK(logit_error(prefilled, full.row(prompt - 1)) <= tolerance);
      for (Index i = prompt; i < config.context; ++i) {
        const Matrix<T>& logits = generator.append(tokens[static_cast<std::size_t>(i)]);
        CAPTURE(i);
        CHECK(logit_error(logits, full.row(i)) <= tolerance);
      }
      CHECK(generator.length() == config.context);
    }
    // The check can fail: changing the first token moves the last logits far beyond the tolerance, so a state
    // that lost the earliest key (or misplaced a position) would be caught.
    std::vector<Index> changed = tokens;
    changed[0] = (changed[0] + 1) % config.vocab_size;
    const Matrix<T> moved = model.forward(changed);
    CHECK(logit_error(moved.bottomRows(1), full.bottomRows(1)) > 100 * tolerance);
  }
}

TEST_CASE("A prompt longer than a prefill block and an appended tail match the full forward", "[generator]") {
  // 300 positions: the prompt's states are summed over two blocks of rows (256 + 44) and the caches grow by
  // doubling while tokens are appended; also a model with an exact and a polynomial block.
  for (const int variant : {0, 1, 2}) {
    const AttentionMethod method = variant == 0 ? AttentionMethod::exact_blocked : AttentionMethod::adjoint;
    CAPTURE(variant);
    GPTConfig config = generation_config(method);
    if (variant == 2) config.layer_methods = {AttentionMethod::adjoint, AttentionMethod::exact_blocked};
    config.context = 300;
    config.approximation.chunk_size = 0;  // the default scan chunk
    GPT<double> model(config);
    const std::vector<Index> tokens = random_ids(300, config.vocab_size, 5);
    const Matrix<double> full = model.forward(tokens);
    const double tolerance = rounding_tolerance<double>(config, feature_count(config));
    Generator<double> generator(model);
    const Matrix<double>& prefilled = generator.prefill(std::vector<Index>(tokens.begin(), tokens.begin() + 280));
    CHECK(logit_error(prefilled, full.row(279)) <= tolerance);
    for (Index i = 280; i < 300; ++i)
      CHECK(logit_error(generator.append(tokens[static_cast<std::size_t>(i)]), full.row(i)) <= tolerance);
  }
}

TEST_CASE("The polynomial state is the same size at every length, the KV cache grows with it", "[generator]") {
  for (const AttentionMethod method : {AttentionMethod::exact_blocked, AttentionMethod::adjoint}) {
    CAPTURE(polyattn::attention_method_name(method));
    const GPTConfig config = generation_config(method);
    GPT<float> model(config);
    Generator<float> generator(model);
    generator.prefill({1, 2, 3});
    const std::size_t before = generator.state_bytes();
    generator.append(4);
    const Index dv = config.d_model / config.heads;
    if (method == AttentionMethod::adjoint) {
      // r x (d_v + 1) numbers per head and layer
      const Index numbers = config.layers * config.heads * feature_count(config) * (dv + 1);
      CHECK(before == static_cast<std::size_t>(numbers) * sizeof(float));
      CHECK(generator.state_bytes() == before);
    } else {
      CHECK(before == static_cast<std::size_t>(config.layers * 2 * 3 * config.d_model) * sizeof(float));
      CHECK(generator.state_bytes() == before / 3 * 4);
    }
  }
}

TEST_CASE("TokenSampler: temperature 0 and top_k 1 take the most likely token, the lowest id on ties", "[generator]") {
  Matrix<double> logits(1, 5);
  logits << 0.5, 2.0, -1.0, 2.0, 1.9;
  GenerationOptions greedy;
  greedy.temperature = 0;
  TokenSampler by_temperature(greedy);
  GenerationOptions top_one;
  top_one.top_k = 1;
  top_one.temperature = 5;
  TokenSampler by_top_k(top_one);
  for (int draw = 0; draw < 10; ++draw) {
    CHECK(by_temperature.next(logits.row(0)) == 1);
    CHECK(by_top_k.next(logits.row(0)) == 1);
  }
  CHECK(by_temperature.next(logits.row(0).transpose()) == 1);  // a column works as well
}

TEST_CASE("TokenSampler draws from softmax(logits / temperature) over the top_k tokens", "[generator]") {
  const std::vector<double> p{0.1, 0.2, 0.3, 0.4};
  Matrix<float> logits(1, 4);
  for (Index t = 0; t < 4; ++t) logits(0, t) = static_cast<float>(std::log(p[static_cast<std::size_t>(t)]));
  struct Case {
    double temperature;
    Index top_k;
    std::vector<double> expected;
  };
  const double s = std::sqrt(0.1) + std::sqrt(0.2) + std::sqrt(0.3) + std::sqrt(0.4);
  const std::vector<Case> cases{
      {1.0, 0, p},
      {2.0, 0, {std::sqrt(0.1) / s, std::sqrt(0.2) / s, std::sqrt(0.3) / s, std::sqrt(0.4) / s}},  // p^(1/2)
      {1.0, 2, {0, 0, 3.0 / 7, 4.0 / 7}},
  };
  constexpr int draws = 40000;
  for (const Case& c : cases) {
    CAPTURE(c.temperature, c.top_k);
    GenerationOptions options;
    options.temperature = c.temperature;
    options.top_k = c.top_k;
    options.seed = 11;
    TokenSampler sampler(options);
    std::vector<int> counts(4, 0);
    for (int k = 0; k < draws; ++k) ++counts[static_cast<std::size_t>(sampler.next(logits))];
    for (std::size_t t = 0; t < 4; ++t) {
      CAPTURE(t);
      const double q = c.expected[t], frequency = counts[t] / double(draws);
      if (q == 0) {
        CHECK(counts[t] == 0);  // outside the top k: never drawn
      } else {
        // Binomial frequency: standard deviation sqrt(q (1 - q) / draws) <= 0.0025; 5 of them.
        CHECK(std::abs(frequency - q) <= 5 * std::sqrt(q * (1 - q) / draws));
      }
    }
  }
}

TEST_CASE("generate: greedy decoding follows the argmax of every step, a seed fixes the sampled tokens",
          "[generator]") {
  const GPTConfig config = generation_config(AttentionMethod::adjoint);
  GPT<float> model(config);
  Generator<float> generator(model);
  const std::vector<Index> prompt{3, 1, 4};
  GenerationOptions options;
  options.max_new_tokens = 20;
  options.temperature = 0;
  const std::vector<Index> greedy = generator.generate(prompt, options);
  REQUIRE(greedy.size() == 20);
  CHECK(generator.length() == 3 + 19);  // every new token but the last was fed back
  // The same tokens by hand: prefill, then the argmax of every step's logits.
  Generator<float> stepper(model);
  const Matrix<float>* logits = &stepper.prefill(prompt);
  for (std::size_t t = 0; t < greedy.size(); ++t) {
    Index best = 0;
    logits->row(0).maxCoeff(&best);
    CHECK(greedy[t] == best);
    if (t + 1 < greedy.size()) logits = &stepper.append(best);
  }
  options.temperature = 1.5;
  options.top_k = 1;
  CHECK(generator.generate(prompt, options) == greedy);

  options.top_k = 0;
  options.seed = 5;
  const std::vector<Index> sampled = generator.generate(prompt, options);
  CHECK(generator.generate(prompt, options) == sampled);
  Generator<float> other(model);
  CHECK(other.generate(prompt, options) == sampled);
  options.seed = 6;
  CHECK(generator.generate(prompt, options) != sampled);  // 11^20 sequences; these seeds give different ones
  CHECK(sampled != greedy);
}

TEST_CASE("Generator and GenerationOptions refuse bad input with a clear message", "[generator]") {
  GenerationOptions options;
  options.max_new_tokens = 0;
  CHECK_THROWS_WITH(options.check(), Contains("'max_new_tokens' must be >= 1, got 0"));
  options = GenerationOptions{};
  options.temperature = -0.5;
  CHECK_THROWS_WITH(options.check(), Contains("'temperature' must be finite and >= 0, got -0.5"));
  options.temperature = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(TokenSampler(options), Contains("'temperature' must be finite"));
  options = GenerationOptions{};
  options.top_k = -1;
  CHECK_THROWS_WITH(options.check(), Contains("'top_k' must be >= 0"));

  const GPTConfig config = generation_config(AttentionMethod::adjoint);
  GPT<float> model(config);
  Generator<float> generator(model);
  CHECK_THROWS_WITH(generator.append(1),
                    Contains("polyattn::Generator::append: holds no sequence: call prefill() first"));
  CHECK_THROWS_WITH(generator.prefill({}), Contains("argument 'prompt' must have 1 to 'context' = 48 tokens, got 0"));
  CHECK_THROWS_WITH(generator.prefill(std::vector<Index>(49, 0)), Contains("got 49"));
  CHECK_THROWS_WITH(generator.prefill({1, 11}), Contains("argument 'tokens' has id 11 at position 1"));
  options = GenerationOptions{};
  options.top_k = 12;
  CHECK_THROWS_WITH(generator.generate({1}, options),
                    Contains("'top_k' must be at most the vocabulary size 11, got 12"));
  options.top_k = 0;
  options.max_new_tokens = 40;
  CHECK_THROWS_WITH(generator.generate(std::vector<Index>(10, 1), options),
                    Contains("need 49 positions (every new token but the last is fed back), more than 'context' = 48"));
  options.max_new_tokens = 39;
  CHECK(generator.generate(std::vector<Index>(10, 1), options).size() == 39);
  CHECK(generator.length() == 48);
  CHECK_THROWS_WITH(generator.append(1), Contains("the context is full: 48 of 'context' = 48 positions"));

  generator.prefill({1, 2});
  CHECK_THROWS_WITH(generator.append(-1), Contains("argument 'token' must be in [0, 11), got -1"));
  CHECK(generator.length() == 2);  // a refused token changes nothing
  generator.append(3);
  model.set_attention_method(AttentionMethod::exact_blocked);
  CHECK_THROWS_WITH(generator.append(3), Contains("block 0 switched its attention method since prefill()"));
  generator.prefill({1, 2});  // the new method's state
  CHECK(generator.append(3).cols() == 11);

  // The accessors the generator runs the model through.
  CHECK_THROWS_WITH(model.ln1(2), Contains("polyattn::GPT::ln1: argument 'layer' must be in [0, 2), got 2"));
  CHECK_THROWS_WITH(model.ln2(-1), Contains("polyattn::GPT::ln2: argument 'layer' must be in [0, 2), got -1"));
  CHECK(model.ln_f().gain.name == "ln_f.gain");
  CHECK(model.embedding().token_table.name == "wte");

  // Generation runs the model's layers on single rows: backward() must not use what they keep.
  const std::vector<Index> tokens{1, 2, 3}, targets{2, 3, 4};
  model.forward(tokens, targets);
  generator.prefill({1, 2});
  generator.append(3);
  CHECK_THROWS_WITH(model.backward(), Contains("needs a preceding forward(tokens, targets)"));
}

TEST_CASE("The polynomial must stay the one the full forward would choose on the prefix", "[generator]") {
  GPTConfig config = generation_config(AttentionMethod::adjoint);
  config.approximation.kind = polyattn::PolynomialKind::minimax;
  {
    GPT<double> model(config);  // radius 0: refit to every call's R
    Generator<double> generator(model);
    CHECK_THROWS_WITH(generator.prefill({1, 2}), Contains("block 0 uses a minimax polynomial with 'radius' = 0"));
  }
  // The radius of a 4-token prompt, then a radius policy at that radius: the sequence's R grows beyond it.
  const std::vector<Index> tokens = random_ids(static_cast<std::size_t>(config.context), config.vocab_size, 3);
  const std::vector<Index> prompt(tokens.begin(), tokens.begin() + 4);
  config.approximation.kind = polyattn::PolynomialKind::taylor;
  double prompt_radius = 0, sequence_radius = 0;
  {
    GPT<double> model(config);
    model.forward(prompt);
    for (Index l = 0; l < config.layers; ++l)
      prompt_radius = std::max(prompt_radius, model.attention(l).forward_certificate().radius);
    model.forward(tokens);
    for (Index l = 0; l < config.layers; ++l)
      sequence_radius = std::max(sequence_radius, model.attention(l).forward_certificate().radius);
  }
  REQUIRE(sequence_radius > prompt_radius);
  config.approximation.radius = prompt_radius;
  for (const polyattn::RangePolicy policy : {polyattn::RangePolicy::raise_degree, polyattn::RangePolicy::throw_error}) {
    config.approximation.range_policy = policy;
    GPT<double> model(config);
    Generator<double> generator(model);
    generator.prefill(prompt);
    const auto append_all = [&] {
      for (std::size_t i = prompt.size(); i < tokens.size(); ++i) generator.append(tokens[i]);
    };
    if (policy == polyattn::RangePolicy::raise_degree)
      CHECK_THROWS_WITH(append_all(), Contains("the range policy replaces the degree-2 polynomial by a degree-") &&
                                          Contains("prefill() the sequence again"));
    else
      CHECK_THROWS_AS(append_all(), std::domain_error);  // as the forward pass on that prefix throws
    CHECK(generator.length() == 0);
    CHECK_THROWS_WITH(generator.append(1), Contains("holds no sequence"));
  }
  // mark_invalid keeps the polynomial: the logits still match the full forward.
  config.approximation.range_policy = polyattn::RangePolicy::mark_invalid;
  GPT<double> model(config);
  const Matrix<double> full = model.forward(tokens);
  Generator<double> generator(model);
  generator.prefill(prompt);
  for (std::size_t i = prompt.size(); i < tokens.size(); ++i)
    CHECK(logit_error(generator.append(tokens[i]), full.row(static_cast<Index>(i))) <=
          rounding_tolerance<double>(config, feature_count(config)));
}
