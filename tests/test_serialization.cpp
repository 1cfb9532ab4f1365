#include <polyattn/nn/gpt.hpp>
#include <polyattn/nn/serialization.hpp>

#include <catch2/catch.hpp>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
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

// A fresh, empty directory for one test case (ctest runs test cases in parallel processes).
std::string scratch_directory(const std::string& name) {
  const std::string path = "polyattn_test_ckpt_" + name + "_" + std::to_string(static_cast<long>(::getpid()));
  std::filesystem::remove_all(path);
  std::filesystem::create_directory(path);
  return path;
}

// The names in `directory` other than `keep`: temporaries a save left behind.
std::vector<std::string> other_files(const std::string& directory, const std::string& keep) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(directory))
    if (entry.path().filename().string() != keep) names.push_back(entry.path().filename().string());
  return names;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The byte offset of the first value of parameter `name` in a serialized file.
std::size_t value_offset(const std::string& bytes, const std::string& name) {
  const std::size_t at = bytes.find(name);
  REQUIRE(at != std::string::npos);
  return at + name.size() + 16;  // after the name: rows and cols
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
  // magic 8, version 4, scalar size 4, field count 4 (0), count 8, name length 4, name 1, rows 8, cols 8,
  // 2 floats, checksum 8
  REQUIRE(bytes.size() == 8 + 4 + 4 + 4 + 8 + 4 + 1 + 8 + 8 + 2 * 4 + 8);
  REQUIRE(bytes.substr(0, 8) == "POLYATTN");
  REQUIRE(bytes[8] == 2);   // version, little-endian
  REQUIRE(bytes[12] == 4);  // float
  REQUIRE(bytes[16] == 0);  // no configuration fields
  REQUIRE(bytes[20] == 1);  // one parameter
  REQUIRE(bytes[32] == 'w');
  // 1.0f = 0x3F800000, stored little-endian right after rows and cols
  REQUIRE(static_cast<unsigned char>(bytes[49]) == 0x00);
  REQUIRE(static_cast<unsigned char>(bytes[52]) == 0x3F);
  REQUIRE(static_cast<unsigned char>(bytes[56]) == 0xC0);  // -2.0f = 0xC0000000, the next value

  // With configuration fields: count, then key length, key, value length, value, before the parameter count.
  const std::string described = polyattn::serialize_parameters<float>({&w}, {{"heads", "4"}});
  REQUIRE(described.size() == bytes.size() + 4 + 5 + 4 + 1);
  REQUIRE(described[16] == 1);
  REQUIRE(described[20] == 5);
  REQUIRE(described.substr(24, 5) == "heads");
  REQUIRE(described[29] == 1);
  REQUIRE(described[33] == '4');
}

TEST_CASE("version-1 files (no configuration fields) are still read", "[serialization]") {
  Parameter<float> w("w", 2, 1);
  w.value << 1.0f, -2.0f;
  std::string bytes = polyattn::serialize_parameters<float>({&w});
  bytes.erase(16, 4);  // version 1 had no field count
  bytes[8] = 1;
  Parameter<float> target("w", 2, 1);
  polyattn::deserialize_parameters(with_valid_checksum(bytes), std::vector<Parameter<float>*>{&target});
  REQUIRE(target.value == w.value);
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
  version[8] = 3;
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(with_valid_checksum(version), target.parameters()),
                      Contains("version 3"));
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

TEMPLATE_TEST_CASE("save -> load of a GPT with its configuration reproduces the model", "[serialization]", float,
                   double) {
  GPTConfig config = small_config(1);
  config.layer_methods = {AttentionMethod::adjoint, AttentionMethod::exact_blocked};
  GPT<TestType> trained(config), fresh(config);
  const std::string directory = scratch_directory(sizeof(TestType) == 4 ? "roundtrip_f" : "roundtrip_d");
  const std::string path = directory + "/gpt.bin";
  polyattn::save_parameters(path, trained);
  polyattn::save_parameters(path, trained);  // over an existing file
  polyattn::load_parameters(path, fresh);
  REQUIRE(fresh.forward(sample_tokens) == trained.forward(sample_tokens));
  REQUIRE(other_files(directory, "gpt.bin").empty());
  // the stored fields are the model's, in its order
  const std::string bytes = read_file(path);
  for (const auto& [key, value] : trained.checkpoint_fields()) {
    CAPTURE(key);
    REQUIRE(bytes.find(key) != std::string::npos);
  }
  std::filesystem::remove_all(directory);
}

TEST_CASE("a GPT checkpoint records every configuration field that changes the model and checks it on load",
          "[serialization]") {
  GPTConfig base = small_config(1);
  base.d_model = 8;
  base.heads = 4;
  GPT<float> source(base);
  const std::string bytes = polyattn::serialize_parameters(source);

  struct Variant {
    const char* field;
    std::function<void(GPTConfig&)> change;
    const char* in_file;
    const char* in_model;
  };
  const std::vector<Variant> variants{
      {"heads", [](GPTConfig& c) { c.heads = 2; }, "4", "2"},  // same parameter shapes, different function
      {"layers", [](GPTConfig& c) { c.layers = 3; }, "2", "3"},
      {"block0.method", [](GPTConfig& c) { c.method = AttentionMethod::adjoint; }, "exact_blocked", "adjoint"},
      {"block1.method", [](GPTConfig& c) { c.layer_methods = {AttentionMethod::exact_blocked, AttentionMethod::paper}; },
       "exact_blocked", "paper"},
      {"vocab_size", [](GPTConfig& c) { c.vocab_size = 12; }, "11", "12"},
      {"context", [](GPTConfig& c) { c.context = 17; }, "16", "17"},
      {"d_model", [](GPTConfig& c) { c.d_model = 12; }, "8", "12"},
      {"mlp_hidden", [](GPTConfig& c) { c.mlp_hidden = 32; }, "16", "32"},
      {"activation", [](GPTConfig& c) { c.activation = polyattn::ActivationKind::relu; }, "gelu", "relu"},
      {"attention.scale", [](GPTConfig& c) { c.attention_scale = 1.0; }, "0.70710678118654746", "1"},
  };
  for (const Variant& variant : variants) {
    CAPTURE(variant.field);
    GPTConfig config = base;
    variant.change(config);
    GPT<float> target(config);
    const auto before = snapshot(target);
    REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(bytes, target, "gpt.bin"),
                        Contains("polyattn::load_parameters('gpt.bin')") &&
                            Contains(std::string("'") + variant.field + "' is " + variant.in_file +
                                     " in the file but " + variant.in_model + " in the model"));
    REQUIRE(unchanged(target, before));
  }

  // Options of the polynomial approximation are checked when a layer uses it.
  GPTConfig approximate = base;
  approximate.method = AttentionMethod::adjoint;
  GPT<float> adjoint(approximate);
  const std::string adjoint_bytes = polyattn::serialize_parameters(adjoint);
  approximate.approximation.degree = 4;
  GPT<float> degree4(approximate);
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(adjoint_bytes, degree4),
                      Contains("'attention.degree' is 2 in the file but 4 in the model"));

  // The stored method is the current one: set_attention_method() after construction counts.
  GPT<float> switched(base);
  switched.set_attention_method(AttentionMethod::adjoint);
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(bytes, switched),
                      Contains("'block0.method' is exact_blocked in the file but adjoint in the model"));
  switched.set_attention_method(AttentionMethod::exact_blocked);
  polyattn::deserialize_parameters(bytes, switched);  // now it matches
  REQUIRE(switched.forward(sample_tokens) == source.forward(sample_tokens));

  // A configured file is not loaded without a configuration to check, nor a bare file into a configured model.
  GPTConfig two_heads = base;
  two_heads.heads = 2;
  GPT<float> other(two_heads);
  const auto before = snapshot(other);
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(bytes, other.parameters()),
                      Contains("stores a model configuration") && Contains("heads = 4"));
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(polyattn::serialize_parameters(source.parameters()), other),
                      Contains("stores no model configuration"));
  REQUIRE(unchanged(other, before));

  // Through a file, as the probe did: 4 heads saved, 2 heads loading.
  const std::string directory = scratch_directory("heads");
  const std::string path = directory + "/gpt.bin";
  polyattn::save_parameters(path, source);
  REQUIRE_THROWS_WITH(polyattn::load_parameters(path, other),
                      Contains(path) && Contains("'heads' is 4 in the file but 2 in the model"));
  REQUIRE(unchanged(other, before));
  std::filesystem::remove_all(directory);
}

TEST_CASE("loading refuses directories, devices and FIFOs with polyattn's own message, without hanging",
          "[serialization]") {
  GPT<float> model(small_config(3));
  const auto before = snapshot(model);
  const std::string directory = scratch_directory("nonregular");

  REQUIRE_THROWS_AS(polyattn::load_parameters("/dev/zero", model), std::runtime_error);
  REQUIRE_THROWS_WITH(polyattn::load_parameters("/dev/zero", model.parameters()),
                      Contains("polyattn::load_parameters('/dev/zero')") && Contains("expected a regular file") &&
                          Contains("character device"));
  REQUIRE_THROWS_AS(polyattn::load_parameters(directory, model), std::runtime_error);
  REQUIRE_THROWS_WITH(polyattn::load_parameters(directory, model),
                      Contains("polyattn::load_parameters('" + directory + "')") && Contains("a directory"));
  const std::string fifo = directory + "/fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  REQUIRE_THROWS_WITH(polyattn::load_parameters(fifo, model), Contains(fifo) && Contains("FIFO"));
  REQUIRE_THROWS_WITH(polyattn::load_parameters(directory + "/missing.bin", model),
                      Contains("missing.bin") && Contains("cannot open"));

  // A huge (sparse) regular file is refused after its header, before it is read or anything is sized by it.
  const std::string huge = directory + "/huge.bin";
  {
    std::ofstream out(huge, std::ios::binary);
    out << polyattn::serialize_parameters(model).substr(0, 16);
  }
  if (::truncate(huge.c_str(), off_t(1) << 34) == 0) {
    REQUIRE_THROWS_WITH(polyattn::load_parameters(huge, model), Contains("far more than") && Contains(huge));
    std::ofstream(huge, std::ios::binary | std::ios::in | std::ios::out) << "XXXXXXXX";  // and a wrong magic
    REQUIRE_THROWS_WITH(polyattn::load_parameters(huge, model), Contains("not a polyattn parameter file"));
  }
  REQUIRE(unchanged(model, before));
  std::filesystem::remove_all(directory);
}

TEST_CASE("a non-finite value in a checkpoint is refused naming the parameter; saving one is refused too",
          "[serialization]") {
  GPT<float> source(small_config(1)), target(small_config(2));
  const auto before = snapshot(target);
  std::string bytes = polyattn::serialize_parameters(source);
  const std::size_t offset = value_offset(bytes, "block0.attn.wq.weight") + 3 * sizeof(float);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&bytes[offset], &nan, sizeof(float));
  REQUIRE_THROWS_WITH(polyattn::deserialize_parameters(with_valid_checksum(bytes), target, "nan.bin"),
                      Contains("nan.bin") && Contains("'block0.attn.wq.weight'") && Contains("non-finite") &&
                          Contains("(3, 0)"));
  REQUIRE(unchanged(target, before));

  // Saving a diverged model is refused before the file is touched: the last good checkpoint survives.
  const std::string directory = scratch_directory("nan");
  const std::string path = directory + "/gpt.bin";
  polyattn::save_parameters(path, source);
  const std::string good = read_file(path);
  source.parameters()[10]->value(1, 2) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(polyattn::save_parameters(path, source),
                      Contains("save_parameters('" + path + "')") && Contains(source.parameters()[10]->name) &&
                          Contains("non-finite"));
  REQUIRE(read_file(path) == good);
  REQUIRE(other_files(directory, "gpt.bin").empty());
  std::filesystem::remove_all(directory);
}

TEST_CASE("GPT::forward names the parameter when a weight in memory is non-finite", "[serialization]") {
  for (const AttentionMethod method : {AttentionMethod::exact_blocked, AttentionMethod::adjoint}) {
    for (const std::string name : {"block0.attn.wq.weight", "wte", "block1.mlp.fc.weight", "lm_head.weight"}) {
      CAPTURE(polyattn::attention_method_name(method), name);
      GPTConfig config = small_config(1);
      config.method = method;
      GPT<double> model(config);
      for (Parameter<double>* p : model.parameters())
        if (p->name == name) p->value(0, 0) = std::numeric_limits<double>::quiet_NaN();
      // wte row 0 is token 0's embedding: use a sequence that contains it
      const std::vector<Index> tokens{0, 3, 1, 4};
      REQUIRE_THROWS_WITH(model.forward(tokens),
                          Contains("polyattn::GPT::forward") && Contains("'" + name + "'") && Contains("non-finite"));
      REQUIRE_THROWS_WITH(model.forward(tokens, tokens), Contains("'" + name + "'"));
    }
  }
}

TEST_CASE("a save that fails leaves the previous file intact and no temporary behind", "[serialization]") {
  GPT<float> first(small_config(1)), second(small_config(2));
  const std::string directory = scratch_directory("failing_save");
  const std::string path = directory + "/gpt.bin";
  polyattn::save_parameters(path, first);
  const std::string good = read_file(path);

  // The disk "fills" midway: a file-size limit smaller than the checkpoint makes write() fail with EFBIG.
  std::string message;
  bool runtime_error = false;
  {
    rlimit old_limit{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    rlimit small = old_limit;
    small.rlim_cur = 1000;
    REQUIRE(good.size() > 1000);
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    try {
      polyattn::save_parameters(path, second);
    } catch (const std::runtime_error& error) {
      runtime_error = true;
      message = error.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    std::signal(SIGXFSZ, old_handler);
  }
  CAPTURE(message);
  REQUIRE(runtime_error);
  REQUIRE_THAT(message, Contains("save_parameters('" + path + "')") && Contains("cannot write") &&
                            Contains("is unchanged"));
  REQUIRE(read_file(path) == good);
  REQUIRE(other_files(directory, "gpt.bin").empty());

  // A directory that does not exist, and a target that is a directory.
  REQUIRE_THROWS_WITH(polyattn::save_parameters(directory + "/no/such/dir/gpt.bin", second),
                      Contains("no/such/dir") && Contains("cannot create a temporary file"));
  std::filesystem::create_directory(directory + "/sub");
  REQUIRE_THROWS_WITH(polyattn::save_parameters(directory + "/sub", second),
                      Contains("cannot rename") && Contains("/sub"));
  REQUIRE(other_files(directory, "gpt.bin") == std::vector<std::string>{"sub"});
  REQUIRE(std::filesystem::is_empty(directory + "/sub"));
  REQUIRE(read_file(path) == good);
  std::filesystem::remove_all(directory);
}

TEST_CASE("saves use distinct temporaries, so concurrent saves to one path do not collide", "[serialization]") {
  REQUIRE(polyattn::detail::temporary_path_for("a.bin") != polyattn::detail::temporary_path_for("a.bin"));
  REQUIRE(polyattn::detail::directory_of("a.bin") == ".");
  REQUIRE(polyattn::detail::directory_of("/a.bin") == "/");
  REQUIRE(polyattn::detail::directory_of("x/y/a.bin") == "x/y");

  GPT<float> first(small_config(1)), second(small_config(2));
  const std::string directory = scratch_directory("concurrent");
  const std::string path = directory + "/gpt.bin";
  const std::string first_bytes = polyattn::serialize_parameters(first);
  const std::string second_bytes = polyattn::serialize_parameters(second);
  int failures = 0;
  std::string failure;
  const auto saver = [&](GPT<float>& model, int& failed, std::string& what) {
    for (int i = 0; i < 20; ++i) try {
        polyattn::save_parameters(path, model);
      } catch (const std::exception& error) {
        ++failed;
        what = error.what();
      }
  };
  int failures_second = 0;
  std::string failure_second;
  std::thread a(saver, std::ref(first), std::ref(failures), std::ref(failure));
  std::thread b(saver, std::ref(second), std::ref(failures_second), std::ref(failure_second));
  a.join();
  b.join();
  CAPTURE(failure, failure_second);
  REQUIRE(failures == 0);
  REQUIRE(failures_second == 0);
  const std::string saved = read_file(path);
  REQUIRE((saved == first_bytes || saved == second_bytes));
  REQUIRE(other_files(directory, "gpt.bin").empty());
  std::filesystem::remove_all(directory);
}
