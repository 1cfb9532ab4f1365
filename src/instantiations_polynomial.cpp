// Explicit instantiations for polyattn::compiled: the polynomial forward and its adjoint (see polyattn/extern_templates.hpp).
#include <polyattn/extern_templates.hpp>

namespace polyattn {
POLYATTN_INSTANTIATE_CLASS(, detail::PolynomialKernel)
POLYATTN_INSTANTIATE_CLASS(, PolynomialAttention)
POLYATTN_INSTANTIATE_CLASS(, AdjointBackend)
}  // namespace polyattn
