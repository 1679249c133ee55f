// CPU kernels of the orthogonality penalties and NTK-CL feature losses (math in ../ortho_math.h):
// ATen matmul (MKL / oneDNN) with the closed-form value and gradient around it.
#include <torch/library.h>

#include "../ortho_math.h"

namespace ntkcl_fast {

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) {
  m.impl("feature_orthogonality", &ortho::feature_orthogonality);
  m.impl("feature_orthogonality_backward", &ortho::feature_orthogonality_backward);
  m.impl("projection_residual", &ortho::projection_residual);
  m.impl("projection_residual_backward", &ortho::projection_residual_backward);
  m.impl("gram_orthogonality", &ortho::gram_orthogonality);
  m.impl("gram_orthogonality_backward", &ortho::gram_orthogonality_backward);
  m.impl("cross_orthogonality", &ortho::cross_orthogonality);
  m.impl("cross_orthogonality_backward", &ortho::cross_orthogonality_backward);
  m.impl("ntkcl_contrastive", &ortho::ntkcl_contrastive);
  m.impl("ntkcl_contrastive_backward", &ortho::ntkcl_contrastive_backward);
}

}  // namespace ntkcl_fast
