"""End-to-end build of every MetaMorph data family: round trip, embeddings, Megatron compatibility, verify."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "preprocess"))
import preprocess_factory as factory  # noqa: E402

from engine.config import TOKENS_PER_IMAGE, VISION_DIM  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    factory.write_images(root / "images")
    inputs = factory.write_jsonl(root / "families.jsonl", factory.FAMILY_RECORDS)
    tokenizer = factory.make_tokenizer(root / "tokenizer")
    return root, inputs, tokenizer


@pytest.fixture(scope="module")
def build(data):
    root, inputs, tokenizer = data
    out = root / "out"
    assert factory.run_cli(factory.build_args(inputs, out, tokenizer, root / "images")) == 0
    return out


def _llama3_text(record: dict) -> str:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    text = "<|begin_of_text|>"
    for turn in record["conversations"]:
        text += f"<|start_header_id|>{roles[turn['from']]}<|end_header_id|>\n\n{turn['value'].strip()}<|eot_id|>"
    return text


def _documents(out: Path) -> dict[str, dict]:
    lines = (out / "shards" / "shard-00000.documents.jsonl").read_text().splitlines()
    return {entry["id"]: entry for entry in map(json.loads, lines)}


def test_manifest_counts_and_keys(build):
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert set(manifest["counts"]) >= {"samples_read", "samples_written", "sequences", "documents", "images",
                                       "unique_images", "tokens"}
    counts = manifest["counts"]
    assert counts["samples_read"] == counts["samples_written"] == counts["documents"] == len(factory.FAMILY_RECORDS)
    images = sum(len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r)
                 for r in factory.FAMILY_RECORDS)
    assert counts["images"] == images
    # astronaut_copy.jpg has the same bytes as astronaut.jpg: embedded and stored once.
    assert counts["unique_images"] == images - 1 == manifest["embeddings"]["rows"]
    assert manifest["skipped"] == {}
    assert manifest["shards"][0]["tokens"] == "shards/shard-00000"
    assert manifest["tokenizer"]["fingerprint"] and manifest["vision_encoder"]["fingerprint"]
    assert manifest["vision_encoder"]["decoder"] == factory.decoder_name()
    assert 0 < manifest["packing_efficiency"] <= 1
    assert all(len(digest) == 64 for digest in manifest["sha256"].values())


def test_every_family_round_trips_to_its_text(build):
    from engine.tokenizer import load_saved_tokenizer
    from preprocess.inspection import document_texts
    from preprocess.shards import ShardReader

    reader = ShardReader(build, check_sha256=True)
    tokenizer = load_saved_tokenizer(build / "tokenizer")
    documents = _documents(build)
    seen = set()
    for record in factory.FAMILY_RECORDS:
        entry = documents[record["id"]]
        sequence = reader.sequence(0, entry["sequence"])
        text = document_texts(sequence, tokenizer, TOKENS_PER_IMAGE)[entry["document"]]
        assert text == _llama3_text(record)
        seen.add(record["id"])
    assert seen == {r["id"] for r in factory.FAMILY_RECORDS}


def test_packed_sequence_fields(build):
    from engine.tokenizer import load_saved_tokenizer
    from preprocess.shards import ShardReader

    reader = ShardReader(build)
    tokenizer = load_saved_tokenizer(build / "tokenizer")
    manifest = reader.manifest
    assert len(reader) == manifest["counts"]["sequences"]
    response_images = prompt_images = 0
    for k in range(len(reader)):
        seq = reader[k]
        assert seq.tokens.dtype == np.int32 and seq.tokens.shape == (512,)
        assert seq.loss_mask.shape == (512,) and seq.document_ids.shape == (512,)
        real = int(seq.document_bounds[-1])
        assert (seq.document_ids[:real] >= 0).all() and (seq.document_ids[real:] == -1).all()
        assert (seq.tokens[real:] == tokenizer.pad_id).all() and not seq.loss_mask[real:].any()
        positions = seq.position_ids()
        for d, (start, end) in enumerate(zip(seq.document_bounds[:-1], seq.document_bounds[1:])):
            assert (seq.document_ids[start:end] == d).all()
            assert positions[start] == 0 and positions[end - 1] == end - start - 1
            assert seq.tokens[start] == tokenizer.special_token_id("<|begin_of_text|>")
        for slot, is_response in zip(seq.image_slot_starts, seq.image_is_response):
            assert seq.tokens[slot - 1] == tokenizer.image_start_id
            assert seq.tokens[slot + TOKENS_PER_IMAGE] == tokenizer.image_end_id
            # Loss on response images (block included), none on prompt images.
            assert (seq.loss_mask[slot - 1:slot + TOKENS_PER_IMAGE + 1] == int(is_response)).all()
            response_images += int(is_response)
            prompt_images += int(not is_response)
    # t2i, thinking and edit each have one response image; the rest are prompts.
    assert response_images == 3 and prompt_images == manifest["counts"]["images"] - 3


def test_loss_mask_covers_assistant_text_only(build):
    from engine.tokenizer import load_saved_tokenizer
    from preprocess.shards import ShardReader

    reader = ShardReader(build)
    tokenizer = load_saved_tokenizer(build / "tokenizer")
    entry = _documents(build)["text-1"]
    seq = reader.sequence(0, entry["sequence"])
    start, length = entry["offset"], entry["length"]
    tokens, mask = seq.tokens[start:start + length], seq.loss_mask[start:start + length]
    target_text = tokenizer.decode(tokens[mask == 1].tolist())
    assert "Grey waves fold on sand" in target_text and "the café is closed." in target_text
    assert "haiku" not in target_text and "mountains" not in target_text


def test_embeddings_equal_direct_encoder_call(build, data):
    from engine.vision_encoder import build_vision_encoder
    from preprocess.shards import ShardReader

    root, _, _ = data
    reader = ShardReader(build)
    index = np.load(build / "embeddings" / "index.npy")
    by_hash = {}
    for path in (root / "images").rglob("*"):
        if path.is_file():
            by_hash[hashlib.sha256(path.read_bytes()).digest()] = path.read_bytes()
    blobs = [by_hash[digest] for digest in index["sha256"].tolist()]
    encoder = build_vision_encoder("tiny-random", device="cpu", decoder=factory.decoder())
    direct = encoder.encode_images(blobs, batch_size=32)  # the build's batch composition: one shard, batch 32
    stored = reader.embeddings(np.arange(len(blobs)))
    assert stored.dtype == torch.bfloat16 and stored.shape == (len(blobs), TOKENS_PER_IMAGE, VISION_DIM)
    assert torch.equal(stored, direct)
    norms = stored.float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
    # Each image slot points at the row of its own file (checked image by image, batch of one).
    entry = _documents(build)["edit-1"]
    seq = reader.sequence(0, entry["sequence"])
    rows = [r for s, r in zip(seq.image_slot_starts, seq.image_rows)
            if entry["offset"] <= s < entry["offset"] + entry["length"]]
    for row, name in zip(rows, ["photos/rocket.jpg", "photos/rocket_gray.png"]):
        single = encoder.encode_images([(root / "images" / name).read_bytes()], batch_size=1)[0]
        assert torch.allclose(reader.embeddings([row])[0].float(), single.float(), atol=2e-2)
        assert index["sha256"][row] == hashlib.sha256((root / "images" / name).read_bytes()).digest()


def test_megatron_indexed_dataset_opens_every_stream(build):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    manifest = json.loads((build / "manifest.json").read_text())
    shard = manifest["shards"][0]
    tokens = IndexedDataset(str(build / shard["tokens"]))
    assert len(tokens) == manifest["counts"]["sequences"]
    assert (tokens.sequence_lengths == manifest["seq_length"]).all()
    assert tokens[0].dtype == np.int32
    for key in ("loss_mask", "doc_bounds", "images"):
        assert len(IndexedDataset(str(build / shard[key]))) == len(tokens)


def test_verify_ok_and_detects_a_flipped_byte_in_every_file(build, tmp_path, capsys):
    import shutil

    from preprocess.verify import verify_build

    assert factory.run_cli(["verify", str(build)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    files = sorted(p for p in copy.rglob("*") if p.is_file())
    assert len(files) >= 15
    for path in files:
        original = path.read_bytes()
        if not original:
            continue  # rejects.jsonl is empty here: nothing to flip (its size is still checked)
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        faults, _ = verify_build(copy)
        relative = str(path.relative_to(copy))
        assert faults and any(relative in fault for fault in faults), (relative, faults)
        path.write_bytes(original)
    assert verify_build(copy) == ([], [])
    # And through the CLI: non-zero exit status, the file named on stderr.
    target = copy / "embeddings" / "emb-00000.bin"
    data = bytearray(target.read_bytes())
    data[123] ^= 0x80
    target.write_bytes(bytes(data))
    capsys.readouterr()
    assert factory.run_cli(["verify", str(copy)]) == 1
    assert "embeddings/emb-00000.bin" in capsys.readouterr().err


def test_reader_refuses_a_corrupt_build(build, tmp_path):
    import shutil

    from preprocess.manifest import ManifestError, load_manifest

    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    path = copy / "shards" / "shard-00000.bin"
    data = bytearray(path.read_bytes())
    data[7] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="shards/shard-00000.bin"):
        load_manifest(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format_version"):
        load_manifest(copy, check_sha256=False)


def test_inspect_prints_stats_and_decodes_a_sequence(build, capsys):
    assert factory.run_cli(["inspect", str(build), "--sequence", "0"]) == 0
    text = capsys.readouterr().out
    assert "packing efficiency" in text and "unique_images" in text
    assert "=== document 0" in text and "<image>" in text and "embedding row" in text


def test_json_array_input_gives_the_same_shards(data, build, tmp_path):
    root, _, tokenizer = data
    array = factory.write_json_array(tmp_path / "families.json", factory.FAMILY_RECORDS)
    out = tmp_path / "out"
    assert factory.run_cli(factory.build_args(array, out, tokenizer, root / "images")) == 0
    for name in ("shard-00000.bin", "shard-00000.loss_mask.bin", "shard-00000.images.bin",
                 "shard-00000.doc_bounds.bin"):
        assert (out / "shards" / name).read_bytes() == (build / "shards" / name).read_bytes()
    assert (out / "embeddings/emb-00000.bin").read_bytes() == (build / "embeddings/emb-00000.bin").read_bytes()


def test_webdataset_tar_images(data, build, tmp_path):
    """Images read from a tar shard (`x.tar::member`) give the same embeddings as the files."""
    root, _, tokenizer = data
    tar_dir = tmp_path / "wds"
    tar_dir.mkdir()
    with tarfile.open(tar_dir / "images-000.tar", "w") as tar:
        for path in sorted((root / "images").rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(root / "images")).replace("/", "__"))
    records = json.loads(json.dumps(factory.FAMILY_RECORDS))
    for record in records:
        if "image" in record:
            paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
            paths = [f"images-000.tar::{p.replace('/', '__')}" for p in paths]
            record["image"] = paths if isinstance(record["image"], list) else paths[0]
    inputs = factory.write_jsonl(tmp_path / "wds.jsonl", records)
    out = tmp_path / "out"
    assert factory.run_cli(factory.build_args(inputs, out, tokenizer, tar_dir)) == 0
    assert (out / "embeddings/emb-00000.bin").read_bytes() == (build / "embeddings/emb-00000.bin").read_bytes()
    assert (out / "shards/shard-00000.bin").read_bytes() == (build / "shards/shard-00000.bin").read_bytes()


def test_embeddings_dir_instead_of_pixels(data, tmp_path):
    from safetensors.torch import save_file

    from engine.vision_encoder import pool_and_normalize
    from preprocess.shards import ShardReader

    root, _, tokenizer = data
    emb_dir = tmp_path / "emb"
    generator = torch.Generator().manual_seed(0)
    patch = torch.randn(729, VISION_DIM, generator=generator)
    pooled = torch.nn.functional.normalize(torch.randn(TOKENS_PER_IMAGE, VISION_DIM, generator=generator), dim=-1)
    (emb_dir / "a").mkdir(parents=True)
    np.save(emb_dir / "a" / "x.jpg.npy", patch.numpy())
    save_file({"embedding": pooled}, str(emb_dir / "a" / "y.safetensors"))
    np.save(emb_dir / "a" / "bad.npy", np.zeros((10, 10), dtype=np.float32))
    records = [
        {"id": "p", "image": "a/x.jpg", "conversations": [{"from": "human", "value": "<image> what?"},
                                                           {"from": "gpt", "value": "a thing"}]},
        {"id": "q", "image": "a/y.jpg", "conversations": [{"from": "human", "value": "make one"},
                                                           {"from": "gpt", "value": "<image>"}]},
        {"id": "r", "image": "a/bad.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                                             {"from": "gpt", "value": "no"}]},
    ]
    inputs = factory.write_jsonl(tmp_path / "emb.jsonl", records)
    out = tmp_path / "out"
    args = factory.build_args(inputs, out, tokenizer, None, "--embeddings-dir", str(emb_dir))
    assert factory.run_cli(args) == 0
    reader = ShardReader(out)
    stored = reader.embeddings([0, 1])
    assert torch.equal(stored[0], pool_and_normalize(patch[None])[0].to(torch.bfloat16))
    assert torch.allclose(stored[1].float(), pooled, atol=4e-3)
    assert reader.manifest["skipped"] == {"embedding_bad": 1}
    assert reader.manifest["vision_encoder"]["name"] == "precomputed"


def test_truncation_keeps_whole_image_blocks_and_is_counted(data, tmp_path):
    from preprocess.shards import ShardReader

    root, _, tokenizer = data
    long_answer = " ".join(["the tide keeps its time"] * 120)
    records = [
        {"id": "long", "image": ["photos/coffee.jpg", "photos/rocket.jpg"], "conversations": [
            {"from": "human", "value": "<image> describe"},
            {"from": "gpt", "value": long_answer + " <image> " + long_answer}]},
        {"id": "short", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    inputs = factory.write_jsonl(tmp_path / "long.jsonl", records)
    out = tmp_path / "out"
    assert factory.run_cli(factory.build_args(inputs, out, tokenizer, root / "images", seq_length=256)) == 0
    reader = ShardReader(out)
    assert reader.manifest["truncated"] == 1 and reader.manifest["counts"]["samples_written"] == 2
    assert reader.manifest["counts"]["images"] == 1  # the response image fell beyond the cut
    for k in range(len(reader)):
        seq = reader[k]
        for slot in seq.image_slot_starts:
            assert seq.tokens[slot + TOKENS_PER_IMAGE] == reader.manifest["tokenizer"]["image_end_id"]
    out_drop = tmp_path / "drop"
    args = factory.build_args(inputs, out_drop, tokenizer, root / "images", "--overlong", "drop", seq_length=256)
    assert factory.run_cli(args) == 0
    manifest = json.loads((out_drop / "manifest.json").read_text())
    assert manifest["skipped"] == {"overlong_dropped": 1} and manifest["counts"]["samples_written"] == 1


def test_bundled_sample_dataset_builds(tmp_path):
    """The README demo: examples/data/sample with the bundled tokenizer; every family, a tar, bad records."""
    repo = Path(__file__).resolve().parents[1]
    sample = repo / "examples" / "data" / "sample"
    files = [p for p in (sample / "images").rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 30_000 for p in files) and sum(p.stat().st_size for p in files) < 400_000
    out = tmp_path / "demo"
    args = ["build", "--input", str(sample / "samples.jsonl"), "--input", str(sample / "bad_samples.jsonl"),
            "--image-root", str(sample / "images"), "--tokenizer-type", "tiktoken",
            "--tokenizer-model", str(repo / "examples" / "data" / "tokenizer" / "tokenizer.model"),
            "--vision-encoder", "tiny-random", "--image-decoder", factory.decoder(), "--seq-length", "1024",
            "--output", str(out), "--no-progress"]
    assert factory.run_cli(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    ids = {json.loads(line)["id"] for line in (out / "shards/shard-00000.documents.jsonl").read_text().splitlines()}
    assert {"vqa-0", "vqa-wds-1", "video-0", "t2i-0", "thinking-0", "edit-0", "text-0"} <= ids
    assert manifest["skipped"] == {"image_count_mismatch": 1, "malformed_json": 1, "path_outside_root": 1}
    assert manifest["counts"]["images"] == manifest["counts"]["unique_images"] + 1  # vqa-dup reuses a photo
    assert factory.run_cli(["verify", str(out)]) == 0
