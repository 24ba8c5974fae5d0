#pragma once

// The public C++ API of addnorm: the fused Add & Norm ops.

#include <addnorm/export.h>
#include <addnorm/ops.h>

namespace addnorm::detail {
[[maybe_unused]] inline const int ops_registered = ensure_ops_registered();
}  // namespace addnorm::detail
