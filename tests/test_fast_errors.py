"""Bad input is reported before the heavy libraries load (issue 20: an error within 2 s of the command starting).

No timings are asserted. What makes an error fast is that the command line checks its flags, config, paths and
files before it imports jax (about a second to import, more for its backends), flax, orbax or torch. Each case runs
a command's `main` in a fresh interpreter (a subprocess) behind an import spy, and asserts exit status 2, one
`error: ...` line on stderr, and that none of those libraries was imported; the spy names who imported one.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from cli_harness import run_cli
from megalodon_jax.aot import gpu
from megalodon_jax.checkpoints import layout
from megalodon_jax.config import MegalodonConfig

HEAVY = ("jax", "flax", "optax", "orbax", "torch")
MARK = "imported-by: "

# Runs `<module>.main(argv)` with a meta-path spy that keeps the import stack of the first import of each heavy
# library (`find_spec` answers None: the import itself proceeds as usual), then prints them on stdout.
DRIVER = f"""
import importlib, json, sys, traceback
first = {{}}

class Spy:
  def find_spec(self, name, path=None, target=None):
    top = name.partition(".")[0]
    if top in {HEAVY!r} and top not in first:
      first[top] = "".join(traceback.format_stack(limit=14)[:-1])
    return None

sys.meta_path.insert(0, Spy())
module, argv = sys.argv[1], sys.argv[2:]
try:
  status = importlib.import_module(module).main(argv)
except SystemExit as e:  # argparse
  status = e.code
sys.stdout.flush()
print({MARK!r} + json.dumps(first))
sys.exit(status)
"""


def _run(module: str, *argv: str, cwd: str | None = None):
  """(result, {library: import stack}) of `module.main(argv)` in a fresh interpreter behind the spy."""
  result = run_cli([sys.executable, "-c", DRIVER, module, *argv], **({"cwd": cwd} if cwd else {}), timeout=300)
  lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
  assert lines, f"the driver did not finish:\n{result.stderr[-3000:]}"
  return result, json.loads(lines[-1][len(MARK):])


def _refused_before_jax(module: str, *argv: str, expect: str, cwd: str | None = None) -> str:
  result, imported = _run(module, *argv, cwd=cwd)
  assert result.returncode == 2, f"status {result.returncode}:\n{result.stderr[-3000:]}"
  line = result.one_error_line()
  assert expect in line, line
  assert not imported, "\n".join(f"{lib} was imported before the error, by:\n{stack}"
                                 for lib, stack in imported.items())
  return line


@pytest.fixture
def fake_run(tmp_path):
  """A folder that is a train.py workdir by its layout (checkpoints/ inside) but holds no step."""
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  return str(run)


@pytest.fixture
def fake_params(tmp_path):
  """A params-only checkpoint (what from-pytorch writes) as far as the checks before jax read it: its config
  sidecar (a byte-level model) and an Orbax metadata file, but no arrays."""
  ckpt = tmp_path / "params"
  ckpt.mkdir()
  (ckpt / layout.PYTREE_METADATA).write_text("{}")
  sidecar = {"format": layout.PARAMS_FORMAT, "model": MegalodonConfig(vocab_size=256).official_kwargs(),
             "execution": {}, "step": None, "source": None}
  (ckpt / layout.CONFIG_FILE).write_text(json.dumps(sidecar))
  return str(ckpt)


# ---------------------------------------------------------------- train.py

def test_train_config_typo(tmp_path):
  _refused_before_jax("megalodon_jax.train_cli", "--config", "tiny", "--workdir", str(tmp_path / "w"),
                      "--config.model.num_layerz=1", expect="unknown config key --config.model.num_layerz")


def test_train_missing_data_path(tmp_path):
  _refused_before_jax("megalodon_jax.train_cli", "--config", "tiny", "--workdir", str(tmp_path / "w"),
                      "--config.data.dataset=text_files", f"--config.data.path={tmp_path / 'nope'}",
                      expect="data.path")
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- generate

def test_generate_missing_checkpoint(tmp_path):
  _refused_before_jax("megalodon_jax.generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi",
                      expect=f"checkpoint {tmp_path / 'nope'} does not exist")


def test_generate_prompt_that_is_not_utf8(fake_run):
  # Python hands a non-UTF-8 argv byte over as a lone surrogate, exactly what the shell's $'\xff' becomes.
  bad = os.fsdecode(b"\xff")
  _refused_before_jax("megalodon_jax.generate", "--checkpoint", fake_run, "--prompt", bad,
                      expect="byte 0 (0xff) is not valid UTF-8")


def test_generate_prompt_file_that_is_not_utf8(fake_run, tmp_path):
  prompt = tmp_path / "prompt.txt"
  prompt.write_bytes(b"ok \xfe")
  _refused_before_jax("megalodon_jax.generate", "--checkpoint", fake_run, "--prompt_file", str(prompt),
                      expect="byte 3 (0xfe) is not valid UTF-8")


def test_generate_folder_that_is_no_checkpoint(tmp_path):
  _refused_before_jax("megalodon_jax.generate", "--checkpoint", str(tmp_path), "--prompt", "hi",
                      expect="is not a checkpoint")


def test_generate_tokenizer_file_that_does_not_exist(fake_params, tmp_path):
  # The checkpoint passes every check that reads no arrays; its tokenizer is resolved before the weights load.
  _refused_before_jax("megalodon_jax.generate", "--checkpoint", fake_params, "--prompt", "hi", "--tokenizer_path",
                      str(tmp_path / "nope.model"), expect="nope.model")


@pytest.mark.parametrize("argv, expect", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top_k", "-2"], "--top_k must be an int >= 0"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--block_size", "0"], "block_size=0 must be >= 1"),
    (["--prefill_piece", "3"], "prefill_piece=3 must be a positive multiple of the chunk size"),
], ids=["temperature", "top_k", "top_p", "block_size", "prefill_piece"])
def test_generate_sampling_and_decoding_flags(fake_params, argv, expect):
  # --prefill_piece needs the chunk size: an Orbax checkpoint's recorded config gives it before the weights load.
  _refused_before_jax("megalodon_jax.generate", "--checkpoint", fake_params, "--prompt", "hi", *argv, expect=expect)


# ---------------------------------------------------------------- evaluate

def test_evaluate_missing_text_files(fake_run, tmp_path):
  _refused_before_jax("megalodon_jax.evaluate", "--checkpoint", fake_run, "--text_files", str(tmp_path / "nope"),
                      expect="matches no file")


def test_evaluate_output_inside_the_checkpoint(fake_run, tmp_path):
  doc = tmp_path / "doc.txt"
  doc.write_text("some text\n")
  _refused_before_jax("megalodon_jax.evaluate", "--checkpoint", fake_run, "--text_files", str(doc), "--output",
                      os.path.join(fake_run, "checkpoints", "eval.json"), expect="lies inside the checkpoint")


def test_evaluate_window_flags(fake_run, tmp_path):
  doc = tmp_path / "doc.txt"
  doc.write_text("some text\n")
  _refused_before_jax("megalodon_jax.evaluate", "--checkpoint", fake_run, "--text_files", str(doc), "--window",
                      "--window_step_chunks", "8", expect="window: need 1 <= step_chunks (8) < truncate_chunks (8)")


def test_evaluate_unknown_data_setting(fake_params):
  _refused_before_jax("megalodon_jax.evaluate", "--checkpoint", fake_params, "--split", "validation", "--data",
                      "nmae=pg19", expect="--data nmae: unknown data setting")


def test_evaluate_split_that_the_data_set_lacks(fake_params, tmp_path):
  # The split is opened (the small text_files data set prepared in tmp_path) before the weights load.
  (tmp_path / "docs").mkdir()
  for i in range(4):
    (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i}\n")
  _refused_before_jax("megalodon_jax.evaluate", "--checkpoint", fake_params, "--split", "test", "--data",
                      "dataset=text_files", "--data", f"path={tmp_path / 'docs'}", "--data",
                      f"data_dir={tmp_path / 'tfds'}", expect="--split='test': data.dataset='text_files' has no such")


# ---------------------------------------------------------------- convert

def test_to_pytorch_missing_checkpoint(tmp_path):
  _refused_before_jax("megalodon_jax.cli.convert", "to-pytorch", "--checkpoint", str(tmp_path / "nope"), "--out",
                      str(tmp_path / "out"), expect="does not exist")


def test_to_pytorch_out_inside_the_run(fake_run):
  _refused_before_jax("megalodon_jax.cli.convert", "to-pytorch", "--checkpoint", fake_run, "--out",
                      os.path.join(fake_run, "export"), expect="lies inside the run directory")


def test_from_pytorch_missing_torch_file(tmp_path):
  _refused_before_jax("megalodon_jax.cli.convert", "from-pytorch", "--torch", str(tmp_path / "consolidated.pth"),
                      "--out", str(tmp_path / "out"), expect=f"{tmp_path / 'consolidated.pth'} does not exist")


def test_from_pytorch_out_inside_the_torch_folder(tmp_path):
  (tmp_path / "consolidated.pth").write_bytes(b"")
  _refused_before_jax("megalodon_jax.cli.convert", "from-pytorch", "--torch", str(tmp_path), "--out",
                      str(tmp_path / "jax"), expect="lies inside --torch")


def test_to_pytorch_out_holding_an_earlier_export(fake_run, tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "params.json").write_text("{}")
  _refused_before_jax("megalodon_jax.cli.convert", "to-pytorch", "--checkpoint", fake_run, "--out", str(out),
                      expect="pass --overwrite to replace it")


def test_from_pytorch_overwrite_of_a_foreign_folder(tmp_path):
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "consolidated.pth").write_bytes(b"")
  (tmp_path / "jax").mkdir()
  (tmp_path / "jax" / "notes.txt").write_text("mine")
  _refused_before_jax("megalodon_jax.cli.convert", "from-pytorch", "--torch", str(tmp_path / "torch"), "--out",
                      str(tmp_path / "jax"), "--overwrite", expect="holds notes.txt")
  assert (tmp_path / "jax" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- megalodon-aot

@pytest.mark.parametrize("argv, expect", [
    (["--config.model.num_layerz=1"], "unknown config key --config.model.num_layerz"),
    (["--config.model.num_layers=0"], "--config.model.num_layers=0"),
    (["--topology", "v5e-9"], "topology 'v5e-9'"),
], ids=["typo", "model_value", "topology"])
def test_aot_config_and_topology_errors(argv, expect):
  topology = [] if "--topology" in argv else ["--topology", "v5e-8"]
  _refused_before_jax("megalodon_jax.cli.aot", "--config", "tiny", *topology, *argv, expect=expect)


@pytest.mark.skipif(gpu.cuda_available()[0], reason="the CUDA plugin is installed: h100-8 is a valid target")
def test_aot_gpu_topology_without_the_cuda_plugin():
  _refused_before_jax("megalodon_jax.cli.aot", "--config", "tiny", "--topology", "h100-8",
                      expect="topology 'h100-8' needs the CUDA plugin")


# ---------------------------------------------------------------- the spy and the copied constants

def test_the_spy_sees_jax_imported_by_a_command(fake_params):
  # A control: past every check generate imports the generator (jax) and reads the weights, which this checkpoint
  # lacks. The spy must report that import, or the cases above would prove nothing.
  result, imported = _run("megalodon_jax.generate", "--checkpoint", fake_params, "--prompt", "hi")
  assert result.returncode == 2 and "has no tree metadata" in result.one_error_line()
  assert "jax" in imported and "megalodon_jax/cli/generate.py" in imported["jax"], imported


def test_constants_copied_to_keep_jax_out_of_the_command_lines():
  from megalodon_jax.cli import convert as cli  # pylint: disable=import-outside-toplevel
  from megalodon_jax.cli import generate  # pylint: disable=import-outside-toplevel
  from megalodon_jax.convert import torch_files  # pylint: disable=import-outside-toplevel
  from megalodon_jax.inference import generation  # pylint: disable=import-outside-toplevel
  assert tuple(torch_files.DTYPES) == cli.EXPORT_DTYPES
  assert (cli.PARAMS_JSON, cli.HF_CONFIG_JSON) == (torch_files.PARAMS_JSON, torch_files.HF_CONFIG_JSON)
  assert generate.build_parser().parse_args(["--checkpoint", "x"]).block_size == generation.DEFAULT_BLOCK_SIZE
