// Kernels of the orthogonality penalties and NTK-CL feature losses (math in ../ortho_math.h).
// They are ATen compositions around matmul (MKL / oneDNN on CPU, cuBLAS on CUDA) with no device
// code of their own, so this one file registers them for both device types, and a build without
// nvcc still runs them on CUDA tensors.
// (Registering CompositeExplicitAutograd instead would cover every device with one line, but
// ntkcl_fast/_backend.py finds a backend by its CPU / CUDA kernel.)
#include <torch/library.h>

#include "../ortho_math.h"

namespace ntkcl_fast {

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) { ortho::register_impls(m); }
TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) { ortho::register_impls(m); }

}  // namespace ntkcl_fast
