// Every ntkcl_fast:: op schema, in one place. Kernels live in cpu/<family>.cpp and
// cuda/<family>.cu; fake kernels (for torch.compile) are registered from Python.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>
#ifdef NTKCL_PYTHON_MODULE
#include <Python.h>
#endif

#ifndef NTKCL_CUDA_ARCHS
#define NTKCL_CUDA_ARCHS ""
#endif
#ifndef NTKCL_BUILT_WITH_TORCH
#define NTKCL_BUILT_WITH_TORCH ""
#endif

TORCH_LIBRARY(ntkcl_fast, m) {
  // ema[i] <- ema[i] + (1 - d_i) * (src[i] - ema[i]) for floating pairs (others are copied), d_i = decay[i], or the
  // value of the 0-d decay_tensor for every pair when it is given (decay is then ignored).
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] src, float[] decay, Tensor? decay_tensor) -> ()");
  // L2 / EWC: value = scale * sum_i sum(F_i * (params_i - anchors_i)^2) as a 0-d fp32 tensor, with
  // F_i = importance[i] (importance empty: F_i = 1) and a deterministic reduction.
  m.def("l2_penalty(Tensor[] params, Tensor[] anchors, Tensor[] importance, float scale) -> Tensor");
  // Same value; also grads[i] <- [grads[i] +] 2 * scale * F_i * (params_i - anchors_i) * g, with g the
  // 0-d grad_output read on device (1 when absent); `accumulate` adds into grads, else overwrites.
  m.def("l2_penalty_grad_(Tensor(a!)[] grads, Tensor[] params, Tensor[] anchors, Tensor[] importance, "
        "float scale, Tensor? grad_output, bool accumulate) -> Tensor");
  // fisher[i] <- decay * fisher[i] + scale * grads[i]^2.
  m.def("fisher_accumulate_(Tensor(a!)[] fisher, Tensor[] grads, float scale, float decay) -> ()");
  // AdamR (DAREx's AdamR, reference/adamr.py): one step for the list. state_steps hold the steps taken
  // (0-d fp32, one per tensor, read on device; each gains 1). The pull toward anchors (L2, or sign when
  // l1) is scaled by pull * lr / sqrt(v_mean) (1 for sqrt where v_mean == 0), or by pull * lr without
  // v_mean. max_exp_avg_sq is empty, or the running max of exp_avg_sq (AMSGrad).
  m.def("adamr_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "Tensor(d!)[] max_exp_avg_sq, Tensor[] anchors, Tensor(e!)[] state_steps, Tensor? v_mean, *, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, float pull, bool l1) -> ()");
  // The 0-d fp64 sum over the list of exp_avg_sq / (1 - beta2^t) (of max_exp_avg_sq when given) as
  // adamr_step_ would leave them, t = state_steps + 1; writes nothing. DAREx's V is such sums over
  // all parameters divided by their element count.
  m.def("adamr_v_hat_sum(Tensor[] grads, Tensor[] exp_avg_sq, Tensor[] max_exp_avg_sq, Tensor[] state_steps, *, "
        "float beta2) -> Tensor");
  // DARE keep rule of docs/API.md (Philox4x32-10, csrc/cuda/philox.h); seed and key are uint64 bits
  // in int64. With base: out <- kept ? base + (finetuned - base) / q : base; without base (delta
  // mode): out <- kept ? finetuned / q : 0. q is q_rows[row] when q_rows is given. out may be
  // finetuned or base itself. Flat element i draws the keep rule's u(offset + i) (offset >= 0: the
  // global index of a shard's first element), rows of q_rows stay local.
  m.def("dare_(Tensor(a!) out, Tensor finetuned, Tensor? base, int threshold, float q, Tensor? q_rows, "
        "int seed, int key, int offset=0) -> ()");
  // dare_ over a list (one launch per device on CUDA), per-tensor q and key.
  m.def("dare_multi_(Tensor(a!)[] out, Tensor[] finetuned, Tensor[] base, int threshold, float[] q, int seed, "
        "int[] keys) -> ()");
  // keep exactly the k entries of largest |delta| (ties to lower flat index), zero the rest.
  m.def("magnitude_prune_(Tensor(a!) delta, int k) -> ()");
  // One tensor of a model merge (docs/API.md, "Model merging"): method linear, task_arithmetic, ties,
  // dare_linear or dare_ties; weights and densities one per model; rescale density, l1 or none (dare_*);
  // model i draws its DARE mask under key + i, element j by global index offset + j (a shard's place in
  // the whole tensor). base may be None for linear. Returns a new tensor.
  m.def("merge_tensors(Tensor? base, Tensor[] models, str method, float[] weights, float[] densities, "
        "float lam, bool normalize, str rescale, int seed, int key, int offset=0) -> Tensor");
  // The same into `out` (the output's shape, dtype and device, contiguous, sharing no memory with an
  // input): a checkpoint merge reuses its output buffers instead of faulting in new pages per tensor.
  m.def("merge_tensors_into_(Tensor(a!) out, Tensor? base, Tensor[] models, str method, float[] weights, "
        "float[] densities, float lam, bool normalize, str rescale, int seed, int key, int offset=0) -> ()");
  // Orthogonality and feature losses (docs/API.md): 0-d value in fp32 (fp64 when an input is fp64)
  // and closed-form gradients in each input's dtype; rows normalized as x / max(||x||, 1e-12).
  // feature_orthogonality returns (value, S = n(f) n(p)^T [B, K], max(||f_i||, eps) [B],
  // max(||p_k||, eps) [K]); the backward takes them back instead of recomputing S.
  m.def("feature_orthogonality(Tensor features, Tensor prototypes, bool normalize, bool mean) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // features_grad / prototypes_grad false: that gradient is skipped (one GEMM less) and comes
  // back as an empty tensor (prototypes are usually frozen class means).
  m.def("feature_orthogonality_backward(Tensor grad_output, Tensor s, Tensor f_norm, Tensor p_norm, "
        "Tensor features, Tensor prototypes, bool normalize, bool mean, bool features_grad, "
        "bool prototypes_grad) -> (Tensor, Tensor)");
  m.def("projection_residual(Tensor features, Tensor basis, bool normalize, bool sumsq) -> Tensor");
  // features_grad / basis_grad false: that gradient is skipped and comes back empty (the basis is
  // usually a frozen buffer).
  m.def("projection_residual_backward(Tensor grad_output, Tensor features, Tensor basis, bool normalize, "
        "bool sumsq, bool features_grad, bool basis_grad) -> (Tensor, Tensor)");
  // gram_orthogonality returns (value, d_gram): d value / d (W_l W_l^T) of every layer, flattened and
  // concatenated in list order ([sum N_l^2], math dtype); the backward is one GEMM per layer.
  m.def("gram_orthogonality(Tensor[] weights, bool mean) -> (Tensor, Tensor)");
  m.def("gram_orthogonality_backward(Tensor grad_output, Tensor d_gram, Tensor[] weights) -> Tensor[]");
  // cross_orthogonality returns (value, d_products): d value / d (old_l new_l^T), flattened and
  // concatenated ([sum r_l s_l], math dtype). old_grad / new_grad false: that side's list comes back empty.
  m.def("cross_orthogonality(Tensor[] old, Tensor[] new, bool l1) -> (Tensor, Tensor)");
  m.def("cross_orthogonality_backward(Tensor grad_output, Tensor d_products, Tensor[] old, Tensor[] new, "
        "bool old_grad, bool new_grad) -> (Tensor[], Tensor[])");
  // ntkcl_contrastive returns (value, S = n n^T / t [N, N], max(||f_i||, eps) [N], lse over the
  // positive pairs [], row lse over j != i [N]); the backward takes them back.
  m.def("ntkcl_contrastive(Tensor features, Tensor labels, float temperature) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ntkcl_contrastive_backward(Tensor grad_output, Tensor s, Tensor f_norm, Tensor lse_pos, Tensor lse_row, "
        "Tensor features, Tensor labels, float temperature) -> Tensor");
}


// Every op that writes an argument bumps that argument's autograd version counter on every
// backend, as torch's own in-place ops do, so overwriting a tensor saved for backward is caught.
namespace {
bool writes(const c10::Argument& arg) { return arg.alias_info() && arg.alias_info()->isWrite(); }

void bump_written_then_redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                  torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    if (!writes(args[i])) continue;
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensor()) {
      torch::autograd::increment_version(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList().vec()) torch::autograd::increment_version(t);
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, ADInplaceOrView, m) {
  for (const char* op : {"ema_update_", "l2_penalty_grad_", "fisher_accumulate_", "adamr_step_", "dare_",
                         "dare_multi_", "magnitude_prune_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_written_then_redispatch>());
  }
}

#ifdef NTKCL_PYTHON_MODULE
// A plain Python module, so `import ntkcl_fast._C` loads the library and runs the
// registrations above; it also carries the build facts `python -m ntkcl_fast info` prints.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ntkcl_fast compiled ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef NTKCL_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(module, "cuda_archs", NTKCL_CUDA_ARCHS);
  PyModule_AddStringConstant(module, "built_with_torch", NTKCL_BUILT_WITH_TORCH);
  return module;
}
#endif  // NTKCL_PYTHON_MODULE
