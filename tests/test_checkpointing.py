"""Orbax training checkpoints: bitwise round trips, retention, restore onto other meshes, interrupted and corrupted
saves, shape mismatches, params-only checkpoints, donation after an async save and the SIGTERM flag."""

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cli_harness import env
from gcs_emulator import fake_gcs  # noqa: F401  pylint: disable=unused-import
from megalodon_jax.errors import CheckpointError
from megalodon_jax.checkpoints.layout import check_directory
from megalodon_jax.checkpoints.manager import Checkpointer
from megalodon_jax.checkpoints.params import load_params, save_params
from megalodon_jax.training.preemption import PreemptionFlag

TMP = ".orbax-checkpoint-tmp"


def mesh(shape):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), ("data", "fsdp", "tp"))


def make_state(seed=0, m=None):
  """A train state like the trainer's: int-keyed layer dicts (nnx pure dicts), adamw state, step, rng key data."""
  m = m or mesh((8, 1, 1))
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"embed": jax.device_put(jax.random.normal(k[0], (16, 8)), NamedSharding(m, P("data"))),
            "layers": {0: {"w": jax.device_put(jax.random.normal(k[1], (8, 16)), NamedSharding(m, P(None, "data")))},
                       1: {"w": jax.device_put(jax.random.normal(k[2], (8, 16)), NamedSharding(m, P("fsdp")))}},
            "norm": jax.device_put(jnp.linspace(-1.0, 1.0, 8), NamedSharding(m, P()))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(1e-3, 0.0, 100), b2=0.98,
                                                                weight_decay=0.1))
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: p * 0.5 + 0.25, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
  return {"step": jnp.asarray(7, jnp.int32), "params": params, "buffers": {"ema": jnp.full((3,), 2.5)},
          "opt_state": opt_state, "rng": jax.random.key_data(k[3])}


def abstract(tree, sharding_fn=lambda x: x.sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), tree)


def assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))


def saved_run(tmp_path, steps=(4,), **kw):
  d = tmp_path / "checkpoints"
  c = Checkpointer(str(d), save_every=kw.pop("save_every", 2), keep=kw.pop("keep", 3), **kw)
  state = make_state()
  for s in steps:
    assert c.save(s, state, {"pos": s}, {"config": {"model": "tiny"}}, force=True)
  c.close()
  return d, state


def test_round_trip_bitwise(tmp_path):
  d = tmp_path / "checkpoints"
  c = Checkpointer(str(d), save_every=5, keep=2)
  assert c.latest_step() is None
  state = make_state()
  data = {"shard": 3, "offset": 12345, "files": ["a.bin", "b.bin"]}
  assert c.save(10, state, data, {"config": {"d_model": 8}, "mesh_shape": [8, 1, 1]})
  c.close()

  c = Checkpointer(str(d), save_every=5, keep=2)
  assert c.latest_step() == 10
  restored, data2, meta = c.restore(10, abstract(state))
  assert_bitwise(restored, state)
  assert set(restored["params"]["layers"]) == {0, 1}  # int keys come back as ints
  assert data2 == data
  assert meta["config"] == {"d_model": 8} and meta["mesh_shape"] == [8, 1, 1] and meta["step"] == 10
  assert meta["jax_version"] == jax.__version__
  assert not c.should_save(10) and c.should_save(15) and not c.should_save(12)
  c.close()


def test_keep_interval_and_force(tmp_path):
  d = tmp_path / "checkpoints"
  c = Checkpointer(str(d), save_every=3, keep=2)
  state = make_state()
  saved = [s for s in range(1, 11) if c.save(s, state, {"pos": s}, {})]
  assert saved == [3, 6, 9]
  assert c.save(10, state, {"pos": 10}, {}, force=True)  # off-interval (preemption / end of training)
  assert not c.save(10, state, {}, {}, force=True)  # never overwrites an existing step
  c.wait()
  assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["10", "9"]
  assert not (d / "_to_delete").exists() or not any((d / "_to_delete").iterdir())  # old steps really deleted
  assert c.latest_step() == 10
  _, data, _ = c.restore(10, abstract(state))
  assert data == {"pos": 10}
  c.close()
  with pytest.raises(ValueError, match="save_every"):
    Checkpointer(str(d), save_every=0, keep=1)
  with pytest.raises(CheckpointError, match="JSON"):
    Checkpointer(str(d), save_every=1, keep=2).save(12, state, {"bad": object()}, {})


def test_old_steps_are_deleted_atomically(tmp_path, monkeypatch):
  # orbax renames a step out of the way (atomic) before removing it: a kill mid-deletion never leaves a half-deleted
  # folder under a step name, and the leftovers are removed by the next writer.
  d = tmp_path / "checkpoints"
  monkeypatch.setattr(Checkpointer, "_purge", lambda self: None)
  c = Checkpointer(str(d), save_every=1, keep=1)
  for s in (1, 2, 3):
    assert c.save(s, {"w": jnp.full((4,), s)}, {}, {})
  c.close()
  assert sorted(p.name for p in (d / "_to_delete").iterdir()) == ["1", "2"]
  shutil.rmtree(d / "_to_delete" / "1" / "state")  # as if killed while deleting it
  check_directory(str(d))
  monkeypatch.undo()
  c = Checkpointer(str(d), save_every=1, keep=1)
  assert not any((d / "_to_delete").iterdir())
  assert c.latest_step() == 3
  c.close()


@pytest.mark.parametrize("target", ["mesh222", "single"])
def test_restore_onto_other_mesh(tmp_path, target):
  d, state = saved_run(tmp_path)
  if target == "mesh222":
    m = mesh((2, 2, 2))

    def fn(x):
      if x.ndim == 2:
        return NamedSharding(m, P(("data", "fsdp"), "tp"))
      return NamedSharding(m, P("tp") if x.ndim == 1 and x.shape[0] % 2 == 0 else P())
  else:
    fn = lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[3])
  want = abstract(state, fn)
  c = Checkpointer(str(d), save_every=2, keep=3)
  restored, _, _ = c.restore(4, want)
  c.close()
  assert_bitwise(restored, state)
  for got, w in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
    assert got.sharding == w.sharding
  if target == "mesh222":
    assert restored["params"]["embed"].sharding.spec == P(("data", "fsdp"), "tp")


def test_donating_after_async_save_keeps_checkpoint(tmp_path):
  d = tmp_path / "checkpoints"
  c = Checkpointer(str(d), save_every=1, keep=2, async_save=True)
  m = mesh((8, 1, 1))
  state = {"w": jax.device_put(jnp.arange(2048 * 1024, dtype=jnp.float32).reshape(2048, 1024),
                               NamedSharding(m, P("data"))), "step": jnp.asarray(1, jnp.int32)}
  host = jax.tree.map(np.array, state)
  want = abstract(state)
  step_fn = jax.jit(lambda s: jax.tree.map(lambda a: a * 0 - 7, s), donate_argnums=0)
  assert c.save(1, state, {}, {})
  latest = c.latest_step()  # only finished saves count
  assert latest is None or (d / "1").is_dir()
  for _ in range(3):  # the trainer donates the state to the next step right after save()
    state = step_fn(state)
  jax.block_until_ready(state)
  c.wait()
  restored, _, _ = c.restore(1, want)
  c.close()
  assert_bitwise(restored, host)
  assert float(state["w"][0, 0]) == -7.0


def test_interrupted_save_is_ignored(tmp_path):
  d, state = saved_run(tmp_path)
  # What orbax leaves when killed mid-save: the step written under the tmp name, never renamed.
  shutil.copytree(d / "4", d / f"6{TMP}")
  shutil.rmtree(d / f"6{TMP}" / "meta")
  check_directory(str(d))
  ro = Checkpointer(str(d), save_every=2, keep=3, read_only=True)
  assert ro.latest_step() == 4
  with pytest.raises(CheckpointError, match="not a finished checkpoint"):
    ro.restore(6, abstract(state))
  ro.close()
  assert (d / f"6{TMP}").exists()  # read-only users leave it alone
  c = Checkpointer(str(d), save_every=2, keep=3)  # a writer removes it (orbax cleanup_tmp_directories)
  assert c.latest_step() == 4
  assert c.save(8, state, {"pos": 8}, {})
  c.wait()
  assert not (d / f"6{TMP}").exists()
  assert c.latest_step() == 8
  c.close()


def test_killed_process_leaves_only_tmp(tmp_path):
  d = tmp_path / "checkpoints"
  script = textwrap.dedent(f"""
    import os, jax, jax.numpy as jnp
    from megalodon_jax.checkpoints.manager import Checkpointer
    c = Checkpointer({str(d)!r}, save_every=1, keep=2)
    assert c.save(5, {{"w": jnp.ones((4096, 4096))}}, {{}}, {{}})
    os._exit(0)  # killed right after the (async) save started
  """)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
  names = sorted(p.name for p in d.iterdir())
  assert "5" not in names and f"5{TMP}" in names, names
  check_directory(str(d))
  c = Checkpointer(str(d), save_every=1, keep=2, read_only=True)
  assert c.latest_step() is None
  c.close()
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    load_params(str(d), {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)})


@pytest.mark.parametrize("damage", ["no_tree_metadata", "truncated_json", "missing_item", "truncated_step_meta",
                                    "stray_step_file", "root_is_file"])
def test_corrupted_directory_fails_fast(tmp_path, damage):
  d, _ = saved_run(tmp_path, steps=(2, 4))
  bad = d / "4"
  if damage == "no_tree_metadata":
    (bad / "state" / "_METADATA").unlink()
  elif damage == "truncated_json":
    text = (bad / "data" / "metadata").read_text()
    (bad / "data" / "metadata").write_text(text[:len(text) // 2])
  elif damage == "missing_item":
    shutil.rmtree(bad / "meta")
  elif damage == "truncated_step_meta":
    (bad / "_CHECKPOINT_METADATA").write_text('{"item_handlers": ')
  elif damage == "stray_step_file":
    bad = d / "12"
    bad.write_text("not a checkpoint")
  else:
    shutil.rmtree(d)
    d.write_text("oops")
    bad = d
  with pytest.raises(CheckpointError, match=str(bad)):
    check_directory(str(d))
  with pytest.raises(CheckpointError):
    Checkpointer(str(d), save_every=2, keep=3)


# The failed tensorstore reads finish after orbax's event loop has closed; their callbacks then raise "Event loop is
# closed" as unraisable exceptions. Harmless, but flushed here so they are not blamed on the next test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_array_data_raises_checkpoint_error(tmp_path):
  d, state = saved_run(tmp_path)
  for f in (d / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0" * 7)
  check_directory(str(d))  # file-level checks pass: the damage is found when reading
  c = Checkpointer(str(d), save_every=2, keep=3, read_only=True)
  with pytest.raises(CheckpointError, match=str(d / "4")):
    c.restore(4, abstract(state))
  c.close()
  time.sleep(0.5)
  gc.collect()


def test_shape_mismatch_lists_keys(tmp_path):
  d, state = saved_run(tmp_path)
  want = abstract(state)
  want["params"]["embed"] = jax.ShapeDtypeStruct((32, 8), jnp.float32, sharding=want["params"]["embed"].sharding)
  want["params"]["layers"][2] = want["params"]["layers"][1]  # one more layer
  want["rng"] = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=want["rng"].sharding)
  c = Checkpointer(str(d), save_every=2, keep=3)
  with pytest.raises(CheckpointError) as e:
    c.restore(4, want)
  c.close()
  msg = str(e.value)
  assert str(d / "4") in msg
  assert "params/embed: saved (16, 8) float32, expected (32, 8) float32" in msg
  assert "params/layers/2/w: expected (8, 16) float32, not in the checkpoint" in msg
  assert "rng: saved (2,) uint32, expected (2,) int32" in msg


def test_save_and_load_params(tmp_path):
  state = make_state(seed=3)
  params = state["params"]
  m = mesh((2, 2, 2))
  want = abstract(params, lambda x: NamedSharding(m, P("fsdp") if x.ndim == 2 else P()))
  path = tmp_path / "export"
  save_params(str(path), params)
  with pytest.raises(CheckpointError, match="already exists"):
    save_params(str(path), params)
  got = load_params(str(path), want)
  assert_bitwise(got, params)
  assert got["embed"].sharding == want["embed"].sharding

  d, run_state = saved_run(tmp_path, steps=(2, 4))
  from_step = load_params(str(d / "2"), want)
  from_dir = load_params(str(d), want)  # latest step
  assert_bitwise(from_step, run_state["params"])
  assert_bitwise(from_dir, run_state["params"])

  to_bf16 = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=a.sharding)
  half = load_params(str(path), jax.tree.map(to_bf16, want))  # init_from casts to the model's dtypes
  np.testing.assert_array_equal(np.asarray(half["norm"]), np.asarray(params["norm"].astype(jnp.bfloat16)))

  with pytest.raises(CheckpointError, match="does not exist"):
    load_params(str(tmp_path / "nope"), want)
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    load_params(str(tmp_path / "empty"), want)
  save_params(str(tmp_path / "other"), {"unrelated": jnp.ones(3)})
  bigger = dict(want, embed=jax.ShapeDtypeStruct((32, 8), jnp.float32, sharding=want["embed"].sharding))
  with pytest.raises(CheckpointError, match=r"embed: saved \(16, 8\) float32, expected \(32, 8\)"):
    load_params(str(d), bigger)
  with pytest.raises(CheckpointError, match="unrelated"):
    load_params(str(tmp_path / "other"), want)


def test_preemption_flag_sigterm():
  before = signal.getsignal(signal.SIGTERM)
  flag = PreemptionFlag()
  assert not flag.requested and not flag.check(3)
  os.kill(os.getpid(), signal.SIGTERM)
  deadline = time.time() + 2
  while not flag.requested and time.time() < deadline:
    time.sleep(0.01)
  assert flag.requested and flag.check(4)
  flag.close()
  assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_flag_without_the_service_agrees_by_allgather(monkeypatch, caplog):
  """Several processes but no jax preemption service: not silent, and the flag turns on for all processes at the
  same agreement step (an all-gather every `agree_every` steps), here faked as two processes."""
  from jax.experimental import multihost_utils
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  other_process_flag = [0]
  gathered = []

  def fake_allgather(x):
    gathered.append(int(np.asarray(x)[0]))
    return np.stack([np.asarray(x), np.asarray(other_process_flag, np.int32)])

  monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
  before = signal.getsignal(signal.SIGTERM)
  with caplog.at_level("WARNING", logger="megalodon_jax"):
    flag = PreemptionFlag(agree_every=4)
  assert "preemption service is not running" in caplog.text
  assert not flag.check(1) and not flag.check(4) and gathered == [0]  # only step 4 gathered
  other_process_flag[0] = 1  # the other process got SIGTERM
  assert not flag.check(5) and not flag.check(7)  # not an agreement step: both keep training
  assert flag.check(8) and gathered == [0, 0]
  flag.close()
  flag = PreemptionFlag(agree_every=2)  # this process gets the SIGTERM: it waits for the agreement step too
  other_process_flag[0] = 0
  os.kill(os.getpid(), signal.SIGTERM)
  deadline = time.time() + 2
  while not flag._local and time.time() < deadline:  # pylint: disable=protected-access
    time.sleep(0.01)
  assert not flag.check(3) and flag.check(4) and gathered[-1] == 1
  flag.close()
  assert signal.getsignal(signal.SIGTERM) is before


def test_finished_steps_are_judged_as_orbax_judges_them(tmp_path, fake_gcs):
  """layout.is_finalized spells out orbax's rule (it runs before jax and orbax start): the same answer for finished
  and unfinished folders, local and on (emulated) gs://."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  from megalodon_jax.checkpoints import layout  # pylint: disable=import-outside-toplevel
  local = []
  for name in ("4", f"6{TMP}", f"8{TMP}-1234"):
    (tmp_path / name).mkdir()
    local.append(epath.Path(tmp_path / name))
  remote = []
  for name, committed in (("4", True), ("6", False)):
    folder = epath.Path(f"gs://b/ckpt/{name}")
    (folder / "state" / "x").write_text("data")
    if committed:
      (folder / layout.COMMIT_FILE).write_text("ok")
    remote.append(folder)
  answers = [(str(p), layout.is_finalized(p), ocp.path.step.is_path_finalized(p)) for p in local + remote]
  assert [a for _, a, _ in answers] == [True, False, False, True, False]
  assert all(ours == orbax for _, ours, orbax in answers), answers


def test_layout_names_orbax_tmp_folders_as_orbax_does():
  # layout.py spells the suffix out (it is read before jax and orbax start); orbax's own constant is the reference.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from megalodon_jax.checkpoints import layout  # pylint: disable=import-outside-toplevel
  assert layout.TMP_MARK == ocp.path.atomicity_types.TMP_DIR_SUFFIX
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  assert layout.COMMIT_FILE == atomicity.COMMIT_SUCCESS_FILE


def test_late_read_errors_of_a_damaged_step_print_nothing_after_the_error():
  """The reads still in flight when a damaged step's restore fails end later; asyncio reports their futures (whose
  TensorStore exception has no traceback) when they are collected. Once a restore has failed, those reports are
  dropped and any other never-retrieved exception is still reported (judged by asyncio's own logging)."""
  script = textwrap.dedent("""
      import asyncio, gc, logging
      logging.basicConfig(format="LOG %(message)s")
      from megalodon_jax.checkpoints import manager
      manager._ignore_late_read_callbacks()
      loop = asyncio.new_event_loop()
      for text in ['OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database at local file "/x/state/"', "boom"]:
        future = loop.create_future()
        future.set_exception(ValueError(text))
        del future
        gc.collect()
      loop.close()
      print("done")
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=env(), check=False)
  assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
  assert "OUT_OF_RANGE" not in result.stderr
  assert "Future exception was never retrieved" in result.stderr and "ValueError: boom" in result.stderr
