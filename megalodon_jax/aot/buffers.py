"""Reading XLA's buffer assignment: what fills a compiled program's temporary memory, and where it comes from.

XLA writes `<module>.after_optimizations-buffer-assignment.txt` when a compile is asked to dump
(`compiler_options={"xla_dump_to": DIR}`): every allocation with its kind (parameter, output, preallocated-temp,
thread-local, constant), its memory space ("color"; 0 is device memory, HBM) and the HLO values that share it.
Values inside the preallocated temp block overlap in time, so its size is the peak of temporaries, and its
largest values are the tensors that set that peak. The optimised HLO (`after_optimizations.txt`) gives each
instruction's `op_name` (the jax source path of the operation), which says which part of the model made it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import re
from typing import Optional

_ALLOC = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r"^\s*value: <\d+ ([^ >{]+)(?:\{[^}]*\})? @\d+> \(size=(\d+),offset=(\d+)\): (.+)$")
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{[^}]*op_name=\"([^\"]*)\"")
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


@dataclasses.dataclass(frozen=True)
class Temporary:
  """One tensor of the temp block: its HLO instruction, shape (with TPU tiling stripped), bytes, jax op_name."""
  instruction: str
  shape: str
  bytes: int
  op_name: str


@dataclasses.dataclass(frozen=True)
class BufferReport:
  """temp_bytes: the device-memory (color 0) temp and thread-local allocations; largest: the biggest distinct
  temporaries of the temp block. XLA:TPU's memory_analysis() reports more than temp_bytes, a reserve the dump
  does not itemise (its size, measured: benchmarks/RESULTS.md#figures-moved-from-code-comments-issue-21), so
  temp_bytes is a lower bound; the report's temp_gib is memory_analysis()'s."""
  temp_bytes: int
  largest: tuple[Temporary, ...]


def _find(dump_dir: str, suffix: str, module_hint: str) -> Optional[str]:
  """The dump file ending in `suffix` of the largest module whose name contains `module_hint`."""
  files = [f for f in glob.glob(os.path.join(dump_dir, f"*{suffix}")) if module_hint in os.path.basename(f)]
  return max(files, key=os.path.getsize) if files else None


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
  """The FileNames / FunctionNames / FileLocations / StackFrames tables at the top of a dumped HLO module."""
  tables: dict[str, dict[int, str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
      continue
    m = _TABLE_ROW.match(line) if current is not None else None
    if m:
      current[int(m.group(1))] = m.group(2)
    elif current is not None and line.strip():
      current = None
  return tables


def _source(frame_id: int, tables: dict[str, dict[int, str]]) -> str:
  """"megalodon_jax/nn/attention.py:120 (MovingAverageGatedAttention.__call__)" for a stack frame id, or ""."""
  frame = tables.get("StackFrames", {}).get(frame_id, "")
  loc_id = re.search(r"file_location_id=(\d+)", frame)
  loc = tables.get("FileLocations", {}).get(int(loc_id.group(1)), "") if loc_id else ""
  ids = dict(re.findall(r"(file_name_id|function_name_id|line)=(\d+)", loc))
  if not ids:
    return ""
  path = tables.get("FileNames", {}).get(int(ids.get("file_name_id", 0)), "").strip('"')
  func = tables.get("FunctionNames", {}).get(int(ids.get("function_name_id", 0)), "").strip('"')
  marker = "megalodon_jax/"
  path = path[path.rindex(marker):] if marker in path else os.path.basename(path)
  return f"{path}:{ids.get('line', '?')} ({func})"


def op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: "op_name @ source line"} from optimised HLO text."""
  tables = _tables(hlo_text)
  out = {}
  for line in hlo_text.splitlines():
    m = _OP_NAME.match(line)
    if m:
      frame = _FRAME_ID.search(line)
      where = _source(int(frame.group(1)), tables) if frame else ""
      out[m.group(1)] = m.group(2) + (f" @ {where}" if where else "")
  return out


def parse(assignment_text: str, names: Optional[dict[str, str]] = None, top: int = 8) -> BufferReport:
  """Temp bytes in device memory and the `top` largest distinct temporaries (one per shape and op) of a dump."""
  names = names or {}
  temp_bytes, values, in_temp = 0, {}, False
  for line in assignment_text.splitlines():
    m = _ALLOC.match(line)
    if m:
      rest = m.group(3)
      color = re.search(r"color (\d+)", rest)
      device_memory = color is None or color.group(1) == "0"
      in_temp = "preallocated-temp" in rest and device_memory
      if device_memory and ("preallocated-temp" in rest or "thread-local" in rest):
        temp_bytes += int(m.group(2))
      continue
    if not in_temp:
      continue
    v = _VALUE.match(line)
    if v:
      # The layout stripped: "bf16[8,128,32000]{2,1,0:T(8,128)(2,1)}" -> "bf16[8,128,32000]".
      instr, size, shape = v.group(1), int(v.group(2)), re.sub(r"\{[^}]*\}$", "", v.group(4).strip())
      if shape.startswith("("):  # a tuple: a table of pointers to other buffers
        continue
      op = names.get(instr, "")
      key = (shape, op or instr)
      if size > values.get(key, Temporary(instr, shape, -1, op)).bytes:
        values[key] = Temporary(instr, shape, size, op)
  largest = sorted(values.values(), key=lambda t: -t.bytes)[:top]
  return BufferReport(temp_bytes, tuple(largest))


def read_dump(dump_dir: str, module_hint: str, top: int = 8) -> Optional[BufferReport]:
  """The BufferReport of the dumped module whose name contains `module_hint` (e.g. "train_step"), or None."""
  path = _find(dump_dir, "after_optimizations-buffer-assignment.txt", module_hint)
  if path is None:
    return None
  hlo_path = _find(dump_dir, "after_optimizations.txt", module_hint)
  names = op_names(pathlib.Path(hlo_path).read_text()) if hlo_path is not None else {}
  return parse(pathlib.Path(path).read_text(), names, top)


def short_op(op_name: str, width: int = 90) -> str:
  """The informative tail of a jax op_name ("jit(train_step)/.../mega/einsum" -> ".../mega/einsum")."""
  parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose(", "checkpoint"))]
  text = "/".join(parts)
  return text if len(text) <= width else "..." + text[-(width - 3):]
