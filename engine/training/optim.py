"""Stage-1/2 parameter selection, AdamW parameter groups and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.training.config import OptimizerConfig, TrainingConfig

# Names of the (possibly checkpoint-wrapped) parameters, without wrapper prefixes.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.", "_orig_mod.")
VOCAB_MATRICES = ("tok_embeddings.weight", "output.weight")


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def stage_trainable(name: str, stage: int, train_visual_head: bool = False) -> bool:
    """Whether parameter `name` is trained in `stage`. In stage 1 the vocabulary matrices are trainable, but only
    their new rows receive gradient (see `NewRowGradientMask`)."""
    if stage == 2:
        return True
    name = clean_name(name)
    return (name.startswith("projector.") or name in VOCAB_MATRICES
            or (train_visual_head and name.startswith("visual_head.")))


def apply_stage(model: nn.Module, stage: int, train_visual_head: bool = False) -> list[str]:
    """Sets requires_grad per stage (before DDP/FSDP wrapping); returns the trainable names."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(stage_trainable(name, stage, train_visual_head))
        if param.requires_grad:
            trainable.append(clean_name(name))
    return trainable


class NewRowGradientMask:
    """Stage 1: zeroes the gradient rows of the pretrained vocabulary (< base_vocab_size) of the embedding and
    LM head after backward and gradient reduction, so only the appended rows (`<image_start>`, `<image_end>`,
    padding) learn.

    Applied to `.grad` between backward and the optimizer step rather than as a tensor hook: the same code then
    works on plain tensors, DDP (hooks would run before the all-reduce, which is also fine) and FSDP2, whose
    gradients are DTensors sharded on the row dimension; there the mask is distributed like the gradient.
    Those matrices get no weight decay in stage 1 (see `param_groups`), so AdamW leaves old rows bit-identical.
    """

    def __init__(self, model: nn.Module, base_vocab_size: int):
        self.targets: list[tuple[nn.Parameter, torch.Tensor]] = []
        seen = set()
        for name, param in model.named_parameters():
            if clean_name(name) in VOCAB_MATRICES and param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                rows = param.shape[0]
                mask = torch.zeros(rows, 1, dtype=param.dtype)
                mask[base_vocab_size:] = 1
                self.targets.append((param, self._like(mask, param)))

    @staticmethod
    def _like(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(param, DTensor):
            return distribute_tensor(mask.to(param.device_mesh.device_type), param.device_mesh, param.placements)
        return mask.to(param.device)

    @torch.no_grad()
    def __call__(self) -> None:
        for param, mask in self.targets:
            if param.grad is not None:
                param.grad.mul_(mask)


def _no_weight_decay(name: str, param: nn.Parameter, stage: int) -> bool:
    name = clean_name(name)
    if param.ndim < 2:  # RMSNorm weights and biases
        return True
    # Stage 1 trains only new rows of these matrices; decay would shrink the frozen rows.
    return stage == 1 and name in VOCAB_MATRICES


def param_groups(model: nn.Module, config: TrainingConfig) -> list[dict]:
    """Two AdamW groups: decayed matrices, and norms/biases (never decayed, as in Megatron). The embedding and LM
    head are decayed in stage 2 (Megatron's default) and not in stage 1."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if _no_weight_decay(name, param, config.stage) else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": config.optimizer.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters), foreach otherwise."""
    o = config.optimizer
    on_cuda = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, config), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                             eps=o.adam_eps, fused=True if on_cuda else None)


class PartOptimizers:
    """One AdamW per local model part (pipeline stages of a rank), driven as one optimizer. Separate optimizers
    keep each part's state under that part's parameter names, which is what lets checkpoints reshard across
    pipeline layouts. A part with nothing to train (stage 1, a middle pipeline stage) gets None."""

    def __init__(self, parts: list[nn.Module], config: TrainingConfig):
        self.optimizers = [build_optimizer(part, config) if any(p.requires_grad for p in part.parameters()) else None
                           for part in parts]

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers if opt is not None for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            if opt is not None:
                opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            if opt is not None:
                opt.zero_grad(set_to_none=set_to_none)


class WarmupDecaySchedule:
    """Megatron's schedule: linear warm-up from 0 to `lr` over `warmup` steps, then cosine (or linear) decay to
    `min_lr` at `decay_iters`, constant afterwards. `lr_at(step)` is the LR of optimizer step `step` (0-based)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig, train_iters: int):
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.style = config.lr, config.min_lr, config.lr_decay_style
        self.decay_iters = config.lr_decay_iters or train_iters
        if config.lr_warmup_fraction is not None:
            self.warmup = int(config.lr_warmup_fraction * self.decay_iters)
        else:
            self.warmup = config.lr_warmup_iters
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return self.max_lr * (step + 1) / self.warmup
        if self.style == "constant":
            return self.max_lr
        if step >= self.decay_iters:
            return self.min_lr
        ratio = (step - self.warmup) / max(1, self.decay_iters - self.warmup)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def shard_optimizer_state(model: nn.Module, dp_mesh, bf16: bool) -> nn.Module:
    """Megatron's distributed optimizer (`--use-distributed-optimizer`) for replicated data parallelism.

    Megatron keeps a full copy of the parameters on every rank for forward and backward, reduce-scatters the
    gradients so that each rank holds 1/dp of them, updates its 1/dp of the fp32 main parameters and optimizer
    state, and all-gathers the updated parameters. FSDP2 with `reshard_after_forward=False` (ZeRO-2) does exactly
    that traffic: one all-gather of each block's parameters per step (kept from forward through backward), one
    reduce-scatter of its gradients in backward, AdamW state and fp32 master weights sharded 1/dp per rank.
    Between steps only the shards are kept, so it needs no more memory than Megatron's. Using FSDP2 instead of a
    hand-written flat buffer also keeps checkpoints in torch.distributed.checkpoint's resharding format.

    With `bf16`, parameters are gathered in bf16 and gradients reduced in fp32 (Megatron's
    `--accumulate-allreduce-grads-in-fp32`).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    return model
