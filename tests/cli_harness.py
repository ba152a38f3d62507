"""Running the command lines as a user does (a subprocess per command) and checking what they left on disk.

`run_cli` runs a console entry point (`python -m megalodon_jax.<module>` or train.py) with the repository on
PYTHONPATH and returns its exit status, stdout and stderr lines. `tree_digest` hashes every file under a folder
(relative path -> SHA-256 of its bytes, folders included as entries), so a test can assert that a refused command
changed nothing on disk: `assert tree_digest(root) == before`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str

  @property
  def stderr_lines(self) -> list[str]:
    return [line for line in self.stderr.splitlines() if line.strip()]

  def one_error_line(self) -> str:
    """The single `error: ...` line a refused command prints; fails the test (showing stderr) otherwise."""
    lines = self.stderr_lines
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{self.stderr[-3000:]}"
    return lines[0]


def env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  out = dict(os.environ)
  out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
  out.update(extra or {})
  return out


def train_command(*args: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, "train.py"), *args]


def module_command(module: str, *args: str) -> list[str]:
  """`python -m megalodon_jax.<module> ...` (the console scripts run the same `main`)."""
  return [sys.executable, "-m", f"megalodon_jax.{module}", *args]


def run_cli(cmd: Sequence[str], *, cwd: str = REPO, timeout: float = 600,
            extra_env: Optional[Mapping[str, str]] = None) -> Result:
  proc = subprocess.run(list(cmd), cwd=cwd, env=env(extra_env), capture_output=True, text=True, timeout=timeout,
                        check=False)
  return Result(proc.returncode, proc.stdout, proc.stderr)


def tree_digest(root: str) -> dict[str, str]:
  """{relative path: sha256 of the file's bytes, or "dir" for a folder} for everything under `root` ({} if absent)."""
  out: dict[str, str] = {}
  if not os.path.exists(root):
    return out
  for folder, dirs, files in os.walk(root):
    for d in dirs:
      out[os.path.relpath(os.path.join(folder, d), root)] = "dir"
    for f in files:
      path = os.path.join(folder, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300.0) -> None:
  """Polls `predicate` until it holds; fails the test if `proc` exits first (showing its stderr) or on timeout."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"the command exited early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
    time.sleep(0.05)
  raise AssertionError("timed out")
