"""The connector: query hidden states of the frozen LLM -> the diffusion decoder's conditioning.

As the reference (facebookresearch/metaquery `models/model.py`, `MLLMInContext.__init__`, and
`models/transformer_encoder.py`, `Qwen2Encoder`):

    [B, N, H] --encoder: L bidirectional pre-norm blocks (Qwen2 layout: RMSNorm, self-attention with biased q/k/v,
                RoPE over the N query positions, per-head L2 q/k norm scaled by a learned gain * sqrt(head_dim),
                SwiGLU MLP of width 4H), heads = H / 64, no final norm
              --Linear(H, D) -> GELU(tanh) -> Linear(D, D) -> RMSNorm(D, eps 1e-5, weight initialised to
                `input_scale`: sqrt(5.5) for Sana, 1 for Stable Diffusion)--> [B, N, D]

D is the decoder's conditioning width: Sana's `caption_channels` (2304), else `encoder_hid_dim`, else the UNet's
`cross_attention_dim` (768 for SD 1.5). Linear weights start N(0, 0.014) with zero biases (the reference's
`initializer_range`); the per-head q/k gains start at 1.

Written for one device; the trainer shards it from outside (FSDP2 units = `layers`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_HEAD_DIM = 64  # num_attention_heads = hidden_size // 64 in the reference
REFERENCE_INIT_STD = 0.014


@dataclass(kw_only=True)
class ConnectorConfig:
    """Args:
        hidden_size: the LLM's hidden size H (the encoder's width, as in the reference).
        output_size: the decoder's conditioning width D.
        num_layers: encoder blocks (`connector_num_hidden_layers`, 24 in every reference config).
        num_heads: attention heads (default H // 64, at least 1).
        rope_theta: RoPE base over query positions (Qwen2Config's default, 10000).
        norm_eps: the blocks' RMSNorm epsilon (Qwen2Config's default, 1e-6).
        input_scale: initial weight of the output RMSNorm (sqrt(5.5) for Sana, 1 otherwise).
    """

    hidden_size: int
    output_size: int
    num_layers: int = 24
    num_heads: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.num_heads is None:
            self.num_heads = max(1, self.hidden_size // REFERENCE_HEAD_DIM)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"connector: hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"connector: head dim {self.hidden_size // self.num_heads} must be even (RoPE)")
        if self.num_layers < 0 or self.output_size < 1:
            raise ValueError("connector: --connector-layers must be >= 0 and the output width >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


class ConnectorRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class BidirectionalAttention(nn.Module):
    """Full (non-causal) self-attention over the N queries with RoPE and the reference's q/k normalisation."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_heads
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=True)
        self.k_proj = nn.Linear(hidden, hidden, bias=True)
        self.v_proj = nn.Linear(hidden, hidden, bias=True)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        # MultiHeadRMSNorm: F.normalize(x) * gamma[heads, 1, head_dim] * sqrt(head_dim)
        self.q_gain = nn.Parameter(torch.ones(heads, 1, self.head_dim))
        self.k_gain = nn.Parameter(torch.ones(heads, 1, self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # [B, N, H] -> [B, heads, N, head_dim]
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # RoPE before the q/k norm
        scale = math.sqrt(self.head_dim)
        q = F.normalize(q, dim=-1) * self.q_gain * scale
        k = F.normalize(k, dim=-1) * self.k_gain * scale
        out = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))  # [B, heads, N, D] -> [B, N, H]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ConnectorBlock(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = ConnectorRMSNorm(hidden, config.norm_eps)
        self.self_attn = BidirectionalAttention(config)
        self.post_attention_layernorm = ConnectorRMSNorm(hidden, config.norm_eps)
        self.gate_proj = nn.Linear(hidden, 4 * hidden, bias=False)
        self.up_proj = nn.Linear(hidden, 4 * hidden, bias=False)
        self.down_proj = nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Connector(nn.Module):
    """Encoder blocks + the projection to the decoder's width (module docstring)."""

    def __init__(self, config: ConnectorConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(ConnectorBlock(config) for _ in range(config.num_layers))
        self.proj_in = nn.Linear(config.hidden_size, config.output_size)
        self.proj_out = nn.Linear(config.output_size, config.output_size)
        self.norm = ConnectorRMSNorm(config.output_size, 1e-5)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """N(0, 0.014) linear weights, zero biases, unit q/k gains, the output norm at `input_scale`. Each tensor
        draws from its own generator keyed by (seed, name), so the weights do not depend on construction order."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, REFERENCE_INIT_STD, generator=g))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, ConnectorRMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, BidirectionalAttention):
                module.q_gain.fill_(1.0)
                module.k_gain.fill_(1.0)
        self.norm.weight.fill_(self.config.input_scale)

    def rope(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.hidden_size // self.config.num_heads
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
        freqs = torch.arange(n, device=device).float()[:, None] * inv  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[B, N, H] query hidden states -> [B, N, D] decoder conditioning."""
        x = states
        cos, sin = self.rope(x.shape[1], x.device, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.norm(self.proj_out(F.gelu(self.proj_in(x), approximate="tanh")))
