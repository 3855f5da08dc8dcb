"""Batched decoding of text and visual tokens from a VPiT model, with a static KV cache.

Every row of a batch is its own small state machine, advanced one position per step:

    text mode     the LM head picks a token (greedy, or temperature + top-p sampling). A stop token ends the row;
                  `<image_start>` switches the row to image mode (the token itself is fed at the next position).
    image mode    the continuous-token head's prediction from the last position is L2-normalised (SigLIP tokens
                  are unit vectors) and fed back through the projector as the embedding of the next slot, exactly
                  where training splices visual tokens in (`visual_tokens` / `visual_positions`). After
                  `tokens_per_image` slots, `<image_end>` is forced and the row returns to text mode.

The state of every row lives in tensors (`engine.generation.decode_batch.DecodeBatch`), so a step is the same
fixed sequence of tensor ops whatever the rows are doing: the LM head's choice and the continuous-token head's
prediction are computed for the batch, and `torch.where` on the row masks decides what each row feeds next and
what it emits. Rows in text mode and rows in image mode share every forward step: a step's input is one token id
per row, replaced by the projected visual token in image-mode rows. Prompts of different lengths are left-padded;
the padding is masked out of attention and position ids count real tokens only, so a row's result does not
depend on what else is in its batch (up to float rounding of different matmul shapes).

Speed (see docs/generation.md and docs/benchmarks-generation.md):
- the KV cache is allocated once per batch (`LayerKVCache`) and written in place; the key mask and the RoPE
  tables of every decode position are built once per batch and indexed per step;
- the prompt is prefilled in one forward per `prefill_chunk` positions (one forward unless the prompt is longer);
- on CPU (eager) a step skips the LM head when no row is in text mode and the visual head / projector when no row
  is in image mode (batch-level checks, free on the host);
- with `compile` (default on CUDA) the whole step (selection + forward) is one `torch.compile` graph, mode
  `reduce-overhead` (CUDA graphs) over the static cache: the cache is written at a device index and the mask
  covers its whole capacity, so shapes and addresses never change. A termination check every
  `sync_every` steps is the only host synchronisation.

`use_kv_cache=False` recomputes the whole sequence at every step, like MetaMorph's reference decoder: the same
state machine, so the two are directly comparable (tests check they agree; `benchmarks/generate_kv_cache.py`
times them).

Works under tensor parallelism (`engine.parallel.tensor_parallel.apply_tensor_parallel`, no sequence parallelism):
every rank runs the same loop; the LM head's vocabulary-sharded logits are gathered for the last position only,
and every rank draws the same samples from identically seeded uniforms.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.generation.decode_batch import NO_OUTPUT, SLOT, TEXT_MODE, DecodeBatch
from engine.generation.linear_kernels import onednn_linears
from engine.generation.sampling import SamplingConfig, sample_from_logits
from engine.model.attention import AttentionMask


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
        valid_vocab_size: ids >= this are never chosen (the model already masks its vocabulary padding; this also
            keeps out ids the tokenizer cannot decode).
        pad_id: id fed into padding positions and finished rows (masked out, any valid id works).
        use_kv_cache: False recomputes the whole sequence every step (the reference's method; for tests and the
            benchmark).
        compile: compile the decode step (`torch.compile`, static cache); None = on CUDA without tensor
            parallelism. Off, the step runs eagerly on exact-length cache views.
        compile_options: keyword arguments of `torch.compile` (default `mode="reduce-overhead"`, which captures the
            step as a CUDA graph on GPU; tests pass `backend="aot_eager"`). The step is always compiled with
            `fullgraph=True, dynamic=False`.
        prefill_chunk: prompt positions per prefill forward; longer prompts (many images) are prefilled in chunks.
        sync_every: compiled steps between host checks for "every row finished" (eager checks every step).
        cpu_linear: "onednn" runs the model's linears through oneDNN during decoding on CPU (faster than ATen's
            MKL sgemm there, same weights; see `engine.generation.linear_kernels`); "aten" keeps `F.linear`.
    """

    def __init__(self, model: nn.Module, *, image_start_id: int, image_end_id: int, stop_ids: set[int] | list[int],
                 valid_vocab_size: int, pad_id: int = 0, use_kv_cache: bool = True, compile: bool | None = None,
                 compile_options: dict | None = None, prefill_chunk: int = 2048, sync_every: int = 16,
                 cpu_linear: str = "onednn"):
        self.model = model
        self.config = model.config
        self.image_start_id = image_start_id
        self.image_end_id = image_end_id
        self.stop_ids = {int(i) for i in stop_ids}
        self.valid_vocab_size = min(valid_vocab_size, self.config.vocab_size)
        self.pad_id = pad_id
        self.use_kv_cache = use_kv_cache
        self.tokens_per_image = self.config.tokens_per_image
        if prefill_chunk < 1 or sync_every < 1:
            raise ValueError(f"prefill_chunk ({prefill_chunk}) and sync_every ({sync_every}) must be >= 1")
        self.prefill_chunk = prefill_chunk
        if cpu_linear not in ("onednn", "aten"):
            raise ValueError(f"cpu_linear must be 'onednn' or 'aten', got {cpu_linear!r}")
        self.cpu_linear = cpu_linear
        self.sync_every = sync_every
        first = next(iter(model.layers.values()))
        self._local_kv_heads = _local_rows(first.attention.wk) // self.config.head_dim
        embedding = model.tok_embeddings.weight
        self.device = embedding.device
        self.dtype = embedding.dtype
        tensor_parallel = hasattr(embedding, "device_mesh")
        if compile is None:
            compile = self.device.type == "cuda" and not tensor_parallel
        if compile and tensor_parallel:
            raise ValueError("compiled decoding is not supported under tensor parallelism (use compile=False)")
        self.compile = bool(compile and use_kv_cache)
        self.compile_options = {"mode": "reduce-overhead"} if compile_options is None else dict(compile_options)
        self._compiled_step = None
        self._compiled_ok = False  # set after the first compiled batch: later errors are not compiler fallbacks
        self._static_pool: dict[tuple, DecodeBatch] = {}

    # -------------------------------------------------------------------------------------------- selection
    def select_text_tokens(self, logits: torch.Tensor, step: torch.Tensor, batch: DecodeBatch,
                           sampling: SamplingConfig) -> torch.Tensor:
        """Next token [B] of every row from its logits [B, vocab] (float32; ids that may never be chosen are
        already -inf). Only text-mode rows use theirs. `step` is the step index as a [1] tensor.

        A method so that a benchmark or a test can script the choices (tokens and where images start) with tensor
        ops while timing or checking the real decoding path.
        """
        if sampling.temperature == 0:
            return logits.argmax(dim=-1)
        uniforms = batch.uniforms.index_select(1, step)[:, 0]  # [B]
        return sample_from_logits(logits, uniforms, sampling.temperature, sampling.top_p)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, vocab] through the model's masked LM-head path (`VPiTModel.logits`: vocabulary
        padding at -inf), with ids past the tokenizer's vocabulary and `<image_end>` (only ever forced after the
        last slot; sampled in text mode it would mean nothing) at -inf too."""
        logits = _replicated(self.model.logits(hidden)).float()
        if self.valid_vocab_size < logits.shape[-1]:
            logits[:, self.valid_vocab_size:] = float("-inf")
        logits[:, self.image_end_id] = float("-inf")
        return logits

    # -------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(self, prompts: list[PromptTokens], sampling: SamplingConfig) -> list[GenerationResult]:
        """Decodes `prompts` as one batch; results in the same order."""
        if not prompts:
            return []
        if min(len(p.tokens) for p in prompts) == 0:
            raise ValueError("empty prompt: a prompt needs at least one token")
        with onednn_linears(self.model, enabled=self.cpu_linear == "onednn" and not self.compile):
            return self._generate(prompts, sampling)

    def _generate(self, prompts: list[PromptTokens], sampling: SamplingConfig) -> list[GenerationResult]:
        batch = self._prepare(prompts, sampling)
        if self.use_kv_cache:
            self._prefill(batch)
            if self.compile:
                try:
                    self._decode_compiled(batch, sampling)
                except Exception as err:  # guarded: any failure to compile falls back to eager
                    if self._compiled_ok:
                        raise  # it compiled and ran before: a real error, not a compiler limitation
                    warnings.warn(f"compiled decoding failed ({type(err).__name__}: {err}); decoding eagerly",
                                  stacklevel=2)
                    self.compile, self._compiled_step = False, None
                    return self._generate(prompts, sampling)
                self._compiled_ok = True
            else:
                self._decode_eager(batch, sampling)
        else:
            self._decode_recompute(batch, sampling)
        return batch.results(self.tokens_per_image)

    def _prepare(self, prompts: list[PromptTokens], sampling: SamplingConfig) -> DecodeBatch:
        prompt_len = max(len(p.tokens) for p in prompts)
        tpi = self.tokens_per_image
        if prompt_len + sampling.max_new_tokens + tpi + 1 > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({prompt_len} tokens) + --max-new-tokens {sampling.max_new_tokens} + one image "
                             f"({tpi + 1}) exceed the model's {self.config.max_position_embeddings} positions")
        # Steps: the budget, an image finished past it (tpi + 1), and the selection step that finds all rows done.
        max_steps = sampling.max_new_tokens + tpi + 2
        uniforms = None
        if sampling.temperature > 0:
            uniforms = torch.stack([
                torch.rand(max_steps, generator=torch.Generator().manual_seed(sampling.seed * 1_000_003 + p.seed))
                for p in prompts])
        capacity, reuse = None, None
        if self.use_kv_cache:
            capacity = 64 * math.ceil((prompt_len + max_steps) / 64)  # aligned rows for the attention-mask kernels
            if self.compile:
                # Round up so that batches of similar lengths share one set of buffers (and one captured graph).
                capacity = 256 * math.ceil(capacity / 256)
                key = (len(prompts), capacity, max_steps, uniforms is not None)
                reuse = self._static_pool.get(key)
        batch = DecodeBatch(prompts, model=self.model, kv_heads=self._local_kv_heads, pad_id=self.pad_id,
                            tokens_per_image=tpi, max_steps=max_steps, capacity=capacity, static=self.compile,
                            uniforms=uniforms, device=self.device, dtype=self.dtype, reuse=reuse)
        if self.compile and reuse is None:
            batch.mark_static()
            self._static_pool = {key: batch}  # one shape kept: bounded memory
        return batch

    def _prefill(self, batch: DecodeBatch) -> None:
        """Runs the prompt through the model into the caches, `prefill_chunk` positions per forward (one forward
        for most prompts); leaves the last position's hidden state in `batch.hidden`.

        Left padding needs a key mask: the model then builds a dense [B, 1, chunk, keys] boolean mask per chunk
        (fine on CPU; on GPU it bounds the prompt's attention memory at chunk x keys per row)."""
        tokens = batch.tokens.to(self.device)
        key_mask = batch.key_mask.to(self.device) if batch.padded else None
        slot_tokens = None if batch.slot_tokens is None else batch.slot_tokens.to(self.device, self.dtype)
        for cache in batch.caches:
            cache.write_index = None
            cache.length = 0
        hidden = None
        for start in range(0, batch.prompt_len, self.prefill_chunk):
            end = min(start + self.prefill_chunk, batch.prompt_len)
            visual = positions = None
            if slot_tokens is not None:
                inside = (batch.slot_cols >= start) & (batch.slot_cols < end)
                if bool(inside.any()):
                    # Flat indices into this chunk's [B * chunk] positions.
                    positions = (batch.slot_rows[inside] * (end - start) + batch.slot_cols[inside] - start)
                    positions = positions.to(self.device)
                    visual = slot_tokens[inside.to(self.device)]
            hidden = self.model(tokens[:, start:end], visual_tokens=visual, visual_positions=positions,
                                kv_caches=batch.caches,
                                attention_mask=None if key_mask is None else key_mask[:, :end])
        batch.hidden.copy_(hidden[:, -1])
        if batch.static:
            for cache in batch.caches:
                cache.write_index = batch.write_col

    def _advance(self, batch: DecodeBatch, step: torch.Tensor, sampling: SamplingConfig,
                 skip_unused: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One step of every row's state machine, from `batch.hidden`: chooses, records the outputs and updates the
        state in place. Returns what the next forward feeds: token ids [B], visual tokens [B, vision_dim] (or
        None when `skip_unused` found no image-mode row) and the rows that feed a visual token [B] bool."""
        tpi = self.tokens_per_image
        mode, active = batch.mode, batch.active
        text = active & (mode == TEXT_MODE)
        # Text-mode rows out of budget finish ("length"); rows inside an image always finish it first.
        active = active & ~(text & (batch.new_positions >= sampling.max_new_tokens))
        text = text & active
        feeding = active & (mode >= 0) & (mode < tpi)  # feed slot number mode + 1
        ending = active & (mode == tpi)  # all slots fed: <image_end> is forced
        if skip_unused and not bool(text.any()):
            chosen = torch.full_like(mode, self.pad_id)
        else:
            chosen = self.select_text_tokens(self.text_logits(batch.hidden), step, batch, sampling)
        if self.stop_ids:
            # [B, 1] == [n_stop] -> [B, n_stop]; cheaper than torch.isin for a handful of ids.
            stop = text & (chosen[:, None] == self._stop_ids_tensor(chosen.device)).any(dim=-1)
            active = active & ~stop
            text = text & ~stop
            batch.stopped.logical_or_(stop)
        visual = None
        if not (skip_unused and not bool(feeding.any())):
            # Unit norm like SigLIP tokens. [B, vision_dim]
            visual = F.normalize(self.model.predict_visual(batch.hidden).float(), dim=-1)
            batch.visual_out.index_copy_(1, step, visual[:, None])
        next_tokens = torch.where(text, chosen, torch.where(ending, self.image_end_id, torch.where(
            feeding, self.image_start_id, self.pad_id)))  # a slot's id is a placeholder, replaced by its token
        emitted = torch.where(text, chosen, torch.where(ending, self.image_end_id, torch.where(
            feeding, SLOT, NO_OUTPUT)))
        batch.tokens_out.index_copy_(1, step, emitted[:, None])
        # `<image_start>` chosen: feed it now, slot 1 at the next step.
        new_mode = torch.where(text & (chosen == self.image_start_id), 0, torch.where(
            feeding, mode + 1, torch.where(ending, TEXT_MODE, mode)))
        batch.mode.copy_(new_mode)
        batch.active.copy_(active)
        batch.new_positions.add_(active.long())
        return next_tokens, visual, feeding

    def _stop_ids_tensor(self, device: torch.device) -> torch.Tensor:
        stop = getattr(self, "_stop_tensor", None)
        if stop is None or stop.device != device:
            ids = sorted(self.stop_ids)
            stop = self._stop_tensor = torch.tensor(ids, dtype=torch.long, device=device)
        return stop

    def _forward_step(self, batch: DecodeBatch, tokens: torch.Tensor, visual: torch.Tensor | None,
                      feeding: torch.Tensor, step: torch.Tensor) -> None:
        """One decode position for every row through the model into the caches; writes `batch.hidden`."""
        model = self.model
        h = model.tok_embeddings(tokens[:, None])  # [B, 1, H]
        if visual is not None:
            # Image-mode rows feed the projected visual token instead of their placeholder id's embedding.
            h = torch.where(feeding[:, None, None], model.projector(visual.to(h.dtype))[:, None], h)
        rope = (batch.cos.index_select(1, step), batch.sin.index_select(1, step))  # [B, 1, head_dim] each
        if batch.static:
            batch.write_col.copy_(batch.write_cols.index_select(0, step))
            batch.key_bias.index_fill_(-1, batch.write_col, 0.0)  # this step's column becomes visible
            bias = batch.key_bias
        else:
            length = batch.caches[0].length + 1
            bias = None if batch.key_bias is None else batch.key_bias[..., :length]
        mask = AttentionMask("sdpa", dense=bias)
        for layer, cache in zip(model.layers.values(), batch.caches):
            h = layer(h, rope, mask, cache)
        batch.hidden.copy_(model.norm(h)[:, 0])

    def _decode_eager(self, batch: DecodeBatch, sampling: SamplingConfig) -> None:
        skip_unused = self.device.type == "cpu"  # its batch-level checks cost a device sync elsewhere
        for i in range(batch.max_steps):
            step = batch.steps[i:i + 1]
            tokens, visual, feeding = self._advance(batch, step, sampling, skip_unused)
            if not bool(batch.active.any()):
                break
            self._forward_step(batch, tokens, visual, feeding, step)

    def _static_step(self, batch: DecodeBatch, step: torch.Tensor, sampling: SamplingConfig) -> None:
        """Selection and forward of one step with static shapes: what is compiled."""
        tokens, visual, feeding = self._advance(batch, step, sampling, skip_unused=False)
        self._forward_step(batch, tokens, visual, feeding, step)

    def _decode_compiled(self, batch: DecodeBatch, sampling: SamplingConfig) -> None:
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._static_step, fullgraph=True, dynamic=False,
                                                **self.compile_options)
        cuda = self.device.type == "cuda"
        for i in range(batch.max_steps):
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            self._compiled_step(batch, batch.steps[i:i + 1], sampling)
            # After every row has finished, further steps change nothing (the cache has room for them).
            if (i + 1) % self.sync_every == 0 and not bool(batch.active.any()):
                break

    # -------------------------------------------------------------------------------------------- reference
    def _decode_recompute(self, batch: DecodeBatch, sampling: SamplingConfig) -> None:
        """MetaMorph's method: the whole sequence through the model at every step (same state machine)."""
        tokens, key_mask = batch.tokens, batch.key_mask
        slot_rows, slot_cols = batch.slot_rows.tolist(), batch.slot_cols.tolist()
        slot_tokens = [] if batch.slot_tokens is None else [batch.slot_tokens]
        batch.hidden.copy_(self._forward_full(tokens, key_mask, slot_rows, slot_cols, slot_tokens))
        for i in range(batch.max_steps):
            step = batch.steps[i:i + 1]
            next_tokens, visual, feeding = self._advance(batch, step, sampling, skip_unused=True)
            if not bool(batch.active.any()):
                break
            column = tokens.shape[1]
            tokens = torch.cat([tokens, next_tokens.cpu()[:, None]], dim=1)
            key_mask = torch.cat([key_mask, batch.active.cpu()[:, None]], dim=1)
            rows = feeding.nonzero().squeeze(1)
            if rows.numel():
                slot_rows.extend(rows.tolist())
                slot_cols.extend([column] * rows.numel())
                slot_tokens.append(visual[rows].cpu())
            batch.hidden.copy_(self._forward_full(tokens, key_mask, slot_rows, slot_cols, slot_tokens))

    def _forward_full(self, tokens: torch.Tensor, key_mask: torch.Tensor, slot_rows: list[int],
                      slot_cols: list[int], slot_tokens: list[torch.Tensor]) -> torch.Tensor:
        """The whole sequence again (no cache); padding is kept apart from real tokens as another 'document'.
        Returns the last position's final-normed hidden state [B, H]."""
        visual = positions = None
        if slot_rows:
            visual = torch.cat(slot_tokens).to(self.device, self.dtype)  # [V, D] in slot order
            positions = torch.tensor([b * tokens.shape[1] + s for b, s in zip(slot_rows, slot_cols)],
                                     dtype=torch.long, device=self.device)
        position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        document_ids = None if bool(key_mask.all()) else key_mask.long()
        hidden = self.model(tokens.to(self.device), position_ids=position_ids.to(self.device),
                            document_ids=None if document_ids is None else document_ids.to(self.device),
                            visual_tokens=visual, visual_positions=positions)
        return hidden[:, -1]
