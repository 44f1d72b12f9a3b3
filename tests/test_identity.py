"""The training code's identity: what the training path imports, hashed by what it does."""
import shutil

import pytest

from fastdit import identity


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A copy of fastdit's sources to edit; the identity reads it instead of the installed package."""
    copy = tmp_path / "fastdit"
    shutil.copytree(identity.PACKAGE, copy, ignore=shutil.ignore_patterns("*.pt", "*.gz", "*.npz", "__pycache__"))
    monkeypatch.setattr(identity, "PACKAGE", copy)
    identity._parsed.cache_clear()
    yield copy
    identity._parsed.cache_clear()


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_the_training_path_is_the_loop_data_models_and_diffusion_not_the_harness():
    modules = identity.closure(identity.TRAINING_ROOTS)
    for needed in ("fastdit.train", "fastdit.diffusion", "fastdit.data", "fastdit.models.dit",
                   "fastdit.models.attention", "fastdit.models.checkpoint"):
        assert needed in modules
    for unrelated in ("fastdit.harness.gate", "fastdit.harness.report", "fastdit.cli", "fastdit.sampling",
                      "fastdit.metrics.quality"):
        assert unrelated not in modules
    technique = identity.closure(identity.TRAINING_ROOTS + ("fastdit.techniques.distillation",))
    assert "fastdit.techniques.distillation" in technique and "fastdit.zoo" in technique
    assert not any(m.startswith("fastdit.harness") for m in technique)


def test_code_edits_change_the_identity_and_name_the_module_comments_and_docstrings_do_not(package):
    before = identity.training_code("fastdit.techniques.distillation")
    _edit(package / "diffusion.py", '"""', '"""A docstring edit. ', )
    _edit(package / "train.py", "import copy\n", "import copy  # a comment\n")
    _edit(package / "harness" / "report.py", "import json\n", "import json\nUNRELATED = 1\n")
    identity._parsed.cache_clear()
    assert identity.training_code("fastdit.techniques.distillation") == before
    _edit(package / "diffusion.py", "return np.linspace", "return 1.0 * np.linspace")
    identity._parsed.cache_clear()
    after = identity.training_code("fastdit.techniques.distillation")
    assert after["identity"] != before["identity"]
    assert identity.changed_modules(before["modules"], after["modules"]) == ["fastdit/diffusion.py"]
    # The technique's own module is part of its training code, and only of its own and the techniques' that import
    # it: the zoo's reference models do not depend on it.
    zoo_before = identity.training_code()
    _edit(package / "techniques" / "distillation.py", "def ", "def _added():\n    return 1\n\n\ndef ")
    identity._parsed.cache_clear()
    assert identity.training_code()["identity"] == zoo_before["identity"]
    assert identity.training_code("fastdit.techniques.distillation")["identity"] != after["identity"]
