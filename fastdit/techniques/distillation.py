"""Knowledge distillation: a smaller DiT (the student) trained with a frozen trained DiT (the teacher) beside it.

    loss = (1 - alpha) * L_diffusion(student) + alpha * L_distill(student, teacher)

L_diffusion is DiT's training loss (epsilon MSE + variational bound). L_distill has two modes:

    output   MSE between the two networks' outputs on the same noised input x_t, timestep t and label y: on the
             epsilon channels (target="eps", what DDIM and DDPM means use) or on every output channel (target="all",
             epsilon and the variance value v, as arXiv 2509.17894's code did).
    feature  student block j's output, through a learned linear projection when the widths differ, against the
             output of teacher block m(j) at the same relative depth; token grids of different patch sizes are
             average-pooled to the coarser grid. Each block's MSE is divided by the teacher features' mean square,
             so that the term is scale-free and a student that outputs nothing scores 1 per block.

alpha = 0 is the control: the same student, data, seed and steps with the plain diffusion loss (the paper never ran
it). What the paper's code got wrong and this does not (its section 5.3): the distillation term saw the clean
x_0 instead of x_t; the student's label dropout gave the two networks different labels for ~10 % of samples; the
student ran a second forward for the term. Here the student runs once: its output serves both terms; the teacher
runs in eval mode without gradient on exactly the x_t, t and (dropped) labels the student saw.

The student starts from random weights (init="random"), or from the teacher's weights where the shapes allow
(init="teacher"): every block j of the student copies teacher block m(j), so a student of the teacher's width and a
smaller depth is a depth-pruned teacher (as in recent DiT compression work); embedders and the final layer are
copied when their shapes match (a different patch size keeps a fresh patch embedding and output projection).

`Distill(...).apply(teacher, context)` returns the trained student (EMA weights, eval mode). Training goes through
Context.finetune with the profile's recipe: a warm run loads the cached student instead of training it again.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import create_model
from .base import Context, Technique, register_technique

MODES = ("output", "feature")
TARGETS = ("eps", "all")
INITS = ("random", "teacher")


# ----------------------------------------------------------------------------------------------- pieces


def block_map(student_depth, teacher_depth):
    """Teacher block matched to each student block: the one at the same relative depth, last aligned with last.

    6 -> 3 gives [1, 3, 5]; equal depths give the identity."""
    return [round((j + 1) * teacher_depth / student_depth) - 1 for j in range(student_depth)]


def drop_labels(net, labels):
    """The labels `net`'s embedder would use in this forward: in train mode, each is replaced by the null class with
    the embedder's dropout probability. The draw is the one the embedder itself makes (torch.rand from the global
    RNG, which the training loop seeds per step), so applying it here changes no training step."""
    embedder = net.y_embedder
    if not (net.training and embedder.dropout_prob > 0):
        return labels
    drop = torch.rand(labels.shape[0], device=labels.device) < embedder.dropout_prob        # (N,)
    return torch.where(drop, embedder.num_classes, labels)


@contextlib.contextmanager
def labels_as_given(net):
    """Turn off the embedder's own label dropout for a forward whose labels were already dropped by drop_labels."""
    was = net.y_embedder.training
    net.y_embedder.training = False
    try:
        yield
    finally:
        net.y_embedder.training = was


@contextlib.contextmanager
def block_outputs(net, indices):
    """Record the outputs (N, T, D) of net.blocks[i] for i in `indices` during the forwards inside the block."""
    out = {}
    handles = [net.blocks[i].register_forward_hook(lambda module, args, result, i=i: out.__setitem__(i, result))
               for i in indices]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def pool_tokens(h, grid):
    """Average-pool tokens (N, g*g, D) of a row-major g x g grid to (N, grid*grid, D); g must be a multiple of grid."""
    n, tokens, d = h.shape
    g = int(round(tokens ** 0.5))
    if g == grid:
        return h
    if g % grid:
        raise ValueError(f"cannot pool a {g}x{g} token grid to {grid}x{grid}: feature distillation needs patch sizes "
                         "that divide each other")
    h = h.transpose(1, 2).reshape(n, d, g, g)                                   # (N, D, g, g)
    return F.avg_pool2d(h, g // grid).flatten(2).transpose(1, 2)                # (N, grid*grid, D)


def token_grid(net):
    return net.input_size // net.patch_size


def feature_loss(student_feats, teacher_feats, projections, pairs, grid):
    """Mean over matched blocks (j, m) of MSE(P_j(h^s_j), h^t_m) / mean(h^t_m ** 2), both pooled to `grid`."""
    losses = []
    for j, m in pairs:
        s = pool_tokens(student_feats[j], grid)                                 # (N, grid^2, D_s)
        t = pool_tokens(teacher_feats[m], grid)                                 # (N, grid^2, D_t)
        if projections is not None and len(projections):
            s = projections[j](s)                                               # (N, grid^2, D_t)
        if s.shape != t.shape:
            raise ValueError(f"student block {j} gives {tuple(s.shape)} features, teacher block {m} "
                             f"{tuple(t.shape)}: across widths feature distillation needs a Student with projections "
                             "(Distill(mode='feature').make_student builds them)")
        losses.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(losses).mean()


def init_from_teacher(student, teacher):
    """Copy teacher weights into `student` where the shapes allow: block j <- teacher block block_map(j); the other
    tensors (embedders, final layer) by name when their shapes match. Returns the copied state-dict keys."""
    s_cfg, t_cfg = student.config, teacher.config
    if (s_cfg["hidden_size"], s_cfg["num_heads"], s_cfg["mlp_ratio"]) != \
            (t_cfg["hidden_size"], t_cfg["num_heads"], t_cfg["mlp_ratio"]):
        raise ValueError(f"init='teacher' copies the teacher's blocks, which needs its width, heads and MLP ratio: "
                         f"student has {s_cfg['hidden_size']}/{s_cfg['num_heads']}/{s_cfg['mlp_ratio']}, teacher "
                         f"{t_cfg['hidden_size']}/{t_cfg['num_heads']}/{t_cfg['mlp_ratio']}; use init='random' or a "
                         "student of the teacher's width (e.g. a smaller depth)")
    if len(student.blocks) > len(teacher.blocks):
        raise ValueError(f"init='teacher' needs a student no deeper than the teacher ({len(student.blocks)} > "
                         f"{len(teacher.blocks)} blocks)")
    source = teacher.state_dict()
    mapping = block_map(len(student.blocks), len(teacher.blocks))
    copied = []
    with torch.no_grad():
        for key, tensor in student.state_dict().items():
            name = key
            if key.startswith("blocks."):
                _, j, rest = key.split(".", 2)
                name = f"blocks.{mapping[int(j)]}.{rest}"
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])
                copied.append(key)
    return copied


class Student(nn.Module):
    """What train() optimizes: the student DiT and, for feature distillation across widths, the projections (which
    are trained with it and discarded afterwards). Calls go to the DiT; its checkpoints (train_cached's cache,
    resumable) hold both, under "net." and "projections.", with the DiT's config."""

    def __init__(self, net, projections=None):
        super().__init__()
        self.net = net
        self.projections = projections if projections is not None else nn.ModuleList()

    @property
    def learn_sigma(self):
        return self.net.learn_sigma

    @property
    def config(self):
        return self.net.config

    @property
    def grad_checkpointing(self):
        return self.net.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value):
        self.net.grad_checkpointing = value

    def forward(self, x, t, y):
        return self.net(x, t, y)


class DistillLoss:
    """loss_fn(model, diffusion, x0, t, labels, noise) for fastdit.train: (1 - alpha) * diffusion + alpha * distill.

    `model` is a Student (or a bare DiT when there are no projections). The teacher must be frozen and in eval mode.
    """

    def __init__(self, teacher, alpha, mode="output", target="eps", student_depth=None):
        if teacher.training or any(p.requires_grad for p in teacher.parameters()):
            raise ValueError("the teacher must be frozen and in eval mode: teacher.eval().requires_grad_(False)")
        self.teacher, self.alpha, self.mode, self.target = teacher, alpha, mode, target
        depth = student_depth or len(teacher.blocks)
        self.pairs = list(enumerate(block_map(depth, len(teacher.blocks))))

    def __call__(self, model, diffusion, x0, t, labels, noise):
        net = model.net if isinstance(model, Student) else model
        projections = model.projections if isinstance(model, Student) else None
        labels = drop_labels(net, labels)  # once, so that the teacher sees the very labels the student sees
        seen = {}

        def student_fn(x_t, t_model, y):
            seen.update(x_t=x_t, t=t_model, y=y)
            seen["out"] = model(x_t, t_model, y)                                # (N, out, H, W)
            return seen["out"]

        feature = self.mode == "feature" and self.alpha > 0
        with labels_as_given(net), block_outputs(net, [j for j, _ in self.pairs] if feature else []) as s_feats:
            diffusion_term = diffusion.training_losses(student_fn, x0, t, dict(y=labels), noise)["loss"].mean()
        if self.alpha == 0:
            return diffusion_term  # exactly the plain loss; the teacher is not even run
        with torch.no_grad(), block_outputs(self.teacher, [m for _, m in self.pairs] if feature else []) as t_feats:
            teacher_out = self.teacher(seen["x_t"], seen["t"], seen["y"])       # (N, out, H, W)
        if feature:
            grid = min(token_grid(net), token_grid(self.teacher))
            distill_term = feature_loss(s_feats, t_feats, projections, self.pairs, grid)
        else:
            channels = x0.shape[1] if self.target == "eps" else teacher_out.shape[1]
            distill_term = F.mse_loss(seen["out"][:, :channels], teacher_out[:, :channels])
        return (1 - self.alpha) * diffusion_term + self.alpha * distill_term


# ------------------------------------------------------------------------------------------- technique


@register_technique
@dataclass(frozen=True)
class Distill(Technique):
    """Train `student` (a registered variant, optionally of another `depth`) from the model it is applied to, the
    teacher, for `steps` steps of the profile's recipe; returns the student. alpha = 0 trains the control."""
    name = "distill"
    student: str = "DiT-mXS/4"
    alpha: float = 0.5
    mode: str = "output"       # "output" or "feature"
    target: str = "eps"        # output mode: "eps" channels or "all" outputs
    init: str = "random"       # "random" or "teacher" (copy the teacher's blocks where the shapes allow)
    depth: int = 0             # student depth; 0 keeps the variant's
    steps: int = 300
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must lie in [0, 1]: 0 is the plain diffusion loss, 1 distillation "
                             "alone")
        for field, value, allowed in (("mode", self.mode, MODES), ("target", self.target, TARGETS),
                                      ("init", self.init, INITS)):
            if value not in allowed:
                raise ValueError(f"distill: {field}={value!r}; use one of {', '.join(allowed)}")
        if self.steps < 1 or self.depth < 0:
            raise ValueError(f"distill: steps must be >= 1 and depth >= 0 (0: the variant's), got steps={self.steps}, "
                             f"depth={self.depth}")

    def uses_teacher(self):
        """Whether the student depends on the teacher: through the distillation term or the teacher's weights."""
        return self.alpha > 0 or self.init == "teacher"

    def spec(self, teacher):
        """What determines the trained student beyond the TrainConfig and the teacher's weights (which
        Context.finetune adds when uses_teacher()). The control (alpha 0) ignores mode and target, and with a random
        init the teacher too, so every setting that trains the same network shares one cache entry."""
        settings = self.to_dict()
        if self.alpha == 0:
            settings.update(mode="output", target="eps")
        spec = dict(settings=settings)
        if self.uses_teacher():
            spec["teacher"] = dict(config=teacher.config)
        return spec

    def make_student(self, teacher):
        """The untrained Student: seeded init (identical for every alpha), teacher weights copied if asked."""
        overrides = dict(depth=self.depth) if self.depth else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = create_model(self.student, input_size=teacher.input_size, in_channels=teacher.in_channels,
                               num_classes=teacher.num_classes, learn_sigma=teacher.learn_sigma,
                               class_dropout_prob=teacher.config["class_dropout_prob"], **overrides)
            if self.init == "teacher":
                init_from_teacher(net, teacher)
            projections = None
            width_s, width_t = net.config["hidden_size"], teacher.config["hidden_size"]
            if self.mode == "feature" and self.alpha > 0 and width_s != width_t:
                projections = nn.ModuleList([nn.Linear(width_s, width_t) for _ in net.blocks])
        return Student(net, projections)

    def apply(self, model, context=None):
        context = context or Context()
        overrides = dict(model_kwargs=dict(depth=self.depth)) if self.depth else {}
        training = dict(variant=self.student, steps=self.steps, seed=self.seed, **overrides)
        config = context.train_config(self, **training)  # checks the context before anything is built
        teacher = copy.deepcopy(model).to(context.device).eval().requires_grad_(False)
        if config.image_size != teacher.input_size:
            raise ValueError(f"the teacher takes {teacher.input_size}x{teacher.input_size} inputs but profile "
                             f"{context.profile.name!r} trains at {config.image_size}: distill a teacher of this "
                             "profile's zoo")
        student = self.make_student(teacher)
        if self.mode == "feature" and self.alpha > 0:
            grid_s, grid_t = token_grid(student.net), token_grid(teacher)
            if max(grid_s, grid_t) % min(grid_s, grid_t):
                raise ValueError(f"feature distillation pools token grids to the coarser one: {grid_s}x{grid_s} and "
                                 f"{grid_t}x{grid_t} do not divide; use mode='output'")
        loss_fn = None if self.alpha == 0 else DistillLoss(teacher, self.alpha, self.mode, self.target,
                                                           len(student.net.blocks))
        trained, info = context.finetune(self, self.spec(teacher), lambda: student,
                                         start=teacher if self.uses_teacher() else None, loss_fn=loss_fn, **training)
        net = trained.net.eval()
        net.distillation = dict(source=info["source"], key=info.get("key"), final_loss=info.get("final_loss"),
                                train_seconds=info.get("train_seconds"), steps_per_s=info.get("steps_per_s"))
        return net

    @property
    def label(self):
        words = ["alpha 0, control" if self.alpha == 0 else f"alpha {self.alpha:g}"]
        if self.alpha > 0 and self.mode == "feature":
            words.append("features")
        if self.alpha > 0 and self.mode == "output" and self.target == "all":
            words.append("all outputs")
        if self.init == "teacher":
            words.append("teacher init")
        if self.depth:
            words.append(f"depth {self.depth}")
        if self.steps != 300:
            words.append(f"{self.steps} steps")
        if self.seed:
            words.append(f"seed {self.seed}")
        return f"distilled into {self.student} ({', '.join(words)})"
