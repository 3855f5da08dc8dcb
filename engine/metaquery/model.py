"""MetaQuery on the engine: a frozen VPiT/LLaMA, N learnable queries after the prompt, a connector, a decoder.

    prompt (text + prompt images' SigLIP tokens) ++ N queries --frozen LLM--> final-normed hidden states of the
    N query positions [B, N, H] --connector--> [B, N, D] --> cross-attention context of the diffusion decoder

`FrozenLLM.query_states` runs the LLM in two parts over a per-layer KV cache: the prompt under `torch.no_grad`
(a prefill: no activation is kept for it), then the N query positions attending to the cached prompt keys and
values. Under causal attention the prompt's hidden states do not depend on the queries, so this is the same
function as one forward over prompt + queries (tested), but backward runs through N positions per row instead of
prompt + N: the queries learn through the frozen LLM's activations while none of its weights gets a gradient.
With `--freeze-queries` the query part runs without gradients too (no LLM backward at all).

`MetaQueryHead` is what trains and what a checkpoint holds: the queries, the connector and, with
`--train-decoder`, the decoder itself. The frozen LLM (and a frozen decoder) stay outside it: they are loaded from
their own sources (recorded in the checkpoint) and never enter the optimizer, the data-parallel gradient
reduction or the checkpoint files.
"""

from __future__ import annotations

import contextlib
import zlib

import torch
from torch import nn

from engine.metaquery.connector import Connector, ConnectorConfig
from engine.metaquery.decoder import NoiseSchedule, decoder_forward
from engine.model.attention import AttentionMask, key_padding_causal_mask
from engine.model.llama import LayerKVCache


def _local_rows(linear: nn.Linear) -> int:
    weight = linear.weight
    return weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]


class FrozenLLM:
    """The frozen LLM (an `engine.model.VPiTModel`, whole or tensor-parallel) seen as a condition encoder.

    Not an nn.Module attribute of anything that trains: its weights never reach an optimizer or a checkpoint.
    """

    def __init__(self, model: nn.Module):
        self.model = model.requires_grad_(False).eval()
        self.config = model.config
        first = next(iter(model.layers.values()))
        self.local_kv_heads = _local_rows(first.attention.wk) // self.config.head_dim

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def _layers(self, h: torch.Tensor, position_ids: torch.Tensor, mask: AttentionMask,
                caches: list[LayerKVCache]) -> torch.Tensor:
        rope = self.model.rope(position_ids, h.dtype)
        for cache, layer in zip(caches, self.model.layers.values()):
            h = layer(h, rope, mask, cache)
        return h

    def query_states(self, tokens: torch.Tensor, attention_mask: torch.Tensor, visual_tokens: torch.Tensor | None,
                     visual_positions: torch.Tensor | None, queries: torch.Tensor, *, grad: bool) -> torch.Tensor:
        """Final-normed hidden states of the N query positions appended after each (left-padded) prompt.

        Args:
            tokens: [B, L] prompt ids, left-padded.
            attention_mask: [B, L] bool, True on real prompt tokens.
            visual_tokens / visual_positions: prompt images' SigLIP tokens [V, 1152] at flat positions [V] of B*L.
            queries: [N, H] the learnable queries.
            grad: run the query part with autograd (the queries learn through the LLM's activations).
        Returns:
            [B, N, H] in the compute dtype (bf16 under autocast).
        """
        b, length = tokens.shape
        n = queries.shape[0]
        device = tokens.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else next(self.model.parameters()).dtype
        caches = [LayerKVCache(b, self.local_kv_heads, length + n, self.config.head_dim, dtype, device)
                  for _ in self.model.layers]
        mask = attention_mask.bool()
        with torch.no_grad():  # the prompt: a prefill into the caches, nothing kept for backward
            h = self.model.embed(tokens, visual_tokens, visual_positions)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
            self._layers(h, positions, AttentionMask("sdpa", dense=key_padding_causal_mask(mask, length)), caches)
        keys = torch.cat([mask, mask.new_ones(b, n)], dim=1)  # [B, L + N]
        query_positions = mask.long().sum(-1, keepdim=True) + torch.arange(n, device=device)  # [B, N]
        query_mask = AttentionMask("sdpa", dense=key_padding_causal_mask(keys, n))
        with contextlib.nullcontext() if grad else torch.no_grad():
            h = queries.to(dtype).unsqueeze(0).expand(b, n, queries.shape[1])
            h = self._layers(h, query_positions, query_mask, caches)
            return self.model.norm(h)

    @torch.no_grad()
    def query_init(self, num_queries: int, seed: int) -> torch.Tensor:
        """[N, H] fp32: the reference's new-token initialisation (transformers' `resize_token_embeddings` with
        mean resizing: N(mean, 1e-9 * covariance) of the existing embedding rows), with the covariance's
        diagonal. Call before tensor parallelism (it reads the whole embedding)."""
        weight = self.model.tok_embeddings.weight
        rows = weight[:self.config.num_real_tokens].float()
        mean, std = rows.mean(0), rows.std(0) * 1e-9 ** 0.5
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"queries"))
        noise = torch.randn(num_queries, rows.shape[1], generator=g)
        return (mean.cpu() + noise * std.cpu()).contiguous()


class MetaQueryHead(nn.Module):
    """The trainable part: `queries` [N, H], the `connector` and (with `--train-decoder`) the `decoder`.

    `forward` computes the per-sample denoising losses of one micro-batch; the frozen LLM and a frozen decoder
    come in as arguments, so data-parallel wrappers (DDP, FSDP2) and checkpoints only ever see what trains.
    """

    def __init__(self, num_queries: int, connector: ConnectorConfig, *, query_init: torch.Tensor | None = None,
                 decoder: nn.Module | None = None, train_queries: bool = True, seed: int = 0):
        super().__init__()
        init = query_init if query_init is not None else torch.zeros(num_queries, connector.hidden_size)
        self.queries = nn.Parameter(init.clone().float(), requires_grad=train_queries)
        self.connector = Connector(connector, seed=seed)
        self.decoder = decoder  # registered (and trained, checkpointed) only with --train-decoder

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 units besides the root: the connector's blocks and the decoder's blocks when it trains."""
        units = list(self.connector.layers)
        if self.decoder is not None:
            for name in ("down_blocks", "up_blocks", "transformer_blocks"):
                units += list(getattr(self.decoder, name, None) or [])
        return units

    def condition(self, llm: FrozenLLM, batch) -> torch.Tensor:
        """[B, N, D] decoder conditioning of a micro-batch (a `MetaQueryBatch` on the device)."""
        states = llm.query_states(batch.tokens, batch.attention_mask, batch.visual_tokens, batch.visual_positions,
                                  self.queries, grad=self.queries.requires_grad)
        return self.connector(states)

    def forward(self, batch, llm: FrozenLLM, schedule: NoiseSchedule, frozen_decoder: nn.Module | None,
                to_latents) -> torch.Tensor:
        """Per-sample denoising loss [B] (fp32 mean over latent elements) of the batch's targets; `to_latents(batch)`
        gives their clean fp32 latents [B, C, h, w] (a callable, so that FSDP2's input cast never rounds them)."""
        latents = to_latents(batch)
        cond = self.condition(llm, batch)
        decoder = self.decoder if self.decoder is not None else frozen_decoder
        noisy, timesteps, target = schedule.noisy_inputs(latents, batch.noise, batch.u)
        dtype = next(decoder.parameters()).dtype
        if torch.is_autocast_enabled(noisy.device.type):
            dtype = torch.get_autocast_dtype(noisy.device.type)
        prediction = decoder_forward(schedule.kind, decoder, noisy.to(dtype), timesteps, cond.to(dtype))
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
