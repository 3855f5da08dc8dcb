"""Model config, build/init, visual splicing, vocabulary resizing, pipeline stages and the KV cache.

Parity with Hugging Face's LlamaForCausalLM is in tests/test_convert.py.

Everything runs the `tiny` preset in fp32 on CPU; the big presets are only built on the meta device.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from engine.config import ModelConfig, add_model_args, model_config_from_args, preset
from engine.model import IGNORE_INDEX, VPiTModel, build_model
from engine.model.llama import LayerKVCache, RMSNorm

VOCAB = 512  # the tiny preset's


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(num_attention_heads=4, num_query_groups=3), "--num-query-groups"),
        (dict(hidden_size=66, num_attention_heads=4), "--hidden-size"),
        (dict(hidden_size=60, num_attention_heads=4), "--num-attention-heads"),  # head dim 15: odd, no RoPE
        (dict(seq_length=4096, max_position_embeddings=2048), "--seq-length"),
        (dict(vocab_size=0), "--vocab-size"),
        (dict(num_layers=-1), "--num-layers"),
        (dict(ffn_hidden_size=0), "--ffn-hidden-size"),
        (dict(attention_backend="xformers"), "--attention-backend"),
    ],
)
def test_config_errors_name_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        preset("tiny", **overrides)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        preset("tiny", num_query_groups=3, vocab_size=0)
    assert "--num-query-groups" in str(info.value) and "--vocab-size" in str(info.value)


def test_config_round_trip_and_unknown_fields():
    cfg = preset("llama3.1-8b")
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # rope_scaling comes back from a dict
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({**cfg.to_dict(), "num_heads": 32})
    with pytest.raises(ValueError, match="--model-preset"):
        preset("llama9-1t")
    assert ModelConfig(num_attention_heads=8, hidden_size=512).num_query_groups == 8  # MHA default


def test_megatron_flags_override_the_preset():
    parser = add_model_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model-preset", "llama3.2-1b", "--num-layers", "2", "--seq-length", "1024",
                              "--untie-embeddings-and-output-weights", "--attention-backend", "flex",
                              "--rope-scaling-factor", "16"])
    cfg = model_config_from_args(args)
    assert (cfg.num_layers, cfg.seq_length, cfg.hidden_size) == (2, 1024, 2048)
    assert cfg.tie_embeddings is False and cfg.attention_backend == "flex"
    assert cfg.rope_scaling.factor == 16.0 and cfg.rope_scaling.original_max_position_embeddings == 8192
    with pytest.raises(ValueError, match="--model-preset"):
        model_config_from_args(parser.parse_args([]))
    with pytest.raises(ValueError, match="--num-query-groups"):
        model_config_from_args(parser.parse_args(["--model-preset", "tiny", "--num-query-groups", "3"]))


def _expected_params(cfg: ModelConfig) -> int:
    """Analytic count: LLaMA (untied or tied) + projector (2 linears with bias) + continuous-token head."""
    h, f, v, vd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.vision_dim
    kv = cfg.num_query_groups * cfg.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # wq, wo, wk, wv, SwiGLU, two norms
    llama = v * h * (1 if cfg.tie_embeddings else 2) + cfg.num_layers * per_layer + h
    projector = (vd * h + h) + (h * h + h)
    head = (h * h + h) + (h * vd + vd)
    return llama + projector + head


@pytest.mark.parametrize(
    "name, llama_params",
    [("llama3.1-8b", 8_030_261_248), ("llama3.2-1b", 1_235_814_400), ("llama2-7b", 6_738_415_616)],
)
def test_presets_build_on_meta_with_known_parameter_counts(name, llama_params):
    cfg = preset(name)
    with torch.device("meta"):
        model = VPiTModel(cfg)
    count = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    assert count == _expected_params(cfg)
    # The published LLaMA figure plus exactly the projector and head.
    vpit_extra = sum(p.numel() for p in model.projector.parameters()) + sum(
        p.numel() for p in model.visual_head.parameters())
    assert count - vpit_extra == llama_params
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tiny_preset_builds_and_runs():
    model = build_model(preset("tiny"), seed=0)
    assert sum(p.numel() for p in model.parameters()) == _expected_params(preset("tiny"))
    out = model(torch.zeros(1, 4, dtype=torch.long))
    assert out.shape == (1, 4, 64) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------- build / init
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_build_is_deterministic_per_seed():
    cfg = preset("tiny")
    a, b, c = _state(build_model(cfg, seed=7)), _state(build_model(cfg, seed=7)), _state(build_model(cfg, seed=8))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    matrices = [k for k in a if a[k].dim() == 2]
    assert matrices and all(not torch.equal(a[k], c[k]) for k in matrices)
    # The global RNG state does not leak into a seeded build.
    torch.manual_seed(123)
    d = _state(build_model(cfg, seed=7))
    assert all(torch.equal(a[k], d[k]) for k in a)


def test_init_values():
    cfg = preset("tiny", init_method_std=0.02)
    model = build_model(cfg, seed=0)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * cfg.num_layers + 1
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
    assert len(biases) == 4  # projector fc1/fc2, head fc1/fc2
    assert all(torch.count_nonzero(p) == 0 for _, p in biases)
    assert not any(p.isnan().any() for p in model.parameters())
    # N(0, std), and std / sqrt(2L) on residual outputs (Megatron's scaled init).
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers["0"].attention.wq.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / (2 * cfg.num_layers) ** 0.5
    assert abs(model.layers["1"].feed_forward.w2.weight.std().item() - scaled) < 0.1 * scaled
    assert abs(model.layers["1"].attention.wo.weight.std().item() - scaled) < 0.1 * scaled
    # RoPE frequencies are the plain ones for an unscaled config (no garbage left by `to_empty`).
    expected = 1.0 / (cfg.rotary_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    torch.testing.assert_close(model.rope.inverse_frequencies(torch.device("cpu")), expected)


def _assert_tied(model):
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    with torch.no_grad():
        model.tok_embeddings.weight[3, 0] += 1.0  # a write through one is seen by the other
    assert torch.equal(model.output.weight[3], model.tok_embeddings.weight[3])


def test_tied_embeddings_share_storage_after_build_and_resize():
    model = build_model(preset("tiny", tie_embeddings=True), seed=0)
    _assert_tied(model)
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    model.resize_token_embeddings(VOCAB + 8)
    _assert_tied(model)
    assert model.output.weight.shape == (VOCAB + 8, 64) and model.output.out_features == VOCAB + 8
    untied = build_model(preset("tiny"), seed=0)
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings(tie):
    model = build_model(preset("tiny", tie_embeddings=tie), seed=0)
    old_emb = model.tok_embeddings.weight.detach().clone()
    old_out = model.output.weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 3)
    emb, out = model.tok_embeddings.weight, model.output.weight
    assert emb.shape == out.shape == (VOCAB + 3, 64) and emb.requires_grad
    assert model.config.vocab_size == model.tok_embeddings.num_embeddings == VOCAB + 3
    assert torch.equal(emb[:VOCAB], old_emb) and torch.equal(out[:VOCAB], old_out)
    for row in range(VOCAB, VOCAB + 3):
        torch.testing.assert_close(emb[row], old_emb.mean(0))
        torch.testing.assert_close(out[row], old_out.mean(0))
    if not tie:
        assert not torch.allclose(old_emb.mean(0), old_out.mean(0))  # each from its own matrix
    # New ids embed and predict.
    logits = model.logits(model(torch.tensor([[VOCAB + 2, 1]])))
    assert logits.shape == (1, 2, VOCAB + 3)
    # Shrinking keeps the leading rows.
    model.resize_token_embeddings(100)
    assert torch.equal(model.tok_embeddings.weight, old_emb[:100]) and model.output.weight.shape[0] == 100


# ----------------------------------------------------------------------------------------------- visual splicing
def test_visual_tokens_are_spliced_into_their_slots():
    torch.manual_seed(0)
    model = build_model(preset("tiny"), seed=0)
    tokens = torch.randint(0, VOCAB, (2, 10))
    positions = torch.tensor([3, 4, 5, 10 + 7])  # flat indices into B*S
    visual = torch.randn(4, model.config.vision_dim)
    with torch.no_grad():
        h = model.embed(tokens, visual, positions)
        projected = model.projector(visual)
        plain = model.tok_embeddings(tokens)
    flat, flat_plain = h.reshape(20, -1), plain.reshape(20, -1)
    torch.testing.assert_close(flat[positions], projected, atol=0, rtol=0)
    others = torch.ones(20, dtype=torch.bool)
    others[positions] = False
    assert torch.equal(flat[others], flat_plain[others])
    assert torch.equal(model.embed(tokens, None, None), plain)
    # The full forward uses the spliced embedding: changing an image changes the hidden states after its slot.
    with torch.no_grad():
        a = model(tokens, visual_tokens=visual, visual_positions=positions)
        b = model(tokens, visual_tokens=visual + 1, visual_positions=positions)
    assert torch.equal(a[0, :3], b[0, :3]) and not torch.allclose(a[0, 3:], b[0, 3:])


# ----------------------------------------------------------------------------------------------- pipeline
def _vpit_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    positions = torch.tensor([2, 3, 8, 9, 16 + 5, 16 + 6])
    labels.view(-1)[positions - 1] = IGNORE_INDEX
    return dict(
        tokens=tokens, labels=labels, visual_tokens=torch.randn(6, 1152, generator=g), visual_positions=positions,
        visual_target_mask=torch.tensor([False, False, True, True, True, True]),
        document_ids=torch.tensor([[0] * 16, [0] * 10 + [1] * 6]),
        position_ids=torch.stack([torch.arange(16), torch.cat([torch.arange(10), torch.arange(6)])]),
    )


@pytest.mark.parametrize("tie", [False, True])
def test_two_pipeline_stages_equal_the_whole_model(tie):
    model = build_model(preset("tiny", tie_embeddings=tie), seed=0)
    batch = _vpit_batch()
    whole = model(batch["tokens"], **{k: v for k, v in batch.items() if k != "tokens"})

    first = copy.deepcopy(model)
    first.norm = first.output = first.visual_head = None
    del first.layers["2"], first.layers["3"]
    second = copy.deepcopy(model)
    second.tok_embeddings = second.projector = None
    del second.layers["0"], second.layers["1"]
    assert list(second.layers.keys()) == ["2", "3"]  # checkpoint names survive

    common = dict(position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    hidden = first(batch["tokens"], visual_tokens=batch["visual_tokens"],
                   visual_positions=batch["visual_positions"], **common)
    assert hidden.shape == (2, 16, 64)
    # The boundary tensor is what a pipeline sends: detach it and carry its gradient across by hand.
    received = hidden.detach().requires_grad_(True)
    out = second(received, labels=batch["labels"], visual_tokens=batch["visual_tokens"],
                 visual_positions=batch["visual_positions"], visual_target_mask=batch["visual_target_mask"],
                 **common)
    torch.testing.assert_close(out.loss, whole.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.lm_loss, whole.lm_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.visual_loss, whole.visual_loss, atol=1e-6, rtol=1e-6)
    assert out.visual_targets == whole.visual_targets == 4

    # Gradients match the whole model's, stage by stage.
    whole.loss.backward()
    out.loss.backward()
    hidden.backward(received.grad)
    for stage, name in ((first, "layers.0.attention.wq.weight"), (first, "projector.fc1.weight"),
                        (second, "layers.3.feed_forward.w2.weight"), (second, "visual_head.fc2.weight")):
        got = dict(stage.named_parameters())[name].grad
        want = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- KV cache
def test_kv_cache_decoding_matches_full_forward():
    cfg = preset("tiny")
    model = build_model(cfg, seed=0).eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 14))
    prompt = 6
    with torch.no_grad():
        full = model(tokens)
        caches = [LayerKVCache(2, cfg.num_query_groups, 16, cfg.head_dim, torch.float32, torch.device("cpu"))
                  for _ in range(cfg.num_layers)]
        prefill = model(tokens[:, :prompt], kv_caches=caches)
        torch.testing.assert_close(prefill, full[:, :prompt], atol=1e-5, rtol=0)
        for t in range(prompt, 14):
            step = model(tokens[:, t:t + 1], kv_caches=caches)
            assert step.shape == (2, 1, 64)
            torch.testing.assert_close(step[:, -1], full[:, t], atol=1e-5, rtol=0)
        assert all(c.length == 14 for c in caches)
        # A multi-token chunk after a prefill (Sq < Sk, Sq > 1) is masked causally too.
        caches2 = [LayerKVCache(2, cfg.num_query_groups, 16, cfg.head_dim, torch.float32, torch.device("cpu"))
                   for _ in range(cfg.num_layers)]
        model(tokens[:, :prompt], kv_caches=caches2)
        chunk = model(tokens[:, prompt:], kv_caches=caches2)
        torch.testing.assert_close(chunk, full[:, prompt:], atol=1e-5, rtol=0)
        with pytest.raises(RuntimeError, match="KV cache overflow"):
            model(tokens[:, :3], kv_caches=caches2)
