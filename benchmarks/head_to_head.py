"""Megalodon against a Llama-style baseline of the same size, both trained by this project's trainer on the same
data, token budget and schedule.

  python benchmarks/head_to_head.py                     # --protocol cpu: 1M params, the whole protocol, 2 CPU cores
  python benchmarks/head_to_head.py --protocol gpu      # 11M params, 6 x 384, bf16, 3 seeds (one H100)
  python benchmarks/head_to_head.py --protocol gpu --manual_dir data/enwik8   # enwik8 (gpu: the default folder)
  python benchmarks/head_to_head.py --smoke --out /tmp/h2h                    # seconds: tiny models, a few steps

Per family (megalodon, llama):
1. a learning-rate sweep: one short run per rate (the same schedule shape, `sweep_steps` steps); the rate with the
   lowest final validation bpb is chosen;
2. `seeds` full runs at that rate (`steps` x `batch` x `seq_len` tokens each);
3. on the first seed's final model: bpb against evaluation context length on the longest held-out documents
   (the eval split): Megalodon streams each document through its constant-size cache; Llama is scored with sliding
   windows of its trained length (stride half of it, each token scored once) and with its KV cache over the whole
   document (`benchmarks/h2h_scoring.py`); and the bytes of the one-sequence generation cache at 1K, 32K and 1M tokens
   of context.
Each training run is a fresh process running `megalodon_jax.training.trainer.train_and_evaluate` (so that its peak
memory is its own: process RSS high-water mark on CPU, the allocator's peak bytes on an accelerator); the curves
are the trainer's metrics.jsonl (eval_bpb at every eval step). Tokens are bytes (`data.tokenizer="bytes"`), so
bits per byte = nats per token / ln 2.

The parameter counts are matched: the Llama FFN width is solved from the Megalodon count (`MegalodonConfig.
num_params()` against `LlamaConfig.num_params()`), and the run refuses to start when they differ by more than 5%.

Writes to --out (default benchmarks/results/): head_to_head_<protocol>_<family>_<kind>_<lr>_s<seed>.json per run,
head_to_head_<protocol>.json (the summary: curves, tables, the chosen recipes, machine) and head_to_head_<protocol>.png
(bpb against tokens seen: mean of seeds with the seeds' range; bpb against context length). Run directories go to
--workdirs (default a temporary folder, deleted at the end unless --keep_workdirs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from benchmarks import h2h_report  # noqa: E402  (after the path: the script runs from anywhere)

FAMILIES = ("megalodon", "llama")
CACHE_CONTEXTS = h2h_report.CACHE_CONTEXTS
MAX_PARAM_GAP = 0.05


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One benchmark's sizes. `megalodon` / `llama`: model fields (the training config's `model` section);
  Llama's `ffn_hidden_dim` is solved to match Megalodon's parameter count when absent."""

  name: str
  megalodon: dict
  llama: dict
  seq_len: int
  batch_size: int
  steps: int
  sweep_steps: int
  lrs: tuple
  seeds: tuple
  eval_every: int
  eval_batches: int
  log_every: int
  warmup_fraction: float
  contexts: tuple  # evaluation context lengths (tokens), kept where the documents are long enough
  context_docs: int  # documents per context length
  piece: int  # tokens per cached call when streaming
  # Llama's full-context (KV cache) scoring stops at this context (0: none): its cost grows with the square of the
  # context (each piece attends over the whole cache), about 3 min per 32K-token document on 2 CPU cores.
  kv_cache_max_context: int = 0
  max_documents: int = 0  # stdlib corpus: the first N files (0 = all)
  weight_decay: float = 0.1
  clip: float = 1.0


_MEGA_CPU = dict(num_layers=4, model_dim=128, z_dim=64, value_dim=256, num_heads=2, ffn_hidden_dim=256, swiglu=True,
                 cema_ndim=8, chunk_size=128, norm_num_groups=16, dtype="float32")
_MEGA_GPU = dict(num_layers=6, model_dim=384, z_dim=192, value_dim=384, num_heads=3, ffn_hidden_dim=1024, swiglu=True,
                 cema_ndim=8, chunk_size=256, dtype="bfloat16")
_MEGA_SMOKE = dict(num_layers=1, model_dim=32, z_dim=16, value_dim=64, num_heads=1, ffn_hidden_dim=64, swiglu=True,
                   cema_ndim=4, chunk_size=32, norm_num_groups=8, dtype="float32")

PROTOCOLS = {
    # Sized from timings on this 2-core machine (the report's estimate): see cpu_time_estimate in the summary.
    "cpu": Protocol(name="cpu", megalodon=_MEGA_CPU,
                    llama=dict(num_layers=4, model_dim=128, num_heads=2, dtype="float32"),
                    seq_len=512, batch_size=8, steps=150, sweep_steps=50, lrs=(1e-3, 2e-3, 4e-3, 8e-3), seeds=(0, 1),
                    eval_every=25, eval_batches=4, log_every=5, warmup_fraction=0.1,
                    contexts=(512, 2048, 8192, 32768), context_docs=2, piece=512, max_documents=400,
                    kv_cache_max_context=0),
    # The peer's shapes: 6 x 384; 1200 steps x 16 x 512 bytes; bf16; 3 seeds.
    "gpu": Protocol(name="gpu", megalodon=_MEGA_GPU,
                    llama=dict(num_layers=6, model_dim=384, num_heads=6, head_dim=64, dtype="bfloat16"),
                    seq_len=512, batch_size=16, steps=1200, sweep_steps=240, lrs=(1e-3, 2e-3, 4e-3), seeds=(0, 1, 2),
                    eval_every=100, eval_batches=8, log_every=20, warmup_fraction=0.1,
                    contexts=(512, 2048, 8192, 32768), context_docs=4, piece=512, max_documents=1000),
    "smoke": Protocol(name="smoke", megalodon=_MEGA_SMOKE,
                      llama=dict(num_layers=1, model_dim=32, num_heads=2, dtype="float32"),
                      seq_len=64, batch_size=4, steps=6, sweep_steps=6, lrs=(3e-3,), seeds=(0,),
                      eval_every=3, eval_batches=1, log_every=1, warmup_fraction=0.2,
                      contexts=(64, 256), context_docs=1, piece=64, max_documents=60),
}


# ---------------------------------------------------------------------------------------------------------------
# Model sizes and training configs (no jax here: the parent process only plans, reads and plots).

def megalodon_config(fields: dict):
  from megalodon_jax.config import MegalodonConfig  # pylint: disable=import-outside-toplevel
  names = {f.name for f in dataclasses.fields(MegalodonConfig)}
  return MegalodonConfig(**{k: v for k, v in fields.items() if k in names}, vocab_size=256)


def llama_config(fields: dict):
  from megalodon_jax.llama.config import LlamaConfig  # pylint: disable=import-outside-toplevel
  names = {f.name for f in dataclasses.fields(LlamaConfig)}
  return LlamaConfig(**{k: v for k, v in fields.items() if k in names}, vocab_size=256)


def matched_llama(protocol: Protocol) -> tuple[dict, int, int]:
  """(Llama model fields with ffn_hidden_dim solved so its parameter count matches Megalodon's, Megalodon's count,
  Llama's count). The FFN width is a multiple of 8 when that stays within 1%, else the nearest integer."""
  target = megalodon_config(protocol.megalodon).num_params()
  fields = dict(protocol.llama)
  if "ffn_hidden_dim" not in fields:
    base = llama_config({**fields, "ffn_hidden_dim": 1}).num_params()
    per_unit = llama_config({**fields, "ffn_hidden_dim": 2}).num_params() - base
    exact = max(1.0, 1 + (target - base) / per_unit)
    ffn = max(8, int(round(exact / 8)) * 8)
    if abs(llama_config({**fields, "ffn_hidden_dim": ffn}).num_params() - target) > 0.01 * target:
      ffn = max(1, int(round(exact)))
    fields["ffn_hidden_dim"] = ffn
  count = llama_config(fields).num_params()
  if abs(count - target) > MAX_PARAM_GAP * target:
    raise SystemExit(f"head_to_head: parameter counts differ by more than {MAX_PARAM_GAP:.0%}: megalodon {target:,}, "
                     f"llama {count:,} ({fields})")
  return fields, target, count


def _section_fields(family: str) -> set:
  """The field names the training config's model section takes for `family`."""
  from megalodon_jax import families  # pylint: disable=import-outside-toplevel
  return {f.name for f in dataclasses.fields(families.get(family).section_class())}


def train_config(family: str, model_fields: dict, protocol: Protocol, *, lr: float, steps: int, seed: int,
                 data_dir: str, manual_dir: str) -> dict:
  """The trainer's config (a plain dict, validated by TrainConfig.of in the run) of one run."""
  from megalodon_jax.training.train_config import TrainConfig  # pylint: disable=import-outside-toplevel
  from megalodon_jax.typed_config import config_dict  # pylint: disable=import-outside-toplevel
  cfg = config_dict(TrainConfig()).to_dict()
  names = _section_fields(family)
  cfg["model"] = {**{k: v for k, v in model_fields.items() if k in names}, "family": family}
  cfg["data"] = {**cfg["data"], "tokenizer": "bytes", "data_dir": data_dir}
  if manual_dir:
    cfg["data"].update(dataset="enwik8", manual_dir=manual_dir)
  else:
    cfg["data"].update(dataset="stdlib", max_documents=protocol.max_documents)
  log_every = min(protocol.log_every, steps)
  eval_every = max(log_every, protocol.eval_every // log_every * log_every)
  cfg.update(seed=seed, seq_len=protocol.seq_len, batch_size=protocol.batch_size, total_steps=steps,
             log_every=log_every, eval_every=eval_every, eval_batches=protocol.eval_batches,
             checkpoint_every=10 * steps, checkpoint_keep=1, async_checkpointing=False, num_samples=0,
             tensorboard=False, progress_bar="off")
  cfg["optimizer"] = {**cfg["optimizer"], "lr": lr, "warmup_steps": max(1, int(protocol.warmup_fraction * steps)),
                      "scheduler": "cosine", "end_ratio": 0.1, "weight_decay": protocol.weight_decay,
                      "clip": protocol.clip}
  return cfg


def recipe_overrides(cfg: dict) -> list[str]:
  """The run's config as command-line overrides of train.py (the fields this script sets)."""
  out = [f"--config.model.{k}={v}" for k, v in cfg["model"].items()]
  out += [f"--config.data.{k}={cfg['data'][k]}" for k in ("dataset", "tokenizer", "max_documents", "manual_dir")
          if k in cfg["data"] and cfg["data"][k] not in ("", None)]
  out += [f"--config.{k}={cfg[k]}"
          for k in ("seq_len", "batch_size", "total_steps", "seed", "log_every", "eval_every", "eval_batches")]
  out += [f"--config.optimizer.{k}={cfg['optimizer'][k]}"
          for k in ("lr", "warmup_steps", "scheduler", "end_ratio", "weight_decay", "clip")]
  return out


# ---------------------------------------------------------------------------------------------------------------
# One run, in its own process: train, then (optionally) the long-context evaluation and the cache sizes.

def worker(spec_path: str) -> None:
  with open(spec_path, encoding="utf-8") as f:
    spec = json.load(f)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from megalodon_jax import platforms  # pylint: disable=import-outside-toplevel
  platforms.skip_absent_tpu()  # before the backends start: no libtpu warnings on a machine without a TPU
  from megalodon_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.train_config import TrainConfig  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  cfg, workdir = spec["config"], spec["workdir"]
  from megalodon_jax.errors import NonFiniteLossError  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  error = None
  try:
    last = trainer.train_and_evaluate(cfg, workdir, devices=[device])
  except NonFiniteLossError as e:  # a diverged run (a too-high rate in the sweep) is a result, not a crash
    last, error = {}, str(e)
    print(f"  diverged: {e}", flush=True)
  wall = time.perf_counter() - t0
  result: dict[str, Any] = {"wall_s": wall, "last": last, "error": error,
                            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if "peak_bytes_in_use" in stats:
    result["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
  result["metrics"] = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  from benchmarks.common import machine_info  # pylint: disable=import-outside-toplevel
  result["machine"] = machine_info()

  if spec.get("long_context") and error is None:
    from benchmarks import h2h_scoring  # pylint: disable=import-outside-toplevel
    from megalodon_jax.checkpoints.model_io import load_checkpoint  # pylint: disable=import-outside-toplevel
    from megalodon_jax.data.sources import open_split  # pylint: disable=import-outside-toplevel
    lc = spec["long_context"]
    family = spec["family"]
    model, _, _ = load_checkpoint(workdir)
    typed = TrainConfig.of(cfg)
    plan = data_lib.plan(typed.data)
    tokenizer = data_lib.make_tokenizer(typed.data)
    source = open_split(plan, typed.data.eval_split, "eval_split")
    docs = [np.asarray(tokenizer.encode_bytes(source[i]), np.int32) for i in range(len(source))]
    longest = max(len(d) for d in docs)
    print(f"long-context evaluation of {family}: {len(docs)} held-out documents, longest {longest} tokens", flush=True)
    t1 = time.perf_counter()
    result["context_eval"] = h2h_scoring.score_contexts(
        model, family, docs, contexts=list(lc["contexts"]), num_docs=lc["docs"], piece=lc["piece"],
        train_window=typed.seq_len, kv_cache_max_context=lc.get("kv_cache_max_context", 0),
        log=lambda s: print(s, flush=True))
    result["context_eval_s"] = time.perf_counter() - t1
    result["eval_documents"] = {"count": len(docs), "longest_tokens": int(longest)}
    result["cache_memory"] = [h2h_scoring.cache_bytes(model, family, n) for n in CACHE_CONTEXTS]
  with open(spec["result"], "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=_json_default)


def _json_default(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# The parent: plan, run, summarise.

def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def run_summary(family: str, kind: str, lr: float, seed: int, cfg: dict, result: dict, param_count: int) -> dict:
  """The JSON of one run: its curve (eval_bpb against tokens seen), throughput, memory and wall time."""
  tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
  records = result["metrics"]
  curve = [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "eval_bpb": r["eval_bpb"]}
           for r in records if "eval_bpb" in r]
  final = curve[-1]["eval_bpb"] if curve and not result.get("error") else float("nan")  # NaN: diverged
  timed = [r for r in records if "step_time" in r][1:] or [r for r in records if "step_time" in r]
  step_time = statistics.median(r["step_time"] for r in timed) if timed else float("nan")
  out = {"family": family, "kind": kind, "lr": lr, "seed": seed, "params": param_count,
         "steps": cfg["total_steps"], "tokens": cfg["total_steps"] * tokens_per_step,
         "eval_curve": curve, "final_eval_bpb": final, "error": result.get("error"),
         "final_train_bpb": next((r["bpb"] for r in reversed(records) if "bpb" in r), float("nan")),
         "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time if step_time > 0 else float("nan"),
         "wall_s": result["wall_s"], "peak_rss_bytes": result["peak_rss_bytes"],
         "peak_device_bytes": result.get("peak_device_bytes"), "config": cfg, "recipe": recipe_overrides(cfg),
         "machine": result.get("machine")}
  for key in ("context_eval", "context_eval_s", "cache_memory", "eval_documents"):
    if key in result:
      out[key] = result[key]
  return out


class Runner:
  """Starts each run as `python head_to_head.py --worker SPEC` and collects its JSON."""

  def __init__(self, protocol: Protocol, args: argparse.Namespace, workdirs: str):
    self.protocol, self.args, self.workdirs = protocol, args, workdirs
    self.env = dict(os.environ)
    self.env["PYTHONPATH"] = REPO_ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
    # Runs differing only by seed compile the same step: a persistent compilation cache shares it.
    # (the tests' cache folder: MEGALODON_JAX_CACHE, else ~/.cache/megalodon-jax/xla).
    self.env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
        "MEGALODON_JAX_CACHE", os.path.expanduser("~/.cache/megalodon-jax/xla")))
    self.env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

  def run(self, family: str, kind: str, cfg: dict, long_context: bool) -> dict:
    name = f"{family}_{kind}_lr{cfg['optimizer']['lr']:g}_s{cfg['seed']}"
    workdir = os.path.join(self.workdirs, name)
    spec = {"family": family, "config": cfg, "workdir": workdir, "result": os.path.join(self.workdirs, name + ".json"),
            "long_context": ({"contexts": list(self.protocol.contexts), "docs": self.protocol.context_docs,
                              "piece": self.protocol.piece, "kv_cache_max_context": self.protocol.kv_cache_max_context}
                             if long_context else None)}
    spec_path = os.path.join(self.workdirs, name + ".spec.json")
    if self.args.reuse and os.path.exists(spec["result"]) and os.path.exists(spec_path):
      with open(spec_path, encoding="utf-8") as f:
        same = json.load(f) == json.loads(json.dumps(spec))
      if same:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: reused {spec['result']}", flush=True)
        with open(spec["result"], encoding="utf-8") as f:
          return json.load(f)
    if os.path.exists(workdir):
      shutil.rmtree(workdir)  # a fresh run, never a resume of an older one
    with open(spec_path, "w", encoding="utf-8") as f:
      json.dump(spec, f)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {cfg['total_steps']} steps", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path], env=self.env,
                          cwd=REPO_ROOT, check=False, stdout=None if self.args.verbose else subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
      raise SystemExit(f"head_to_head: run {name} failed (exit {proc.returncode}):\n{(proc.stdout or '')[-4000:]}")
    if proc.stdout:
      for line in proc.stdout.splitlines():
        if line.startswith("  ") or line.startswith("long-context"):
          print(line, flush=True)
    with open(spec["result"], encoding="utf-8") as f:
      result = json.load(f)
    result["process_s"] = time.perf_counter() - t0
    return result


def recipe_config_file(cfg: dict, protocol: str) -> str:
  """A configs/*.py file of the run's settings (what this script sets on top of the typed config's defaults)."""
  lines = [f'"""The head-to-head benchmark\'s chosen {cfg["model"].get("family", "megalodon")} recipe (benchmarks/'
           f'head_to_head.py --protocol {protocol})."""', "", "from megalodon_jax.configs import default", "", "",
           "def get_config():", "  c = default.get_config()"]
  lines += [f"  c.model.{k} = {v!r}" for k, v in cfg["model"].items()]
  lines += [f"  c.data.{k} = {cfg['data'][k]!r}" for k in ("dataset", "tokenizer", "max_documents", "manual_dir")
            if k in cfg["data"] and cfg["data"][k] not in ("", None, 0)]
  lines += [f"  c.{k} = {cfg[k]!r}" for k in ("seq_len", "batch_size", "total_steps", "log_every", "eval_every",
                                            "eval_batches")]
  lines += [f"  c.optimizer.{k} = {cfg['optimizer'][k]!r}"
            for k in ("lr", "warmup_steps", "scheduler", "end_ratio", "weight_decay", "clip")]
  lines += ["  return c", ""]
  return "\n".join(lines)


def cpu_time_estimate(protocol: Protocol) -> dict:
  """How the CPU protocol was sized: step times and overheads measured on the 2-core development machine (shared
  with other jobs, load 4-7) at this protocol's shapes, float32; kept in the summary to compare with the real run."""
  per_step = {"megalodon": 1.0, "llama": 1.7}  # s per 8 x 512-token step, as measured
  startup = 30.0  # s per run: process start, data, compile (cold), the step-0 eval
  eval_s = {"megalodon": 1.5, "llama": 2.5}  # s per evaluation of 4 x 8 x 512 tokens
  context_s = {"megalodon": 25.0, "llama": 60.0}  # s: 2 documents, stream to 32K; sliding to 32K + KV cache to 8K
  steps = len(protocol.lrs) * protocol.sweep_steps + len(protocol.seeds) * protocol.steps
  runs = len(protocol.lrs) + len(protocol.seeds)
  evals = (len(protocol.lrs) * (protocol.sweep_steps // protocol.eval_every + 1)
           + len(protocol.seeds) * (protocol.steps // protocol.eval_every + 1))
  total = sum(steps * per_step[f] + runs * startup + evals * eval_s[f] + context_s[f] for f in FAMILIES)
  return {"measured_on": "2 shared CPU cores, float32, 1M-parameter models, 8 x 512 tokens per step",
          "step_s": per_step, "startup_s_per_run": startup, "eval_s": eval_s, "context_eval_s": context_s,
          "steps_per_family": steps, "runs": 2 * runs, "estimate_s": round(total)}


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--protocol", choices=("cpu", "gpu", "smoke"), default="cpu")
  parser.add_argument("--smoke", action="store_true", help="= --protocol smoke: tiny models, a few steps, seconds")
  parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results"),
                      help="folder of the JSON and PNG outputs")
  parser.add_argument("--workdirs", default="", help="folder of the run directories (default: a temporary folder)")
  parser.add_argument("--keep_workdirs", action="store_true")
  parser.add_argument("--reuse", action="store_true",
                      help="take a run's result from --workdirs when a finished run of the identical spec is there "
                           "(continue or extend an interrupted protocol)")
  parser.add_argument("--data_dir", default="", help="data.data_dir: where the TFDS datasets are prepared")
  parser.add_argument("--manual_dir", default=None,
                      help="data.manual_dir: where enwik8 or enwik8.zip is; when it is there the runs use enwik8, else "
                           "the built-in corpus (default: data/enwik8 for --protocol gpu, none otherwise)")
  parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of megalodon,llama")
  parser.add_argument("--lrs", default="", help="override the sweep's learning rates (comma-separated)")
  parser.add_argument("--seeds", type=int, default=0, help="override the number of seeds")
  parser.add_argument("--steps", type=int, default=0, help="override the full runs' steps")
  parser.add_argument("--sweep_steps", type=int, default=0, help="override the sweep runs' steps")
  parser.add_argument("--contexts", default="", help="override the evaluation context lengths (comma-separated)")
  parser.add_argument("--context_docs", type=int, default=0, help="override the documents per context length")
  parser.add_argument("--plan", action="store_true", help="print the configs and parameter counts, run nothing")
  parser.add_argument("--verbose", action="store_true", help="show the runs' own output")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.worker)
    return 0
  protocol = PROTOCOLS["smoke" if args.smoke else args.protocol]
  if args.lrs:
    protocol = dataclasses.replace(protocol, lrs=tuple(float(x) for x in args.lrs.split(",")))
  if args.seeds:
    protocol = dataclasses.replace(protocol, seeds=tuple(range(args.seeds)))
  if args.steps:
    protocol = dataclasses.replace(protocol, steps=args.steps)
  if args.sweep_steps:
    protocol = dataclasses.replace(protocol, sweep_steps=args.sweep_steps)
  if args.contexts:
    protocol = dataclasses.replace(protocol, contexts=tuple(int(x) for x in args.contexts.split(",")))
  if args.context_docs:
    protocol = dataclasses.replace(protocol, context_docs=args.context_docs)
  families = [f.strip() for f in args.families.split(",") if f.strip()]
  if set(families) - set(FAMILIES):
    parser.error(f"--families: unknown {sorted(set(families) - set(FAMILIES))}")
  llama_fields, mega_params, llama_params = matched_llama(protocol)
  model_fields = {"megalodon": protocol.megalodon, "llama": llama_fields}
  params = {"megalodon": mega_params, "llama": llama_params}
  print(f"head_to_head --protocol {protocol.name}: megalodon {mega_params:,} params, llama {llama_params:,} params "
        f"(ffn {llama_fields['ffn_hidden_dim']}; gap {abs(llama_params - mega_params) / mega_params:.2%}); "
        f"{protocol.steps} steps x {protocol.batch_size} x {protocol.seq_len} tokens, lrs {list(protocol.lrs)}, "
        f"seeds {list(protocol.seeds)}", flush=True)
  data_dir = os.path.abspath(args.data_dir) if args.data_dir else ""
  manual_dir = args.manual_dir if args.manual_dir is not None else ("data/enwik8" if protocol.name == "gpu" else "")
  if manual_dir:
    from megalodon_jax.data import enwik8  # pylint: disable=import-outside-toplevel
    manual_dir = os.path.abspath(os.path.join(REPO_ROOT, manual_dir))
    if enwik8.find_file(manual_dir) is None:
      print(f"head_to_head: no enwik8 or enwik8.zip in {manual_dir}: using the built-in corpus (stdlib)", flush=True)
      manual_dir = ""

  def config(family, lr, steps, seed):
    return train_config(family, model_fields[family], protocol, lr=lr, steps=steps, seed=seed, data_dir=data_dir,
                        manual_dir=manual_dir)

  if args.plan:
    from megalodon_jax.training.train_config import TrainConfig  # pylint: disable=import-outside-toplevel
    for family in families:
      cfg = config(family, protocol.lrs[0], protocol.steps, 0)
      TrainConfig.of(cfg)  # validated as the trainer will
      print(f"{family}: {params[family]:,} params; train.py " + " ".join(recipe_overrides(cfg)))
    return 0
  os.makedirs(args.out, exist_ok=True)
  workdirs = args.workdirs or tempfile.mkdtemp(prefix="head_to_head_")
  os.makedirs(workdirs, exist_ok=True)
  runner = Runner(protocol, args, workdirs)
  prefix = os.path.join(args.out, f"head_to_head_{protocol.name}")
  started = time.time()
  summary: dict[str, Any] = {"protocol": protocol.name, "settings": dataclasses.asdict(protocol),
                             "dataset": "enwik8" if manual_dir else "stdlib", "families": {}}
  summary["settings"]["llama"] = llama_fields
  try:
    for family in families:
      fam: dict[str, Any] = {"params": params[family], "model": model_fields[family], "sweep": []}
      summary["families"][family] = fam
      # 1. the sweep (skipped with one rate: the seed runs use it)
      if len(protocol.lrs) > 1:
        for lr in protocol.lrs:
          cfg = config(family, lr, protocol.sweep_steps, protocol.seeds[0])
          res = run_summary(family, "sweep", lr, cfg["seed"], cfg, runner.run(family, "sweep", cfg, False),
                            params[family])
          _write(f"{prefix}_{family}_sweep_lr{lr:g}_s{cfg['seed']}.json", res)
          fam["sweep"].append({"lr": lr, "final_eval_bpb": res["final_eval_bpb"], "steps": res["steps"]})
          print(f"  {family} sweep lr {lr:g}: final eval bpb {res['final_eval_bpb']:.4f}", flush=True)
        ok = [s for s in fam["sweep"] if _finite(s["final_eval_bpb"])]
        fam["chosen_lr"] = min(ok, key=lambda s: s["final_eval_bpb"])["lr"] if ok else protocol.lrs[0]
      else:
        fam["chosen_lr"] = protocol.lrs[0]
      # 2. the seeds at the chosen rate; 3. the long-context evaluation on the first seed's model
      runs = []
      for i, seed in enumerate(protocol.seeds):
        cfg = config(family, fam["chosen_lr"], protocol.steps, seed)
        res = run_summary(family, "full", fam["chosen_lr"], seed, cfg, runner.run(family, "full", cfg, i == 0),
                          params[family])
        _write(f"{prefix}_{family}_full_lr{fam['chosen_lr']:g}_s{seed}.json", res)
        if not fam["sweep"]:
          fam["sweep"].append({"lr": fam["chosen_lr"], "final_eval_bpb": res["final_eval_bpb"], "steps": res["steps"]})
        runs.append(res)
        print(f"  {family} seed {seed}: final eval bpb {res['final_eval_bpb']:.4f}, {res['tokens_per_s']:.0f} tokens/s,"
              f" wall {res['wall_s']:.1f} s", flush=True)
      fam["runs"] = [{k: r[k] for k in ("seed", "eval_curve", "final_eval_bpb", "tokens_per_s", "step_time_s",
                                        "wall_s", "peak_rss_bytes", "peak_device_bytes", "error", "machine")}
                     for r in runs]
      fam["mean_curve"] = h2h_report.mean_curve([r for r in runs if not r["error"]] or runs)
      finals = [r["final_eval_bpb"] for r in runs if _finite(r["final_eval_bpb"])] or [float("nan")]
      fam["final_eval_bpb"] = {"mean": statistics.fmean(finals), "min": min(finals), "max": max(finals),
                               "std": statistics.pstdev(finals) if len(finals) > 1 else 0.0}
      peaks = [r["peak_device_bytes"] or r["peak_rss_bytes"] for r in runs]
      fam["throughput"] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                           "step_time_s": statistics.median(r["step_time_s"] for r in runs),
                           "wall_s": statistics.median(r["wall_s"] for r in runs),
                           "peak_memory_bytes": max(peaks)}
      for key in ("context_eval", "context_eval_s", "cache_memory", "eval_documents"):
        fam[key] = runs[0].get(key)
      fam["recipe"] = runs[0]["recipe"]
      fam["config"] = runs[0]["config"]
  finally:
    if not args.keep_workdirs and not args.workdirs:
      shutil.rmtree(workdirs, ignore_errors=True)
  any_device_peak = any(r.get("peak_device_bytes") for fam in summary["families"].values() for r in fam["runs"])
  summary["memory_measure"] = "device peak bytes" if any_device_peak else "process peak RSS"
  summary["memory_note"] = ("peak_memory_bytes: the accelerator allocator's peak_bytes_in_use of the run's process"
                            if any_device_peak else
                            "peak_memory_bytes: the run process's RSS high-water mark (ru_maxrss; includes the Python "
                            "interpreter, jax, the data pipeline and compilation)")
  if len(families) == 2:
    gap = abs(params["llama"] - params["megalodon"]) / params["megalodon"]
    summary["param_gap"] = gap
  if protocol.name == "cpu":
    summary["cpu_time_estimate"] = cpu_time_estimate(protocol)
  summary["wall_s"] = time.time() - started
  # The runs' machine (this process never starts a jax backend: on a GPU it would hold memory the runs need).
  summary["machine"] = next((r["machine"] for fam in summary["families"].values() for r in fam["runs"]
                             if r.get("machine")), None)
  summary["recipes"] = {f: fam["recipe"] for f, fam in summary["families"].items()}
  summary["png"] = prefix + ".png"
  if "megalodon" in summary["families"]:
    recipe_path = f"{prefix}_megalodon_recipe.py"
    with open(recipe_path, "w", encoding="utf-8") as f:
      f.write(recipe_config_file(summary["families"]["megalodon"]["config"], protocol.name))
    summary["megalodon_recipe_config"] = recipe_path
  h2h_report.plot(summary, prefix + ".png")
  _write(prefix + ".json", summary)
  print()
  print(h2h_report.tables(summary))
  print(f"\nwrote {prefix}.json and {prefix}.png in {summary['wall_s']:.0f} s"
        + (f"; the Megalodon recipe as a config: {summary['megalodon_recipe_config']}"
           if "megalodon_recipe_config" in summary else ""))
  return 0


def _write(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, default=_json_default)


if __name__ == "__main__":
  sys.exit(main())
