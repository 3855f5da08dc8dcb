"""Fused kernels vs torch on one GPU: linear cross-entropy (peak memory and time vs the unfused LM head + CE),
RMSNorm + residual, rotary and the continuous-token head loss (time vs the torch.compile'd reference, achieved
memory bandwidth against the GPU's).

    python benchmarks/kernels_fused.py --output-dir $OUT            # one GPU
    python benchmarks/kernels_fused.py --smoke --output-dir /tmp/x  # CPU, Triton interpreter, tiny sizes

- linear CE: hidden [8192, 4096] bf16, LM head [128384, 4096] bf16 (LLaMA-3's 128,256 ids + 2 image tokens,
  padded to a multiple of 128), forward + backward. Unfused = the engine's path (`F.linear` then
  `text_cross_entropy_sum`, fp32 softmax). Peak memory is measured above what was allocated before the call
  (inputs and weights), gradients included; both ways are reported with and without the gradients dX and dW
  (which any implementation returns). Goal (issue 11): peak <= 1/8 of unfused, time <= 1.1x.
- RMSNorm + residual ([8192, 4096] bf16), rotary (q [8192, 32, 128], k [8192, 8, 128], positions restarting per
  document), head loss (2,048 rows of 4096 -> 4096 -> 1152): forward and forward + backward, ours vs
  `torch.compile` of the same torch reference and vs eager. Bandwidth = bytes that must move (inputs read once,
  outputs written once) / median time.
Interleaved rounds, medians, per-round ratios. Writes `kernels_fused.json` in --output-dir.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_common import environment, interleaved, setup_smoke, summarize, write_json

SMOKE = setup_smoke()

import torch
import torch.nn.functional as F

# Peak HBM bandwidth (bytes/s) of the GPUs we expect; None elsewhere (then no fraction is reported).
PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def peak_bandwidth(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return value
    return None


def _with_compiled(impls: dict, name: str, fn, args, *call_args) -> dict:
    """Adds `torch-compiled` (torch.compile of the reference) before the others, except in --smoke (CPU compile
    time would dominate a check that only proves the script runs)."""
    if not args.smoke:
        compiled = torch.compile(fn)
        impls = {**{k: v for k, v in impls.items() if k == "triton"}, name: lambda: compiled(*call_args),
                 **{k: v for k, v in impls.items() if k != "triton"}}
    return impls


def _add_bandwidth(summary: dict, nbytes: float, peak: float | None) -> None:
    for entry in summary.values():
        entry["gb_per_s"] = nbytes / entry["median_s"] / 1e9
        if peak:
            entry["fraction_of_peak_bandwidth"] = nbytes / entry["median_s"] / peak


def _grad_step(fn, inputs):
    def step():
        for t in inputs:
            t.grad = None
        out = fn()
        (out if out.dim() == 0 else out.float().sum()).backward()
    return step


def _peak_memory(step, device) -> float | None:
    """Bytes allocated at peak during `step` above what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - before)


# ------------------------------------------------------------------------------------------------ cases
def bench_linear_cross_entropy(args, device) -> dict:
    from chrysalis_kernels.linear_cross_entropy import linear_cross_entropy_sum

    from engine.model.losses import text_cross_entropy_sum

    n, h, v, real = args.ce_tokens, args.hidden, args.vocab, args.vocab - args.vocab_padding
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.02).to(device, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, real, (n,), generator=g).to(device)

    def unfused():
        return text_cross_entropy_sum(F.linear(x, w), labels, real)

    def fused():
        return linear_cross_entropy_sum(x, w, labels, real_vocab_size=real)

    steps = {"unfused": _grad_step(unfused, [x, w]), "fused": _grad_step(fused, [x, w])}
    with torch.no_grad():
        losses = {"unfused": float(unfused()), "fused": float(fused())}
    grads_bytes = float((x.numel() + w.numel()) * 2)
    memory = {name: _peak_memory(step, device) for name, step in steps.items()}
    times = summarize(interleaved(steps, device, args.rounds), "unfused")
    result = {"shape": {"tokens": n, "hidden": h, "vocab": v, "real_vocab": real}, "loss": losses, "time": times,
              "peak_bytes": memory, "gradient_bytes": grads_bytes}
    if memory["unfused"]:
        result["peak_ratio_fused_vs_unfused"] = memory["fused"] / memory["unfused"]
        result["peak_ratio_without_gradients"] = (memory["fused"] - grads_bytes) / (memory["unfused"] - grads_bytes)
    print(f"[linear CE] losses {losses}; time fused/unfused "
          f"{times['fused']['ratio_vs_unfused']['median']:.3f}; peak {memory}")
    return result


def bench_rmsnorm(args, device, peak) -> dict:
    from chrysalis_kernels.rmsnorm import add_rms_norm, add_rms_norm_reference

    n, c = args.tokens, args.hidden
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(n, c, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    w = torch.ones(c, device=device, dtype=torch.bfloat16, requires_grad=True)
    impls = _with_compiled({"triton": lambda: add_rms_norm(x, r, w),
                            "torch-eager": lambda: add_rms_norm_reference(x, r, w)},
                           "torch-compiled", add_rms_norm_reference, args, x, r, w)
    with torch.no_grad():
        forward = summarize(interleaved(impls, device, args.rounds), "triton")
    _add_bandwidth(forward, 4.0 * n * c * 2, peak)  # read x, r; write y, h

    def loss_of(fn):
        return lambda: sum(t.float().sum() for t in fn())
    both = summarize(interleaved({k: _grad_step(loss_of(f), [x, r, w]) for k, f in impls.items()}, device,
                                 args.rounds), "triton")
    _add_bandwidth(both, 4.0 * n * c * 2 + 4.0 * n * c * 2, peak)  # forward + backward (read dy, dh, h; write dx)
    print(f"[rmsnorm] forward {_fmt(forward)} | fwd+bwd {_fmt(both)}")
    return {"shape": [n, c], "forward": forward, "forward_backward": both}


def bench_rotary(args, device, peak) -> dict:
    from chrysalis_kernels.rotary import apply_rotary, apply_rotary_reference, positions_from_documents

    s, hq, hkv, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, s, hq, d, generator=g).to(device, torch.bfloat16).requires_grad_()
    k = torch.randn(1, s, hkv, d, generator=g).to(device, torch.bfloat16).requires_grad_()
    lengths = [max(1, s // 8)] * 7
    lengths.append(s - sum(lengths))
    ids = torch.repeat_interleave(torch.arange(8), torch.tensor(lengths))[None].to(device)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    def reference(q, k):
        positions = positions_from_documents(ids)
        return apply_rotary_reference(q, positions, inv_freq), apply_rotary_reference(k, positions, inv_freq)

    impls = _with_compiled({"triton": lambda: apply_rotary(q, k, inv_freq, document_ids=ids),
                            "torch-eager": lambda: reference(q, k)}, "torch-compiled", reference, args, q, k)
    with torch.no_grad():
        forward = summarize(interleaved(impls, device, args.rounds), "triton")
    nbytes = 2.0 * (q.numel() + k.numel()) * 2
    _add_bandwidth(forward, nbytes, peak)

    def loss_of(fn):
        return lambda: sum(t.float().sum() for t in fn())
    both = summarize(interleaved({k_: _grad_step(loss_of(f), [q, k]) for k_, f in impls.items()}, device,
                                 args.rounds), "triton")
    _add_bandwidth(both, 2 * nbytes, peak)
    print(f"[rotary] forward {_fmt(forward)} | fwd+bwd {_fmt(both)}")
    return {"shape": {"tokens": s, "q_heads": hq, "kv_heads": hkv, "head_dim": d}, "forward": forward,
            "forward_backward": both}


def bench_head_loss(args, device, peak) -> dict:
    from chrysalis_kernels.visual_head_loss import visual_head_loss_reference, visual_head_loss_sum

    m, h, dv = args.head_rows, args.hidden, args.vision_dim
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, h, generator=g).to(device, torch.bfloat16).requires_grad_()
    targets = torch.randn(m, dv, generator=g).to(device, torch.bfloat16)
    params = [(torch.randn(*shape, generator=g) * 0.02).to(device, torch.bfloat16).requires_grad_()
              for shape in ((h, h), (h,), (dv, h), (dv,))]
    impls = _with_compiled({"triton": lambda: visual_head_loss_sum(x, targets, *params),
                            "torch-eager": lambda: visual_head_loss_reference(x, targets, *params)},
                           "torch-compiled", visual_head_loss_reference, args, x, targets, *params)
    steps = {k: _grad_step(f, [x, *params]) for k, f in impls.items()}
    memory = {k: _peak_memory(step, device) for k, step in steps.items()}
    both = summarize(interleaved(steps, device, args.rounds), "triton")
    with torch.no_grad():
        forward = summarize(interleaved(impls, device, args.rounds), "triton")
    flops = 2.0 * m * h * (h + dv)
    for entry in forward.values():
        entry["tflops"] = flops / entry["median_s"] / 1e12
    for entry in both.values():  # ours recomputes the forward in the backward: 4 GEMMs of work counted as 3
        entry["tflops_of_useful_work"] = 3 * flops / entry["median_s"] / 1e12
    print(f"[head loss] forward {_fmt(forward)} | fwd+bwd {_fmt(both)} | peak {memory}")
    return {"shape": {"rows": m, "hidden": h, "vision_dim": dv}, "forward": forward, "forward_backward": both,
            "peak_bytes": memory}


def _fmt(summary: dict) -> str:
    return ", ".join(f"{k} {v['median_s'] * 1e3:.3f} ms" for k, v in summary.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under the Triton interpreter")
    parser.add_argument("--ce-tokens", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128384)
    parser.add_argument("--vocab-padding", type=int, default=126)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--head-rows", type=int, default=2048)
    parser.add_argument("--vision-dim", type=int, default=1152)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", nargs="+", choices=["linear_cross_entropy", "rmsnorm", "rotary", "head_loss"])
    args = parser.parse_args(argv)
    if args.smoke:
        args.ce_tokens, args.tokens, args.hidden, args.vocab, args.vocab_padding = 24, 16, 32, 160, 7
        args.heads, args.kv_heads, args.head_dim, args.head_rows, args.vision_dim, args.rounds = 2, 1, 16, 8, 24, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    peak = peak_bandwidth(device)
    results = {"environment": environment(device), "smoke": args.smoke, "config": vars(args),
               "peak_bandwidth_bytes_per_s": peak, "cases": {}}
    print(f"environment: {results['environment']}")
    cases = {"linear_cross_entropy": lambda: bench_linear_cross_entropy(args, device),
             "rmsnorm": lambda: bench_rmsnorm(args, device, peak), "rotary": lambda: bench_rotary(args, device, peak),
             "head_loss": lambda: bench_head_loss(args, device, peak)}
    for name, run in cases.items():
        if args.only and name not in args.only:
            continue
        try:
            results["cases"][name] = run()
        except Exception:  # noqa: BLE001 - one failing case must not lose the others' figures
            results["cases"][name] = {"error": traceback.format_exc()}
            print(f"[{name}] failed:\n{results['cases'][name]['error']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path = write_json(args.output_dir, "kernels_fused.json", results)
    print(f"wrote {path}; load average after {results['environment']['load_average_after']}")
    return 1 if any("error" in v for v in results["cases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
