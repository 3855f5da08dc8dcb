"""Units: best-fit-decreasing packing, truncation rules, the streaming JSON-array reader, the encoder pooling."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from engine.data.records import RecordError, _JsonArrayStream, iter_json_array, iter_jsonl, plan_input
from engine.tokenizer.chat import EncodedConversation, ImageSpan
from preprocess.packing import fit_to_length, pack_best_fit_decreasing


def _first_fit_decreasing(lengths, capacity):
    bins = []
    for size in sorted(lengths, reverse=True):
        for members in bins:
            if sum(members) + size <= capacity:
                members.append(size)
                break
        else:
            bins.append([size])
    return len(bins)


def test_packing_is_valid_deterministic_and_no_worse_than_ffd():
    rng = random.Random(0)
    capacity = 4096
    for trial in range(20):
        lengths = [rng.choice([rng.randint(40, 400), rng.randint(600, 1800), 66 * rng.randint(1, 4) + 30])
                   for _ in range(300)]
        bins = pack_best_fit_decreasing(lengths, capacity)
        assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in members) <= capacity for members in bins)
        assert all(members == sorted(members) for members in bins)
        assert len(bins) <= _first_fit_decreasing(lengths, capacity)
        assert bins == pack_best_fit_decreasing(list(lengths), capacity)
        # Lower bound: no packing can use fewer than ceil(total / capacity) sequences.
        assert len(bins) <= -(-sum(lengths) // capacity) + 2


def test_packing_rejects_a_document_longer_than_the_sequence():
    with pytest.raises(ValueError, match="capacity"):
        pack_best_fit_decreasing([10, 5000], 4096)


def _conversation(turn_lengths, assistant, images=()):
    """Fake EncodedConversation: turns of given lengths, loss on assistant turns, images at given slots."""
    tokens, mask, starts = [], [], []
    for length, is_assistant in zip(turn_lengths, assistant):
        starts.append(len(tokens))
        tokens += [1] * length
        mask += [int(is_assistant)] * length
    spans = [ImageSpan(i, slot, False) for i, slot in enumerate(images)]
    return EncodedConversation(tokens=tokens, loss_mask=mask, images=spans, turn_starts=starts)


def test_truncation_prefers_a_turn_boundary_that_keeps_half():
    conv = _conversation([20, 300, 20, 400], [False, True, False, True])
    roles = ["user", "assistant", "user", "assistant"]
    # Ends after the first answer, not after the following (unanswered) question.
    assert fit_to_length(conv, 512, 64, "truncate", roles) == (320, True)
    # Keeping less than half the sequence: cut the text at the limit instead.
    conv = _conversation([20, 100, 20, 800], [False, True, False, True])
    assert fit_to_length(conv, 512, 64, "truncate", roles) == (512, True)


def test_truncation_cuts_text_but_never_an_image_block():
    # user 10 tokens, assistant 600 tokens with an image block whose slots start at 490 (block 489..554).
    conv = _conversation([10, 600], [False, True], images=[490])
    end, truncated = fit_to_length(conv, 512, 64, "truncate")
    assert truncated and end == 489  # moved back to the block start
    assert fit_to_length(conv, 700, 64, "truncate") == (610, False)


def test_untruncatable_and_dropped():
    conv = _conversation([600, 5], [False, True])
    with pytest.raises(RecordError) as error:
        fit_to_length(conv, 512, 64, "truncate")
    assert error.value.reason == "overlong_untruncatable"
    with pytest.raises(RecordError) as error:
        fit_to_length(_conversation([10, 600], [False, True]), 512, 64, "drop")
    assert error.value.reason == "overlong_dropped"


def test_json_array_stream_across_tiny_chunks_and_multibyte_text(tmp_path, monkeypatch):
    records = [{"id": i, "text": "ünïcødé ✓ " * (i % 5), "nested": {"a": [1, 2, {"b": "]}"}]}} for i in range(50)]
    path = tmp_path / "records.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n", encoding="utf-8")
    monkeypatch.setattr(_JsonArrayStream, "_CHUNK", 7)  # element and UTF-8 boundaries fall inside chunks
    read = list(iter_json_array(path))
    assert [r.value for r in read] == records
    assert [r.line for r in read] == list(range(2, 52))
    # Planning gives byte offsets from which each shard's records are read back exactly.
    plan = plan_input(str(path), 0, 16, first_shard=0)
    assert plan.records == 50 and [t.count for t in plan.tasks] == [16, 16, 16, 2]
    again = [r.value for t in plan.tasks for r in iter_json_array(path, t.start_byte, t.start_line, t.count)]
    assert again == records


def test_jsonl_plan_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n   \n{"a": 3}\n{"a": 4}\n')
    plan = plan_input(str(path), 0, 3, first_shard=5)
    assert plan.records == 4 and [t.shard for t in plan.tasks] == [5, 6]
    second = list(iter_jsonl(path, plan.tasks[1].start_byte, plan.tasks[1].start_line, plan.tasks[1].count))
    assert [(r.line, r.value) for r in second] == [(6, {"a": 4})]


def test_pool_and_normalize_matches_bilinear_resize():
    from engine.vision_encoder import pool_and_normalize

    hidden = torch.randn(2, 27 * 27, 16, generator=torch.Generator().manual_seed(0))
    pooled = pool_and_normalize(hidden)
    assert pooled.shape == (2, 64, 16)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2, 64), atol=1e-5)
    grid = hidden.transpose(1, 2).reshape(2, 16, 27, 27)
    reference = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    reference = reference.reshape(2, 16, 64).transpose(1, 2)
    assert torch.allclose(pooled, reference / reference.norm(dim=-1, keepdim=True), atol=1e-6)
    # A constant feature map pools to itself (bilinear weights sum to one).
    constant = torch.ones(1, 12 * 12, 4)
    assert torch.allclose(pool_and_normalize(constant), torch.full((1, 64, 4), 0.5))


def test_tiny_random_encoder_is_seeded_and_keeps_the_real_width():
    from engine.vision_encoder import build_vision_encoder

    first = build_vision_encoder("tiny-random", device="cpu", decoder="pil")
    second = build_vision_encoder("tiny-random", device="cpu", decoder="pil")
    assert first.fingerprint() == second.fingerprint()
    assert first.hidden_size == 1152 and first.image_size // first.patch_size == 12
    pixels = torch.rand(2, 3, first.image_size, first.image_size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first.encode_pixels(pixels), second.encode_pixels(pixels))
    assert np.isfinite(first.encode_pixels(pixels).float().numpy()).all()


def test_local_siglip_directory_loads_without_download(tmp_path):
    from engine.vision_encoder import build_random_siglip, build_vision_encoder

    build_random_siglip("tiny-random").save_pretrained(tmp_path / "siglip")
    local = build_vision_encoder(str(tmp_path / "siglip"), device="cpu", decoder="pil")
    tiny = build_vision_encoder("tiny-random", device="cpu", decoder="pil")
    pixels = torch.rand(1, 3, 168, 168, generator=torch.Generator().manual_seed(2))
    assert torch.equal(local.encode_pixels(pixels), tiny.encode_pixels(pixels))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_vision_encoder("google/siglip-so400m-patch14-384", device="cpu")
