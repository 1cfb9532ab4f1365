/// ile nn/serialization.hpp
/// Saving and loading a model's parameters (and, for a GPT, its configuration) in a versioned binary file.
///
/// **Format, version 2.** All integers little-endian, scalars in IEEE-754 little-endian:
/// | field            | bytes                      | content                                           |
/// |------------------|----------------------------|---------------------------------------------------|
/// | magic            | 8                          | `POLYATTN`                                        |
/// | version          | 4 (uint32)                 | 2                                                 |
/// | scalar size      | 4 (uint32)                 | 4 (float) or 8 (double)                           |
/// | field count      | 4 (uint32)                 | number of model-configuration fields (0 for a bare parameter list) |
/// | per field        | 4 + len + 4 + len          | key length (uint32), key, value length (uint32), value (text) |
/// | count            | 8 (uint64)                 | number of parameters                              |
/// | per parameter    | 4 + len + 8 + 8 + size·s   | name length (uint32), name, rows, cols (uint64), values column-major |
/// | checksum         | 8 (uint64)                 | FNV-1a 64 of every preceding byte                 |
///
/// Version 1 (written before the configuration fields existed) is version 2 without the field count and fields;
/// it is still read, as a file with no configuration.
///
/// **Configuration.** A model that knows its configuration (GPT: heads, layers, widths, attention method of
/// every layer, ...; see GPT::checkpoint_fields()) stores it as text fields, and loading compares them with the
/// model's own, naming the first field that differs with both values. Parameter shapes alone do not pin a model
/// down (4 heads and 2 heads of the same width have the same weights but compute different functions). A file
/// with fields cannot be loaded without fields to check them against, and a file without fields cannot be
/// loaded into a model that has some: save and load a GPT with save_parameters(path, model) and
/// load_parameters(path, model) (gpt.hpp), a bare parameter list with the list overloads.
///
/// Loading checks, before touching any parameter, the magic number, version, scalar type, checksum, the file's
/// length, the configuration, that the file lists exactly the model's parameters (same count, and at each
/// position the same name and shape) and that every value is finite (a checkpoint holding NaN or infinity is
/// corrupt or comes from a diverged run). Any failure throws std::invalid_argument naming the file and the first
/// problem found, and leaves every parameter as it was. load_parameters() reads only regular files (a directory,
/// device or FIFO is refused with std::runtime_error before anything is read) and checks the header before
/// reading the rest. Values are stored bit for bit, so save → load reproduces a model exactly.
///
/// **Saving** refuses non-finite values (std::invalid_argument naming the parameter; the file on disk stays as it
/// was), then writes a uniquely named temporary file in the target's directory, flushes and fsyncs it, renames it
/// over `path` and fsyncs the directory. Concurrent saves to one path do not share a temporary, and on any failure
/// the temporary is removed and a previous file under `path` is left untouched.
///
/// \code
///   polyattn::save_parameters("gpt.bin", model);   // a GPT: parameters and configuration
///   polyattn::load_parameters("gpt.bin", model);   // throws, changing nothing, on any mismatch
///   std::vector<polyattn::Parameter<float>*> parameters = composition.parameters();
///   polyattn::save_parameters("layers.bin", parameters);   // any parameter list, no configuration
///   polyattn::load_parameters("layers.bin", parameters);
/// \endcode
#pragma once

#include "parameter.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace polyattn {

/// The 8 bytes every parameter file starts with.
inline constexpr char parameter_file_magic[8] = {'P', 'O', 'L', 'Y', 'A', 'T', 'T', 'N'};
/// The format version this library writes (it also reads version 1).
inline constexpr std::uint32_t parameter_file_version = 2;

/// A model's configuration as stored in a parameter file: (key, value) text fields in a fixed order, e.g.
/// {"heads", "4"}. Empty for a bare parameter list.
using ModelFields = std::vector<std::pair<std::string, std::string>>;

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

/// Bytes of the magic number, version and scalar size that open every parameter file.
inline constexpr std::size_t parameter_file_header = sizeof(parameter_file_magic) + 4 + 4;

/// Checks the magic number, version and scalar size at the start of `bytes` (which may be just the first
/// parameter_file_header bytes of a file) and returns the version; throws std::invalid_argument naming `where`.
template <class T>
std::uint32_t check_parameter_file_header(const std::string& bytes, const std::string& where) {
  const auto fail = [&](const auto&... message) {
    throw std::invalid_argument(concat(where, ": ", message...));
  };
  if (bytes.size() < sizeof(parameter_file_magic) ||
      bytes.compare(0, sizeof(parameter_file_magic), parameter_file_magic, sizeof(parameter_file_magic)) != 0)
    fail("not a polyattn parameter file (the magic number 'POLYATTN' is missing)");
  if (bytes.size() < parameter_file_header)
    fail("file truncated: ", bytes.size(), " bytes is shorter than the ", parameter_file_header, "-byte header");
  ByteReader in(bytes, parameter_file_header, where);
  in.bytes(sizeof(parameter_file_magic), "the magic number");
  const std::uint32_t version = in.u32("the version");
  if (version != 1 && version != parameter_file_version)
    fail("unsupported format version ", version, " (this library reads versions 1 and ", parameter_file_version,
         ")");
  const std::uint32_t scalar_size = in.u32("the scalar size");
  if (scalar_size != sizeof(T))
    fail("the file stores ", scalar_size == 4 ? "float" : scalar_size == 8 ? "double" : "unknown", " (", scalar_size,
         "-byte) values, the model is ", sizeof(T) == 4 ? "float" : "double");
  return version;
}

/// Throws std::invalid_argument (naming `where` and the parameter) unless every value of `p` is finite.
template <class T>
void require_finite_parameter(const std::string& where, const Parameter<T>& p, const std::string& consequence) {
  if (p.value.size() == 0 || (p.value.array() * T(0)).sum() == T(0)) return;
  for (Index j = 0; j < p.cols(); ++j)
    for (Index i = 0; i < p.rows(); ++i)
      if (!std::isfinite(p.value(i, j)))
        throw std::invalid_argument(concat(where, ": parameter '", p.name, "' has a non-finite value (",
                                           static_cast<double>(p.value(i, j)), ") at (", i, ", ", j, ")",
                                           consequence));
}

/// The first parameter of the list with a non-finite value, or nullptr.
template <class T>
const Parameter<T>* first_non_finite(const std::vector<Parameter<T>*>& parameters) {
  for (const Parameter<T>* p : parameters)
    if (p != nullptr && p->value.size() != 0 && !((p->value.array() * T(0)).sum() == T(0))) return p;
  return nullptr;
}

/// The bytes of a version-2 parameter file; `where` names the caller in messages.
template <class T>
std::string serialize(const std::vector<Parameter<T>*>& parameters, const ModelFields& fields, const char* where) {
  static_check_scalar<T>();
  ByteWriter out;
  out.bytes(parameter_file_magic, sizeof(parameter_file_magic));
  out.u32(parameter_file_version);
  out.u32(static_cast<std::uint32_t>(sizeof(T)));
  require(fields.size() <= std::numeric_limits<std::uint32_t>::max(), where, "too many configuration fields (",
          fields.size(), ")");
  out.u32(static_cast<std::uint32_t>(fields.size()));
  for (const auto& [key, value] : fields) {
    require(key.size() <= std::numeric_limits<std::uint32_t>::max() &&
                value.size() <= std::numeric_limits<std::uint32_t>::max(),
            where, "configuration field '", key.substr(0, 64), "' is too long");
    out.u32(static_cast<std::uint32_t>(key.size()));
    out.bytes(key.data(), key.size());
    out.u32(static_cast<std::uint32_t>(value.size()));
    out.bytes(value.data(), value.size());
  }
  out.u64(parameters.size());
  for (std::size_t k = 0; k < parameters.size(); ++k) {
    const Parameter<T>* p = parameters[k];
    require(p != nullptr, where, "argument 'parameters' has a null pointer at index ", k);
    require(p->name.size() <= std::numeric_limits<std::uint32_t>::max(), where, "parameter name at index ", k,
            " is too long (", p->name.size(), " bytes)");
    require_finite_parameter(where, *p, ": refusing to write a checkpoint that could not be loaded");
    out.u32(static_cast<std::uint32_t>(p->name.size()));
    out.bytes(p->name.data(), p->name.size());
    out.u64(static_cast<std::uint64_t>(p->rows()));
    out.u64(static_cast<std::uint64_t>(p->cols()));
    for (Index j = 0; j < p->cols(); ++j)
      for (Index i = 0; i < p->rows(); ++i) out.scalar(p->value(i, j));
  }
  out.u64(fnv1a64(out.buffer(), out.buffer().size()));
  return std::move(out.buffer());
}

/// Size in bytes of the file serialize() writes for `parameters` and `fields`.
template <class T>
std::uint64_t serialized_size(const std::vector<Parameter<T>*>& parameters, const ModelFields& fields) {
  std::uint64_t size = parameter_file_header + 4 + 8 + 8;
  for (const auto& [key, value] : fields) size += 8 + key.size() + value.size();
  for (const Parameter<T>* p : parameters)
    if (p != nullptr)
      size += 4 + p->name.size() + 16 + static_cast<std::uint64_t>(p->size()) * sizeof(T);
  return size;
}

/// "<message>: <strerror(error)>".
inline std::string with_errno(const std::string& message, int error) {
  return concat(message, ": ", std::strerror(error));
}

/// The directory holding `path` ("." for a bare file name).
inline std::string directory_of(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

/// A fresh temporary name next to `path`: `<path>.tmp.<pid>.<counter>.<clock>`. Names differ between calls in
/// one process (the counter) and between processes (the pid); save_parameters() also opens it with O_EXCL.
inline std::string temporary_path_for(const std::string& path) {
  static std::atomic<std::uint64_t> counter{0};
  const auto ticks = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return concat(path, ".tmp.", static_cast<long>(::getpid()), ".", counter.fetch_add(1), ".", std::hex,
                ticks & 0xFFFFFFFFu);
}

/// Writes `bytes` to `path` atomically and durably: a unique temporary in the same directory, written, fsynced,
/// renamed over `path`, then the directory fsynced. On failure before the rename, the temporary is removed and
/// `path` is untouched. Throws std::runtime_error naming `where`, the path and the system's reason.
inline void write_file_atomically(const std::string& path, const std::string& bytes, const char* where) {
  require(!path.empty(), where, "argument 'path' must be a file name, got an empty string");
  std::string temporary;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    temporary = temporary_path_for(path);
    fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    const int error = errno;
    if (fd < 0 && error != EEXIST)
      throw std::runtime_error(with_errno(
          concat(where, ": cannot create a temporary file for '", path, "' in directory '", directory_of(path), "'"),
          error));
  }
  if (fd < 0)
    throw std::runtime_error(concat(where, ": cannot create a temporary file for '", path,
                                    "': 100 unique names were all taken"));
  const auto abandon = [&](const std::string& step, int error) {
    if (fd >= 0) ::close(fd);
    ::unlink(temporary.c_str());
    throw std::runtime_error(
        with_errno(concat(where, ": ", step, " (writing '", path, "' through '", temporary, "'; '", path,
                          "' is unchanged)"),
                   error));
  };
  std::size_t written = 0;
  while (written < bytes.size()) {
    const ::ssize_t count = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (count < 0) {
      if (errno == EINTR) continue;
      abandon("cannot write the temporary file", errno);
    }
    written += static_cast<std::size_t>(count);
  }
  if (::fsync(fd) != 0) abandon("cannot flush the temporary file to disk", errno);
  const int closed = ::close(fd);
  fd = -1;
  if (closed != 0) abandon("cannot close the temporary file", errno);
  if (std::rename(temporary.c_str(), path.c_str()) != 0) abandon("cannot rename the temporary file", errno);
  const int directory = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (directory < 0 || (::fsync(directory) != 0 && errno != EINVAL)) {
    const int error = errno;
    if (directory >= 0) ::close(directory);
    throw std::runtime_error(with_errno(concat(where, ": wrote '", path, "' but cannot sync its directory '",
                                               directory_of(path), "', so the new file may not survive a crash"),
                                        error));
  }
  ::close(directory);
}

/// Reads the regular file `path` whole, checking its header (check_parameter_file_header<T>) before reading the
/// rest. Refuses non-regular files before reading anything, and files larger than twice `expected` (the size of
/// a matching checkpoint) plus 1 MiB before reading past the header: such a file cannot be a checkpoint of the
/// model, while a smaller one still reaches the precise messages of deserialize_parameters().
template <class T>
std::string read_parameter_file(const std::string& path, std::uint64_t expected, const std::string& where) {
  // O_NONBLOCK: opening a FIFO without a writer must not wait; it is refused below as non-regular.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  const int open_error = errno;
  if (fd < 0) throw std::runtime_error(with_errno(concat(where, ": cannot open the file"), open_error));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat status {};
  if (::fstat(fd, &status) != 0) {
    const int error = errno;
    throw std::runtime_error(with_errno(concat(where, ": cannot stat the file"), error));
  }
  if (!S_ISREG(status.st_mode))
    throw std::runtime_error(concat(where, ": expected a regular file, got ",
                                    S_ISDIR(status.st_mode)   ? "a directory"
                                    : S_ISFIFO(status.st_mode) ? "a FIFO (named pipe)"
                                    : S_ISCHR(status.st_mode)  ? "a character device"
                                    : S_ISBLK(status.st_mode)  ? "a block device"
                                    : S_ISSOCK(status.st_mode) ? "a socket"
                                                               : "a non-regular file"));
  const auto size = static_cast<std::uint64_t>(status.st_size);
  std::string bytes;
  const auto read_up_to = [&](std::uint64_t end) {
    while (bytes.size() < end) {
      char chunk[1 << 16];
      const std::size_t wanted = static_cast<std::size_t>(std::min<std::uint64_t>(sizeof(chunk), end - bytes.size()));
      const ::ssize_t count = ::read(fd, chunk, wanted);
      if (count < 0) {
        const int error = errno;
        if (error == EINTR) continue;
        throw std::runtime_error(with_errno(concat(where, ": error reading the file"), error));
      }
      if (count == 0)
        throw std::runtime_error(concat(where, ": the file shrank while being read (", bytes.size(), " of ", size,
                                        " bytes)"));
      bytes.append(chunk, static_cast<std::size_t>(count));
    }
  };
  if (size >= parameter_file_header) {
    read_up_to(parameter_file_header);
    check_parameter_file_header<T>(bytes, where);
  }
  if (size > 2 * expected + (1u << 20))
    throw std::invalid_argument(concat(where, ": the file is ", size, " bytes, far more than the ", expected,
                                       " bytes of a checkpoint of this model: not a checkpoint of it"));
  bytes.reserve(static_cast<std::size_t>(size));
  read_up_to(size);
  return bytes;
}

}  // namespace detail

/// The bytes of a version-2 parameter file holding `parameters` (values only, not gradients) and the model
/// configuration `fields` (empty for a bare list). Throws std::invalid_argument on a null pointer or a
/// non-finite value (naming the parameter).
template <class T>
std::string serialize_parameters(const std::vector<Parameter<T>*>& parameters, const ModelFields& fields = {}) {
  return detail::serialize(parameters, fields, "polyattn::serialize_parameters");
}

/// Sets every parameter's value from the bytes of a parameter file, after checking all of it (see the file
/// documentation) against `parameters` and the model configuration `fields`; `source` names the bytes' origin
/// in messages. Throws std::invalid_argument and changes nothing on any problem.
template <class T>
void deserialize_parameters(const std::string& bytes, const std::vector<Parameter<T>*>& parameters,
                            const std::string& source = "<memory>", const ModelFields& fields = {}) {
  detail::static_check_scalar<T>();
  const std::string where = detail::concat("polyattn::load_parameters('", source, "')");
  const auto fail = [&](const auto&... message) {
    throw std::invalid_argument(detail::concat(where, ": ", message...));
  };
  constexpr std::size_t checksum_bytes = 8;
  const std::uint32_t version = detail::check_parameter_file_header<T>(bytes, where);
  const std::size_t minimum = detail::parameter_file_header + (version >= 2 ? 4 : 0) + 8 + checksum_bytes;
  if (bytes.size() < minimum)
    fail("file truncated: ", bytes.size(), " bytes is shorter than the ", minimum, "-byte header and checksum");
  detail::ByteReader tail(bytes, bytes.size(), where);
  tail.bytes(bytes.size() - checksum_bytes, "the contents");
  const std::uint64_t stored_checksum = tail.u64("the checksum");
  if (stored_checksum != detail::fnv1a64(bytes, bytes.size() - checksum_bytes))
    fail("checksum mismatch: the file is corrupted or truncated");
  detail::ByteReader in(bytes, bytes.size() - checksum_bytes, where);
  in.bytes(detail::parameter_file_header, "the header");

  ModelFields stored;
  if (version >= 2) {
    const std::uint32_t field_count = in.u32("the configuration field count");
    in.expect_available(static_cast<std::size_t>(field_count) * 8, "the configuration fields");
    for (std::uint32_t f = 0; f < field_count; ++f) {
      std::string key = in.bytes(in.u32("a configuration key length"), "a configuration key");
      std::string value = in.bytes(in.u32("a configuration value length"), "a configuration value");
      stored.emplace_back(std::move(key), std::move(value));
    }
  }
  const auto text = [](const ModelFields& list) {
    std::string out;
    for (const auto& [key, value] : list) out += (out.empty() ? "" : ", ") + key + " = " + value;
    return out;
  };
  if (!stored.empty() && fields.empty())
    fail("the file stores a model configuration (", text(stored),
         ") but none was given to check it against: load it with load_parameters(path, model)");
  if (stored.empty() && !fields.empty())
    fail("the file stores no model configuration (it was saved from a bare parameter list or by version 1), so "
         "it cannot be checked against this model's (",
         text(fields), "): load it with load_parameters(path, model.parameters())");
  for (const auto& [key, value] : fields) {
    std::size_t f = 0;
    while (f < stored.size() && stored[f].first != key) ++f;
    if (f == stored.size())
      fail("model configuration mismatch: '", key, "' is missing in the file but ", value, " in the model");
    if (stored[f].second != value)
      fail("model configuration mismatch: '", key, "' is ", stored[f].second, " in the file but ", value,
           " in the model");
  }
  for (const auto& [key, value] : stored) {
    std::size_t f = 0;
    while (f < fields.size() && fields[f].first != key) ++f;
    if (f == fields.size())
      fail("model configuration mismatch: '", key, "' is ", value, " in the file but missing in the model");
  }

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
      for (Index i = 0; i < p->rows(); ++i) {
        const T value = in.scalar<T>("parameter values");
        if (!std::isfinite(value))
          fail("parameter '", name, "' has a non-finite value (", static_cast<double>(value), ") at (", i, ", ", j,
               "): the checkpoint is corrupt or comes from a diverged run");
        staged[k](i, j) = value;
      }
  }
  if (in.remaining() != 0) fail(in.remaining(), " unexpected bytes after the last parameter");
  for (std::size_t k = 0; k < parameters.size(); ++k) parameters[k]->value.swap(staged[k]);
}

/// Writes `parameters` (and the model configuration `fields`) to the file `path` atomically (see the file
/// documentation). Throws std::invalid_argument on a non-finite value and std::runtime_error when the file
/// cannot be written; either way a file already under `path` is left as it was.
template <class T>
void save_parameters(const std::string& path, const std::vector<Parameter<T>*>& parameters,
                     const ModelFields& fields = {}) {
  const std::string where = detail::concat("polyattn::save_parameters('", path, "')");
  detail::write_file_atomically(path, detail::serialize(parameters, fields, where.c_str()), where.c_str());
}

/// Sets every parameter's value from the file `path` written by save_parameters() with the same `fields`.
/// Throws std::runtime_error when the file cannot be read or is not a regular file, and std::invalid_argument
/// when it is not a matching, intact parameter file; either way no parameter changes.
template <class T>
void load_parameters(const std::string& path, const std::vector<Parameter<T>*>& parameters,
                     const ModelFields& fields = {}) {
  const std::string where = detail::concat("polyattn::load_parameters('", path, "')");
  const std::string bytes = detail::read_parameter_file<T>(path, detail::serialized_size(parameters, fields), where);
  deserialize_parameters(bytes, parameters, path, fields);
}

}  // namespace polyattn
