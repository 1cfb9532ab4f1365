/// \file extern_templates.hpp
/// Explicit instantiation declarations of polyattn's class templates for `float` and `double`.
///
/// Every translation unit that uses, say, `AdjointBackend<float>` otherwise instantiates and optimises the whole
/// class again: about 25 s of compile time per backend and scalar type at -O3. Including this header instead of
/// polyattn.hpp tells the compiler that the instantiations live elsewhere, in the `polyattn::compiled` library
/// (src/instantiations_*.cpp), so a file that only calls them compiles in seconds. Calls stay direct and
/// results are identical; only inlining across the library boundary is given up, which costs nothing measurable
/// for calls of this size.
///
/// \code
///   # CMake: link the compiled instantiations instead of (in addition to) the header-only target
///   target_link_libraries(my_app PRIVATE polyattn::compiled)
///   // C++: include this header (it includes polyattn.hpp)
///   #include <polyattn/extern_templates.hpp>
/// \endcode
/// The library must be compiled with the same architecture flags as the code that links it (Eigen's alignment
/// assumptions depend on them); polyattn builds it with the flags of the project that builds it.
#pragma once

#include "polyattn.hpp"

/// Declares (with `extern`) or defines (empty) the float and double instantiations of one class template.
#define POLYATTN_INSTANTIATE_CLASS(storage, name) \
  storage template class name<float>;             \
  storage template class name<double>;

/// The class templates polyattn instantiates for float and double, in data-flow order.
#define POLYATTN_FOR_EACH_ATTENTION_CLASS(apply, storage) \
  apply(storage, FeatureMap)                              \
  apply(storage, ExactAttention)                          \
  apply(storage, detail::PolynomialKernel)                \
  apply(storage, PolynomialAttention)                     \
  apply(storage, ExactReferenceBackend)                   \
  apply(storage, ExactBlockedBackend)                     \
  apply(storage, PaperBackend)                            \
  apply(storage, AdjointBackend)                          \
  apply(storage, GatheredKeysBackend)                     \
  apply(storage, MergedQKAttentionLayer)                  \
  apply(storage, ProjectedAttentionLayer)

#define POLYATTN_FOR_EACH_NN_CLASS(apply, storage) \
  apply(storage, Linear)                           \
  apply(storage, LayerNorm)                        \
  apply(storage, Activation)                       \
  apply(storage, MLP)                              \
  apply(storage, Embedding)                        \
  apply(storage, CrossEntropy)                     \
  apply(storage, SelfAttention)                    \
  apply(storage, Composition)                      \
  apply(storage, Residual)                         \
  apply(storage, SGD)                              \
  apply(storage, AdamW)                            \
  apply(storage, GPT)                              \
  apply(storage, Generator)

namespace polyattn {
POLYATTN_FOR_EACH_ATTENTION_CLASS(POLYATTN_INSTANTIATE_CLASS, extern)
POLYATTN_FOR_EACH_NN_CLASS(POLYATTN_INSTANTIATE_CLASS, extern)
}  // namespace polyattn
