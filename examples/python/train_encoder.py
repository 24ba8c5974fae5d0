#!/usr/bin/env python
"""A small Transformer-encoder classifier trained on scikit-learn's handwritten digits
(load_digits: 1797 8x8 images shipped inside the package, no download), once with
torch's nn.TransformerEncoderLayer and once with addnorm's.

Each image is a sequence of 8 tokens (its rows, 8 pixels each). The addnorm model is a
deepcopy of the torch model passed through addnorm.replace_modules, so both start from
the same weights; both runs reseed torch identically (same batches). The dropout masks
differ: addnorm's layer fuses its residual-branch dropouts into the Add & Norm with masks
of its own (seeds drawn from torch's generator), so the two loss curves agree
statistically, not to float rounding. Prints per-epoch loss, test accuracy and time per
epoch of each, and plots both loss curves.

    python examples/python/train_encoder.py [--epochs 15] [--plot examples/python/train_encoder.png]
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

try:
    import addnorm
except ImportError:  # running from a source tree without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
    import addnorm


class DigitsEncoder(nn.Module):
    def __init__(self, d_model=64, nhead=4, num_layers=2, dim_feedforward=128, dropout=0.1,
                 tokens=8, token_dim=8, classes=10):
        super().__init__()
        self.embed = nn.Linear(token_dim, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor=False: no inference fast path, the same math in eval for both
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):  # x: [batch, 8, 8]
        return self.head(self.encoder(self.embed(x) + self.pos).mean(dim=1))


def load_data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [1797, 8, 8], pixels 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train(model, data, epochs, batch_size, lr, seed, label):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, times = [], []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train))
        total, count = 0.0, 0
        t0 = time.perf_counter()
        for i in range(0, len(perm), batch_size):
            b = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[b]), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            count += len(b)
        times.append(time.perf_counter() - t0)
        losses.append(total / count)
        print(f"  [{label}] epoch {epoch + 1:2d}  loss {losses[-1]:.4f}  {times[-1]:.2f} s",
              file=sys.stderr, flush=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"loss": losses, "epoch_s": times, "test_acc": acc}


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = {"torch": dict(lw=3, alpha=0.5), "addnorm": dict(lw=1.2, ls="--", marker="o", ms=3)}
    for name, r in results.items():
        epochs = range(1, len(r["loss"]) + 1)
        ax.plot(epochs, r["loss"], label=f"{name} (test acc {100 * r['test_acc']:.1f}%, "
                f"{statistics.median(r['epoch_s'][1:] or r['epoch_s']):.2f} s/epoch)", **styles.get(name, {}))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--plot", default=os.path.join(here, "train_encoder.png"),
                   help="PNG of both loss curves (default: %(default)s); '' for none")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_data(args.seed)
    torch.manual_seed(args.seed)
    torch_model = DigitsEncoder()
    addnorm_model = addnorm.replace_modules(copy.deepcopy(torch_model))
    n_swapped = sum(isinstance(m, addnorm.TransformerEncoderLayer) for m in addnorm_model.modules())
    assert n_swapped == 2, n_swapped
    n_params = sum(p.numel() for p in torch_model.parameters())
    print(f"digits: {len(data[1])} train / {len(data[3])} test images as 8 tokens of 8 pixels; "
          f"model: 2 pre-LN encoder layers, d_model 64, {n_params} parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    results = {}
    for name, model in (("torch", torch_model), ("addnorm", addnorm_model)):
        print(f"training with {name}'s layers ...", file=sys.stderr, flush=True)
        results[name] = train(model, data, args.epochs, args.batch_size, args.lr, args.seed, name)

    t, a = results["torch"], results["addnorm"]
    print()
    print("| epoch | loss torch | loss addnorm | s/epoch torch | s/epoch addnorm |")
    print("|---:|---:|---:|---:|---:|")
    for i in range(args.epochs):
        print(f"| {i + 1} | {t['loss'][i]:.4f} | {a['loss'][i]:.4f} | {t['epoch_s'][i]:.3f} | {a['epoch_s'][i]:.3f} |")
    # The first epoch includes warm-up (allocator, thread pool): medians leave it out.
    mt, ma = statistics.median(t["epoch_s"][1:] or t["epoch_s"]), statistics.median(a["epoch_s"][1:] or a["epoch_s"])
    print()
    print(f"test accuracy: torch {100 * t['test_acc']:.1f}%, addnorm {100 * a['test_acc']:.1f}%")
    print(f"median time per epoch (epochs 2..): torch {mt:.3f} s, addnorm {ma:.3f} s "
          f"(torch / addnorm = {mt / ma:.2f}x)")
    diff = max(abs(x - y) for x, y in zip(t["loss"], a["loss"]))
    print(f"largest per-epoch loss difference: {diff:.2e}")
    if args.plot:
        plot(results, args.plot, f"digits, Transformer encoder: torch vs addnorm layers "
             f"(same init, seed {args.seed})")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
