"""Every kind of bad input: named by file, line and reason, counted as a skip, fatal under --strict."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "preprocess"))
import preprocess_factory as factory  # noqa: E402

GOOD = {"id": "good", "image": "ok.jpg", "conversations": [
    {"from": "human", "value": "<image> what is this?"}, {"from": "gpt", "value": "a photo"}]}


def _qa(record_id: str, image, question="<image> what?", answer="that") -> dict:
    record = {"id": record_id, "conversations": [{"from": "human", "value": question},
                                                 {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


# (JSONL line content, expected reason); line numbers are 1-based positions in this list.
BAD_LINES = [
    (json.dumps(GOOD), None),
    ('{"id": "broken", "conversations": [', "malformed_json"),
    (json.dumps({"id": "nokey", "image": "ok.jpg"}), "missing_key"),
    (json.dumps({"id": "novalue", "conversations": [{"from": "human"}]}), "missing_key"),
    (json.dumps({"id": "role", "conversations": [{"from": "robot", "value": "beep"},
                                                 {"from": "gpt", "value": "boop"}]}), "unknown_role"),
    (json.dumps(_qa("count", ["ok.jpg", "ok.jpg"])), "image_count_mismatch"),
    (json.dumps(_qa("count2", None)), "image_count_mismatch"),
    (json.dumps(_qa("missing", "nope.jpg")), "image_missing"),
    (json.dumps(_qa("empty", "empty.jpg")), "image_empty"),
    (json.dumps(_qa("trunc", "truncated.jpg")), "image_truncated"),
    (json.dumps(_qa("notimg", "notes.jpg")), "image_not_decodable"),
    (json.dumps(_qa("escape", "../secret.jpg")), "path_outside_root"),
    (json.dumps(_qa("absolute", "/etc/passwd")), "path_outside_root"),
    (json.dumps(_qa("symlink", "link.jpg")), "path_outside_root"),
    (None, "non_utf8"),  # raw invalid UTF-8 bytes, written below
    (json.dumps(_qa("surrogate", None, question="bad \ud800 text")), "non_utf8"),
    (json.dumps({"id": "empty-conv", "conversations": []}), "empty_conversation"),
    (json.dumps(_qa("untruncatable", None, question="word " * 800, answer="ok")), "overlong_untruncatable"),
    ("[1, 2, 3]", "invalid_record"),
    (json.dumps(dict(GOOD, id="good2")), None),
]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    images = root / "images"
    images.mkdir()
    jpeg = factory.jpeg_bytes("camera")
    (images / "ok.jpg").write_bytes(jpeg)
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "notes.jpg").write_text("these are notes, not a JPEG")
    (root / "secret.jpg").write_bytes(jpeg)
    os.symlink(root / "secret.jpg", images / "link.jpg")
    path = root / "bad.jsonl"
    with open(path, "wb") as handle:
        for content, _ in BAD_LINES:
            if content is None:
                handle.write(b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}\n')
            else:
                handle.write(content.encode("utf-8") + b"\n")
    tokenizer = factory.make_tokenizer(root / "tokenizer", [GOOD])
    return root, path, tokenizer


@pytest.fixture(scope="module")
def bad_build(bad_data):
    root, path, tokenizer = bad_data
    out = root / "out"
    assert factory.run_cli(factory.build_args(path, out, tokenizer, root / "images", seq_length=256)) == 0
    return out


def test_each_bad_record_is_rejected_with_file_line_and_reason(bad_build, bad_data):
    _, path, _ = bad_data
    rejects = [json.loads(line) for line in (bad_build / "rejects.jsonl").read_text().splitlines()]
    expected = [(line, reason) for line, (_, reason) in enumerate(BAD_LINES, start=1) if reason]
    assert [(r["line"], r["reason"]) for r in rejects] == expected
    for reject in rejects:
        assert reject["file"] == str(path) and reject["message"]
    by_id = {r["id"]: r for r in rejects}
    assert "outside the root" in by_id["escape"]["message"]
    assert "2 <image>" not in by_id["count"]["message"] and "2 image(s)" in by_id["count"]["message"]


def test_skips_are_counted_and_the_good_records_written(bad_build):
    from preprocess.shards import ShardReader
    from preprocess.verify import verify_build

    manifest = json.loads((bad_build / "manifest.json").read_text())
    expected = {}
    for _, reason in BAD_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert manifest["skipped"] == expected
    assert manifest["counts"]["samples_read"] == len(BAD_LINES)
    assert manifest["counts"]["samples_written"] == 2
    assert manifest["counts"]["unique_images"] == 1  # both good records share ok.jpg
    assert verify_build(bad_build) == ([], [])
    assert len(ShardReader(bad_build, check_sha256=True)) == 1


def test_truncated_json_array_is_reported_at_its_line(bad_data, tmp_path):
    root, _, tokenizer = bad_data
    text = json.dumps([GOOD, dict(GOOD, id="good2"), dict(GOOD, id="cut")], indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) - 40])
    out = tmp_path / "out"
    assert factory.run_cli(factory.build_args(path, out, tokenizer, root / "images", seq_length=256)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples_written"] == 2
    assert manifest["skipped"] == {"malformed_json": 1}
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["file"] == str(path) and reject["line"] > 1


def test_non_utf8_inside_a_json_array_skips_only_that_record(bad_data, tmp_path):
    root, _, tokenizer = bad_data
    path = tmp_path / "latin.json"
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"[\n" + good + b",\n" + good.replace(b"a photo", b"caf\xe9") + b",\n" + good + b"\n]\n")
    out = tmp_path / "out"
    assert factory.run_cli(factory.build_args(path, out, tokenizer, root / "images", seq_length=256)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"non_utf8": 1} and manifest["counts"]["samples_written"] == 2
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 3


@pytest.mark.parametrize("line", [2, 8, 10, 12])
def test_strict_stops_at_the_first_bad_record(bad_data, tmp_path, capsys, line):
    root, path, tokenizer = bad_data
    lines = path.read_bytes().splitlines(keepends=True)
    subset = tmp_path / "subset.jsonl"
    subset.write_bytes(lines[0] + lines[line - 1])
    out = tmp_path / "out"
    args = factory.build_args(subset, out, tokenizer, root / "images", "--strict", seq_length=256)
    assert factory.run_cli(args) == 2
    err = capsys.readouterr().err
    assert f"{subset}:2: {BAD_LINES[line - 1][1]}" in err
    assert not (out / "manifest.json").exists()
    assert not list((out / "shards").glob("*.bin"))  # nothing half-written left under a final name


def test_configuration_errors_exit_2_with_a_message(bad_data, tmp_path, capsys):
    root, path, tokenizer = bad_data
    missing = factory.build_args(tmp_path / "none.jsonl", tmp_path / "o1", tokenizer, root / "images")
    assert factory.run_cli(missing) == 2
    assert "none.jsonl" in capsys.readouterr().err
    encoder = factory.build_args(path, tmp_path / "o2", tokenizer, root / "images")
    encoder[encoder.index("tiny-random")] = str(tmp_path / "no-such-siglip")
    assert factory.run_cli(encoder) == 2
    assert "no-such-siglip" in capsys.readouterr().err
