// Explicit instantiations for polyattn::compiled: network layers, optimizers, the GPT and its generator (see
// polyattn/extern_templates.hpp).
#include <polyattn/extern_templates.hpp>

namespace polyattn {
POLYATTN_INSTANTIATE_CLASS(, Linear)
POLYATTN_INSTANTIATE_CLASS(, LayerNorm)
POLYATTN_INSTANTIATE_CLASS(, Activation)
POLYATTN_INSTANTIATE_CLASS(, MLP)
POLYATTN_INSTANTIATE_CLASS(, Embedding)
POLYATTN_INSTANTIATE_CLASS(, CrossEntropy)
POLYATTN_INSTANTIATE_CLASS(, SelfAttention)
POLYATTN_INSTANTIATE_CLASS(, Composition)
POLYATTN_INSTANTIATE_CLASS(, Residual)
POLYATTN_INSTANTIATE_CLASS(, SGD)
POLYATTN_INSTANTIATE_CLASS(, AdamW)
POLYATTN_INSTANTIATE_CLASS(, GPT)
POLYATTN_INSTANTIATE_CLASS(, Generator)
}  // namespace polyattn
