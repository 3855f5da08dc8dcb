"""MetaQuery samples from preprocess builds made with `--targets vae-latents`, and their micro-batches.

A build holds packed conversations (docs/data_format.md). Every response image (an image in an assistant turn)
of every document is one MetaQuery sample:

    prompt  = the document's tokens before that image's `<image_start>` (system/user turns, the assistant header,
              any assistant text before the image), with the SigLIP rows of the images in it (prompt images:
              the source images of instruction pairs)
    target  = the image's VAE latent (`engine.data.latents`, same global row as its SigLIP embedding)

So a text-to-image record `{"conversations": [{"from": "human", "value": "a red fox"}, {"from": "gpt", "value":
"<image>"}], "image": "fox.jpg"}` gives one sample, an instruction record with `<image>` in the human turn and one
in the gpt turn (MetaQuery-Instruct / editing) gives one sample whose prompt holds the source image, and records
without a response image (VQA, text) give none: one build can feed both VPiT and MetaQuery.

Everything random about a sample is drawn from generators keyed by (`--seed`, its global sample index) in the
collate function: classifier-free-guidance dropout (the reference's rates, `--cfg-prob` / `--cfg-instruct-prob`),
the timestep draw u and the noise (and, for AutoencoderKL latents, the posterior sample). A training step is then
a deterministic function of its batch: resume is exact and every data-parallel / tensor-parallel layout sees the
same noise for the same sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import TOKENS_PER_IMAGE, VISION_DIM
from engine.training.data import BlendedSamples


@dataclass(frozen=True)
class MetaQuerySample:
    """One sample. `tokens` int32 [L] (image slots hold a placeholder), `image_slot_starts` [k] into `tokens`,
    `image_rows` [k] global SigLIP rows of the prompt images, `target_row` the target's global latent row."""

    tokens: np.ndarray
    image_slot_starts: np.ndarray
    image_rows: np.ndarray
    target_row: int


class MetaQueryDataset:
    """The MetaQuery samples of one build (module docstring), in build order.

    Args:
        path: a build made with `--targets vae-latents`.
        check_sha256: re-hash every file against the manifest first.
    """

    def __init__(self, path: str | Path, *, check_sha256: bool = False):
        from engine.data.latents import LatentStore
        from engine.data.shards import ShardReader

        self.reader = ShardReader(path, check_sha256=check_sha256)
        self.manifest = self.reader.manifest
        self.latents = LatentStore(self.reader.out_dir, self.manifest)
        self.seq_length = self.reader.seq_length
        entries = []  # (shard, sequence, prompt start, prompt end, target image index)
        for g in range(len(self.reader)):
            shard, sequence = self.reader.locate(g)
            packed = self.reader.sequence(shard, sequence)
            bounds = packed.document_bounds
            for image, (slot, is_response) in enumerate(zip(packed.image_slot_starts, packed.image_is_response)):
                if is_response:
                    doc = int(np.searchsorted(bounds, slot, side="right")) - 1
                    entries.append((shard, sequence, int(bounds[doc]), int(slot) - 1, image))
        self.index = np.asarray(entries, dtype=np.int64).reshape(-1, 5)
        self.max_prompt_images = 0
        for i in range(len(self)):
            self.max_prompt_images = max(self.max_prompt_images, len(self[i].image_rows))

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, i: int) -> MetaQuerySample:
        shard, sequence, start, end, target = (int(x) for x in self.index[i])
        packed = self.reader.sequence(shard, sequence)
        slots = packed.image_slot_starts
        prompt = (slots >= start) & (slots < end)  # images of this document before the target's <image_start>
        return MetaQuerySample(tokens=np.asarray(packed.tokens[start:end], dtype=np.int32),
                               image_slot_starts=(slots[prompt] - start).astype(np.int64),
                               image_rows=np.asarray(packed.image_rows[prompt], dtype=np.int64),
                               target_row=int(packed.image_rows[target]))

    def embeddings(self, rows) -> torch.Tensor:
        return self.reader.embeddings(rows)


class MetaQuerySamples(BlendedSamples):
    """The global sample order of one split (blending, epochs, shuffling: `engine.training.data.BlendedSamples`);
    item g -> (g, sample, prompt-image SigLIP rows [k, 64, 1152] bf16, stored target latent [*row_shape] bf16)."""

    def __getitem__(self, index: int):
        dataset, position = self.locate(index)
        data = self.datasets[dataset]
        sample = data[position]
        return index, sample, data.embeddings(sample.image_rows), data.latents.rows_of([sample.target_row])[0]


@dataclass
class MetaQueryBatch:
    """One micro-batch.

    Args:
        tokens: [B, L] prompt ids, left-padded with the pad id; attention_mask [B, L] bool (True = real token).
        visual_tokens: [V, 1152] bf16 SigLIP tokens of the prompt images at flat positions `visual_positions` [V]
            of B*L.
        latents: [B, *row_shape] stored target latents (bf16).
        posterior_noise: [B, C, h, w] draw for a gaussian latent row (zeros for deterministic latents).
        noise: [B, C, h, w] diffusion noise; u: [B] uniform in [0, 1) picking each sample's noise level.
        sample_index: [B] global sample indices; dropped_text / dropped_images: [B] CFG dropout applied.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    visual_tokens: torch.Tensor
    visual_positions: torch.Tensor
    latents: torch.Tensor
    posterior_noise: torch.Tensor
    noise: torch.Tensor
    u: torch.Tensor
    sample_index: torch.Tensor
    dropped_text: torch.Tensor
    dropped_images: torch.Tensor

    def _map(self, fn) -> MetaQueryBatch:
        return MetaQueryBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def pin_memory(self) -> MetaQueryBatch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device) -> MetaQueryBatch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


@dataclass(frozen=True)
class NullPrompt:
    """The chat template around an empty user turn holding k `<image>`s (k = 0 for text-only prompts): what a
    dropped prompt becomes in training (CFG dropout) and the unconditional branch of guidance in generation."""

    tokens: np.ndarray
    image_slot_starts: np.ndarray


def null_prompts(tokenizer, template: str, max_images: int) -> list[NullPrompt]:
    """NullPrompt for 0..max_images images (the reference empties the caption and keeps the images' places)."""
    from engine.tokenizer import Turn, encode_generation_prompt

    out = []
    for k in range(max_images + 1):
        encoded = encode_generation_prompt([Turn("user", "<image>\n" * k)], tokenizer, template,
                                           tokens_per_image=TOKENS_PER_IMAGE)
        out.append(NullPrompt(np.asarray(encoded.tokens, dtype=np.int32),
                              np.asarray([span.slot_start for span in encoded.images], dtype=np.int64)))
    return out


def left_padded(prompts: Sequence[tuple[np.ndarray, np.ndarray]], embeddings: Sequence[torch.Tensor], pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(tokens [L_i], image slot starts [k_i])] + SigLIP rows [k_i, 64, 1152] -> the frozen LLM's inputs: tokens
    [B, L] left-padded (so every row's queries start at the same column), attention mask [B, L], visual tokens
    [V, 1152] and their flat positions [V] in B*L."""
    b, length = len(prompts), max(len(t) for t, _ in prompts)
    tokens = np.full((b, length), pad_id, dtype=np.int64)
    mask = np.zeros((b, length), dtype=bool)
    positions = []
    offsets = np.arange(TOKENS_PER_IMAGE, dtype=np.int64)
    for row, (ids, slots) in enumerate(prompts):
        pad = length - len(ids)
        tokens[row, pad:] = ids
        mask[row, pad:] = True
        if len(slots):
            positions.append((row * length + pad + np.asarray(slots)[:, None] + offsets).reshape(-1))  # [k*64]
    visual = [e.reshape(-1, VISION_DIM) for e in embeddings if e.shape[0]]
    visual_tokens = torch.cat(visual) if visual else torch.zeros(0, VISION_DIM, dtype=torch.bfloat16)
    return (torch.from_numpy(tokens), torch.from_numpy(mask), visual_tokens,
            torch.from_numpy(np.concatenate(positions) if positions else np.zeros(0, np.int64)))


@dataclass(frozen=True)
class NoiseShape:
    """Per-sample draws the collate makes: latent channels / side, and whether stored rows are gaussian."""

    channels: int
    side: int
    gaussian: bool


class MetaQueryCollate:
    """[(index, sample, embeddings, stored latent)] -> MetaQueryBatch, with CFG dropout and the noise draws.

    CFG dropout, as the reference's `dataset.py`: a text-to-image prompt becomes the null prompt with probability
    `cfg_prob` (0.1, `_t2i_process_fn`); a prompt with images draws one u: its text is dropped when u < p, its
    images when p/2 <= u < 3p/2 (p = `cfg_instruct_prob`, 0.2: `_inst_process_fn`'s u < 0.2 and 0.1 <= u < 0.3,
    so 10% lose both). Dropped images become all-zero SigLIP tokens (the reference feeds black images).
    """

    def __init__(self, *, seed: int, pad_id: int, nulls: list[NullPrompt], noise: NoiseShape, cfg_prob: float,
                 cfg_instruct_prob: float):
        self.seed, self.pad_id, self.nulls, self.noise = seed, pad_id, nulls, noise
        self.cfg_prob, self.cfg_instruct_prob = cfg_prob, cfg_instruct_prob

    def _dropout(self, index: int, images: int) -> tuple[bool, bool]:
        u = np.random.default_rng([self.seed, 0x4D51, index]).random()
        if images == 0:
            return bool(u < self.cfg_prob), False
        p = self.cfg_instruct_prob
        return bool(u < p), bool(p / 2 <= u < 1.5 * p)

    def __call__(self, items: Sequence[tuple[int, MetaQuerySample, torch.Tensor, torch.Tensor]]) -> MetaQueryBatch:
        prompts, embeddings, drops = [], [], []
        for index, sample, emb, _ in items:
            k = len(sample.image_rows)
            drop_text, drop_images = self._dropout(index, k)
            tokens, slots = sample.tokens, sample.image_slot_starts
            if drop_text:
                tokens, slots = self.nulls[k].tokens, self.nulls[k].image_slot_starts
            if drop_images:
                emb = torch.zeros_like(emb)
            prompts.append((tokens, slots))
            embeddings.append(emb)
            drops.append((drop_text, drop_images))
        b = len(items)
        tokens, mask, visual_tokens, visual_positions = left_padded(prompts, embeddings, self.pad_id)
        c, side = self.noise.channels, self.noise.side
        noise = torch.empty(b, c, side, side)
        posterior = torch.zeros(b, c, side, side)
        u = torch.empty(b, dtype=torch.float64)
        for row, (index, *_rest) in enumerate(items):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (2 ** 63))
            u[row] = torch.rand((), generator=g, dtype=torch.float64)
            noise[row] = torch.randn(c, side, side, generator=g)
            if self.noise.gaussian:
                posterior[row] = torch.randn(c, side, side, generator=g)
        return MetaQueryBatch(
            tokens=tokens, attention_mask=mask, visual_tokens=visual_tokens, visual_positions=visual_positions,
            latents=torch.stack([latent for *_, latent in items]), posterior_noise=posterior, noise=noise, u=u,
            sample_index=torch.tensor([index for index, *_ in items], dtype=torch.int64),
            dropped_text=torch.tensor([d[0] for d in drops]), dropped_images=torch.tensor([d[1] for d in drops]))


def build_metaquery_loader(samples: MetaQuerySamples, collate: MetaQueryCollate, *, global_batch_size: int,
                           micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int,
                           num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from `consumed_samples` on (the VPiT loader's sampler and rules)."""
    from engine.training.data import build_loader

    return build_loader(samples, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                        dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples, seq_length=0,
                        num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate)


def open_builds(weighted_paths: Sequence[tuple[float, str]], *, verify_checksums: bool
                ) -> tuple[list[tuple[float, MetaQueryDataset]], dict[str, Any]]:
    """Opens every build; refuses builds of different tokenizers, vision encoders or VAEs, and builds without
    latents or without a single generation target. Returns the datasets and what the run records about them."""
    datasets, seen = [], {}
    for weight, path in weighted_paths:
        data = MetaQueryDataset(path, check_sha256=verify_checksums)
        if len(data) == 0:
            raise ValueError(f"{path}: no MetaQuery sample (no image in an assistant turn): a text-to-image pair is "
                             "a user turn with the caption and an assistant turn holding <image>")
        datasets.append((weight, data))
        m = data.manifest
        for what, value in (("tokenizer", (m.get("tokenizer") or {}).get("fingerprint")),
                            ("vision encoder", (m.get("vision_encoder") or {}).get("fingerprint")),
                            ("VAE", data.latents.vae["fingerprint"]), ("chat template", m.get("chat_template"))):
            if seen.setdefault(what, (value, path))[0] != value:
                raise ValueError(f"--data-path mixes builds made with different {what}s: {seen[what][1]} and {path}")
    first = datasets[0][1]
    refs = {"tokenizer_fingerprint": (first.manifest.get("tokenizer") or {}).get("fingerprint"),
            "vision_encoder": first.manifest.get("vision_encoder"), "vae": first.latents.vae,
            "chat_template": first.manifest.get("chat_template"),
            "builds": [str(Path(p).resolve()) for _, p in weighted_paths]}
    return datasets, refs
