"""Fused linear cross-entropy under vocabulary-parallel TP: 2 gloo processes on CPU (Triton interpreter), each with
half of the LM head, equal the single-device reference (loss, hidden gradient, each rank's weight-shard gradient),
including a rank whose shard is padding only."""

from __future__ import annotations

import textwrap

from distributed_launch import torchrun

CHILD = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from chrysalis_kernels.linear_cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_sum
    from chrysalis_kernels.testing import relative_error

    n, h, v = 19, 16, 64
    shard = v // world
    for real in (57, 30):  # rank 1 holds 25 real + 7 padded columns; then padding only
        g = torch.Generator().manual_seed(real)
        x = torch.randn(n, h, generator=g)
        w = torch.randn(v, h, generator=g) * 0.3
        labels = torch.randint(0, real, (n,), generator=g)
        labels[4] = -100
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = linear_cross_entropy_reference(xr, wr, labels, real)
        ref.backward()
        xs = x.clone().requires_grad_()
        ws = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        loss = linear_cross_entropy_sum(xs, ws, labels, real_vocab_size=real, vocab_start=rank * shard,
                                        group=dist.group.WORLD, chunk_rows=5)
        loss.backward()
        assert relative_error(loss, ref) < 1e-5, (real, loss.item(), ref.item())
        assert relative_error(xs.grad, xr.grad) < 1e-5, real
        assert relative_error(ws.grad, wr.grad[rank * shard:(rank + 1) * shard]) < 1e-5 or not wr.grad[
            rank * shard:(rank + 1) * shard].any(), real
        assert not ws.grad[max(0, real - rank * shard):].any(), "padding columns must get zero gradient"
    print("OK", rank, flush=True)
    dist.destroy_process_group()
    os._exit(0)
""")


def test_vocab_parallel_fused_linear_cross_entropy_equals_one_device(tmp_path):
    script = tmp_path / "tp_child.py"
    script.write_text(CHILD)
    result = torchrun(script, 2, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK 0" in result.stdout and "OK 1" in result.stdout
