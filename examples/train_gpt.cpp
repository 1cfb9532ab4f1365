// Trains the same small GPT from the same seed on the same data once with exact (blocked) attention and once
// with the almost-linear adjoint backend per requested Taylor degree, and compares loss, accuracy and time
// per step. For each adjoint run it also reports the largest score radius R = c max|q| max|k| the trained
// model reaches and the certified error of the polynomial on [-R, R]: a model may learn scores the degree
// cannot follow, which is what a higher degree fixes. Every trained model is evaluated twice: with the attention
// it trained with and with exact attention ("train approximate, deploy exact": the same weights, exact softmax).
// After the text task every model writes a short sample (nn/generator.hpp), continuing a held-out prompt.
//
//   train_gpt [--steps N] [--text-steps N] [--context N] [--layers N] [--d-model N] [--heads N]
//             [--degrees G1,G2,...] [--exact-windows W1,W2,...] [--batch B] [--lr X] [--seed S] [--log-every N]
//             [--out-dir DIR]
//             [--keys K] [--values V] [--queries Q] [--text FILE | FILE]      (--help lists ranges and defaults)
//
// Task (a), always run: associative recall over a long context (default 1024 tokens). Each sequence holds one
// (key, value) pair token for each of K keys (default 8), scattered among noise tokens in the first part of the
// context; the last Q positions (default context/4) hold query tokens naming a key, and the target there is the
// answer token of that key's value (V values, default 4: a model that does not recall scores at best loss ln V
// and accuracy 1/V). Only query positions are scored, so the task cannot be solved without attending hundreds
// of positions back.
// Task (b), when a text file is given: byte-level next-byte prediction on random windows of the file (the last
// tenth held out for evaluation).
//
// Writes <out-dir>/<task>_loss.csv (step, then the training loss of every run) and, when gnuplot is installed,
// <out-dir>/<task>_loss.png.
#include <polyattn/nn/generator.hpp>
#include <polyattn/nn/gpt.hpp>
#include <polyattn/nn/optimizer.hpp>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include "cli.hpp"

namespace {

using polyattn::AttentionMethod;
using polyattn::Index;
using Clock = std::chrono::steady_clock;
constexpr double pi = 3.14159265358979323846;

struct Flags {
  int steps = 4000;
  int text_steps = 200;
  Index context = 1024;
  Index layers = 2;
  Index d_model = 64;
  Index heads = 4;
  std::vector<int> degrees{2};
  std::vector<Index> exact_windows{0};
  Index batch = 1;
  double learning_rate = 3e-3;
  std::uint64_t seed = 1;
  int log_every = 25;
  std::string out_dir = "train_gpt_out";
  std::string text_file;
  Index keys = 8;
  Index values = 4;
  Index queries = 0;  // 0: context / 4
};

constexpr int max_steps = 10'000'000;
constexpr Index max_context = 65536;
constexpr int max_degree = 6;  // degree 6 on 16-wide heads is already 74613 features per head
// Rough bound on the memory of one forward/backward pass, to refuse absurd sizes before allocating.
constexpr double max_activation_bytes = 16.0 * (1 << 30);

void usage(std::ostream& out) {
  out << "usage: train_gpt [options] [FILE]\n"
         "\n"
         "Trains the same small GPT from one seed with exact blocked attention and with the adjoint backend at\n"
         "each degree of --degrees, on associative recall and, given a text file, on its bytes. Evaluates every\n"
         "trained model with its own attention and with exact attention; after the text task, prints a sample.\n"
         "\n"
         "Options (default in parentheses):\n"
         "  --steps N        training steps of the recall task, 1.."
      << max_steps
      << " (4000)\n"
         "  --text-steps N   training steps of the text task, 1.."
      << max_steps
      << " (200)\n"
         "  --context N      tokens per sequence, 2.."
      << max_context
      << " (1024)\n"
         "  --layers N       transformer blocks, 1..64 (2)\n"
         "  --d-model N      width of the residual stream, 1..4096 (64)\n"
         "  --heads N        attention heads, 1..256, must divide --d-model (4)\n"
         "  --degrees G,...  Taylor degrees of the adjoint runs, each 1.."
      << max_degree
      << ", at most 8 (2)\n"
         "  --exact-windows W,...\n"
         "                   exact windows of the adjoint runs, each 0.."
      << max_context
      << ", at most 8 (0: none): every degree runs\n"
         "                   once per window, with exp itself on the W keys nearest each query\n"
         "  --batch B        sequences per step, 1..4096 (1)\n"
         "  --lr X           peak learning rate, 1e-9..10 (0.003)\n"
         "  --seed S         seed of the model and the data, 0..2^62 (1)\n"
         "  --log-every N    progress line every N steps, 1.."
      << max_steps
      << " (25)\n"
         "  --out-dir DIR    where the CSV (and, with gnuplot, PNG) loss curves go; created if missing\n"
         "                   (train_gpt_out)\n"
         "  --keys K         recall keys, 1..1024 (8)\n"
         "  --values V       recall values, 2..1024 (4)\n"
         "  --queries Q      recall query positions, 1..context - keys (context / 4)\n"
         "  --text FILE      also train on the bytes of FILE (same as giving FILE as the last argument)\n"
         "  --help           this text\n";
}

// Returns false when the program should stop after printing the usage (--help); throws
// polyattn_examples::UsageError for a bad command line.
bool parse_flags(int argc, char** argv, Flags& flags) {
  using polyattn_examples::UsageError;
  polyattn_examples::Arguments args(argc, argv);
  while (args.next()) {
    if (args.is("-h") || args.is("--help")) {
      usage(std::cout);
      return false;
    }
    if (args.is("--steps")) flags.steps = args.integer<int>(1, max_steps);
    else if (args.is("--text-steps")) flags.text_steps = args.integer<int>(1, max_steps);
    else if (args.is("--context")) flags.context = args.integer<Index>(2, max_context);
    else if (args.is("--layers")) flags.layers = args.integer<Index>(1, 64);
    else if (args.is("--d-model")) flags.d_model = args.integer<Index>(1, 4096);
    else if (args.is("--heads")) flags.heads = args.integer<Index>(1, 256);
    else if (args.is("--degrees")) flags.degrees = args.integers<int>(1, max_degree, 8);
    else if (args.is("--exact-windows")) flags.exact_windows = args.integers<Index>(0, max_context, 8);
    else if (args.is("--batch")) flags.batch = args.integer<Index>(1, 4096);
    else if (args.is("--lr")) flags.learning_rate = args.real(1e-9, 10);
    else if (args.is("--seed")) flags.seed = args.integer<std::uint64_t>(0, 1LL << 62);
    else if (args.is("--log-every")) flags.log_every = args.integer<int>(1, max_steps);
    else if (args.is("--out-dir")) flags.out_dir = args.text("a directory");
    else if (args.is("--text")) flags.text_file = args.text("a text file");
    else if (args.is("--keys")) flags.keys = args.integer<Index>(1, 1024);
    else if (args.is("--values")) flags.values = args.integer<Index>(2, 1024);
    else if (args.is("--queries")) flags.queries = args.integer<Index>(1, max_context);
    else if (!args.is_option() && !args.current().empty() && flags.text_file.empty()) flags.text_file = args.current();
    else args.reject();
  }
  // Options that constrain each other.
  if (flags.d_model % flags.heads != 0)
    throw UsageError("--heads expects a divisor of --d-model " + std::to_string(flags.d_model) + ", got '" +
                     std::to_string(flags.heads) + "'");
  if (flags.queries == 0) flags.queries = std::max<Index>(1, flags.context / 4);
  if (flags.keys + flags.queries > flags.context)
    throw UsageError("--context expects at least --keys + --queries = " + std::to_string(flags.keys + flags.queries) +
                     ", got '" + std::to_string(flags.context) + "'");
  // Per token: logits, their gradient and softmax, and about 32 d_model-wide activations per block; per head and
  // block: the r x (d_h + 2) states of the widest feature map (features are formed in chunks).
  const int widest = *std::max_element(flags.degrees.begin(), flags.degrees.end());
  const Index head_width = flags.d_model / flags.heads;
  const Index features = polyattn::feature_width(polyattn::FeatureMapKind::symmetric, head_width, widest,
                                                 polyattn::default_max_features);
  const Index vocab = flags.keys * flags.values + flags.keys + 16 + flags.values;
  const double layers = static_cast<double>(flags.layers);
  const double bytes =
      4.0 * static_cast<double>(flags.context) *
          (4.0 * static_cast<double>(std::max<Index>(vocab, 256)) + layers * 32.0 * static_cast<double>(flags.d_model)) +
      4.0 * 4.0 * layers * static_cast<double>(flags.heads) * static_cast<double>(features) *
          static_cast<double>(head_width + 2);
  if (features > polyattn::default_max_features)
    throw UsageError("--degrees expects degrees with at most " + std::to_string(polyattn::default_max_features) +
                     " features for heads of width --d-model / --heads = " + std::to_string(head_width) +
                     ", got degree " + std::to_string(widest));
  if (bytes > max_activation_bytes)
    throw UsageError("--context " + std::to_string(flags.context) + " with --d-model, --heads, --layers, --degrees, "
                     "--keys and --values as given needs about " + std::to_string(std::lround(bytes / (1 << 30))) +
                     " GiB per step, expected at most " + std::to_string(std::lround(max_activation_bytes / (1 << 30))) +
                     " GiB");
  return true;
}

// One training or evaluation example: input ids and per-position targets (-1 = not scored).
struct Example {
  std::vector<Index> tokens, targets;
};

// Associative recall. Ids: pair tokens key * values + value, then query tokens (one per key), noise tokens and
// answer tokens (one per value); see the file comment.
class RecallTask {
 public:
  static constexpr Index noise = 16;
  RecallTask(Index context, Index keys, Index values, Index queries)
      : context_(context), keys_(keys), values_(values), queries_(queries) {
    if (keys_ < 1 || values_ < 2 || queries_ < 1 || context_ < keys_ + queries_)
      throw std::invalid_argument("the recall task needs --keys >= 1, --values >= 2, --queries >= 1 and --context >= keys + queries");
  }
  Index vocab() const { return keys_ * values_ + keys_ + noise + values_; }
  Index values() const { return values_; }
  Example sample(std::mt19937_64& rng) const {
    const Index query_base = keys_ * values_, noise_base = query_base + keys_, answer_base = noise_base + noise;
    Example ex;
    ex.tokens.resize(static_cast<std::size_t>(context_));
    ex.targets.assign(static_cast<std::size_t>(context_), -1);
    const Index memory = context_ - queries_;
    std::uniform_int_distribution<Index> noise_token(0, noise - 1), value(0, values_ - 1), key(0, keys_ - 1);
    for (Index i = 0; i < memory; ++i) ex.tokens[static_cast<std::size_t>(i)] = noise_base + noise_token(rng);
    std::vector<Index> positions(static_cast<std::size_t>(memory));
    for (Index i = 0; i < memory; ++i) positions[static_cast<std::size_t>(i)] = i;
    std::shuffle(positions.begin(), positions.end(), rng);
    std::vector<Index> value_of(static_cast<std::size_t>(keys_));
    for (Index k = 0; k < keys_; ++k) {
      value_of[static_cast<std::size_t>(k)] = value(rng);
      ex.tokens[static_cast<std::size_t>(positions[static_cast<std::size_t>(k)])] =
          k * values_ + value_of[static_cast<std::size_t>(k)];
    }
    for (Index i = memory; i < context_; ++i) {
      const Index k = key(rng);
      ex.tokens[static_cast<std::size_t>(i)] = query_base + k;
      ex.targets[static_cast<std::size_t>(i)] = answer_base + value_of[static_cast<std::size_t>(k)];
    }
    return ex;
  }

 private:
  Index context_, keys_, values_, queries_;
};

// Byte-level language modelling on random windows of a file.
class TextTask {
 public:
  // Reads the file; a missing, unreadable or too short file is a UsageError naming --text.
  TextTask(const std::string& path, Index context) : context_(context) {
    errno = 0;
    std::ifstream in(path, std::ios::binary);
    const int open_error = errno;
    std::error_code ignored;
    const bool directory = std::filesystem::is_directory(path, ignored);
    if (!in || directory)
      throw polyattn_examples::UsageError(
          "--text expects a readable file, got '" + path + "' (" +
          (directory ? "a directory" : open_error ? std::strerror(open_error) : "cannot open") + ")");
    bytes_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    split_ = bytes_.size() * 9 / 10;
    if (split_ < static_cast<std::size_t>(context_) + 2 || bytes_.size() - split_ < static_cast<std::size_t>(context_) + 2)
      throw polyattn_examples::UsageError("--text expects a file of more than " + std::to_string(10 * (context_ + 2)) +
                                          " bytes for --context " + std::to_string(context_) + ", got '" + path +
                                          "' (" + std::to_string(bytes_.size()) + " bytes)");
  }
  Index vocab() const { return 256; }
  Example sample(std::mt19937_64& rng, bool held_out) const {
    const std::size_t begin = held_out ? split_ : 0, end = held_out ? bytes_.size() : split_;
    const std::size_t start =
        std::uniform_int_distribution<std::size_t>(begin, end - static_cast<std::size_t>(context_) - 1)(rng);
    Example ex;
    for (Index i = 0; i < context_; ++i) {
      ex.tokens.push_back(static_cast<unsigned char>(bytes_[start + static_cast<std::size_t>(i)]));
      ex.targets.push_back(static_cast<unsigned char>(bytes_[start + static_cast<std::size_t>(i) + 1]));
    }
    return ex;
  }

 private:
  Index context_;
  std::string bytes_;
  std::size_t split_ = 0;
};

struct RunResult {
  std::string label;
  std::vector<double> losses;
  double seconds_per_step = 0;
  double eval_loss = 0, eval_accuracy = 0;
  // The same weights evaluated with exact (blocked) attention.
  double exact_eval_loss = 0, exact_eval_accuracy = 0;
  // Largest score radius over the layers in evaluation; the same over the pairs outside the exact window (equal
  // without one) and the certified polynomial error there.
  double radius = 0, far_radius = 0, poly_error = 0;
  Index exact_window = 0;
  // Text generated from the sample prompt with the trained attention (empty without a prompt).
  std::vector<Index> sample;
};

// Sample length: bytes of prompt and new bytes, within the context.
constexpr Index sample_prompt_bytes = 32, sample_new_bytes = 96;

// Mean loss and accuracy of `model` over `eval` (accuracy over the scored positions); with `result`, also the
// largest score radius of the attention layers, the largest over their far pairs (outside an exact window) and the
// certified polynomial error there.
std::pair<double, double> evaluate(polyattn::GPT<float>& model, const std::vector<Example>& eval,
                                   RunResult* result) {
  double loss = 0, correct = 0, scored = 0;
  for (const Example& ex : eval) {
    loss += model.forward(ex.tokens, ex.targets) / static_cast<double>(eval.size());
    Index n = 0;
    for (Index t : ex.targets) n += t >= 0;
    correct += model.accuracy() * static_cast<double>(n);
    scored += static_cast<double>(n);
    for (Index layer = 0; result && layer < model.config().layers; ++layer) {
      const polyattn::Certificate& certificate = model.attention(layer).forward_certificate();
      result->radius = std::max(result->radius, certificate.radius);
      if (certificate.far_radius > result->far_radius) {
        result->far_radius = certificate.far_radius;
        result->poly_error = certificate.poly_error;
      }
    }
  }
  return {loss, scored > 0 ? correct / scored : 0};
}

std::string format_seconds(double seconds) {
  char buffer[32];
  const int s = static_cast<int>(std::lround(seconds));
  std::snprintf(buffer, sizeof buffer, "%d:%02d", s / 60, s % 60);
  return buffer;
}

// Trains from the seed with `method` (Taylor degree `degree` and exact window `exact_window` when approximate),
// `flags.batch` examples from `next_train` per step, and evaluates on `eval`, with `method` and with exact
// attention; given a prompt, generates a sample after it with `method`.
RunResult train(const Flags& flags, Index vocab, AttentionMethod method, int degree, Index exact_window, int steps,
                const std::string& label, const std::function<Example(std::mt19937_64&)>& next_train,
                const std::vector<Example>& eval, const std::vector<Index>* sample_prompt) {
  polyattn::GPTConfig config;
  config.vocab_size = vocab;
  config.context = flags.context;
  config.d_model = flags.d_model;
  config.heads = flags.heads;
  config.layers = flags.layers;
  config.method = method;
  config.approximation.degree = degree;
  config.approximation.exact_window = exact_window;
  config.seed = flags.seed;
  polyattn::GPT<float> model(config);
  polyattn::AdamWOptions adam_options;
  adam_options.learning_rate = flags.learning_rate;
  adam_options.weight_decay = 0.01;
  const std::vector<polyattn::Parameter<float>*> parameters = model.parameters();
  polyattn::AdamW<float> adam(parameters, adam_options);
  std::mt19937_64 data_rng(polyattn::derive_seed(flags.seed, 77));  // same data stream for every run

  RunResult result;
  result.label = label;
  result.exact_window = exact_window;
  const int warmup = std::max(1, steps / 10);
  const float batch_mean = 1.0f / static_cast<float>(flags.batch);
  double train_seconds = 0, tokens = 0;
  for (int step = 1; step <= steps; ++step) {
    std::vector<Example> batch;
    for (Index b = 0; b < flags.batch; ++b) batch.push_back(next_train(data_rng));
    // linear warm-up, then cosine decay to a tenth of the peak rate
    const double progress = step <= warmup ? 0 : double(step - warmup) / std::max(1, steps - warmup);
    const double rate = step <= warmup ? flags.learning_rate * step / warmup
                                       : flags.learning_rate * (0.1 + 0.45 * (1 + std::cos(pi * progress)));
    adam.set_learning_rate(rate);
    const auto start = Clock::now();
    adam.zero_grad();
    double loss = 0;
    for (const Example& ex : batch) {
      loss += model.forward(ex.tokens, ex.targets) / static_cast<double>(flags.batch);
      model.backward();
      tokens += static_cast<double>(ex.tokens.size());
    }
    if (flags.batch > 1)
      for (polyattn::Parameter<float>* p : parameters) p->grad *= batch_mean;
    polyattn::clip_grad_norm(parameters, 1.0);
    adam.step();
    train_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    result.losses.push_back(loss);
    if (step % flags.log_every == 0 || step == steps) {
      const double per_step = train_seconds / step;
      std::printf("  [%-13s] step %5d/%d  loss %.4f  %8.0f tok/s  %7.1f ms/step  time left %s\n", label.c_str(),
                  step, steps, loss, tokens / train_seconds, 1e3 * per_step,
                  format_seconds(per_step * (steps - step)).c_str());
      std::fflush(stdout);
    }
  }
  result.seconds_per_step = train_seconds / steps;
  std::tie(result.eval_loss, result.eval_accuracy) = evaluate(model, eval, &result);
  // The generator decodes the polynomial layers without a window (polyattn::Generator refuses one).
  if (sample_prompt && exact_window == 0) {
    polyattn::GenerationOptions options;
    options.max_new_tokens = std::min(sample_new_bytes, flags.context + 1 - static_cast<Index>(sample_prompt->size()));
    options.temperature = 0.8;
    options.seed = flags.seed;
    polyattn::Generator<float> generator(model);
    result.sample = generator.generate(*sample_prompt, options);
  }
  model.set_attention_method(AttentionMethod::exact_blocked);
  std::tie(result.exact_eval_loss, result.exact_eval_accuracy) = evaluate(model, eval, nullptr);
  return result;
}

// Bytes as text on one line: printable ASCII as is, newline and tab escaped, every other byte as \xHH.
std::string escaped(const std::vector<Index>& bytes) {
  std::string text;
  for (const Index b : bytes) {
    if (b == '\n') text += "\\n";
    else if (b == '\t') text += "\\t";
    else if (b == '\\') text += "\\\\";
    else if (b >= 32 && b < 127) text += static_cast<char>(b);
    else {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", static_cast<unsigned>(b));
      text += hex;
    }
  }
  return text;
}

// Runs `command` (command[0] looked up in PATH) without a shell, so nothing in the arguments is interpreted, and
// waits for it. Returns its exit status; -1 if it did not exit normally; -2 with `spawn_error` set if it could
// not be started (ENOENT: not installed).
int run_program(const std::vector<std::string>& command, int& spawn_error) {
  std::vector<char*> argv;
  for (const std::string& argument : command) argv.push_back(const_cast<char*>(argument.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  spawn_error = posix_spawnp(&pid, argv[0], nullptr, nullptr, argv.data(), environ);
  if (spawn_error != 0) return -2;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Writes <out-dir>/<task>_loss.gp, a gnuplot script holding the smoothed curves as an inline data block, and
// runs `gnuplot -c <script> <png>` on absolute paths (so that no path can start with '-', '<' or '|', which
// gnuplot would read as an option or a pipe). The script names no path: it reads the PNG's from ARG1.
void plot_curves(const Flags& flags, const std::string& task, const std::vector<RunResult>& runs) {
  const std::filesystem::path dir = std::filesystem::absolute(flags.out_dir);
  const std::string png = (dir / (task + "_loss.png")).string(), script = (dir / (task + "_loss.gp")).string();
  std::ofstream gp(script);
  // Curves are smoothed over 1% of the steps: single-batch losses are too noisy to compare by eye.
  const std::size_t steps = runs.front().losses.size(), window = std::max<std::size_t>(1, steps / 100);
  gp << "# gnuplot -c " << task << "_loss.gp " << task << "_loss.png\n"
     << "set terminal png size 900,540 noenhanced\nset output ARG1\n"
     << "set datafile separator ','\nset key top right\nset grid\nset xlabel 'step'\n"
     << "set ylabel 'training loss (mean over " << window << " steps)'\n"
     << "set title '" << task << ": exact blocked vs adjoint attention, context " << flags.context << "'\n"
     << "$loss << EOD\n";
  for (std::size_t end = window; end <= steps; end += window) {
    gp << end;
    for (const RunResult& run : runs) {
      double sum = 0;
      for (std::size_t k = end - window; k < end; ++k) sum += run.losses[k];
      gp << ',' << sum / static_cast<double>(window);
    }
    gp << '\n';
  }
  gp << "EOD\nplot ";
  for (std::size_t r = 0; r < runs.size(); ++r)
    gp << (r ? ", " : "") << "$loss using 1:" << r + 2 << " with lines lw 2 title '" << runs[r].label << "'";
  gp << '\n';
  gp.close();
  if (!gp) throw std::runtime_error("cannot write '" + script + "'");
  int spawn_error = 0;
  const int status = run_program({"gnuplot", "-c", script, png}, spawn_error);
  if (status == 0)
    std::printf("  plot: %s\n", png.c_str());
  else if (status == -2 && spawn_error == ENOENT)
    std::printf("  gnuplot not found: skipping the PNG plot (install gnuplot-nox)\n");
  else if (status == -2)
    std::printf("  cannot start gnuplot (%s): no PNG written\n", std::strerror(spawn_error));
  else
    std::printf("  gnuplot failed on %s: no PNG written\n", script.c_str());
}

void write_curves(const Flags& flags, const std::string& task, const std::vector<RunResult>& runs) {
  const std::string csv = flags.out_dir + "/" + task + "_loss.csv";
  std::ofstream out(csv);
  if (!out) throw std::runtime_error("cannot write '" + csv + "'");
  out << "step";
  for (const RunResult& run : runs) out << ',' << run.label;
  out << '\n';
  for (std::size_t k = 0; k < runs.front().losses.size(); ++k) {
    out << k + 1;
    for (const RunResult& run : runs) out << ',' << run.losses[k];
    out << '\n';
  }
  out.close();
  if (!out) throw std::runtime_error("cannot write '" + csv + "'");
  std::printf("  loss curves: %s\n", csv.c_str());
  plot_curves(flags, task, runs);
}

// Trains and evaluates every run on one task and prints the comparison; with `sample_prompt`, also every run's
// sample after it.
void compare(const Flags& flags, const std::string& task, Index vocab, int steps,
             const std::function<Example(std::mt19937_64&)>& next_train, const std::vector<Example>& eval,
             const std::string& chance_note, const std::vector<Index>* sample_prompt = nullptr) {
  std::printf("\n== task: %s  (context %ld, %ld layers, d_model %ld, %ld heads, %d steps of %ld sequences, vocab %ld)\n",
              task.c_str(), static_cast<long>(flags.context), static_cast<long>(flags.layers),
              static_cast<long>(flags.d_model), static_cast<long>(flags.heads), steps,
              static_cast<long>(flags.batch), static_cast<long>(vocab));
  std::vector<RunResult> runs;
  runs.push_back(
      train(flags, vocab, AttentionMethod::exact_blocked, 0, 0, steps, "exact_blocked", next_train, eval, sample_prompt));
  for (const int degree : flags.degrees)
    for (const Index window : flags.exact_windows)
      runs.push_back(train(flags, vocab, AttentionMethod::adjoint, degree, window, steps,
                           "adjoint_g" + std::to_string(degree) + (window > 0 ? "_w" + std::to_string(window) : ""),
                           next_train, eval, sample_prompt));
  const auto tail_mean = [](const std::vector<double>& losses) {
    const std::size_t tail = std::max<std::size_t>(1, losses.size() / 10);
    double sum = 0;
    for (std::size_t k = losses.size() - tail; k < losses.size(); ++k) sum += losses[k];
    return sum / static_cast<double>(tail);
  };
  const RunResult& exact = runs.front();
  std::printf("  %-16s %11s %10s %9s %9s %16s %9s %8s %17s\n", "run", "train loss*", "eval loss", "loss gap",
              "eval acc", "deployed exact**", "ms/step", "speed-up", "R -> eps");
  for (const RunResult& run : runs) {
    char certificate[64] = "-";
    if (&run != &exact && run.exact_window > 0)
      std::snprintf(certificate, sizeof certificate, "%.1f/%.1f -> %.2g", run.far_radius, run.radius, run.poly_error);
    else if (&run != &exact)
      std::snprintf(certificate, sizeof certificate, "%.1f -> %.2g", run.radius, run.poly_error);
    char deployed[48];
    std::snprintf(deployed, sizeof deployed, "%.4f (%.1f%%)", run.exact_eval_loss, 100 * run.exact_eval_accuracy);
    std::printf("  %-16s %11.4f %10.4f %+8.1f%% %8.1f%% %16s %9.1f %7.2fx %17s\n", run.label.c_str(),
                tail_mean(run.losses), run.eval_loss, 100 * (run.eval_loss - exact.eval_loss) / exact.eval_loss,
                100 * run.eval_accuracy, deployed, 1e3 * run.seconds_per_step,
                exact.seconds_per_step / run.seconds_per_step, certificate);
  }
  std::printf("  (* mean of the last 10%% of steps; loss gap = (eval loss - exact eval loss) / exact eval loss;\n"
              "   ** eval loss (accuracy) of the same weights with exact blocked attention;\n"
              "   speed-up = exact ms/step / ms/step; R -> eps: largest score radius in evaluation and the certified\n"
              "   max |p(x) e^-x - 1| on [-R, R]; with an exact window (_wW) R_far/R -> eps, R_far the radius over the\n"
              "   pairs outside the window, where p is used; %s)\n",
              chance_note.c_str());
  if (sample_prompt) {
    std::printf("  samples (temperature 0.8, seed %llu, each run with the attention it trained with) after the held-out "
                "prompt \"%s\":\n",
                static_cast<unsigned long long>(flags.seed), escaped(*sample_prompt).c_str());
    for (const RunResult& run : runs)
      if (!run.sample.empty()) std::printf("  %-16s \"%s\"\n", run.label.c_str(), escaped(run.sample).c_str());
  }
  write_curves(flags, task, runs);
}

// Creates the output directory if needed and checks that files can be written into it.
void prepare_out_dir(const std::string& out_dir) {
  std::error_code error;
  std::filesystem::create_directories(out_dir, error);
  if (!error && !std::filesystem::is_directory(out_dir, error) && !error)
    error = std::make_error_code(std::errc::not_a_directory);
  const std::filesystem::path probe = std::filesystem::path(out_dir) / ".train_gpt_write_check";
  if (!error) {
    std::ofstream out(probe);
    out << "ok\n";
    out.close();
    if (!out) error = std::make_error_code(std::errc::permission_denied);
    std::error_code ignored;
    std::filesystem::remove(probe, ignored);
  }
  if (error)
    throw polyattn_examples::UsageError("--out-dir expects a writable directory, got '" + out_dir + "' (" +
                                        error.message() + ")");
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  std::optional<TextTask> text;
  try {
    // Every option, the text file and the output directory are checked before the first training step.
    if (!parse_flags(argc, argv, flags)) return 0;
    if (!flags.text_file.empty()) text.emplace(flags.text_file, flags.context);
    prepare_out_dir(flags.out_dir);
  } catch (const polyattn_examples::UsageError& e) {
    return polyattn_examples::usage_error("train_gpt", e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_gpt: %s\n", e.what());
    return 1;
  }
  try {
    const RecallTask recall(flags.context, flags.keys, flags.values, flags.queries);
    std::mt19937_64 eval_rng(polyattn::derive_seed(flags.seed, 99));
    std::vector<Example> recall_eval;
    for (int k = 0; k < 8; ++k) recall_eval.push_back(recall.sample(eval_rng));
    compare(flags, "recall", recall.vocab(), flags.steps, [&](std::mt19937_64& rng) { return recall.sample(rng); },
            recall_eval,
            "recall: without recall the best is loss ln " + std::to_string(recall.values()) + " = " +
                std::to_string(std::log(static_cast<double>(recall.values()))) + ", accuracy " +
                std::to_string(100.0 / static_cast<double>(recall.values())) + "%");

    if (text) {
      std::vector<Example> text_eval;
      for (int k = 0; k < 8; ++k) text_eval.push_back(text->sample(eval_rng, true));
      // The first bytes of a held-out window, at most half the context.
      const Index prompt_bytes = std::min(sample_prompt_bytes, flags.context / 2);
      const Example prompt_window = text->sample(eval_rng, true);
      const std::vector<Index> sample_prompt(prompt_window.tokens.begin(), prompt_window.tokens.begin() + prompt_bytes);
      compare(flags, "text", text->vocab(), flags.text_steps,
              [&](std::mt19937_64& rng) { return text->sample(rng, false); }, text_eval,
              "text: eval on the held-out last tenth of the file", &sample_prompt);
    } else {
      std::printf("\n(no text file given: pass one as the last argument to also train on bytes of it)\n");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_gpt: %s\n", e.what());
    return 1;
  }
}
