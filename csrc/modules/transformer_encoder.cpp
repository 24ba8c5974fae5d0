// addnorm::TransformerEncoder: clones of one addnorm::TransformerEncoderLayer run in turn,
// then an optional norm (see addnorm/transformer_encoder.h).

#include <addnorm/transformer_encoder.h>

#include <utility>

#include <c10/util/Exception.h>

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

void register_norm(TransformerEncoderImpl& m) {
  if (!m.options.norm().is_empty()) {
    m.norm = m.options.norm().clone();
    m.register_module("norm", m.norm.ptr());
  }
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
  for (const auto& layer : *layers) {
    layer->as<TransformerEncoderLayer>()->reset_parameters();
  }
  if (!norm.is_empty()) {
    unregister_module("norm");
    norm = torch::nn::AnyModule();
  }
  register_norm(*this);
}

void TransformerEncoderImpl::pretty_print(std::ostream& stream) const {
  stream << "addnorm::TransformerEncoder(num_layers=" << layers->size() << ")";
}

at::Tensor TransformerEncoderImpl::forward(const at::Tensor& src, const at::Tensor& mask,
                                           const at::Tensor& src_key_padding_mask,
                                           bool is_causal) {
  at::Tensor out = src;
  for (const auto& layer : *layers) {
    out = layer->as<TransformerEncoderLayer>()->forward(out, mask, src_key_padding_mask,
                                                          is_causal);
  }
  return norm.is_empty() ? out : norm.forward<at::Tensor>(out);
}

}  // namespace addnorm
