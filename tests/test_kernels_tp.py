"""Vocab-parallel fused linear cross-entropy on 2 gloo ranks matches the single-rank loss and
gradients (each rank holding half of the output weight's rows), mean and sum; so does lm_loss
under megatron's TP=2 groups, fused and reference."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state

from conftest import HAS_TRITON
from cromwell.model.kernels import ce_loss, fused_linear_cross_entropy
from cromwell.model.loss import lm_loss

WORLD = 2
N, H, V = 29, 12, 2 * 70
CASES = [dict(), dict(label_smoothing=0.1, z_loss=1e-3),
         dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum")]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    target = torch.randint(0, V, (N,), generator=gen)
    target[[1, 2]] = -100
    target[3], target[4] = 0, V - 1  # first row of rank 0's shard, last row of rank 1's
    return hidden, weight, target


def _loss_and_grads(hidden, weight, target, fn=fused_linear_cross_entropy, **kw):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = fn(hidden, weight, target, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def _init(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)


def _rank_main(rank, port):
    _init(rank, port)
    try:
        # 8-row chunks: every rank takes part in the collectives of a ragged last chunk too.
        ce_loss.CHUNK_BYTES.update(torch=4 * 8 * V // WORLD, triton=4 * 8 * V // WORLD)
        group = dist.new_group(list(range(WORLD)))
        hidden, weight, target = _inputs()
        shard = weight.chunk(WORLD)[rank]
        for case in CASES:
            want = _loss_and_grads(hidden, weight, target, impl="reference", **case)
            for impl in ("torch", "triton", "reference") if HAS_TRITON else ("torch", "reference"):
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


def _lm_loss_rank_main(rank, port):
    _init(rank, port)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
        hidden, weight, target = _inputs()
        shard = weight.chunk(WORLD)[rank]
        for reduction in ("mean", "sum"):
            want = _loss_and_grads(hidden, weight, target, impl="reference", reduction=reduction)
            for kernels in ("fused", "reference"):
                got = _loss_and_grads(hidden, shard, target, kernels=kernels, reduction=reduction,
                                      fn=lm_loss)
                where = f"rank {rank} lm_loss {kernels} {reduction}"
                for name, g, w in zip(("loss", "grad_hidden", "grad_weight"), got,
                                      (want[0], want[1], want[2].chunk(WORLD)[rank])):
                    torch.testing.assert_close(g, w, msg=lambda m: f"{where} {name}: {m}")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_matches_single_rank():
    mp.spawn(_rank_main, args=(_free_port(),), nprocs=WORLD, join=True)


def test_lm_loss_under_megatron_tp_matches_single_rank():
    mp.spawn(_lm_loss_rank_main, args=(_free_port(),), nprocs=WORLD, join=True)
