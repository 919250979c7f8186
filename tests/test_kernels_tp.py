"""Vocab-parallel fused linear cross-entropy on 2 gloo ranks matches the single-rank loss and
gradients (each rank holding half of the output weight's rows)."""
import os

# Must precede the first import of the Triton kernel modules; spawned ranks inherit it.
os.environ["TRITON_INTERPRET"] = "1"

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.kernels import ce_loss, fused_linear_cross_entropy

WORLD = 2
N, H, V = 29, 12, 2 * 70
CASES = [dict(), dict(label_smoothing=0.1, z_loss=1e-3)]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    target = torch.randint(0, V, (N,), generator=gen)
    target[[1, 2]] = -100
    target[3], target[4] = 0, V - 1  # first row of rank 0's shard, last row of rank 1's
    return hidden, weight, target


def _loss_and_grads(hidden, weight, target, **kw):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(hidden, weight, target, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def _rank_main(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        # 8-row chunks: every rank takes part in the collectives of a ragged last chunk too.
        ce_loss.CHUNK_BYTES.update(torch=4 * 8 * V // WORLD, triton=4 * 8 * V // WORLD)
        group = dist.new_group(list(range(WORLD)))
        hidden, weight, target = _inputs()
        shard = weight.chunk(WORLD)[rank]
        for case in CASES:
            want = _loss_and_grads(hidden, weight, target, impl="reference", **case)
            for impl in ("torch", "triton", "reference"):
                loss, grad_hidden, grad_shard = _loss_and_grads(hidden, shard, target,
                                                                tp_group=group, impl=impl, **case)
                where = f"rank {rank} impl {impl} {case}"
                torch.testing.assert_close(loss, want[0], msg=lambda m: f"{where} loss: {m}")
                torch.testing.assert_close(grad_hidden, want[1],
                                           msg=lambda m: f"{where} grad_hidden: {m}")
                torch.testing.assert_close(grad_shard, want[2].chunk(WORLD)[rank],
                                           msg=lambda m: f"{where} grad_weight: {m}")
                losses = [torch.empty(()) for _ in range(WORLD)]
                dist.all_gather(losses, loss, group=group)
                assert losses[0].item() == losses[1].item(), f"{where}: ranks disagree {losses}"
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_matches_single_rank():
    mp.spawn(_rank_main, args=(_free_port(),), nprocs=WORLD, join=True)
