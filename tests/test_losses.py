"""VPiT losses (engine/model/vpit.py: `compute_losses`, `VPiTLoss`), each against a hand-computed reference.

The batch has a prompt image (slots with visual_target_mask False: read, never predicted) in row 0 and response
images (mask True: predicted from the hidden state one position earlier) in both rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.config import preset
from engine.model import IGNORE_INDEX, build_model
from engine.model.vpit import visual_cosine_loss_sum

B, S = 2, 16
VOCAB = 512


def _model(coef: float = 0.5):
    return build_model(preset("tiny", visual_loss_coef=coef), seed=0)


def _batch(seed: int = 0):
    """tokens, labels, visual_tokens [V, 1152], visual_positions [V] (flat in B*S), visual_target_mask [V]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.roll(tokens, -1, dims=1).clone()
    labels[:, -1] = IGNORE_INDEX
    labels[0, :5] = IGNORE_INDEX  # prompt text and prompt image are not trained
    labels[1, :3] = IGNORE_INDEX
    prompt_slots = [2, 3, 4]  # row 0: prompt image
    response_slots = [9, 10, 11, S + 6, S + 7]  # row 0 response image, row 1 response image
    visual_positions = torch.tensor(prompt_slots + response_slots)
    visual_target_mask = torch.tensor([False] * 3 + [True] * 5)
    # The slots' labels are the visual tokens, not text.
    labels.view(-1)[visual_positions - 1] = IGNORE_INDEX
    visual_tokens = torch.randn(len(visual_positions), 1152, generator=g)
    return tokens, labels, visual_tokens, visual_positions, visual_target_mask


def test_losses_match_hand_computation():
    torch.manual_seed(0)
    model = _model(coef=0.5)
    tokens, labels, vt, vp, vmask = _batch()
    out = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask)
    with torch.no_grad():
        hidden = model(tokens, visual_tokens=vt, visual_positions=vp)  # final-normed [B, S, H]
        flat = hidden.reshape(B * S, -1)
        keep = labels.reshape(-1) != IGNORE_INDEX
        lm_ref = F.cross_entropy(model.output(flat[keep]), labels.reshape(-1)[keep])
        # Also the plain "ignore_index" formulation over all logits.
        lm_ref_all = F.cross_entropy(model.output(hidden).reshape(B * S, -1), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX)
        pred = model.visual_head(flat[vp[vmask] - 1])
        vis_ref = (1 - F.cosine_similarity(pred, vt[vmask], dim=-1)).mean()
    torch.testing.assert_close(out.lm_loss, lm_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.lm_loss, lm_ref_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.visual_loss, vis_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.visual_loss)
    assert out.visual_loss > 0.5  # random head vs random targets: cosine near 0


def test_prompt_image_slots_contribute_nothing():
    model = _model()
    tokens, labels, vt, vp, vmask = _batch()
    out = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask)
    # A mask that also selects the prompt slots changes the loss: the mask (not luck) excludes them.
    all_true = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp,
                     visual_target_mask=torch.ones_like(vmask))
    assert int(all_true.visual_targets) == 8 and int(out.visual_targets) == 5
    assert not torch.allclose(all_true.visual_loss_sum, out.visual_loss_sum)
    # The 5 response slots' summed loss is the same in both: the 3 prompt slots added the difference.
    with torch.no_grad():
        hidden = model(tokens, visual_tokens=vt, visual_positions=vp).reshape(B * S, -1)
        per_slot = 1 - F.cosine_similarity(model.visual_head(hidden[vp - 1]), vt, dim=-1)
    torch.testing.assert_close(out.visual_loss_sum, per_slot[vmask].sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(all_true.visual_loss_sum, per_slot.sum(), atol=1e-5, rtol=1e-5)


def test_sums_and_counts_are_consistent():
    model = _model()
    tokens, labels, vt, vp, vmask = _batch(seed=1)
    out = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask)
    assert int(out.lm_tokens) == int((labels != IGNORE_INDEX).sum())
    assert int(out.visual_targets) == int(vmask.sum())
    torch.testing.assert_close(out.lm_loss, out.lm_loss_sum / out.lm_tokens)
    torch.testing.assert_close(out.visual_loss, out.visual_loss_sum / out.visual_targets)
    # Two micro-batches normalised over both (gradient accumulation) from the sums == one merged batch.
    tokens2, labels2, vt2, vp2, vmask2 = _batch(seed=2)
    out2 = model(tokens2, labels=labels2, visual_tokens=vt2, visual_positions=vp2, visual_target_mask=vmask2)
    merged = model(torch.cat([tokens, tokens2]), labels=torch.cat([labels, labels2]),
                   visual_tokens=torch.cat([vt, vt2]), visual_positions=torch.cat([vp, vp2 + B * S]),
                   visual_target_mask=torch.cat([vmask, vmask2]))
    torch.testing.assert_close(merged.lm_loss, (out.lm_loss_sum + out2.lm_loss_sum) / (out.lm_tokens + out2.lm_tokens))
    torch.testing.assert_close(merged.visual_loss, (out.visual_loss_sum + out2.visual_loss_sum)
                               / (out.visual_targets + out2.visual_targets))


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_no_visual_inputs_gives_zero_visual_loss_and_zero_grads():
    model = _model()
    tokens, labels, *_ = _batch()
    out = model(tokens, labels=labels)
    assert torch.isfinite(out.loss)
    assert out.visual_loss.item() == 0.0 and int(out.visual_targets) == 0
    torch.testing.assert_close(out.loss, out.lm_loss)
    out.loss.backward()
    for name, module in (("visual_head", model.visual_head), ("projector", model.projector)):
        grads = _grads(module)
        assert all(g is not None for g in grads), f"{name} has parameters outside the graph (DDP would hang)"
        assert all(torch.count_nonzero(g) == 0 for g in grads), f"{name} got a nonzero gradient"
    assert torch.count_nonzero(model.layers["0"].attention.wq.weight.grad) > 0


def test_images_without_targets_train_projector_not_head():
    model = _model()
    tokens, labels, vt, vp, _ = _batch()
    out = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp,
                visual_target_mask=torch.zeros(len(vp), dtype=torch.bool))
    assert torch.isfinite(out.loss) and out.visual_loss.item() == 0.0
    out.loss.backward()
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in _grads(model.visual_head))
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in _grads(model.projector))
    # visual_target_mask=None means the same as all False.
    none_mask = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp)
    torch.testing.assert_close(none_mask.loss, out.loss)


def test_visual_targets_are_detached():
    # Unit level: the loss function never sends a gradient into the target.
    pred = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    loss = visual_cosine_loss_sum(pred, target)
    loss.backward()
    assert target.grad is None and pred.grad is not None
    torch.testing.assert_close(loss, (1 - F.cosine_similarity(pred, target, dim=-1)).sum())
    assert visual_cosine_loss_sum(torch.zeros(0, 8), torch.zeros(0, 8)).item() == 0.0

    # Model level: visual_tokens are both inputs (through the projector) and targets. The gradient of the visual
    # loss w.r.t. them must equal that of a reference whose targets are explicitly detached.
    model = _model()
    tokens, labels, vt, vp, vmask = _batch()
    vt = vt.requires_grad_(True)
    out = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask)
    (got,) = torch.autograd.grad(out.visual_loss, vt)
    hidden = model(tokens, visual_tokens=vt, visual_positions=vp).reshape(B * S, -1)
    pred = model.visual_head(hidden[vp[vmask] - 1])
    ref = (1 - F.cosine_similarity(pred, vt[vmask].detach(), dim=-1)).mean()
    (want,) = torch.autograd.grad(ref, vt)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    # The last response slot (S + 7) is never an input to an earlier prediction: its gradient is exactly zero.
    assert torch.count_nonzero(got[-1]) == 0


@pytest.mark.parametrize("coef", [0.0, 2.0])
def test_visual_loss_coefficient(coef):
    model = _model(coef=coef)
    tokens, labels, vt, vp, vmask = _batch()
    out = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask)
    torch.testing.assert_close(out.loss, out.lm_loss + coef * out.visual_loss)
    assert out.visual_loss > 0


def test_all_labels_ignored_is_finite():
    model = _model()
    tokens, *_ = _batch()
    out = model(tokens, labels=torch.full((B, S), IGNORE_INDEX))
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0 and int(out.lm_tokens) == 0


def test_frozen_head_measures_the_visual_loss_without_any_gradient():
    """Stage 1 (head frozen): the visual loss has its exact value, but the gradients are the text loss's alone."""
    model = _model(coef=0.5)
    tokens, labels, vt, vp, vmask = _batch()
    learning = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask)
    assert learning.visual_loss_sum.requires_grad and model.visual_loss_learns()
    model.visual_head.requires_grad_(False)
    assert not model.visual_loss_learns()
    measured = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask)
    assert torch.equal(measured.visual_loss_sum, learning.visual_loss_sum.detach()) and measured.visual_loss > 0.5
    assert not measured.visual_loss_sum.requires_grad
    measured.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask).lm_loss.backward()
    assert all(torch.equal(got[n], p.grad) for n, p in model.named_parameters() if p.requires_grad)
    # The explicit switch overrides the default either way.
    model.visual_loss_grad = True
    forced = model(tokens, labels=labels, visual_tokens=vt, visual_positions=vp, visual_target_mask=vmask)
    assert forced.visual_loss_sum.requires_grad
