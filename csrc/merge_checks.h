// Argument checks and the parsed method of ntkcl_fast::merge_tensors, shared by the CPU and CUDA
// kernels. The Python API checks the same first with the user's argument names; these guard
// direct torch.ops calls.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string_view>

#include "checks.h"
#include "overlap.h"

namespace ntkcl_fast {

enum class Sparsify { kNone, kMagnitude, kRandom };
enum class Rescale { kDensity, kL1, kNone };

struct MergeMethod {
  bool linear = false;     // sum_i w_i m_i, no base
  Sparsify sparsify = Sparsify::kNone;
  bool consensus = false;  // TIES sign election
};

inline MergeMethod parse_merge_method(std::string_view name) {
  if (name == "linear") return {true, Sparsify::kNone, false};
  if (name == "task_arithmetic") return {false, Sparsify::kNone, false};
  if (name == "ties") return {false, Sparsify::kMagnitude, true};
  if (name == "dare_linear") return {false, Sparsify::kRandom, false};
  if (name == "dare_ties") return {false, Sparsify::kRandom, true};
  TORCH_CHECK_VALUE(false, "method must be one of linear, task_arithmetic, ties, dare_linear, dare_ties, got '",
                    name, "'");
}

inline Rescale parse_rescale(std::string_view name) {
  if (name == "density") return Rescale::kDensity;
  if (name == "l1") return Rescale::kL1;
  if (name == "none") return Rescale::kNone;
  TORCH_CHECK_VALUE(false, "rescale must be one of density, l1, none, got '", name, "'");
}

// Returns the tensor whose shape, dtype and device the output takes (base, or models[0]).
inline const at::Tensor& check_merge_args(const at::Tensor* base, at::TensorList models, const MergeMethod& method,
                                          at::ArrayRef<double> weights, at::ArrayRef<double> densities, double lam,
                                          c10::DeviceType device) {
  TORCH_CHECK_VALUE(!models.empty(), "models must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(base != nullptr || method.linear, "base may be None only for method linear");
  const at::Tensor& like = base ? *base : models[0];
  const Arg like_arg = base ? Arg{"base"} : Arg{"models", 0};
  check_float(like, like_arg);
  TORCH_CHECK_VALUE(like.device().type() == device, like_arg, " must be on a ", c10::DeviceTypeName(device),
                    " device");
  TORCH_CHECK_VALUE(like.is_contiguous(), like_arg, " must be contiguous");
  for (size_t i = 0; i < models.size(); ++i) {
    const Arg m = at_index("models", i);
    TORCH_CHECK_TYPE(models[i].scalar_type() == like.scalar_type(), m, " must have the dtype of ", like_arg);
    TORCH_CHECK_VALUE(models[i].sizes() == like.sizes(), m, " must have the shape of ", like_arg);
    TORCH_CHECK_VALUE(models[i].device() == like.device(), m, " must be on the device of ", like_arg);
    TORCH_CHECK_VALUE(models[i].is_contiguous(), m, " must be contiguous");
  }
  TORCH_CHECK_VALUE(weights.size() == models.size() && densities.size() == models.size(),
                    "weights and densities must have one value per model (", models.size(), "), got ",
                    weights.size(), " and ", densities.size());
  for (size_t i = 0; i < models.size(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(weights[i]), at_index("weights", i), " must be finite");
    TORCH_CHECK_VALUE(densities[i] >= 0.0 && densities[i] <= 1.0, at_index("densities", i), " must be in [0, 1]");
  }
  TORCH_CHECK_VALUE(std::isfinite(lam), "lam must be finite");
  return like;
}

// merge_tensors_into_'s `out`: where the output would be, and no memory shared with an input.
inline void check_merge_out(const at::Tensor& like, const at::Tensor* base, at::TensorList models,
                            const at::Tensor& out) {
  TORCH_CHECK_TYPE(out.scalar_type() == like.scalar_type(), "out must have the dtype ", like.scalar_type(),
                   ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == like.sizes(), "out must have the shape ", like.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(out.device() == like.device(), "out must be on ", like.device(), ", got ", out.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  check_no_overlap({{at::TensorList(out), "out"}},
                   {{base ? at::TensorList(*base) : at::TensorList(), "base"}, {models, "models"}});
}

// One call's arguments, parsed and checked; `like` is the tensor whose shape, dtype and device
// the output takes.
struct MergeCall {
  const at::Tensor* base;  // null for linear without a base
  at::TensorList models;
  MergeMethod method;
  Rescale rescale;
  at::ArrayRef<double> weights, densities;
  double lam;
  bool normalize;
  uint64_t seed, key;  // the schema's int64 bits
  int64_t offset;      // global flat index of element 0 (a shard's place in the whole tensor)
  const at::Tensor* like;
};

inline MergeCall parse_merge_call(const std::optional<at::Tensor>& base, at::TensorList models, c10::string_view method,
                                  at::ArrayRef<double> weights, at::ArrayRef<double> densities, double lam,
                                  bool normalize, c10::string_view rescale, int64_t seed, int64_t key,
                                  int64_t offset, c10::DeviceType device) {
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  const at::Tensor* b = base.has_value() && base->defined() ? &*base : nullptr;
  MergeCall call{b,
                 models,
                 parse_merge_method(std::string_view(method.data(), method.size())),
                 parse_rescale(std::string_view(rescale.data(), rescale.size())),
                 weights,
                 densities,
                 lam,
                 normalize,
                 static_cast<uint64_t>(seed),
                 static_cast<uint64_t>(key),
                 offset,
                 nullptr};
  call.like = &check_merge_args(b, models, call.method, weights, densities, lam, device);
  return call;
}

// A backend's two ops from its run(call, out), so the schema's argument list is written once:
// merge_tensors (a new output) and merge_tensors_into_ (into a checked `out`).
template <c10::DeviceType kDevice, void (*kRun)(const MergeCall&, const at::Tensor&)>
struct MergeOps {
  static at::Tensor fresh(const std::optional<at::Tensor>& base, at::TensorList models, c10::string_view method,
                          at::ArrayRef<double> weights, at::ArrayRef<double> densities, double lam, bool normalize,
                          c10::string_view rescale, int64_t seed, int64_t key, int64_t offset) {
    const MergeCall a = parse_merge_call(base, models, method, weights, densities, lam, normalize, rescale, seed,
                                         key, offset, kDevice);
    at::Tensor out = at::empty_like(*a.like, at::MemoryFormat::Contiguous);
    if (out.numel() > 0) kRun(a, out);
    return out;
  }

  static void into(const at::Tensor& out, const std::optional<at::Tensor>& base, at::TensorList models,
                   c10::string_view method, at::ArrayRef<double> weights, at::ArrayRef<double> densities, double lam,
                   bool normalize, c10::string_view rescale, int64_t seed, int64_t key, int64_t offset) {
    const MergeCall a = parse_merge_call(base, models, method, weights, densities, lam, normalize, rescale, seed,
                                         key, offset, kDevice);
    check_merge_out(*a.like, a.base, models, out);
    if (out.numel() > 0) kRun(a, out);
  }
};

}  // namespace ntkcl_fast
