"""This project against the peer implementation (megalodon-jax from the package index, an Equinox port) on one
machine: train step (forward + backward) tokens/s and greedy generation seconds, first call and warm.

  python benchmarks/versus_peer.py                                   # the whole table, 2 alternated runs per case
  python benchmarks/versus_peer.py --revs HEAD,4efb01b --sides ours  # this checkout against an older commit
  python benchmarks/versus_peer.py --cases gen1,gen8 --runs 3        # generation only
  python benchmarks/versus_peer.py --cases train512 --sides ours --cema_impls chunked,fft   # CEMA paths in the step

The peer lives in its own virtual environment (`--peer_python`, default /tmp/peervenv/bin/python) and imports
under the same name, `megalodon_jax`: its workers run with the working directory outside any checkout and without
PYTHONPATH, and each checks that the package it imported lies under that environment. An older commit of this
project (`--revs`) is checked out with `git worktree add` into a temporary folder and put first on the worker's
sys.path, so a before/after is measured by the same script and the same worker code.

Every measurement is a fresh process (so "first call" is a real first call: tracing and compiling included, the
persistent compilation cache off), and the sides alternate run by run so that drift in the machine's load spreads
over all of them. Per process: `first_s`, the first call (train step: one forward + backward; generation: one
whole `generate`), then the median of `--repeats` warm calls. Reported figures are the medians over `--runs`
processes.

The shared config (the issue's): vocab 256, D 256, 4 layers, 2 heads, z 128, v 512, SwiGLU FFN 512, CEMA order 16,
chunk 256, 32 norm groups, float32, random init. Generation: a 1,024-token prompt (uniform random ids) and 64
greedy tokens, batch 1 and batch 8 (no stop ids). Train step: the mean next-token cross entropy of one batch and its
gradient with respect to every parameter, jitted, batch 1 at L 512 / 2,048 / 8,192 (no optimizer: both sides
compute the same thing).

Writes --out (default benchmarks/results/versus_peer_cpu.json): every process's record, the medians, the machine and
versions of both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER_PYTHON = "/tmp/peervenv/bin/python"
CONFIG = dict(vocab_size=256, model_dim=256, num_layers=4, num_heads=2, z_dim=128, value_dim=512, ffn_hidden_dim=512,
              swiglu=True, cema_ndim=16, chunk_size=256, norm_num_groups=32)
PROMPT_LEN = 1024
NEW_TOKENS = 64
# name -> (kind, batch, length): length is the prompt for generation, the sequence for the train step.
CASES = {"gen1": ("gen", 1, PROMPT_LEN), "gen8": ("gen", 8, PROMPT_LEN), "train512": ("train", 1, 512),
         "train2048": ("train", 1, 2048), "train8192": ("train", 1, 8192)}


# ------------------------------------------------------------------------------------------------------ workers
# A worker runs one case in its own process and prints one JSON line. Imports are local: the peer's worker must
# import nothing of this checkout.

def _time(fn, repeats: int) -> tuple[float, list[float]]:
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  warm = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    warm.append(time.perf_counter() - t0)
  return first, warm


def _ours(kind: str, batch: int, length: int, repeats: int, cema_impl: str = "auto") -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from megalodon_jax.config import MegalodonConfig  # pylint: disable=import-outside-toplevel
  from megalodon_jax.model import MegalodonLM  # pylint: disable=import-outside-toplevel

  extra = {} if cema_impl == "auto" else {"cema_impl": cema_impl}  # older commits may not know every name
  model = MegalodonLM(MegalodonConfig(**CONFIG, dtype="float32", **extra), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (batch, length), dtype=np.int32)
  if kind == "gen":
    from megalodon_jax.inference.generation import Generator  # pylint: disable=import-outside-toplevel
    from megalodon_jax.inference.sampling import Sampler  # pylint: disable=import-outside-toplevel
    prompts = [row.tolist() for row in ids]
    out = {}

    def run():
      # A new Generator per call, as a new request would build; its programs are shared by model structure.
      comps = Generator(model).generate(prompts, max_new_tokens=NEW_TOKENS, sampler=Sampler(temperature=0.0))
      out["tokens"] = [c.tokens for c in comps]
    first, warm = _time(run, repeats)
    return dict(first_s=first, warm_s=warm, tokens=out["tokens"][0][:8])

  # The gradient of every parameter; the rest of the state (the TimestepNorm's integer step counts) rides along.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_and_grad(params, rest, ids):
    def loss_fn(params):
      out = nnx.merge(graphdef, params, rest)(ids)
      logits = out[0] if isinstance(out, tuple) else out  # older commits return logits alone without a cache
      logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    return jax.value_and_grad(loss_fn)(params)

  ids = jnp.asarray(ids)
  first, warm = _time(lambda: jax.block_until_ready(loss_and_grad(params, rest, ids)), repeats)
  return dict(first_s=first, warm_s=warm, loss=float(loss_and_grad(params, rest, ids)[0]))


def _peer(kind: str, batch: int, length: int, repeats: int) -> dict:
  import equinox as eqx  # pylint: disable=import-outside-toplevel,import-error
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import megalodon_jax as peer  # pylint: disable=import-outside-toplevel

  cfg = peer.MegalodonConfig(**CONFIG)
  model = peer.MegalodonForCausalLM(cfg, key=jax.random.PRNGKey(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (batch, length), dtype=np.int32))
  if kind == "gen":
    out = {}

    def run():
      tokens, _, _ = peer.generate(model, ids, NEW_TOKENS, temperature=0.0)
      out["tokens"] = np.asarray(tokens)  # to the host, as a caller would read them
    first, warm = _time(run, repeats)
    return dict(first_s=first, warm_s=warm, tokens=out["tokens"][0, length:length + 8].tolist())

  @eqx.filter_jit
  def loss_and_grad(model, ids):
    return eqx.filter_value_and_grad(lambda m: m.compute_loss(ids, ids))(model)

  first, warm = _time(lambda: jax.block_until_ready(loss_and_grad(model, ids)), repeats)
  return dict(first_s=first, warm_s=warm, loss=float(loss_and_grad(model, ids)[0]))


def worker(side: str, case: str, repeats: int, cema_impl: str = "auto") -> None:
  t0 = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_enable_compilation_cache", False)  # first calls must compile, whatever the environment says
  import megalodon_jax  # pylint: disable=import-outside-toplevel
  kind, batch, length = CASES[case]
  rec = dict(side=side, case=case, package=os.path.dirname(megalodon_jax.__file__), jax=jax.__version__,
             device=jax.devices()[0].device_kind)
  if side == "peer":
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    rec["version"] = importlib.metadata.version("megalodon-jax")
    if not rec["package"].startswith(os.path.dirname(os.path.dirname(sys.executable))):
      raise SystemExit(f"the peer worker imported {rec['package']}, not the peer's environment's package")
  elif not rec["package"].startswith(os.environ["PYTHONPATH"]):
    raise SystemExit(f"the worker imported {rec['package']}, not the checkout {os.environ['PYTHONPATH']}")
  rec["import_s"] = time.perf_counter() - t0
  if side == "peer":
    rec.update(_peer(kind, batch, length, repeats))
  else:
    rec.update(_ours(kind, batch, length, repeats, cema_impl), cema_impl=cema_impl)
  rec["process_s"] = time.perf_counter() - t0
  print(json.dumps(rec))


# ------------------------------------------------------------------------------------------------------ driver

def _git(*args: str, cwd: str = REPO_ROOT) -> str:
  return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout(rev: str, tmp: str) -> str:
  """The source root for `rev`: this checkout for HEAD / the working tree, else a detached worktree under tmp."""
  if rev in ("HEAD", "worktree"):
    return REPO_ROOT
  path = os.path.join(tmp, f"rev-{rev}")
  _git("worktree", "add", "--detach", "--force", path, rev)
  return path


def run_worker(side: str, case: str, args, root: str | None, cema_impl: str = "auto") -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE") and k != "PYTHONPATH"}
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  if side == "peer":
    # Outside any checkout, no PYTHONPATH: `import megalodon_jax` must find the peer's installed package.
    cmd, cwd = [args.peer_python, "-c", _PEER_BOOT, os.path.abspath(__file__)], tempfile.gettempdir()
  else:
    cmd, cwd = [sys.executable, os.path.abspath(__file__)], root
    env["PYTHONPATH"] = root
  cmd += ["--worker", side, "--case", case, "--repeats", str(args.repeats)]
  if side == "ours":
    cmd += ["--cema_impl", cema_impl]
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
  if proc.returncode != 0:
    # The exception's own line, not JAX's note on filtered frames that follows it.
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(("For simplicity, JAX", "-----"))]
    return dict(side=side, case=case, error=lines[-1:] or [f"rc {proc.returncode}"])
  return json.loads(proc.stdout.strip().splitlines()[-1])


# Runs this file's worker in the peer's interpreter without putting this checkout's folders on sys.path (a plain
# `python benchmarks/versus_peer.py` would put benchmarks/ there, harmless, but this keeps the peer's path clean).
_PEER_BOOT = ("import runpy, sys; path = sys.argv[1]; sys.argv = sys.argv[1:]; "
              "runpy.run_path(path, run_name='__main__')")


def summarize(records: list[dict]) -> list[dict]:
  rows = {}
  for r in records:
    if "error" in r:
      continue
    row = rows.setdefault((r["label"], r["case"]), dict(label=r["label"], case=r["case"], first=[], warm=[]))
    row["first"].append(r["first_s"])
    row["warm"].append(statistics.median(r["warm_s"]))
  out = []
  for row in rows.values():
    kind, batch, length = CASES[row["case"]]
    first, warm = statistics.median(row["first"]), statistics.median(row["warm"])
    entry = dict(label=row["label"], case=row["case"], runs=len(row["first"]), first_s=first, warm_s=warm)
    if kind == "train":
      entry["warm_tok_s"] = batch * length / warm
    out.append(entry)
  return out


def format_table(summary: list[dict]) -> str:
  lines = [f"{'case':<10} {'side':<16} {'first call s':>12} {'warm s':>9} {'warm tok/s':>11} {'runs':>4}"]
  for s in sorted(summary, key=lambda s: (list(CASES).index(s["case"]), s["label"])):
    tok = f"{s['warm_tok_s']:11.0f}" if "warm_tok_s" in s else f"{'':>11}"
    lines.append(f"{s['case']:<10} {s['label']:<16} {s['first_s']:12.3f} {s['warm_s']:9.3f} {tok} {s['runs']:4d}")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
  p.add_argument("--case", help=argparse.SUPPRESS)
  p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
  p.add_argument("--sides", default="ours,peer", help="comma-separated: ours, peer (default both)")
  p.add_argument("--revs", default="HEAD", help="commits of this project to run (HEAD = this working tree)")
  p.add_argument("--cema_impls", default="auto",
                 help="comma-separated CEMA implementations of our side (auto or ops/impl_names' names), each a side")
  p.add_argument("--cema_impl", default="auto", help=argparse.SUPPRESS)
  p.add_argument("--runs", type=int, default=2, help="fresh processes per side and case, alternated")
  p.add_argument("--repeats", type=int, default=5, help="warm calls per process after the first")
  p.add_argument("--peer_python", default=DEFAULT_PEER_PYTHON)
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
  p.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "versus_peer_cpu.json"))
  args = p.parse_args(argv)
  if args.worker:
    worker(args.worker, args.case, args.repeats, args.cema_impl)
    return

  cases = [c for c in args.cases.split(",") if c]
  unknown = [c for c in cases if c not in CASES]
  if unknown:
    p.error(f"unknown cases {unknown}; choose from {list(CASES)}")
  sides = [s for s in args.sides.split(",") if s]
  if not sides or set(sides) - {"ours", "peer"}:
    p.error(f"--sides {args.sides!r}: give ours, peer or ours,peer")
  with tempfile.TemporaryDirectory(prefix="versus_peer_") as tmp:
    labels = []  # (label, side, source root, CEMA implementation)
    impls = [i for i in args.cema_impls.split(",") if i]
    try:
      if "ours" in sides:
        for rev in args.revs.split(","):
          name = rev
          if rev == "HEAD":  # the working tree: its commit, marked when it has uncommitted changes
            name = _git("rev-parse", "--short", "HEAD") + ("+changes" if _git("status", "--porcelain", "-uno") else "")
          root = checkout(rev, tmp)
          for impl in impls:
            labels.append((f"ours@{name}" + ("" if impl == "auto" else f"[{impl}]"), "ours", root, impl))
      if "peer" in sides:
        labels.append(("peer", "peer", None, "auto"))
      records = []
      for case in cases:
        for run in range(args.runs):
          # Alternate, and reverse every other round so that no side always runs right after another.
          order = labels if run % 2 == 0 else labels[::-1]
          for label, side, root, impl in order:
            rec = run_worker(side, case, args, root, impl)
            rec.update(label=label, run=run)
            records.append(rec)
            msg = rec.get("error") or (f"first {rec['first_s']:.3f} s, "
                                       f"warm median {statistics.median(rec['warm_s']):.3f} s")
            print(f"  {case} {label} run {run}: {msg}", flush=True)
    finally:
      for root in {root for _, side, root, _ in labels if side == "ours" and root != REPO_ROOT}:
        _git("worktree", "remove", "--force", root)
  summary = summarize(records)
  print(format_table(summary))

  sys.path.insert(0, REPO_ROOT)
  from benchmarks.common import machine_info  # pylint: disable=import-outside-toplevel
  peer_rec = next((r for r in records if r["side"] == "peer" and "error" not in r), {})
  result = dict(benchmark="versus_peer", config=CONFIG, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, runs=args.runs,
                repeats=args.repeats, machine=machine_info(), load_avg=os.getloadavg(),
                peer=dict(version=peer_rec.get("version"), jax=peer_rec.get("jax")),
                revs={label: (_git("rev-parse", "HEAD", cwd=root) if root == REPO_ROOT else label.split("@", 1)[1])
                      for label, side, root, _ in labels if side == "ours"},
                summary=summary, records=records)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
