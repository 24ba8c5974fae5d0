"""DistributedDataParallel over addnorm.TransformerEncoderLayer, and FSDP2 over pre-LN blocks
returning h: two processes on gloo (CPU), each with half of the batch, must produce the
gradients (and, for DDP, after one step the updated parameters) that one process gets on the
whole batch."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import addnorm

WORLD = 2
E, H, FF, S, N, CLASSES = 16, 4, 32, 6, 8, 3  # N: the whole batch, split over the ranks
DTYPE = torch.float64  # float64: the only difference left is the order of a 2-term sum


def _gloo_unavailable_reason():
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    return None


pytestmark = pytest.mark.skipif(_gloo_unavailable_reason() is not None,
                                reason=_gloo_unavailable_reason() or "")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(E, E)
        self.layers = nn.ModuleList([
            addnorm.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True),
            addnorm.TransformerEncoderLayer(E, H, FF, dropout=0.0, activation="gelu",
                                            batch_first=True, norm_first=True),
        ])
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x, padding):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1))


def _make():
    """The model and the whole batch, the same in every process."""
    torch.manual_seed(0)
    model = Model().to(DTYPE)
    with torch.no_grad():  # non-trivial norm affine parameters
        for name, p in model.named_parameters():
            if ".norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(N, S, E, dtype=DTYPE)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[1, -2:] = True
    padding[N - 1, -3:] = True
    y = torch.randint(0, CLASSES, (N,))
    return model, x, padding, y


def _step(model, x, padding, y):
    """One training step; returns (gradients, parameters after the step) by name."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x, padding), y)
    loss.backward()
    mod = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    grads = {n: p.grad.detach().clone() for n, p in mod.named_parameters()}
    opt.step()
    params = {n: p.detach().clone() for n, p in mod.named_parameters()}
    return grads, params


def _worker(rank, work, port, out_dir):
    """mp.spawn's target: runs work(rank, out_dir) in a gloo process group, then leaves the
    process without finalizing the interpreter. A gloo worker thread can still be releasing
    a finished collective's tensors when the main thread returns, and if the interpreter is
    finalizing by then, the release aborts the process (torch's own teardown race, seen with
    FSDP2's all-gathers in about one run in twenty). The results are in files by then, and an
    exception still reaches mp.spawn."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        work(rank, out_dir)
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _ddp_work(rank, out_dir):
    model, x, padding, y = _make()
    ddp = nn.parallel.DistributedDataParallel(model)
    part = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    grads, params = _step(ddp, x[part], padding[part], y[part])
    torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_single_process():
    model, x, padding, y = _make()
    assert any(isinstance(m, addnorm.TransformerEncoderLayer) for m in model.modules())
    ref_grads, ref_params = _step(model, x, padding, y)

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_ddp_work, _free_port(), out_dir), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]

    assert set(results[0]["grads"]) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert ref.abs().sum() > 0, f"{name}: zero gradient in the reference"
        for r, res in enumerate(results):
            torch.testing.assert_close(res["grads"][name], ref, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"rank {r} grad {name}: {m}")
    for name, ref in ref_params.items():
        # DDP leaves bitwise-equal gradients (one all-reduce result) on every rank.
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name
        torch.testing.assert_close(results[0]["params"][name], ref, rtol=1e-12, atol=1e-14,
                                   msg=lambda m: f"param {name}: {m}")


class PrenormBlock(nn.Module):
    """A flash-attn-style pre-LN block: returns (hidden, residual), residual being the h of
    its fused add & norm."""

    def __init__(self):
        super().__init__()
        self.norm = addnorm.AddLayerNorm(E, return_residual=True)
        self.fc = nn.Linear(E, E)

    def forward(self, x, residual):
        out, h = self.norm(x, residual)
        return self.fc(out), h


class PrenormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([PrenormBlock() for _ in range(3)])
        self.final = addnorm.AddLayerNorm(E)

    def forward(self, x):
        r = torch.zeros_like(x)
        for block in self.blocks:
            x, r = block(x, r)
        return self.final(x, r).pow(2).mean()


def _fsdp_work(rank, out_dir):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = PrenormModel().to(DTYPE)
    x = torch.randn(N, S, E, dtype=DTYPE)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    model(x[rank * N // WORLD:(rank + 1) * N // WORLD]).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))


def test_fsdp2_prenorm_blocks_returning_h():
    """FSDP2 (fully_shard) over blocks that return the h of return_residual=True: FSDP's
    pre-backward hooks on every output of a wrapped module (h included) only read the
    gradient, so they pass the returned-h check, and the gradients are one process's."""
    torch.manual_seed(0)
    model = PrenormModel().to(DTYPE)
    x = torch.randn(N, S, E, dtype=DTYPE)
    halves = [model(x[r * N // WORLD:(r + 1) * N // WORLD]) for r in range(WORLD)]
    (sum(halves) / WORLD).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_fsdp_work, _free_port(), out_dir), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    for name, expected in ref.items():
        assert expected.abs().sum() > 0, name
        for res in results:
            torch.testing.assert_close(res[name], expected, rtol=1e-12, atol=1e-14)
