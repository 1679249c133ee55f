// Autograd kernels of the differentiable ops that take tensor lists (l2_penalty, gram_orthogonality,
// cross_orthogonality), for every backend of the ntkcl_fast:: namespace.
//
// Why in C++: the autograd kernel that torch.library.register_autograd installs runs in Python on
// every call, with grad or without: it redispatches through Python and flattens and rebuilds the
// Tensor[] arguments with pytree (0.15-0.3 ms on 24 layers, bench/NOTES.md). torch::autograd::Function
// takes a TensorList as one flat run of inputs, so the per-call cost is one C++ graph node. The
// formulas are the ones of ntkcl_fast/ortho/_ops.py and ntkcl_fast/penalty.py (which the Triton
// namespace keeps): each forward returns, and the node keeps, what the backward op of the same
// namespace takes; the extra outputs are not differentiable, and the backward ops run below
// autograd, so their results carry no graph (double backward is not supported).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> ntkcl_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

variable_list concat(std::initializer_list<at::TensorList> lists) {
  variable_list out;
  for (at::TensorList l : lists) out.insert(out.end(), l.begin(), l.end());
  return out;
}

// One gradient per input: for the first `tensors` (the flattened list inputs, whose graph edges
// needs_input_grad indexes), the gradient where that tensor needs one; undefined for the rest.
void keep_needed(AutogradContext* ctx, variable_list& grads, size_t tensors) {
  for (size_t i = 0; i < tensors; ++i) {
    if (!ctx->needs_input_grad(i)) grads[i] = at::Tensor();
  }
}

// On CPU, when the call builds a graph, the forward runs the grad op instead of the value op: one
// pass reads params, anchors and importance, returns the same value bit for bit (same terms, same
// chunk order) and writes the gradient, which the node keeps until the backward. The backward then
// hands that gradient to autograd without touching the tensors again, when the incoming gradient
// is 1 (the penalty added to a loss as it is; a scale belongs in `lam`); any other incoming
// gradient recomputes with it, so the bits are those of the kernel either way. The cost: the
// gradient exists from the forward on, not from the backward. Not on CUDA, where reading the
// incoming gradient would synchronize, nor under tracing (fake or functional tensors), where it
// has no value.
class L2Penalty : public torch::autograd::Function<L2Penalty> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList anchors,
                               at::TensorList importance, double scale, bool grad_in_forward) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        ntkcl_op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double)>("ntkcl_fast::l2_penalty");
    ctx->saved_data["n"] = static_cast<int64_t>(params.size());
    ctx->saved_data["f"] = static_cast<int64_t>(importance.size());
    ctx->saved_data["scale"] = scale;
    ctx->save_for_backward(concat({params, anchors, importance}));
    if (!grad_in_forward) return {op.call(params, anchors, importance, scale)};
    std::vector<at::Tensor> grads = fresh_like(params);
    at::Tensor value = grad_op().call(grads, params, anchors, importance, scale, std::nullopt, false);
    ctx->saved_data["grads"] = std::move(grads);
    return {value};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const int64_t n = ctx->saved_data["n"].toInt(), f = ctx->saved_data["f"].toInt();
    const variable_list saved = ctx->get_saved_variables();  // raises if a saved tensor was changed in place
    const at::Tensor& grad_output = grad_outputs[0];
    variable_list grads;
    auto kept = ctx->saved_data.find("grads");
    if (kept != ctx->saved_data.end()) {
      // taken once: a second backward (retain_graph) must not hand out a tensor autograd already owns
      grads = kept->second.toTensorVector();
      ctx->saved_data.erase(kept);
      if (grad_output.defined() && grad_output.item<double>() != 1.0) grads.clear();
    }
    if (grads.empty() && n > 0) {  // the closed form in one pass: fresh gradients, no read of them
      const at::TensorList all(saved);
      grads = fresh_like(all.slice(0, n));
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_op().call(grads, all.slice(0, n), all.slice(n, n), all.slice(2 * n, f),
                     ctx->saved_data["scale"].toDouble(), grad_output, false);
    }
    grads.resize(3 * n + f + 2);  // anchors, importance, scale and the flag take no gradient
    keep_needed(ctx, grads, n);
    return grads;
  }

 private:
  static c10::TypedOperatorHandle<at::Tensor(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double,
                                             const std::optional<at::Tensor>&, bool)>&
  grad_op() {
    static auto op = ntkcl_op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double,
                                         const std::optional<at::Tensor>&, bool)>("ntkcl_fast::l2_penalty_grad_");
    return op;
  }

  static std::vector<at::Tensor> fresh_like(at::TensorList tensors) {
    std::vector<at::Tensor> out;
    out.reserve(tensors.size());
    for (const at::Tensor& t : tensors) out.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
    return out;
  }
};

class GramOrthogonality : public torch::autograd::Function<GramOrthogonality> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, bool mean) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        ntkcl_op<std::tuple<at::Tensor, at::Tensor>(at::TensorList, bool)>("ntkcl_fast::gram_orthogonality");
    auto [value, d_gram] = op.call(weights, mean);
    ctx->save_for_backward(concat({at::TensorList(d_gram), weights}));
    ctx->mark_non_differentiable({d_gram});
    return {value, d_gram};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = ntkcl_op<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList)>(
        "ntkcl_fast::gram_orthogonality_backward");
    const variable_list saved = ctx->get_saved_variables();
    variable_list grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grads = op.call(grad_outputs[0], saved[0], at::TensorList(saved).slice(1));
    }
    keep_needed(ctx, grads, grads.size());
    grads.emplace_back();  // mean
    return grads;
  }
};

class CrossOrthogonality : public torch::autograd::Function<CrossOrthogonality> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList old, at::TensorList new_, bool l1) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = ntkcl_op<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, bool)>(
        "ntkcl_fast::cross_orthogonality");
    auto [value, d_products] = op.call(old, new_, l1);
    ctx->saved_data["n"] = static_cast<int64_t>(old.size());
    ctx->save_for_backward(concat({at::TensorList(d_products), old, new_}));
    ctx->mark_non_differentiable({d_products});
    return {value, d_products};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = ntkcl_op<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
        const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, bool, bool)>(
        "ntkcl_fast::cross_orthogonality_backward");
    const int64_t n = ctx->saved_data["n"].toInt();
    const variable_list saved = ctx->get_saved_variables();
    const at::TensorList tensors = at::TensorList(saved).slice(1);
    bool need_old = false, need_new = false;
    for (int64_t i = 0; i < n; ++i) {
      need_old = need_old || ctx->needs_input_grad(i);
      need_new = need_new || ctx->needs_input_grad(n + i);
    }
    std::vector<at::Tensor> d_old, d_new;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(d_old, d_new) =
          op.call(grad_outputs[0], saved[0], tensors.slice(0, n), tensors.slice(n), need_old, need_new);
    }
    d_old.resize(n);  // a side that needs no gradient comes back empty
    d_new.resize(n);
    variable_list grads = concat({d_old, d_new});
    keep_needed(ctx, grads, grads.size());
    grads.emplace_back();  // l1
    return grads;
  }
};

// Whether the forward should write the gradient too (see L2Penalty): a graph is being built for
// CPU params, and nothing traces the call.
bool grad_in_forward(at::TensorList params) {
  if (!at::GradMode::is_enabled() || params.empty() || !params[0].is_cpu()) return false;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  bool needed = false;
  for (const at::Tensor& p : params) {
    if (p.unsafeGetTensorImpl()->is_python_dispatch()) return false;
    needed = needed || p.requires_grad();
  }
  return needed;
}

at::Tensor l2_penalty_autograd(at::TensorList params, at::TensorList anchors, at::TensorList importance,
                               double scale) {
  return L2Penalty::apply(params, anchors, importance, scale, grad_in_forward(params))[0];
}

std::tuple<at::Tensor, at::Tensor> gram_autograd(at::TensorList weights, bool mean) {
  auto out = GramOrthogonality::apply(weights, mean);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> cross_autograd(at::TensorList old, at::TensorList new_, bool l1) {
  auto out = CrossOrthogonality::apply(old, new_, l1);
  return {out[0], out[1]};
}
}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, Autograd, m) {
  m.impl("l2_penalty", &l2_penalty_autograd);
  m.impl("gram_orthogonality", &gram_autograd);
  m.impl("cross_orthogonality", &cross_autograd);
}
