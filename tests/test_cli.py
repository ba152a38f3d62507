"""The command lines' shared conventions: one-line errors with a "did you mean" hint and exit status 2, kebab-case
aliases of snake_case flags, `--help` with defaults, training configs by name and `--config.key` overrides, the
"already finished" line of a re-run and the summary line every training run ends with.

Everything runs in-process through each tool's `main(argv)` (a subprocess would pay the jax import each time);
argparse's own exits (bad flag, `--help`) arrive as SystemExit.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import pytest

from megalodon_jax.cli import aot as aot_cli
from megalodon_jax.cli import args as cli_args
from megalodon_jax.cli import config_flags, evaluate, generate
from megalodon_jax.cli import convert as convert_cli
from megalodon_jax.cli import train as train_cli
from megalodon_jax.errors import ConfigError
from megalodon_jax.training import run_summary, trainer
from megalodon_jax.training.metrics import MetricsLogger, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _call(main, argv, capsys) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `main(argv)`, argparse's SystemExit included."""
  try:
    code = main(list(argv))
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def _one_error_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


@pytest.mark.parametrize("main, argv, hint", [
    (train_cli.main, ["--config", "tiny", "--workdirr", "x"], "--workdir"),
    (train_cli.main, ["--config", "tiny", "--total_steps=3"], "--config.total_steps"),  # forgot `config.`
    (generate.main, ["--checkpoint", "x", "--prompt", "a", "--max_new_token", "5"], "--max_new_tokens"),
    (evaluate.main, ["--checkpoint", "x", "--split", "validation", "--segment-lenn", "4"], "--segment_len"),
    (convert_cli.main, ["to-pytorch", "--checkpoint", "x", "--out", "y", "--model-paralel", "2"], "--model_parallel"),
    (aot_cli.main, ["--config", "tiny", "--topology", "v5e-4", "--jsn"], "--json"),
])
def test_a_bad_flag_is_one_line_with_the_closest_flag(main, argv, hint, capsys):
  code, out, err = _call(main, argv, capsys)
  assert code == 2 and out == ""
  assert f"(did you mean {hint}?)" in _one_error_line(err)


@pytest.mark.parametrize("main, extra", [(train_cli.main, []), (aot_cli.main, ["--topology", "v5e-4"])])
@pytest.mark.parametrize("config, overrides, message", [
    ("tiny", ["--config.optimizer.lrr=1e-3"], "unknown config key --config.optimizer.lrr (did you mean "
                                              "--config.optimizer.lr?)"),
    ("tiny", ["--config.seq_len", "long"], "--config.seq_len=long: expected an integer"),
    ("tiny", ["--config.tensorboard=maybe"], "expected true or false"),
    ("tiny", ["--config.model=4"], "--config.model is a group of settings"),
    ("tinyy", [], "--config tinyy: unknown config (did you mean tiny?)"),
    ("no/such/config.py", [], "--config no/such/config.py: no such file"),
])
def test_config_errors_are_one_line_before_any_work(main, extra, config, overrides, message, capsys):
  code, out, err = _call(main, ["--config", config, *extra, *overrides], capsys)
  assert code == 2 and out == ""
  assert message in _one_error_line(err)


def test_an_unloadable_config_file_is_one_line(tmp_path, capsys):
  broken = tmp_path / "broken.py"
  broken.write_text("from megalodon_jax.configs import default\n\ndef get_config():\n  return default.get_config().nosuch\n")
  code, _, err = _call(train_cli.main, ["--config", str(broken)], capsys)
  assert code == 2 and f"cannot load {broken}" in _one_error_line(err) and "nosuch" in err
  broken.write_text("def get_config(:\n")
  code, _, err = _call(train_cli.main, ["--config", str(broken)], capsys)
  assert code == 2 and "SyntaxError" in _one_error_line(err)


def test_kebab_case_spellings_are_aliases():
  args = generate.build_parser().parse_args(["--checkpoint", "c", "--prompt", "a-b_c", "--max-new-tokens", "5",
                                             "--top-p=0.5", "--prompt_ids", "1,2"])
  assert (args.max_new_tokens, args.top_p, args.prompt, args.prompt_ids) == (5, 0.5, ["a-b_c"], ["1,2"])
  for spelling in ("--model-parallel", "--model_parallel"):
    args = convert_cli.build_parser().parse_args(["to-pytorch", "--checkpoint", "c", "--out", "o", spelling, "2"])
    assert args.model_parallel == 2
  args = evaluate.build_parser().parse_args(["--checkpoint", "c", "--text-files", "a.txt", "--context-lengths=4,8"])
  assert (args.text_files, args.context_lengths) == ("a.txt", "4,8")
  # Only flag names change: values, `--config.<key>` overrides and what follows a bare `--` are left as given.
  assert cli_args.canonical_argv(["--a-b=c-d", "x-y", "--config.c-d=1", "--", "--e-f"]) == \
      ["--a_b=c-d", "x-y", "--config.c-d=1", "--", "--e-f"]


def test_no_abbreviations(capsys):
  code, _, err = _call(generate.main, ["--checkpoint", "c", "--prompt", "a", "--max_new", "5"], capsys)
  assert code == 2 and "unrecognized arguments: --max_new 5" in _one_error_line(err)


@pytest.mark.parametrize("main, argv, expected", [
    (train_cli.main, [], ["(default: runs/<config name>)", "--config.KEY=VALUE", "tiny"]),
    (generate.main, [], ["--max_new_tokens MAX_NEW_TOKENS", "(default: 256)"]),
    (evaluate.main, [], ["--window_truncate_chunks", "(default: 8)"]),
    (convert_cli.main, ["to-pytorch"], ["--model_parallel N", "(default: 1)", "(default: official)"]),
    (aot_cli.main, [], ["--top TOP", "(default: 8)", "(default: train_step,prefill,decode)"]),
])
def test_help_lists_flags_with_their_defaults(main, argv, expected, capsys):
  code, out, _ = _call(main, [*argv, "--help"], capsys)
  assert code == 0
  text = " ".join(out.split())  # argparse wraps lines
  for piece in expected:
    assert piece in text, piece
  assert "(default: None)" not in text and "(default: False)" not in text


def test_configs_by_name_and_overrides_by_field_type():
  from megalodon_jax.configs import tiny  # pylint: disable=import-outside-toplevel

  cfg, path = config_flags.load_config("tiny")
  assert os.path.samefile(path, os.path.join(REPO, "configs", "tiny.py"))
  assert cfg.to_dict() == tiny.get_config().to_dict()
  assert config_flags.load_config("tiny.py")[1] == path
  assert os.path.samefile(config_flags.load_config(os.path.join(REPO, "configs", "tiny.py"))[1], path)
  shipped = set(config_flags.shipped_config_names())
  assert {"default", "tiny", "enwik8", "mega200m", "mega1_3b", "megalodon_7b"} <= shipped

  rest, overrides = config_flags.split_overrides([
      "--config.total_steps=7", "--workdir", "w", "--config.optimizer.lr", "1e-3", "--config.tensorboard",
      "--config.noasync_checkpointing", "--config.model.efficient_attn=swift", "--config.model.rope_base=1e5",
      "--config.logical_axis_rules=(('vocab', None),)", "--config.model.remat", "none", "--config.seed=3",
      "--config.seed=4"])
  assert rest == ["--workdir", "w"]
  done = config_flags.apply_overrides(cfg, overrides)
  assert (cfg.total_steps, cfg.optimizer.lr, cfg.tensorboard, cfg.async_checkpointing) == (7, 1e-3, True, False)
  assert (cfg.model.efficient_attn, cfg.model.rope_base, cfg.model.remat, cfg.seed) == ("swift", 1e5, "none", 4)
  assert cfg.logical_axis_rules == (("vocab", None),) and done["seed"] == 4
  with pytest.raises(ConfigError, match="needs a value"):
    config_flags.apply_overrides(cfg, [("seq_len", None)])


@pytest.fixture
def restore_logging():
  """train_cli.main sets up the package logger (its own handler, no propagation): put it back for later tests."""
  logger = logging.getLogger("megalodon_jax")
  saved = (list(logger.handlers), logger.propagate, logger.level)
  yield
  logger.handlers[:], logger.propagate = saved[0], saved[1]
  logger.setLevel(saved[2])


def test_a_run_ends_with_one_summary_line_and_a_rerun_says_it_is_finished(tmp_path, capsys, monkeypatch,
                                                                         restore_logging):
  monkeypatch.setenv("MEGALODON_JAX_CACHE", "")  # leave the test session's compilation cache settings alone
  # One device instead of the session's 8: the same command line, a quicker compile.
  monkeypatch.setattr(trainer, "train_and_evaluate",
                      functools.partial(trainer.train_and_evaluate, devices=jax.devices()[:1]))
  workdir = str(tmp_path / "run")
  argv = ["--config", "tiny", "--workdir", workdir,
          f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.max_documents=60",
          "--config.model.num_layers=1", "--config.model.chunk_size=32", "--config.seq_len=64",
          "--config.total_steps=2", "--config.optimizer.warmup_steps=1", "--config.log_every=1",
          "--config.eval_every=2", "--config.eval_batches=1", "--config.num_samples=0", "--config.checkpoint_every=2",
          "--config.tensorboard=false", "--config.progress_bar=off", "--config.async_checkpointing=false"]
  code, out, err = _call(train_cli.main, argv, capsys)
  assert code == 0, err[-3000:]
  summary = out.strip().splitlines()[-1]
  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  last = records[-1]
  assert last["step"] == 2
  assert summary.startswith("trained steps 0 -> 2 of 2 in ")
  assert f"loss {last['loss']:.4g}, bpb {last['bpb']:.4g} (step 2)" in summary
  assert f"eval_loss {last['eval_loss']:.4g}, eval_bpb {last['eval_bpb']:.4g} (step 2)" in summary
  assert f"checkpoints {os.path.join(workdir, 'checkpoints')}, metrics {os.path.join(workdir, 'metrics.jsonl')}" \
      in summary and "TensorBoard" not in summary and "preempted" not in summary

  code, out, err = _call(train_cli.main, argv, capsys)
  assert code == 0
  assert out == f"already finished at step 2 of 2 in {workdir}; raise --config.total_steps to continue\n"
  assert "compiled" not in err  # said before any compile

  # The same workdir seen by a run configured for 5 steps that stopped at 2: a SIGTERM'd run's summary.
  line = run_summary.summary_line(workdir, start_step=0, end_step=2, total_steps=5, tensorboard=True)
  assert line.startswith("preempted at step 2: resume by re-running the same command; trained steps 0 -> 2 of 5; ")
  assert line.endswith(f"TensorBoard {os.path.join(workdir, 'tensorboard')}")


def test_summary_ignores_records_after_the_end_step(tmp_path):
  """A resumed run's losses come from its own steps only; records after the end step (a killed run's) are ignored."""
  logger = MetricsLogger(str(tmp_path), tensorboard=False)
  logger.log(4, {"loss": 2.5, "ppl": 12.18})
  logger.log(6, {"loss": 9.0})
  logger.close()
  line = run_summary.summary_line(str(tmp_path), start_step=4, end_step=4, total_steps=4, tensorboard=False)
  assert line.startswith("trained steps 4 -> 4 of 4; loss 2.5, ppl 12.18 (step 4); checkpoints ")
