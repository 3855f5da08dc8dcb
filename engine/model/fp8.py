"""FP8 GEMMs for the transformer blocks' linears: torchao float8 training, or Transformer Engine when installed.

Which linears become FP8: the seven GEMMs of every transformer block (attention wq/wk/wv/wo, SwiGLU w1/w2/w3),
which carry ~95% of an 8B model's matmul FLOPs at 8k tokens. What stays in bf16 and why:
- the token embedding is a lookup, not a GEMM: nothing to gain;
- the LM head produces the logits of a 128k-entry softmax, and the cross-entropy is sensitive to their small
  differences; FP8 there costs loss (torchtitan and Megatron also keep it in high precision) for ~6% of FLOPs;
- the projector and the continuous-token head are small (two 1152/H-wide layers each), run on a few rows (visual
  slots, visual targets), and the head's output is compared by cosine with SigLIP targets, so quantisation error
  lands directly in the visual loss; their row counts are rarely multiples of 16 either (an FP8 GEMM requirement).
- linears whose dimensions are not multiples of 16 (torch._scaled_mm's constraint) stay in bf16 as well.

Recipes (`--fp8-recipe`): `tensorwise` (one dynamic scale per tensor; with FSDP2 the weights are all-gathered in
FP8, torchao's `enable_fsdp_float8_all_gather`), `rowwise` (one scale per row of each operand: more accurate,
a little slower; all-gather stays bf16), `delayed` (scales from an amax history: Transformer Engine only, torchao
removed delayed scaling). `--fp8-format`: `e4m3` everywhere, or `hybrid` (e4m3 forward, e5m2 gradients, which
need range more than precision). torchao's rowwise recipe is defined with e4m3 gradients, so `hybrid` only
changes the tensorwise recipe there.

Composition: convert before tensor parallelism and FSDP2 (torchtitan's order). torchao's Float8Linear accepts
DTensor weights, so the DTensor TP plans apply unchanged (the TP collectives then move bf16 activations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Fp8Format = Literal["e4m3", "hybrid"]
Fp8Recipe = Literal["tensorwise", "rowwise", "delayed"]
Fp8Backend = Literal["torchao", "te"]

# Block linears that run in FP8, by their name inside a TransformerBlock.
FP8_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
               "feed_forward.w3")


@dataclass(kw_only=True)
class Fp8Config:
    """Args:
        format: `e4m3` or `hybrid` (e4m3 forward, e5m2 backward).
        recipe: `tensorwise`, `rowwise` or `delayed` (TE only).
        backend: `torchao` or `te`.
        fsdp_all_gather: all-gather FP8 weights under FSDP2 (tensorwise torchao only).
        emulate: run torchao's FP8 casts with high-precision matmuls (CPU tests; same rounding, no speed).
    """

    format: Fp8Format = "hybrid"
    recipe: Fp8Recipe = "tensorwise"
    backend: Fp8Backend = "torchao"
    fsdp_all_gather: bool = False
    emulate: bool = False


def fp8_unsupported_reason(config: Fp8Config, device: torch.device) -> str | None:
    """None when FP8 training with `config` can run on `device`, else a sentence naming what to change."""
    if config.recipe == "delayed" and config.backend != "te":
        return "--fp8-recipe delayed needs --fp8-backend te (torchao removed delayed scaling); use tensorwise " \
               "or rowwise with torchao"
    if config.backend == "torchao":
        try:
            import torchao.float8  # noqa: F401
        except ImportError as err:
            return f"torchao is not importable ({err}): pip install 'chrysalis[fp8]'"
    elif config.backend == "te":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            return "--fp8-backend te needs transformer_engine (the NGC PyTorch container, or pip install " \
                   "transformer-engine[pytorch])"
    else:
        return f"--fp8-backend must be torchao or te, got {config.backend!r}"
    if config.emulate:
        return None if config.backend == "torchao" else "FP8 emulation is a torchao feature"
    device = torch.device(device)
    if device.type != "cuda":
        return f"FP8 GEMMs need a CUDA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell); this run is " \
               f"on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell); " \
               f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}"
    return None


def fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """True for the block linears that run in FP8: inside `layers.*`, one of FP8_LINEARS, dimensions % 16 == 0.

    Names may carry wrapper prefixes (activation checkpointing, compile); they are matched by suffix.
    """
    if not isinstance(module, nn.Linear):
        return False
    name = fqn.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    if not (name.startswith("layers.") and name.endswith(FP8_LINEARS)):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _torchao_config(config: Fp8Config):
    from torchao.float8 import Float8LinearConfig

    ao = Float8LinearConfig.from_recipe_name(config.recipe)
    if config.recipe == "tensorwise" and config.format == "e4m3":
        e4m3 = dataclasses.replace(ao.cast_config_grad_output, target_dtype=torch.float8_e4m3fn)
        ao = dataclasses.replace(ao, cast_config_grad_output=e4m3, cast_config_grad_output_for_grad_weight=e4m3)
    return dataclasses.replace(ao, enable_fsdp_float8_all_gather=config.fsdp_all_gather and config.recipe == "tensorwise",
                               emulate=config.emulate)


def convert_to_fp8(model: nn.Module, config: Fp8Config) -> list[str]:
    """Swaps the block linears of `model` (a VPiTModel or a pipeline stage of one, before TP/FSDP) for FP8
    linears in place. Returns the names of the converted linears."""
    converted = [name for name, m in model.named_modules() if fp8_module_filter(m, name)]
    if config.backend == "te":
        _convert_to_te(model, converted, config)
        return converted
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=fp8_module_filter, config=_torchao_config(config))
    return converted


def precompute_fp8_scales(model: nn.Module) -> None:
    """After each optimizer step with FSDP2 FP8 all-gather: one all-reduce for every weight's amax (torchao)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


# ----------------------------------------------------------------------------------------------- Transformer Engine
def _te_linear(linear: nn.Linear, recipe) -> nn.Module:
    """A TE Linear with `linear`'s weights that runs under `te.fp8_autocast` with `recipe`. It subclasses
    te.Linear, so its parameters keep nn.Linear's names (`weight`, `bias`): checkpoints and the TP plans keyed on
    module names are unchanged."""
    import transformer_engine.pytorch as te

    class TeFp8Linear(te.Linear):
        def forward(self, x, *args, **kwargs):
            with te.fp8_autocast(enabled=True, fp8_recipe=self.chrysalis_fp8_recipe):
                return super().forward(x, *args, **kwargs)

    out = TeFp8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      params_dtype=linear.weight.dtype, device=linear.weight.device)
    out.chrysalis_fp8_recipe = recipe
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def _te_recipe(config: Fp8Config):
    from transformer_engine.common import recipe as te_recipe

    fmt = te_recipe.Format.HYBRID if config.format == "hybrid" else te_recipe.Format.E4M3
    if config.recipe == "delayed":
        return te_recipe.DelayedScaling(fp8_format=fmt, amax_history_len=1024, amax_compute_algo="max")
    if config.recipe == "tensorwise":
        return te_recipe.Float8CurrentScaling(fp8_format=fmt)
    return te_recipe.Float8BlockScaling(fp8_format=fmt)  # TE's closest to rowwise: 1x128 / 128x128 blocks


def _convert_to_te(model: nn.Module, names: list[str], config: Fp8Config) -> None:
    recipe = _te_recipe(config)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _te_linear(getattr(parent, child), recipe))
