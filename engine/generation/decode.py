"""Batched decoding of text and visual tokens from a VPiT model, with a KV cache.

Every row of a batch is its own small state machine, advanced one position per step:

    text mode     the LM head picks a token (greedy, or temperature + top-p sampling). A stop token ends the row;
                  `<image_start>` switches the row to image mode (the token itself is fed at the next position).
    image mode    the continuous-token head's prediction from the last position is L2-normalised (SigLIP tokens
                  are unit vectors) and fed back through the projector as the embedding of the next slot, exactly
                  where training splices visual tokens in (`visual_tokens` / `visual_positions`). After
                  `tokens_per_image` slots, `<image_end>` is forced and the row returns to text mode.

Rows in text mode and rows in image mode share every forward step: a step's input is one token id per row plus
the visual tokens of the image-mode rows, spliced into their rows' slots. Prompts of different lengths are
left-padded; the padding is masked out of attention by `attention_mask` and position ids count real tokens only,
so a row's result does not depend on what else is in its batch (up to float rounding of different matmul shapes).

`use_kv_cache=False` recomputes the whole sequence at every step, like MetaMorph's reference decoder: the same
state machine, so the two are directly comparable (tests check they agree; `benchmarks/generate_kv_cache.py`
times them).

Works under tensor parallelism (`engine.parallel.tensor_parallel.apply_tensor_parallel`, no sequence parallelism):
every rank runs the same loop; the LM head's vocabulary-sharded logits are gathered for the last position only,
and every rank draws the same samples from identically seeded generators.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.llama import LayerKVCache

TEXT_MODE = -1  # image_step value of a row in text mode; 0..tokens_per_image counts the slots already fed


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next text token is chosen. Visual tokens are always the head's (deterministic) prediction.

    Args:
        max_new_tokens: budget of generated positions per sample: text tokens, image markers and visual tokens
            all count. An image that has started is always finished (up to tokens_per_image + 1 positions past
            the budget), so outputs never hold a truncated image.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p.
        seed: samples draw from per-sample generators seeded by (seed, sample seed), so a sample's output does not
            depend on the batch it was decoded in.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(kw_only=True)
class PromptTokens:
    """One encoded prompt.

    Args:
        tokens: token ids; image slot positions hold any id (the placeholder `<image_start>` by convention).
        image_slot_starts: offset of each prompt image's first slot.
        image_tokens: [n, tokens_per_image, vision_dim] SigLIP tokens of the prompt images (None when n = 0).
        seed: this sample's sampling seed (its index in the input, so grouping into batches changes nothing).
    """

    tokens: list[int]
    image_slot_starts: list[int] = field(default_factory=list)
    image_tokens: torch.Tensor | None = None
    seed: int = 0


@dataclass
class GenerationResult:
    """What was generated for one prompt.

    Args:
        token_ids: generated ids in order, with `<image_start>` / `<image_end>` around each image (the slots
            themselves are not ids); the stop token is not included.
        images: one [tokens_per_image, vision_dim] float32 tensor of unit-norm visual tokens per generated image.
        finish_reason: "stop" (a stop token) or "length" (the budget ran out).
        new_positions: generated positions, visual tokens included.
    """

    token_ids: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str = "length"
    new_positions: int = 0


def _local_rows(linear: nn.Linear) -> int:
    """Output features of this rank's shard of a (possibly tensor-parallel) linear layer."""
    weight = linear.weight
    if hasattr(weight, "to_local"):
        weight = weight.to_local()
    return weight.shape[0]


def _replicated(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly vocabulary-sharded DTensor (only the rows asked for are gathered)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class VPiTGenerator:
    """Decodes batches of prompts with a `VPiTModel` (or a tensor-parallel one).

    Args:
        model: the model in eval mode.
        image_start_id, image_end_id: the tokenizer's image markers.
        stop_ids: ids that end a reply (see `engine.tokenizer.stop_token_ids`).
        valid_vocab_size: ids >= this are never chosen (the embedding is padded past the tokenizer's vocabulary).
        pad_id: id fed into padding positions and finished rows (masked out, any valid id works).
        use_kv_cache: False recomputes the whole sequence every step (the reference's method; for tests and the
            benchmark).
    """

    def __init__(self, model: nn.Module, *, image_start_id: int, image_end_id: int, stop_ids: set[int] | list[int],
                 valid_vocab_size: int, pad_id: int = 0, use_kv_cache: bool = True):
        self.model = model
        self.config = model.config
        self.image_start_id = image_start_id
        self.image_end_id = image_end_id
        self.stop_ids = {int(i) for i in stop_ids}
        self.valid_vocab_size = min(valid_vocab_size, self.config.vocab_size)
        self.pad_id = pad_id
        self.use_kv_cache = use_kv_cache
        self.tokens_per_image = self.config.tokens_per_image
        first = next(iter(model.layers.values()))
        self._local_kv_heads = _local_rows(first.attention.wk) // self.config.head_dim
        embedding = model.tok_embeddings.weight
        self.device = embedding.device
        self.dtype = embedding.dtype

    # -------------------------------------------------------------------------------------------- selection
    def select_text_tokens(self, logits: torch.Tensor, rows: list[int], step: int,
                           generators: list[torch.Generator], sampling: SamplingConfig) -> list[int]:
        """Next token of each text-mode row in `rows` from its logits [len(rows), vocab] (float32, full vocab).

        A method so that a benchmark can script the choices (tokens and where the image starts) while timing the
        real decoding path.
        """
        logits = logits.clone()
        logits[:, self.valid_vocab_size:] = float("-inf")
        # `<image_end>` is only ever forced after the last slot; sampled in text mode it would mean nothing.
        logits[:, self.image_end_id] = float("-inf")
        if sampling.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(logits / sampling.temperature, dim=-1).cpu()
        if sampling.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep a token while the mass before it is < top_p (so the most likely token is always kept).
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return [int(torch.multinomial(probs[i], 1, generator=generators[row]))
                for i, row in enumerate(rows)]

    # -------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(self, prompts: list[PromptTokens], sampling: SamplingConfig) -> list[GenerationResult]:
        """Decodes `prompts` as one batch; results in the same order."""
        if not prompts:
            return []
        batch = len(prompts)
        lengths = [len(p.tokens) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("empty prompt: a prompt needs at least one token")
        prompt_len = max(lengths)
        tpi = self.tokens_per_image
        capacity = prompt_len + sampling.max_new_tokens + tpi + 1
        if capacity > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({prompt_len} tokens) + --max-new-tokens {sampling.max_new_tokens} + one image "
                             f"({tpi + 1}) exceed the model's {self.config.max_position_embeddings} positions")

        # Left-padded prompt batch: [B, L] ids and [B, L] real-token mask; visual slots as (row, column, token).
        tokens = torch.full((batch, prompt_len), self.pad_id, dtype=torch.long)
        key_mask = torch.zeros(batch, prompt_len, dtype=torch.bool)
        slots: list[tuple[int, int]] = []
        slot_tokens: list[torch.Tensor] = []
        for b, prompt in enumerate(prompts):
            offset = prompt_len - lengths[b]
            tokens[b, offset:] = torch.tensor(prompt.tokens, dtype=torch.long)
            key_mask[b, offset:] = True
            n_images = len(prompt.image_slot_starts)
            if n_images and (prompt.image_tokens is None or prompt.image_tokens.shape[:2] != (n_images, tpi)):
                raise ValueError(f"prompt {b} has {n_images} image(s) but image_tokens of shape "
                                 f"{None if prompt.image_tokens is None else tuple(prompt.image_tokens.shape)}")
            for i, start in enumerate(prompt.image_slot_starts):
                slots.extend((b, offset + start + j) for j in range(tpi))
                slot_tokens.append(prompt.image_tokens[i])

        generators = [torch.Generator().manual_seed(sampling.seed * 1_000_003 + p.seed) for p in prompts]
        results = [GenerationResult() for _ in prompts]
        image_step = [TEXT_MODE] * batch
        current_image: list[list[torch.Tensor]] = [[] for _ in prompts]
        active = [True] * batch

        if self.use_kv_cache:
            caches = [LayerKVCache(batch, self._local_kv_heads, capacity, self.config.head_dim, self.dtype,
                                   self.device) for _ in self.model.layers]
            hidden = self._forward_cached(tokens, key_mask, slots, slot_tokens, caches)
        else:
            caches = None
            hidden = self._forward_full(tokens, key_mask, slots, slot_tokens)

        step = 0
        while True:
            next_tokens = [self.pad_id] * batch
            visual_rows: list[int] = []
            text_rows = [b for b in range(batch) if active[b] and image_step[b] == TEXT_MODE]
            for b in text_rows:
                if results[b].new_positions >= sampling.max_new_tokens:
                    active[b] = False
                    results[b].finish_reason = "length"
            text_rows = [b for b in text_rows if active[b]]
            if text_rows:
                logits = _replicated(self.model.logits(hidden[text_rows])).float()
                for b, token in zip(text_rows, self.select_text_tokens(logits, text_rows, step, generators, sampling)):
                    if token in self.stop_ids:
                        active[b] = False
                        results[b].finish_reason = "stop"
                        continue
                    results[b].token_ids.append(token)
                    next_tokens[b] = token
                    if token == self.image_start_id:
                        image_step[b] = 0
            image_rows = [b for b in range(batch) if active[b] and 0 <= image_step[b] < tpi
                          and not (b in text_rows and image_step[b] == 0)]
            # Rows that just chose `<image_start>` feed it first; their first slot comes at the next step.
            visual_tokens = None
            if image_rows:
                predicted = self.model.predict_visual(hidden[image_rows]).float()
                visual_tokens = F.normalize(predicted, dim=-1)  # [V, vision_dim], unit norm like SigLIP tokens
                for i, b in enumerate(image_rows):
                    current_image[b].append(visual_tokens[i].cpu())
                    next_tokens[b] = self.image_start_id  # slot placeholder, overwritten by the projected token
                    image_step[b] += 1
                    visual_rows.append(b)
            for b in range(batch):
                if active[b] and image_step[b] == tpi and b not in visual_rows:
                    # All slots fed: `<image_end>` is forced.
                    results[b].token_ids.append(self.image_end_id)
                    results[b].images.append(torch.stack(current_image[b]))
                    current_image[b] = []
                    next_tokens[b] = self.image_end_id
                    image_step[b] = TEXT_MODE
            if not any(active):
                break
            for b in range(batch):
                if active[b]:
                    results[b].new_positions += 1
            step_tokens = torch.tensor(next_tokens, dtype=torch.long)[:, None]  # [B, 1]
            step_mask = torch.tensor(active, dtype=torch.bool)[:, None]
            if caches is not None:
                key_mask = torch.cat([key_mask, step_mask], dim=1)
                hidden = self._forward_cached(step_tokens, key_mask, [(b, 0) for b in visual_rows],
                                              list(visual_tokens) if visual_rows else [], caches)
            else:
                column = tokens.shape[1]
                tokens = torch.cat([tokens, step_tokens], dim=1)
                key_mask = torch.cat([key_mask, step_mask], dim=1)
                if visual_rows:
                    slots.extend((b, column) for b in visual_rows)
                    slot_tokens.extend(visual_tokens)
                hidden = self._forward_full(tokens, key_mask, slots, slot_tokens)
            step += 1
        return results

    def _visual_inputs(self, slots: list[tuple[int, int]], slot_tokens: list[torch.Tensor], seq_len: int):
        if not slots:
            return None, None
        # Prompt images arrive as [64, D] blocks, fed-back tokens as [D] rows: flatten both to [V, D].
        visual = torch.cat([t.reshape(-1, t.shape[-1]) for t in slot_tokens]).to(self.device, self.dtype)
        positions = torch.tensor([b * seq_len + s for b, s in slots], dtype=torch.long, device=self.device)
        return visual, positions

    def _forward_cached(self, tokens: torch.Tensor, key_mask: torch.Tensor, slots, slot_tokens,
                        caches: list[LayerKVCache]) -> torch.Tensor:
        """One prefill or decode step; returns the last position's final-normed hidden state [B, H]."""
        visual, positions = self._visual_inputs(slots, slot_tokens, tokens.shape[1])
        hidden = self.model(tokens.to(self.device), visual_tokens=visual, visual_positions=positions,
                            kv_caches=caches, attention_mask=key_mask.to(self.device))
        return hidden[:, -1]

    def _forward_full(self, tokens: torch.Tensor, key_mask: torch.Tensor, slots, slot_tokens) -> torch.Tensor:
        """The whole sequence again (no cache); padding is kept apart from real tokens as another 'document'."""
        visual, positions = self._visual_inputs(slots, slot_tokens, tokens.shape[1])
        position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        document_ids = None if bool(key_mask.all()) else key_mask.long()
        hidden = self.model(tokens.to(self.device), position_ids=position_ids.to(self.device),
                            document_ids=None if document_ids is None else document_ids.to(self.device),
                            visual_tokens=visual, visual_positions=positions)
        return hidden[:, -1]
