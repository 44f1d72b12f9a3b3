"""Knowledge distillation: the loss's invariants, teacher initialization, feature matching, and one cached training."""
import copy
import functools
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdit import techniques
from fastdit.diffusion import create_diffusion
from fastdit.models import create_model
from fastdit.profiles import get_profile
from fastdit.techniques.distillation import (Distill, DistillLoss, Student, block_map, drop_labels, init_from_teacher,
                                             pool_tokens)
from fastdit.train import diffusion_loss


def _batch(model, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g).clamp(-1, 1)
    t = torch.randint(0, 1000, (n,), generator=g)
    labels = torch.randint(0, model.num_classes, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, labels, noise


@pytest.fixture
def pair(tiny_dit):
    """A frozen teacher (depth 4, width 256, patch 2) and a train-mode student (depth 2, width 96 at patch 4)."""
    teacher = tiny_dit("DiT-XS/2", depth=4, seed=1).requires_grad_(False)
    student = tiny_dit("DiT-XS/4", hidden_size=96, num_heads=3, depth=2, seed=2).train()
    return teacher, student


def _loss(fn, model, x0, t, labels, noise, seed=0):
    torch.manual_seed(seed)  # what the training loop does before each step's loss: label dropout draws from it
    return fn(model, create_diffusion(None), x0, t, labels, noise)


def test_alpha_zero_is_exactly_the_diffusion_loss_with_the_same_label_dropout(pair, one_thread):
    teacher, student = pair
    batch = _batch(student, n=64)
    for seed in range(3):  # p = 0.1 of 64 labels: some are dropped, and must be dropped identically
        plain = _loss(diffusion_loss, student, *batch, seed=seed)
        ours = _loss(DistillLoss(teacher, 0.0), student, *batch, seed=seed)
        assert ours.item() == plain.item()


def test_a_student_identical_to_the_teacher_has_zero_distillation_loss(tiny_dit, one_thread):
    teacher = tiny_dit("DiT-XS/2", depth=3, seed=3).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()  # train mode: label dropout is live
    batch = _batch(teacher, n=64)
    for mode, target in (("output", "eps"), ("output", "all"), ("feature", "eps")):
        assert _loss(DistillLoss(teacher, 1.0, mode, target), student, *batch).item() == 0.0
    # ... with some labels of that batch dropped to the null class (seed 0), which both networks then saw.
    torch.manual_seed(0)
    assert (drop_labels(student, batch[2]) != batch[2]).any()


def test_the_teacher_gets_no_gradient_and_the_student_does(pair, one_thread):
    teacher, student = pair
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for mode, target in (("output", "eps"), ("output", "all"), ("feature", "eps")):
        model = Student(student, torch.nn.ModuleList([torch.nn.Linear(96, 256) for _ in student.blocks])
                        if mode == "feature" else None)
        loss = _loss(DistillLoss(teacher, 0.5, mode, target, len(student.blocks)), model, *_batch(student))
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert student.final_layer.linear.weight.grad.abs().sum() > 0
        if mode == "feature":
            assert model.projections[0].weight.grad.abs().sum() > 0
        student.zero_grad(set_to_none=True)
    for k, v in teacher.state_dict().items():
        assert v.equal(before[k])
    with pytest.raises(ValueError, match="frozen and in eval mode"):
        DistillLoss(copy.deepcopy(teacher).train(), 0.5)


@settings(max_examples=20, deadline=None)
@given(t=st.integers(0, 999), alpha=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
       mode=st.sampled_from(["output", "feature"]), target=st.sampled_from(["eps", "all"]))
def test_the_loss_is_finite_for_any_timestep(t, alpha, mode, target):
    teacher, student = _finite_pair()
    x0, _, labels, noise = _batch(teacher, n=4)
    loss = _loss(DistillLoss(teacher, alpha, mode, target, 2), student, x0, torch.full((4,), t), labels, noise)
    assert torch.isfinite(loss)


@functools.cache
def _finite_pair():
    teacher = perturb(_tiny("DiT-XS/2", 3, hidden_size=64, num_heads=2), seed=4).eval().requires_grad_(False)
    student = Student(perturb(_tiny("DiT-XS/4", 2, hidden_size=96, num_heads=3), seed=5).train(),
                      torch.nn.ModuleList([torch.nn.Linear(96, 64) for _ in range(2)]))
    return teacher, student


def _tiny(variant, depth, **overrides):
    return create_model(variant, input_size=8, in_channels=1, num_classes=10, depth=depth, **overrides)


def perturb(model, seed):
    """Seeded noise in every trainable weight: a fresh DiT outputs exactly 0 (adaLN-Zero), which would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_block_map_aligns_relative_depth():
    assert block_map(3, 6) == [1, 3, 5]
    assert block_map(6, 6) == list(range(6))
    assert block_map(2, 6) == [2, 5]


def test_pooling_tokens_averages_each_coarse_patch():
    h = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, row-major, one channel
    pooled = pool_tokens(h, 2)
    assert pooled.flatten().tolist() == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4,
                                         (10 + 11 + 14 + 15) / 4]
    with pytest.raises(ValueError, match="cannot pool a 4x4 token grid to 3x3"):
        pool_tokens(h, 3)


def test_teacher_init_copies_the_matched_blocks_and_what_fits(tiny_dit):
    teacher = tiny_dit("DiT-XS/2", depth=4, seed=6)
    pruned = _tiny("DiT-XS/2", 2)  # a depth-pruned teacher: blocks 1 and 3
    copied = init_from_teacher(pruned, teacher)
    assert pruned.blocks[0].attn.qkv.weight.equal(teacher.blocks[1].attn.qkv.weight)
    assert pruned.blocks[1].mlp.fc2.weight.equal(teacher.blocks[3].mlp.fc2.weight)
    assert pruned.final_layer.linear.weight.equal(teacher.final_layer.linear.weight)
    assert len(copied) == len(pruned.state_dict())
    repatched = _tiny("DiT-XS/4", 4)  # another patch: body and embedders copied, patch embedding and output not
    copied = init_from_teacher(repatched, teacher)
    assert repatched.blocks[2].adaLN_modulation[-1].weight.equal(teacher.blocks[2].adaLN_modulation[-1].weight)
    assert "x_embedder.proj.weight" not in copied and "final_layer.linear.weight" not in copied
    assert "t_embedder.mlp.0.weight" in copied and "final_layer.adaLN_modulation.1.weight" in copied
    with pytest.raises(ValueError, match="use init='random'"):
        init_from_teacher(_tiny("DiT-XS/2", 2, hidden_size=96, num_heads=3), teacher)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=1.5), "must lie in"), (dict(mode="logits"), "mode='logits'; use one of output, feature"),
    (dict(target="v"), "target='v'"), (dict(init="pruned"), "init='pruned'"), (dict(steps=0), "steps must be"),
])
def test_bad_settings_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distill(**kwargs)


def test_ids_and_parsing():
    d = Distill(student="DiT-mXS/2", alpha=0.25)
    assert d.id == "distill[student=DiT-mXS/2,alpha=0.25,mode=output,target=eps,init=random,depth=0,steps=300,seed=0]"
    assert techniques.parse("distill:student=DiT-mXS/2,alpha=0.25") == [d]


def test_apply_trains_once_through_the_cache_and_controls_share_an_entry(tmp_path, monkeypatch, tiny_dit, one_thread):
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
    profile = replace(get_profile("cpu"), dataset="digits", image_size=8, variants=("DiT-mXS/4",),
                      train=dict(steps=3, batch_size=16, lr=1e-3, ema_decay=0.99, seed=0))
    context = techniques.Context(profile=profile)
    teacher = tiny_dit("DiT-mXS/4", depth=2, seed=7)
    small = dict(student="DiT-mXS/4", depth=1, steps=3)
    with pytest.raises(ValueError, match="needs a Context with a profile"):
        Distill(**small).apply(teacher)
    student = techniques.apply(teacher, Distill(**small, alpha=0.5, init="teacher"), context)
    assert student.distillation["source"] == "trained" and len(student.blocks) == 1 and not student.training
    assert not any(isinstance(m, Student) for m in student.modules())
    again = techniques.apply(teacher, Distill(**small, alpha=0.5, init="teacher"), context)
    assert again.distillation["source"] == "cache"
    assert all(p.equal(q) for p, q in zip(student.parameters(), again.parameters()))
    assert teacher.blocks[0].attn.qkv.weight.requires_grad  # the caller's model is not frozen: apply copies it
    control = techniques.apply(teacher, Distill(**small, alpha=0.0), context)
    feature_control = techniques.apply(teacher, Distill(**small, alpha=0.0, mode="feature"), context)
    assert control.distillation["key"] == feature_control.distillation["key"]
    assert feature_control.distillation["source"] == "cache"
    distilled = techniques.apply(teacher, Distill(**small, alpha=0.5), context)
    assert distilled.distillation["key"] != control.distillation["key"]
    assert not all(p.equal(q) for p, q in zip(distilled.parameters(), control.parameters()))


def test_feature_distillation_across_widths_needs_projections(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="needs a Student with projections"):
        _loss(DistillLoss(teacher, 0.5, "feature", student_depth=2), student, *_batch(student))
