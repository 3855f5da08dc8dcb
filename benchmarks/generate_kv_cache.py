"""Generation speed, side by side in one run: our decoder vs recomputing every step (MetaMorph's reference loop),
vs Hugging Face `LlamaForCausalLM.generate()` on the same weights, vs the weight-streaming bound.

    python benchmarks/generate_kv_cache.py --threads 1                    # CPU: 58M model, 512 new tokens, 3 pairs
    python benchmarks/generate_kv_cache.py --threads 2 --pairs 5 --json out.json
    python benchmarks/generate_kv_cache.py --sections bound,batch --batches 8,32
    python benchmarks/generate_kv_cache.py --gpu --json $OUT/generate_gpu.json   # GPU: 1B-class bf16 (see --help)
    python benchmarks/generate_kv_cache.py --smoke [--gpu]                # every code path at tiny sizes, on CPU

How it measures (shared/BENCHMARKING.md): every comparison runs its sides interleaved, A B A B, after a warm-up
run of each, for `--pairs` rounds; a round's ratio compares the two runs of that round, and the report is the
median ratio with its min-max. The load average is printed before and after each section. Both sides do the
same work, checked and printed: the same prompt token ids, the same number of new tokens, the same scripted
choices, and the tokens that come out are compared (and the visual tokens, for the VPiT section). Ratios are
wall clock; the CPU-time ratios printed beside them are steadier on a shared machine with `--threads 1` (with
more threads, OpenMP workers' time is not attributed evenly to short calls: read wall time).

CPU sections (`--sections`, default all; random fp32 weights: speed does not depend on them):
  vpit   batch 1, VPiT decoding: greedy text, `<image_start>` forced at step `--image-at`, 64 visual tokens fed
         back through the continuous-token head and the projector, forced `<image_end>`, text to the budget of
         `--new-tokens` positions (visual tokens count). Ours (static KV cache) vs the same state machine with
         `use_kv_cache=False` (the whole sequence through the model at every step, like the reference).
  bound  batch 1, text only, greedy: ours vs HF `generate()` (its default dynamic KV cache, sdpa attention, same
         weights exported with `engine.convert`'s name map, `<image_start>`/`<image_end>` suppressed in both) vs the
         weight-streaming bound: the bytes of every matrix a text step reads (the blocks' linears and the LM head)
         divided by the bandwidth of batch-1 GEMVs over those same matrices (`F.linear` of a [1, in] input with
         each, one after the other, measured in the same round). Ratios: bound time / ours, ours / HF.
  batch  text only, greedy, `--batches` rows (different prompts of equal length): ours vs HF `generate()`.

GPU mode (`--gpu`): a Llama-3.2-1B-shaped model (16 layers, hidden 2048, GQA 32/8, SwiGLU 8192, vocabulary
128256, tied embeddings, bf16), text only, greedy, batch 1/8/32: ours compiled (`torch.compile`,
mode="reduce-overhead": CUDA graphs over the static cache) vs ours eager vs HF `generate()` (bf16, its default
cache), interleaved. Reports tokens/s, the HBM bandwidth fraction (weights' bytes x steps/s / peak HBM bandwidth
of the device, from its datasheet, and / a device-to-device copy bandwidth measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import ModelConfig, preset
from engine.generation import PromptTokens, SamplingConfig, VPiTGenerator
from engine.generation.linear_kernels import onednn_linear_available
from engine.model.vpit import build_model

MODELS = {
    "tiny": lambda: preset("tiny", vocab_size=896, max_position_embeddings=2048),
    # ~58M parameters: 8 layers of width 512 (GQA 8/4), 32k vocabulary (untied LM head).
    "58m": lambda: ModelConfig(vocab_size=32000, hidden_size=512, ffn_hidden_size=1408, num_layers=8,
                               num_attention_heads=8, num_query_groups=4, seq_length=2048,
                               max_position_embeddings=2048),
    # Llama-3.2-1B's shape (1.24B parameters, tied embeddings, Llama-3.1 RoPE scaling): the engine's preset.
    "1b": lambda: preset("llama3.2-1b"),
}

# Peak HBM bandwidth (bytes/s) from the datasheets, by a substring of torch.cuda.get_device_name().
HBM_PEAK = [("GH200", 4.0e12), ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H800", 3.35e12),
            ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
            ("B200", 8.0e12)]


# ------------------------------------------------------------------------------------------------ generators
class TextOnly(VPiTGenerator):
    """Our decoder, never starting an image by itself (the scripted choice that matches HF's suppress_tokens)."""

    def text_logits(self, hidden):
        logits = super().text_logits(hidden)
        logits[:, self.image_start_id] = float("-inf")
        return logits


class ScriptedImage(TextOnly):
    """Greedy text, `<image_start>` at step `image_at`, never a stop token: every run does the same work."""

    image_at = 100

    def select_text_tokens(self, logits, step, batch, sampling):
        chosen = super().select_text_tokens(logits, step, batch, sampling)
        return torch.where(step == self.image_at, self.image_start_id, chosen)


def special_ids(config: ModelConfig) -> tuple[int, int]:
    """(image_start, image_end): the last two real vocabulary rows."""
    v = config.num_real_tokens
    return v - 2, v - 1


def make_generator(cls, model, **kw) -> VPiTGenerator:
    start, end = special_ids(model.config)
    return cls(model, image_start_id=start, image_end_id=end, stop_ids=set(),
               valid_vocab_size=model.config.num_real_tokens, pad_id=0, **kw)


def make_prompts(batch: int, length: int, config: ModelConfig) -> list[PromptTokens]:
    g = torch.Generator().manual_seed(0)
    return [PromptTokens(tokens=torch.randint(0, special_ids(config)[0], (length,), generator=g).tolist(), seed=i)
            for i in range(batch)]


def hf_from_ours(model, device: torch.device, dtype: torch.dtype):
    """`LlamaForCausalLM` holding our model's LLaMA weights: config and names through `engine.convert`, the real
    vocabulary rows only (as the HF export writes them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.convert import chrysalis_to_hf_name, hf_config_from_model

    config = model.config
    hf_config = LlamaConfig(**hf_config_from_model(config, {}), attn_implementation="sdpa")
    with torch.device(device):
        hf = LlamaForCausalLM(hf_config)
    state = {}
    for name, value in model.state_dict().items():
        hf_name = chrysalis_to_hf_name(name)
        if hf_name is not None:
            state[hf_name] = value[:config.num_real_tokens] if name in ("tok_embeddings.weight", "output.weight") \
                else value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"weights do not map onto HF: missing {missing}, unexpected {unexpected}")
    hf = hf.to(dtype).eval()
    hf.generation_config.eos_token_id = None  # exactly max_new_tokens, like our scripted runs
    hf.generation_config.pad_token_id = 0
    return hf


def hf_generate(hf, prompts: list[PromptTokens], new_tokens: int, suppress: list[int]) -> list[list[int]]:
    ids = torch.tensor([p.tokens for p in prompts], device=hf.device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          suppress_tokens=suppress)
    return out[:, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------------------------ timing
def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timed:
    seconds: float  # wall clock: what the ratios use
    cpu_seconds: float  # this process's CPU time (all threads): far less disturbed by other jobs' load
    output: object


def timed(fn, device: torch.device) -> Timed:
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return Timed(time.perf_counter() - start, time.process_time() - start_cpu, out)


def interleaved(sides: dict, pairs: int, device: torch.device, warmup: dict | None = None) -> dict[str, list[Timed]]:
    """One warm-up run of each side (or of its `warmup` callable: a shorter run of the same code), then `pairs`
    rounds of every side in order (A B A B ...)."""
    for name, fn in sides.items():
        (warmup or {}).get(name, fn)()
    runs: dict[str, list[Timed]] = {name: [] for name in sides}
    for i in range(pairs):
        line = []
        for name, fn in sides.items():
            runs[name].append(timed(fn, device))
            line.append(f"{name} {runs[name][-1].seconds:.2f} s (cpu {runs[name][-1].cpu_seconds:.2f})")
        print(f"    round {i + 1}: " + ", ".join(line) + f"  (load {load()})", flush=True)
    return runs


def summary(ratios: list[float]) -> dict:
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3), "per_round": [round(r, 3) for r in ratios]}


def fmt(s: dict) -> str:
    return f"{s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f})"


def ratios(num: list[Timed], den: list[Timed]) -> tuple[dict, dict]:
    """Per-round num/den time ratios, wall clock and CPU time."""
    return (summary([a.seconds / b.seconds for a, b in zip(num, den)]),
            summary([a.cpu_seconds / b.cpu_seconds for a, b in zip(num, den)]))


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def step_matrices(model) -> list[torch.Tensor]:
    """The matrices one text decode step reads: the blocks' linears and the LM head (the embedding row, norms,
    projector and continuous-token head are not part of a text step or are negligible)."""
    mats = [m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("layers.")]
    return mats + [model.output.weight]


def gemv_sweep(mats: list[torch.Tensor], repeats: int = 3) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds to stream every matrix once with batch-1 GEMVs ([1, in] inputs), with each kernel a
    decoder may use: ATen's `F.linear` (MKL on x86 CPUs) and, on CPU, oneDNN's linear. Each matrix is timed on its
    own (median of `repeats` after a warm-up) and "best" sums the faster kernel per matrix: the bound."""
    device = mats[0].device
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in mats]
    kernels = {"aten": F.linear}
    if device.type == "cpu" and onednn_linear_available():
        kernels["onednn"] = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    per_matrix = {name: [[] for _ in mats] for name in kernels}  # [(wall, cpu)] per matrix
    for name, kernel in kernels.items():
        for sweep in range(repeats + 1):  # the first sweep is a warm-up
            for i, (x, w) in enumerate(zip(inputs, mats)):
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                kernel(x, w)
                sync(device)
                if sweep:
                    per_matrix[name][i].append((time.perf_counter() - start, time.process_time() - start_cpu))
    medians = {name: [(statistics.median(t for t, _ in m), statistics.median(c for _, c in m)) for m in ms]
               for name, ms in per_matrix.items()}
    out = {name: (sum(t for t, _ in ms), sum(c for _, c in ms)) for name, ms in medians.items()}
    best = [min((medians[name][i] for name in kernels), key=lambda tc: tc[0]) for i in range(len(mats))]
    out["best"] = (sum(t for t, _ in best), sum(c for _, c in best))
    return out


# ------------------------------------------------------------------------------------------------ CPU sections
def section_vpit(model, args) -> dict:
    print(f"\n[vpit] batch 1, {args.new_tokens} new positions, image at step {args.image_at}: KV cache vs recompute "
          f"(load {load()})", flush=True)
    prompts = make_prompts(1, args.prompt_length, model.config)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    cached, full = make_generator(ScriptedImage, model), make_generator(ScriptedImage, model, use_kv_cache=False)
    cached.image_at = full.image_at = args.image_at
    short = SamplingConfig(max_new_tokens=min(args.new_tokens, args.image_at + 80))  # warm-up: through the image
    runs = interleaved({"cached": lambda: cached.generate(prompts, sampling),
                        "recompute": lambda: full.generate(prompts, sampling)}, args.pairs, torch.device("cpu"),
                       warmup={"recompute": lambda: full.generate(prompts, short)})
    a, b = runs["cached"][-1].output[0], runs["recompute"][-1].output[0]
    same_tokens = a.token_ids == b.token_ids and a.new_positions == b.new_positions == args.new_tokens
    agree = common_prefix(a.token_ids, b.token_ids)
    image_diff = max((x - y).abs().max().item() for x, y in zip(a.images, b.images)) if a.images else None
    speedup, speedup_cpu = ratios(runs["recompute"], runs["cached"])
    out = {"section": "vpit", "batch": 1, "new_tokens": args.new_tokens, "images": len(a.images),
           "cached_tok_s": [round(args.new_tokens / r.seconds, 2) for r in runs["cached"]],
           "recompute_tok_s": [round(args.new_tokens / r.seconds, 2) for r in runs["recompute"]],
           "speedup": speedup, "speedup_cpu_time": speedup_cpu, "same_tokens": same_tokens,
           "tokens_in_agreement": agree, "positions": [a.new_positions, b.new_positions],
           "max_visual_token_diff": image_diff,
           "load_after": load()}
    print(f"  check: same {len(a.token_ids)} token ids and {a.new_positions} positions: {same_tokens} (first {agree} "
          f"ids agree; positions {a.new_positions} and {b.new_positions}); {len(a.images)} image(s) each, max |visual "
          f"token difference| {image_diff}")
    print(f"  KV cache vs recompute: {fmt(speedup)} (goal >= 10x); by CPU time {fmt(speedup_cpu)}  "
          f"(load {load()})", flush=True)
    return out


def section_bound(model, hf, args) -> dict:
    print(f"\n[bound] batch 1, text only, {args.new_tokens} new tokens: ours vs HF generate() vs weight streaming "
          f"(load {load()})", flush=True)
    prompts = make_prompts(1, args.prompt_length, model.config)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    ours = make_generator(TextOnly, model)
    mats = step_matrices(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in mats)
    runs = interleaved({"ours": lambda: ours.generate(prompts, sampling),
                        "hf": lambda: hf_generate(hf, prompts, args.new_tokens, list(special_ids(model.config))),
                        "gemv": lambda: gemv_sweep(mats)}, args.pairs, torch.device("cpu"))
    same = runs["ours"][-1].output[0].token_ids == runs["hf"][-1].output[0]
    agree = common_prefix(runs["ours"][-1].output[0].token_ids, runs["hf"][-1].output[0])
    per_token = [r.seconds / args.new_tokens for r in runs["ours"]]
    per_token_cpu = [r.cpu_seconds / args.new_tokens for r in runs["ours"]]
    # Seconds per token at the measured GEMV bandwidth, the faster kernel for each matrix (wall; and CPU time).
    bound = [g.output["best"][0] for g in runs["gemv"]]
    bound_cpu = [g.output["best"][1] for g in runs["gemv"]]
    over_hf, over_hf_cpu = ratios(runs["hf"], runs["ours"])
    out = {"section": "bound", "batch": 1, "new_tokens": args.new_tokens, "weight_bytes": weight_bytes,
           "ours_tok_s": [round(1 / t, 2) for t in per_token],
           "hf_tok_s": [round(args.new_tokens / r.seconds, 2) for r in runs["hf"]],
           "gemv_gb_s": [round(weight_bytes / b / 1e9, 2) for b in bound],
           "gemv_gb_s_by_kernel": {k: [round(weight_bytes / g.output[k][0] / 1e9, 2) for g in runs["gemv"]]
                                   for k in runs["gemv"][0].output},
           "bound_tok_s": [round(1 / b, 2) for b in bound],
           "ours_time_over_bound": summary([t / b for t, b in zip(per_token, bound)]),
           "ours_time_over_bound_cpu_time": summary([t / b for t, b in zip(per_token_cpu, bound_cpu)]),
           "ours_over_hf": over_hf, "ours_over_hf_cpu_time": over_hf_cpu,
           "same_tokens": same, "tokens_in_agreement": agree, "load_after": load()}
    by_kernel = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in out["gemv_gb_s_by_kernel"].items())
    print(f"  check: same {args.new_tokens} tokens out as HF: {same} (first {agree} agree); {weight_bytes / 1e6:.1f} MB of matrices per "
          f"step, GEMV bandwidth {statistics.median(out['gemv_gb_s']):.1f} GB/s (median; by kernel {by_kernel})")
    print(f"  ours time per token / weight-streaming bound: {fmt(out['ours_time_over_bound'])} (goal <= 1.5); "
          f"by CPU time {fmt(out['ours_time_over_bound_cpu_time'])}")
    print(f"  ours vs HF generate(): {fmt(over_hf)} faster; by CPU time {fmt(over_hf_cpu)}  (load {load()})",
          flush=True)
    return out


def section_batch(model, hf, args, batch: int) -> dict:
    print(f"\n[batch] batch {batch}, text only, {args.new_tokens} new tokens: ours vs HF generate() "
          f"(load {load()})", flush=True)
    prompts = make_prompts(batch, args.prompt_length, model.config)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    ours = make_generator(TextOnly, model)
    runs = interleaved({"ours": lambda: ours.generate(prompts, sampling),
                        "hf": lambda: hf_generate(hf, prompts, args.new_tokens, list(special_ids(model.config)))},
                       args.pairs, torch.device("cpu"))
    ours_ids = [r.token_ids for r in runs["ours"][-1].output]
    same = sum(a == b for a, b in zip(ours_ids, runs["hf"][-1].output))
    agree = min(common_prefix(a, b) for a, b in zip(ours_ids, runs["hf"][-1].output))
    work = batch * args.new_tokens
    over_hf, over_hf_cpu = ratios(runs["hf"], runs["ours"])
    out = {"section": "batch", "batch": batch, "new_tokens": args.new_tokens,
           "ours_tok_s": [round(work / r.seconds, 1) for r in runs["ours"]],
           "hf_tok_s": [round(work / r.seconds, 1) for r in runs["hf"]],
           "ours_over_hf": over_hf, "ours_over_hf_cpu_time": over_hf_cpu,
           "rows_with_same_tokens": same, "min_tokens_in_agreement": agree, "load_after": load()}
    print(f"  check: rows whose {args.new_tokens} tokens equal HF's: {same}/{batch} (every row agrees for its first "
          f"{agree}; greedy fp32 paths with different summation orders part at near-ties of random weights)")
    print(f"  ours vs HF generate(): {fmt(over_hf)} faster (goal >= 1.5x); by CPU time {fmt(over_hf_cpu)}  "
          f"(load {load()})", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ GPU mode
def peak_bandwidth(device: torch.device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    for key, value in HBM_PEAK:
        if key in name:
            return name, value
    return name, None


def copy_bandwidth(device: torch.device, dtype: torch.dtype, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), median of 5."""
    src = torch.empty(nbytes // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        times.append(timed(lambda: dst.copy_(src), device).seconds)
    return 2 * src.numel() * src.element_size() / statistics.median(times[1:])


def gpu_mode(args) -> dict:
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(MODELS[args.model](), device=device, dtype=dtype, seed=0).eval().requires_grad_(False)
    hf = hf_from_ours(model, device, dtype)
    name, peak = peak_bandwidth(device)
    mats = step_matrices(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in mats)
    measured = copy_bandwidth(device, dtype, 256 << 20 if not args.smoke else 1 << 20)
    print(f"[gpu] {name}: {args.model}, {weight_bytes / 1e9:.2f} GB of matrices per step, peak HBM "
          f"{peak and peak / 1e12} TB/s, measured copy {measured / 1e12:.2f} TB/s (load {load()})", flush=True)
    compile_options = {"backend": "aot_eager"} if args.smoke else {"mode": "reduce-overhead"}
    compiled = make_generator(TextOnly, model, compile=True, compile_options=compile_options)
    eager = make_generator(TextOnly, model, compile=False)
    results = {"mode": "gpu", "device": name, "model": args.model, "dtype": str(dtype), "weight_bytes": weight_bytes,
               "peak_hbm_bytes_s": peak, "measured_copy_bytes_s": measured, "rows": [],
               "cuda": torch.version.cuda, "triton": _version("triton")}
    for batch in args.batch_list:
        try:
            row = gpu_row(args, model, hf, compiled, eager, batch, weight_bytes, peak, measured, device)
        except Exception as err:  # noqa: BLE001 (record it and go on: GPU minutes are scarce)
            import traceback

            row = {"batch": batch, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            print(f"  batch {batch}: FAILED {row['error']}", flush=True)
        results["rows"].append(row)
        if args.json:  # after every row, so a timeout keeps what was measured
            write_json(args.json, {"gpu": results})
    return results


def gpu_row(args, model, hf, compiled, eager, batch, weight_bytes, peak, measured, device) -> dict:
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    prompts = make_prompts(batch, args.prompt_length, model.config)
    start = time.perf_counter()
    compiled.generate(prompts, sampling)  # compile + CUDA graph capture for this shape
    compile_s = time.perf_counter() - start
    runs = interleaved({"compiled": lambda p=prompts: compiled.generate(p, sampling),
                        "eager": lambda p=prompts: eager.generate(p, sampling),
                        "hf": lambda p=prompts: hf_generate(hf, p, args.new_tokens, list(special_ids(model.config)))},
                       args.pairs, device)
    work = batch * args.new_tokens
    steps_s = [args.new_tokens / r.seconds for r in runs["compiled"]]
    c_ids = [r.token_ids for r in runs["compiled"][-1].output]
    row = {"batch": batch, "new_tokens": args.new_tokens, "first_call_s": round(compile_s, 1),
           "compiled_tok_s": [round(work / r.seconds, 1) for r in runs["compiled"]],
           "eager_tok_s": [round(work / r.seconds, 1) for r in runs["eager"]],
           "hf_tok_s": [round(work / r.seconds, 1) for r in runs["hf"]],
           "compiled_over_eager": summary([e.seconds / c.seconds for c, e in zip(runs["compiled"],
                                                                                    runs["eager"])]),
           "compiled_over_hf": summary([h.seconds / c.seconds for c, h in zip(runs["compiled"], runs["hf"])]),
           "hbm_fraction_of_peak": None if peak is None else summary([weight_bytes * s / peak for s in steps_s]),
           "hbm_fraction_of_measured_copy": summary([weight_bytes * s / measured for s in steps_s]),
           "rows_same_as_eager": sum(a == b.token_ids for a, b in zip(c_ids, runs["eager"][-1].output)),
           "rows_same_as_hf": sum(a == b for a, b in zip(c_ids, runs["hf"][-1].output)), "load_after": load()}
    print(f"  batch {batch}: compiled {statistics.median(row['compiled_tok_s'])} tok/s, eager "
          f"{statistics.median(row['eager_tok_s'])}, HF {statistics.median(row['hf_tok_s'])}; compiled/eager "
          f"{fmt(row['compiled_over_eager'])}, compiled/HF {fmt(row['compiled_over_hf'])}; HBM fraction "
          f"{row['hbm_fraction_of_peak'] and fmt(row['hbm_fraction_of_peak'])} of peak (goal >= 0.70 at batch 1)"
          f"; rows equal to eager {row['rows_same_as_eager']}/{batch}, to HF {row['rows_same_as_hf']}/{batch}",
          flush=True)
    row["compiled_fell_back_to_eager"] = not compiled.compile
    return row


# ------------------------------------------------------------------------------------------------ main
def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 (not installed)
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="default: 58m on CPU, 1b with --gpu")
    p.add_argument("--sections", default="vpit,bound,batch", help="CPU sections to run (comma-separated)")
    p.add_argument("--new-tokens", type=int, default=None, help="new positions per sample (default: 512; GPU 256)")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--image-at", type=int, default=100, help="vpit section: step at which the image starts")
    p.add_argument("--batches", default=None, help="batch section (default: 8,32) / GPU mode (default: 1,8,32)")
    p.add_argument("--pairs", type=int, default=3, help="interleaved rounds per comparison (>= 3 for a report)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--gpu", action="store_true", help="the GPU mode (see above)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that every path runs")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every figure here")
    args = p.parse_args(argv)
    if args.smoke:
        args.model = args.model or "tiny"
        args.new_tokens = args.new_tokens or 70
        args.image_at = min(args.image_at, 2)
        args.pairs = min(args.pairs, 1)
        args.batches = args.batches or "2"
    args.model = args.model or ("1b" if args.gpu else "58m")
    args.new_tokens = args.new_tokens or (256 if args.gpu else 512)
    args.batch_list = [int(b) for b in (args.batches or ("1,8,32" if args.gpu else "8,32")).split(",")]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = {"torch": torch.__version__, "transformers": _version("transformers"), "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load_before": load(),
              "model": args.model, "pairs": args.pairs, "new_tokens": args.new_tokens}
    print("# " + ", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    results: dict = {"header": header, "sections": []}
    with torch.no_grad():
        if args.gpu:
            results["gpu"] = gpu_mode(args)
        else:
            model = build_model(MODELS[args.model](), seed=0).eval().requires_grad_(False)
            print(f"# {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M parameters, fp32")
            sections = args.sections.split(",")
            if "vpit" in sections:
                results["sections"].append(section_vpit(model, args))
            hf = hf_from_ours(model, torch.device("cpu"), torch.float32) if {"bound", "batch"} & set(sections) \
                else None
            if "bound" in sections:
                results["sections"].append(section_bound(model, hf, args))
            if "batch" in sections:
                for batch in args.batch_list:
                    results["sections"].append(section_batch(model, hf, args, batch))
    results["header"]["load_after"] = load()
    print(f"\n# load average after: {load()}", flush=True)
    if args.json:
        write_json(args.json, results)
    return results


def write_json(path: str, results: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
