"""The base revision a run is compared against (`--compare-to REV`, `--compare-to-path DIR`) and its worker.

The base's source tree is a git worktree of REV in a temporary directory (removed at the end of the run), or a tree
CI already checked out. Each pytest process starts one worker process (fastdit/harness/worker.py) that imports the
base's fastdit; the Bench times the head's callable and the worker's in turns, round by round, so that drift and a
neighbour's load hit both alike (asv continuous and CodSpeed measure base and head in one job for the same reason).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..metrics.cost import SelfTimed

WORKER = Path(__file__).with_name("worker.py")


class CompareError(Exception):
    """The base cannot be set up at all (unknown revision, not a git repository, not a fastdit tree)."""


def checkout(repo, rev):
    """A detached git worktree of `rev` in a new temporary directory: (its path, the full SHA)."""
    def git(*args, cwd=repo):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    found = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode:
        if git("rev-parse", "--git-dir").returncode:
            raise CompareError(f"--compare-to {rev}: {repo} is not a git repository; check the base out yourself "
                               "and pass --compare-to-path DIR")
        shallow = git("rev-parse", "--is-shallow-repository").stdout.strip() == "true"
        raise CompareError(f"--compare-to {rev}: no such revision in {repo}"
                           + ("; the clone is shallow: fetch the history (actions/checkout with fetch-depth: 0, "
                              "or `git fetch --unshallow`)" if shallow else ""))
    sha = found.stdout.strip()
    path = Path(tempfile.mkdtemp(prefix="fastdit-base-")) / "tree"
    made = git("worktree", "add", "--detach", str(path), sha)
    if made.returncode:
        raise CompareError(f"--compare-to {rev}: git worktree add failed: {made.stderr.strip()}")
    return path, sha


def remove_checkout(repo, path):
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=repo, capture_output=True)
    shutil.rmtree(Path(path).parent, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def check_tree(root):
    root = Path(root)
    if not (root / "fastdit" / "__init__.py").is_file():
        raise CompareError(f"the base tree {root} has no fastdit package (fastdit/__init__.py); pass the root of a "
                           "fastdit checkout")
    return root


class BaseUnavailable(Exception):
    """What the head measured cannot be measured in the base: kind "new" (new in head), "error" (base cannot
    build)."""

    def __init__(self, kind, reason):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class Worker:
    """The process that runs the base's code, started on first use; answers one request at a time."""

    def __init__(self, root, label, scratch):
        self.root, self.label, self.scratch = Path(root), label, Path(scratch)
        self.process = None
        self.log = self.scratch / f"worker-{os.getpid()}.log"
        self.dead = None  # why the worker is unusable, once it is

    def _start(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.root)] + [p for p in os.environ.get(
            "PYTHONPATH", "").split(os.pathsep) if p]))
        with self.log.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([sys.executable, str(WORKER), str(self.root)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=self.root)
        hello = self.request(op="hello")
        if not hello.get("ok"):
            self.dead = hello.get("error")
            raise BaseUnavailable("error", self.dead)

    def request(self, **message):
        if self.dead:
            raise BaseUnavailable("error", self.dead)
        if self.process is None:
            self._start()
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log.exists() else []
            self.dead = "the base worker exited: " + (" | ".join(tail) or "no output")
            raise BaseUnavailable("error", self.dead)
        return json.loads(line)

    def build(self, spec):
        """Build `spec` in the base; returns (its key, whose weights it carries)."""
        key = json.dumps(spec, sort_keys=True)
        reply = self.request(op="build", key=key, spec=spec)
        if not reply.get("ok"):
            raise BaseUnavailable(reply.get("kind", "error"), reply["error"])
        return key, reply["note"]

    def timer(self, key):
        """The base's call as a variant of cost.time_interleaved: timed inside the worker, so the pipe is not."""
        def run():
            reply = self.request(op="time", key=key)
            if not reply.get("ok"):
                raise BaseUnavailable("error", reply["error"])
            return reply["seconds"]
        return SelfTimed(run)

    def peak(self, key):
        reply = self.request(op="peak", key=key)
        if not reply.get("ok"):
            raise BaseUnavailable("error", reply["error"])
        return reply["bytes"]

    def restart(self):
        """A new worker process (the next request starts it): its builds land elsewhere in memory."""
        self.close()
        self.dead = None

    def close(self):
        if self.process and self.process.poll() is None:
            try:
                self.request(op="quit")
            except BaseUnavailable:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.process.stdin.close()
            self.process.stdout.close()
        self.process = None
