"""MetaMorph recipes (examples/metamorph/): the published numbers, the LR batch-scaling rule, the data-family blend,
and the tiny CPU variants of both stages run through the real training CLI on shards that `python -m preprocess
build` makes from the bundled sample (split into two data families)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_gpt_vision
from tests.distributed_launch import REPO

SAMPLE = REPO / "examples" / "data" / "sample"
RECIPES = REPO / "examples" / "metamorph"


def _recipe_module():
    spec = importlib.util.spec_from_file_location("metamorph_recipe", RECIPES / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


recipe = _recipe_module()


def test_stage_recipes_carry_the_published_numbers():
    s1, s2 = recipe.read_recipe(RECIPES / "stage1.yaml"), recipe.read_recipe(RECIPES / "stage2.yaml")
    for values in (s1, s2):
        assert values["model-preset"] == "llama3.1-8b" and values["seq-length"] == "4096"
        assert values["lr-warmup-fraction"] == "0.03" and values["lr-decay-style"] == "cosine"
        assert float(values["weight-decay"]) == 0.0 and values["bf16"] == "true"
    assert (s1["stage"], s1["global-batch-size"], float(s1["lr"])) == ("1", "448", 3.74e-5)
    assert (s2["stage"], s2["global-batch-size"], float(s2["lr"])) == ("2", "1536", 6.93e-5)
    # The training CLI reads them as such.
    from engine.training import parse_training_config

    config = parse_training_config(["--config", str(RECIPES / "stage2.yaml"), "--mock-data"])
    assert config.model.num_layers == 32 and config.optimizer.lr == 6.93e-5 and config.optimizer.weight_decay == 0.0


def test_lr_batch_scaling_rule():
    assert recipe.scaled_lr(6.93e-5, 1536, 768) == pytest.approx(4.9e-5, rel=1e-3)  # the MetaMorph README example
    assert recipe.scaled_lr(3.74e-5, 448, 448) == 3.74e-5
    assert recipe.scaled_lr(1.0, 100, 400) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        recipe.scaled_lr(1e-4, 0, 8)
    out = subprocess.run([sys.executable, str(RECIPES / "recipe.py"), "lr", "--stage", "2", "--global-batch-size",
                          "768"], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and float(out.stdout) == pytest.approx(4.9e-5, rel=1e-3)


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_variants_change_only_the_size(stage):
    full = recipe.read_recipe(RECIPES / f"stage{stage}.yaml")
    tiny = recipe.read_recipe(RECIPES / f"stage{stage}_tiny.yaml")
    size_keys = {"model-preset", "seq-length", "global-batch-size", "lr", "bf16", "num-workers"}
    same = {k: v for k, v in full.items() if k not in size_keys}
    assert same == {k: v for k, v in tiny.items() if k not in size_keys}
    base = recipe.BASE[stage]
    assert float(tiny["lr"]) == pytest.approx(
        recipe.scaled_lr(base["lr"], base["global_batch_size"], int(tiny["global-batch-size"])), rel=1e-5)


def test_paper_mixture_weights():
    by_dataset, by_family = recipe.paper_weights("dataset"), recipe.paper_weights("family")
    assert sum(by_dataset.values()) == pytest.approx(1.0) and sum(by_family.values()) == pytest.approx(1.0)
    # The figure's family percentages agree with its per-dataset sample counts (to its printed precision).
    for family, percent in recipe.FAMILY_PERCENT.items():
        share = sum(w for key, w in by_dataset.items() if key.startswith(family + "/"))
        assert 100 * share == pytest.approx(percent, abs=0.06), family
    assert by_dataset["imageqa/cambrian7m"] == pytest.approx(7067 / 16066)


def _fake_build(path: Path, sequences: int) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"counts": {"sequences": sequences}}))
    return path


def test_blend_weights_missing_builds_and_mapping(tmp_path, capsys):
    for family in recipe.FAMILY_PERCENT:
        _fake_build(tmp_path / "root" / family, 10)
    pairs = recipe.blend(tmp_path / "root", "family")
    assert [round(w, 3) for w, _ in pairs] == [0.44, 0.311, 0.099, 0.088, 0.032, 0.03]
    args = recipe.data_path_args(pairs)
    assert args[0] == "0.440000" and args[1].endswith("imageqa")
    with pytest.raises(ValueError, match="imageqa/cambrian7m"):
        recipe.blend(tmp_path / "root", "dataset")  # no ROOT/<family>/<dataset> builds: named, not skipped
    only = recipe.blend(None, "family", mapping={"imageqa": str(tmp_path / "root" / "imageqa"),
                                                 "generation": str(tmp_path / "root" / "generation")},
                        allow_missing=True)
    assert [round(w, 4) for w, _ in only] == [round(44.0 / 75.1, 4), round(31.1 / 75.1, 4)]
    assert "dropped 24.9%" in capsys.readouterr().err
    sequences = recipe.blend(None, "family", "sequences", {"imageqa": str(_fake_build(tmp_path / "a", 30)),
                                                           "generation": str(_fake_build(tmp_path / "b", 10))},
                             allow_missing=True)
    assert [w for w, _ in sequences] == [0.75, 0.25]
    assert recipe.epoch_iterations(sequences, 16) == 3  # 40 sequences / 16 per step
    with pytest.raises(ValueError, match="unknown family"):
        recipe.blend(None, "family", mapping={"imgqa": "/x"})


@pytest.fixture(scope="module")
def family_builds(tmp_path_factory) -> dict[str, Path]:
    """The bundled sample split into two families, each built by `python -m preprocess build` (in parallel)."""
    root = tmp_path_factory.mktemp("metamorph")
    records = [json.loads(line) for line in (SAMPLE / "samples.jsonl").read_text().splitlines() if line.strip()]
    groups = {"imageqa": [r for r in records if r["id"].startswith(("vqa", "text"))],
              "generation": [r for r in records if not r["id"].startswith(("vqa", "text"))]}
    procs = {}
    for family, rows in groups.items():
        source = root / f"{family}.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cmd = [sys.executable, "-m", "preprocess", "build", "--input", str(source), "--image-root",
               str(SAMPLE / "images"), "--tokenizer-type", "tiktoken", "--tokenizer-model",
               str(REPO / "examples/data/tokenizer/tokenizer.model"), "--chat-template", "llama3",
               "--vision-encoder", "tiny-random", "--seq-length", "512", "--workers", "1", "--no-progress",
               "--output", str(root / family)]
        procs[family] = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for family, proc in procs.items():
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
    return {family: root / family for family in groups}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tiny_recipes_train_stage1_then_stage2_through_the_cli(family_builds, tmp_path):
    mapping = {k: str(v) for k, v in family_builds.items()}
    # Stage 1 on the understanding data (MetaMorph does not say which data its stage 1 used: docs/cluster.md).
    stage1_data = recipe.blend(None, "family", mapping={"imageqa": mapping["imageqa"]}, allow_missing=True)
    args1 = recipe.stage_command(1, stage1_data, recipe=RECIPES / "stage1_tiny.yaml",
                                 extra=["--save", str(tmp_path / "s1"), "--log-jsonl", str(tmp_path / "s1.jsonl"),
                                        "--log-interval", "1"])
    assert pretrain_gpt_vision.main(args1) == 0
    iters1 = int(args1[args1.index("--train-iters") + 1])
    rows1 = _rows(tmp_path / "s1.jsonl")
    assert [r["iteration"] for r in rows1] == list(range(1, iters1 + 1))
    assert rows1[0]["lr"] == pytest.approx(2.49889e-6, rel=1e-5)  # the rescaled LR, no warm-up step at this length

    # Stage 2 on the blend of both families, from the stage-1 checkpoint.
    blend = recipe.blend(None, "family", mapping=mapping, allow_missing=True)
    assert [round(w, 4) for w, _ in blend] == [round(44.0 / 75.1, 4), round(31.1 / 75.1, 4)]
    args2 = recipe.stage_command(2, blend, recipe=RECIPES / "stage2_tiny.yaml",
                                 extra=["--load", str(tmp_path / "s1"), "--save", str(tmp_path / "s2"),
                                        "--log-jsonl", str(tmp_path / "s2.jsonl"), "--log-interval", "1"])
    data = args2[args2.index("--data-path") + 1:args2.index("--global-batch-size")]
    assert data[1::2] == [mapping["imageqa"], mapping["generation"]]
    assert pretrain_gpt_vision.main(args2) == 0
    iters2 = int(args2[args2.index("--train-iters") + 1])
    sequences = sum(recipe.build_sequences(p) for _, p in blend)
    assert iters2 == math.ceil(sequences / 2) >= 2  # one epoch of the blend at global batch 2
    rows2 = _rows(tmp_path / "s2.jsonl")
    assert [r["iteration"] for r in rows2] == list(range(1, iters2 + 1))
    peak = 2.50065e-6
    expected = [peak * 0.5 * (1 + math.cos(math.pi * step / iters2)) for step in range(iters2)]  # cosine, no warm-up
    assert [r["lr"] for r in rows2] == pytest.approx(expected, rel=1e-5)
    assert sum(r["visual_targets"] for r in rows2) > 0  # stage 2 learns the visual tokens of response images
    assert all(math.isfinite(r["loss"]) for r in rows1 + rows2)
    assert (tmp_path / "s2").is_dir()


def test_command_prints_flags_that_work_from_the_repository_root(tmp_path, capsys):
    """`recipe.py command` names the recipe relative to the repository root (train.sbatch runs there, also in the
    container at /opt/chrysalis) and appends the flags after `--`."""
    _fake_build(tmp_path / "imageqa", 900)
    assert recipe.main(["command", "--stage", "2", "--map", f"imageqa={tmp_path / 'imageqa'}", "--allow-missing",
                        "--global-batch-size", "768", "--", "--load", "/ckpt/stage1"]) == 0
    args = capsys.readouterr().out.split()
    assert args[:2] == ["--config", "examples/metamorph/stage2.yaml"]
    assert args[args.index("--lr") + 1] == "4.90025e-05" and args[args.index("--train-iters") + 1] == "2"
    assert args[-2:] == ["--load", "/ckpt/stage1"]
    assert recipe.main(["command", "--stage", "2", "--root", str(tmp_path / "none")]) == 1  # missing builds named
