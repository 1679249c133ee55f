// CUDA kernels of the orthogonality penalties and NTK-CL feature losses (math in ../ortho_math.h):
// ATen matmul (cuBLAS) with the closed-form value and gradient around it.
#include <torch/library.h>

#include "../ortho_math.h"

namespace ntkcl_fast {

TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) { ortho::register_impls(m); }

}  // namespace ntkcl_fast
