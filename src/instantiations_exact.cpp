// Explicit instantiations for polyattn::compiled: exact attention and features (see polyattn/extern_templates.hpp).
#include <polyattn/extern_templates.hpp>

namespace polyattn {
POLYATTN_INSTANTIATE_CLASS(, FeatureMap)
POLYATTN_INSTANTIATE_CLASS(, ExactAttention)
POLYATTN_INSTANTIATE_CLASS(, ExactReferenceBackend)
POLYATTN_INSTANTIATE_CLASS(, ExactBlockedBackend)
POLYATTN_INSTANTIATE_CLASS(, GatheredKeysBackend)
}  // namespace polyattn
