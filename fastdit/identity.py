"""Code identity: what fastdit code a trained model depends on, hashed by what that code does.

A trained model is a function of its TrainConfig, its data and the code that trains it. That code is every fastdit
module the training path imports, followed through their imports at any depth (imports inside functions too, and the
package __init__ files Python runs on the way). Each module is hashed as its syntax tree without docstrings, so an
edit that changes what the code does changes the identity, while a comment, a docstring, or a change to a module the
training path never imports (the report, the CLI, the gate, the sampler) does not.

    code = training_code("fastdit.techniques.distillation")
    code["identity"]    # one hash for the cache key
    code["modules"]     # {"fastdit/train.py": hash, ...}: what changed, when it changed
"""
import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# The training loop and the data it reads are on every training path; the caller adds its own module (a technique's,
# which brings the model definitions and the diffusion with its imports).
TRAINING_ROOTS = ("fastdit.train", "fastdit.data")


def _path(module):
    """fastdit.a.b -> fastdit/a/b.py or fastdit/a/b/__init__.py; None for what is not a fastdit module."""
    parts = module.split(".")
    if parts[0] != "fastdit":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _strip_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _dump(node):
    """The tree as text, without line numbers and without empty fields: Python releases add fields that are empty
    in code written for older ones (3.12's type_params), and ast.dump would print them, changing every hash."""
    if isinstance(node, ast.AST):
        fields = ",".join(f"{k}={_dump(v)}" for k, v in ast.iter_fields(node) if v is not None and v != [])
        return f"{type(node).__name__}({fields})"
    if isinstance(node, list):
        return "[" + ",".join(_dump(v) for v in node) + "]"
    return repr(node)


@lru_cache(maxsize=None)
def _parsed(path):
    """(hash of what the module does, the fastdit modules it imports) of one source file."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    digest = hashlib.sha256(_dump(_strip_docstrings(tree)).encode()).hexdigest()[:16]
    return digest, tuple(sorted(_imports(tree, _module_name(Path(path)))))


def _module_name(path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(tree, module):
    """The fastdit modules `module` imports anywhere in its source: absolute and relative, `from X import name`
    where name is itself a module included."""
    package = module if _path(module) and _path(module).name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if _path(name)}


def _parents(module):
    """The packages Python imports before `module`: fastdit.a.b -> fastdit, fastdit.a."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(roots):
    """Every fastdit module that importing `roots` runs, sorted."""
    seen, todo = set(), [r for r in roots if _path(r)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [m for m in list(_parsed(_path(module))[1]) + _parents(module) if m not in seen and _path(m)]
    return sorted(seen)


def code_identity(roots):
    """{"identity": hash, "modules": {relative path: hash}} of the code that importing `roots` runs."""
    modules = {str(_path(m).relative_to(PACKAGE.parent)): _parsed(_path(m))[0] for m in closure(roots)}
    blob = "\n".join(f"{k} {v}" for k, v in sorted(modules.items()))
    return dict(identity=hashlib.sha256(blob.encode()).hexdigest()[:16], modules=modules)


def training_code(*modules):
    """The identity of the training path: the training loop, the data, and `modules` (the technique that trains)."""
    return code_identity(tuple(TRAINING_ROOTS) + tuple(m for m in modules if m and m.startswith("fastdit")))


def changed_modules(old, new):
    """The module paths whose code differs between two code_identity()["modules"] dicts (added, removed, edited)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
