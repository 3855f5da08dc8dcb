"""Everything one batch's decoding reads and writes, as tensors allocated once per batch.

`DecodeBatch` holds the left-padded prompt, the per-row state machine (mode, active, stopped, positions used), the
outputs (one emitted id and one visual token per row and step), the sampling randomness, and for cached decoding
the static KV caches, the additive key mask and the RoPE tables of every decode position. A decode step only
indexes into these (`index_select` / `index_copy_` at the step), so it is a fixed sequence of tensor ops with the
same shapes and addresses at every step: what `torch.compile(mode="reduce-overhead")` (CUDA graphs) needs, and
cheap in eager mode too (nothing is rebuilt or concatenated per step).

Layout of a batch of B prompts, P = the longest prompt, T = `max_steps`:

    column   0 .. P-1          P .. P+T-1
    tokens   left-padded prompt | one position per decode step (inactive rows write padding nobody reads)
    mask     -inf on padding    | 0 once written (static mode: -inf until the step writes it)
    position real tokens 0..n-1 | n + step (a row is active for a prefix of the steps, so this is its position)
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.llama import LayerKVCache

TEXT_MODE = -1  # `mode` of a row in text mode; 0..tokens_per_image counts the image slots already fed
NO_OUTPUT = -1  # `tokens_out` of a step where the row emitted nothing (inactive)
SLOT = -2  # `tokens_out` of a step where the row fed a visual token (its value is in `visual_out`)


class DecodeBatch:
    """Tensors of one batch (see the module docstring).

    Args:
        prompts: `PromptTokens` of each row.
        max_steps: decode steps to provision: max_new_tokens + tokens_per_image + 2 (a started image is finished
            past the budget, plus the final selection step that finds every row done).
        capacity: KV-cache positions (>= P + max_steps); None = no cache (the recompute-every-step path).
        static: the compiled path: caches written at a device index, the mask covers the whole capacity.
        reuse: an earlier static batch of the same shapes whose buffers are overwritten in place instead of
            allocating new ones (a captured CUDA graph keeps reading the same addresses; nothing is re-recorded).
    """

    def __init__(self, prompts, *, model: nn.Module, kv_heads: int, pad_id: int, tokens_per_image: int,
                 max_steps: int, capacity: int | None, static: bool, uniforms: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype, reuse: DecodeBatch | None = None):
        config = model.config
        batch = len(prompts)
        lengths = [len(p.tokens) for p in prompts]
        self.batch, self.prompt_len, self.max_steps, self.static = batch, max(lengths), max_steps, static
        self.device, self.dtype = device, dtype
        prompt_len, tpi = self.prompt_len, tokens_per_image

        # Left-padded prompt [B, P] and its real-token mask; prompt image slots as (row, column) + [V, D] tokens.
        tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long)
        key_mask = torch.zeros(batch, prompt_len, dtype=torch.bool)
        slot_rows, slot_cols, slot_tokens = [], [], []
        for b, prompt in enumerate(prompts):
            offset = prompt_len - lengths[b]
            tokens[b, offset:] = torch.tensor(prompt.tokens, dtype=torch.long)
            key_mask[b, offset:] = True
            n_images = len(prompt.image_slot_starts)
            if n_images and (prompt.image_tokens is None or prompt.image_tokens.shape[:2] != (n_images, tpi)):
                raise ValueError(f"prompt {b} has {n_images} image(s) but image_tokens of shape "
                                 f"{None if prompt.image_tokens is None else tuple(prompt.image_tokens.shape)}")
            for i, start in enumerate(prompt.image_slot_starts):
                slot_rows.extend([b] * tpi)
                slot_cols.extend(range(offset + start, offset + start + tpi))
                slot_tokens.append(prompt.image_tokens[i].reshape(tpi, -1))
        self.tokens, self.key_mask = tokens, key_mask
        self.padded = not bool(key_mask.all())
        self.slot_rows = torch.tensor(slot_rows, dtype=torch.long)
        self.slot_cols = torch.tensor(slot_cols, dtype=torch.long)
        self.slot_tokens = torch.cat(slot_tokens) if slot_tokens else None  # [V, vision_dim]
        real_lengths = torch.tensor(lengths, dtype=torch.long)

        def place(name: str, value: torch.Tensor) -> None:
            """self.name = value, written into the reused batch's buffer when there is one."""
            if reuse is None:
                setattr(self, name, value.to(device))
            else:
                setattr(self, name, getattr(reuse, name).copy_(value))

        # Per-row state machine and outputs.
        place("seeds", torch.tensor([p.seed for p in prompts], dtype=torch.long))
        place("mode", torch.full((batch,), TEXT_MODE, dtype=torch.long))
        place("active", torch.ones(batch, dtype=torch.bool))
        place("stopped", torch.zeros(batch, dtype=torch.bool))
        place("new_positions", torch.zeros(batch, dtype=torch.long))
        # The final-normed hidden state of each row's last position: what the next step selects from.
        place("hidden", torch.zeros(batch, config.hidden_size, dtype=dtype))
        place("tokens_out", torch.full((batch, max_steps), NO_OUTPUT, dtype=torch.long))
        # Only SLOT steps are read back, and those are always written.
        self.visual_out = reuse.visual_out if reuse is not None else torch.empty(
            batch, max_steps, config.vision_dim, dtype=torch.float32, device=device)
        place("steps", torch.arange(max_steps))  # step indices: step i is the [1] view steps[i:i+1]
        self.uniforms = None
        if uniforms is not None:
            place("uniforms", uniforms)  # [B, max_steps] sampling draws

        self.caches: list[LayerKVCache] = []
        self.key_bias = None
        if capacity is None:
            return
        if capacity < prompt_len + max_steps:
            raise ValueError(f"KV cache capacity {capacity} < prompt {prompt_len} + {max_steps} steps")
        if reuse is not None:
            self.caches = reuse.caches  # stale contents are never read: prefill rewrites 0..P-1, the mask hides the rest
            for cache in self.caches:
                cache.length = 0
        else:
            self.caches = [LayerKVCache(batch, kv_heads, capacity, config.head_dim, dtype, device)
                           for _ in model.layers]
        # Additive key mask [B, 1, 1, capacity] for the decode steps: -inf on prompt padding (and, static, on every
        # column not written yet); None when nothing is ever masked (eager, no padding).
        if static or self.padded:
            bias = torch.zeros(batch, 1, 1, capacity, dtype=dtype)
            bias[:, 0, 0, :prompt_len].masked_fill_(~key_mask, float("-inf"))
            if static:
                bias[..., prompt_len:] = float("-inf")
            place("key_bias", bias)
        # RoPE tables of every decode position: row b's step i is at position (real length of b) + i.
        positions = (real_lengths[:, None] + torch.arange(max_steps)[None, :]).to(device)  # [B, T]
        cos, sin = model.rope(positions, dtype)  # [B, T, head_dim] each
        place("cos", cos)
        place("sin", sin)
        # Static mode: the cache column of each step ([T], a tensor so that a new prompt length is new data for a
        # compiled step, not a new constant), and the one the current step writes ([1], set by the step itself).
        place("write_cols", torch.arange(prompt_len, prompt_len + max_steps))
        self.write_col = reuse.write_col if reuse is not None else torch.zeros(1, dtype=torch.long, device=device)

    def mark_static(self) -> None:
        """Tells torch.compile that these buffers keep their addresses (CUDA graphs read and write them in place)."""
        import torch._dynamo

        tensors = [self.mode, self.active, self.stopped, self.new_positions, self.hidden, self.tokens_out,
                   self.visual_out, self.key_bias, self.cos, self.sin, self.write_cols, self.write_col, self.seeds]
        tensors += [t for cache in self.caches for t in (cache.k, cache.v)]
        if self.uniforms is not None:
            tensors.append(self.uniforms)
        for t in tensors:
            torch._dynamo.mark_static_address(t)

    def results(self, tokens_per_image: int):
        """`GenerationResult`s of the rows, read back from the output buffers once, after decoding."""
        from engine.generation.decode import GenerationResult

        tokens_out = self.tokens_out.cpu()
        new_positions = self.new_positions.cpu().tolist()
        stopped = self.stopped.cpu().tolist()
        slots = tokens_out == SLOT
        visual = self.visual_out.cpu() if bool(slots.any()) else None
        results = []
        for b in range(self.batch):
            row = tokens_out[b]
            images = []
            if visual is not None:
                fed = visual[b, slots[b]]  # [n * tokens_per_image, D]: images are whole (a started one is finished)
                images = list(fed.reshape(-1, tokens_per_image, fed.shape[-1]).unbind(0))
            results.append(GenerationResult(token_ids=row[row >= 0].tolist(), images=images,
                                            finish_reason="stop" if stopped[b] else "length",
                                            new_positions=new_positions[b]))
        return results
