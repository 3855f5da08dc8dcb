"""Hugging Face parity and checkpoint conversion.

A tiny random `transformers.LlamaForCausalLM` (fp32) imported into Chrysalis must give the same logits (1e-5
max-abs), for grouped-query attention and for Llama-3.1 RoPE scaling; export -> import must be bit-exact.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.checkpoint_io import CheckpointError, load_model_checkpoint  # noqa: E402
from engine.convert import chrysalis_to_hf, hf_to_chrysalis, main as convert_main, pad_vocab_size  # noqa: E402

HF_VOCAB = 250


def tiny_hf_llama(tmp_path, *, kv_heads=2, rope_scaling=None, tie=False, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=50000.0,
        rope_scaling=rope_scaling, tie_word_embeddings=tie, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    # Random init leaves norms at one; perturb them so a swapped norm mapping cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    return model, hf_dir


def max_abs_logit_error(hf_model, ours, tokens, position_offset=0):
    with torch.no_grad():
        positions = torch.arange(position_offset, position_offset + tokens.shape[1]).expand_as(tokens)
        ref = hf_model(tokens, position_ids=positions).logits
        got = ours.logits(ours(tokens, position_ids=positions))[..., :HF_VOCAB]
    return (ref - got).abs().max().item()


LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 256}


@pytest.mark.parametrize("kv_heads,rope_scaling,tie", [
    (4, None, False),              # multi-head attention
    (2, None, False),              # grouped-query attention
    (1, LLAMA31_SCALING, False),   # multi-query + Llama-3.1 frequency scaling
    (2, LLAMA31_SCALING, True),    # tied embeddings (Llama-3.2 style)
])
def test_logits_match_hugging_face(tmp_path, kv_heads, rope_scaling, tie):
    hf_model, hf_dir = tiny_hf_llama(tmp_path, kv_heads=kv_heads, rope_scaling=rope_scaling, tie=tie)
    ours, vocab = hf_to_chrysalis(hf_dir, tmp_path / "ckpt")
    ours.eval()
    assert vocab == {"base_vocab_size": HF_VOCAB, "image_start_id": HF_VOCAB, "image_end_id": HF_VOCAB + 1}
    tokens = torch.randint(0, HF_VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    assert max_abs_logit_error(hf_model, ours, tokens) < 1e-5
    # Positions past the original context exercise the scaled low frequencies.
    assert max_abs_logit_error(hf_model, ours, tokens, position_offset=1000) < 1e-5
    # The written checkpoint loads back to the same model.
    loaded, _ = load_model_checkpoint(tmp_path / "ckpt")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_image_tokens_appended_with_mean_rows_and_padding(tmp_path):
    hf_model, hf_dir = tiny_hf_llama(tmp_path)
    ours, vocab = hf_to_chrysalis(hf_dir, make_vocab_size_divisible_by=64)
    assert ours.config.vocab_size == pad_vocab_size(HF_VOCAB + 2, 64) == 256
    assert ours.config.real_vocab_size == HF_VOCAB + 2
    emb = hf_model.model.embed_tokens.weight
    mean = emb.mean(dim=0)
    new_rows = ours.tok_embeddings.weight[HF_VOCAB:HF_VOCAB + 2]  # <image_start>, <image_end>
    assert torch.allclose(new_rows, mean.expand_as(new_rows), atol=1e-7)
    assert torch.equal(ours.tok_embeddings.weight[:HF_VOCAB], emb)
    assert torch.allclose(ours.output.weight[vocab["image_start_id"]], hf_model.lm_head.weight.mean(dim=0), atol=1e-7)
    # Padding rows are zero and their logits -inf: never generated.
    assert torch.count_nonzero(ours.tok_embeddings.weight[HF_VOCAB + 2:]) == 0
    assert torch.count_nonzero(ours.output.weight[HF_VOCAB + 2:]) == 0
    with torch.no_grad():
        logits = ours.logits(ours(torch.tensor([[1, 2, 3]])))
    assert torch.isneginf(logits[..., HF_VOCAB + 2:]).all() and torch.isfinite(logits[..., :HF_VOCAB + 2]).all()


def _change_vpit_parts(model) -> None:
    """A train-like change of the projector, head and image-token rows: import re-initialises the projector and
    head with the same seed, so a round trip that lost `vpit_heads.safetensors` would still match an unchanged
    model."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("projector.", "visual_head.")):
                p.add_(torch.randn(p.shape, generator=g))
        model.tok_embeddings.weight[HF_VOCAB:HF_VOCAB + 2] += 1.0
        model.output.weight[HF_VOCAB:HF_VOCAB + 2] -= 1.0


def test_export_import_round_trip_is_bit_exact(tmp_path):
    from engine.checkpoint_io import save_model_checkpoint
    from engine.convert import VPIT_HEADS_FILE

    _, hf_dir = tiny_hf_llama(tmp_path, rope_scaling=LLAMA31_SCALING)
    model, vocab = hf_to_chrysalis(hf_dir)
    _change_vpit_parts(model)
    save_model_checkpoint(model, tmp_path / "ckpt1", vocab=vocab)
    fresh, _ = hf_to_chrysalis(hf_dir)  # what an import without our heads would give
    assert not torch.equal(fresh.projector.fc1.weight, model.projector.fc1.weight)
    exported = chrysalis_to_hf(tmp_path / "ckpt1", tmp_path / "exported", max_shard_bytes=40_000)
    assert (exported / "model.safetensors.index.json").is_file(), "small shard size must produce a sharded export"
    # The export holds the real vocabulary rows only (tokenizer ids + image tokens), not the padding.
    hf_config = json.loads((exported / "config.json").read_text())
    assert hf_config["vocab_size"] == HF_VOCAB + 2 == hf_config["chrysalis"]["real_vocab_size"]
    assert model.config.vocab_size == 256  # 252 padded to a multiple of 128
    hf_to_chrysalis(exported, tmp_path / "ckpt2")
    again, _ = load_model_checkpoint(tmp_path / "ckpt2")
    first = model.state_dict()
    second = again.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype, name
        assert torch.equal(first[name], second[name]), name
    assert again.config == model.config
    # Another padding (e.g. for TP4) keeps the same real rows.
    other, _ = hf_to_chrysalis(exported, make_vocab_size_divisible_by=512)
    assert other.config.vocab_size == 512 and other.config.real_vocab_size == HF_VOCAB + 2
    assert torch.equal(other.output.weight[:HF_VOCAB + 2], model.output.weight[:HF_VOCAB + 2])
    # The heads file is what carries the projector and head: without it the import differs.
    (exported / VPIT_HEADS_FILE).unlink()
    without, _ = hf_to_chrysalis(exported)
    assert not torch.equal(without.projector.fc1.weight, model.projector.fc1.weight)
    # The export is a loadable transformers model whose logits match ours on the real vocabulary.
    hf_again = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    tokens = torch.randint(0, HF_VOCAB, (1, 16))
    with torch.no_grad():
        ours = model.logits(model(tokens))
        diff = (hf_again(tokens).logits - ours[..., :HF_VOCAB + 2]).abs().max().item()
    assert diff < 1e-5 and torch.isneginf(ours[..., HF_VOCAB + 2:]).all()


def test_mismatched_tensor_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, hf_dir = tiny_hf_llama(tmp_path)
    state = load_file(hf_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(161, 64)
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight|layers.1.feed_forward.w3.weight") as err:
        hf_to_chrysalis(hf_dir)
    assert "(160, 64)" in str(err.value)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, hf_dir = tiny_hf_llama(tmp_path)
    state = load_file(hf_dir / "model.safetensors")
    del state["model.layers.2.self_attn.k_proj.weight"]
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers.2.attention.wk.weight' \(expected shape \(32, 64\)\)"):
        hf_to_chrysalis(hf_dir)


def test_corrupt_checkpoint_detected_by_checksum(tmp_path):
    _, hf_dir = tiny_hf_llama(tmp_path)
    ckpt = tmp_path / "ckpt"
    hf_to_chrysalis(hf_dir, ckpt)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_model_checkpoint(ckpt)


def test_truncated_hf_file_gives_clear_error(tmp_path):
    _, hf_dir = tiny_hf_llama(tmp_path)
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        hf_to_chrysalis(hf_dir)


def test_pickled_checkpoints_are_refused(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    (hf_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled .bin files are refused"):
        hf_to_chrysalis(hf_dir)


def test_cli_round_trip(tmp_path, capsys):
    _, hf_dir = tiny_hf_llama(tmp_path)
    assert convert_main(["hf-to-chrysalis", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "c")]) == 0
    assert "image tokens 250, 251" in capsys.readouterr().out
    assert convert_main(["chrysalis-to-hf", "--load", str(tmp_path / "c"), "--output", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "config.json").read_text())["chrysalis"]["image_end_id"] == 251
    assert convert_main(["chrysalis-to-hf", "--load", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", ["config-not-json", "config-not-utf8", "config-list", "config-no-vocab",
                                  "chrysalis-no-ids", "index-outside", "index-absolute", "index-not-a-map"])
def test_bad_hf_directories_give_one_line_and_exit_2(tmp_path, capsys, case):
    """Hand-made or tampered HF directories: tracebacks (JSONDecodeError, KeyError, AttributeError) before, and an
    index whose shard names lead outside --hf-dir (`../x`, an absolute path) was read from there."""
    _, hf_dir = tiny_hf_llama(tmp_path)
    config, weights = hf_dir / "config.json", hf_dir / "model.safetensors"
    if case.startswith("index"):
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        weights.rename(outside / "m.safetensors")
        from safetensors import safe_open

        keys = list(safe_open(str(outside / "m.safetensors"), "pt").keys())
        shard = {"index-outside": "../elsewhere/m.safetensors",
                 "index-absolute": str(outside / "m.safetensors"), "index-not-a-map": None}[case]
        index = {"weight_map": {k: shard for k in keys} if shard else ["m.safetensors"]}
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    elif case == "config-not-json":
        config.write_text("{")
    elif case == "config-not-utf8":
        config.write_bytes(b"\xff\xfe")
    elif case == "config-list":
        config.write_text("[]")
    elif case == "config-no-vocab":
        _edit_json(config, lambda d: d.pop("vocab_size"))
    else:
        _edit_json(config, lambda d: d.update(chrysalis={"real_vocab_size": 3}))
    capsys.readouterr()  # save_pretrained's progress bars
    assert convert_main(["hf-to-chrysalis", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = {"config-not-json": "config.json is not valid JSON", "config-not-utf8": "config.json is not valid UTF-8",
            "config-list": "config.json holds a JSON list, not an object",
            "config-no-vocab": "field 'vocab_size' is missing", "chrysalis-no-ids": "field 'base_vocab_size' is missing",
            "index-outside": "which is not a file inside", "index-absolute": "which is not a file inside",
            "index-not-a-map": "not a valid safetensors index"}[case]
    assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], err
    assert not (tmp_path / "c").exists()


def test_conversion_never_overwrites_its_source_or_another_checkpoint(tmp_path, capsys):
    """`chrysalis-to-hf --load M --output M` replaced M's config.json and weights (the model-only checkpoint was
    gone); `hf-to-chrysalis --output` into a training --save folder made its next --load a weights-only restart."""
    _, hf_dir = tiny_hf_llama(tmp_path)
    assert convert_main(["hf-to-chrysalis", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "c")]) == 0
    save = tmp_path / "save"
    (save / "iter_0000001").mkdir(parents=True)
    (save / "latest").write_text("iter_0000001\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    for argv, want in (
            (["chrysalis-to-hf", "--load", str(tmp_path / "c"), "--output", str(tmp_path / "c")], "is the --load directory"),
            (["chrysalis-to-hf", "--load", str(tmp_path / "c"), "--output", str(hf_dir.parent / "c")],
             "is the --load directory"),
            (["hf-to-chrysalis", "--hf-dir", str(hf_dir), "--output", str(hf_dir)], "is the --hf-dir directory"),
            (["hf-to-chrysalis", "--hf-dir", str(hf_dir), "--output", str(save)], "holds training checkpoints"),
            (["chrysalis-to-hf", "--load", str(tmp_path / "c"), "--output", str(tmp_path / "c2")], None)):
        if want is None:  # a model-only checkpoint elsewhere: the HF export must not land on it either
            (tmp_path / "c2").mkdir()
            (tmp_path / "c2" / "config.json").write_text(json.dumps({"format": "chrysalis-model"}))
            before[tmp_path / "c2" / "config.json"] = (tmp_path / "c2" / "config.json").read_bytes()
            want = "holds a checkpoint of the other format"
        assert convert_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
