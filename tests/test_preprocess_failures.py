"""Faults and hostile input around a build (issue 15): resume only on our own builds, a lock against two builds,
no mixing of encoders, a dead worker, one-line errors, finite embeddings, a UTF-8 BOM, empty inputs, image
bombs, and a readable summary."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "preprocess"))
import preprocess_factory as factory  # noqa: E402

from preprocess.build import (  # noqa: E402
    CRASH_DURING_SHARD_ENV,
    KILL_MAIN_AT_SHARD_ENV,
    KILL_WORKER_AT_SHARD_ENV,
)

REPO = Path(__file__).resolve().parents[1]
QA = {"id": "q", "image": "photos/coffee.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cup of coffee."}]}
TEXT = {"id": "t", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi there."}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    factory.write_images(root / "images")
    inputs = factory.write_jsonl(root / "families.jsonl", factory.FAMILY_RECORDS)
    tokenizer = factory.make_tokenizer(root / "tokenizer")
    return root, inputs, tokenizer


def _args(data, out, *extra, inputs=None):
    root, default_inputs, tokenizer = data
    return factory.build_args(inputs or default_inputs, out, tokenizer, root / "images", *extra)


def _run(args, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env_extra or {}))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "preprocess", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr  # one line, no traceback
    return lines[0]


@pytest.fixture(scope="module")
def reference(data):
    """The family records in 3-record shards (3 shards), built without interruption."""
    out = data[0] / "reference"
    assert factory.run_cli(_args(data, out, "--samples-per-shard", "3")) == 0
    return out


@pytest.fixture(scope="module")
def text(data):
    """Text-only records in 3 shards, and their uninterrupted build. Builds of text never import torch, so the
    interrupted builds below run as subprocesses in a fraction of a second (the encoder is still described and
    fingerprinted: from its files)."""
    records = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                                 {"from": "gpt", "value": "Answer " + "word " * i}]}
               for i in range(9)]
    inputs = factory.write_jsonl(data[0] / "text.jsonl", records)
    out = data[0] / "text-reference"
    assert factory.run_cli(_args(data, out, "--samples-per-shard", "3", inputs=inputs)) == 0
    return inputs, out


def _text_args(data, text, out, *extra):
    return _args(data, out, "--samples-per-shard", "3", *extra, inputs=text[0])


# -- 5. --resume acts only on our builds; a lock against two builds ---------------------------------------
def test_resume_refuses_a_folder_that_was_never_a_build_and_touches_nothing(data, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "parts").mkdir(parents=True)
    (out / "notes.tmp").write_text("my notes")
    (out / "parts" / "draft.tmp").write_text("my draft")
    (out / "build.json").write_text('{"my": "own build.json"}')
    (out / "shards").mkdir()
    (out / "shards" / "x.bin.tmp").write_bytes(b"\x00" * 10)
    before = factory.tree_bytes(out)
    capsys.readouterr()
    assert factory.run_cli(_args(data, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "holds no build of ours" in err and "nothing was changed" in err
    assert factory.tree_bytes(out) == before
    # Without --resume the refusal does not recommend --resume for a folder that is not ours.
    assert factory.run_cli(_args(data, out)) == 2
    assert "--resume" not in capsys.readouterr().err.replace("--resume only", "")
    assert factory.tree_bytes(out) == before


def test_resume_on_an_empty_folder_starts_a_new_build(data, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert factory.run_cli(_args(data, out, "--resume", inputs=factory.write_jsonl(tmp_path / "t.jsonl", [TEXT]))) == 0
    assert "nothing to resume" in capsys.readouterr().err
    assert (out / "manifest.json").is_file()


def test_a_locked_output_folder_is_refused(data, text, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running build holds
        capsys.readouterr()
        assert factory.run_cli(_text_args(data, text, out)) == 2
        assert "another build is running" in capsys.readouterr().err
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    assert factory.run_cli(_text_args(data, text, out)) == 0


def test_two_builds_on_one_folder_at_once(data, text, tmp_path):
    out = tmp_path / "race"
    out.mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "preprocess", *_text_args(data, text, out)]
    first = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    results = sorted((process.wait(timeout=240), process.stderr.read()) for process in (first, second))
    assert [code for code, _ in results] == [0, 2], results
    loser = _error_line(results[1][1])
    assert "another build is running" in loser or "already holds a finished build" in loser
    assert factory.tree_bytes(out) == factory.tree_bytes(text[1])


# -- 6. a resumed build never mixes encoders or decoders ----------------------------------------------------
@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=56, patch_size=14, vision_use_head=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip") / "siglip"
    SiglipVisionModel(config).save_pretrained(path, safe_serialization=True)
    return path


def test_resume_with_changed_encoder_weights_is_refused(data, text, siglip_dir, tmp_path):
    encoder = tmp_path / "siglip"
    shutil.copytree(siglip_dir, encoder)
    out = tmp_path / "out"
    args = _text_args(data, text, out)
    args[args.index("tiny-random")] = str(encoder)
    crashed = _run(args, {CRASH_DURING_SHARD_ENV: "1"})
    assert crashed.returncode == 17, crashed.stderr
    weights = encoder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01
    weights.write_bytes(bytes(blob))
    before = factory.tree_bytes(out)
    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 2
    line = _error_line(resumed.stderr)
    assert "image encoder differs" in line and "weights differ" in line
    assert factory.tree_bytes(out) == before  # the finished part is kept, nothing was redone


def test_resume_after_dali_became_importable_is_refused(data, text, tmp_path):
    from engine.data.image_decode import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed: pip install -e .[dali] (CI installs it)")
    hide = tmp_path / "hide-dali"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['nvidia.dali'] = None  # DALI not installed\n")
    out = tmp_path / "out"
    args = _text_args(data, text, out)
    args[args.index("--image-decoder") + 1] = "auto"
    crashed = _run(args, {CRASH_DURING_SHARD_ENV: "1", "PYTHONPATH": f"{hide}{os.pathsep}{REPO}"})
    assert crashed.returncode == 17, crashed.stderr
    assert json.loads((out / "build.json").read_text())["vision_encoder"]["decoder"] == "pil"
    resumed = _run([*args, "--resume"])  # DALI importable now: auto would pick it
    assert resumed.returncode == 2
    assert "decoder 'pil' -> 'dali-cpu'" in _error_line(resumed.stderr)


def test_every_part_records_its_encoder_and_a_foreign_part_is_refused(data, text, tmp_path):
    out = tmp_path / "out"
    args = _text_args(data, text, out)
    crashed = _run(args, {CRASH_DURING_SHARD_ENV: "1"})
    assert crashed.returncode == 17, crashed.stderr
    part_path = out / "parts" / "shard-00000.json"
    part = json.loads(part_path.read_text())
    state = json.loads((out / "build.json").read_text())
    assert part["vision_encoder"] == state["vision_encoder"]["fingerprint"]
    part["vision_encoder"] = "0" * 64  # a part made by another encoder
    part_path.write_text(json.dumps(part, sort_keys=True))
    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 2
    assert "parts/shard-00000.json" in _error_line(resumed.stderr)


# -- 8. a killed worker ends the build with a message; the folder resumes --------------------------------
def test_a_killed_worker_stops_the_build_which_then_resumes(data, text, tmp_path):
    out = tmp_path / "out"
    args = _text_args(data, text, out, "--workers", "2")
    killed = _run(args, {KILL_WORKER_AT_SHARD_ENV: "1"}, timeout=180)  # the old pool waited here forever
    assert killed.returncode == 3, killed.stderr
    line = _error_line(killed.stderr)
    assert "worker process died" in line and "--resume" in line
    assert not (out / "manifest.json").exists()
    assert factory.run_cli([*args, "--resume"]) == 0
    assert factory.tree_bytes(out) == factory.tree_bytes(text[1])


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (Linux /proc)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_workers_exit_with_a_killed_build_which_then_resumes(data, text, tmp_path):
    """SIGKILL of the build (not of a worker) mid-shard: its workers used to live on, finish their shard into OUT
    after the lock was gone and rename their temporary files over those of the --resume that followed."""
    out = tmp_path / "out"
    args = _text_args(data, text, out, "--workers", "2")
    marker = f"CHRYSALIS_TEST_BUILD_MARKER={os.getpid()}-{tmp_path.name}"
    env = dict(os.environ, PYTHONWARNINGS="ignore", **{KILL_MAIN_AT_SHARD_ENV: "1"})
    env["CHRYSALIS_TEST_BUILD_MARKER"] = marker.split("=", 1)[1]
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(tmp_path / "log", "wb") as log:  # not a pipe: an orphaned worker would hold it open
        build = subprocess.Popen([sys.executable, "-m", "preprocess", *args], cwd=REPO, env=env, stdout=log,
                                 stderr=log)
        assert build.wait(timeout=180) == -9
    survivors = _processes_with(marker)
    for _ in range(50):
        if not survivors:
            break
        time.sleep(0.1)
        survivors = _processes_with(marker)
    for pid in survivors:  # do not leak them into the rest of the session
        os.kill(pid, 9)
    assert not survivors, f"{len(survivors)} worker process(es) outlived the killed build"
    assert not (out / "manifest.json").exists()
    assert factory.run_cli([*args, "--resume"]) == 0
    assert factory.tree_bytes(out) == factory.tree_bytes(text[1])


# -- 9. one-line errors -------------------------------------------------------------------------------------
def test_nul_byte_in_an_image_path_is_a_counted_reject(data, tmp_path):
    bad = dict(QA, id="nul", image="photos/coffee\u0000.jpg")
    inputs = factory.write_jsonl(tmp_path / "nul.jsonl", [QA, bad, dict(QA, id="q2")])
    out = tmp_path / "out"
    assert factory.run_cli(_args(data, out, inputs=inputs)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"invalid_record": 1} and manifest["counts"]["samples_written"] == 2
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 2 and "NUL" in reject["message"]


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory nobody can write to: chmod for a normal user, a read-only bind mount for root."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"running as root and cannot make a read-only mount: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_read_only_output_folder_is_one_line(data, read_only_dir, capsys):
    capsys.readouterr()
    assert factory.run_cli(_args(data, read_only_dir)) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(read_only_dir) in line and "cannot write" in line


def test_tokenizer_tmp_folder_left_by_a_kill_is_cleaned_on_resume(data, text, tmp_path):
    out = tmp_path / "out"
    args = _text_args(data, text, out)
    crashed = _run(args, {CRASH_DURING_SHARD_ENV: "0"})
    assert crashed.returncode == 17, crashed.stderr
    # A kill while the tokenizer was being saved leaves its temp folder (and no tokenizer/).
    shutil.move(out / "tokenizer", out / "tokenizer.tmp")
    (out / "tokenizer.tmp" / "half.tmp").write_bytes(b"torn")
    assert factory.run_cli([*args, "--resume"]) == 0
    assert not (out / "tokenizer.tmp").exists()
    assert factory.tree_bytes(out) == factory.tree_bytes(text[1])


@pytest.mark.parametrize("part", ["[]", "deep"])
def test_a_corrupt_part_record_is_redone_on_resume(data, text, tmp_path, part):
    """A finished shard's parts/shard-N.json that is a JSON list, or nested too deeply for json, ended --resume
    in a traceback (AttributeError, RecursionError); it is not a finished shard, so it is redone."""
    out = tmp_path / "out"
    args = _text_args(data, text, out)
    crashed = _run(args, {CRASH_DURING_SHARD_ENV: "1"})
    assert crashed.returncode == 17, crashed.stderr
    (out / "parts" / "shard-00000.json").write_text("[]" if part == "[]" else "[" * 100_000 + "]" * 100_000)
    assert factory.run_cli([*args, "--resume"]) == 0
    assert factory.tree_bytes(out) == factory.tree_bytes(text[1])


def test_inspect_of_a_corrupt_idx_is_one_line_naming_the_file(reference, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    index = copy / "shards" / "shard-00001.idx"
    blob = bytearray(index.read_bytes())
    blob[2] ^= 0xFF  # the header's magic: same size, so only parsing the index can tell
    index.write_bytes(bytes(blob))
    capsys.readouterr()
    assert factory.run_cli(["inspect", str(copy)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "shards/shard-00001.idx" in line and "corrupt index" in line


def test_a_manifest_nested_too_deeply_is_one_line(text, tmp_path, capsys):
    """json.loads raises RecursionError (not JSONDecodeError) on deep nesting: inspect and verify ended in a
    traceback; training's ShardReader reads the manifest the same way."""
    from engine.data.shards import ShardReader

    copy = tmp_path / "copy"
    shutil.copytree(text[1], copy)
    (copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    assert factory.run_cli(["inspect", str(copy)]) == 2
    assert _error_line(capsys.readouterr().err) == "error: manifest.json: corrupt, not usable JSON (nested too deeply)"
    assert factory.run_cli(["verify", str(copy)]) == 1
    assert "FAULT: manifest.json: corrupt, not usable JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nested too deeply"):
        ShardReader(copy)


def test_inspect_of_a_missing_path_says_no_such_directory(tmp_path, capsys):
    assert factory.run_cli(["inspect", str(tmp_path / "nope")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "no such directory" in line and "manifest.json" not in line


# -- 10. smaller ------------------------------------------------------------------------------------------
def test_verify_finds_non_finite_embeddings(reference, tmp_path, capsys):
    from engine.data.manifest import serialize_manifest, sha256_file

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    segment = copy / "embeddings" / "emb-00000.bin"
    rows = np.fromfile(segment, dtype="<u2").reshape(-1, 64 * 1152)
    rows[1, 5] = 0x7FC0  # bf16 NaN
    rows.tofile(segment)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sha256"]["embeddings/emb-00000.bin"] = sha256_file(segment)  # re-signed: checksums pass
    (copy / "manifest.json").write_bytes(serialize_manifest(manifest))
    capsys.readouterr()
    assert factory.run_cli(["verify", str(copy)]) == 1
    assert "embeddings/emb-00000.bin: row 1 holds NaN or Inf" in capsys.readouterr().err


def test_utf8_bom_at_the_start_of_an_input(data, tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in (TEXT, QA)).encode() + b"\n")
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([TEXT, QA]).encode())
    for path in (jsonl, array):
        out = tmp_path / f"out-{path.suffix[1:]}"
        assert factory.run_cli(_args(data, out, "--samples-per-shard", "1", inputs=path)) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["skipped"] == {} and manifest["counts"]["samples_written"] == 2, path


def test_json_the_decoder_refuses_is_a_counted_reject(data, tmp_path):
    """Valid JSON that json.loads refuses with RecursionError (deep nesting) or ValueError (an integer of 5,000
    digits), and a role that is a list (unhashable: TypeError), killed the whole build with a traceback."""
    deep = '{"id": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge = '{"id": "int", "n": ' + "7" * 5000 + "}"
    role = json.dumps({"id": "role", "conversations": [{"from": ["human"], "value": "x"}, {"from": "gpt", "value": "y"}]})
    jsonl = factory.write_jsonl(tmp_path / "odd.jsonl", [TEXT, deep, huge, role, TEXT])
    out = tmp_path / "out"
    assert factory.run_cli(_args(data, out, inputs=jsonl)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"malformed_json": 2, "unknown_role": 1}
    assert manifest["counts"]["samples_written"] == 2
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["message"]) for r in rejects][:2] == [
        (2, "unreadable JSON: nested too deeply"),
        (3, "unreadable JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits")]
    # In a JSON array the element cannot be skipped: it ends the file like a syntax error, named by line.
    array = factory.write_json_array(tmp_path / "odd.json", [TEXT])
    array.write_text(array.read_text().rstrip()[:-1] + ", " + deep + "]")
    out = tmp_path / "out-array"
    assert factory.run_cli(_args(data, out, inputs=array)) == 0
    assert json.loads((out / "manifest.json").read_text())["skipped"] == {"malformed_json": 1}


def test_a_full_disk_names_the_file_and_the_build_resumes(data, text, tmp_path):
    """A write that fails (a full disk: here RLIMIT_FSIZE, EFBIG) raises an OSError without a file name: the one
    line said only "error: File too large". It names the file, and --resume finishes byte-identical."""
    import resource
    import signal

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))

    out = tmp_path / "out"
    args = _text_args(data, text, out, "--seq-length", "4096")
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "preprocess", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240, check=False, preexec_fn=small_files)
    assert done.returncode == 2, done.stderr
    assert _error_line(done.stderr).startswith(f"error: {out}/shards/shard-00000.bin.tmp: File too large"), done.stderr
    assert _run([*args, "--resume"]).returncode == 0
    reference = tmp_path / "reference"
    assert _run(_text_args(data, text, reference, "--seq-length", "4096")).returncode == 0
    assert factory.tree_bytes(out) == factory.tree_bytes(reference)


def test_empty_input_warns(data, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    capsys.readouterr()
    assert factory.run_cli(_args(data, tmp_path / "out", inputs=empty)) == 0
    err = capsys.readouterr().err
    assert f"warning: --input {empty} holds no records" in err and "the build will be empty" in err


def test_decoded_pixels_are_capped(data, tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (3000, 2000), (10, 120, 200)).save(root / "big.png")  # 6 M pixels, a 20 KB file
    shutil.copy(data[0] / "images" / "photos" / "coffee.jpg", root / "small.jpg")
    records = [dict(QA, id="big", image="big.png"), dict(QA, id="small", image="small.jpg")]
    inputs = factory.write_jsonl(tmp_path / "big.jsonl", records)
    out = tmp_path / "out"
    args = factory.build_args(inputs, out, data[2], root, "--max-image-pixels", "1000000")
    assert factory.run_cli(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"image_too_large": 1} and manifest["counts"]["samples_written"] == 1
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["id"] == "big" and "3000x2000" in reject["message"]


def test_image_files_over_the_byte_cap_are_rejected_before_reading(data, tmp_path, capsys):
    """--max-image-bytes: a file (or tar member) over the cap is rejected by its size, before it is read; the pixel
    cap alone read every file whole first (a mislabelled video under --image-root went into memory)."""
    import tarfile

    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), (10, 120, 200)).save(root / "small.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "big.jpg", quality=95)  # about 10 KB: noise does not compress
    big = (root / "big.jpg").stat().st_size
    assert big > 5000 > (root / "small.png").stat().st_size
    with tarfile.open(root / "pack.tar", "w") as tar:
        tar.add(root / "big.jpg", arcname="big.jpg")
        tar.add(root / "small.png", arcname="small.png")
    records = [dict(QA, id=name, image=image) for name, image in
               (("file-big", "big.jpg"), ("file-small", "small.png"),
                ("tar-big", "pack.tar::big.jpg"), ("tar-small", "pack.tar::small.png"))]
    inputs = factory.write_jsonl(tmp_path / "sizes.jsonl", records)
    out = tmp_path / "out"
    assert factory.run_cli(factory.build_args(inputs, out, data[2], root, "--max-image-bytes", "5000")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"image_too_large": 2} and manifest["counts"]["samples_written"] == 2
    assert manifest["settings"]["max_image_bytes"] == 5000
    rejects = {r["id"]: r["message"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects == {"file-big": f"image file big.jpg is {big:,} bytes, over --max-image-bytes 5,000 (nothing "
                                   "of it was read)",
                       "tar-big": f"image file pack.tar::big.jpg is {big:,} bytes, over --max-image-bytes 5,000 "
                                  "(nothing of it was read)"}
    capsys.readouterr()
    assert factory.run_cli(factory.build_args(inputs, tmp_path / "bad", data[2], root, "--max-image-bytes", "0")) == 2
    assert "--max-image-bytes must be >= 1" in capsys.readouterr().err


def test_rejects_are_reproducible_without_object_addresses(data, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "notes.jpg").write_text("not an image")
    (root / "cut.jpg").write_bytes(factory.jpeg_bytes("camera")[:300])
    shutil.copy(data[0] / "images" / "photos" / "coffee.jpg", root / "ok.jpg")
    records = [dict(QA, id=name, image=f"{name}.jpg") for name in ("notes", "cut", "ok")]
    inputs = factory.write_jsonl(tmp_path / "bad.jsonl", records)
    rejects = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        assert factory.run_cli(factory.build_args(inputs, out, data[2], root)) == 0
        rejects.append((out / "rejects.jsonl").read_text())
    assert rejects[0] == rejects[1] and "0x" not in rejects[0]
    assert [json.loads(line)["reason"] for line in rejects[0].splitlines()] == ["image_not_decodable",
                                                                                "image_truncated"]


def test_summary_prints_meaningful_figures(data, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "out"
    assert factory.run_cli(_args(data, out)) == 0
    err = capsys.readouterr().err
    assert "skipped {}" not in err and "(0 samples/s)" not in err
    assert f"built {out}: " in err and "7 of 7 records, none skipped" in err
    assert "records/s" in err and "images/s" in err and "packing efficiency" in err


def test_a_16_bit_png_is_scaled_not_clipped():
    """A 16-bit grayscale PNG opens in PIL as "I;16"; convert("RGB") clipped every value above 255, so a gradient
    came out 99.6 % white (mean 0.998) while DALI scales it (mean 0.5): the embedding depended on the decoder."""
    import io

    from PIL import Image

    from engine.data.image_decode import decode_image_pil

    gradient = np.linspace(0, 65535, 40 * 32).reshape(32, 40).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    pixels = decode_image_pil(buffer.getvalue(), 28)
    expected = np.asarray(Image.fromarray((gradient / 257).round().astype(np.uint8)).convert("RGB").resize(
        (28, 28), Image.Resampling.BICUBIC), dtype=np.float32).transpose(2, 0, 1) / 255
    assert abs(float(pixels.mean()) - 0.5) < 0.01
    assert np.abs(pixels.numpy() - expected).max() < 1e-6


@pytest.mark.parametrize("case", ["zeros", "complex"])
def test_precomputed_embeddings_that_cannot_be_targets_are_rejected(case):
    """An all-zero embedding has no direction (L2-normalising leaves it zero, a cosine target of nothing); a complex
    one lost its imaginary part in .float() with only a torch warning. Both were stored as if fine."""
    import io

    from preprocess.images import decode_embedding
    from preprocess.records import RecordError

    array = np.zeros((64, 1152), np.float32) if case == "zeros" else np.ones((64, 1152), np.complex64)
    buffer = io.BytesIO()
    np.save(buffer, array)
    with pytest.raises(RecordError, match="zero norm" if case == "zeros" else "dtype complex64") as caught:
        decode_embedding(b"NPY\0" + buffer.getvalue())
    assert caught.value.reason == "embedding_bad"
    good = io.BytesIO()
    np.save(good, np.random.default_rng(0).random((64, 1152), dtype=np.float32))
    assert decode_embedding(b"NPY\0" + good.getvalue()).norm(dim=-1).sub(1).abs().max() < 1e-5


def test_a_pickle_payload_in_encoder_weights_is_one_line_and_never_runs(data, tmp_path, capsys, recwarn):
    """A SigLIP folder whose pytorch_model.bin is a pickle payload: transformers' torch.load(weights_only=True)
    refuses it (nothing runs), but the UnpicklingError ended the build in a traceback, and torch's "Detected pickle
    protocol 4" UserWarning was printed above the one-line error."""
    import pickle

    from transformers import SiglipVisionConfig

    encoder, marker = tmp_path / "siglip", tmp_path / "PAYLOAD_RAN"
    SiglipVisionConfig(hidden_size=1152, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       image_size=28, patch_size=14).save_pretrained(encoder)

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    (encoder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    args = _args(data, tmp_path / "out", inputs=factory.write_jsonl(tmp_path / "q.jsonl", [QA]))
    args[args.index("tiny-random")] = str(encoder)
    capsys.readouterr()
    assert factory.run_cli(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [(f"error: --vision-encoder {encoder}: a pickle-format weight file holds more than tensors: "
                    "refused by torch.load(weights_only=True), nothing in it ran")]
    assert not marker.exists()
    assert not [str(w.message) for w in recwarn if "pickle protocol" in str(w.message)]


def test_an_input_that_is_a_pipe_is_refused_without_reading_it(data, tmp_path, capsys):
    """`--input <(zcat x.jsonl.gz)` was reported as "no such file"; it exists, but a pipe cannot be read twice."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    capsys.readouterr()
    assert factory.run_cli(_args(data, tmp_path / "out", inputs=fifo)) == 2
    assert _error_line(capsys.readouterr().err) == (
        f"error: --input {fifo}: not a regular file (inputs are read twice, to plan the shards and to build them: "
        "decompress to a file first)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["bytes-list", "path-outside", "absolute-segment", "no-sha256"])
def test_a_re_signed_manifest_of_the_wrong_shape_is_one_line(text, tmp_path, capsys, case):
    """manifest_sha256 is a self-checksum, so an edited manifest can be re-signed: 'bytes' as a list or no 'sha256'
    were AttributeError/KeyError tracebacks, and a segment path outside the build (absolute, `..`) was read."""
    from engine.data.manifest import serialize_manifest
    from engine.data.shards import ShardReader

    copy = tmp_path / "copy"
    shutil.copytree(text[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if case == "bytes-list":
        manifest["bytes"] = []
    elif case == "path-outside":
        manifest["bytes"]["../outside.bin"] = 4
    elif case == "absolute-segment":
        manifest["embeddings"]["segments"] = [{"path": str(tmp_path / "outside.bin"), "rows": 1, "shard": 0}]
    else:
        del manifest["sha256"]
    (copy / "manifest.json").write_bytes(serialize_manifest(manifest))
    want = {"bytes-list": "'bytes' is not an object of file sizes", "no-sha256": "'sha256' is not an object of digests",
            "path-outside": "file path '../outside.bin' is not inside the build directory",
            "absolute-segment": f"file path '{tmp_path / 'outside.bin'}' is not inside the build directory"}[case]
    capsys.readouterr()
    assert factory.run_cli(["inspect", str(copy)]) == 2
    assert _error_line(capsys.readouterr().err) == f"error: manifest.json: corrupt, {want}"
    assert factory.run_cli(["verify", str(copy)]) == 1
    assert f"FAULT: manifest.json: corrupt, {want}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="corrupt"):
        ShardReader(copy)


def test_max_image_pixels_above_pils_own_limit_is_honoured():
    """--max-image-pixels 300000000: a 15000 x 15000 image (225 M pixels) was still refused by PIL's own
    decompression-bomb guard (2 x 89 M), with PIL's message about its limit instead of ours. Header-only PNG."""
    import struct
    import zlib

    from engine.data.image_decode import ImageDecodeError, open_image_header

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 15000, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")
    with pytest.raises(ImageDecodeError, match="more than --max-image-pixels 64,000,000") as caught:
        open_image_header(png, 64_000_000)
    assert caught.value.reason == "image_too_large"
    assert open_image_header(png, 300_000_000).size == (15000, 15000)


def test_a_saved_tokenizer_config_nested_too_deeply_is_a_fault(text, tmp_path, capsys):
    """load_saved_tokenizer let json's RecursionError through: verify (and every loader of a build's or a
    checkpoint's tokenizer copy) ended in a traceback."""
    copy = tmp_path / "copy"
    shutil.copytree(text[1], copy)
    (copy / "tokenizer" / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    assert factory.run_cli(["verify", str(copy)]) == 1
    assert "tokenizer_config.json is not usable JSON (RecursionError)" in capsys.readouterr().err
