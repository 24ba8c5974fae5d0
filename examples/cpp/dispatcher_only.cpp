// An app that reaches addnorm only through the dispatcher, by the op's name: it includes no
// addnorm header and references no symbol of libaddnorm (as a program that only runs
// TorchScript or exported models holding addnorm's ops). Linking addnorm::addnorm is
// enough for the ops to be registered: the CMake package keeps libaddnorm on the link
// line, which --as-needed would otherwise drop. Exit status 1 if the op is missing or
// differs from at::layer_norm.

#include <cstdio>
#include <exception>
#include <optional>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

int main() {
  try {
    const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("addnorm::layer_norm", "")
            .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              double)>();
    at::manual_seed(0);
    const at::Tensor x = at::randn({4, 16}, at::kDouble);
    const at::Tensor w = at::randn({16}, at::kDouble);
    const at::Tensor b = at::randn({16}, at::kDouble);
    const at::Tensor y = op.call(x, c10::fromIntArrayRefSlow({16}), w, b, 1e-5);
    const double diff = (y - at::layer_norm(x, {16}, w, b, 1e-5)).abs().max().item<double>();
    std::printf("dispatcher only: addnorm::layer_norm vs at::layer_norm, max |diff| %.1e: %s\n",
                diff, diff < 1e-12 ? "OK" : "MISMATCH");
    return diff < 1e-12 ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("dispatcher only: %s\n", e.what());
    return 1;
  }
}
