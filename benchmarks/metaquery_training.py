"""MetaQuery training throughput: the Chrysalis recipe vs the reference's loop shape, same model, same batches.

Ours (`pretrain_gpt_vision.py --recipe metaquery`, `engine.metaquery.trainer.MetaQueryTrainer.train_step`): target
latents read from the build (`preprocess build --targets vae-latents`), prompts pre-tokenized, the frozen LLM run as
a no-grad prompt prefill + the N queries over its KV cache (backward through N positions per row; none at all with
`--freeze-queries`), AdamW over the queries and the connector.

Reference loop shape (facebookresearch/metaquery: HF Trainer over `MetaQuery.forward`, `dataset.py`): every step
reads and decodes each target image and applies its target transform, encodes it with the VAE
(`latent_dist.sample()`), tokenizes each caption with the chat template, runs one LLM forward over prompt + query
tokens whose input-embedding table is trainable (`modules_to_unfreeze: ...embed_tokens`, the pretrained rows'
gradients zeroed by a hook) so backward runs through every position of the frozen LLM, recomputes the LLM and
connector blocks in backward (`_gradient_checkpointing: True`), and steps AdamW (weight decay 0.1) over the whole
embedding table and the connector.

Same work: both loops start from the same weights (LLM, query rows, connector, decoder), see the same samples with
the same CFG drops, timestep draws and noise (the reference's posterior sample uses the same noise over its online
fp32 posterior; ours over the stored bf16 mean/std), so their first-step losses agree to bf16 rounding of the
latents; both are printed. Interleaved pairs (ours, reference) of `--steps` steps after warm-up, median of the
per-pair ratios with min-max, load average before/after (docs: /work/shared/BENCHMARKING.md).

    python benchmarks/metaquery_training.py                      # CPU, tiny model (the issue's comparison)
    python benchmarks/metaquery_training.py --mode gpu           # GPU: SD 1.5 512x512, 1B-class LLM, bf16
    python benchmarks/metaquery_training.py --mode gpu --smoke   # the GPU mode's code path at CPU sizes

The GPU mode also reports the share of a training step spent in the frozen LLM (prefill + query forward and the
backward through the queries, timed on its own on the same batch).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "sample" / "images"
PICTURES = ["astronaut.jpg", "coffee.jpg", "chelsea.jpg", "chelsea_eyes.jpg", "rocket.jpg", "rocket_gray.jpg"] + \
    [f"video/frame{i}.jpg" for i in range(4)]
# The reference's system prompt (models/model.py, MLLMInContextConfig.system_prompt), in every prompt as there.
SYSTEM_PROMPT = ("You will be given an image or its caption. Please describe the content of the image in detail in "
                 "your own words.")
WORDS = ("a photo of", "a painting of", "a close-up of", "a wide shot of", "a sketch of", "a blurry picture of")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--smoke", action="store_true", help="gpu mode at tiny sizes (checks the code path on CPU)")
    p.add_argument("--pairs", type=int, default=5, help="interleaved (ours, reference) pairs")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per pair")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 (cpu), 32 (gpu)")
    p.add_argument("--records", type=int, default=96, help="text-to-image pairs in the benchmark's build")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--freeze-queries", action="store_true", help="ours without any LLM backward")
    p.add_argument("--reference-no-checkpointing", action="store_true",
                   help="the reference loop without its gradient checkpointing (LLM, connector, decoder)")
    p.add_argument("--work-dir", default=None, help="keep the build and models here (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="OUT")
    return p.parse_args(argv)


def sizes(args) -> dict:
    """Model sizes per mode. cpu: the tiny model of the issue's comparison; gpu: SD 1.5 at 512 px, a LLaMA-3.2-1B-
    shaped LLM, the reference's 77 queries and 24-block connector."""
    if args.mode == "cpu":
        # The reference's SD 1.5 + LLaVA-OV-0.5B setup scaled down with its forward-FLOP proportions (printed
        # beside the real ones, counted on the meta device): VAE encoder ~1.4x the UNet, LLM ~0.1x, connector ~0.05x.
        # An 8x-downsampling 4-level VAE and a 4-level UNet at 128 px (16 x 16 latents), a 128-wide 2-layer LLaMA,
        # 77 queries, a 2-block connector, the reference's system prompt in every prompt.
        return {"image": 128, "vae_channels": (32, 64, 128, 128), "unet_channels": (64, 128, 256, 256),
                "width": 128, "llm": "tiny", "llm_hidden": 128, "llm_layers": 2, "queries": 77, "connector": 2,
                "batch": args.batch_size or 8, "bf16": False, "device": "cpu", "layers_per_block": 2, "vae_layers": 1}
    if args.smoke:
        return {"image": 64, "vae_channels": (32, 32, 64, 64), "unet_channels": (32, 32, 64, 64), "width": 96,
                "llm": "tiny", "llm_hidden": None, "llm_layers": None, "queries": 16, "connector": 2,
                "batch": args.batch_size or 2, "bf16": False, "device": "cuda" if torch.cuda.is_available() else "cpu",
                "layers_per_block": 1, "vae_layers": 1}
    return {"image": 512, "vae_channels": (128, 256, 512, 512), "unet_channels": (320, 640, 1280, 1280), "width": 768,
            "llm": "llama3.2-1b", "llm_hidden": None, "llm_layers": None, "queries": 77, "connector": 24,
            "batch": args.batch_size or 32, "bf16": True, "device": "cuda", "layers_per_block": 2, "vae_layers": 2}


# ----------------------------------------------------------------------------------------------------------- setup
def _run(cmd: list[str]) -> None:
    done = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{done.stderr[-3000:]}")


def prepare(work: Path, s: dict, args) -> dict:
    """Records, a random VAE + decoder directory, a vae-latents build and a random LLM checkpoint."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from engine.checkpoint_io import save_model_checkpoint
    from engine.config import preset
    from engine.model import build_model
    from engine.tokenizer import build_tokenizer
    from engine.training.data import padded_vocab_size

    records = work / "records.jsonl"
    captions = {}
    with open(records, "w") as f:
        for i in range(args.records):
            picture = PICTURES[i % len(PICTURES)]
            caption = f"{WORDS[i % len(WORDS)]} {Path(picture).stem.replace('_', ' ')} number {i}"
            captions[i] = (caption, picture)
            f.write(json.dumps({"id": f"t2i-{i}", "image": picture, "conversations": [
                {"from": "system", "value": SYSTEM_PROMPT}, {"from": "human", "value": caption},
                {"from": "gpt", "value": "<image>"}]}) + "\n")
    levels = len(s["vae_channels"])
    torch.manual_seed(0)
    groups = 32 if args.mode == "gpu" and not args.smoke else 8
    vae = AutoencoderKL(block_out_channels=s["vae_channels"], down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4,
                        layers_per_block=s["vae_layers"], norm_num_groups=groups, sample_size=s["image"])
    ulevels = len(s["unet_channels"])
    unet = UNet2DConditionModel(sample_size=s["image"] // 2 ** (levels - 1), in_channels=4, out_channels=4,
                                layers_per_block=s["layers_per_block"], block_out_channels=s["unet_channels"],
                                down_block_types=("CrossAttnDownBlock2D",) * (ulevels - 1) + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (ulevels - 1),
                                cross_attention_dim=s["width"], attention_head_dim=8, norm_num_groups=groups)
    decoder = work / "decoder"
    unet.save_pretrained(decoder / "unet")
    vae.save_pretrained(decoder / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, steps_offset=1).save_pretrained(decoder / "scheduler")
    build = work / "build"
    if not (build / "manifest.json").is_file():  # a --work-dir prepared before keeps its build (same inputs)
        _run(["-m", "preprocess", "build", "--input", str(records), "--image-root", str(SAMPLE), "--tokenizer-type",
              "tiktoken", "--tokenizer-model", str(REPO / "examples/data/tokenizer/tokenizer.model"),
              "--vision-encoder", "tiny-random", "--seq-length", "512", "--output", str(build), "--no-progress",
              "--image-decoder", "pil", "--targets", "vae-latents", "--vae", str(decoder), "--vae-image-size",
              str(s["image"])])
    tokenizer = build_tokenizer("tiktoken", REPO / "examples/data/tokenizer/tokenizer.model")
    size = padded_vocab_size(tokenizer.vocab_size, 128)
    shape = {} if s["llm_hidden"] is None else {"hidden_size": s["llm_hidden"], "ffn_hidden_size": 4 * s["llm_hidden"],
                                                 "num_layers": s["llm_layers"], "num_attention_heads": 4,
                                                 "num_query_groups": 4}
    llm_config = preset(s["llm"], vocab_size=size, real_vocab_size=tokenizer.vocab_size, seq_length=512,
                        max_position_embeddings=2048, rope_scaling=None, attention_backend="sdpa", **shape)
    model = build_model(llm_config, seed=3)
    vocab = {"base_vocab_size": tokenizer.base_vocab_size, "image_start_id": tokenizer.image_start_id,
             "image_end_id": tokenizer.image_end_id}
    save_model_checkpoint(model, work / "llm", vocab=vocab, tokenizer=tokenizer)
    return {"build": build, "decoder": decoder, "llm": work / "llm", "captions": captions}


def ours(world: dict, s: dict, args):
    from engine.metaquery.config import parse_metaquery_config
    from engine.metaquery.trainer import MetaQueryTrainer
    from engine.training.parallel import build_device_mesh

    flags = ["--data-path", str(world["build"]), "--decoder", str(world["decoder"]), "--llm", str(world["llm"]),
             "--num-queries", str(s["queries"]), "--connector-layers", str(s["connector"]), "--micro-batch-size",
             str(s["batch"]), "--train-iters", "100000", "--num-workers", "0", "--lr-warmup-iters", "0",
             "--split", "100,0,0", "--seed", "1"] + (["--bf16"] if s["bf16"] else []) + \
        (["--freeze-queries"] if args.freeze_queries else [])
    config, mq = parse_metaquery_config(flags)
    return MetaQueryTrainer(config, mq, build_device_mesh(), log=lambda *_: None)


class ReferenceLoop:
    """The reference's per-step work (module docstring) on the same weights as `trainer`'s initial ones."""

    def __init__(self, trainer, world: dict, s: dict, checkpointing: bool = True):
        from engine.metaquery.decoder import load_vae
        from engine.tokenizer import load_saved_tokenizer

        self.trainer, self.s, self.device = trainer, s, trainer.device
        self.llm = trainer.llm.model  # frozen weights; not modified by either loop
        vocab = self.llm.config.vocab_size
        self.vocab = vocab
        head = trainer.model
        # embed_tokens resized by N rows (the query tokens) and unfrozen; a hook zeroes the pretrained rows' grad
        table = torch.cat([self.llm.tok_embeddings.weight.detach().float(), head.queries.detach().float()])
        self.table = torch.nn.Parameter(table.to(self.device))
        self.table.register_hook(lambda g: torch.cat([torch.zeros_like(g[:vocab]), g[vocab:]]))
        self.connector = copy.deepcopy(head.connector)
        self.decoder = copy.deepcopy(trainer.frozen_decoder)
        if checkpointing:  # the reference's `self.transformer.enable_gradient_checkpointing()`
            self.decoder.enable_gradient_checkpointing()
        self.vae = load_vae(trainer.decoder_info).to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_saved_tokenizer(world["build"] / "tokenizer")
        self.captions = world["captions"]
        self.by_tokens = self._map_prompts()
        self.checkpointing = checkpointing
        self.seconds: dict[str, float] = {}  # where the reference loop's time goes
        params = [self.table, *self.connector.parameters()]
        decay = [p for p in params if p.ndim >= 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                           lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    def _map_prompts(self) -> dict:
        from engine.tokenizer import Turn, encode_generation_prompt

        out = {}
        for caption, picture in self.captions.values():
            tokens = encode_generation_prompt([Turn("system", SYSTEM_PROMPT), Turn("user", caption)], self.tokenizer,
                                              self.trainer.template).tokens
            out[tuple(tokens)] = (caption, picture)
        return out

    def _layer(self, layer, h, rope, mask):
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, h, rope, mask, use_reentrant=False)
        return layer(h, rope, mask)

    def step(self, items, batch) -> float:
        """One optimizer step on the samples of `batch` (ours' collated batch, for its CFG drops and noise)."""
        from engine.model.attention import AttentionMask, key_padding_causal_mask
        from engine.tokenizer import Turn, encode_generation_prompt
        from preprocess.vae_latents import target_pixels

        s, n = self.s, self.trainer.num_queries
        clock = [time.perf_counter()]
        pixels, prompts = [], []
        for (index, sample, *_), dropped in zip(items, batch.dropped_text.tolist()):
            caption, picture = self.by_tokens[tuple(int(t) for t in sample.tokens)]
            pixels.append(target_pixels((SAMPLE / picture).read_bytes(), s["image"]))  # decode + transform
            # a dropped caption: the null prompt, as ours (the reference keeps its system prompt there)
            turns = [Turn("user", "")] if dropped else [Turn("system", SYSTEM_PROMPT), Turn("user", caption)]
            tokens = encode_generation_prompt(turns, self.tokenizer, self.trainer.template).tokens
            prompts.append(tokens + list(range(self.vocab, self.vocab + n)))  # ... <img0> ... <imgN-1>
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, p in enumerate(prompts):  # left padding, as the reference's processor
            ids[row, length - len(p):] = torch.tensor(p)
            mask[row, length - len(p):] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=s["bf16"])
        clock.append(time.perf_counter())
        with torch.no_grad(), autocast:
            posterior = self.vae.encode(torch.stack(pixels).to(self.device)).latent_dist  # online VAE encoding
        _sync(self.device)
        clock.append(time.perf_counter())
        scale = self.vae.config.scaling_factor
        latents = (posterior.mean.float() + posterior.std.float() * batch.posterior_noise) * scale
        with autocast:
            h = F.embedding(ids, self.table)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            rope = self.llm.rope(positions, h.dtype)
            attention = AttentionMask("sdpa", dense=key_padding_causal_mask(mask, length))
            for layer in self.llm.layers.values():
                h = self._layer(layer, h, rope, attention)
            states = self.llm.norm(h)[:, -n:]
            x = states
            cos, sin = self.connector.rope(n, x.device, x.dtype)
            for block in self.connector.layers:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False) \
                    if self.checkpointing else block(x, cos, sin)
            c = self.connector
            cond = c.norm(c.proj_out(F.gelu(c.proj_in(x), approximate="tanh")))
            noisy, timesteps, target = self.trainer.schedule_noise.noisy_inputs(latents, batch.noise, batch.u)
            dtype = torch.bfloat16 if s["bf16"] else torch.float32
            pred = self.decoder(sample=noisy.to(dtype), timestep=timesteps, encoder_hidden_states=cond.to(dtype)).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([self.table, *self.connector.parameters()], 0.5)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        clock.append(time.perf_counter())
        for key, (a, b) in zip(("read+decode+tokenize", "vae_encode", "model+optimizer"), itertools.pairwise(clock)):
            self.seconds[key] = self.seconds.get(key, 0.0) + b - a
        return value


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = sizes(args)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device (use --smoke to check the code path on CPU)")
    load_before = os.getloadavg()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"preparing {args.mode}{' (smoke)' if args.smoke else ''} models and a vae-latents build in {work} ...",
          flush=True)
    world = prepare(work, s, args)
    trainer = ours(world, s, args)
    reference = ReferenceLoop(trainer, world, s, checkpointing=not args.reference_no_checkpointing)
    samples, collate = trainer.train_samples, trainer.collate
    cursor = [0]

    def next_items():
        items = [samples[cursor[0] + j] for j in range(s["batch"])]
        cursor[0] += s["batch"]
        return items

    # Same work: the first batch through both, from the same initial weights.
    items = next_items()
    batch = collate(items).to(trainer.device)
    first_ours = trainer.train_step([batch])["loss"]
    first_reference = reference.step(items, batch)
    print(f"same work: first-step loss ours {first_ours:.6f}, reference loop {first_reference:.6f}")

    def run_ours(k):
        _sync(trainer.device)
        tic = time.perf_counter()
        for _ in range(k):
            items = next_items()  # ours reads stored latents and pre-tokenized prompts: this is its data loading
            trainer.train_step([collate(items).to(trainer.device)])
        _sync(trainer.device)
        return time.perf_counter() - tic

    def run_reference(k):
        _sync(trainer.device)
        tic = time.perf_counter()
        for _ in range(k):
            items = next_items()
            reference.step(items, collate(items).to(trainer.device))  # decodes, tokenizes, encodes itself
        _sync(trainer.device)
        return time.perf_counter() - tic

    run_ours(args.warmup)
    run_reference(args.warmup)
    rows = []
    for pair in range(args.pairs):
        a, b = run_ours(args.steps), run_reference(args.steps)
        rows.append({"ours_samples_per_s": args.steps * s["batch"] / a,
                     "reference_samples_per_s": args.steps * s["batch"] / b, "ratio": b / a})
        print(f"pair {pair}: ours {rows[-1]['ours_samples_per_s']:.2f} samples/s, reference loop "
              f"{rows[-1]['reference_samples_per_s']:.2f} samples/s, ratio {b / a:.2f}x", flush=True)
    ratios = [r["ratio"] for r in rows]
    result = {"mode": args.mode, "smoke": args.smoke, "sizes": s, "threads": args.threads,
              "freeze_queries": args.freeze_queries, "batch": s["batch"],
              "ours_samples_per_s": statistics.median(r["ours_samples_per_s"] for r in rows),
              "reference_samples_per_s": statistics.median(r["reference_samples_per_s"] for r in rows),
              "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
              "first_step_loss": {"ours": first_ours, "reference": first_reference}}
    flops = forward_flops(trainer, reference, items, batch)
    result["forward_gflops_per_sample"] = {k: round(v / 1e9, 4) for k, v in flops.items()}
    real = reference_setup_flops()
    real.pop("_")
    result["reference_setup_forward_gflops_per_sample"] = {k: round(v, 1) for k, v in real.items()}
    for name, split in (("this model", result["forward_gflops_per_sample"]), ("reference setup", real)):
        print(f"forward FLOPs relative to the decoder ({name}): " + ", ".join(
            f"{k} {v / split['decoder']:.2f}" for k, v in split.items()))
    total = sum(reference.seconds.values())
    result["reference_time_split"] = {k: round(v / total, 3) for k, v in reference.seconds.items()}
    result.update(llm_share(trainer, collate(next_items()).to(trainer.device), args.steps))
    result.update({"load_before": load_before, "load_after": os.getloadavg(), "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu"})
    print(json.dumps(result, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


def forward_flops(trainer, reference, items, batch) -> dict:
    """Forward FLOPs per sample of each part (torch.utils.flop_counter), to compare the model's proportions with
    the real setup's: VAE encoder, LLM over prompt + queries, connector, decoder."""
    from torch.utils.flop_counter import FlopCounterMode

    from preprocess.vae_latents import target_pixels

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / batch.size

    picture = reference.by_tokens[tuple(int(t) for t in items[0][1].tokens)][1]
    pixels = torch.stack([target_pixels((SAMPLE / picture).read_bytes(), reference.s["image"])] * batch.size)
    head = trainer.model
    queries = head.queries.detach()
    with torch.no_grad():
        states = trainer.llm.query_states(batch.tokens, batch.attention_mask, batch.visual_tokens,
                                          batch.visual_positions, queries, grad=False)
        cond = head.connector(states)
    latents = trainer._latents(batch)
    t = torch.full((batch.size,), 500, device=trainer.device)
    return {"vae_encoder": count(lambda: reference.vae.encode(pixels.to(trainer.device))),
            "llm_prompt_and_queries": count(lambda: trainer.llm.query_states(
                batch.tokens, batch.attention_mask, batch.visual_tokens, batch.visual_positions, queries,
                grad=False)),
            "connector": count(lambda: head.connector(states)),
            "decoder": count(lambda: trainer.frozen_decoder(sample=latents, timestep=t, encoder_hidden_states=cond))}


def reference_setup_flops() -> dict:
    """Forward GFLOPs per sample of the reference's configs/llavaov0p5_sd.yaml models (random weights on the meta
    device, so nothing is allocated or downloaded): SD 1.5's VAE encoder at 512 px and UNet at 64 x 64 latents,
    Qwen2-0.5B's decoder (LLaVA-OV-0.5B's LLM: 24 layers, 896 wide; its LM head is replaced by Identity there) over
    140 tokens (system prompt, caption, 77 queries), the 24-block connector over 77 queries."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from engine.config import ModelConfig
    from engine.metaquery.connector import Connector, ConnectorConfig
    from engine.model import VPiTModel

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
        llm = VPiTModel(ModelConfig(vocab_size=151936, hidden_size=896, ffn_hidden_size=4864, num_layers=24,
                                    num_attention_heads=14, num_query_groups=2, attention_backend="sdpa"))
        connector = Connector.__new__(Connector)
        torch.nn.Module.__init__(connector)
        config = ConnectorConfig(hidden_size=896, output_size=768, num_layers=24)
        connector.config = config
        from engine.metaquery.connector import ConnectorBlock, ConnectorRMSNorm

        connector.layers = torch.nn.ModuleList(ConnectorBlock(config) for _ in range(24))
        connector.proj_in = torch.nn.Linear(896, 768)
        connector.proj_out = torch.nn.Linear(768, 768)
        connector.norm = ConnectorRMSNorm(768, 1e-5)
        tokens = torch.zeros(1, 140, dtype=torch.long)
        h = torch.zeros(1, 140, 896)
        mask = llm.layers["0"].attention  # noqa: F841 (llm layers run below)
        rope = llm.rope(torch.arange(140)[None], torch.float32)
        from engine.model.attention import build_attention_mask

        dense = build_attention_mask("sdpa", None, 1, 140, torch.device("meta"))
        return {"vae_encoder": count(lambda: vae.encode(torch.zeros(1, 3, 512, 512))),
                "llm_prompt_and_queries": count(lambda: [layer(h, rope, dense) for layer in llm.layers.values()]),
                "connector": count(lambda: connector(torch.zeros(1, 77, 896))),
                "decoder": count(lambda: unet(torch.zeros(1, 4, 64, 64), torch.tensor([500]),
                                              encoder_hidden_states=torch.zeros(1, 77, 768))),
                "_": tokens.numel()}


def llm_share(trainer, batch, steps: int) -> dict:
    """Seconds per step of a full train step vs the frozen LLM alone (prefill + queries forward and the backward
    through the queries) on the same batch; their ratio is the LLM's share of the step."""
    def timed(fn):
        fn()
        _sync(trainer.device)
        tic = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(trainer.device)
        return (time.perf_counter() - tic) / steps

    head = trainer.model

    def llm_only():
        with trainer._autocast():
            states = trainer.llm.query_states(batch.tokens, batch.attention_mask, batch.visual_tokens,
                                              batch.visual_positions, head.queries, grad=head.queries.requires_grad)
        if states.requires_grad:
            states.float().sum().backward()
        head.queries.grad = None

    step = timed(lambda: trainer.train_step([batch]))
    llm = timed(llm_only)
    return {"step_s": step, "llm_s": llm, "llm_share": llm / step}


if __name__ == "__main__":
    sys.exit(main())
