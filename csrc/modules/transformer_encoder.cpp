// addnorm::TransformerEncoder: clones of one addnorm::TransformerEncoderLayer run in turn,
// then an optional norm (see addnorm/transformer_encoder.h).

#include <addnorm/transformer_encoder.h>

#include <utility>

#include <c10/util/Exception.h>
#include <c10/util/Type.h>

namespace addnorm {

TransformerEncoderOptions::TransformerEncoderOptions(TransformerEncoderLayer encoder_layer,
                                                     int64_t num_layers)
    : encoder_layer_(std::move(encoder_layer)), num_layers_(num_layers) {}

TransformerEncoderOptions::TransformerEncoderOptions(
    const TransformerEncoderLayerOptions& layer_options, int64_t num_layers)
    : encoder_layer_(TransformerEncoderLayer(layer_options)), num_layers_(num_layers) {}

TransformerEncoderImpl::TransformerEncoderImpl(TransformerEncoderOptions options_)
    : options(std::move(options_)) {
  reset();
}

namespace {

// A clone of options.norm() as m.norm (none if it is empty), moved to the device and dtype
// of `like` where that is defined.
void register_norm(TransformerEncoderImpl& m, const at::Tensor& like = {}) {
  if (!m.options.norm().is_empty()) {
    m.norm = m.options.norm().clone();
    if (like.defined()) m.norm.ptr()->to(like.device(), like.scalar_type());
    m.register_module("norm", m.norm.ptr());
  }
}

// layers[i], refused by name unless an addnorm::TransformerEncoderLayer (layers is public).
TransformerEncoderLayerImpl& layer_at(const torch::nn::ModuleList& layers, size_t i) {
  const auto m = layers->ptr(i);
  auto* layer = m->as<TransformerEncoderLayer>();
  TORCH_CHECK(layer != nullptr, "addnorm::TransformerEncoder: layers[", i,
              "] must be an addnorm::TransformerEncoderLayer, got ", m->name());
  return *layer;
}

}  // namespace

void TransformerEncoderImpl::reset() {
  TORCH_CHECK(options.encoder_layer(),
              "addnorm::TransformerEncoder: encoder_layer must be a layer, got an empty "
              "TransformerEncoderLayer holder");
  TORCH_CHECK(options.num_layers() >= 0,
              "addnorm::TransformerEncoder: num_layers must be non-negative, got ",
              options.num_layers());
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.num_layers(); ++i) {
    layers->push_back(options.encoder_layer()->clone());
  }
  norm = torch::nn::AnyModule();
  register_norm(*this);
}

void TransformerEncoderImpl::reset_parameters() {
  for (size_t i = 0; i < layers->size(); ++i) layer_at(layers, i);  // (all, before any change)
  for (size_t i = 0; i < layers->size(); ++i) {
    layer_at(layers, i).reset_parameters();
  }
  // The new norm's device and dtype: those of the norm it replaces (to() moved that one; its
  // parameters, else its floating buffers), else the layers'.
  at::Tensor like;
  if (!norm.is_empty()) {
    for (const auto& t : norm.ptr()->parameters()) like = like.defined() ? like : t;
    for (const auto& t : norm.ptr()->buffers()) {
      if (!like.defined() && t.is_floating_point()) like = t;
    }
    unregister_module("norm");
    norm = torch::nn::AnyModule();
  }
  for (const auto& t : parameters()) like = like.defined() ? like : t;
  register_norm(*this, like);
}

void TransformerEncoderImpl::pretty_print(std::ostream& stream) const {
  stream << "addnorm::TransformerEncoder(num_layers=" << layers->size() << ")";
}

at::Tensor TransformerEncoderImpl::forward(const at::Tensor& src, const at::Tensor& mask,
                                           const at::Tensor& src_key_padding_mask,
                                           bool is_causal) {
  at::Tensor out = src;
  for (size_t i = 0; i < layers->size(); ++i) {
    out = layer_at(layers, i).forward(out, mask, src_key_padding_mask, is_causal);
  }
  if (norm.is_empty()) return out;
  // (norm is any module: one returning another type is refused by name, where the cast's
  // error named neither the encoder nor the norm)
  torch::nn::AnyValue value = norm.any_forward(out);
  const at::Tensor* result = value.try_get<at::Tensor>();
  TORCH_CHECK(result != nullptr, "addnorm::TransformerEncoder: norm must return a Tensor, got ",
              c10::demangle(value.type_info().name()), " from ", norm.ptr()->name());
  return *result;
}

}  // namespace addnorm
