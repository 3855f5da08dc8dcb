"""Single-process training loop on CPU fp32: bitwise resume, --exit-interval, stage freezing, non-finite skips,
checkpoint fallback, pruning, export."""

import json
import math
from pathlib import Path

import pytest
import torch

import pretrain_gpt_vision
from engine.training import TooManySkippedSteps, Trainer, build_device_mesh, parse_training_config
from engine.training import checkpoint as ckpt

TINY = ["--mock-data", "--mock-data-sequences", "64", "--num-layers", "2", "--hidden-size", "32",
        "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
        "--max-position-embeddings", "256", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--min-lr", "3e-4", "--weight-decay", "0.1", "--num-workers", "0",
        "--log-interval", "100", "--seed", "5"]


def losses(path: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["iteration"], r["loss"], r["lm_loss"], r["visual_loss"]) for r in rows]


def trainer(*extra: str) -> Trainer:
    return Trainer(parse_training_config([*TINY, *extra]), build_device_mesh())


def test_resume_gives_bitwise_identical_losses(tmp_path):
    full_log, split_log = tmp_path / "full.jsonl", tmp_path / "split.jsonl"
    assert pretrain_gpt_vision.main([*TINY, "--train-iters", "6", "--log-jsonl", str(full_log)]) == 0
    first = [*TINY, "--train-iters", "6", "--log-jsonl", str(split_log), "--save", str(tmp_path / "ck"),
             "--exit-interval", "3"]
    assert pretrain_gpt_vision.main(first) == 0
    assert [r[0] for r in losses(split_log)] == [1, 2, 3]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "iter_0000003"
    assert pretrain_gpt_vision.main([*first, "--load", str(tmp_path / "ck")]) == 0
    full, split = losses(full_log), losses(split_log)
    assert [r[0] for r in split] == [1, 2, 3, 4, 5, 6]
    assert split == full  # exact float equality, every step
    assert full[-1][1] < full[0][1]
    # The checkpoint carries everything generation needs: config, vocabulary, model weights.
    record = ckpt.read_record(tmp_path / "ck" / "iter_0000006")
    assert record["iteration"] == 6 and record["model"]["hidden_size"] == 32 and record["vocab"]["image_start_id"] == 300


def test_stage1_trains_only_projector_and_new_token_rows():
    t = trainer("--stage", "1", "--train-iters", "2")
    model = t.core_model
    base = t.vocab["base_vocab_size"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [b for _, b in zip(range(2), t._loader(t.train_samples, 0))]
    for i, b in enumerate(batches):
        t.forward_backward_step(b, sum(x.lm_targets for x in batches), sum(x.visual_targets for x in batches),
                                sync_gradients=i == 1)
    t.grad_mask()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"projector.fc1.weight", "projector.fc1.bias", "projector.fc2.weight", "projector.fc2.bias",
                         "tok_embeddings.weight", "output.weight"}
    # Where the gradient comes from: the text loss alone, bit for bit. The visual loss is computed (and logged) but
    # never reaches a gradient through the frozen, randomly initialised head (issue 9, item 1).
    step_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    t.optimizer.zero_grad(set_to_none=True)
    text_targets = max(float(sum(x.lm_targets for x in batches)), 1.0)
    measured, visual_in_graph = 0.0, False
    for b in batches:
        out = model(b.tokens, **b.model_inputs())
        (out.lm_loss_sum / text_targets).backward()
        measured += float(out.visual_loss_sum)
        visual_in_graph |= out.visual_loss_sum.requires_grad
    t.grad_mask()
    assert measured > 0  # there were visual targets, and their loss was measured
    text_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert text_grads.keys() == step_grads.keys()
    for name, grad in step_grads.items():
        assert torch.equal(grad, text_grads[name]), f"{name}: the stage-1 gradient is not the text loss's alone"
    assert not visual_in_graph  # measured under no_grad: no graph kept for a loss that trains nothing
    for name in ("tok_embeddings.weight", "output.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad[:base].abs().sum() == 0, name
    assert dict(model.named_parameters())["tok_embeddings.weight"].grad[base].abs().sum() > 0  # <image_start>
    assert dict(model.named_parameters())["output.weight"].grad[base:base + 2].abs().sum() > 0
    t.optimizer.zero_grad(set_to_none=True)
    t.train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector.fc1.weight", "projector.fc1.bias", "projector.fc2.weight", "projector.fc2.bias",
                       "tok_embeddings.weight", "output.weight"}
    for name in ("tok_embeddings.weight", "output.weight"):  # old rows bit-identical despite --weight-decay
        assert torch.equal(before[name][:base], after[name][:base])
        assert not torch.equal(before[name][base:base + 2], after[name][base:base + 2])


def test_stage1_can_also_train_the_visual_head():
    t = trainer("--stage", "1", "--stage1-train-visual-head")
    assert {n for n in t.trainable if n.startswith("visual_head.")} == {
        "visual_head.fc1.weight", "visual_head.fc1.bias", "visual_head.fc2.weight", "visual_head.fc2.bias"}
    # With the head trained, the visual term counts: the head learns, and the projector's gradient is no longer
    # the text loss's alone.
    model = t.core_model
    batch = next(iter(t._loader(t.train_samples, 0)))
    assert batch.visual_targets > 0
    t.forward_backward_step(batch, batch.lm_targets, batch.visual_targets, sync_gradients=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.count_nonzero(grads[n]) > 0 for n in grads if n.startswith("visual_head."))
    t.optimizer.zero_grad(set_to_none=True)
    (model(batch.tokens, **batch.model_inputs()).lm_loss_sum / batch.lm_targets).backward()
    assert not torch.equal(grads["projector.fc1.weight"], model.projector.fc1.weight.grad)


def test_stage2_gives_every_parameter_a_gradient():
    t = trainer("--stage", "2")
    batch = next(iter(t._loader(t.train_samples, 0)))
    t.forward_backward_step(batch, batch.lm_targets, batch.visual_targets, sync_gradients=True)
    names = {n for n, _ in t.core_model.named_parameters()}
    assert {n for n, p in t.core_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == names


def test_stage2_from_stage1_checkpoint_loads_weights_only(tmp_path):
    s1 = trainer("--stage", "1", "--train-iters", "2", "--save", str(tmp_path / "s1"))
    s1.train()
    weights = {k: v.clone() for k, v in s1.core_model.state_dict().items()}
    logs = []
    s2 = Trainer(parse_training_config([*TINY, "--stage", "2", "--train-iters", "2", "--load", str(tmp_path / "s1")]),
                 build_device_mesh(), log=logs.append)
    assert s2.iteration == 0 and s2.schedule.step_count == 0
    assert any("stage-1 checkpoint" in m for m in logs)
    assert all(torch.equal(weights[k], v) for k, v in s2.core_model.state_dict().items())


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    t = trainer("--train-iters", "4", "--log-jsonl", str(tmp_path / "log.jsonl"), "--clip-grad", "1.0")
    model = t.core_model
    original = model.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # both micro-batches of iteration 2
            out.lm_loss_sum = out.lm_loss_sum * float("nan")
        return out

    model.compute_losses = poisoned
    snapshot = {}

    def snap_after_first_step(micro, step=t.train_step):
        result = step(micro)
        snapshot[t.iteration + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return result

    t.train_step = snap_after_first_step
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, False, False]
    assert rows[1]["loss"] is None and rows[1]["skipped_total"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows if not r["skipped"])
    assert all(torch.equal(snapshot[1][k], snapshot[2][k]) for k in snapshot[1])  # no update at the skipped step
    assert t.schedule.step_count == 3


def test_too_many_consecutive_skips_abort():
    t = trainer("--train-iters", "10", "--max-skipped-steps", "2")
    original = t.core_model.compute_losses

    def always_inf(*args, **kwargs):
        out = original(*args, **kwargs)
        out.visual_loss_sum = out.visual_loss_sum + float("inf")
        return out

    t.core_model.compute_losses = always_inf
    with pytest.raises(TooManySkippedSteps, match="3 consecutive"):
        t.train()
    assert t.iteration == 3


def test_corrupt_and_interrupted_checkpoints_fall_back(tmp_path):
    save = tmp_path / "ck"
    t = trainer("--train-iters", "3", "--save", str(save), "--save-interval", "1", "--keep-last", "2")
    t.train()
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    # A flipped byte in the newest checkpoint, and an interrupted save after it.
    (shard,) = (save / "iter_0000003").glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (save / "iter_0000004").mkdir()  # an interrupted save of the same run: its owner file, part of a shard
    (save / "iter_0000004" / "owner.json").write_text((save / "iter_0000003" / "owner.json").read_text())
    (save / "iter_0000004" / shard.name).write_bytes(b"partial")
    logs = []
    found = ckpt.find_resumable(save, verify=True, info=build_device_mesh(), log=logs.append)
    assert found == save / "iter_0000002"
    assert any("iter_0000004" in m and "interrupted" in m for m in logs)
    assert any("iter_0000003" in m and "sha256" in m for m in logs)
    resumed = Trainer(parse_training_config([*TINY, "--train-iters", "3", "--load", str(save)]), build_device_mesh(),
                      log=logs.append)
    assert resumed.iteration == 2
    (shard,) = (save / "iter_0000002").glob("*.safetensors")
    shard.write_bytes(b"")  # truncated
    assert "truncated" in ckpt.check_checkpoint(save / "iter_0000002", verify=False)


def test_export_to_model_checkpoint_and_hugging_face(tmp_path):
    from engine.checkpoint_io import load_model_checkpoint
    from engine.training.export import export_training_checkpoint

    t = trainer("--train-iters", "1", "--save", str(tmp_path / "ck"))
    t.train()
    out = export_training_checkpoint(tmp_path / "ck", tmp_path / "model", hf_output=tmp_path / "hf")
    model, config = load_model_checkpoint(out)
    assert config["vocab"]["base_vocab_size"] == 300
    trained = t.core_model.state_dict()
    assert model.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    # The Hugging Face export holds the trained tensors (real vocabulary rows only), the projector and head
    # included; every trained tensor is found there exactly once.
    from safetensors.torch import load_file

    from engine.convert import chrysalis_to_hf_name

    hf = load_file(tmp_path / "hf" / "model.safetensors")
    heads = load_file(tmp_path / "hf" / "vpit_heads.safetensors")
    real = json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"]
    assert real == t.model_config.num_real_tokens == 302 and t.model_config.vocab_size == 384
    compared = set()
    for name, tensor in trained.items():
        if name.startswith(("projector.", "visual_head.")):
            exported = heads[name]
        else:
            exported = hf[chrysalis_to_hf_name(name)]
            if name in ("tok_embeddings.weight", "output.weight"):
                tensor = tensor[:real]
        assert torch.equal(exported, tensor), name
        compared.add(name)
    assert compared == set(trained) and len(hf) + len(heads) == len(trained)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    t = trainer("--bf16", "--train-iters", "2", "--log-jsonl", str(tmp_path / "log.jsonl"))
    before = t.core_model.output.weight.detach().clone()
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert all(p.dtype == torch.float32 for p in t.core_model.parameters())
    assert not torch.equal(before, t.core_model.output.weight)
