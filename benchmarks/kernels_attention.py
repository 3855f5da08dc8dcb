"""Attention kernels side by side on one GPU: chrysalis_kernels (Triton bf16, FP8) vs torch SDPA (flash, cuDNN),
torch's varlen flash kernel, FlexAttention (compiled, document block mask), flash-attn and Transformer Engine when
installed. Forward and backward TFLOP/s at sequence 4096 and 8192, head dim 128, causal (one document a row) and
packed (documents of mixed lengths).

    python benchmarks/kernels_attention.py --output-dir $OUT            # one GPU (H100/H200: a few minutes)
    python benchmarks/kernels_attention.py --smoke --output-dir /tmp/x  # CPU, Triton interpreter, tiny sizes

FLOPs count the attended pairs only (causal within documents): forward 4 * Hq * D per pair (QK^T and PV),
backward 2.5x forward (FlashAttention's convention), so packed and causal rates compare the same kind of work.
Each implementation is timed in interleaved rounds (A B C ... A B C ...), medians reported with the per-round
ratio to our Triton kernel; outputs are checked against ours (max |difference|) so every side does the same work.
Goals (issue 11, H100/H200): bf16 forward >= 600 TFLOP/s, backward >= 450; FP8 forward >= 900.
Writes `kernels_attention.json` in --output-dir.
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


def document_lengths(total: int, seed: int, smallest: int, largest: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(smallest, largest + 1, (1,), generator=g)), total - sum(lengths)))
    return lengths


def attention_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return 4.0 * heads * head_dim * pairs


def implementations(q, k, v, lengths, device):
    """name -> forward callable on THD tensors q [T, Hq, D], k/v [T, Hkv, D] (returns [T, Hq, D]), for every
    implementation this process can run; name -> reason for the others."""
    from chrysalis_kernels.attention import packed_attention, packed_attention_fp8

    from engine.model.attention import document_block_mask
    from engine.model.attention_backends import unavailable_reason, varlen_attention

    t, hq, _ = q.shape
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    longest = max(lengths)
    gqa = hq != k.shape[1]
    impls, skipped = {}, {}
    impls["triton"] = lambda: packed_attention(q, k, v, cu, longest)
    impls["triton-fp8"] = lambda: packed_attention_fp8(q, k, v, cu, longest)
    one_document = len(lengths) == 1

    def bhsd(x):  # [T, H, D] -> [1, H, T, D]
        return x.permute(1, 0, 2).unsqueeze(0)

    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if one_document:
            for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                def call(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), is_causal=True,
                                                              enable_gqa=gqa)[0].permute(1, 0, 2)
                impls[name] = call
        else:
            skipped["sdpa-flash"] = skipped["sdpa-cudnn"] = "SDPA has no document mask short of a dense S x S mask"
        impls["sdpa-varlen"] = lambda: varlen_attention("sdpa", q, k, v, cu, longest)
        for backend, name in (("flash", "flash-attn"), ("te", "transformer-engine")):
            reason = unavailable_reason(backend, device)
            if reason is None:
                impls[name] = lambda backend=backend: varlen_attention(backend, q, k, v, cu, longest)
            else:
                skipped[name] = reason
    else:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        from engine.model.attention import document_causal_mask

        dense = document_causal_mask(ids)
        impls["sdpa-dense-cpu"] = lambda: F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), attn_mask=dense,
                                                                         enable_gqa=gqa)[0].permute(1, 0, 2)
    try:
        from torch.nn.attention.flex_attention import flex_attention

        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(device)
        block_mask = document_block_mask(ids, 1, t, device)
        if device.type == "cuda":
            flex, label, fq, fk, fv = torch.compile(flex_attention, dynamic=False), "flex-compiled", q, k, v
        else:  # eager, forward only: torch has no CPU FlexAttention backward (not even with inputs needing grad)
            flex, label, fq, fk, fv = flex_attention, "flex-eager-cpu", q.detach(), k.detach(), v.detach()
        impls[label] = lambda: flex(bhsd(fq), bhsd(fk), bhsd(fv), block_mask=block_mask,
                                    enable_gqa=gqa)[0].permute(1, 0, 2)
    except Exception as err:  # noqa: BLE001 - reported, the run goes on
        skipped["flex"] = repr(err)
    return impls, skipped


def run_case(name: str, lengths: list[int], args, device, dtype) -> dict:
    t, hq, hkv, d = sum(lengths), args.heads, args.kv_heads, args.head_dim
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(t, h, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv))
    flops = attention_flops(lengths, hq, d)
    impls, skipped = implementations(q, k, v, lengths, device)
    result = {"tokens": t, "documents": len(lengths), "lengths_min_max": [min(lengths), max(lengths)],
              "forward_gflop": flops / 1e9, "skipped": skipped, "forward": {}, "backward": {}, "max_abs_diff": {}}
    with torch.no_grad():
        ours = impls["triton"]()
        for impl, fn in list(impls.items()):
            try:
                result["max_abs_diff"][impl] = float((fn().float() - ours.float()).abs().max())
            except Exception as err:  # noqa: BLE001
                skipped[impl] = repr(err)
                impls.pop(impl)
        forward = interleaved(impls, device, args.rounds)
    for impl, entry in summarize(forward, "triton").items():
        entry["tflops"] = flops / entry["median_s"] / 1e12
        result["forward"][impl] = entry
    # Backward alone: one forward per implementation, then backward with the graph retained, interleaved.
    dout = torch.randn_like(ours)
    graphs, backward_fns = {}, {}
    for impl, fn in impls.items():
        if impl.startswith("flex") and device.type != "cuda":
            continue  # torch has no CPU FlexAttention backward
        try:
            graphs[impl] = fn()

            def backward(impl=impl):
                q.grad = k.grad = v.grad = None
                graphs[impl].backward(dout, retain_graph=True)
            backward()
            backward_fns[impl] = backward
        except Exception as err:  # noqa: BLE001
            skipped[f"{impl}-backward"] = repr(err)
    for impl, entry in summarize(interleaved(backward_fns, device, args.rounds), "triton").items():
        entry["tflops"] = 2.5 * flops / entry["median_s"] / 1e12
        result["backward"][impl] = entry
    print(f"[{name}] tokens {t}, {len(lengths)} documents, {flops / 1e9:.1f} forward GFLOP")
    for impl in result["forward"]:
        fw, bw = result["forward"][impl], result["backward"].get(impl)
        line = f"  {impl:20s} forward {fw['median_s'] * 1e3:9.3f} ms {fw['tflops']:8.1f} TFLOP/s"
        if bw:
            line += f" | backward {bw['median_s'] * 1e3:9.3f} ms {bw['tflops']:8.1f} TFLOP/s"
        print(line + f" | max|diff| vs triton {result['max_abs_diff'].get(impl, float('nan')):.3g}")
    for impl, why in skipped.items():
        print(f"  {impl:20s} skipped: {why}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under the Triton interpreter")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.heads, args.kv_heads, args.head_dim, args.rounds = [48], 2, 1, 16, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    results = {"environment": environment(device), "smoke": args.smoke, "config": vars(args), "cases": {}}
    print(f"environment: {results['environment']}")
    for s in args.seq_lens:
        smallest, largest = (3, s // 2) if args.smoke else (128, s // 2)
        for case, lengths in (("causal", [s]), ("packed", document_lengths(s, seed=s, smallest=smallest,
                                                                           largest=largest))):
            key = f"{case}-{s}"
            try:
                results["cases"][key] = run_case(key, lengths, args, device, dtype)
            except Exception:  # noqa: BLE001 - one failing case must not lose the others' figures
                results["cases"][key] = {"error": traceback.format_exc()}
                print(f"[{key}] failed:\n{results['cases'][key]['error']}")
    for s in args.seq_lens:
        packed, causal = results["cases"].get(f"packed-{s}", {}), results["cases"].get(f"causal-{s}", {})
        if "forward" in packed and "forward" in causal and "triton" in packed["forward"]:
            ratio = packed["forward"]["triton"]["tflops"] / causal["forward"]["triton"]["tflops"]
            results["cases"][f"packed-{s}"]["triton_packed_vs_causal_tflops"] = ratio
    path = write_json(args.output_dir, "kernels_attention.json", results)
    print(f"wrote {path}; load average after {results['environment']['load_average_after']}")
    failed = [k for k, v in results["cases"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
