"""GPU fast paths, checked on CPU: per-block torch.compile, selective activation checkpointing, FP8 module
conversion (torchao, with its CPU emulation for the numerics) and capability errors, the distributed optimizer on
2 gloo processes, and start-time errors for unavailable attention backends through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import preset
from engine.model import build_model
from engine.parallel.activation_checkpointing import apply_activation_checkpointing
from engine.parallel.compile import compile_transformer_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(ROOT / "pretrain_gpt_vision.py")
SMALL = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2)
TINY_CLI = ["--mock-data", "--mock-data-sequences", "64", "--num-layers", "2", "--hidden-size", "32",
            "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
            "--max-position-embeddings", "256", "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--num-workers", "0", "--log-interval", "1",
            "--seed", "5", "--train-iters", "3"]


def _batch(seq: int = 64):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, seq), generator=g)
    docs = torch.tensor([[0] * 20 + [1] * (seq - 20), [0] * seq])
    return tokens, docs, torch.roll(tokens, -1, 1)


def _loss_and_grads(model: nn.Module, steps: int = 1):
    tokens, docs, labels = _batch()
    for _ in range(steps):
        model.zero_grad()
        out = model(tokens, document_ids=docs, labels=labels)
        out.loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
    return out.loss.detach(), grads


def _assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


# ----------------------------------------------------------------------------------------------- compile
def test_compiled_blocks_match_eager_with_inductor():
    """Regional compilation with the real (inductor, C++) backend: same loss and gradients as eager, names kept."""
    cfg = preset("tiny", **SMALL).replace(num_layers=1)
    eager = _loss_and_grads(build_model(cfg, seed=1))
    model = build_model(cfg, seed=1)
    assert compile_transformer_blocks(model) == 1
    assert {n for n, _ in model.named_parameters()} == set(eager[1])  # no _orig_mod. prefixes
    _assert_same(_loss_and_grads(model), eager)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_compile_composes_with_activation_checkpointing(granularity):
    """Checkpoint wrapper inside the compiled region (torchtitan's order), traced by dynamo + AOT autograd."""
    cfg = preset("tiny", **SMALL)
    eager = _loss_and_grads(build_model(cfg, seed=2), steps=2)
    model = build_model(cfg, seed=2)
    apply_activation_checkpointing(model, granularity)
    compile_transformer_blocks(model, backend="aot_eager")
    _assert_same(_loss_and_grads(model, steps=2), eager)


# ----------------------------------------------------------------------------------------------- selective AC
class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_op_counts(granularity: str | None) -> dict[str, int]:
    cfg = preset("tiny", **SMALL).replace(num_layers=1, attention_backend="sdpa")
    model = build_model(cfg, seed=3)
    if granularity:
        apply_activation_checkpointing(model, granularity)
    tokens, docs, labels = _batch()
    out = model(tokens, document_ids=docs, labels=labels)
    with _CountOps() as ops:
        out.loss.backward()
    return ops.counts


def test_selective_checkpointing_recomputes_cheap_ops_and_every_other_matmul():
    """Backward of one block (7 GEMMs): no checkpointing runs only gradient matmuls; full recomputes the forward
    matmuls (6: the last one, w2, feeds nothing that backward needs, and checkpointing stops before it) and
    attention; selective recomputes every second matmul (wk, wo, w3) and not attention, but does recompute the
    elementwise ops (RMSNorm, SiLU)."""
    none, full, selective = (_backward_op_counts(g) for g in (None, "full", "selective"))
    attention = [k for k in full if "scaled_dot_product" in k and "backward" not in k]
    assert full["mm"] - none["mm"] == 6
    assert selective["mm"] - none["mm"] == 3
    assert sum(full.get(k, 0) for k in attention) == 1 and sum(selective.get(k, 0) for k in attention) == 0
    assert selective.get("silu", 0) == full.get("silu", 0) == 1 and none.get("silu", 0) == 0


def test_selective_checkpointing_gives_the_same_gradients():
    cfg = preset("tiny", **SMALL)
    reference = _loss_and_grads(build_model(cfg, seed=4))
    model = build_model(cfg, seed=4)
    apply_activation_checkpointing(model, "selective")
    _assert_same(_loss_and_grads(model), reference, tol=0)


# ----------------------------------------------------------------------------------------------- FP8
torchao = pytest.importorskip("torchao", reason="torchao is the FP8 extra: pip install 'chrysalis[fp8]'")


def test_fp8_converts_only_the_block_linears():
    from torchao.float8.float8_linear import Float8Linear

    from engine.model.fp8 import FP8_LINEARS, Fp8Config, convert_to_fp8

    model = build_model(preset("tiny", **SMALL), seed=5)
    names = convert_to_fp8(model, Fp8Config(emulate=True))
    expected = {f"layers.{i}.{leaf}" for i in range(2) for leaf in FP8_LINEARS}
    assert set(names) == expected
    for name, module in model.named_modules():
        if name in expected:
            assert isinstance(module, Float8Linear), name
        elif isinstance(module, nn.Linear):
            # LM head, projector and continuous-token head stay high precision.
            assert not isinstance(module, Float8Linear) and name.split(".")[0] in ("output", "projector",
                                                                                    "visual_head"), name
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in build_model(preset("tiny", **SMALL)).named_parameters()}


def test_fp8_skips_linears_whose_dims_are_not_multiples_of_16():
    from engine.model.fp8 import Fp8Config, convert_to_fp8

    model = build_model(preset("tiny", **SMALL).replace(ffn_hidden_size=40), seed=5)  # w1/w2/w3: 40 % 16 != 0
    names = convert_to_fp8(model, Fp8Config(emulate=True))
    assert names and all(".attention." in n for n in names)


@pytest.mark.parametrize("recipe, fmt", [("tensorwise", "hybrid"), ("tensorwise", "e4m3"), ("rowwise", "e4m3")])
def test_fp8_emulated_training_tracks_bf16(recipe, fmt):
    """torchao's emulation does the real FP8 rounding with high-precision matmuls: the loss of a few steps stays
    within 3% of the unconverted model's (the GPU check of 200 steps is in benchmarks/gpu_training.py)."""
    from engine.model.fp8 import Fp8Config, _torchao_config, convert_to_fp8

    if fmt == "e4m3" and recipe == "tensorwise":
        assert _torchao_config(Fp8Config(format="e4m3")).cast_config_grad_output.target_dtype == torch.float8_e4m3fn
    assert _torchao_config(Fp8Config(format="hybrid")).cast_config_grad_output.target_dtype == torch.float8_e5m2
    cfg = preset("tiny", **SMALL).replace(hidden_size=64, ffn_hidden_size=128)
    losses = {}
    for fp8 in (False, True):
        model = build_model(cfg, seed=6)
        if fp8:
            convert_to_fp8(model, Fp8Config(recipe=recipe, format=fmt, emulate=True))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tokens, docs, labels = _batch()
        for _ in range(4):
            opt.zero_grad()
            out = model(tokens, document_ids=docs, labels=labels)
            out.loss.backward()
            opt.step()
        losses[fp8] = out.loss.item()
    assert abs(losses[True] - losses[False]) <= 0.03 * losses[False], losses


def test_fp8_capability_errors_name_what_to_change():
    from engine.model.fp8 import Fp8Config, fp8_unsupported_reason

    cpu = torch.device("cpu")
    assert "compute capability >= 8.9" in fp8_unsupported_reason(Fp8Config(), cpu)
    assert "--fp8-backend te" in fp8_unsupported_reason(Fp8Config(recipe="delayed"), cpu)
    assert fp8_unsupported_reason(Fp8Config(emulate=True), cpu) is None


# ----------------------------------------------------------------------------------------------- CLI
def _cli(args: list[str], nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    if nproc == 1:
        cmd = [sys.executable, ENTRY, *args]
    else:
        from distributed_launch import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), ENTRY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _trainer(args: list[str]):
    from engine.training import Trainer, build_device_mesh, parse_training_config

    return Trainer(parse_training_config([*TINY_CLI, *args]), build_device_mesh())


@pytest.mark.parametrize("flags, message", [
    (["--attention-backend", "te"], "--attention-backend te: Transformer Engine attention runs on CUDA GPUs only"),
    (["--attention-backend", "triton"], "--attention-backend triton: the Triton kernels run on CUDA"),
    (["--fp8-format", "hybrid"], "--fp8-format hybrid: FP8 GEMMs need a CUDA GPU"),
    (["--fp8-format", "e4m3", "--fp8-recipe", "delayed"], "--fp8-recipe delayed needs --fp8-backend te"),
    (["--use-distributed-optimizer", "--data-parallel-sharding", "fsdp"], "FSDP2"),
    # Were tracebacks from the first step's kernel call (RuntimeError in chrysalis_kernels.runtime.check_tensors).
    (["--fused-linear-cross-entropy"], "--fused-linear-cross-entropy: the Triton kernels run on CUDA"),
    (["--fused-visual-head-loss"], "--fused-visual-head-loss: the Triton kernels run on CUDA"),
])
def test_unavailable_fast_paths_fail_at_start(flags, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        _trainer(flags)


def test_triton_attention_head_dim_is_checked_at_start(monkeypatch):
    """Head dim 8 (hidden 32 / 4 heads) was refused by the kernel at the first step, after data and model setup."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=re.escape("--attention-backend triton: head dim 8 (--hidden-size / "
                                                   "--num-attention-heads) is outside")):
        _trainer(["--attention-backend", "triton"])


def test_cli_refuses_an_unavailable_backend_before_training():
    result = _cli([*TINY_CLI, "--attention-backend", "flash", "--train-iters", "1"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: --attention-backend flash: flash-attn runs on CUDA GPUs only" in result.stderr
    assert "iteration" not in result.stdout


def test_sequence_parallel_without_tp_is_noted(capsys):
    _trainer(["--sequence-parallel", "--train-iters", "1"])
    assert "note: --sequence-parallel has no effect without tensor parallelism (TP 1)" in capsys.readouterr().out


def test_eval_interval_without_a_validation_split_is_noted(capsys):
    _trainer(["--eval-interval", "2", "--split", "100,0,0", "--train-iters", "1"])
    assert "note: --eval-interval 2 but --split 100,0,0 leaves nothing for validation" in capsys.readouterr().out


def test_auto_backend_resolves_at_start(capsys):
    trainer = _trainer(["--attention-backend", "auto", "--train-iters", "1"])
    assert trainer.model_config.attention_backend == "sdpa"
    assert "--attention-backend auto: using sdpa on cpu" in capsys.readouterr().out


# (layout flags, processes, the log line's wording, loss / grad-norm relative tolerances)
DISTRIBUTED_OPTIMIZER_CASES = {
    "dp2": ([], 2, r"this rank holds ([\d,]+) of ([\d,]+) trainable", 1e-6, 1e-5),
    "tp2-dp2": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 4,
                r"this rank holds ([\d,]+) of the ([\d,]+) trainable", 1e-5, 1e-4),
    "pp2-dp2": (["--pipeline-model-parallel-size", "2"], 4, r"this rank holds ([\d,]+) of the ([\d,]+) trainable",
                1e-5, 1e-4),
}


@pytest.mark.parametrize("case", list(DISTRIBUTED_OPTIMIZER_CASES))
def test_distributed_optimizer_matches_one_process(tmp_path, case):
    """--use-distributed-optimizer logs the losses and gradient norms of one process with the plain (whole)
    optimizer, while each rank holds about half of the optimizer state: on 2 gloo processes (data parallelism
    alone), and with TP or PP on 4 (it was refused there, and Megatron launch scripts pass it with both: FSDP2 over
    dp without resharding after forward). (test_training_distributed shows that 2-process DDP matches 1 process.)"""
    layout, nproc, held_line, loss_tol, grad_tol = DISTRIBUTED_OPTIMIZER_CASES[case]
    one = _trainer(["--log-jsonl", str(tmp_path / "one.jsonl")])
    one.train()
    log = tmp_path / "distopt.jsonl"
    result = _cli([*TINY_CLI, *layout, "--use-distributed-optimizer", "--log-jsonl", str(log)], nproc=nproc,
                  timeout=400 if nproc > 2 else 240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    held = re.search(held_line, result.stdout)
    local, total = (int(x.replace(",", "")) for x in held.groups())
    assert local <= 0.55 * total
    reference = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    sharded = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(reference) == len(sharded) == 3
    for a, b in zip(reference, sharded):
        assert abs(a["loss"] - b["loss"]) <= loss_tol * a["loss"], (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= grad_tol * a["grad_norm"], (a["grad_norm"], b["grad_norm"])
