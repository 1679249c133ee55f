// Orthogonality penalties and NTK-CL feature losses: forward value and closed-form backward,
// shared by the CPU (cpu/ortho.cpp) and CUDA (cuda/ortho.cu) registrations.
//
// The matrix products go to ATen (MKL/oneDNN on CPU, cuBLAS on CUDA); everything around them is
// closed form: feature orthogonality, the contrastive term and cross orthogonality return the
// small B x K / N x N / r x s products (and norms, log-sum-exps) from the forward for their
// backward (gram orthogonality: W W^T - I); the projection residual recomputes its two. The
// projection residual never forms the B x D residual nor a D x D matrix (its value and gradient
// use only f @ U [B, r] and U^T U [r, r]).
// Math in fp32, fp64 when an input is fp64; gradients are rounded once to each input's dtype.
// Row normalization is x / max(||x||, kEps), kEps = 1e-12 (torch.nn.functional.normalize).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

namespace ntkcl_fast {
namespace ortho {

constexpr double kEps = 1e-12;

inline at::ScalarType acc_type(std::initializer_list<at::ScalarType> types) {
  for (auto t : types)
    if (t == at::kDouble) return at::kDouble;
  return at::kFloat;
}

inline at::ScalarType acc_type_of(at::TensorList a, at::TensorList b = {}) {
  for (const auto& t : a)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  for (const auto& t : b)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

inline void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating, got ", t.scalar_type());
}

// Row-normalized copy and max(||x||, eps) per row (both in the math dtype). Dividing (not
// multiplying by a reciprocal) keeps x / ||x|| exact where it can be, as F.normalize does.
struct Normalized {
  at::Tensor x, norm;
};

inline Normalized normalize_rows(const at::Tensor& x) {
  at::Tensor norm = x.norm(2, {1}, /*keepdim=*/true).clamp_min(kEps);
  return {x / norm, norm};
}

// Gradient of x -> x / max(||x||, eps) given the gradient dn at the normalized rows n:
// (dn - n * <dn, n>) / ||x|| when ||x|| > eps, dn / eps otherwise (the clamp has zero slope).
inline at::Tensor normalize_backward(const at::Tensor& dn, const Normalized& n) {
  at::Tensor live = n.norm.gt(kEps);
  at::Tensor dot = (dn * n.x).sum(1, true);
  return (dn - n.x * (dot * live)) / n.norm;
}

inline at::Tensor zero_d(const at::Tensor& like, at::ScalarType acc) {
  return at::zeros({}, like.options().dtype(acc));
}

// ---------------------------------------------------------------- feature orthogonality
// Forward: (value, S, ||f||, ||p||) with S = n(f) n(p)^T [B, K] and the clamped row norms
// max(||x||, eps) (ones when not normalizing), all in the math dtype. The backward takes S and
// the norms back instead of recomputing them: two GEMMs in the backward, three in all.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_orthogonality(
    const at::Tensor& features, const at::Tensor& prototypes, bool normalize, bool mean) {
  check_matrix(features, "features");
  check_matrix(prototypes, "prototypes");
  TORCH_CHECK(features.size(1) == prototypes.size(1), "features and prototypes must have the same columns");
  const auto acc = acc_type({features.scalar_type(), prototypes.scalar_type()});
  const auto opts = features.options().dtype(acc);
  const int64_t b = features.size(0), k = prototypes.size(0);
  if (features.numel() == 0 || prototypes.numel() == 0)
    return {zero_d(features, acc), at::zeros({b, k}, opts), at::ones({b}, opts), at::ones({k}, opts)};
  at::Tensor f = features.to(acc), p = prototypes.to(acc), nf, np;
  // S = (f p^T) / (|f| |p|^T): the raw product scaled in place, so no normalized B x D / K x D
  // copies are written (at D 2304 those and their page faults were 0.2-0.4 ms of a 4 ms call)
  at::Tensor s = at::mm(f, p.t());
  if (normalize) {
    nf = f.norm(2, {1}).clamp_min(kEps);
    np = p.norm(2, {1}).clamp_min(kEps);
    s.div_(nf.unsqueeze(1)).div_(np.unsqueeze(0));
  } else {
    nf = at::ones({b}, opts);
    np = at::ones({k}, opts);
  }
  at::Tensor v = s.square().sum();
  if (mean) v = v / static_cast<double>(s.numel());
  return {v, s, nf, np};
}

// With G = dL/dS = c S (c = 2 go, / (B K) for the mean) and n = x / |x|:
//   df = (G / |p|) p / |f| - live_f * rowsum(G S) / |f|^2 * f     (dp likewise with G^T)
// i.e. one scaled copy of f and one addmm_ into it; no normalized copies, no product recomputed.
// A side that needs no gradient costs nothing and comes back empty.
inline std::tuple<at::Tensor, at::Tensor> feature_orthogonality_backward(
    const at::Tensor& grad_output, const at::Tensor& s, const at::Tensor& f_norm, const at::Tensor& p_norm,
    const at::Tensor& features, const at::Tensor& prototypes, bool normalize, bool mean, bool features_grad,
    bool prototypes_grad) {
  const auto acc = acc_type({features.scalar_type(), prototypes.scalar_type()});
  at::Tensor df = features.new_empty({0}), dp = prototypes.new_empty({0});
  if (features.numel() == 0 || prototypes.numel() == 0) {
    if (features_grad) df = at::zeros_like(features);
    if (prototypes_grad) dp = at::zeros_like(prototypes);
    return {df, dp};
  }
  TORCH_CHECK(s.dim() == 2 && s.size(0) == features.size(0) && s.size(1) == prototypes.size(0),
              "s must have shape [B, K]");
  const double c = 2.0 / (mean ? static_cast<double>(features.size(0) * prototypes.size(0)) : 1.0);
  at::Tensor go = grad_output.to(acc) * c;
  at::Tensor f = features.to(acc), p = prototypes.to(acc), sa = s.to(acc);
  if (!normalize) {
    at::Tensor g = sa * go;
    if (features_grad) df = at::mm(g, p);
    if (prototypes_grad) dp = at::mm(g.t(), f);
  } else {
    at::Tensor inv_f = f_norm.to(acc).reciprocal(), inv_p = p_norm.to(acc).reciprocal();
    at::Tensor w = sa * (inv_f * go).unsqueeze(1) * inv_p.unsqueeze(0);
    at::Tensor s2 = sa.square();
    const at::Tensor zero = at::zeros({}, sa.options());
    if (features_grad) {
      at::Tensor coef_f = at::where(f_norm.gt(kEps), s2.sum(1) * inv_f.square(), zero) * (-go);
      df = (f * coef_f.unsqueeze(1)).addmm_(w, p);
    }
    if (prototypes_grad) {
      at::Tensor coef_p = at::where(p_norm.gt(kEps), s2.sum(0) * inv_p.square(), zero) * (-go);
      dp = (p * coef_p.unsqueeze(1)).addmm_(w.t(), f);
    }
  }
  return {features_grad ? df.to(features.scalar_type()) : df, prototypes_grad ? dp.to(prototypes.scalar_type()) : dp};
}

// ---------------------------------------------------------------- projection residual
// r = f - f U U^T, P = f U [B, r], M = U^T U [r, r]:
//   sum(r)    = sum(f) - <colsum(P), rowsum(U)>           (1 = ones)
//   sum(r^2)  = sum(f^2) - 2 sum(P^2) + <P^T P, M>
inline at::Tensor projection_residual(const at::Tensor& features, const at::Tensor& basis, bool normalize,
                                      bool sumsq) {
  check_matrix(features, "features");
  check_matrix(basis, "basis");
  TORCH_CHECK(basis.size(0) == features.size(1), "basis must have D rows");
  const auto acc = acc_type({features.scalar_type(), basis.scalar_type()});
  if (features.numel() == 0) return zero_d(features, acc);
  at::Tensor f = features.to(acc), u = basis.to(acc);
  if (normalize) f = normalize_rows(f).x;
  at::Tensor pr = at::mm(f, u);
  if (!sumsq) return f.sum() - (pr.sum(0) * u.sum(0)).sum();
  at::Tensor m = at::mm(u.t(), u);
  return f.square().sum() - 2.0 * pr.square().sum() + (at::mm(pr.t(), pr) * m).sum();
}

// d sum(r)   / df = 1 - U U^T 1 (the same row for every sample)
// d sum(r)   / dU = -(s (U^T 1)^T + 1 (U^T s)^T), s = f^T 1
// d sum(r^2) / df = 2 (f - P (2I - M) U^T)
// d sum(r^2) / dU = 2 f^T P (M - 2I) + 2 U P^T P
inline std::tuple<at::Tensor, at::Tensor> projection_residual_backward(const at::Tensor& grad_output,
                                                                        const at::Tensor& features,
                                                                        const at::Tensor& basis, bool normalize,
                                                                        bool sumsq, bool features_grad,
                                                                        bool basis_grad) {
  const auto acc = acc_type({features.scalar_type(), basis.scalar_type()});
  at::Tensor df = features.new_empty({0}), du = basis.new_empty({0});
  if (features.numel() == 0) {
    if (features_grad) df = at::zeros_like(features);
    if (basis_grad) du = at::zeros_like(basis);
    return {df, du};
  }
  Normalized f{features.to(acc), {}};
  at::Tensor u = basis.to(acc);
  if (normalize) f = normalize_rows(f.x);
  at::Tensor go = grad_output.to(acc);
  if (!sumsq) {
    at::Tensor ones_u = u.sum(0);                    // U^T 1 [r]
    if (features_grad) {
      at::Tensor row = 1.0 - at::mv(u, ones_u);      // [D]
      df = row.unsqueeze(0).expand_as(f.x) * go;
    }
    if (basis_grad) {
      at::Tensor s = f.x.sum(0);                     // [D]
      at::Tensor us = at::mv(u.t(), s);              // [r]
      du = -(at::outer(s, ones_u) + at::outer(at::ones_like(s), us)) * go;
    }
  } else {
    at::Tensor pr = at::mm(f.x, u);
    at::Tensor m = at::mm(u.t(), u);
    at::Tensor eye = at::eye(m.size(0), m.options());
    if (features_grad) df = 2.0 * (f.x - at::mm(at::mm(pr, 2.0 * eye - m), u.t())) * go;
    if (basis_grad)
      du = (2.0 * at::mm(f.x.t(), at::mm(pr, m - 2.0 * eye)) + 2.0 * at::mm(u, at::mm(pr.t(), pr))) * go;
  }
  if (features_grad) {
    if (normalize) df = normalize_backward(df, f);
    df = df.to(features.scalar_type());
  }
  return {df, basis_grad ? du.to(basis.scalar_type()) : du};
}

// ---------------------------------------------------------------- gram orthogonality
// Forward: (value, [G_l = W_l W_l^T - I] in the math dtype), kept for the backward.
inline std::tuple<at::Tensor, std::vector<at::Tensor>> gram_orthogonality(at::TensorList weights, bool mean) {
  const auto acc = acc_type_of(weights);
  TORCH_CHECK(!weights.empty(), "weights must not be empty");
  std::vector<at::Tensor> grams, terms;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_matrix(weights[i], "weights[i]");
    const int64_t n = weights[i].size(0);
    if (n == 0) {
      grams.push_back(at::zeros({0, 0}, weights[i].options().dtype(acc)));
      continue;
    }
    at::Tensor w = weights[i].to(acc);
    at::Tensor g = at::mm(w, w.t());
    g.diagonal().sub_(1.0);
    at::Tensor term = g.square().sum();
    terms.push_back(mean ? term / static_cast<double>(g.numel()) : term);
    grams.push_back(g);
  }
  at::Tensor total = terms.empty() ? zero_d(weights[0], acc) : at::stack(terms).sum();
  return {total, grams};
}

// d/dW sum((W W^T - I)^2) = 4 (W W^T - I) W, with W W^T - I from the forward.
inline std::vector<at::Tensor> gram_orthogonality_backward(const at::Tensor& grad_output, at::TensorList grams,
                                                           at::TensorList weights, bool mean) {
  const auto acc = acc_type_of(weights);
  TORCH_CHECK(grams.size() == weights.size(), "grams and weights must have the same length");
  at::Tensor go = grad_output.to(acc);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& wi = weights[i];
    const int64_t n = wi.size(0);
    if (n == 0) {
      out.push_back(at::zeros_like(wi));
      continue;
    }
    TORCH_CHECK(grams[i].dim() == 2 && grams[i].size(0) == n && grams[i].size(1) == n, "grams[i] must be [N, N]");
    const double c = 4.0 / (mean ? static_cast<double>(n * n) : 1.0);
    out.push_back(at::mm(grams[i].to(acc) * (go * c), wi.to(acc)).to(wi.scalar_type()));
  }
  return out;
}

// ---------------------------------------------------------------- cross orthogonality
// Forward: (value, [P_l = old_l new_l^T] in the math dtype), the products kept for the backward.
inline std::tuple<at::Tensor, std::vector<at::Tensor>> cross_orthogonality(at::TensorList old_w, at::TensorList new_w,
                                                                           bool l1) {
  TORCH_CHECK(old_w.size() == new_w.size() && !old_w.empty(), "old and new must have the same, non-zero length");
  const auto acc = acc_type_of(old_w, new_w);
  std::vector<at::Tensor> products, terms;
  for (size_t i = 0; i < old_w.size(); ++i) {
    check_matrix(old_w[i], "old[i]");
    check_matrix(new_w[i], "new[i]");
    TORCH_CHECK(old_w[i].size(1) == new_w[i].size(1), "old[i] and new[i] must have the same columns");
    if (old_w[i].numel() == 0 || new_w[i].numel() == 0) {
      products.push_back(at::zeros({old_w[i].size(0), new_w[i].size(0)}, old_w[i].options().dtype(acc)));
      continue;
    }
    at::Tensor p = at::mm(old_w[i].to(acc), new_w[i].to(acc).t());
    terms.push_back(l1 ? p.abs().sum() : p.square().sum());
    products.push_back(p);
  }
  at::Tensor total = terms.empty() ? zero_d(old_w[0], acc) : at::stack(terms).sum();
  return {total, products};
}

// l1: dA = sign(P) B, dB = sign(P)^T A (sign(0) = 0, as autograd's abs); fro2: 2P in place of sign(P).
// A side whose flag is false gets an empty list (no GEMM for frozen old tasks' matrices).
inline std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cross_orthogonality_backward(
    const at::Tensor& grad_output, at::TensorList products, at::TensorList old_w, at::TensorList new_w, bool l1,
    bool old_grad, bool new_grad) {
  const auto acc = acc_type_of(old_w, new_w);
  TORCH_CHECK(products.size() == old_w.size() && old_w.size() == new_w.size(),
              "products, old and new must have the same length");
  at::Tensor go = grad_output.to(acc) * (l1 ? 1.0 : 2.0);
  std::vector<at::Tensor> d_old, d_new;
  for (size_t i = 0; i < old_w.size(); ++i) {
    if (old_w[i].numel() == 0 || new_w[i].numel() == 0) {
      if (old_grad) d_old.push_back(at::zeros_like(old_w[i]));
      if (new_grad) d_new.push_back(at::zeros_like(new_w[i]));
      continue;
    }
    at::Tensor p = products[i].to(acc);
    at::Tensor g = (l1 ? p.sign() : p) * go;
    if (old_grad) d_old.push_back(at::mm(g, new_w[i].to(acc)).to(old_w[i].scalar_type()));
    if (new_grad) d_new.push_back(at::mm(g.t(), old_w[i].to(acc)).to(new_w[i].scalar_type()));
  }
  return {d_old, d_new};
}

// ---------------------------------------------------------------- NTK-CL contrastive
// S = n n^T / t; value = -lse(S[pos]) + mean_i lse_{j != i}(S_ij); +inf when pos is empty.
struct Contrastive {
  Normalized f;
  at::Tensor s, pos, off_diag, lse_pos, lse_row;
  bool any_pos;
};

inline Contrastive contrastive_parts(const at::Tensor& features, const at::Tensor& labels, double temperature) {
  const auto acc = acc_type({features.scalar_type()});
  Contrastive c;
  c.f = normalize_rows(features.to(acc));
  const int64_t n = features.size(0);
  c.s = at::mm(c.f.x, c.f.x.t()) / temperature;
  c.off_diag = at::eye(n, labels.options().dtype(at::kBool)).logical_not();
  c.pos = labels.unsqueeze(1).eq(labels.unsqueeze(0)).logical_and(c.off_diag);
  c.any_pos = c.pos.any().item<bool>();
  const double ninf = -std::numeric_limits<double>::infinity();
  if (c.any_pos) c.lse_pos = at::logsumexp(c.s.masked_fill(c.pos.logical_not(), ninf).reshape({-1}), {0});
  c.lse_row = at::logsumexp(c.s.masked_fill(c.off_diag.logical_not(), ninf), {1});
  return c;
}

// Forward: (value, S [N, N], max(||f_i||, eps) [N], lse over pos [], row lse over j != i [N]),
// the last four in the math dtype and kept for the backward (lse over pos is -inf, and the value
// +inf, when no two rows share a label).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntkcl_contrastive(
    const at::Tensor& features, const at::Tensor& labels, double temperature) {
  check_matrix(features, "features");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0), "labels must have shape [N]");
  const auto acc = acc_type({features.scalar_type()});
  const auto opts = features.options().dtype(acc);
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t n = features.size(0);
  if (n == 0)
    return {at::full({}, inf, opts), at::zeros({0, 0}, opts), at::ones({0}, opts), at::full({}, -inf, opts),
            at::zeros({0}, opts)};
  Contrastive c = contrastive_parts(features, labels, temperature);
  at::Tensor norm = c.f.norm.reshape({n});
  if (!c.any_pos) return {at::full({}, inf, opts), c.s, norm, at::full({}, -inf, opts), c.lse_row};
  return {-c.lse_pos + c.lse_row.mean(), c.s, norm, c.lse_pos, c.lse_row};
}

// dL/dS = -softmax over pos + (1/N) row softmax over j != i; with M = (dS + dS^T) / t and
// n = f / |f|: dn = M n, <dn_i, n_i> = t rowsum(M o S)_i, so
//   df = (M / (|f_i| |f_j|)) f - live_i * t rowsum(M o S)_i / |f_i|^2 * f_i
// (one scaled copy of f and one addmm_ into it; S and the log-sum-exps come from the forward).
inline at::Tensor ntkcl_contrastive_backward(const at::Tensor& grad_output, const at::Tensor& s,
                                             const at::Tensor& f_norm, const at::Tensor& lse_pos,
                                             const at::Tensor& lse_row, const at::Tensor& features,
                                             const at::Tensor& labels, double temperature) {
  const int64_t n = features.size(0);
  if (n == 0) return at::zeros_like(features);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == n && s.size(1) == n, "s must have shape [N, N]");
  const auto acc = acc_type({features.scalar_type()});
  at::Tensor off_diag = at::eye(n, labels.options().dtype(at::kBool)).logical_not();
  at::Tensor pos = labels.unsqueeze(1).eq(labels.unsqueeze(0)).logical_and(off_diag);
  if (!pos.any().item<bool>()) return at::zeros_like(features);
  at::Tensor sa = s.to(acc), f = features.to(acc);
  at::Tensor zero = at::zeros({}, sa.options());
  at::Tensor p_pos = at::where(pos, (sa - lse_pos.to(acc)).exp(), zero);
  at::Tensor p_row = at::where(off_diag, (sa - lse_row.to(acc).unsqueeze(1)).exp(), zero);
  at::Tensor ds = (p_row / static_cast<double>(n) - p_pos) * grad_output.to(acc);
  at::Tensor m = (ds + ds.t()) / temperature;
  at::Tensor inv = f_norm.to(acc).reciprocal();
  at::Tensor coef = at::where(f_norm.gt(kEps), (m * sa).sum(1) * inv.square(), zero) * (-temperature);
  at::Tensor w = m * inv.unsqueeze(1) * inv.unsqueeze(0);
  return (f * coef.unsqueeze(1)).addmm_(w, f).to(features.scalar_type());
}

// The same ATen-based math serves both devices; cpu/ortho.cpp and cuda/ortho.cu register it.
inline void register_impls(torch::Library& m) {
  m.impl("feature_orthogonality", &feature_orthogonality);
  m.impl("feature_orthogonality_backward", &feature_orthogonality_backward);
  m.impl("projection_residual", &projection_residual);
  m.impl("projection_residual_backward", &projection_residual_backward);
  m.impl("gram_orthogonality", &gram_orthogonality);
  m.impl("gram_orthogonality_backward", &gram_orthogonality_backward);
  m.impl("cross_orthogonality", &cross_orthogonality);
  m.impl("cross_orthogonality_backward", &cross_orthogonality_backward);
  m.impl("ntkcl_contrastive", &ntkcl_contrastive);
  m.impl("ntkcl_contrastive_backward", &ntkcl_contrastive_backward);
}

}  // namespace ortho
}  // namespace ntkcl_fast
