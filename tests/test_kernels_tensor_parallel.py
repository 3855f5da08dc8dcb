"""Fused linear cross-entropy under vocabulary-parallel TP: 2 gloo processes on CPU (Triton interpreter), each with
half of the LM head, equal the single-device reference (loss, hidden gradient, each rank's weight-shard gradient),
including a rank whose shard is padding only; and through the training CLI at TP2 + SP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from distributed_launch import REPO, torchrun

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
    open(os.path.join(os.environ["CHECK_DIR"], f"ok_{rank}"), "w").close()  # both ranks share stdout: files
    dist.destroy_process_group()
    os._exit(0)
""")


def test_vocab_parallel_fused_linear_cross_entropy_equals_one_device(tmp_path):
    script = tmp_path / "tp_child.py"
    script.write_text(CHILD)
    result = torchrun(script, 2, timeout=600, env={"CHECK_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "ok_0").exists() and (tmp_path / "ok_1").exists(), result.stdout + result.stderr


def test_cli_tp2_with_fused_linear_cross_entropy_equals_one_process(tmp_path):
    # The engine's glue: the vocabulary-parallel LM head's DTensor shard and mesh group go to the fused kernel
    # (TP2 + sequence parallelism, padded vocabulary 302 -> 512 at TP2, 384 at TP1).
    entry = REPO / "pretrain_gpt_vision.py"
    args = ["--mock-data", "--mock-data-sequences", "16", "--num-layers", "2", "--hidden-size", "64",
            "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
            "--max-position-embeddings", "256", "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "3e-3",
            "--num-workers", "0", "--log-interval", "100", "--seed", "5", "--train-iters", "3"]
    reference = subprocess.run([sys.executable, str(entry), *args, "--log-jsonl", str(tmp_path / "ref.jsonl")],
                               check=False, capture_output=True, text=True, timeout=600, cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    fused = torchrun(entry, 2, [*args, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                "--fused-linear-cross-entropy", "--log-jsonl", str(tmp_path / "tp2.jsonl")])
    assert fused.returncode == 0, fused.stdout[-3000:] + fused.stderr[-3000:]
    want, got = (_losses(tmp_path / name) for name in ("ref.jsonl", "tp2.jsonl"))
    assert len(want) == len(got) == 3
    assert max(abs(a - b) / b for a, b in zip(got, want)) <= 1e-5, (got, want)


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]
