"""Output paths never swallow inputs (issue 20): convert's --out, evaluate's --output / --plot and generate's
--output_jsonl are refused, with one `error:` line, exit status 2 and nothing changed on disk, when writing them
would replace or delete what the command reads (a run directory, the PyTorch files, existing run files), and
`--overwrite` replaces an earlier export only.

Each case of the issue runs the exact command as a subprocess (`cli_harness.run_cli`); smaller variations run
in-process. One tiny train.py run (1 layer, 2 steps) serves the module.
"""

from __future__ import annotations

import os

import jax
import pytest

from cli_harness import module_command, run_cli, tree_digest
from gcs_emulator import fake_gcs  # pylint: disable=unused-import
from megalodon_jax import paths
from megalodon_jax.checkpoints import output_guard
from megalodon_jax.cli import convert as convert_cli
from megalodon_jax.cli import evaluate, generate
from megalodon_jax.errors import InferenceError
from megalodon_jax.training import trainer
from test_train import small_config


@pytest.fixture(scope="module")
def nest(tmp_path_factory) -> str:
  """A folder holding a train.py run (`run/`: checkpoints/2, metrics.jsonl, config.json) and an unrelated
  `sibling/` folder."""
  cfg = small_config(str(tmp_path_factory.mktemp("tfds")), total_steps=2, checkpoint_every=2,
                     **{"optimizer.warmup_steps": 1})
  root = tmp_path_factory.mktemp("nest")
  trainer.train_and_evaluate(cfg, str(root / "run"), devices=jax.devices()[:1])
  (root / "sibling").mkdir()
  (root / "sibling" / "notes.txt").write_text("unrelated work")
  return str(root)


@pytest.fixture(scope="module")
def run(nest) -> str:
  return os.path.join(nest, "run")


@pytest.fixture(scope="module")
def torch_dir(run, tmp_path_factory) -> str:
  """An official export of the run (consolidated.pth + params.json) inside a `torch_parent/` folder."""
  out = str(tmp_path_factory.mktemp("torch_parent") / "official")
  assert convert_cli.main(["to-pytorch", "--checkpoint", run, "--out", out]) == 0
  return out


def refused(cmd: list[str], *watched: str) -> str:
  """Runs `cmd`; asserts exit status 2, exactly one stderr line (the `error:` line), and that no file under the
  `watched` folders changed. Returns the error line."""
  before = {root: tree_digest(root) for root in watched}
  result = run_cli(cmd)
  assert result.returncode == 2, result.stderr[-3000:]
  line = result.one_error_line()
  assert "Traceback" not in result.stderr
  for root in watched:
    assert tree_digest(root) == before[root], f"{root} changed"
  return line


# ---------------------------------------------------------------- convert to-pytorch


@pytest.mark.parametrize("case", ["same", "parent", "inside"])
def test_to_pytorch_refuses_an_out_overlapping_the_run(nest, run, case):
  """--out is the run, its parent (the run and the sibling would be deleted) or a folder inside the run (from a
  step folder, whose run is two levels up): refused before anything is loaded or created."""
  checkpoint, out, words = {
      "same": (run, run, "is the run directory"),
      "parent": (run, nest, "contains the run directory"),
      "inside": (os.path.join(run, "checkpoints", "2"), os.path.join(run, "checkpoints", "x"),
                 "lies inside the run directory"),
  }[case]
  line = refused(module_command("convert", "to-pytorch", "--checkpoint", checkpoint, "--out", out, "--overwrite"),
                 nest)
  assert line.startswith(f"error: --out {out} {words} of --checkpoint {checkpoint} ({os.path.realpath(run)})"), line
  assert not os.path.exists(os.path.join(run, "checkpoints", "x"))
  assert open(os.path.join(nest, "sibling", "notes.txt")).read() == "unrelated work"


def test_to_pytorch_sees_through_symlinks_and_state_items(nest, run, tmp_path, capsys):
  alias = tmp_path / "alias"
  alias.symlink_to(run, target_is_directory=True)
  before = tree_digest(nest)
  state = os.path.join(run, "checkpoints", "2", "state")
  for checkpoint, out in ((run, str(alias / "export")), (state, os.path.join(run, "export")),
                          (str(alias / "checkpoints"), str(alias))):
    assert convert_cli.main(["to-pytorch", "--checkpoint", checkpoint, "--out", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"the run directory of --checkpoint {checkpoint} ({os.path.realpath(run)})" in err, err
  assert tree_digest(nest) == before


def test_overwrite_refuses_a_folder_with_entries_no_export_writes(nest, tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "params.json").write_text("{}")  # an export's file: not named
  (out / "notes.txt").write_text("precious")
  (out / "data").mkdir()
  line = refused(module_command("convert", "to-pytorch", "--checkpoint", os.path.join(nest, "run"), "--out",
                                str(out), "--overwrite"), nest, str(tmp_path))
  assert "holds data/, notes.txt, which a to-pytorch export never writes" in line, line
  assert (out / "notes.txt").read_text() == "precious"


def test_overwrite_replaces_an_earlier_export_in_another_format(nest, run, tmp_path):
  out = tmp_path / "export"
  assert convert_cli.main(["to-pytorch", "--checkpoint", run, "--out", str(out), "--format", "safetensors"]) == 0
  assert sorted(os.listdir(out)) == ["model.safetensors", "params.json"]
  before = tree_digest(nest)
  result = run_cli(module_command("convert", "to-pytorch", "--checkpoint", run, "--out", str(out), "--overwrite"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["consolidated.pth", "params.json"]  # replaced whole: no stale safetensors
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary or aside folder left
  assert tree_digest(nest) == before


# ---------------------------------------------------------------- convert from-pytorch


@pytest.mark.parametrize("case", ["same", "parent"])
def test_from_pytorch_refuses_an_out_overlapping_the_torch_folder(torch_dir, case):
  parent = os.path.dirname(torch_dir)
  out = torch_dir if case == "same" else parent
  line = refused(module_command("convert", "from-pytorch", "--torch", torch_dir, "--out", out, "--overwrite"),
                 parent)
  words = "is" if case == "same" else "contains"
  assert line.startswith(f"error: --out {out} {words} --torch ({os.path.realpath(torch_dir)})"), line
  assert sorted(os.listdir(torch_dir)) == ["consolidated.pth", "params.json"]


def test_from_pytorch_refuses_an_out_inside_the_torch_folder_or_holding_the_config(torch_dir, tmp_path, capsys):
  before = tree_digest(os.path.dirname(torch_dir))
  pth = os.path.join(torch_dir, "consolidated.pth")
  config = os.path.join(torch_dir, "params.json")
  for args in (["--torch", torch_dir, "--out", os.path.join(torch_dir, "imported")],
               ["--torch", pth, "--out", torch_dir, "--overwrite"],
               ["--torch", pth, "--config", config, "--out", config]):
    assert convert_cli.main(["from-pytorch", *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {args[-1] if args[-1] != '--overwrite' else args[-2]}")
  assert tree_digest(os.path.dirname(torch_dir)) == before


# ---------------------------------------------------------------- evaluate and generate


def test_evaluate_refuses_an_output_replacing_a_run_file(nest, run, tmp_path):
  doc = tmp_path / "doc.txt"
  doc.write_text("a short document to evaluate\n" * 4)
  line = refused(module_command("evaluate", "--checkpoint", run, "--text_files", str(doc), "--output",
                                os.path.join(run, "metrics.jsonl")), nest, str(tmp_path))
  assert "--output" in line and "metrics.jsonl" in line and "existing file" in line, line


def test_generate_refuses_an_output_jsonl_replacing_a_run_file(nest, run):
  line = refused(module_command("generate", "--checkpoint", run, "--prompt", "def ", "--max_new_tokens", "2",
                                "--output_jsonl", os.path.join(run, "config.json")), nest)
  assert "--output_jsonl" in line and "config.json" in line and "existing file" in line, line


def test_output_files_inside_the_checkpoint_folders_or_onto_inputs_are_refused(nest, run, tmp_path):
  doc = tmp_path / "doc.txt"
  doc.write_text("text")
  cases = [
      (os.path.join(run, "checkpoints", "eval.json"), (), "lies inside the checkpoint"),  # new, but in checkpoints/
      (os.path.join(run, "checkpoints", "2", "meta", "metadata"), (), "lies inside the checkpoint"),
      (os.path.join(run, "checkpoints"), (), "is a folder"),
      (str(tmp_path), (), "is a folder"),
      (os.path.join(run, "config.json"), (), "existing file"),
      (str(doc), [("read by --text_files", str(doc))], "is also read by --text_files"),
      (str(tmp_path / "missing" / "eval.json"), (), "does not exist"),
  ]
  for path, inputs, words in cases:
    with pytest.raises(InferenceError, match=words):
      output_guard.check_output_file(path, "--output", run, InferenceError, inputs)
  # New files beside the run's own files, or anywhere outside the checkpoint, are fine.
  for path in (os.path.join(run, "eval.json"), str(tmp_path / "eval.json")):
    output_guard.check_output_file(path, "--output", os.path.join(run, "checkpoints", "2"), InferenceError)


def test_a_new_report_in_the_run_directory_is_written(run, tmp_path, capsys):
  doc = tmp_path / "doc.txt"
  doc.write_text("a short document to evaluate\n" * 4)
  report, plot = os.path.join(run, "eval.json"), os.path.join(run, "eval.png")
  try:
    assert evaluate.main(["--checkpoint", run, "--text_files", str(doc), "--segment_len", "32", "--output", report,
                          "--plot", report]) == 2  # the same file twice
    assert "is also written as --output" in capsys.readouterr().err and not os.path.exists(report)
    assert evaluate.main(["--checkpoint", run, "--text_files", str(doc), "--segment_len", "32", "--output", report,
                          "--plot", plot]) == 0, capsys.readouterr().err
    assert os.path.getsize(report) > 0 and os.path.getsize(plot) > 0
    # ... and a second evaluation replaces it: the report is the user's file, not one the run wrote
    first = open(report).read()
    assert evaluate.main(["--checkpoint", run, "--text_files", str(doc), "--segment_len", "16", "--output",
                          report]) == 0, capsys.readouterr().err
    assert open(report).read() != first
    jsonl = os.path.join(run, "samples_new.jsonl")
    assert generate.main(["--checkpoint", run, "--prompt", "ab", "--max_new_tokens", "2", "--block_size", "2",
                          "--output_jsonl", jsonl]) == 0, capsys.readouterr().err
    assert open(jsonl).read().count("\n") == 1
  finally:
    for path in (report, plot, os.path.join(run, "samples_new.jsonl")):
      if os.path.exists(path):
        os.remove(path)


def test_gcs_outputs_are_checked_the_same_way(fake_gcs, run, capsys):
  paths.copy_tree(run, "gs://b/runs/tiny")
  before = tree_digest(fake_gcs)
  step = "gs://b/runs/tiny/checkpoints/2"
  for out, words in (("gs://b/runs/tiny/export", "lies inside"), ("gs://b/runs/", "contains"),
                     ("gs://b/runs//tiny/", "is")):
    assert convert_cli.main(["to-pytorch", "--checkpoint", step, "--out", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} {words} the run directory of --checkpoint {step} (gs://b/runs/tiny)" in err, err
  with pytest.raises(InferenceError, match="existing file"):
    output_guard.check_output_file("gs://b/runs/tiny/metrics.jsonl", "--output", step, InferenceError)
  with pytest.raises(InferenceError, match="inside the checkpoint"):
    output_guard.check_output_file("gs://b/runs/tiny/checkpoints/eval.json", "--output", step, InferenceError)
  output_guard.check_output_file("gs://b/runs/tiny/eval.json", "--output", step, InferenceError)
  paths.as_path("gs://b/export/notes.txt").write_text("precious")
  assert convert_cli.main(["to-pytorch", "--checkpoint", step, "--out", "gs://b/export", "--overwrite"]) == 2
  assert "holds notes.txt, which a to-pytorch export never writes" in capsys.readouterr().err
  assert paths.as_path("gs://b/export/notes.txt").read_text() == "precious"
  after = tree_digest(fake_gcs)
  assert sorted(set(after) - set(before)) == ["b/export", "b/export/notes.txt"]  # only the test's own file
  assert {k: v for k, v in after.items() if k in before} == before


def test_overlap_relations(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
  a, b = str(tmp_path / "a"), str(tmp_path / "a" / "b")
  assert paths.overlap(a, a + "/") == "same"
  assert paths.overlap(b, a) == "inside" and paths.overlap(a, b) == "contains"
  assert paths.overlap(str(tmp_path / "link" / "b" / "new"), b) == "inside"  # through the link, not yet existing
  assert paths.overlap(str(tmp_path / "ab"), a) is None  # a common prefix is not a parent
  assert paths.overlap(a + "/../a/b", b) == "same"
  assert paths.overlap("gs://bucket/run/", "gs://bucket/run") == "same"
  assert paths.overlap("gs://bucket/run//x/../ckpt", "gs://bucket/run") == "inside"
  assert paths.overlap("gs://bucket", "gs://bucket/run/checkpoints") == "contains"
  assert paths.overlap("gs://bucket/run2", "gs://bucket/run") is None
  assert paths.overlap("gs://bucket/run", "/bucket/run") is None
