"""LLaMA (2, 3, 3.1) building blocks, written for one device.

Parallelism is applied from outside (DTensor plans keyed on these module names, pipeline splits that delete
layers), so reshapes use `view(b, s, -1, head_dim)`: a tensor-parallel shard with fewer local heads needs no
change here. Weights follow Hugging Face's layout (rotate-half RoPE), so conversion is a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig, RopeScaling
from engine.model.attention import AttentionMask, attend, attend_decode, attend_packed


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 like the reference, then cast back."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


def rope_inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with Llama-3.1 scaling when given.

    Llama-3.1 keeps high frequencies (short wavelengths), divides low ones by `factor`, and interpolates smoothly
    between `high_freq_factor` and `low_freq_factor` wavelengths of the original context.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary (packed, restarting) position ids; nothing to learn.

    The inverse frequencies are kept per device in fp32 outside the module's buffers, so `model.to(bf16)` cannot
    round them (a bf16 inv_freq visibly shifts long positions).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def reset_parameters(self) -> None:
        self._inv_freq.clear()

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            inv_freq = rope_inverse_frequencies(self.config.head_dim, self.config.rotary_base, self.config.rope_scaling)
            self._inv_freq[device] = inv_freq.to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, S] -> [B, S, D/2] -> [B, S, D]; fp32 products, like the reference, so long positions stay exact.
        freqs = position_ids[..., None].float() * self.inverse_frequencies(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, heads, D]; cos/sin: [B, S, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.wq = nn.Linear(hidden, config.num_attention_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(hidden, config.num_query_groups * self.head_dim, bias=False)
        self.wv = nn.Linear(hidden, config.num_query_groups * self.head_dim, bias=False)
        self.wo = nn.Linear(config.num_attention_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                kv_cache: "LayerKVCache | None" = None) -> torch.Tensor:
        b, s, _ = x.shape
        cos, sin = rope
        # [B, S, H] -> [B, S, heads, D]; -1 keeps this correct for tensor-parallel shards of the heads.
        q = apply_rotary(self.wq(x).view(b, s, -1, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(b, s, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if kv_cache is None:
            # Training path: every backend takes [B, S, heads, D] (varlen kernels as a free THD view).
            return self.wo(attend_packed(q, k, v, mask).reshape(b, s, -1))
        # Incremental decoding. [B, S, heads, D] -> [B, heads, S, D]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = kv_cache.update(k, v)  # written in place into the preallocated cache; views of it come back
        out = attend_decode(q, k, v, mask.dense) if s == 1 else attend(q, k, v, mask)
        # [B, heads, S, D] -> [B, S, heads * D]
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                kv_cache: "LayerKVCache | None" = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LayerKVCache:
    """Keys and values of one layer for incremental decoding: a static buffer [B, kv_heads, max_len, D] allocated
    once per batch and written in place (never grown by concatenation).

    Two ways to write, chosen by `write_index`:
      - `None` (prefill, eager decoding): `update` appends at `length` (a host int) and returns views of the first
        `length` positions, so attention reads only what has been written;
      - a device tensor [1] (static-shape decoding, `torch.compile` / CUDA graphs): `update` writes at that column
        with `index_copy_` and returns the whole buffer; the caller's additive mask hides columns not written yet.
        The shapes and addresses never change from step to step, which is what a captured graph needs.

    Rows of the batch advance together (left-padded prompts are masked by the caller's mask).
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.write_index: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes [B, kv_heads, S, D] at `length`; returns views [B, kv_heads, length + S, D] of the buffer."""
        new = self.length + k.shape[2]
        if new > self.capacity:
            raise RuntimeError(f"KV cache overflow: {new} > capacity {self.capacity}")
        self.k[:, :, self.length:new] = k
        self.v[:, :, self.length:new] = v
        self.length = new
        return self.k[:, :, :new], self.v[:, :, :new]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention layer's entry point: `append`, or with `write_index` set a static-shape write of one
        position (see the class docstring)."""
        if self.write_index is None:
            return self.append(k, v)
        self.k.index_copy_(2, self.write_index, k)
        self.v.index_copy_(2, self.write_index, v)
        return self.k, self.v
