#include <polyattn/nn/gpt.hpp>
#include <polyattn/nn/serialization.hpp>

#include <catch2/catch.hpp>

#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

using Catch::Contains;
using polyattn::AttentionMethod;
using polyattn::GPT;
using polyattn::GPTConfig;
using polyattn::Index;
using polyattn::Matrix;
using polyattn::Parameter;

namespace {

GPTConfig small_config(std::uint64_t seed) {
  GPTConfig config;
  config.vocab_size = 11;
  config.context = 16;
  config.d_model = 8;
  config.heads = 2;
  config.layers = 2;
  config.mlp_hidden = 16;
  config.method = AttentionMethod::exact_blocked;
  config.seed = seed;
  return config;
}

const std::vector<Index> sample_tokens{3, 1, 4, 1, 5, 9, 2, 6, 5, 3};

template <class T>
std::vector<Matrix<T>> snapshot(GPT<T>& model) {
  std::vector<Matrix<T>> values;
  for (Parameter<T>* p : model.parameters()) values.push_back(p->value);
  return values;
}

template <class T>
bool unchanged(GPT<T>& model, const std::vector<Matrix<T>>& values) {
  const auto parameters = model.parameters();
  for (std::size_t k = 0; k < parameters.size(); ++k)
    if (parameters[k]->value != values[k]) return false;
  return true;
}

// Overwrites the trailing checksum so that a deliberately edited header reaches the check after it.
std::string with_valid_checksum(std::string bytes) {
  const std::uint64_t checksum = polyattn::detail::fnv1a64(bytes, bytes.size() - 8);
  for (int i = 0; i < 8; ++i) bytes[bytes.size() - 8 + static_cast<std::size_t>(i)] = static_cast<char>((checksum >> (8 * i)) & 0xFF);
  return bytes;
}

}  // namespace

TEMPLATE_TEST_CASE("save -> load reproduces the model's outputs bit for bit", "[serialization]", float, double) {
  GPT<TestType> trained(small_config(1)), fresh(small_config(2));
  const std::string path = std::string("polyattn_test_serialization_") + (sizeof(TestType) == 4 ? "f" : "d") + ".bin";
  polyattn::save_parameters(path, trained.parameters());
  polyattn::load_parameters(path, fresh.parameters());
  std::remove(path.c_str());
  const Matrix<TestType> expected = trained.forward(sample_tokens);
  const Matrix<TestType> actual = fresh.forward(sample_tokens);
  REQUIRE(actual == expected);  // bit for bit: identical weights and identical operations
  const auto a = trained.parameters(), b = fresh.parameters();
  for (std::size_t k = 0; k < a.size(); ++k) REQUIRE(a[k]->value == b[k]->value);
}

TEST_CASE("serialize_parameters writes the documented layout", "[serialization]") {
  Parameter<float> w("w", 2, 1);
  w.value << 1.0f, -2.0f;
  const std::string bytes = polyattn::serialize_parameters<float>({&w});
  // magic 8, version 4, scalar size 4, count 8, name length 4, name 1, rows 8, cols 8, 2 floats, checksum 8
  REQUIRE(bytes.size() == 8 + 4 + 4 + 8 + 4 + 1 + 8 + 8 + 2 * 4 + 8);
  REQUIRE(bytes.substr(0, 8) == "POLYATTN");
  REQUIRE(bytes[8] == 1);   // version, little-endian
  REQUIRE(bytes[12] == 4);  // float
  REQUIRE(bytes[28] == 'w');
  // 1.0f = 0x3F800000, stored little-endian right after rows and cols
  REQUIRE(static_cast<unsigned char>(bytes[45]) == 0x00);
  REQUIRE(static_cast<unsigned char>(bytes[48]) == 0x3F);
  REQUIRE(static_cast<unsigned char>(bytes[52]) == 0xC0);  // -2.0f = 0xC0000000, the next value
}

TEST_CASE("truncated and corrupted files are rejected and leave the model unchanged", "[serialization]") {
  GPT<float> source(small_config(1)), target(small_config(2));
  const std::string bytes = polyattn::serialize_parameters(source.parameters());
  const auto before = snapshot(target);
  // every prefix length class: inside the magic, the header, a name, the values, the checksum
  for (const std::size_t length : {std::size_t(0), std::size_t(5), std::size_t(20), std::size_t(40),
                                   bytes.size() / 2, bytes.size() - 9, bytes.size() - 1}) {
    CAPTURE(length);
    REQUIRE_THROWS_AS(polyattn::deserialize_parameters(bytes.substr(0, length), target.parameters(), "cut.bin"),
                      std::invalid_argument);
    REQUIRE(unchanged(target, before));
  }
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(bytes.substr(0, bytes.size() - 1), target.parameters()),
                      Contains("checksum"));
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(bytes.substr(0, 20), target.parameters()),
                      Contains("truncated"));
  std::string flipped = bytes;
  flipped[bytes.size() / 2] = static_cast<char>(flipped[bytes.size() / 2] ^ 0x10);
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(flipped, target.parameters(), "flip.bin"),
                      Contains("flip.bin") && Contains("corrupted"));
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(bytes + "x", target.parameters()), Contains("checksum"));
  std::string magic = bytes;
  magic[0] = 'X';
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(magic, target.parameters()), Contains("magic"));
  std::string version = bytes;
  version[8] = 2;
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(with_valid_checksum(version), target.parameters()),
                      Contains("version 2"));
  // a consistent file with a trailing extra byte before the checksum
  std::string extended = bytes;
  extended.insert(bytes.size() - 8, 1, '\0');
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(with_valid_checksum(extended), target.parameters()),
                      Contains("unexpected bytes"));
  REQUIRE(unchanged(target, before));
}

TEST_CASE("files of a different model or scalar type are rejected and leave the model unchanged",
          "[serialization]") {
  GPT<float> model(small_config(3));
  const auto before = snapshot(model);

  GPTConfig wider = small_config(1);
  wider.d_model = 12;
  wider.heads = 3;
  GPT<float> wide(wider);
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(polyattn::serialize_parameters(wide.parameters()),
                                                       model.parameters()),
                      Contains("'wte'") && Contains("11x12 in the file but 11x8"));

  GPTConfig deeper = small_config(1);
  deeper.layers = 3;
  GPT<float> deep(deeper);
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(polyattn::serialize_parameters(deep.parameters()),
                                                       model.parameters()),
                      Contains("holds 41 parameters, the model has 29"));

  GPT<double> twin(small_config(1));
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(polyattn::serialize_parameters(twin.parameters()),
                                                       model.parameters()),
                      Contains("double") && Contains("float"));

  auto renamed = model.parameters();
  const std::string bytes = polyattn::serialize_parameters(renamed);
  const std::string original = renamed[5]->name;
  renamed[5]->name = "something.else";
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(bytes, renamed),
                      Contains("'" + original + "' in the file but 'something.else'"));
  renamed[5]->name = original;

  REQUIRE_THROWS_AS(polyattn::load_parameters("polyattn_no_such_file.bin", model.parameters()), std::runtime_error);
  REQUIRE(unchanged(model, before));
}
