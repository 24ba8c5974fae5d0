#!/usr/bin/env python
"""Writes the input files of the C++ example (examples/cpp/main.cpp).

    python examples/cpp/make_inputs.py OUT.pt

It imports addnorm (it scripts addnorm's modules). OUT.pt is `torch.save` of one flat dict
(str -> tensor, int, float, bool or str), which LibTorch reads with `torch::pickle_load`
(no other dependency). It holds:

- the model: a stack of torch.nn.TransformerEncoderLayer (torch's own layers, random
  non-trivial weights), keys `layers.<i>.<option>` for the options and
  `layers.<i>.<parameter name>` for the weights (Python's names: `self_attn.in_proj_weight`,
  `linear1.weight`, `norm1.bias`, ...), and a classifier head `head.weight` / `head.bias`;
- `input`, `src_key_padding_mask` and `expected`: torch's output of the stack in eval mode
  (batch_first, float32), which the C++ app must reproduce with addnorm's layer;
- `train_x`, `train_y`, `train_steps`, `lr`: a small classification task the app trains on;
- `scripted_model`: the name of a second file, written next to OUT.pt (OUT_scripted.pt),
  that holds a TorchScript model (`torch.jit.save`) the app loads with `torch::jit::load`:
  the same layers followed by an RMSNorm, written as a torch model, converted with
  `addnorm.replace_modules` and scripted; `scripted_expected` is the output of the torch
  model before conversion on `input` with `src_key_padding_mask` (eval mode), and
  `scripted_grad_input` the gradient of `(output * scripted_grad_output).sum()` with
  respect to `input`.
"""

import argparse
import copy
import os
from typing import Optional

import torch
from torch import Tensor, nn

import addnorm

D_MODEL, NHEAD, DIM_FF, DROPOUT, EPS = 32, 4, 64, 0.1, 1e-5
# (norm_first, activation) of each layer: one post-LN and one pre-LN layer.
LAYERS = [(False, "relu"), (True, "gelu")]
N, S, CLASSES, TRAIN_N = 4, 10, 4, 64


class Encoder(nn.Module):
    """The TorchScript model: encoder layers, then an RMSNorm."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.RMSNorm(D_MODEL, eps=EPS)

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=src_key_padding_mask)
        return self.norm(x)


def write_scripted_model(layers, src, padding, path):
    """Scripts the Encoder of copies of `layers` after replace_modules and saves it to path;
    returns torch's output and input gradient of the unconverted model."""
    model = Encoder(copy.deepcopy(layers)).eval()
    with torch.no_grad():
        model.norm.weight.copy_(1.0 + 0.2 * torch.randn(D_MODEL))
    x = src.clone().requires_grad_()
    expected = model(x, padding)
    grad_output = torch.randn_like(expected)
    (grad_input,) = torch.autograd.grad(expected, x, grad_output)

    addnorm.replace_modules(model)
    assert all(type(m) is addnorm.TransformerEncoderLayer for m in model.layers)
    assert type(model.norm) is addnorm.RMSNorm
    torch.jit.save(torch.jit.script(model), path)
    return expected.detach(), grad_output, grad_input


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="where to write the .pt file")
    args = p.parse_args()

    torch.manual_seed(0)
    layers = []
    for norm_first, activation in LAYERS:
        layer = nn.TransformerEncoderLayer(
            D_MODEL, NHEAD, DIM_FF, DROPOUT, activation, EPS, batch_first=True, norm_first=norm_first)
        with torch.no_grad():  # non-trivial biases and norm affine, so a wrong mapping shows
            for name, prm in layer.named_parameters():
                base = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0
                prm.copy_(base + 0.2 * torch.randn_like(prm))
        layers.append(layer)
    head = nn.Linear(D_MODEL, CLASSES)

    src = torch.randn(N, S, D_MODEL)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[1, -3:] = True
    padding[3, -1] = True
    x = src
    for layer in layers:
        layer.eval()
        x = layer(x, src_key_padding_mask=padding)
    expected = x.detach()

    # Classification: the label is the largest of the first CLASSES features' means over
    # the sequence, a function the model can learn.
    train_x = torch.randn(TRAIN_N, S, D_MODEL)
    train_y = train_x[:, :, :CLASSES].mean(dim=1).argmax(dim=1)

    scripted_path = os.path.splitext(os.path.abspath(args.out))[0] + "_scripted.pt"
    os.makedirs(os.path.dirname(scripted_path), exist_ok=True)
    scripted_expected, scripted_grad_output, scripted_grad_input = write_scripted_model(
        layers, src, padding, scripted_path)

    data = {
        "num_layers": len(layers),
        "d_model": D_MODEL,
        "nhead": NHEAD,
        "dim_feedforward": DIM_FF,
        "dropout": DROPOUT,
        "layer_norm_eps": EPS,
        "batch_first": True,
        "num_classes": CLASSES,
        "input": src,
        "src_key_padding_mask": padding,
        "expected": expected,
        "train_x": train_x,
        "train_y": train_y,
        "train_steps": 30,
        "lr": 3e-3,
        "head.weight": head.weight.detach().clone(),
        "head.bias": head.bias.detach().clone(),
        "scripted_model": os.path.basename(scripted_path),
        "scripted_expected": scripted_expected,
        "scripted_grad_output": scripted_grad_output,
        "scripted_grad_input": scripted_grad_input,
    }
    for i, ((norm_first, activation), layer) in enumerate(zip(LAYERS, layers)):
        data[f"layers.{i}.norm_first"] = norm_first
        data[f"layers.{i}.activation"] = activation
        for name, t in layer.state_dict().items():
            data[f"layers.{i}.{name}"] = t.detach().clone().contiguous()

    torch.save(data, args.out)
    print(f"wrote {args.out}: {len(layers)} layers, input {tuple(src.shape)}, "
          f"{TRAIN_N} training samples; TorchScript model {scripted_path}")


if __name__ == "__main__":
    main()
