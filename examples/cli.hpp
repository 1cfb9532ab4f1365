/// \file cli.hpp
/// Strict command-line parsing shared by the example programs (polyattn_demo, train_gpt, accuracy_frontier,
/// distributed_attention).
///
/// Every mistake is a UsageError whose message is one line naming the option, what it expects and what it got,
/// e.g. `--steps expects an integer in [1, 10000000], got '10abc'`; main() prints it with usage_error() and
/// exits with status 2. Numbers must be the whole argument (no trailing text, no blanks, no '+'), lie in the
/// option's range, and an option the program does not know is reported as unknown before any value is read.
///
/// Typical use:
///
///     polyattn_examples::Arguments args(argc, argv);
///     while (args.next()) {
///       if (args.is("--help")) { print_usage(std::cout); return 0; }
///       else if (args.is("--steps")) steps = args.integer<int>(1, 1000);
///       else args.reject();  // unknown option (or an unexpected positional argument)
///     }
#pragma once

#include <charconv>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

namespace polyattn_examples {

/// Exit status of a program given a bad command line.
inline constexpr int usage_exit_code = 2;

/// A mistake in the command line (or an input it names); the message is one line.
class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// `text` in single quotes, as messages show values.
inline std::string quoted(const std::string& text) { return "'" + text + "'"; }

inline std::string integer_range(long long lo, long long hi) {
  return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

inline std::string integer_list_range(long long lo, long long hi, std::size_t max_count) {
  return "a comma-separated list of 1 to " + std::to_string(max_count) + " integers in [" + std::to_string(lo) +
         ", " + std::to_string(hi) + "]";
}

inline std::string real_text(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", value);
  return buffer;
}

inline std::string real_range(double lo, double hi) {
  return "a number in [" + real_text(lo) + ", " + real_text(hi) + "]";
}

/// The whole of `text` as a decimal integer in [lo, hi]; otherwise a UsageError naming `option`.
inline long long parse_integer(const std::string& option, const std::string& text, long long lo, long long hi) {
  long long value = 0;
  const char* const end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || stop != end || value < lo || value > hi)
    throw UsageError(option + " expects " + integer_range(lo, hi) + ", got " + quoted(text));
  return value;
}

/// The whole of `text` as a finite decimal number in [lo, hi]; otherwise a UsageError naming `option`.
inline double parse_real(const std::string& option, const std::string& text, double lo, double hi) {
  double value = 0;
  const char* const end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || stop != end || !std::isfinite(value) || value < lo || value > hi)
    throw UsageError(option + " expects " + real_range(lo, hi) + ", got " + quoted(text));
  return value;
}

/// A comma-separated list of 1 to `max_count` integers in [lo, hi], e.g. "2,4"; no empty items.
inline std::vector<long long> parse_integer_list(const std::string& option, const std::string& text, long long lo,
                                                 long long hi, std::size_t max_count) {
  const std::string expected = integer_list_range(lo, hi, max_count);
  std::vector<long long> values;
  std::size_t begin = 0;
  while (true) {
    const std::size_t comma = text.find(',', begin);
    const std::size_t end = comma == std::string::npos ? text.size() : comma;
    try {
      values.push_back(parse_integer(option, text.substr(begin, end - begin), lo, hi));
    } catch (const UsageError&) {
      throw UsageError(option + " expects " + expected + ", got " + quoted(text));
    }
    if (values.size() > max_count) throw UsageError(option + " expects " + expected + ", got " + quoted(text));
    if (comma == std::string::npos) return values;
    begin = comma + 1;
  }
}

/// Walks argv. next() moves to the next argument; the caller compares it with is() and reads the option's
/// value with value(), integer(), real() or integers(), which consume the following argument. Because the
/// value is only read once the option is recognised, an unknown option is reported as such (reject()),
/// never as "needs a value".
class Arguments {
 public:
  Arguments(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) args_.emplace_back(argv[i]);
  }

  /// Moves to the next argument; false when there is none left.
  bool next() {
    if (next_ >= args_.size()) return false;
    current_ = args_[next_++];
    return true;
  }

  /// The current argument.
  const std::string& current() const { return current_; }
  bool is(const char* option) const { return current_ == option; }
  /// True for "-x" and "--xyz" (but not "-" alone, a conventional file name).
  bool is_option() const { return current_.size() > 1 && current_[0] == '-'; }

  /// The value of the current option (the next argument), described as `expected` if it is missing.
  std::string value(const std::string& expected) {
    if (next_ >= args_.size()) throw UsageError(current_ + " expects " + expected + ", got nothing");
    return args_[next_++];
  }

  /// The value as a non-empty string, e.g. a path.
  std::string text(const std::string& expected) {
    const std::string option = current_;
    std::string result = value(expected);
    if (result.empty()) throw UsageError(option + " expects " + expected + ", got ''");
    return result;
  }

  /// The value as an integer of type Int in [lo, hi].
  template <class Int>
  Int integer(long long lo, long long hi) {
    static_assert(std::is_integral_v<Int>);
    const std::string option = current_;
    return static_cast<Int>(parse_integer(option, value(integer_range(lo, hi)), lo, hi));
  }

  /// The value as a number in [lo, hi].
  double real(double lo, double hi) {
    const std::string option = current_;
    return parse_real(option, value(real_range(lo, hi)), lo, hi);
  }

  /// The value as a comma-separated list of integers of type Int in [lo, hi].
  template <class Int>
  std::vector<Int> integers(long long lo, long long hi, std::size_t max_count) {
    static_assert(std::is_integral_v<Int>);
    const std::string option = current_;
    std::vector<Int> result;
    for (long long v : parse_integer_list(option, value(integer_list_range(lo, hi, max_count)), lo, hi, max_count))
      result.push_back(static_cast<Int>(v));
    return result;
  }

  /// Throws the UsageError for an argument the program does not accept.
  [[noreturn]] void reject() const {
    if (is_option()) throw UsageError("unknown option " + quoted(current_));
    throw UsageError("unexpected argument " + quoted(current_));
  }

 private:
  std::vector<std::string> args_;
  std::string current_;
  std::size_t next_ = 0;
};

/// Prints the one-line message of a usage error to stderr and returns the exit status for main().
inline int usage_error(const char* program, const std::exception& error) {
  std::fprintf(stderr, "%s: %s (%s --help lists the options)\n", program, error.what(), program);
  return usage_exit_code;
}

}  // namespace polyattn_examples
