"""Knowledge distillation: students trained beside a frozen teacher, against the same student trained alone.

Every student trains for the same budget (STEPS steps of the profile's recipe: batch 64, AdamW 1e-3, seed 0) on the
same data, and alpha = 0 is the control: the plain diffusion loss, no teacher. Pairs at cpu scale mirror the paper's:

    DiT-mS/4 -> DiT-mXS/4   narrower and shallower, same patch (S -> XS): the quick tier's representative pair, and
                            in the full tier the alpha sweep, the all-output target, feature distillation and a
                            second training seed (the cheapest pair to train on a CPU)
    DiT-mS/2 -> DiT-mXS/2   the paper's own pair, at the paper's alpha 0.5, against its control
    DiT-mS/2 -> DiT-mS/4    same size, coarser patch (the paper's future work), random or teacher-initialized body
    DiT-mS/2 -> DiT-mS/2 at depth 3, teacher-initialized: the depth-pruned teacher

Rows: the teacher's quality; each student's FID/sFID/KID/precision/recall, its size and GMACs, its forward speedup over
the teacher, and (informational) its FID minus its control's. A difference is only meaningful beyond the calibrated
seed-to-seed noise stored with the baselines (and training-seed noise, which is larger, is not removed by it).
On a profile of the paper's variants (gpu, paper) every pair runs at that scale (DiT-S/4 -> DiT-XS/4, ...), under
the same test ids.
"""
import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdit.diffusion import create_diffusion
from fastdit.harness import tiered
from fastdit.techniques import stack_id
from fastdit.techniques.distillation import Distill, DistillLoss, Student
from fastdit.train import diffusion_loss

STEPS = 300
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TEACHERS = {"DiT-mXS/4": "DiT-mS/4", "DiT-mXS/2": "DiT-mS/2", "DiT-mS/4": "DiT-mS/2", "DiT-mS/2": "DiT-mS/2"}

SETTINGS = [
    # quick tier: the representative pair, control and the paper's alpha
    Distill("DiT-mXS/4", alpha=0.0, steps=STEPS),
    Distill("DiT-mXS/4", alpha=0.5, steps=STEPS),
    # ... and, on this cheapest pair: the rest of the alpha sweep, the paper's all-output target, feature
    # distillation, and the control and alpha 0.5 again with another training seed (training-seed noise)
    *[Distill("DiT-mXS/4", alpha=a, steps=STEPS) for a in ALPHAS if a not in (0.0, 0.5)],
    Distill("DiT-mXS/4", alpha=0.5, target="all", steps=STEPS),
    Distill("DiT-mXS/4", alpha=0.5, mode="feature", steps=STEPS),
    Distill("DiT-mXS/4", alpha=0.0, steps=STEPS, seed=1),
    Distill("DiT-mXS/4", alpha=0.5, steps=STEPS, seed=1),
    # S/2 -> XS/2: the paper's own pair and alpha, against its control
    Distill("DiT-mXS/2", alpha=0.0, steps=STEPS),
    Distill("DiT-mXS/2", alpha=0.5, steps=STEPS),
    # S/2 -> S/4: random init and the teacher's body (embedders and blocks copied, new patch embedding and output)
    Distill("DiT-mS/4", alpha=0.0, steps=STEPS),
    Distill("DiT-mS/4", alpha=0.5, steps=STEPS),
    Distill("DiT-mS/4", alpha=0.0, init="teacher", steps=STEPS),
    Distill("DiT-mS/4", alpha=0.5, init="teacher", steps=STEPS),
    # the depth-pruned teacher (blocks 1, 3, 5 of 6)
    Distill("DiT-mS/2", alpha=0.0, init="teacher", depth=3, steps=STEPS),
    Distill("DiT-mS/2", alpha=0.5, init="teacher", depth=3, steps=STEPS),
]
QUICK = [stack_id(s) for s in SETTINGS[:2]]
# Full tier only: in the quick tier, test_reference.py's quality row of DiT-mS/4 is the same figure.
TEACHER_ROWS = tiered(["DiT-mS/4", "DiT-mS/2"], quick=())

_QUALITY = {}  # (teacher, setting id) -> quality measurements, so a distilled row can cite its control's


def _control(setting):
    """The same student, init, depth, budget and seed, trained with the plain diffusion loss."""
    return Distill(setting.student, alpha=0.0, init=setting.init, depth=setting.depth, steps=setting.steps,
                   seed=setting.seed)


def _on_profile(bench, setting):
    """(teacher variant, setting) at the profile's scale: the pair itself on the cpu profile; on a profile of the
    paper's variants (gpu, paper) the same pair at that scale, DiT-mS/4 -> DiT-mXS/4 becoming DiT-S/4 -> DiT-XS/4."""
    teacher = TEACHERS[setting.student]
    if teacher in bench.profile.variants:
        return teacher, setting
    paper = _paper_scale(teacher)
    if paper not in bench.profile.variants:
        pytest.skip(f"the {bench.profile.name!r} profile has neither {teacher} nor {paper}, this pair's teacher")
    return paper, dataclasses.replace(setting, student=_paper_scale(setting.student))


def _paper_scale(name):
    return name.replace("DiT-m", "DiT-", 1)


def _teacher(bench, name):
    """A teacher row's variant at the profile's scale (see _on_profile)."""
    if name in bench.profile.variants:
        return name
    if _paper_scale(name) not in bench.profile.variants:
        pytest.skip(f"the {bench.profile.name!r} profile has neither {name} nor {_paper_scale(name)}")
    return _paper_scale(name)


def _student(bench, setting):
    teacher_variant, setting = _on_profile(bench, setting)
    teacher = bench.reference_model(teacher_variant)
    return teacher, bench.apply(teacher, setting, teacher_variant)


def _quality(bench, setting):
    teacher_variant, scaled = _on_profile(bench, setting)
    key = stack_id(scaled)
    if key not in _QUALITY:
        _, student = _student(bench, setting)
        _QUALITY[key] = bench.quality(student, bench.protocol(teacher_variant, scaled, student=scaled.student))
    return _QUALITY[key]


@pytest.mark.parametrize("teacher", TEACHER_ROWS)
def test_teacher(bench, teacher):
    """The teacher's quality under this module's protocol (the same figure as the reference zoo's row)."""
    teacher = _teacher(bench, teacher)
    bench.check(bench.quality(bench.reference_model(teacher), bench.protocol(teacher, role="teacher")))


def test_distill(bench, setting):
    """Quality, size and speed of a student trained for STEPS steps; distilled rows also report FID - control FID."""
    teacher_variant, scaled = _on_profile(bench, setting)
    teacher, student = _student(bench, setting)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    protocol = bench.protocol(teacher_variant, scaled, student=scaled.student)
    quality = _quality(bench, setting)
    measurements = list(quality)
    control = _control(setting)
    if control != setting:
        # Informational: negative = distillation beat plain training of the same student at equal budget.
        measurements.append(bench.against_control(quality, _quality(bench, control)))
    batch = bench.profile.throughput_batch_sizes[-1]
    measurements += bench.cost(student, protocol, batch_size=batch)
    measurements += bench.speedup(teacher, student, protocol, batch_size=batch)
    bench.check(measurements, train=getattr(student, "distillation", None))


# ------------------------------------------------------------------------------------------------ invariants

_PAIR = {}


def _pair(bench):
    """The quick pair's real teacher (frozen) and its student at initialization (train mode), built once."""
    if not _PAIR:
        setting = Distill("DiT-mXS/4", mode="feature")
        teacher_variant, setting = _on_profile(bench, setting)
        teacher = bench.reference_model(teacher_variant, device="cpu").eval().requires_grad_(False)
        student = setting.make_student(teacher).train()  # with its projections
        torch.manual_seed(0)
        with torch.no_grad():  # a trained-looking student: the fresh one outputs exactly 0 (adaLN-Zero)
            for p in student.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        twin = Student(copy.deepcopy(teacher).requires_grad_(True).train())
        _PAIR.update(teacher=teacher, student=student, twin=twin)
    return _PAIR["teacher"], _PAIR["student"], _PAIR["twin"]


def _loss(fn, model, t, seed):
    g = torch.Generator().manual_seed(seed)
    net = getattr(model, "net", model)  # the student wraps its network
    x0 = torch.rand(8, net.in_channels, net.input_size, net.input_size, generator=g) * 2 - 1
    labels = torch.randint(0, net.num_classes, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.manual_seed(seed)  # as the training loop does before each loss: label dropout draws from the global RNG
    return fn(model, create_diffusion(None), x0, torch.full((8,), t), labels, noise)


@settings(max_examples=20, deadline=None)
@given(t=st.integers(0, 999), alpha=st.sampled_from(ALPHAS), mode=st.sampled_from(["output", "feature"]),
       target=st.sampled_from(["eps", "all"]), seed=st.integers(0, 2 ** 16))
def test_distillation_invariants(bench_session, t, alpha, mode, target, seed):
    """On the quick pair's real teacher: alpha 0 is exactly the diffusion loss (label dropout included), the loss is
    finite for any timestep, only the student gets gradients, and a student identical to the teacher scores 0."""
    teacher, student, twin = _pair(bench_session)
    loss = _loss(DistillLoss(teacher, alpha, mode, target, len(student.net.blocks)), student, t, seed)
    assert torch.isfinite(loss)
    if alpha == 0:
        assert loss.item() == _loss(diffusion_loss, student, t, seed).item()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    student.zero_grad(set_to_none=True)
    assert _loss(DistillLoss(teacher, 1.0, mode, target), twin, t, seed).item() == 0.0
