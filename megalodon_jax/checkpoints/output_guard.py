"""Outputs that never swallow inputs: which folders a checkpoint path puts at stake, and the checks the command
lines run on their output paths before they load anything.

- `checkpoint_areas(path)`: the run directory a checkpoint path belongs to (`root`) and the checkpoint's own files
  (`data`). A train.py workdir W is its own root and `W/checkpoints` its data, whether the path names W, its
  checkpoints/ folder, a step folder or a step's state/ item; a params-only folder (from-pytorch) or a step folder
  outside a workdir is both; for a file (a PyTorch checkpoint) the root is its folder and the data the file itself.
- `check_separate(out, ...)`: an output folder must not be, contain, or lie inside anything the command reads
  (convert: `--out` against the run directory, `--torch`, `--config`).
- `check_new_entries(out, known, ...)`: `--overwrite` replaces a folder only when every entry in it is one the
  command writes itself (an earlier export); anything else is named and nothing is deleted.
- `check_output_folder(out, ...)`: an output folder is new, empty, or (with `--overwrite`) an earlier output of the
  same writer (`check_new_entries`); never a file. Checked here, without jax, so convert refuses it at once.
- `check_output_file(path, ...)`: an output file (evaluate's report and plot, generate's JSON lines) must not be a
  folder, an input, anything inside the checkpoint's data, or an existing file the run wrote in its directory
  (`layout.RUN_FILES`, `layout.RUN_FOLDERS`); the user's own files there (runs/tiny/eval.json, new or from an
  earlier evaluation) are fine. Beside a PyTorch checkpoint every existing file counts as the checkpoint's.

Paths are compared with `paths.canonical` (local symlinks resolved, URLs normalised), so a link cannot route an
output around these checks.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Sequence

from megalodon_jax import paths
from megalodon_jax.checkpoints import layout, tokenizer_copy
from megalodon_jax.errors import MegalodonError

_RELATION = {"same": "is", "contains": "contains", "inside": "lies inside"}


@dataclasses.dataclass(frozen=True)
class Areas:
  """What reading a checkpoint path puts at stake (canonical paths, see the module docstring).

  root: the run directory, or the checkpoint folder itself, or a file's folder.
  data: the checkpoint's own files (a run's checkpoints/ folder, a step or params-only folder, a checkpoint file);
    None for a folder that holds no Orbax checkpoint (PyTorch files).
  """
  root: str
  data: Optional[str]


def _parent(path: str) -> str:
  return os.path.dirname(path.rstrip("/"))


def checkpoint_areas(path: str) -> Areas:
  """The `Areas` of a checkpoint path (anything `--checkpoint` accepts); reads folder listings only."""
  real = paths.canonical(path)
  p = paths.as_path(real)
  if not p.exists():
    return Areas(real, real)  # nothing is read from it: the command fails later, naming it
  if not p.is_dir():
    return Areas(_parent(real), real)
  kind = layout.folder_kind(real)
  if kind == layout.STATE:
    real, kind = _parent(real), "step"
  if kind == "step":
    above = _parent(real)
    if os.path.basename(above) == layout.CHECKPOINTS_DIR:
      return Areas(_parent(above), above)
    return Areas(real, real)
  if kind == "workdir":
    return Areas(real, paths.join(real, layout.CHECKPOINTS_DIR))
  if kind == "params":
    return Areas(real, real)
  if os.path.basename(real) == layout.CHECKPOINTS_DIR:  # a workdir's checkpoints/ folder
    return Areas(_parent(real), real)
  if layout.finished_steps(real):  # a checkpoints folder moved out of its workdir
    return Areas(real, real)
  return Areas(real, None)


def check_separate(out: str, flag: str, sources: Sequence[tuple[str, str]],
                   error: type[MegalodonError]) -> None:
  """Raises `error` when the output folder `out` is, contains or lies inside one of `sources`.

  Args:
    out: the output folder (given by `flag`, e.g. "--out").
    sources: (what, path) pairs the command reads, e.g. ("the run directory of --checkpoint runs/tiny", root).
  """
  for what, source in sources:
    relation = paths.overlap(out, source)
    if relation is not None:
      raise error(f"{flag} {out} {_RELATION[relation]} {what} ({paths.canonical(source)}): writing there would "
                  f"replace or mix with what the command reads; choose a {flag} outside it")


def describe_entries(names: Sequence[str], limit: int = 5) -> str:
  """`a, b, c` or `a, b, c, d, e and 3 more (8 entries)` for an error line."""
  shown = ", ".join(names[:limit])
  return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more ({len(names)} entries)"


def entries(folder: str) -> list[str]:
  """The names in `folder`, sorted, folders with a trailing "/" ([] when it does not exist)."""
  p = paths.as_path(folder)
  if not p.is_dir():
    return []
  return sorted(e.name + ("/" if e.is_dir() else "") for e in p.iterdir())


@dataclasses.dataclass(frozen=True)
class KnownEntries:
  """The entries an output folder's writer creates, which `--overwrite` may replace.

  pattern: full match of an entry's name (folders with a trailing "/").
  writer: who writes them, for messages ("a to-pytorch export").
  text: the entries in words ("consolidated*.pth, params.json, ...").
  """
  pattern: re.Pattern
  writer: str
  text: str


def check_new_entries(out: str, flag: str, known: KnownEntries, error: type[MegalodonError]) -> None:
  """Raises `error` naming the entries of the folder `out` that `known` does not cover (so `--overwrite`, which
  replaces the folder whole, deletes nothing the writer did not create)."""
  foreign = [name for name in entries(out) if not known.pattern.fullmatch(name)]
  if foreign:
    raise error(f"{flag} {out} holds {describe_entries(foreign)}, which {known.writer} never writes: --overwrite only "
                f"replaces an earlier output ({known.text}) and deletes nothing else; move those away or choose "
                f"another {flag}")


# Every entry `model_io.save_params_checkpoint` writes: Orbax's params item (seen in its output: local and gs://,
# NumPy and sharded jax arrays) and our sidecars. `--overwrite` of a from-pytorch output replaces these only. Kept
# here, beside the checks, so that convert can refuse an --out before it imports jax.
PARAMS_CHECKPOINT_ENTRIES = KnownEntries(
    re.compile(r"_METADATA|_CHECKPOINT_METADATA|_sharding|manifest\.ocdbt|commit_success\.txt|d/|array_metadatas/"
               r"|ocdbt\.process_\d+/|"
               + re.escape(layout.CONFIG_FILE) + "|" + re.escape(tokenizer_copy.TOKENIZER_FILE)),
    "a params-only checkpoint (from-pytorch)",
    f"Orbax's _METADATA, _CHECKPOINT_METADATA, _sharding, manifest.ocdbt, commit_success.txt, d/, array_metadatas/, "
    f"ocdbt.process_N/, and {layout.CONFIG_FILE}, {tokenizer_copy.TOKENIZER_FILE}")


def check_output_folder(out: str, flag: str, known: KnownEntries, error: type[MegalodonError], *,
                        overwrite: bool) -> None:
  """Refuses an output path that is a file, a folder holding any entry that `known` does not cover (so nothing
  the writer did not create is ever deleted), or a non-empty folder unless `overwrite`."""
  if paths.is_remote(out):
    p = paths.as_path(out)
    if p.is_file():
      raise error(f"{flag} {out} exists and is not a folder; remove it or choose another path")
    non_empty = p.is_dir() and any(p.iterdir())
  else:
    out = os.path.abspath(os.path.expanduser(out))
    if not os.path.lexists(out):
      return
    if not os.path.isdir(out) or os.path.islink(out):
      raise error(f"{flag} {out} exists and is not a folder; remove it or choose another path")
    non_empty = bool(os.listdir(out))
  if non_empty:
    check_new_entries(out, flag, known, error)  # first: --overwrite would not help
    if not overwrite:
      raise error(f"{flag} {out} exists and holds an earlier output; pass --overwrite to replace it")


def check_output_file(path: Optional[str], flag: str, checkpoint: str, error: type[MegalodonError],
                      inputs: Sequence[tuple[str, str]] = ()) -> None:
  """Raises `error` unless `path` is a safe place for a new output file (see the module docstring).

  Args:
    path: the output file (None: nothing to check), given by `flag`.
    checkpoint: the checkpoint path the command reads.
    inputs: (role, path) of the other files the command reads or writes, the role in words ("read by --text_files",
      "written as --output").
  """
  if path is None:
    return
  p = paths.as_path(path)
  if p.is_dir():
    raise error(f"{flag} {path} is a folder; name a file to write, e.g. {paths.join(path, 'out' + _suffix(flag))}")
  if not paths.is_remote(path):  # object stores have no folders to check
    parent = os.path.dirname(paths.abspath(path))
    if not os.path.isdir(parent):
      raise error(f"{flag} {path}: the folder {parent} does not exist")
  for what, source in inputs:
    if paths.overlap(path, source) == "same":
      raise error(f"{flag} {path} is also {what}: choose another file")
  areas = checkpoint_areas(checkpoint)
  if areas.data is not None and paths.overlap(path, areas.data) in ("same", "inside"):
    raise error(f"{flag} {path} lies inside the checkpoint {areas.data} that --checkpoint reads: writing there "
                f"could damage it; choose a file outside it")
  if p.exists() and paths.overlap(path, areas.root) == "inside" and _belongs_to(path, areas.root):
    raise error(f"{flag} {path} would replace {paths.canonical(path)}, an existing file of the checkpoint's "
                f"directory {areas.root}; choose a new file name (or a path outside that directory)")


def _belongs_to(path: str, root: str) -> bool:
  """Whether the file `path` inside `root` is the checkpoint's: in a training run's directory, one of the files the
  run writes (a user's own files there, e.g. an earlier report, may be replaced); in any other folder (a PyTorch
  export), every file."""
  if layout.folder_kind(root) != "workdir":
    return True
  rel = os.path.relpath(paths.canonical(path), root) if not paths.is_remote(path) else \
      paths.canonical(path)[len(root.rstrip("/")) + 1:]
  top = rel.replace(os.sep, "/").split("/")[0]
  return top in layout.RUN_FILES + layout.RUN_FOLDERS


def _suffix(flag: str) -> str:
  return {"--plot": ".png", "--output_jsonl": ".jsonl"}.get(flag, ".json")
