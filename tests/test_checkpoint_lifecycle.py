"""No finished work is deleted: a run prunes only its own checkpoints, never takes another run's checkpoint name,
resumes from `latest` (not the highest number), and never removes a checkpoint before its replacement is complete.
Stage 2 saved into the stage-1 folder (`--load S1 --save S1`) leaves stage 1 intact and resumes after a requeue."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import pretrain_gpt_vision
from engine.training import Trainer, build_device_mesh, parse_training_config
from engine.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--mock-data", "--mock-data-sequences", "32", "--num-layers", "2", "--hidden-size", "32",
        "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
        "--max-position-embeddings", "256", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "3e-3",
        "--num-workers", "0", "--log-interval", "100", "--seed", "5"]


def digests(save: Path) -> dict[str, str]:
    """checkpoint name -> sha256 of its completion record (which holds the sha256 of every file)."""
    return {p.name: hashlib.sha256((p / ckpt.RECORD).read_bytes()).hexdigest()
            for p in sorted(save.glob("iter_*")) if (p / ckpt.RECORD).is_file()}


def run_ids(save: Path) -> dict[str, str]:
    return {p.name: json.loads((p / ckpt.RECORD).read_text())["run_id"] for p in sorted(save.glob("iter_*"))}


def losses(path: Path) -> list[tuple]:
    return [(r["iteration"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_new_run_never_prunes_or_overwrites_another_runs_checkpoints(tmp_path):
    save = tmp_path / "ck"
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "4", "--save", str(save), "--save-interval", "1"]) == 0
    first = digests(save)
    assert list(first) == ["iter_0000001", "iter_0000002", "iter_0000003", "iter_0000004"]
    # A new run saving into the same folder with --keep-last 1 (it used to delete its own new checkpoint, keeping
    # the higher numbers of the other run, and leave `latest` pointing at nothing).
    assert pretrain_gpt_vision.main([*TINY, "--seed", "6", "--train-iters", "2", "--save", str(save),
                                     "--save-interval", "1", "--keep-last", "1"]) == 0
    after = digests(save)
    assert {k: after[k] for k in first} == first  # the first run's checkpoints, byte for byte
    ids = run_ids(save)
    new = [name for name in after if name not in first]
    (only,) = new  # the new run kept its newest checkpoint only
    assert only.startswith("iter_0000002-") and ids[only] != ids["iter_0000001"]
    assert (save / "latest").read_text().strip() == only
    # The next --load resumes the new run (at 2), not the other run's highest number (4).
    logs = []
    t = Trainer(parse_training_config([*TINY, "--seed", "6", "--train-iters", "3", "--load", str(save)]),
                build_device_mesh(), log=logs.append)
    assert t.iteration == 2 and f"resumed from {save / only}" in "\n".join(logs)
    assert t.run_id == ids[only]  # and keeps pruning its own checkpoints only


def test_stage2_saved_into_the_stage1_folder_resumes_after_requeue(tmp_path):
    s1 = tmp_path / "s1"
    assert pretrain_gpt_vision.main([*TINY, "--stage", "1", "--train-iters", "3", "--save", str(s1),
                                     "--save-interval", "1", "--keep-last", "2"]) == 0
    stage1 = digests(s1)
    assert list(stage1) == ["iter_0000002", "iter_0000003"]
    reference = tmp_path / "s1-copy"
    shutil.copytree(s1, reference)
    stage2 = [*TINY, "--stage", "2", "--train-iters", "4", "--save-interval", "1", "--keep-last", "2"]
    # Uninterrupted stage 2 (Megatron's usual pattern, --load and --save the same folder), for the losses.
    assert pretrain_gpt_vision.main([*stage2, "--load", str(reference), "--save", str(reference),
                                     "--log-jsonl", str(tmp_path / "full.jsonl")]) == 0
    # Stage 2 preempted after 2 iterations, then the same command again (a requeue).
    job = [*stage2, "--load", str(s1), "--save", str(s1), "--log-jsonl", str(tmp_path / "split.jsonl")]
    assert pretrain_gpt_vision.main([*job, "--exit-interval", "2"]) == 0
    assert {k: digests(s1)[k] for k in stage1} == stage1  # stage 1 neither overwritten nor pruned
    assert pretrain_gpt_vision.main(job) == 0
    assert losses(tmp_path / "split.jsonl") == losses(tmp_path / "full.jsonl")  # resumed stage 2, bitwise
    final = digests(s1)
    assert {k: final[k] for k in stage1} == stage1
    ids = run_ids(s1)
    stage2_names = sorted(k for k in final if k not in stage1)
    assert len(stage2_names) == 2 and len({ids[k] for k in stage2_names}) == 1  # one run, its newest two
    assert [ckpt._iteration_of(s1 / k) for k in stage2_names] == [3, 4]
    assert (s1 / "latest").read_text().strip() in stage2_names
    assert ckpt.read_record(s1 / (s1 / "latest").read_text().strip())["stage"] == 2


def test_a_checkpoint_is_replaced_only_once_its_replacement_is_complete(tmp_path, monkeypatch):
    """Saving an iteration this run already saved: the old checkpoint stays until the new one is complete (it
    used to be deleted first, so a failure in the save lost both)."""
    save = tmp_path / "ck"
    t = Trainer(parse_training_config([*TINY, "--train-iters", "1", "--save", str(save)]), build_device_mesh(),
                log=lambda m: None)
    t.train()
    before = digests(save)
    assert list(before) == ["iter_0000001"]

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        t.save()
    assert digests(save) == before and ckpt.check_checkpoint(save / "iter_0000001", verify=True) is None
    assert (save / "latest").read_text().strip() == "iter_0000001"
    monkeypatch.undo()
    t.save()  # completes: the replacement takes the name, the old one is gone
    assert list(digests(save)) == ["iter_0000001"] and digests(save) != before
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "latest"]


def test_resume_from_an_older_checkpoint_branches_instead_of_overwriting(tmp_path):
    """--load of an older iter_* directory of a run: the new checkpoints get their own run id and names, so the
    newer checkpoints of the original run are neither overwritten nor pruned."""
    save = tmp_path / "ck"
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "3", "--save", str(save), "--save-interval", "1"]) == 0
    before = digests(save)
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "3", "--load", str(save / "iter_0000001"),
                                     "--save", str(save), "--save-interval", "1", "--keep-last", "1"]) == 0
    after = digests(save)
    assert {k: after[k] for k in before} == before
    (branch,) = [k for k in after if k not in before]
    assert branch.startswith("iter_0000003-")
