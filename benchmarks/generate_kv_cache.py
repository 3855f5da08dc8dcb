"""Generation throughput: KV-cache decoding vs recomputing the whole sequence every step (MetaMorph's reference
decoder), and batching. CPU, fp32, random weights (speed does not depend on them).

    python benchmarks/generate_kv_cache.py [--models tiny,58m] [--new-tokens 512] [--batches 1,8,32] [--threads 2]

Each sample generates exactly `--new-tokens` positions: greedy text, one image (`<image_start>`, 64 visual tokens
through the continuous-token head and the projector, forced `<image_end>`) starting at `--image-at`, then text
until the budget; the choices are scripted (no stop token) so every run does the same work. Both methods run
`engine.generation.VPiTGenerator` (the same state machine; `use_kv_cache=False` re-runs the full sequence each
step, one sample at a time, like the reference). Reported: new tokens per second (visual tokens count) = batch x
new tokens / wall time, best of `--repeats` runs (recompute: one run for the large model).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from engine.config import ModelConfig, preset
from engine.generation import PromptTokens, SamplingConfig, VPiTGenerator
from engine.model.vpit import build_model

MODELS = {
    "tiny": lambda: preset("tiny", vocab_size=896, max_position_embeddings=2048),
    # ~58M parameters: 8 layers of width 512 (GQA 8/4), 32k vocabulary.
    "58m": lambda: ModelConfig(vocab_size=32000, hidden_size=512, ffn_hidden_size=1408, num_layers=8,
                               num_attention_heads=8, num_query_groups=4, seq_length=2048,
                               max_position_embeddings=2048),
}


class ScriptedGenerator(VPiTGenerator):
    """Greedy text, but `<image_start>` at step `image_at` and never a stop token."""

    image_at = 100

    def select_text_tokens(self, logits, rows, step, generators, sampling):
        chosen = super().select_text_tokens(logits, rows, step, generators, sampling)
        return [self.image_start_id if step == self.image_at else t for t in chosen]


def make_generator(model, use_kv_cache: bool, image_at: int) -> ScriptedGenerator:
    v = model.config.vocab_size
    gen = ScriptedGenerator(model, image_start_id=v - 4, image_end_id=v - 3, stop_ids=set(), valid_vocab_size=v - 4,
                            pad_id=0, use_kv_cache=use_kv_cache)
    gen.image_at = image_at
    return gen


def prompts(batch: int, length: int, vocab: int) -> list[PromptTokens]:
    g = torch.Generator().manual_seed(0)
    return [PromptTokens(tokens=torch.randint(0, vocab - 4, (length,), generator=g).tolist(), seed=i)
            for i in range(batch)]


def timed(gen, batch_prompts, sampling, repeats: int) -> tuple[float, list]:
    best, results = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        results = gen.generate(batch_prompts, sampling)
        best = min(best, time.perf_counter() - start)
    return best, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,58m")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--image-at", type=int, default=100)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip-recompute", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    rows = []
    for name in args.models.split(","):
        config = MODELS[name]()
        model = build_model(config, seed=0).eval()
        params = sum(t.numel() for t in model.parameters())
        single = prompts(1, args.prompt_length, config.vocab_size)
        make_generator(model, True, args.image_at).generate(single, SamplingConfig(max_new_tokens=8))  # warm-up
        cached_s, cached = timed(make_generator(model, True, args.image_at), single, sampling, args.repeats)
        assert cached[0].new_positions == args.new_tokens and len(cached[0].images) == 1
        row = {"model": name, "params_m": round(params / 1e6, 1), "batch": 1, "new_tokens": args.new_tokens,
               "cached_s": round(cached_s, 2), "cached_tok_s": round(args.new_tokens / cached_s, 1)}
        if not args.skip_recompute:
            repeats = args.repeats if params < 20e6 else 1
            full_s, full = timed(make_generator(model, False, args.image_at), single, sampling, repeats)
            assert full[0].token_ids == cached[0].token_ids  # same work, same output
            row.update(recompute_s=round(full_s, 2), recompute_tok_s=round(args.new_tokens / full_s, 1),
                       speedup=round(full_s / cached_s, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
        for batch in [int(b) for b in args.batches.split(",")]:
            batch_prompts = prompts(batch, args.prompt_length, config.vocab_size)
            seconds, results = timed(make_generator(model, True, args.image_at), batch_prompts, sampling,
                                     args.repeats if batch < 32 or params < 20e6 else 1)
            assert all(r.new_positions == args.new_tokens for r in results)
            out = {"model": name, "batch": batch, "seconds": round(seconds, 2),
                   "tok_s": round(batch * args.new_tokens / seconds, 1)}
            print(json.dumps(out), flush=True)
            rows.append(out)


if __name__ == "__main__":
    main()
