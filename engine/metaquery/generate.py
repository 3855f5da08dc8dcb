"""Rendering images from a MetaQuery checkpoint: `python -m engine.generate --recipe metaquery ...`.

    python -m engine.generate --recipe metaquery --load CKPT --prompt "a red fox in the snow" --output OUT \\
        [--image src.jpg] [--batch-file prompts.jsonl] [--guidance-scale 3.0] [--image-guidance-scale 1.5] \\
        [--steps 30] [--batch-size 8] [--seed 0]

Writes OUT/images/sample_NNNNN.png (one per prompt, input order) and OUT/results.jsonl. Exit status: 0 on
success; 1 on bad input (a flag value, the batch file, the checkpoint, a missing LLM or decoder) with one line
`error: ...`; 2 on unknown flags.

Guidance is the reference's (`MetaQuery.sample_images`, facebookresearch/metaquery models/metaquery.py):
  * text-only prompt: eps = eps(null) + s * (eps(prompt) - eps(null));
  * prompt with images (and `--image-guidance-scale` > 1): eps = eps(null) + s_img * (eps(null text, images) -
    eps(null)) + s * (eps(prompt) - eps(null text, images)),
where the null prompt is the chat template around an empty user turn (with the images' places: their SigLIP
tokens all zero, what training's CFG dropout uses), DPM-Solver++ over `--steps`, and each prompt's starting noise
drawn from (seed, its index), so a prompt renders the same whatever batch it falls in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported after argument parsing: `--help` stays fast
    import torch

_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class MetaQueryRenderer:
    """Everything rendering needs, loaded from a checkpoint by `load_renderer`."""

    head: Any  # MetaQueryHead
    llm: Any  # FrozenLLM
    decoder_info: Any
    decoder: torch.nn.Module
    vae: Any
    tokenizer: Any
    template: str
    latent_shape: tuple[int, int, int]
    scaling_factor: float
    shift_factor: float | None
    vision_encoder: dict | None
    device: torch.device
    dtype: torch.dtype

    def conditions(self, rows: list) -> torch.Tensor:
        """[(tokens, image slot starts, SigLIP rows)] -> [R, N, D] decoder conditioning."""
        import torch

        from engine.metaquery.data import left_padded

        tokens, mask, visual, positions = left_padded([(t, s) for t, s, _ in rows], [e for *_, e in rows],
                                                      self.tokenizer.pad_id)
        with torch.no_grad():
            return self._conditions(tokens, mask, visual, positions)

    def _conditions(self, tokens, mask, visual, positions):
        states = self.llm.query_states(tokens.to(self.device), mask.to(self.device),
                                       visual.to(self.device, self.dtype) if visual.shape[0] else None,
                                       positions.to(self.device) if visual.shape[0] else None,
                                       self.head.queries.to(self.dtype), grad=False)
        return self.head.connector(states.to(self.dtype))

    def render(self, prompts: list, image_tokens: list, *, guidance_scale: float = 3.0,
               image_guidance_scale: float = 1.5, steps: int = 30, seed: int = 0,
               first_index: int = 0) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1] for `prompts` (`engine.generation.PromptInput`); `image_tokens[i]` holds
        prompt i's images as SigLIP rows [k, 64, 1152] (None without images). Sample i's noise is seeded by
        (seed, first_index + i)."""
        import torch

        with torch.no_grad():
            return self._render(prompts, image_tokens, guidance_scale, image_guidance_scale, steps, seed, first_index)

    def _render(self, prompts, image_tokens, guidance_scale, image_guidance_scale, steps, seed, first_index):
        import numpy as np
        import torch

        from engine.generation.prompts import encode_prompt
        from engine.metaquery.data import null_prompts
        from engine.metaquery.decoder import decoder_forward, sampling_scheduler

        counts = [0 if t is None else t.shape[0] for t in image_tokens]
        nulls = null_prompts(self.tokenizer, self.template, max(counts))
        rows, branch = [], []  # branch[i] = (uncond row, uncond-text row or None, cond row)
        for i, (item, images) in enumerate(zip(prompts, image_tokens)):
            k = counts[i]
            encoded = encode_prompt(item, self.tokenizer, self.template, seed=i, image_tokens=images)
            emb = images if images is not None else torch.zeros(0, 64, 1152, dtype=torch.bfloat16)
            null = nulls[k]
            rows.append((null.tokens, null.image_slot_starts, torch.zeros_like(emb)))
            uncond_text = None
            if k and image_guidance_scale > 1.0:
                uncond_text = len(rows)
                rows.append((null.tokens, null.image_slot_starts, emb))
            rows.append((np.asarray(encoded.tokens, dtype=np.int64), np.asarray(encoded.image_slot_starts), emb))
            branch.append((len(rows) - 2 - (uncond_text is not None), uncond_text, len(rows) - 1))
        cond = self.conditions(rows)
        owner = torch.empty(len(rows), dtype=torch.long)
        for i, (u, ut, c) in enumerate(branch):
            owner[[r for r in (u, ut, c) if r is not None]] = i
        c_, side, _ = self.latent_shape
        latents = torch.stack([torch.randn(c_, side, side, generator=torch.Generator().manual_seed(
            (seed * 1_000_003 + first_index + i) % (2 ** 63))) for i in range(len(prompts))]).to(self.device)
        scheduler = sampling_scheduler(self.decoder_info, steps)
        for t in scheduler.timesteps:
            x = latents[owner.to(self.device)]
            if hasattr(scheduler, "scale_model_input"):
                x = scheduler.scale_model_input(x, t)
            timestep = t.reshape(1).expand(x.shape[0]).to(self.device)
            pred = decoder_forward(self.decoder_info.kind, self.decoder, x.to(self.dtype), timestep, cond).float()
            guided = []
            for u, ut, c in branch:
                if ut is None:
                    guided.append(pred[u] + guidance_scale * (pred[c] - pred[u]))
                else:
                    guided.append(pred[u] + image_guidance_scale * (pred[ut] - pred[u])
                                  + guidance_scale * (pred[c] - pred[ut]))
            latents = scheduler.step(torch.stack(guided), t, latents).prev_sample
        z = latents / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        images = self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1).cpu()


def load_renderer(load: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  llm: str | None = None, decoder: str | None = None, log=print) -> MetaQueryRenderer:
    """A MetaQuery training checkpoint (`--save` directory or one `iter_*`) ready to render.

    Args:
        llm / decoder: where the frozen LLM / the decoder directory are now, when they moved since training
            (the LLM's fingerprint is checked; a mismatch is a warning with an override).
    """
    import torch

    from engine.metaquery.connector import ConnectorConfig
    from engine.metaquery.decoder import inspect_decoder, load_decoder_model, load_vae
    from engine.metaquery.llm import reload_llm
    from engine.metaquery.model import FrozenLLM, MetaQueryHead
    from engine.tokenizer import load_saved_tokenizer
    from engine.training import checkpoint as ckpt

    device = torch.device(device)
    dtype = dtype or torch.float32
    from engine.generation.loading import _is_model_checkpoint

    if Path(load).is_dir() and _is_model_checkpoint(Path(load)):
        raise ValueError(f"--load {load} is not a MetaQuery checkpoint but a model-only LLM checkpoint (generate "
                         "with it without --recipe metaquery, or train MetaQuery on it with --llm)")
    path, record = ckpt.open_for_reading(load)
    if record.get("recipe") != "metaquery":
        raise ValueError(f"--load {path} is not a MetaQuery checkpoint (VPiT checkpoints generate without "
                         "--recipe metaquery)")
    arch = record["model"]
    info = inspect_decoder(decoder or record["decoder"]["path"])
    if info.kind != arch["decoder_kind"]:
        raise ValueError(f"--decoder {info.root} holds a {info.kind} decoder; {path} was trained with a "
                         f"{arch['decoder_kind']}")
    model = reload_llm(record["llm"], llm, log=log).to(device, dtype)
    trained_decoder = load_decoder_model(info, torch.float32) if arch["train_decoder"] else None
    head = MetaQueryHead(int(arch["num_queries"]), ConnectorConfig(**arch["connector"]), decoder=trained_decoder)
    ckpt.load_model_weights(path, head)
    head = head.to(device, dtype).eval().requires_grad_(False)
    frozen = head.decoder if trained_decoder is not None else load_decoder_model(info, dtype).to(device)
    frozen.eval().requires_grad_(False)
    vae = load_vae(info, torch.float32).to(device).eval().requires_grad_(False)
    vae_meta = (record.get("data") or {}).get("vae") or {}
    return MetaQueryRenderer(head=head, llm=FrozenLLM(model), decoder_info=info, decoder=frozen, vae=vae,
                             tokenizer=load_saved_tokenizer(path / "tokenizer"),
                             template=record.get("chat_template") or "llama3",
                             latent_shape=tuple(arch["latent_shape"]),
                             scaling_factor=float(vae_meta.get("scaling_factor", vae.config.scaling_factor)),
                             shift_factor=vae_meta.get("shift_factor"),
                             vision_encoder=(record.get("data") or {}).get("vision_encoder"), device=device,
                             dtype=dtype)


def build_parser() -> argparse.ArgumentParser:
    from engine.generate import generation_parser

    p = generation_parser("python -m engine.generate --recipe metaquery", __doc__,
                          load_help="a MetaQuery training --save directory (or iter_*)",
                          image_help="a source image for --prompt")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="text guidance (default: 3.0, the reference's eval)")
    p.add_argument("--image-guidance-scale", type=float, default=1.5,
                   help="source-image guidance for prompts with images (default: 1.5, the reference's; <= 1 turns it off)")
    p.add_argument("--steps", type=int, default=30, help="DPM-Solver++ steps (default: 30, the reference's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts rendered together")
    p.add_argument("--llm", default=None, metavar="PATH", help="the frozen LLM's location, if it moved")
    p.add_argument("--decoder", default=None, metavar="DIR", help="the decoder directory's location, if it moved")
    p.add_argument("--vision-encoder", default=None, metavar="SPEC", help="SigLIP for --image (default: the data's)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    from engine.cli_help import show_defaults

    return show_defaults(p)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from engine.generation.loading import build_prompt_encoder
    from engine.generation.prompts import encode_images

    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    from engine.generate import check_output_dir, read_inputs, resolve_device

    check_output_dir(args.output)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would render the same images into the same files
        raise ValueError("--recipe metaquery renders in one process (no tensor parallelism yet): run it with "
                         "python -m engine.generate, not torchrun")
    if not (math.isfinite(args.guidance_scale) and math.isfinite(args.image_guidance_scale)):
        raise ValueError("--guidance-scale and --image-guidance-scale must be finite")
    device = resolve_device(args.device)
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                                     else torch.float32)
    inputs = read_inputs(args)
    print(f"loading {args.load} on {device} ...", flush=True)
    renderer = load_renderer(args.load, device=device, dtype=dtype, llm=args.llm, decoder=args.decoder)
    encoder = None
    if any(item.images for item in inputs):
        encoder = build_prompt_encoder(renderer.vision_encoder, args.vision_encoder, device)
    tokens = [encode_images(item.images, encoder) if item.images else None for item in inputs]
    from engine.data.atomic import real_subdir, write_file_inside, write_png_inside

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    real_subdir(out, "images")
    print(f"rendering {len(inputs)} image(s), {args.steps} steps, guidance {args.guidance_scale} ...", flush=True)
    names = []
    for start in range(0, len(inputs), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        images = renderer.render(inputs[chunk], tokens[chunk], guidance_scale=args.guidance_scale,
                                 image_guidance_scale=args.image_guidance_scale, steps=args.steps, seed=args.seed,
                                 first_index=start)
        for offset, image in enumerate(images):
            name = f"images/sample_{start + offset:05d}.png"
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # [3, S, S] -> [S, S, 3]
            from PIL import Image

            write_png_inside(Image.fromarray(array), out / name)  # a symlink planted there is replaced
            names.append(name)
    lines = [json.dumps({"index": i, "prompt": item.prompt, "images": item.images, "image": name,
                         "seed": args.seed, "guidance_scale": args.guidance_scale,
                         "image_guidance_scale": args.image_guidance_scale, "steps": args.steps},
                        ensure_ascii=False) + "\n" for i, (item, name) in enumerate(zip(inputs, names))]
    write_file_inside(out / "results.jsonl", "".join(lines).encode("utf-8"))
    print(f"wrote {len(names)} image(s) under {(out / 'images').resolve()} and {(out / 'results.jsonl').resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # CheckpointError and TokenizerFormatError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
