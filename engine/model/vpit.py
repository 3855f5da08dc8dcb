"""The VPiT model: a LLaMA that reads and predicts continuous SigLIP tokens (MetaMorph).

Inputs are token ids plus visual tokens spliced into given sequence slots; outputs are text logits and, through
`ContinuousTokenHead`, predictions of the next visual token. The forward is pipeline-friendly: a pipeline stage is
this model with some modules removed (set to None) and layers deleted from `layers`; a stage without
`tok_embeddings` takes hidden states as input, and a stage without `norm` returns hidden states.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model.attention import AttentionMask, build_attention_mask, key_padding_causal_mask
from engine.model.llama import LayerKVCache, RMSNorm, RotaryEmbedding, TransformerBlock
from engine.model.losses import (
    fused_text_cross_entropy_sum,
    fused_visual_cosine_loss_sum,
    mask_padded_vocab,
    text_cross_entropy_sum,
    visual_cosine_loss_sum,
)

IGNORE_INDEX = -100


class VisualProjector(nn.Module):
    """SigLIP space -> LLM input: Linear(1152, H), GELU, Linear(H, H) (LLaVA's mlp2x_gelu)."""

    def __init__(self, vision_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ContinuousTokenHead(nn.Module):
    """LLM hidden state -> SigLIP space: Linear(H, H), GELU, Linear(H, 1152)."""

    def __init__(self, hidden_size: int, vision_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, vision_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class VPiTLoss:
    """Loss parts of one micro-batch.

    `loss` = lm_loss + coef * visual_loss is what backward runs on. The sums and counts let a training loop
    normalise over a whole global batch (gradient accumulation, data parallelism) instead of per micro-batch.
    With no visual target, visual_loss is exactly 0 with zero gradient (the reference's mean over nothing is NaN).
    When the visual loss does not learn (`VPiTModel.visual_loss_learns`: stage 1 with a frozen head), the visual
    parts are computed without autograd: they are measured and logged, and `loss` has the text gradient only.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor
    visual_loss: torch.Tensor
    lm_loss_sum: torch.Tensor
    lm_tokens: torch.Tensor
    visual_loss_sum: torch.Tensor
    visual_targets: torch.Tensor


class VPiTModel(nn.Module):
    """LLaMA + visual projector + continuous-token head.

    Build on the meta device, then call `init_weights()` (see `build_model`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(config.vocab_size, config.hidden_size)
        self.projector: VisualProjector | None = VisualProjector(config.vision_dim, config.hidden_size)
        self.rope = RotaryEmbedding(config)
        # A dict keyed by the global layer index, so pipeline stages keep checkpoint names when layers are removed.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config, i) for i in range(config.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.output: nn.Linear | None = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.visual_head: ContinuousTokenHead | None = ContinuousTokenHead(config.hidden_size, config.vision_dim)
        # Whether the visual loss reaches any gradient: None = only while some head parameter is trained (see
        # `visual_loss_learns`); True/False force it.
        self.visual_loss_grad: bool | None = None
        self.tie_weights()

    # ----------------------------------------------------------------------------------------------- weights
    def tie_weights(self) -> None:
        """Shares the embedding with the LM head when configured (re-run after `to_empty`, which unties)."""
        if self.config.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0) -> None:
        """Explicit initialisation: N(0, std) for matrices, scaled by 1/sqrt(2L) on residual outputs
        (Megatron's scaled init), zeros for biases, ones for norms.

        Each tensor draws from its own generator seeded by (seed, parameter name), so a pipeline stage (a model
        with modules removed) or a tensor-parallel rank gets exactly the weights of the single-device model.
        The vocabulary matrices draw their `[real_vocab_size, H]` rows only and pad with zeros, so the real rows
        are the same whatever the padding (Megatron draws the padded matrix: its weights change with the TP size).
        """
        self.tie_weights()
        std = self.config.init_method_std
        out_std = std / (2.0 * self.config.num_layers) ** 0.5

        def normal_(name: str, t: torch.Tensor, s: float, rows: int | None = None) -> None:
            generator = None
            if seed is not None:
                generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            # Draw on CPU in fp32 so a seed gives the same weights on any device and dtype.
            if rows is None or rows == t.shape[0]:
                t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, s, generator=generator).to(t))
                return
            drawn = torch.empty(rows, *t.shape[1:], dtype=torch.float32).normal_(0.0, s, generator=generator)
            t[:rows].copy_(drawn.to(t))
            t[rows:].zero_()  # vocabulary padding: zero, and it stays zero (no gradient ever reaches it)

        real = self.config.num_real_tokens
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm | RotaryEmbedding):
                module.reset_parameters()
            elif isinstance(module, nn.Embedding):
                normal_(f"{name}.weight", module.weight, std, rows=real)
            elif isinstance(module, nn.Linear):
                if self.config.tie_embeddings and module is self.output:
                    continue
                residual_out = name.endswith("attention.wo") or name.endswith("feed_forward.w2")
                normal_(f"{name}.weight", module.weight, out_std if residual_out else std,
                        rows=real if module is self.output else None)
                if module.bias is not None:
                    module.bias.zero_()

    # ----------------------------------------------------------------------------------------------- forward
    def embed(self, tokens: torch.Tensor, visual_tokens: torch.Tensor | None,
              visual_positions: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with projected visual tokens written into their slots.

        Args:
            tokens: [B, S] ids (slot positions hold any placeholder id).
            visual_tokens: [V, vision_dim] SigLIP tokens, in the order of `visual_positions`.
            visual_positions: [V] flat indices into B*S.
        Returns:
            [B, S, H]
        """
        h = self.tok_embeddings(tokens)
        b, s, hidden = h.shape
        if visual_tokens is None:
            # Run the projector on nothing so its parameters are always in the graph (DDP needs every
            # parameter used each step); the gradient it gets is exactly zero.
            visual_tokens = h.new_zeros(0, self.config.vision_dim)
            visual_positions = tokens.new_zeros(0)
        projected = self.projector(visual_tokens.to(h.dtype))
        # [B, S, H] -> [B*S, H] -> splice -> [B, S, H]
        return h.reshape(b * s, hidden).index_copy(0, visual_positions, projected).view(b, s, hidden)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        visual_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        visual_target_mask: torch.Tensor | None = None,
        kv_caches: list[LayerKVCache] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | VPiTLoss:
        """Runs the model (or this pipeline stage of it).

        Args:
            tokens: [B, S] token ids, or [B, S, H] hidden states on a stage without embeddings.
            position_ids: [B, S]; restart at each packed document. Defaults to 0..S-1.
            document_ids: [B, S] packed-document id per token; attention never crosses documents. None = one each.
            visual_tokens: [V, vision_dim] SigLIP tokens for the slots in `visual_positions` ([V], flat in B*S).
            labels: [B, S] next-token targets (labels[t] is predicted at t), IGNORE_INDEX where untrained.
                When given (with a head on this stage) the losses are returned.
            visual_target_mask: [V] bool; slot v is a response-image slot whose token is predicted at its
                position - 1. None means no visual targets.
            kv_caches: one `LayerKVCache` per layer for incremental decoding (generation).
            attention_mask: [B, cache length + S] bool, True for real tokens; only with `kv_caches`. Keys where it
                is False (the left padding of shorter prompts in a batch) are never attended to, and the default
                position ids count real tokens only, so a left-padded row starts at position 0.
        Returns:
            hidden states [B, S, H] on a stage without a head; final-normed hidden states when there is a norm but
            no labels; a `VPiTLoss` with labels.
        """
        if self.tok_embeddings is not None:
            h = self.embed(tokens, visual_tokens, visual_positions)
        else:
            h = tokens
        b, s = h.shape[:2]
        if attention_mask is not None:
            if not kv_caches:
                raise ValueError("attention_mask is for incremental decoding with kv_caches; without a cache, "
                                 "mask padded or packed rows with document_ids")
            if attention_mask.shape != (b, kv_caches[0].length + s):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(b, kv_caches[0].length + s)} (batch, cached tokens + new tokens)")
        if position_ids is None:
            if attention_mask is not None:
                # Count real tokens only: a left-padded row's first real token gets position 0.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            else:
                start = kv_caches[0].length if kv_caches else 0
                position_ids = torch.arange(start, start + s, device=h.device).expand(b, s)
        rope = self.rope(position_ids, h.dtype)
        if kv_caches:
            # Incremental decoding: queries are the last s keys; `attend` applies the causal offset. Packed
            # documents are a training-time layout and have no meaning against a cache.
            if document_ids is not None:
                raise ValueError("document_ids cannot be combined with kv_caches (decode one document per row)")
            if attention_mask is None:
                mask = build_attention_mask("sdpa", None, b, s, h.device)
            else:
                mask = AttentionMask("sdpa", dense=key_padding_causal_mask(attention_mask, s))
        else:
            mask = build_attention_mask(self.config.attention_backend, document_ids, b, s, h.device)
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, rope, mask, kv_caches[i] if kv_caches else None)
        if self.norm is None:
            return h
        h = self.norm(h)
        if labels is None:
            return h
        return self.compute_losses(h, labels, visual_tokens, visual_positions, visual_target_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits [.., vocab_size] of final-normed hidden states, with the vocabulary padding columns
        (ids >= `config.real_vocab_size`) at -inf: argmax and sampling can never pick them. Under tensor
        parallelism the result is a DTensor sharded on the vocabulary and each rank masks its own columns."""
        return mask_padded_vocab(self.output(hidden), self.config.real_vocab_size, inplace=True)

    def predict_visual(self, hidden: torch.Tensor) -> torch.Tensor:
        """Continuous-token head: predicted next SigLIP token [.., vision_dim] (not normalised)."""
        return self.visual_head(hidden)

    def visual_loss_learns(self) -> bool:
        """Whether the visual loss is part of the gradient. By default it is exactly when the continuous-token head
        trains: in stage 1 the head is frozen (unless --stage1-train-visual-head) and still randomly initialised,
        so a gradient through it would only teach the projector and the new embedding rows to please a random
        function. MetaMorph's stage 1 likewise computes and logs the visual loss but does not add it
        (`use_vision_ar=False` in scripts/slurm_pretrain.sh). Set `visual_loss_grad` to force either way."""
        if self.visual_loss_grad is not None:
            return self.visual_loss_grad
        if self.visual_head is None:
            return True
        return any(p.requires_grad for p in self.visual_head.parameters())

    def compute_losses(self, hidden: torch.Tensor, labels: torch.Tensor, visual_tokens: torch.Tensor | None,
                       visual_positions: torch.Tensor | None,
                       visual_target_mask: torch.Tensor | None) -> VPiTLoss:
        """Text cross-entropy on labelled positions + coef * (1 - cos) on response visual slots.

        Only labelled rows go through the LM head, and only rows preceding a visual target through the
        continuous-token head: prompt tokens cost no vocabulary projection. When `visual_loss_learns()` is False the
        visual term runs under no_grad: its value is exact, its gradient contribution is nothing at all (the
        gradients equal those of the text loss alone, bit for bit).
        """
        hidden_size = hidden.shape[-1]
        flat_hidden = hidden.reshape(-1, hidden_size)  # [B*S, H]
        flat_labels = labels.reshape(-1)
        text_rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
        if self.config.fused_linear_cross_entropy:  # LM head + cross-entropy in chunks, no [N, V] logits
            lm_sum = fused_text_cross_entropy_sum(flat_hidden[text_rows], self.output.weight, flat_labels[text_rows],
                                                  self.config.real_vocab_size)
        else:
            # Raw LM-head output: the cross-entropy masks the vocabulary padding itself (also vocabulary-parallel).
            lm_sum = text_cross_entropy_sum(self.output(flat_hidden[text_rows]), flat_labels[text_rows],
                                            self.config.real_vocab_size)
        lm_tokens = text_rows.new_tensor(text_rows.numel())

        if visual_tokens is not None and visual_target_mask is not None:
            targets = visual_tokens[visual_target_mask]
            predict_rows = visual_positions[visual_target_mask] - 1  # the slot's token is predicted one step early
        else:
            targets = flat_hidden.new_zeros(0, self.config.vision_dim)
            predict_rows = text_rows.new_zeros(0)
        # Always through the head (possibly on zero rows) so its parameters get a (zero) gradient.
        with contextlib.nullcontext() if self.visual_loss_learns() else torch.no_grad():
            if self.config.fused_visual_head_loss:  # head activations recomputed in the backward
                visual_sum = fused_visual_cosine_loss_sum(flat_hidden[predict_rows], targets, self.visual_head)
            else:
                visual_sum = visual_cosine_loss_sum(self.predict_visual(flat_hidden[predict_rows]), targets)
        visual_count = predict_rows.new_tensor(predict_rows.numel())

        lm_loss = lm_sum / lm_tokens.clamp(min=1)
        visual_loss = visual_sum / visual_count.clamp(min=1)
        loss = lm_loss + self.config.visual_loss_coef * visual_loss
        return VPiTLoss(loss=loss, lm_loss=lm_loss, visual_loss=visual_loss, lm_loss_sum=lm_sum,
                        lm_tokens=lm_tokens, visual_loss_sum=visual_sum, visual_targets=visual_count)

    # ----------------------------------------------------------------------------------------------- vocab
    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab_size: int, padded_size: int | None = None) -> None:
        """Sets the real vocabulary to `new_vocab_size` tokens, padded to `padded_size` rows (default: no padding).

        Real rows that already exist are kept; new real rows of the embedding and LM head start as the mean of the
        old real rows (as MetaMorph's `initialize_vision_tokenizer` does for `<image_start>`/`<image_end>`), so new
        tokens begin as an 'average' token; padding rows are zero (see `ModelConfig.real_vocab_size`).
        """
        padded_size = new_vocab_size if padded_size is None else padded_size
        if padded_size < new_vocab_size:
            raise ValueError(f"padded vocabulary {padded_size} is smaller than the real one {new_vocab_size}")
        old_real = self.config.num_real_tokens
        real = new_vocab_size
        if padded_size == self.config.vocab_size and real == old_real:
            return

        def resized(weight: torch.Tensor) -> nn.Parameter:
            new = weight.new_zeros(padded_size, weight.shape[1])
            keep = min(old_real, real)
            new[:keep] = weight[:keep]
            if real > old_real:
                new[old_real:real] = weight[:old_real].float().mean(dim=0).to(weight.dtype)
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        self.config = self.config.replace(vocab_size=padded_size,
                                          real_vocab_size=real if real < padded_size else None)
        if self.tok_embeddings is not None:
            self.tok_embeddings.weight = resized(self.tok_embeddings.weight)
            self.tok_embeddings.num_embeddings = padded_size
        if self.output is not None:
            if self.config.tie_embeddings and self.tok_embeddings is not None:
                self.tie_weights()
            else:
                self.output.weight = resized(self.output.weight)
            self.output.out_features = padded_size
        self.rope.config = self.config


def build_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> VPiTModel:
    """Builds on the meta device (no memory, no wasted init), materialises on `device`, then initialises."""
    with torch.device("meta"):
        model = VPiTModel(config)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model.to(dtype)
