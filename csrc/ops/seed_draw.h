#pragma once

// A check run before the C++ code draws a dropout seed (addnorm::dropout_seed) while a
// Python dispatch mode is active: torch.compile's and torch.export's tracing of a
// CompositeImplicitAutograd op (the encoder layer's) among them. The Python package installs
// addnorm.functional's check, which refuses a draw that torch.compile's memory-budget
// partitioner may recompute in backward with fresh randomness (another mask, wrong
// gradients); C++ programs without Python run no check. It raises to refuse.

#include <addnorm/export.h>

namespace addnorm::detail {

using SeedDrawCheck = void (*)();
ADDNORM_API void set_seed_draw_check(SeedDrawCheck check);

}  // namespace addnorm::detail
