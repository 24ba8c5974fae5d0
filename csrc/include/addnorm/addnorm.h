#pragma once

// The public C++ API of addnorm: the fused Add & Norm ops and the modules built on them.

#include <addnorm/export.h>
#include <addnorm/norm_modules.h>
#include <addnorm/ops.h>
#include <addnorm/transformer_encoder.h>
#include <addnorm/transformer_encoder_layer.h>
