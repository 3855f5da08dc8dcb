"""Nothing read from a checkpoint runs code, and bad checkpoints or flags get one line naming the file or field.

A payload `.metadata` pickle (what torch.distributed.checkpoint's default reader unpickles), with the completion
record re-signed around it, is refused by every loader: `pretrain_gpt_vision.py --load`, `python -m
engine.generate --load` and `python -m engine.training.export --load`. Resuming and exporting never call pickle.
"""

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import pretrain_gpt_vision
from engine import generate
from engine.checkpoint_io import save_model_checkpoint
from engine.config import ModelConfig
from engine.model import build_model
from engine.training import Trainer, build_device_mesh, export, parse_training_config
from engine.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--mock-data", "--mock-data-sequences", "32", "--num-layers", "2", "--hidden-size", "32",
        "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
        "--max-position-embeddings", "256", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "3e-3",
        "--num-workers", "0", "--log-interval", "100", "--seed", "5"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A training --save directory with iterations 1 and 2 (tiny model, mock data)."""
    save = tmp_path_factory.mktemp("saved") / "ck"
    Trainer(parse_training_config([*TINY, "--train-iters", "2", "--save", str(save), "--save-interval", "1"]),
            build_device_mesh(), log=lambda m: None).train()
    return save


def copy(saved: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ck"
    shutil.copytree(saved, out)
    return out


def resign(path: Path, **changes) -> None:
    """Rewrites the completion record with the size and sha256 of every file now in the directory, as an attacker
    with write access to the checkpoint would."""
    record = json.loads((path / ckpt.RECORD).read_text())
    record["files"] = {p.relative_to(path).as_posix(): {"size": p.stat().st_size,
                                                        "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                       for p in sorted(path.rglob("*")) if p.is_file() and p.name != ckpt.RECORD}
    record.update(changes)
    (path / ckpt.RECORD).write_text(json.dumps(record))


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def plant_payload(save: Path, marker: Path, format_version: int) -> None:
    """Every checkpoint gets a `.metadata` pickle that writes `marker` when unpickled, re-signed in its record."""
    for path in sorted(save.glob("iter_*")):
        (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        resign(path, format_version=format_version)


def run_loader(which: str, save: Path, tmp_path: Path) -> int:
    if which == "pretrain":
        return pretrain_gpt_vision.main([*TINY, "--train-iters", "3", "--load", str(save)])
    if which == "generate":
        return generate.main(["--load", str(save), "--prompt", "hi", "--max-new-tokens", "2",
                              "--output", str(tmp_path / "gen")])
    return export.main(["--load", str(save), "--output", str(tmp_path / "model")])


@pytest.mark.parametrize("which", ["pretrain", "generate", "export"])
@pytest.mark.parametrize("format_version", [1, 2])
def test_payload_checkpoint_is_refused_and_never_runs(saved, tmp_path, capsys, which, format_version):
    """Format 1 is what the pickled-metadata writer produced (today's reader unpickles its .metadata); format 2
    with a pickle planted next to the safetensors must not be read either."""
    save, marker = copy(saved, tmp_path), tmp_path / "PAYLOAD_RAN"
    plant_payload(save, marker, format_version)
    assert run_loader(which, save, tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists(), "the checkpoint ran code"
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert errors[0].startswith("error: no usable checkpoint in") and "refused" in errors[0], errors
    assert "iter_0000002" in errors[0]


def test_unlisted_tensor_file_is_refused(saved, tmp_path, capsys):
    """HuggingFaceStorageReader reads every *.safetensors in the directory: one added after the save (not in the
    record) is refused instead of being mixed into the weights."""
    save = copy(saved, tmp_path)
    for path in save.glob("iter_*"):
        (shard,) = path.glob("*.safetensors")
        shutil.copy(shard, path / "shard-00009-model-00001-of-00001.safetensors")
    assert export.main(["--load", str(save), "--output", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err
    assert "shard-00009-model-00001-of-00001.safetensors is not listed in chrysalis_train.json: refused" in err


@pytest.mark.parametrize("case", ["listed-file", "unlisted-file", "directory", "fifo"])
def test_symlinks_and_special_files_in_a_checkpoint_are_refused(saved, tmp_path, capsys, case):
    """A re-signed checkpoint whose tensor file is a symlink to a file outside it, an unlisted symlink (rglob does
    not descend into a linked directory, so the unlisted-file check missed it) or a FIFO (a reader would block on
    it forever): refused before anything is read."""
    save = copy(saved, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in save.glob("iter_*"):
        (shard,) = path.glob("*.safetensors")
        if case == "listed-file":
            shard.rename(outside / f"{path.name}.safetensors")
            (path / shard.name).symlink_to(outside / f"{path.name}.safetensors")
            resign(path)
        elif case == "unlisted-file":
            (path / "extra.safetensors").symlink_to(shard)
        elif case == "directory":
            (path / "more").symlink_to(outside, target_is_directory=True)
        else:
            os.mkfifo(path / "z.safetensors")
    assert export.main(["--load", str(save), "--output", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    kind = "not a regular file or directory" if case == "fifo" else "a symbolic link"
    assert err[-1].startswith("error: no usable checkpoint") and f"is {kind}: refused" in err[-1], err


@pytest.mark.parametrize("case", ["deep-record", "trainer-empty", "trainer-types", "lr-text", "betas-object"])
def test_hand_edited_json_gives_one_line_naming_the_file(saved, tmp_path, capsys, case):
    """Re-signed JSON that parses but is not what we wrote: nesting json refuses with RecursionError, a trainer
    state without its fields, optimizer items of the wrong kind. One line naming the file, no traceback."""
    save = copy(saved, tmp_path)
    for path in save.glob("iter_*"):
        state = json.loads((path / ckpt.STATE).read_text())
        if case == "deep-record":
            (path / ckpt.RECORD).write_text("[" * 100_000 + "]" * 100_000)
            continue
        if case == "trainer-empty":
            state["trainer"] = {}
        elif case == "trainer-types":
            state["trainer"] = {k: "x" for k in state["trainer"]}
        else:
            suffix, value = (".lr", "abc") if case == "lr-text" else (".betas", {"a": 1})
            state["optimizer_items"].update({k: value for k in state["optimizer_items"] if k.endswith(suffix)})
        (path / ckpt.STATE).write_text(json.dumps(state))
        resign(path)
    code, err, _ = pretrain_error(save, capsys)
    want = {"deep-record": "chrysalis_train.json is not usable JSON (nested too deeply)",
            "trainer-empty": "state.json: trainer.iteration is missing",
            "trainer-types": "state.json: trainer.iteration is 'x', not a non-negative integer",
            "lr-text": ".lr is 'abc', not like this run's",
            "betas-object": ".betas is {'a': 1}, not like this run's"}[case]
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and want in err[0], err


def test_export_never_writes_into_training_checkpoints(saved, tmp_path, capsys):
    """`export --load CK --output CK` wrote config.json + model.safetensors into the --save folder; the next
    `pretrain --load CK` took it for a model-only checkpoint and restarted from iteration 0 without the optimizer
    (exit 0, the resume silently lost). Into an iter_* folder it made that checkpoint unusable (unlisted files)."""
    save = copy(saved, tmp_path)
    before = {p: p.read_bytes() for p in save.rglob("*") if p.is_file()}
    for flags, want in ((["--output", str(save)], f"--output {save} holds training checkpoints"),
                        (["--output", str(save / "iter_0000002" / "m")], "is inside the training checkpoint"),
                        (["--output", str(tmp_path / "m"), "--hf-output", str(save)],
                         f"--hf-output {save} holds training checkpoints")):
        assert export.main(["--load", str(save), *flags]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    assert {p: p.read_bytes() for p in save.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "m").exists()
    assert export.main(["--load", str(save), "--output", str(tmp_path / "m")]) == 0


def test_zero_heads_in_a_recorded_config_is_one_line(saved, tmp_path, capsys):
    """ModelConfig validation divided by num_attention_heads before checking it: ZeroDivisionError traceback."""
    save = copy(saved, tmp_path)
    for path in save.glob("iter_*"):
        record = json.loads((path / ckpt.RECORD).read_text())
        record["model"]["num_attention_heads"] = 0
        (path / ckpt.RECORD).write_text(json.dumps(record))
    assert export.main(["--load", str(save), "--output", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--num-attention-heads must be positive, got 0" in err[-1], err


def test_checkpoints_hold_only_safetensors_and_json(saved):
    for path in saved.glob("iter_*"):
        suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
        assert suffixes == {".safetensors", ".json"}, suffixes


def test_resume_and_export_never_unpickle(saved, tmp_path, monkeypatch):
    """With pickle and torch.load disabled, a full resume (model, optimizer, RNG, trainer state) and an export
    still work: nothing read from the checkpoint goes through an unpickler."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint loader called an unpickler")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    t = Trainer(parse_training_config([*TINY, "--train-iters", "3", "--load", str(saved)]), build_device_mesh(),
                log=lambda m: None)
    assert t.iteration == 2 and t.schedule.step_count == 2
    assert export.main(["--load", str(saved), "--output", str(tmp_path / "model")]) == 0


def test_rng_and_optimizer_hyperparameters_round_trip_as_json(tmp_path):
    """The non-tensor state is JSON and restores exactly (python/numpy/torch RNG, AdamW betas as a tuple)."""
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.set_rng_state(state)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    t = Trainer(parse_training_config([*TINY, "--train-iters", "2", "--load", str(tmp_path / "none"),
                                       "--load-if-exists"]), build_device_mesh(), log=lambda m: None)
    _, optim = ckpt.model_and_optimizer_state(t.model, t.optimizer)
    _, items = ckpt._split_tensors(optim)
    restored = {k: ckpt._restore_like(v, optim[k]) for k, v in json.loads(json.dumps(items)).items()}
    assert restored == {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)}
    assert any(isinstance(v, tuple) for v in restored.values())  # betas


# ------------------------------------------------------------------------------------------------- bad records
def pretrain_error(save: Path, capsys, *flags: str) -> tuple[int, list[str], str]:
    code = pretrain_gpt_vision.main([*TINY, "--train-iters", "3", "--load", str(save), *flags])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.mark.parametrize("case", ["list", "no-size", "bad-utf8-record", "all-corrupt"])
def test_unusable_checkpoints_give_one_line_and_exit_1(saved, tmp_path, capsys, case):
    save = copy(saved, tmp_path)
    for path in save.glob("iter_*"):
        record_path = path / ckpt.RECORD
        record = json.loads(record_path.read_text())
        if case == "list":
            record_path.write_text("[]")
        elif case == "no-size":
            del record["files"][next(iter(record["files"]))]["size"]
            record_path.write_text(json.dumps(record))
        elif case == "bad-utf8-record":
            record_path.write_bytes(b'{"format": "\xff"}')
        else:
            (shard,) = path.glob("*.safetensors")
            data = bytearray(shard.read_bytes())
            data[-5] ^= 0xFF
            shard.write_bytes(bytes(data))
    code, err, out = pretrain_error(save, capsys)
    assert code == 1 and len(err) == 1, err
    want = {"list": "chrysalis_train.json holds a JSON list, not an object",
            "no-size": 'has no integer "size"',
            "bad-utf8-record": "chrysalis_train.json is not valid UTF-8 (byte 12)",
            "all-corrupt": "is corrupt (sha256 mismatch)"}[case]
    assert err[0].startswith(f"error: no usable checkpoint in {save}: all 2 candidate(s)") and want in err[0], err
    assert "iter_0000001 is unusable" in out  # each skipped checkpoint is logged with its reason


@pytest.mark.parametrize("latest", [b"iter_00\xff\xfe", b"iter_0000009\n", b"../../etc\n"])
def test_unusable_latest_is_named_and_the_most_recent_save_is_used(saved, tmp_path, capsys, latest):
    save = copy(saved, tmp_path)
    (save / "latest").write_bytes(latest)
    logs = []
    found = ckpt.find_resumable(save, verify=True, info=build_device_mesh(), log=logs.append)
    assert found == save / "iter_0000002"
    (line,) = [m for m in logs if m.startswith("WARNING")]
    assert str(save / "latest") in line and "choosing by save time" in line


def test_missing_load_path_is_an_error_unless_load_if_exists(tmp_path, capsys):
    missing = tmp_path / "nothing"
    code, err, _ = pretrain_error(missing, capsys)
    assert code == 1 and len(err) == 1
    assert f"--load {missing}: no such file or directory (pass --load-if-exists" in err[0]
    missing.mkdir()
    code, err, _ = pretrain_error(missing, capsys)
    assert code == 1 and "holds no checkpoint" in err[0]
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "1", "--load", str(tmp_path / "other"),
                                     "--load-if-exists"]) == 0
    assert "starting from scratch (--load-if-exists)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- configs
def test_resume_with_another_architecture_names_each_field(saved, capsys):
    """A 2-layer checkpoint resumed with --num-layers 3, or with another head layout, is refused field by field
    (it used to "resume" with layers dropped or reinterpreted)."""
    flags = [f for f in TINY]
    flags[flags.index("--num-layers") + 1] = "3"
    flags[flags.index("--num-query-groups") + 1] = "4"
    code = pretrain_gpt_vision.main([*flags, "--train-iters", "3", "--load", str(saved)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert any("model field num_layers is 2 in the checkpoint but 3 in this run (--num-layers)" in e for e in err)
    assert any("model field num_query_groups is 2 in the checkpoint but 4 in this run (--num-query-groups)" in e
               for e in err)
    assert len([e for e in err if "model field" in e]) == 2


def tiny_model_checkpoint(tmp_path: Path, layers: int) -> Path:
    config = ModelConfig(vocab_size=384, hidden_size=32, ffn_hidden_size=64, num_layers=layers,
                         num_attention_heads=4, num_query_groups=2, seq_length=128, max_position_embeddings=256)
    model = build_model(config, seed=11)
    return save_model_checkpoint(model, tmp_path / f"model{layers}",
                                 vocab={"base_vocab_size": 300, "image_start_id": 300, "image_end_id": 301})


def test_a_requeued_run_saving_into_its_model_only_load_folder_resumes(saved, tmp_path):
    """`--load M --save M` with M a model-only checkpoint (an import or export): the requeued launch took M's
    config.json again and restarted from iteration 0, ignoring the run's own iter_* in M (exit 0, work lost)."""
    model = tmp_path / "model"
    assert export.main(["--load", str(saved), "--output", str(model)]) == 0
    flags = ["--load", str(model), "--save", str(model), "--save-interval", "1"]
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "2", *flags]) == 0
    t = Trainer(parse_training_config([*TINY, "--train-iters", "4", *flags]), build_device_mesh(), log=lambda m: None)
    assert t.iteration == 2 and t.consumed_samples == 4
    # Generation reads the trained weights there too, not the model-only ones M started from.
    from engine.generation.loading import _is_model_checkpoint

    assert not _is_model_checkpoint(model)


def test_model_only_load_is_strict_unless_load_partial(tmp_path, capsys):
    """A 2-layer model-only checkpoint into a 3-layer run: refused; with --load-partial, layers 0-1 load and the
    tensors of layer 2 are listed as left initialised."""
    from engine.checkpoint_io import load_model_checkpoint

    source = tiny_model_checkpoint(tmp_path, 2)
    flags = [f for f in TINY]
    flags[flags.index("--num-layers") + 1] = "3"
    run = [*flags, "--train-iters", "1", "--vocab-size", "384", "--load", str(source)]
    assert pretrain_gpt_vision.main(run) == 1
    err = capsys.readouterr().err
    assert "model field num_layers is 2 in the checkpoint but 3 in this run (--num-layers)" in err
    logs = []
    t = Trainer(parse_training_config([*run, "--load-partial"]), build_device_mesh(), log=logs.append)
    left = sorted(m.split()[1] for m in logs if "left initialised" in m)
    assert left and all(name.startswith("layers.2.") for name in left)
    assert len(left) == len([k for k in t.core_model.state_dict() if k.startswith("layers.2.")])
    loaded, _ = load_model_checkpoint(source)
    mine = t.core_model.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in loaded.state_dict().items())


# ------------------------------------------------------------------------------------------------- generation
def test_generate_flags_and_batch_file_errors(tmp_path, capsys):
    """nan and out-of-range flags, and a batch file that is not UTF-8, are one line naming the flag or file:line
    (checked before any checkpoint is read)."""
    missing = str(tmp_path / "no-checkpoint")
    for flags, want in ((["--temperature", "nan"], "--temperature must be a finite number >= 0"),
                        (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
                        (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
                        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1")):
        assert generate.main(["--load", missing, "--prompt", "x", "--output", str(tmp_path / "o"), *flags]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    batch = tmp_path / "prompts.jsonl"
    batch.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    assert generate.main(["--load", missing, "--batch-file", str(batch), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {batch}:2: not valid UTF-8 (byte 0xe9 at column 16)"]
    assert not (tmp_path / "o").exists()


def test_generate_json_nested_too_deeply_is_one_line_and_a_bom_is_read(tmp_path, capsys):
    """RecursionError from json (a batch line, a model-only config.json nested 100,000 deep) was a traceback; a
    batch file starting with a UTF-8 byte-order mark was refused ("Unexpected UTF-8 BOM")."""
    from engine.generation import read_batch_file

    deep = "[" * 100_000 + "]" * 100_000
    batch = tmp_path / "prompts.jsonl"
    batch.write_text('{"prompt": "fine"}\n{"prompt": ' + deep + "}\n")
    missing = str(tmp_path / "no-checkpoint")
    assert generate.main(["--load", missing, "--batch-file", str(batch), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {batch}:2: not usable JSON (nested too deeply)"]
    model = tiny_model_checkpoint(tmp_path, 2)
    (model / "config.json").write_text(deep)
    assert generate.main(["--load", str(model), "--prompt", "x", "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {model / 'config.json'} is not usable JSON (nested too deeply)"]
    batch.write_bytes(b'\xef\xbb\xbf{"prompt": "fine"}\n')
    assert [item.prompt for item in read_batch_file(batch)] == ["fine"]


def test_generate_refuses_a_tokenizer_with_another_fingerprint(tmp_path, capsys):
    """--tokenizer is compared with the fingerprint recorded with the checkpoint (its ids must be the model's)."""
    from engine.tokenizer import build_tokenizer, load_saved_tokenizer
    from engine.tokenizer.tiny import train_tiny_sentencepiece

    repo = Path(__file__).resolve().parents[1]
    right = build_tokenizer("tiktoken", repo / "examples" / "data" / "tokenizer" / "tokenizer.model")
    other_model = train_tiny_sentencepiece(["a different corpus, other merges", "zebra quartz"] * 20,
                                           tmp_path / "sp", vocab_size=300)
    wrong = build_tokenizer("sentencepiece", other_model)
    wrong_dir = tmp_path / "wrong"
    wrong.save(wrong_dir)
    config = ModelConfig(vocab_size=max(right.vocab_size, wrong.vocab_size) + 8, hidden_size=32, ffn_hidden_size=64,
                         num_layers=1, num_attention_heads=4, seq_length=128, max_position_embeddings=256)
    ck = save_model_checkpoint(build_model(config, seed=0), tmp_path / "model", tokenizer=right,
                               vocab={"base_vocab_size": right.base_vocab_size, "image_start_id": right.image_start_id,
                                      "image_end_id": right.image_end_id})
    assert json.loads((ck / "config.json").read_text())["tokenizer_fingerprint"] == right.fingerprint()
    args = ["--load", str(ck), "--prompt", "hi", "--max-new-tokens", "1", "--output", str(tmp_path / "o")]
    assert generate.main([*args, "--tokenizer", str(wrong_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--tokenizer {wrong_dir}" in err[0] and "is not the tokenizer" in err[0], err
    assert load_saved_tokenizer(ck / "tokenizer").fingerprint() == right.fingerprint()
    assert generate.main([*args, "--tokenizer", str(ck / "tokenizer")]) == 0
    assert len((tmp_path / "o" / "results.jsonl").read_text().splitlines()) == 1


def test_weights_only_load_of_a_training_checkpoint_is_strict_unless_load_partial(saved, capsys):
    """--finetune of the 2-layer training checkpoint into a 3-layer model: refused naming the field; with
    --load-partial the two layers load and layer 2 is listed as left initialised."""
    flags = [f for f in TINY]
    flags[flags.index("--num-layers") + 1] = "3"
    run = [*flags, "--train-iters", "1", "--finetune", "--load", str(saved)]
    assert pretrain_gpt_vision.main(run) == 1
    assert "model field num_layers is 2 in the checkpoint but 3 in this run" in capsys.readouterr().err
    logs = []
    t = Trainer(parse_training_config([*run, "--load-partial"]), build_device_mesh(), log=logs.append)
    left = sorted(m.split()[1] for m in logs if "left initialised" in m)
    assert left == sorted(k for k in t.core_model.state_dict() if k.startswith("layers.2."))
    source = Trainer(parse_training_config([*TINY, "--train-iters", "2", "--finetune", "--load", str(saved)]),
                     build_device_mesh(), log=lambda m: None).core_model.state_dict()
    mine = t.core_model.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in source.items() if not k.startswith("layers.2."))
