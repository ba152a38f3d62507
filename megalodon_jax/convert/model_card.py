"""The model card (README.md) of an exported folder, as the Hugging Face Hub reads it: YAML front matter
(`library_name`, `tags`, `pipeline_tag`, written by huggingface_hub's `ModelCardData`) and a Markdown body with the
architecture, the exact parameter count, the files and how to load them, the training config, the data and the
final metrics of the run (the last value of each metric in the run's metrics.jsonl at or before the exported step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

CARD_FILE = "README.md"
# Training-config fields shown in the card's table (the whole config follows in a collapsed block).
_TRAINING_FIELDS = ("seq_len", "batch_size", "grad_accum_steps", "total_steps", "seed")
_OPTIMIZER_FIELDS = ("lr", "warmup_steps", "scheduler", "weight_decay", "b1", "b2", "clip")
# Data fields that describe the machine rather than the data.
_MACHINE_DATA_FIELDS = ("data_dir", "worker_count")


@dataclasses.dataclass(frozen=True)
class CardInfo:
  """What the card says.

  title: the card's heading (the export folder's name or the Hub repo id).
  family: the model family ("megalodon", "llama").
  layout: the files' layout in words ("megalodon-hf (MegalodonForCausalLM)", "transformers LlamaForCausalLM").
  architecture: the model's architecture fields (official ModelConf kwargs for Megalodon).
  num_params: the exact number of trainable parameters.
  step: the training step exported (None: unknown, e.g. imported weights).
  dtype: the stored weights' dtype ("float32", "bfloat16").
  files: the files of the export (README.md itself excluded).
  load: Markdown that says how to load the folder (a code block, shown as is).
  train_config: the run's training config (JSON) or None.
  metrics: the run's metrics.jsonl records ({"step": ..., name: value}) or None when there is no run.
  library_name, tags: the front matter's.
  """
  title: str
  family: str
  layout: str
  architecture: Mapping[str, Any]
  num_params: int
  step: Optional[int]
  dtype: str
  files: Sequence[str]
  load: str
  train_config: Optional[Mapping[str, Any]] = None
  metrics: Optional[Sequence[Mapping[str, Any]]] = None
  library_name: str = "transformers"
  tags: Sequence[str] = ()


def final_metrics(records: Sequence[Mapping[str, Any]], step: Optional[int]) -> dict[str, tuple[Any, int]]:
  """{metric: (its last logged value, the step it was logged at)} over `records` with step <= `step` (all of them
  when `step` is None); null values (a metric unknown at that step, e.g. mfu off accelerators) are skipped."""
  out: dict[str, tuple[Any, int]] = {}
  for record in sorted(records, key=lambda r: r.get("step", -1)):
    at = record.get("step")
    if not isinstance(at, int) or (step is not None and at > step):
      continue
    for name, value in record.items():
      if name != "step" and value is not None:
        out[name] = (value, at)
  return out


def _value(v: Any) -> str:
  if v is None or isinstance(v, bool):
    return json.dumps(v)  # the config files' spelling: null, true, false
  if isinstance(v, float):
    return f"{v:.6g}" if math.isfinite(v) else str(v)
  if isinstance(v, (dict, list, tuple)):
    return "`" + json.dumps(v) + "`"
  return f"`{v}`" if isinstance(v, str) else str(v)


def _table(rows: Sequence[tuple[Any, ...]], header: tuple[str, ...]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def render(card: CardInfo) -> str:
  """The README.md text: front matter + body."""
  from huggingface_hub import ModelCardData  # pylint: disable=import-outside-toplevel
  front = ModelCardData(library_name=card.library_name, tags=list(card.tags), pipeline_tag="text-generation")
  step = f"step {card.step:,}" if card.step is not None else "an unknown step (imported weights)"
  body = [f"# {card.title}", "",
          f"A {card.family} language model trained with megalodon-jax, exported at {step} in the {card.layout} "
          f"layout ({card.dtype} weights).", "",
          "## Architecture", "", f"**Parameters: {card.num_params:,}** ({card.num_params} trainable parameters, "
          "buffers not counted).", ""]
  body += _table([(f"`{k}`", _value(v)) for k, v in card.architecture.items()], ("field", "value")) + [""]
  body += ["## Files", ""] + [f"- `{f}`" for f in card.files] + ["", card.load.strip(), ""]
  body += _training(card.train_config) + _data(card.train_config) + _metrics(card.metrics, card.step)
  return f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def _training(config: Optional[Mapping[str, Any]]) -> list[str]:
  if not config:
    return ["## Training", "", "The checkpoint records no training config (imported or converted weights).", ""]
  rows = [(f"`{k}`", _value(config[k])) for k in _TRAINING_FIELDS if k in config]
  optimizer = config.get("optimizer") if isinstance(config.get("optimizer"), Mapping) else {}
  rows += [(f"`optimizer.{k}`", _value(optimizer[k])) for k in _OPTIMIZER_FIELDS if k in optimizer]
  full = json.dumps(config, indent=2, sort_keys=True, default=str)
  return (["## Training", ""] + _table(rows, ("field", "value"))
          + ["", "<details><summary>The whole training config</summary>", "", "```json", full, "```", "",
             "</details>", ""])


def _data(config: Optional[Mapping[str, Any]]) -> list[str]:
  data = config.get("data") if config else None
  if not isinstance(data, Mapping):
    return []
  rows = [(f"`data.{k}`", _value(v)) for k, v in data.items() if k not in _MACHINE_DATA_FIELDS and v not in ("", None)]
  return ["## Data", ""] + _table(rows, ("field", "value")) + [""]


def _metrics(records: Optional[Sequence[Mapping[str, Any]]], step: Optional[int]) -> list[str]:
  if records is None:
    return ["## Final metrics", "", "No training run beside the checkpoint (no metrics.jsonl).", ""]
  final = final_metrics(records, step)
  if not final:
    return ["## Final metrics", "", "The run's metrics.jsonl holds no metrics up to this step.", ""]
  rows = [(f"`{name}`", _value(value), at) for name, (value, at) in final.items()]
  return (["## Final metrics", "", "The last value of each metric the run logged (metrics.jsonl) at or before the "
           "exported step:", ""] + _table(rows, ("metric", "value", "step")) + [""])


def write_card(folder: str, card: CardInfo) -> str:
  """Writes `folder`/README.md; returns its name."""
  with open(os.path.join(folder, CARD_FILE), "w", encoding="utf-8") as f:
    f.write(render(card))
  return CARD_FILE
