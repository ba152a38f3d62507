"""benchmarks/tpu_compile_profile.py reads libtpu's own log lines: stage durations, HLO pass times and, per kernel,
the time from the start of its lowering to its end on the same thread (threads interleave). The lines below are
libtpu's output as it writes it (from a tiny v5e-4 train-step compile); the expected figures are worked out by hand
from their timestamps."""

from __future__ import annotations

import pytest

from benchmarks import tpu_compile_profile as prof

LOG = """\
I1207 20:57:10.486243   29196 hlo_pass_pipeline.cc:176] HLO pass: layout-assignment time: 1.06 s (1063165 us) (cumulative: 4.14 s, max: 1.06 s, #called: 510)
I1207 20:57:11.000001   29196 hlo_pass_pipeline.cc:176] HLO pass: layout-assignment time: 12 ms (12000 us) (cumulative: 4.16 s, max: 1.06 s, #called: 511)
I1207 20:57:11.100000   29196 hlo_pass_pipeline.cc:176] HLO pass: cse time: 850 us (850 us) (cumulative: 4.2 s, max: 1.06 s, #called: 512)
I1207 20:57:13.201730   29169 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage duration: 5.40054005575s
I1207 21:09:24.535866   29704 lowering_emitter.cc:5283] SEQUENTIAL_TRY_START: hlo=iota_add_fusion.1 attempt=1 retry_count=0 bounds=[N/A] retry_opt=false
I1207 21:09:24.536162   29705 lowering_emitter.cc:5283] SEQUENTIAL_TRY_START: hlo=fusion.624 attempt=1 retry_count=0 bounds=[N/A] retry_opt=false
I1207 21:09:24.548498   29704 lowering_emitter.cc:6139] Finished lowering iota_add_fusion.1
I1207 21:09:24.550796   29704 lowering_emitter.cc:5283] SEQUENTIAL_TRY_START: hlo=constant_dynamic-update-slice_fusion.21 attempt=1 retry_count=0 bounds=[N/A] retry_opt=false
W1207 21:09:24.551000   29704 barrier_assignment.cc:660] Number of times slow barrier appeared: 2
I1207 21:09:24.552534   29704 lowering_emitter.cc:6139] Finished lowering constant_dynamic-update-slice_fusion.21
I1207 21:09:25.036162   29704 lowering_emitter.cc:6139] Finished lowering fusion.624
I1207 21:09:25.136162   29705 lowering_emitter.cc:6139] Finished lowering fusion.624
I1207 21:16:14.812759   29898 deepsea_compiler_base.cc:3931] BACKEND_PASSES stage duration: 4m52.5573472275s
I1207 21:16:39.461248   29797 deepsea_compiler_base.cc:985] END_TO_END stage duration: 6m22.158113471s
"""


def test_log_gives_stages_passes_and_kernels_per_thread():
  r = prof.parse_log(LOG.splitlines(keepends=True))
  assert r["stages"] == pytest.approx({"HLO_PASSES": 5.40054005575, "BACKEND_PASSES": 4 * 60 + 52.5573472275,
                                       "END_TO_END": 6 * 60 + 22.158113471})
  assert r["passes"]["layout-assignment"] == pytest.approx(1.063165 + 0.012)
  assert r["passes"]["cse"] == pytest.approx(0.00085)
  # fusion.624 started on thread 29705 and ended there 0.6 s later; the "Finished" on thread 29704 is not its end.
  assert dict(r["kernels"]) == pytest.approx({"iota_add_fusion.1": 0.012632, "fusion.624": 0.6,
                                              "constant_dynamic-update-slice_fusion.21": 0.001738}, abs=1e-9)


def test_durations_in_libtpus_notation():
  assert prof.duration_seconds("1m1.647015119s") == pytest.approx(61.647015119)
  assert prof.duration_seconds("850ms") == pytest.approx(0.85)
  assert prof.duration_seconds("1h2m3s") == pytest.approx(3723.0)


def test_kernels_group_by_loop_body_and_operation():
  # Names as aot.buffers.op_names reads them from the dump: the op_name, then " @ " and the source line where known.
  names = {"fusion.1": "jit(train_step)/transpose(jvp())/while/body/closed_call/checkpoint/dot_general",
           "fusion.2": "jit(train_step)/jit(_where)/select_n", "fusion.3": "jit(train_step)/jit(_where)/select_n @ megalodon_jax/training/train_step.py:142 (train_step)"}
  groups = prof.group_kernels({"fusion.1": 3.0, "fusion.2": 1.0, "fusion.3": 1.5, "all-reduce.7": 4.0}, names)
  assert groups == [("? (no metadata: collectives, copies, layout changes)", 4.0, 1),
                    ("loop checkpoint/dot_general", 3.0, 1), ("top  jit(_where)/select_n", 2.5, 2)]
