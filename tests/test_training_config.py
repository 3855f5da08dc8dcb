"""Training flags, YAML precedence, validation messages and the learning-rate schedule."""

import itertools
import math

import pytest
import torch

from engine.training.config import OptimizerConfig, parse_training_config
from engine.training.optim import WarmupDecaySchedule


def test_yaml_sets_flags_and_the_command_line_wins(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("micro-batch-size: 4\nglobal_batch_size: 16\nlr: 0.01\n--seed: 9\n"
                   "data-path: [0.7, /a, 0.3, /b]\nmodel-preset: tiny\nstage: 1\nbf16: true\n")
    config = parse_training_config(["--config", str(run), "--lr", "0.002"])
    assert config.micro_batch_size == 4 and config.global_batch_size == 16 and config.seed == 9
    assert config.optimizer.lr == 0.002  # command line over YAML
    assert config.data.weighted_paths() == [(0.7, "/a"), (0.3, "/b")]
    assert config.stage == 1 and config.bf16 and config.model.hidden_size == 64


def test_unknown_yaml_key_is_named(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("micro-batch-sise: 4\n")
    with pytest.raises(ValueError, match="micro-batch-sise"):
        parse_training_config(["--config", str(run), "--mock-data"])


def test_validation_names_the_flag_to_change():
    config = parse_training_config(["--mock-data", "--micro-batch-size", "3", "--global-batch-size", "8"])
    with pytest.raises(ValueError, match="--global-batch-size 8 must be a multiple of --micro-batch-size 3"):
        config.validate(data_parallel_size=1)
    config = parse_training_config(["--model-preset", "tiny"])
    with pytest.raises(ValueError, match="--data-path"):
        config.validate()
    config = parse_training_config(["--mock-data", "--exit-interval", "5"])
    with pytest.raises(ValueError, match="--save"):
        config.validate()
    config = parse_training_config(["--data-path", "0.5", "/a", "/b", "--model-preset", "tiny"])
    with pytest.raises(ValueError, match="odd count"):
        config.validate()


def test_warmup_then_cosine_to_min_lr():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupDecaySchedule(opt, OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=4), train_iters=104)
    lrs = [schedule.lr_at(i) for i in range(110)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lrs[54], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert lrs[104:] == [0.1] * 6
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    schedule.step()
    assert opt.param_groups[0]["lr"] == 0.5
    fraction = WarmupDecaySchedule(opt, OptimizerConfig(lr=1.0, lr_warmup_fraction=0.1), train_iters=100)
    assert fraction.warmup == 10


def run_help(*args: str):
    """pretrain_gpt_vision.py with these arguments, in a subprocess (CompletedProcess)."""
    import subprocess
    import sys

    from distributed_launch import REPO

    return subprocess.run([sys.executable, str(REPO / "pretrain_gpt_vision.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)


def test_help_renders_grouped_with_readable_names_and_defaults():
    result = run_help("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--sequence-parallel",
                 "--num-layers-per-virtual-pipeline-stage", "--data-path", "--exit-interval"):
        assert flag in out
    assert "__" not in out  # no internal dests such as DATA__DATA_PATH / OPTIMIZER__LR as metavars
    assert "--lr LR " in out and "--data-path [W1] DIR1 [W2 DIR2 ...]" in out
    for title in ("training:", "data and dataloader:", "learning rate and optimizer:", "checkpointing:",
                  "logging and validation:", "distributed:", "mixed precision:", "model:", "Megatron-LM names"):
        assert f"\n{title}" in out, title
    flat = " ".join(out.split())  # argparse wraps lines at the terminal width
    assert "(default: 1234)" in flat and "(default: 98,2,0)" in flat and "(default: cosine)" in flat
    assert "--use-torch-fsdp2 = --data-parallel-sharding fsdp" in flat  # aliases are shown
    sections = {title: body for title, body in (part.split(":\n", 1) for part in out.split("\n\n")[2:]
                                                if ":\n" in part)}
    assert "--tensor-model-parallel-size" in sections["distributed"]
    assert "--bf16" in sections["mixed precision"] and "--lr-warmup-iters" in sections["learning rate and optimizer"]


def test_megatron_aliases_set_our_flags():
    config = parse_training_config(["--mock-data", "--use-torch-fsdp2"])
    assert config.data_parallel_sharding == "fsdp"
    config = parse_training_config(["--mock-data", "--recompute-activations", "--attention-backend", "fused"])
    assert config.recompute_granularity == "selective" and config.model.attention_backend == "te"
    config = parse_training_config(["--mock-data", "--attention-backend=local", "--recompute-method", "block",
                                    "--use-mcore-models", "--swiglu", "--normalization", "RMSNorm",
                                    "--use-distributed-optimizer", "--split", "90,10,0", "--eval-interval", "5",
                                    "--eval-iters", "2", "--bf16"])
    assert config.model.attention_backend == "sdpa" and config.use_distributed_optimizer and config.bf16
    assert config.data.split == "90,10,0" and config.logging.eval_interval == 5 and config.logging.eval_iters == 2
    with pytest.raises(ValueError, match="--use-torch-fsdp2 means --data-parallel-sharding fsdp"):
        parse_training_config(["--mock-data", "--use-torch-fsdp2", "--data-parallel-sharding", "none"])
    with pytest.raises(ValueError, match="uniform.*accepted: block"):
        parse_training_config(["--mock-data", "--recompute-method", "uniform"])
    with pytest.raises(ValueError, match="RMSNorm"):
        parse_training_config(["--mock-data", "--normalization", "LayerNorm"])


def test_megatron_llama_model_args_carry_over():
    """The model flags of Megatron-LM's own Llama-3.1-8B config (examples/post_training/modelopt/conf/meta-llama/
    Llama-3.1-8B-Instruct.sh) were refused as unknown: --no-position-embedding, --rotary-percent 1.0,
    --use-rope-scaling (Llama-3.1 RoPE scaling, factor 8 unless --rope-scaling-factor is given)."""
    common = ["--mock-data", "--num-layers", "2", "--no-position-embedding", "--rotary-percent", "1.0",
              "--attention-softmax-in-fp32", "--no-rope-fusion", "--use-rotary-position-embeddings"]
    assert parse_training_config(common).model.rope_scaling is None
    assert parse_training_config([*common, "--use-rope-scaling"]).model.rope_scaling.factor == 8.0
    assert parse_training_config([*common, "--use-rope-scaling", "--rope-scaling-factor", "32"]
                                 ).model.rope_scaling.factor == 32.0
    with pytest.raises(ValueError, match="--rotary-percent 0.5: not supported"):
        parse_training_config(["--mock-data", "--rotary-percent", "0.5"])
    # Megatron's examples/llama/train_llama3_8b_h100_fp8.sh: --kv-channels (checked against the head dimension),
    # --calculate-per-token-loss and the TensorBoard timer/memory flags were unknown flags.
    shape = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
    parse_training_config([*shape, "--kv-channels", "16", "--calculate-per-token-loss", "--log-timers-to-tensorboard",
                           "--log-memory-to-tensorboard"])
    with pytest.raises(ValueError, match="--kv-channels 128: the head dimension here is --hidden-size 64 / "
                                         "--num-attention-heads 4 = 16"):
        parse_training_config([*shape, "--kv-channels", "128"])


def test_full_recompute_without_a_layer_count_is_refused():
    """`--recompute-granularity full` alone recomputed nothing (the layer count defaults to 0), silently."""
    with pytest.raises(ValueError, match="--recompute-granularity full needs --recompute-num-layers"):
        parse_training_config(["--mock-data", "--recompute-granularity", "full"])
    config = parse_training_config(["--mock-data", "--recompute-granularity", "full", "--recompute-num-layers", "-1"])
    assert (config.recompute_granularity, config.recompute_num_layers) == ("full", -1)
    assert parse_training_config(["--mock-data", "--recompute-num-layers", "2"]).recompute_granularity == "full"


def test_megatron_aliases_in_yaml(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("use-torch-fsdp2: true\nmock-data: true\n")
    assert parse_training_config(["--config", str(run)]).data_parallel_sharding == "fsdp"


@pytest.mark.parametrize("argv, message", [
    (["--context-parallel-size", "2"], ("--context-parallel-size (Megatron-LM) is not supported; nearest "
                                        "equivalent: --sequence-parallel")),
    (["--train-samples=1000"], "--train-samples (Megatron-LM) is not supported; nearest equivalent: --train-iters"),
    (["--no-load-optim"], "nearest equivalent: --finetune"),
    (["--cross-entropy-loss-fusion"], "nearest equivalent: --fused-linear-cross-entropy"),
    (["--decoupled-lr", "5e-4"], "--decoupled-lr (Megatron-LM) is not supported"),
    (["--train-data-path", "/d/a", "--valid-data-path", "/d/b"],  # was "not a Megatron-LM flag we know"
     "--train-data-path (Megatron-LM) is not supported; nearest equivalent: --data-path with --split"),
    (["--micro-batch-sise", "2"], ("neither a Chrysalis flag nor a Megatron-LM flag we know; did you mean "
                                   "--micro-batch-size")),
])
def test_unsupported_megatron_flags_name_our_nearest_equivalent(argv, message):
    result = run_help("--mock-data", *argv)
    assert result.returncode == 2
    assert message in result.stderr and "unrecognized arguments" not in result.stderr


def test_tokenizer_type_takes_megatrons_names_and_must_match_the_shards(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_text('{"tokenizer": {"type": "tiktoken"}}')
    common = ["--data-path", str(build), "--model-preset", "tiny"]
    assert parse_training_config([*common, "--tokenizer-type", "TikTokenizer"]).data.data_path == [str(build)]
    with pytest.raises(ValueError, match="Llama2Tokenizer.*built with a tiktoken tokenizer"):
        parse_training_config([*common, "--tokenizer-type", "Llama2Tokenizer"])
    with pytest.raises(ValueError, match="GPT2BPETokenizer: not supported"):
        parse_training_config([*common, "--tokenizer-type", "GPT2BPETokenizer"])
    from preprocess.cli import _build_parser  # a Megatron preprocess_data.py habit carries over too

    for megatron, ours in (("Llama2Tokenizer", "sentencepiece"), ("TikTokenizer", "tiktoken"),
                           ("HuggingFaceTokenizer", "huggingface"), ("tiktoken", "tiktoken")):
        args = _build_parser().parse_args(["build", "--input", "x", "--tokenizer-type", megatron,
                                           "--tokenizer-model", "m", "--output", "o"])
        assert args.tokenizer_type == ours


def test_help_answers_without_importing_torch():
    import subprocess
    import sys

    from distributed_launch import REPO

    code = ("import sys, runpy; sys.argv = ['pretrain_gpt_vision.py', '--help']\n"
            "try:\n    runpy.run_path('pretrain_gpt_vision.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_pipeline_flags_need_pp_and_sequence_parallel_is_dropped_at_tp1():
    """--pipeline-layer-split / --num-layers-per-virtual-pipeline-stage at PP 1 were ignored without a word on one
    process or with DDP (refused only under TP); --sequence-parallel at TP 1 was refused at PP 2 and ignored
    otherwise. Now: the pipeline flags need PP > 1 in every layout; SP at TP 1 is dropped with a note, as Megatron
    does (its launch scripts pass it whatever the TP size)."""
    for flags in (["--pipeline-layer-split", "2", "2"], ["--num-layers-per-virtual-pipeline-stage", "1"]):
        with pytest.raises(ValueError, match="need --pipeline-model-parallel-size > 1"):
            parse_training_config(["--mock-data", *flags]).validate(1)
    config = parse_training_config(["--mock-data", "--sequence-parallel", "--pipeline-model-parallel-size", "2"])
    config.validate(1)
    assert config.parallel_config().sequence_parallel is False
    tp2 = parse_training_config(["--mock-data", "--sequence-parallel", "--tensor-model-parallel-size", "2"])
    assert tp2.parallel_config().sequence_parallel is True


def test_distributed_timeout_minutes_reaches_the_process_group(monkeypatch, capsys):
    """Megatron-LM's --distributed-timeout-minutes (it was refused as unsupported): parsed, validated, shown under
    "distributed" in --help, and handed to the process group by both recipes' entry points."""
    import pretrain_gpt_vision
    from engine.training import parallel

    assert parse_training_config(["--mock-data"]).distributed_timeout_minutes == 10.0  # Megatron's default
    assert parse_training_config(["--mock-data", "--distributed-timeout-minutes", "45"]).distributed_timeout_minutes == 45
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ValueError, match="--distributed-timeout-minutes must be a positive number"):
            parse_training_config(["--mock-data", "--distributed-timeout-minutes", bad])
    seen = []

    def fake_mesh(timeout_s=600.0, parallel=None):
        seen.append(timeout_s)
        raise ValueError("stop here")

    # Only the defining module is patched: both entry points import it from engine.training.parallel at call time.
    # (Patching the lazy `engine.training` package too leaked: its "old value" was read through the PEP 562
    # __getattr__ after the first patch, so the undo left the fake behind for every later test.)
    monkeypatch.setattr(parallel, "build_device_mesh", fake_mesh)
    assert pretrain_gpt_vision.main(["--mock-data", "--distributed-timeout-minutes", "3"]) == 1
    assert pretrain_gpt_vision.main(["--recipe", "metaquery", "--mock-data", "--decoder", "DEC", "--llm", "LLM",
                                     "--distributed-timeout-minutes", "2.5"]) == 1  # nothing is read before the mesh
    assert capsys.readouterr().err.count("error: stop here") == 2
    assert seen == [180.0, 150.0]
    assert "--distributed-timeout-minutes" in pretrain_gpt_vision_help()


def pretrain_gpt_vision_help() -> str:
    import contextlib
    import io

    import pretrain_gpt_vision

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        pretrain_gpt_vision.main(["--help"])
    text = out.getvalue()
    return text[text.index("distributed:"):]
