/// ile nn/serialization.hpp
/// Saving and loading a model's parameters in a versioned binary file.
///
/// **Format, version 1.** All integers little-endian, scalars in IEEE-754 little-endian:
/// | field            | bytes                      | content                                           |
/// |------------------|----------------------------|---------------------------------------------------|
/// | magic            | 8                          | `POLYATTN`                                        |
/// | version          | 4 (uint32)                 | 1                                                 |
/// | scalar size      | 4 (uint32)                 | 4 (float) or 8 (double)                           |
/// | count            | 8 (uint64)                 | number of parameters                              |
/// | per parameter    | 4 + len + 8 + 8 + size·s   | name length (uint32), name, rows, cols (uint64), values column-major |
/// | checksum         | 8 (uint64)                 | FNV-1a 64 of every preceding byte                 |
///
/// Loading checks, before touching any parameter, the magic number, version, scalar type, checksum, the file's
/// length, and that the file lists exactly the model's parameters: same count, and at each position the same
/// name and shape. Any failure throws std::invalid_argument naming the file and the first problem found, and
/// leaves every parameter as it was. Values are stored bit for bit, so save → load reproduces a model exactly.
/// Saving writes `<path>.tmp` and renames it over `path`, so an interrupted save never leaves a truncated file
/// under the final name.
///
/// \code
///   std::vector<polyattn::Parameter<float>*> parameters = model.parameters();
///   polyattn::save_parameters("gpt.bin", parameters);
///   polyattn::load_parameters("gpt.bin", parameters);   // throws, changing nothing, on any mismatch
/// \endcode
#pragma once

#include "parameter.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace polyattn {

/// The 8 bytes every parameter file starts with.
inline constexpr char parameter_file_magic[8] = {'P', 'O', 'L', 'Y', 'A', 'T', 'T', 'N'};
/// The format version this library writes and reads.
inline constexpr std::uint32_t parameter_file_version = 1;

namespace detail {

/// FNV-1a 64-bit hash: detects corrupted (flipped, truncated, extended) files; not a cryptographic check.
inline std::uint64_t fnv1a64(const std::string& bytes, std::size_t count) {
  std::uint64_t hash = 0xcbf29ce484222325ULL;
  for (std::size_t i = 0; i < count; ++i) {
    hash ^= static_cast<unsigned char>(bytes[i]);
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

/// Appends little-endian encodings to a byte string.
class ByteWriter {
 public:
  void bytes(const char* data, std::size_t count) { buffer_.append(data, count); }
  void u32(std::uint32_t value) { little_endian(value, 4); }
  void u64(std::uint64_t value) { little_endian(value, 8); }
  template <class T>
  void scalar(T value) {
    if constexpr (sizeof(T) == 4) {
      std::uint32_t bits;
      std::memcpy(&bits, &value, 4);
      u32(bits);
    } else {
      std::uint64_t bits;
      std::memcpy(&bits, &value, 8);
      u64(bits);
    }
  }
  std::string& buffer() { return buffer_; }

 private:
  void little_endian(std::uint64_t value, int count) {
    for (int i = 0; i < count; ++i) buffer_.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
  }
  std::string buffer_;
};

/// Reads little-endian encodings from a byte string; throws std::invalid_argument (naming the file and what
/// was being read) instead of reading past `end`.
class ByteReader {
 public:
  ByteReader(const std::string& buffer, std::size_t end, const std::string& where)
      : buffer_(buffer), end_(end), where_(where) {}

  std::size_t position() const { return position_; }
  std::size_t remaining() const { return end_ - position_; }

  void expect_available(std::size_t count, const char* what) const {
    if (count > remaining())
      throw std::invalid_argument(concat(where_, ": file truncated while reading ", what, " (needs ", count,
                                         " more bytes at offset ", position_, ", ", remaining(), " left)"));
  }
  std::string bytes(std::size_t count, const char* what) {
    expect_available(count, what);
    std::string out = buffer_.substr(position_, count);
    position_ += count;
    return out;
  }
  std::uint32_t u32(const char* what) { return static_cast<std::uint32_t>(little_endian(4, what)); }
  std::uint64_t u64(const char* what) { return little_endian(8, what); }
  template <class T>
  T scalar(const char* what) {
    T value;
    if constexpr (sizeof(T) == 4) {
      const std::uint32_t bits = u32(what);
      std::memcpy(&value, &bits, 4);
    } else {
      const std::uint64_t bits = u64(what);
      std::memcpy(&value, &bits, 8);
    }
    return value;
  }

 private:
  std::uint64_t little_endian(std::size_t count, const char* what) {
    expect_available(count, what);
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < count; ++i)
      value |= static_cast<std::uint64_t>(static_cast<unsigned char>(buffer_[position_ + i])) << (8 * i);
    position_ += count;
    return value;
  }

  const std::string& buffer_;
  std::size_t end_;
  std::size_t position_ = 0;
  std::string where_;
};

}  // namespace detail

/// The bytes of a version-1 parameter file holding `parameters` (values only, not gradients).
template <class T>
std::string serialize_parameters(const std::vector<Parameter<T>*>& parameters) {
  detail::static_check_scalar<T>();
  constexpr const char* where = "polyattn::serialize_parameters";
  detail::ByteWriter out;
  out.bytes(parameter_file_magic, sizeof(parameter_file_magic));
  out.u32(parameter_file_version);
  out.u32(static_cast<std::uint32_t>(sizeof(T)));
  out.u64(parameters.size());
  for (std::size_t k = 0; k < parameters.size(); ++k) {
    const Parameter<T>* p = parameters[k];
    detail::require(p != nullptr, where, "argument 'parameters' has a null pointer at index ", k);
    detail::require(p->name.size() <= std::numeric_limits<std::uint32_t>::max(), where, "parameter name at index ",
                    k, " is too long (", p->name.size(), " bytes)");
    out.u32(static_cast<std::uint32_t>(p->name.size()));
    out.bytes(p->name.data(), p->name.size());
    out.u64(static_cast<std::uint64_t>(p->rows()));
    out.u64(static_cast<std::uint64_t>(p->cols()));
    for (Index j = 0; j < p->cols(); ++j)
      for (Index i = 0; i < p->rows(); ++i) out.scalar(p->value(i, j));
  }
  out.u64(detail::fnv1a64(out.buffer(), out.buffer().size()));
  return std::move(out.buffer());
}

/// Sets every parameter's value from the bytes of a parameter file, after checking all of it (see the file
/// documentation); `source` names the bytes' origin in messages. Throws std::invalid_argument and changes
/// nothing on any problem.
template <class T>
void deserialize_parameters(const std::string& bytes, const std::vector<Parameter<T>*>& parameters,
                            const std::string& source = "<memory>") {
  detail::static_check_scalar<T>();
  const std::string where = detail::concat("polyattn::load_parameters('", source, "')");
  const auto fail = [&](const auto&... message) {
    throw std::invalid_argument(detail::concat(where, ": ", message...));
  };
  constexpr std::size_t header = sizeof(parameter_file_magic) + 4 + 4 + 8, checksum_bytes = 8;
  if (bytes.size() < sizeof(parameter_file_magic) ||
      bytes.compare(0, sizeof(parameter_file_magic), parameter_file_magic, sizeof(parameter_file_magic)) != 0)
    fail("not a polyattn parameter file (the magic number 'POLYATTN' is missing)");
  if (bytes.size() < header + checksum_bytes)
    fail("file truncated: ", bytes.size(), " bytes is shorter than the ", header + checksum_bytes,
         "-byte header and checksum");
  detail::ByteReader in(bytes, bytes.size() - checksum_bytes, where);
  in.bytes(sizeof(parameter_file_magic), "the magic number");
  const std::uint32_t version = in.u32("the version");
  if (version != parameter_file_version)
    fail("unsupported format version ", version, " (this library reads version ", parameter_file_version, ")");
  const std::uint32_t scalar_size = in.u32("the scalar size");
  if (scalar_size != sizeof(T))
    fail("the file stores ", scalar_size == 4 ? "float" : scalar_size == 8 ? "double" : "unknown", " (", scalar_size,
         "-byte) values, the model is ", sizeof(T) == 4 ? "float" : "double");
  detail::ByteReader tail(bytes, bytes.size(), where);
  tail.bytes(bytes.size() - checksum_bytes, "the contents");
  const std::uint64_t stored_checksum = tail.u64("the checksum");
  if (stored_checksum != detail::fnv1a64(bytes, bytes.size() - checksum_bytes))
    fail("checksum mismatch: the file is corrupted or truncated");
  const std::uint64_t count = in.u64("the parameter count");
  if (count != parameters.size())
    fail("the file holds ", count, " parameters, the model has ", parameters.size());
  std::vector<Matrix<T>> staged(parameters.size());
  for (std::size_t k = 0; k < parameters.size(); ++k) {
    const Parameter<T>* p = parameters[k];
    detail::require(p != nullptr, where.c_str(), "argument 'parameters' has a null pointer at index ", k);
    const std::string name = in.bytes(in.u32("a name length"), "a parameter name");
    if (name != p->name) fail("parameter ", k, " is '", name, "' in the file but '", p->name, "' in the model");
    const std::uint64_t rows = in.u64("a row count"), cols = in.u64("a column count");
    if (rows != static_cast<std::uint64_t>(p->rows()) || cols != static_cast<std::uint64_t>(p->cols()))
      fail("parameter '", name, "' is ", rows, "x", cols, " in the file but ", p->rows(), "x", p->cols(),
           " in the model");
    in.expect_available(static_cast<std::size_t>(rows * cols) * sizeof(T), "parameter values");
    staged[k].resize(p->rows(), p->cols());
    for (Index j = 0; j < p->cols(); ++j)
      for (Index i = 0; i < p->rows(); ++i) staged[k](i, j) = in.scalar<T>("parameter values");
  }
  if (in.remaining() != 0) fail(in.remaining(), " unexpected bytes after the last parameter");
  for (std::size_t k = 0; k < parameters.size(); ++k) parameters[k]->value.swap(staged[k]);
}

/// Writes `parameters` to the file `path` (through `<path>.tmp` and a rename). Throws std::runtime_error when
/// the file cannot be written.
template <class T>
void save_parameters(const std::string& path, const std::vector<Parameter<T>*>& parameters) {
  const std::string bytes = serialize_parameters(parameters);
  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      std::remove(temporary.c_str());
      throw std::runtime_error(detail::concat("polyattn::save_parameters: cannot write '", temporary, "'"));
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    throw std::runtime_error(detail::concat("polyattn::save_parameters: cannot rename '", temporary, "' to '", path,
                                            "'"));
  }
}

/// Sets every parameter's value from the file `path` written by save_parameters(). Throws std::runtime_error
/// when the file cannot be read and std::invalid_argument when it is not a matching, intact parameter file;
/// either way no parameter changes.
template <class T>
void load_parameters(const std::string& path, const std::vector<Parameter<T>*>& parameters) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(detail::concat("polyattn::load_parameters: cannot open '", path, "'"));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error(detail::concat("polyattn::load_parameters: error reading '", path, "'"));
  deserialize_parameters(bytes, parameters, path);
}

}  // namespace polyattn
