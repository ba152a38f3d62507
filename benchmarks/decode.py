"""Decode latency and memory vs context position, and prefill throughput vs prompt length (inference/generation.py).

  python benchmarks/decode.py                                   # tiny and small models on CPU, positions 1K..1M
  python benchmarks/decode.py --models 1b --dtype bfloat16 --prefill-piece 65536 --out decode_gpu.json   # GPU

Megalodon's cache has a fixed size (one attention chunk of K/V, CEMA and norm states per layer), so the latency of
one decode step and the memory should not depend on how many tokens came before. For each position P the cache is
advanced to P by prefilling in large pieces (the Generator's prefill, which never forms logits), then `--repeats`
jitted decode blocks of `--block` greedy steps (the Generator's decode program, teacher-forced by nothing: the
model feeds on its own argmax) are timed after one warm-up block; latency = median block time / block. Memory:
the cache's bytes (sum of its arrays), the compiled decode program's buffers (`memory_analysis`: arguments +
outputs + temporaries), the process RSS after decoding on CPU, and the allocator's peak on a GPU.
Prefill: tokens/s of `Generator.prefill` from an empty cache, after a warm-up call that compiles its pieces.
Synthetic uniform token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# The package may not be pip-installed (e.g. a bare GPU machine): import it from this checkout.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from benchmarks.common import machine_info, memory_bytes, time_runs  # pylint: disable=wrong-import-position
from megalodon_jax.config import MegalodonConfig, preset  # pylint: disable=wrong-import-position
from megalodon_jax.inference import generation  # pylint: disable=wrong-import-position
from megalodon_jax.inference.sampling import Sampler  # pylint: disable=wrong-import-position
from megalodon_jax.model import MegalodonLM  # pylint: disable=wrong-import-position

MODELS = {
    # configs/tiny.py's shape (133K params).
    "tiny": dict(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=2, ffn_hidden_dim=128, cema_ndim=8,
                 chunk_size=64, norm_num_groups=8, vocab_size=256),
    # benchmarks/train_step.py's small model (1.6M params), chunk 2048 as in the presets.
    "small": dict(num_layers=2, model_dim=256, z_dim=64, value_dim=512, num_heads=1, ffn_hidden_dim=512,
                  cema_ndim=16, chunk_size=2048, norm_num_groups=32, vocab_size=256),
}


def model_config(name: str, dtype: str) -> MegalodonConfig:
  if name == "1b":
    return preset("mega1.3B", dtype=dtype)
  return MegalodonConfig(**MODELS[name], dtype=dtype)


def _rss_mib() -> float | None:
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
  except (OSError, StopIteration):
    return None


def _cache_bytes(cache) -> int:
  return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(cache))


def _timed_prefill(gen: generation.Generator, ids: np.ndarray, cache=None):
  t0 = time.perf_counter()
  cache, _ = gen.prefill(ids, cache)
  jax.block_until_ready(cache)
  return cache, time.perf_counter() - t0


def bench_model(name: str, args) -> dict:
  cfg = model_config(name, args.dtype)
  model = MegalodonLM(cfg, rngs=nnx.Rngs(0))
  piece = max(cfg.chunk_size, args.prefill_piece // cfg.chunk_size * cfg.chunk_size)
  gen = generation.Generator(model, prefill_piece=piece, block_size=args.block)
  rng = np.random.default_rng(0)
  out = {"model": name, "num_params": cfg.num_params(), "chunk_size": cfg.chunk_size, "dtype": args.dtype,
         "prefill_piece": piece, "block": args.block, "prefill": [], "decode": []}

  for length in args.prefill_lengths:
    ids = rng.integers(0, cfg.vocab_size, (1, length)).astype(np.int32)
    if length <= 4 * piece:
      _timed_prefill(gen, ids)  # compiles this length's pieces (longer prompts reuse the piece shape)
    _, seconds = _timed_prefill(gen, ids)
    out["prefill"].append({"length": length, "seconds": seconds, "tokens_per_sec": length / seconds})
    print(f"{name} prefill {length}: {length / seconds:,.0f} tokens/s", file=sys.stderr)

  # Decode: one program for every position (batch 1, a 16-column dummy prompt that is never read).
  greedy = Sampler(temperature=0.0).as_arrays()
  args_tail = (jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.full((1, 4), -1, jnp.int32),
               jnp.int32(2**30), jax.random.key(0), greedy)
  cache, consumed, compiled_mem = gen.model.init_cache(1), 0, None
  for position in args.positions:
    ids = rng.integers(0, cfg.vocab_size, (1, position - consumed)).astype(np.int32)
    cache, _ = _timed_prefill(gen, ids, cache)
    consumed = position
    logits = jnp.zeros((1, cfg.vocab_size), jnp.float32)
    # The Generator's decode program, started from the advanced cache (stream() would prefill again).
    carry = generation._DecodeState(  # pylint: disable=protected-access
        cache, logits, jnp.int32(0), jnp.zeros((1,), bool), jnp.zeros((1,), bool), jnp.zeros((1,), jnp.int32))
    if compiled_mem is None:  # one program for every position: compiled once, ahead of time
      decode = generation._decode.lower(gen.graphdef, gen.state, carry, *args_tail,  # pylint: disable=protected-access
                                        steps=args.block).compile()
      compiled_mem = memory_bytes(decode)
    held = {"carry": carry}

    def one_block():  # each block continues from the previous block's cache
      held["carry"], tokens, _ = decode(gen.state, held["carry"], *args_tail)
      return tokens

    times = time_runs(one_block, args.repeats)
    carry = held["carry"]
    row = {"position": position, "ms_per_token": 1e3 * statistics.median(times) / args.block,
           "cache_bytes": _cache_bytes(carry.cache), "compiled_decode_bytes": compiled_mem.get("total_bytes"),
           "rss_mib": _rss_mib(), "finite": bool(np.isfinite(np.asarray(carry.logits)).all())}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      row["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    out["decode"].append(row)
    print(f"{name} position {position}: {row['ms_per_token']:.3f} ms/token", file=sys.stderr)
  return out


def format_tables(results: list[dict]) -> str:
  lines = ["| model | params | position | ms / token | cache KiB | decode program KiB | RSS MiB | device peak MiB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    for d in r["decode"]:
      peak = d.get("device_peak_bytes")
      rss = d["rss_mib"]
      lines.append(f"| {r['model']} | {r['num_params']:,} | {d['position']:,} | {d['ms_per_token']:.3f} | "
                   f"{d['cache_bytes'] / 1024:,.1f} | {(d['compiled_decode_bytes'] or 0) / 1024:,.0f} | "
                   f"{'-' if rss is None else f'{rss:,.0f}'} | {'-' if peak is None else f'{peak / 2**20:,.0f}'} |")
  lines += ["", "| model | prompt tokens | prefill s | tokens/s |", "|---|---|---|---|"]
  for r in results:
    for p in r["prefill"]:
      lines.append(f"| {r['model']} | {p['length']:,} | {p['seconds']:.3f} | {p['tokens_per_sec']:,.0f} |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="tiny,small", help="comma separated: tiny, small, 1b")
  p.add_argument("--positions", default="1024,16384,131072,1048576", help="context positions for decode")
  p.add_argument("--prefill-lengths", default="1024,4096,16384,65536,262144", help="prompt lengths for prefill")
  p.add_argument("--prefill-piece", type=int, default=16384, help="largest prefill call (rounded to the chunk)")
  p.add_argument("--block", type=int, default=32, help="decode steps per jitted call")
  p.add_argument("--repeats", type=int, default=5, help="timed decode blocks per position")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--out", default="", help="write results + machine info as JSON here")
  args = p.parse_args(argv)
  args.positions = sorted(int(x) for x in args.positions.split(","))
  args.prefill_lengths = sorted(int(x) for x in args.prefill_lengths.split(","))
  return args


def main(argv=None):
  args = parse_args(argv)
  results = [bench_model(name, args) for name in args.models.split(",")]
  print(f"{machine_info()['device_kind']}, dtype {args.dtype}, decode block {args.block}, "
        f"prefill piece {args.prefill_piece}")
  print(format_tables(results))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"machine": machine_info(), "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
