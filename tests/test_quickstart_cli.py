"""A newcomer's first hour: every program's --help answers without importing torch (the slow part of start-up) and
says `usage: python -m ...`; known-harmless third-party warnings are silenced while real ones show; the demo
script refuses to delete a folder it did not create; `engine.plot --log-y`; the similarity measures the demo
uses agree with scikit-image."""

import json
import os
import subprocess
import sys

import pytest
from distributed_launch import REPO

# (command, what `usage:` must say). Every program a README or doc tells a user to run.
PROGRAMS = [
    (["pretrain_gpt_vision.py"], "torchrun --nproc-per-node N pretrain_gpt_vision.py"),
    (["-m", "engine.generate"], "python -m engine.generate"),
    (["-m", "engine.generate", "--recipe", "metaquery"], "python -m engine.generate --recipe metaquery"),
    (["pretrain_gpt_vision.py", "--recipe", "metaquery"], "torchrun --nproc-per-node N pretrain_gpt_vision.py"),
    (["-m", "engine.plot"], "python -m engine.plot"),
    (["-m", "engine.visualizer.train"], "python -m engine.visualizer.train"),
    (["-m", "engine.visualizer.render"], "python -m engine.visualizer.render"),
    (["-m", "engine.visualizer.autoencoder"], "python -m engine.visualizer.autoencoder"),
    (["-m", "engine.visualizer.similarity"], "python -m engine.visualizer.similarity"),
    (["-m", "engine.convert"], "python -m engine.convert"),
    (["-m", "engine.training.export"], "python -m engine.training.export"),
    (["-m", "preprocess", "build"], "python -m preprocess build"),
    (["-m", "preprocess", "verify"], "python -m preprocess verify"),
    (["-m", "preprocess", "inspect"], "python -m preprocess inspect"),
    (["-m", "engine.plan"], "python -m engine.plan"),
]

# Runs a program's --help in this interpreter and reports whether torch got imported before the help was printed.
_PROBE = """
import runpy, sys
args = sys.argv[1:]
if args[0] == "-m":
    module, sys.argv = args[1], [args[1], *args[2:], "--help"]
    run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    sys.argv = [args[0], *args[1:], "--help"]
    run = lambda: runpy.run_path(args[0], run_name="__main__")
try:
    run()
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH-LOADED" if loaded else "TORCH-NOT-LOADED", file=sys.stderr)
"""


@pytest.mark.parametrize("command, usage", PROGRAMS, ids=[" ".join(c) for c, _ in PROGRAMS])
def test_help_answers_before_heavy_imports(command, usage):
    result = subprocess.run([sys.executable, "-c", _PROBE, *command], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "COLUMNS": "200"}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"usage: {usage}" in result.stdout.replace("\n", " "), result.stdout[:300]
    assert "TORCH-NOT-LOADED" in result.stderr, f"{' '.join(command)} --help imports torch before printing help"


DEFAULTS_SHOWN = [
    (["pretrain_gpt_vision.py"], "(default: 1234)"),
    (["-m", "engine.generate"], "(default: 256)"),
    (["-m", "engine.generate", "--recipe", "metaquery"], "prompts rendered together (default: 8)"),
    (["-m", "engine.plot"], "(default: 1, no smoothing)"),
    (["-m", "engine.convert", "hf-to-chrysalis"], "(default: 128)"),
    (["-m", "engine.visualizer.train"], "(default: 0.8, the reference's)"),
    (["-m", "engine.visualizer.render"], "DDIM steps (default: 50)"),
    (["-m", "engine.visualizer.autoencoder"], "(default: 32)"),
    (["-m", "preprocess", "build"], "(default: 4096)"),
]


@pytest.mark.parametrize("command, shown", DEFAULTS_SHOWN, ids=[" ".join(c) for c, _ in DEFAULTS_SHOWN])
def test_help_shows_defaults(command, shown):
    result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shown in " ".join(result.stdout.split()), result.stdout[-1500:]


def test_known_harmless_warnings_are_silenced_and_real_ones_kept():
    code = ("import warnings, engine, logging\n"
            "warnings.warn('Transformer Engine and Apex are not installed. Falling back to Torch optimizers.')\n"
            "warnings.warn('torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
            "load in a single process.')\n"
            "logging.getLogger('torchao').warning('Failed to load /x/torchao/_C_mxfp8.so: Could not load')\n"
            "logging.getLogger('diffusers.quantizers.torchao.torchao_quantizer').warning("
            "'Unable to import `torchao` Tensor objects. This may affect loading')\n"
            "logging.getLogger('transformers.utils.import_utils').warning('`CLIPImageProcessor` requires torchvision "
            "(not installed); falling back to `CLIPImageProcessorPil` for backward compatibility.')\n"
            "warnings.warn('a real problem')\n"
            "logging.getLogger('torchao').warning('a real torchao problem')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    for harmless in ("Transformer Engine and Apex", "assuming the intent", "_C_mxfp8", "Tensor objects",
                     "requires torchvision"):
        assert harmless not in result.stderr
    assert "a real problem" in result.stderr and "a real torchao problem" in result.stderr
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "CHRYSALIS_SHOW_ALL_WARNINGS": "1"}, check=False)
    assert "Transformer Engine and Apex" in shown.stderr


@pytest.mark.parametrize("setup", ["user_files", "symlink_to_marked_folder", "a_file"])
def test_quickstart_refuses_a_folder_it_did_not_create(tmp_path, setup):
    marker = ".created-by-chrysalis-quickstart"
    out = tmp_path / "out"
    if setup == "user_files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif setup == "symlink_to_marked_folder":
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / marker).write_text("")
        (target / "keep.txt").write_text("keep")
        out.symlink_to(target)
    else:
        out.write_text("a file, not a folder")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    result = subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "OUT": str(out)}, check=False)
    assert result.returncode == 1
    assert "was not created by this demo" in result.stderr and "nothing was deleted" in result.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_plot_log_y(tmp_path):
    pytest.importorskip("matplotlib")
    from engine import plot

    log = tmp_path / "train.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "loss": 10 / i, "lm_loss": 8 / i, "visual_loss": 2 / i})
                           + "\n" for i in range(1, 30)))
    fig = plot.draw_runs([str(log)], log_y=True)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "log"]
    assert [ax.get_yscale() for ax in plot.draw_runs([str(log)]).axes] == ["linear"] * 3
    assert plot.main([str(log), "--output", str(tmp_path / "c.png"), "--log-y"]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0


def test_similarity_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    import numpy as np
    import torch

    from engine.visualizer.similarity import psnr, ssim

    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=generator)
    b = (a + 0.1 * torch.randn(3, 32, 32, generator=generator)).clamp(0, 1)
    x, y = (t.permute(1, 2, 0).double().numpy() for t in (a, b))
    assert ssim(a, b) == pytest.approx(skimage_metrics.structural_similarity(x, y, channel_axis=2, data_range=1),
                                       rel=1e-9)
    assert psnr(a, b) == pytest.approx(skimage_metrics.peak_signal_noise_ratio(x, y, data_range=1), rel=1e-9)
    assert ssim(a, a) == pytest.approx(1.0) and np.isfinite(psnr(a, a))
