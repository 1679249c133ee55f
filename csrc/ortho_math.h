// Orthogonality penalties and NTK-CL feature losses: forward value and closed-form backward as
// ATen compositions, registered once for CPU and CUDA tensors in cpu/ortho.cpp (they need no
// device code of their own).
//
// The matrix products go to ATen (MKL/oneDNN on CPU, cuBLAS on CUDA); everything around them is
// closed form: feature orthogonality and the contrastive term return the small B x K / N x N
// products (and norms, log-sum-exps) from the forward for their backward; gram and cross
// orthogonality return the derivative of the value in each layer's product (r x s, N x N), so
// their backward is one GEMM per layer and side; the projection residual recomputes its two. The
// projection residual never forms the B x D residual nor a D x D matrix (its value and gradient
// use only f @ U [B, r] and U^T U [r, r]).
// Math in fp32, fp64 when an input is fp64; gradients are rounded once to each input's dtype.
// Row normalization is x / max(||x||, kEps), kEps = 1e-12 (torch.nn.functional.normalize).
// No host syncs: every data-dependent case (no positive pair, clamped norms) is a device-side where.
// Bad arguments raise ValueError / TypeError naming the argument (TORCH_CHECK_VALUE / _TYPE).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <string>
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

inline void check_matrix(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating, got ", t.scalar_type());
}

inline std::string indexed(const char* name, size_t i) { return c10::str(name, "[", i, "]"); }

// Derivatives of one layer's value in its product, flattened and concatenated in list order (the
// layout the backward reads, on every backend); offsets[l] is where layer l starts.
inline std::vector<int64_t> flat_offsets(at::TensorList a, at::TensorList b) {
  std::vector<int64_t> offsets{0};
  for (size_t i = 0; i < a.size(); ++i) offsets.push_back(offsets.back() + a[i].size(0) * b[i].size(0));
  return offsets;
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
  TORCH_CHECK_VALUE(features.size(1) == prototypes.size(1), "features and prototypes must have the same number of "
                    "columns, got ", features.sizes(), " and ", prototypes.sizes());
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
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == features.size(0) && s.size(1) == prototypes.size(0),
                    "s must have shape [B, K] = [", features.size(0), ", ", prototypes.size(0), "], got ", s.sizes());
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
  TORCH_CHECK_VALUE(basis.size(0) == features.size(1), "basis must have D = ", features.size(1), " rows, got shape ",
                    basis.sizes());
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
// Forward: (value, dG) with dG the flat concatenation over layers of
//   d value / d (W_l W_l^T) = 4 c_l (W_l W_l^T - I)   [N_l, N_l], c_l = 1 / N_l^2 ("mean") or 1,
// in the math dtype; the backward is then dW_l = grad_output * dG_l W_l (one GEMM per layer).
inline std::tuple<at::Tensor, at::Tensor> gram_orthogonality(at::TensorList weights, bool mean) {
  TORCH_CHECK_VALUE(!weights.empty(), "weights must not be empty");
  for (size_t i = 0; i < weights.size(); ++i) check_matrix(weights[i], indexed("weights", i));
  const auto acc = acc_type_of(weights);
  std::vector<at::Tensor> parts, terms;
  for (const auto& wi : weights) {
    const int64_t n = wi.size(0);
    if (n == 0) continue;
    at::Tensor w = wi.to(acc);
    at::Tensor g = at::mm(w, w.t());
    g.diagonal().sub_(1.0);
    const double c = mean ? 1.0 / static_cast<double>(n * n) : 1.0;
    terms.push_back(g.square().sum() * c);
    parts.push_back((g * (4.0 * c)).reshape({-1}));
  }
  const auto opts = weights[0].options().dtype(acc);
  at::Tensor total = terms.empty() ? at::zeros({}, opts) : at::stack(terms).sum();
  return {total, parts.empty() ? at::zeros({0}, opts) : at::cat(parts)};
}

inline std::vector<at::Tensor> gram_orthogonality_backward(const at::Tensor& grad_output, const at::Tensor& d_gram,
                                                           at::TensorList weights) {
  const auto offsets = flat_offsets(weights, weights);
  TORCH_CHECK_VALUE(d_gram.dim() == 1 && d_gram.size(0) == offsets.back(), "d_gram must have sum N_l^2 = ",
                    offsets.back(), " elements, got shape ", d_gram.sizes());
  const auto acc = d_gram.scalar_type();
  at::Tensor go = grad_output.to(acc);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].size(0);
    at::Tensor m = d_gram.narrow(0, offsets[i], n * n).view({n, n});
    out.push_back(at::mm(m * go, weights[i].to(acc)).to(weights[i].scalar_type()));
  }
  return out;
}

// ---------------------------------------------------------------- cross orthogonality
// Forward: (value, dP) with dP the flat concatenation over layers of
//   d value / d (old_l new_l^T) = sign(P_l) ("l1"; sign(0) = 0, as autograd's abs) or 2 P_l ("fro2")
// [r_l, s_l] in the math dtype; the backward is then d old_l = g dP_l new_l, d new_l = g dP_l^T old_l.
inline std::tuple<at::Tensor, at::Tensor> cross_orthogonality(at::TensorList old_w, at::TensorList new_w, bool l1) {
  TORCH_CHECK_VALUE(!old_w.empty(), "old must not be empty");
  TORCH_CHECK_VALUE(old_w.size() == new_w.size(), "old and new must have the same length, got ", old_w.size(),
                    " and ", new_w.size());
  for (size_t i = 0; i < old_w.size(); ++i) {
    check_matrix(old_w[i], indexed("old", i));
    check_matrix(new_w[i], indexed("new", i));
    TORCH_CHECK_VALUE(old_w[i].size(1) == new_w[i].size(1), "old[", i, "] and new[", i,
                      "] must have the same number of columns, got ", old_w[i].sizes(), " and ", new_w[i].sizes());
  }
  const auto acc = acc_type_of(old_w, new_w);
  std::vector<at::Tensor> parts, terms;
  for (size_t i = 0; i < old_w.size(); ++i) {
    at::Tensor p = at::mm(old_w[i].to(acc), new_w[i].to(acc).t());
    if (p.numel() == 0) continue;
    terms.push_back(l1 ? p.abs().sum() : p.square().sum());
    parts.push_back((l1 ? p.sign() : p * 2.0).reshape({-1}));
  }
  const auto opts = old_w[0].options().dtype(acc);
  at::Tensor total = terms.empty() ? at::zeros({}, opts) : at::stack(terms).sum();
  return {total, parts.empty() ? at::zeros({0}, opts) : at::cat(parts)};
}

// A side whose flag is false gets an empty list (no GEMM for frozen old tasks' matrices).
inline std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cross_orthogonality_backward(
    const at::Tensor& grad_output, const at::Tensor& d_products, at::TensorList old_w, at::TensorList new_w,
    bool old_grad, bool new_grad) {
  TORCH_CHECK_VALUE(old_w.size() == new_w.size(), "old and new must have the same length");
  const auto offsets = flat_offsets(old_w, new_w);
  TORCH_CHECK_VALUE(d_products.dim() == 1 && d_products.size(0) == offsets.back(),
                    "d_products must have sum r_l s_l = ", offsets.back(), " elements, got shape ", d_products.sizes());
  const auto acc = d_products.scalar_type();
  at::Tensor go = grad_output.to(acc);
  std::vector<at::Tensor> d_old, d_new;
  for (size_t i = 0; i < old_w.size(); ++i) {
    at::Tensor g = d_products.narrow(0, offsets[i], offsets[i + 1] - offsets[i])
                       .view({old_w[i].size(0), new_w[i].size(0)}) * go;
    if (old_grad) d_old.push_back(at::mm(g, new_w[i].to(acc)).to(old_w[i].scalar_type()));
    if (new_grad) d_new.push_back(at::mm(g.t(), old_w[i].to(acc)).to(new_w[i].scalar_type()));
  }
  return {d_old, d_new};
}

// ---------------------------------------------------------------- NTK-CL contrastive
// S = n n^T / t; value = -lse(S[pos]) + mean_i lse_{j != i}(S_ij); +inf when pos is empty.
inline at::Tensor off_diagonal(int64_t n, const at::Tensor& like) {
  return at::eye(n, like.options().dtype(at::kBool)).logical_not();
}

inline at::Tensor positive_pairs(const at::Tensor& labels, const at::Tensor& off_diag) {
  return labels.unsqueeze(1).eq(labels.unsqueeze(0)).logical_and(off_diag);
}

// Forward: (value, S [N, N], max(||f_i||, eps) [N], lse over pos [], row lse over j != i [N]),
// the last four in the math dtype and kept for the backward. Without a positive pair lse over
// pos is -inf and the value +inf (a where on device, so no host sync decides it).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntkcl_contrastive(
    const at::Tensor& features, const at::Tensor& labels, double temperature) {
  check_matrix(features, "features");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == features.size(0), "labels must have shape [N = ",
                    features.size(0), "], got ", labels.sizes());
  const auto acc = acc_type({features.scalar_type()});
  const auto opts = features.options().dtype(acc);
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t n = features.size(0);
  if (n == 0)
    return {at::full({}, inf, opts), at::zeros({0, 0}, opts), at::ones({0}, opts), at::full({}, -inf, opts),
            at::zeros({0}, opts)};
  Normalized f = normalize_rows(features.to(acc));
  at::Tensor s = at::mm(f.x, f.x.t()) / temperature;
  at::Tensor off_diag = off_diagonal(n, labels);
  at::Tensor pos = positive_pairs(labels, off_diag);
  at::Tensor lse_pos = at::logsumexp(s.masked_fill(pos.logical_not(), -inf).reshape({-1}), {0});
  at::Tensor lse_row = at::logsumexp(s.masked_fill(off_diag.logical_not(), -inf), {1});
  // N = 1 has no pair at all: the row mean is -inf there, and the where keeps +inf instead of NaN
  at::Tensor value = at::where(lse_pos.isneginf(), at::full({}, inf, opts), -lse_pos + lse_row.mean());
  return {value, s, f.norm.reshape({n}), lse_pos, lse_row};
}

// dL/dS = -softmax over pos + (1/N) row softmax over j != i; with M = (dS + dS^T) / t and
// n = f / |f|: dn = M n, <dn_i, n_i> = t rowsum(M o S)_i, so
//   df = (M / (|f_i| |f_j|)) f - live_i * t rowsum(M o S)_i / |f_i|^2 * f_i
// (one scaled copy of f and one addmm_ into it; S and the log-sum-exps come from the forward).
// Without a positive pair the value is +inf and its gradient is defined as zero: dS is zeroed
// on device (lse_pos = -inf marks it).
inline at::Tensor ntkcl_contrastive_backward(const at::Tensor& grad_output, const at::Tensor& s,
                                             const at::Tensor& f_norm, const at::Tensor& lse_pos,
                                             const at::Tensor& lse_row, const at::Tensor& features,
                                             const at::Tensor& labels, double temperature) {
  const int64_t n = features.size(0);
  if (n == 0) return at::zeros_like(features);
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == n && s.size(1) == n, "s must have shape [N, N] = [", n, ", ", n,
                    "], got ", s.sizes());
  const auto acc = acc_type({features.scalar_type()});
  at::Tensor off_diag = off_diagonal(n, labels);
  at::Tensor pos = positive_pairs(labels, off_diag);
  at::Tensor sa = s.to(acc), f = features.to(acc), lp = lse_pos.to(acc);
  at::Tensor zero = at::zeros({}, sa.options());
  at::Tensor p_pos = at::where(pos, (sa - lp).exp(), zero);
  at::Tensor p_row = at::where(off_diag, (sa - lse_row.to(acc).unsqueeze(1)).exp(), zero);
  at::Tensor go = at::where(lp.isneginf(), zero, grad_output.to(acc));
  at::Tensor ds = (p_row / static_cast<double>(n) - p_pos) * go;
  at::Tensor m = (ds + ds.t()) / temperature;
  at::Tensor inv = f_norm.to(acc).reciprocal();
  at::Tensor coef = at::where(f_norm.gt(kEps), (m * sa).sum(1) * inv.square(), zero) * (-temperature);
  at::Tensor w = m * inv.unsqueeze(1) * inv.unsqueeze(0);
  return (f * coef.unsqueeze(1)).addmm_(w, f).to(features.scalar_type());
}

// ATen compositions: the same kernels serve CPU and CUDA tensors (cpu/ortho.cpp registers both).
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
