// vmap rules (the FuncTorchBatched key) of the public norm ops, _norm_fwd and _norm_bwd, and
// of the separate dropout ops (_dropout_apply, _dropout_matmul: always entry by entry).
// The ops are row-wise in input and residual (_norm_bwd: in grad_out, grad_residual_out, h,
// mean and rstd, where it computes no weight or bias gradient, as for a batch of
// gradients with respect to the input): a batch dimension of those moves to the front as
// one more row dimension, and the op runs once on all entries (the kernels' rows are
// computed alone, so each entry's result is bitwise that of a call on it). Where a weight,
// bias or dropout seed is batched (an ensemble), the weight or bias gradients are summed,
// or the fused dropout is on (its mask is a function of an element's index in the call:
// entries must each be called alone to get the mask of a call on them), the op runs once
// per entry, as functorch's fallback would (it is not exported to extensions). Without
// these rules that fallback ran every vmap of the ops entry by entry, with a warning, and
// refused a batch of size 0.

#include <ATen/functorch/BatchedTensorImpl.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

namespace addnorm {
namespace {

// Reads a bool argument by name (false where the op has none).
bool flag(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args, const char* name) {
  const auto i = schema.argumentIndexWithName(name);
  return i.has_value() && args[*i].toBool();
}

// Whether return j of the op is an empty placeholder ([0], not one per row): h where it is
// not stored or returned, mean of RMSNorm; _norm_bwd's gradients not asked for.
bool placeholder(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args, size_t j) {
  auto on = [&](const char* name) { return flag(schema, args, name); };
  if (schema.name() == "addnorm::_norm_fwd") {
    return (j == 1 && !on("store_residual")) || (j == 2 && on("is_rms"));
  }
  if (schema.name() == "addnorm::_norm_bwd") {
    const auto w = schema.argumentIndexWithName("weight");
    const auto p = schema.argumentIndexWithName("dropout_p");
    return (j == 0 && !on("grad_h_wanted")) ||
           (j == 1 && !(args[*w].isTensor() && on("weight_grad"))) ||
           (j == 2 && !on("has_bias")) || (j == 3 && !(args[*p].toDouble() > 0.0));
  }
  return j == 1 && !on("return_residual");
}

// Whether the op's results depend on each row alone: not _norm_bwd's weight and bias
// gradients, which are sums over the rows.
bool row_wise(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args) {
  return schema.name() != "addnorm::_norm_bwd" ||
         (placeholder(schema, args, 1) && placeholder(schema, args, 2));
}

// The vmap level that is batched here: the innermost one among the arguments (functorch's
// DynamicLayer, which names the current level, is not usable from extensions: its header
// includes one that torch does not ship). A level above it that batches none of them passes
// the call through to this one, as a rule of its own would.
int64_t batched_level(c10::ArrayRef<c10::IValue> args) {
  int64_t level = -1;
  for (const auto& a : args) {
    if (!a.isTensor()) continue;
    if (const auto* impl = at::functorch::maybeGetBatchedImpl(a.toTensor())) {
      level = std::max(level, impl->level());
    }
  }
  return level;
}

void batched_norm(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n_args = schema.arguments().size();
  const size_t n_rets = schema.returns().size();
  c10::impl::ExcludeDispatchKeyGuard no_batching(c10::DispatchKey::FuncTorchBatched);
  const size_t first = stack->size() - n_args;
  const int64_t level = batched_level(c10::ArrayRef<c10::IValue>(*stack).slice(first));
  auto arg = [&](size_t i) -> c10::IValue& { return (*stack)[first + i]; };
  auto batched = [&](size_t i) {
    if (!arg(i).isTensor()) return false;
    const auto* impl = at::functorch::maybeGetBatchedImpl(arg(i).toTensor());
    return impl != nullptr && impl->level() == level;
  };
  std::vector<size_t> rows;  // the row arguments, by name
  bool row_batched = false, other_batched = false;
  for (size_t i = 0; i < n_args; ++i) {
    const std::string& name = schema.arguments()[i].name();
    if (name == "input" || name == "residual" || name == "grad_out" ||
        name == "grad_residual_out" || name == "h" || name == "mean" || name == "rstd") {
      rows.push_back(i);
      row_batched = row_batched || batched(i);
    } else {
      other_batched = other_batched || batched(i);
    }
  }
  if (!row_batched && !other_batched) {
    op.callBoxed(stack);
    return;
  }
  // (_dropout_apply and _dropout_matmul: each entry alone, as their masks are.)
  const auto p = schema.argumentIndexWithName("dropout_p");
  const bool drop = (p.has_value() && arg(*p).toDouble() > 0.0) ||
                    schema.name() == "addnorm::_dropout_apply" ||
                    schema.name() == "addnorm::_dropout_matmul";

  // The batch size, and each batched argument with its batch dimension in front.
  int64_t batch = -1;
  std::vector<bool> was_batched(n_args, false);
  for (size_t i = 0; i < n_args; ++i) {
    if (!batched(i)) continue;
    const auto* impl = at::functorch::maybeGetBatchedImpl(arg(i).toTensor());
    const at::Tensor value = impl->value().movedim(impl->bdim(), 0);
    batch = value.size(0);
    arg(i) = value;
    was_batched[i] = true;
  }

  const bool one_call =
      !other_batched && !drop && row_wise(schema, c10::ArrayRef<c10::IValue>(*stack).slice(first));
  if (one_call) {
    // One call: the unbatched row arguments expanded to the batch (not _norm_bwd's mean of
    // RMSNorm, an empty placeholder).
    const auto mean = schema.argumentIndexWithName("mean");
    const bool mean_placeholder =
        mean.has_value() && flag(schema, c10::ArrayRef<c10::IValue>(*stack).slice(first), "is_rms");
    for (size_t i : rows) {
      if (!was_batched[i] && arg(i).isTensor() && !(mean_placeholder && i == *mean)) {
        const at::Tensor t = arg(i).toTensor();
        std::vector<int64_t> sizes{batch};
        sizes.insert(sizes.end(), t.sizes().begin(), t.sizes().end());
        arg(i) = t.expand(sizes);  // (a leading dimension of size batch, a view)
      }
    }
    const std::vector<c10::IValue> args(stack->begin() + first, stack->end());
    op.callBoxed(stack);
    const size_t ret0 = stack->size() - n_rets;
    for (size_t j = 0; j < n_rets; ++j) {
      if (!placeholder(schema, args, j)) {
        (*stack)[ret0 + j] = at::functorch::makeBatched((*stack)[ret0 + j].toTensor(), 0, level);
      }
    }
    return;
  }

  // Entry by entry. (A batch of none: one call on zeros shaped as an entry gives the
  // results' shapes and dtypes, of which none are returned.)
  const std::vector<c10::IValue> args(stack->begin() + first, stack->end());
  stack->erase(stack->begin() + first, stack->end());
  std::vector<std::vector<at::Tensor>> rets(n_rets);
  for (int64_t b = 0; b < std::max<int64_t>(batch, 1); ++b) {
    torch::jit::Stack entry;
    for (size_t i = 0; i < n_args; ++i) {
      if (!was_batched[i]) {
        entry.push_back(args[i]);
        continue;
      }
      const at::Tensor t = args[i].toTensor();
      entry.push_back(batch > 0 ? t.select(0, b) : at::zeros(t.sizes().slice(1), t.options()));
    }
    op.callBoxed(&entry);
    for (size_t j = 0; j < n_rets; ++j) rets[j].push_back(entry[j].toTensor());
  }
  for (size_t j = 0; j < n_rets; ++j) {
    const at::Tensor out = batch > 0 ? at::stack(rets[j]) : rets[j][0].unsqueeze(0).narrow(0, 0, 0);
    stack->push_back(at::functorch::makeBatched(out, 0, level));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, FuncTorchBatched, m) {
  for (const char* op :
       {"layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "_norm_fwd", "_norm_bwd",
        "_dropout_apply", "_dropout_matmul"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&batched_norm>());
  }
}

}  // namespace addnorm
