"""Forward+backward step time: Chrysalis `VPiTModel` vs Hugging Face `LlamaForCausalLM`, same config and weights.

Both models get the same shapes, the same weights (ours are copied into HF's through `engine.convert`'s name
map), the same tokens and a plain next-token LM loss over every position (ours: `labels` = the next token, no
visual tokens; HF: `labels=tokens`, which it shifts itself), so the first-step losses agree to ~1e-5 and are
printed as a check that the two really do the same work. Runs are interleaved (A B A B ...) after warm-up so
that drift in the machine (frequency, other load) hits both alike; the median of each is reported.

    python benchmarks/model_step_vs_hf.py                     # ~100M params: hidden 768, 12 layers, seq 512
    python benchmarks/model_step_vs_hf.py --preset tiny --iters 20
    python benchmarks/model_step_vs_hf.py --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from engine.config import ModelConfig, preset
from engine.convert import chrysalis_to_hf_name
from engine.model import IGNORE_INDEX, build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="a Chrysalis model preset (e.g. tiny); default: the ~100M config")
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--num-attention-heads", type=int, default=12)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--iters", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.preset:
        return preset(args.preset, seq_length=args.seq_length, attention_backend="sdpa")
    return ModelConfig(hidden_size=args.hidden_size, num_layers=args.num_layers,
                       num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                       ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab_size, seq_length=args.seq_length,
                       max_position_embeddings=max(args.seq_length, 2048), attention_backend="sdpa")


def hf_model(cfg: ModelConfig, ours: torch.nn.Module) -> torch.nn.Module:
    """`LlamaForCausalLM` with `cfg`'s shapes and `ours`' LLaMA weights (projector/head have no HF counterpart)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rotary_base, "factor": cfg.rope_scaling.factor,
                "low_freq_factor": cfg.rope_scaling.low_freq_factor,
                "high_freq_factor": cfg.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings}
    hf_cfg = LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        vocab_size=cfg.vocab_size, rope_theta=cfg.rotary_base, rope_parameters=rope, rms_norm_eps=cfg.norm_epsilon,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )
    hf = LlamaForCausalLM(hf_cfg)
    state = {}
    for name, value in ours.state_dict().items():
        hf_name = chrysalis_to_hf_name(name)
        if hf_name is not None:
            state[hf_name] = value
    hf.load_state_dict(state, strict=False)
    return hf.train()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = model_config(args)
    ours = build_model(cfg, seed=0).train()
    hf = hf_model(cfg, ours)

    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_length))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX  # the same S-1 targets per row that HF's internal shift of labels=tokens gives

    def step_ours() -> float:
        ours.zero_grad(set_to_none=True)
        loss = ours(tokens, labels=labels).loss
        loss.backward()
        return loss.item()

    def step_hf() -> float:
        hf.zero_grad(set_to_none=True)
        loss = hf(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.item()

    loss_ours, loss_hf = step_ours(), step_hf()
    for _ in range(max(args.warmup - 1, 0)):
        step_ours()
        step_hf()
    # Wall time is what the table reports; process CPU time (all threads) is kept too because on a shared
    # machine another job's load inflates wall time of whichever step it lands on, but much less its CPU time.
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    cpu: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(args.iters):
        for name, step in (("ours", step_ours), ("hf", step_hf)):
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)

    ours_ms, hf_ms = statistics.median(times["ours"]), statistics.median(times["hf"])
    params = sum(p.numel() for p in hf.parameters())
    label = args.preset or f"h{cfg.hidden_size} L{cfg.num_layers} heads{cfg.num_attention_heads}/{cfg.num_query_groups}"
    result = {
        "config": label, "llama_params": params, "batch": args.batch_size, "seq": args.seq_length,
        "threads": args.threads, "iters": args.iters, "warmup": args.warmup,
        "ours_ms": round(ours_ms, 2), "hf_ms": round(hf_ms, 2), "ratio": round(ours_ms / hf_ms, 3),
        "ours_min_ms": round(min(times["ours"]), 2), "hf_min_ms": round(min(times["hf"]), 2),
        "min_ratio": round(min(times["ours"]) / min(times["hf"]), 3),
        "ours_cpu_ms": round(statistics.median(cpu["ours"]), 2), "hf_cpu_ms": round(statistics.median(cpu["hf"]), 2),
        "cpu_ratio": round(statistics.median(cpu["ours"]) / statistics.median(cpu["hf"]), 3),
        "ours_ms_all": [round(t, 2) for t in times["ours"]], "hf_ms_all": [round(t, 2) for t in times["hf"]],
        "first_loss_ours": loss_ours, "first_loss_hf": loss_hf, "torch": torch.__version__,
    }
    print(f"first-step loss: ours {loss_ours:.6f}  hf {loss_hf:.6f}  |diff| {abs(loss_ours - loss_hf):.2e}",
          file=sys.stderr)
    print(f"min ms/step: ours {min(times['ours']):.1f}  hf {min(times['hf']):.1f}  "
          f"ratio {min(times['ours']) / min(times['hf']):.3f}", file=sys.stderr)
    print(f"median CPU ms/step: ours {result['ours_cpu_ms']:.1f}  hf {result['hf_cpu_ms']:.1f}  "
          f"ratio {result['cpu_ratio']:.3f}", file=sys.stderr)
    print("| config | LLaMA params | batch x seq | threads | ours ms/step | HF ms/step | ours/HF |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {label} | {params / 1e6:.1f}M | {args.batch_size} x {args.seq_length} | {args.threads} "
          f"| {ours_ms:.1f} | {hf_ms:.1f} | {ours_ms / hf_ms:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
