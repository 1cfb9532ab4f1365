// Explicit instantiations for polyattn::compiled: the paper's backward and the attention layer forms (see polyattn/extern_templates.hpp).
#include <polyattn/extern_templates.hpp>

namespace polyattn {
POLYATTN_INSTANTIATE_CLASS(, PaperBackend)
POLYATTN_INSTANTIATE_CLASS(, MergedQKAttentionLayer)
POLYATTN_INSTANTIATE_CLASS(, ProjectedAttentionLayer)
}  // namespace polyattn
