"""benchmarks/device_check.py --smoke: every part runs on the CPU and writes the JSON, the markdown and a table of
measured choices (never the shipped one); its numerics checks compare real numbers and fail on an injected
mismatch. Both runs are subprocesses (a fresh jax each, as on a GPU machine) sharing the tests' persistent
compilation cache (tests/conftest.py): the injected mismatch changes inputs, not programs, so the second run
compiles nothing new."""

import json
import math
import os
import subprocess
import sys

import jax

from megalodon_jax.ops import impl_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")


def _start(out_dir, *extra, perturb=False):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(jax.config.jax_persistent_cache_min_compile_time_secs))
  env.pop(impl_table.ENV_VAR, None)
  if perturb:
    env["MEGALODON_DEVICE_CHECK_PERTURB"] = "1"
  return subprocess.Popen([sys.executable, SCRIPT, "--smoke", "--out-dir", str(out_dir), *extra], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _finish(proc):
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def test_smoke_run_writes_results_and_a_table_and_catches_a_mismatch(tmp_path):
  with open(impl_table.DEFAULT_PATH, "rb") as f:
    shipped = f.read()
  rc, out = _finish(_start(tmp_path / "good"))
  rc_bad, out_bad = _finish(_start(tmp_path / "bad", "--parts", "numerics", perturb=True))

  assert rc == 0, out[-3000:]
  result = json.loads((tmp_path / "good" / "device_check_cpu.json").read_text())
  assert result["backend"] == "cpu" and result["smoke"] and result["numerics_ok"]
  assert result["machine"]["platform"] == "cpu" and result["machine"]["jax_version"]
  parts = result["parts"]
  assert list(parts) == ["numerics", "attention", "cema", "train", "decode"]
  assert all(p["status"] == "ok" and p["cases"] for p in parts.values()), {k: p["status"] for k, p in parts.items()}

  checks = parts["numerics"]["cases"]
  assert {c["check"].split(" vs")[0] for c in checks} >= {"pallas attention fwd", "pallas attention grads",
                                                          "pallas CEMA fwd", "pallas CEMA grads"}
  assert any(c["check"].startswith("logits") and c["max_abs_logit"] > 0 for c in checks)
  for c in checks:  # real comparisons: finite, small, but not identical arrays compared with themselves
    assert math.isfinite(c["rel_err"]) and 0 <= c["rel_err"] <= c["tol"] and c["ok"], c
  assert any(c["rel_err"] > 0 for c in checks)

  att = {(c["impl"], c["mode"]): c for c in parts["attention"]["cases"]}
  assert att[("xla", "bwd")]["median_ms"] > 0 and att[("pallas", "fwd")]["numerics_ok"]
  assert att[("cudnn", "fwd")]["status"] == "n/a"
  cema_impls = {c["impl"] for c in parts["cema"]["cases"] if c.get("median_ms")}
  assert cema_impls == {"sequential", "chunked", "pallas", "fft", "associative_scan"}
  (train,) = parts["train"]["cases"]
  assert train["tokens_per_sec"] > 0 and math.isfinite(train["loss"]) and train["mfu"] is None  # no CPU peak
  assert all(c["ms_per_step"] > 0 and c["tokens_per_sec"] > 0 for c in parts["decode"]["cases"])

  md = (tmp_path / "good" / "device_check_cpu.md").read_text()
  for heading in ("## Numerics", "## Attention", "## CEMA", "## Train step", "## Greedy decode", "## Measured"):
    assert heading in md
  table = impl_table.validate(json.loads((tmp_path / "good" / "impl_table.json").read_text()))
  assert {e["op"] for e in table["cpu"]} == {"attention", "cema"} and result["table"]["written"]
  with open(impl_table.DEFAULT_PATH, "rb") as f:
    assert f.read() == shipped  # the smoke run never writes the shipped table

  # The injected mismatch: every check fails, the run says so and writes no choices.
  assert rc_bad == 1, out_bad[-3000:]
  result = json.loads((tmp_path / "bad" / "device_check_cpu.json").read_text())
  assert not result["numerics_ok"]
  checks = result["parts"]["numerics"]["cases"]
  assert checks and all(not c["ok"] and c["rel_err"] > c["tol"] for c in checks), checks
  assert json.loads((tmp_path / "bad" / "impl_table.json").read_text())["cpu"] == []
