"""`DataConfig`: the `data` section of the training config, the one definition of its fields and defaults.

`--config.data.<field>=<value>` sets them; `megalodon_jax.data` checks their values against the files they name
(`check_data_config`), where a wrong value can be explained with what is on disk. No jax import.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which corpus, how it is split, tokenized and read (docs/training.md#the-training-config)."""

  # stdlib (built-in corpus: this Python's standard library sources) | text_files | jsonl | enwik8 | tfds
  dataset: str = "stdlib"
  path: str = ""  # text_files / jsonl: file path(s), folder(s) or glob(s), comma separated (jsonl: plain, .gz, .zst)
  manual_dir: str = ""  # enwik8: folder holding enwik8 or enwik8.zip (downloaded there if absent and online)
  name: str = ""  # tfds: a prepared TFDS dataset name, e.g. "pg19" or "lm1b" (array_record format)
  text_key: str = "text"  # tfds: the feature holding the text; jsonl: the JSON field holding it
  data_dir: str = ""  # where TFDS datasets are prepared / read; "" = TFDS default (~/tensorflow_datasets)
  train_split: str = "train"  # split used for training
  eval_split: str = "validation"  # split used for periodic evaluation
  # stdlib / text_files / jsonl: % held out for validation: whole files by path hash, or, when that leaves a split
  # without a file (e.g. one file), the last % of every file (text: bytes cut at a line start; jsonl: records)
  validation_percent: int = 5
  max_documents: int = 0  # stdlib / text_files / jsonl: use only the first N files in path order; 0 = all
  tokenizer: str = "bytes"  # bytes (vocab 256, utf-8 bytes) | sentencepiece
  tokenizer_path: str = ""  # sentencepiece: the .model file (e.g. Llama-2's tokenizer.model)
  add_eos: bool = True  # append the tokenizer's EOS id after each document when it has one (bytes: none)
  worker_count: int = 0  # grain worker processes (0 = in the main process)
  # carry: CEMA / norm / attention state flows across the documents packed in a window (official) | reset: the
  # model restarts at every document start and the loss skips predicting a document's first token
  document_boundaries: str = "carry"
  # Several sources drawn with weights, "LABEL:WEIGHT [key=value ...]; ...", each source these settings with its
  # overrides, e.g. "stdlib:3; code:1 dataset=text_files path=/data/*.py" (data/mixture.py); "" = the one dataset
  mixture: str = ""

  def replace(self, **changes) -> "DataConfig":
    return dataclasses.replace(self, **changes)


FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig))
