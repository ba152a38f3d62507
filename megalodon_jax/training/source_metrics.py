"""Evaluation metrics per data source (`data.mixture`): `eval_loss/<label>` and `eval_bpb/<label>` (or
`eval_ppl/<label>`), each token-weighted over that source's evaluation batches. No jax import.

The overall `eval_loss` stays the token-weighted mean over every batch, all sources together; a run without a
mixture gets no per-source keys.
"""

from __future__ import annotations

from typing import Any, Sequence

from megalodon_jax.training.metrics import loss_metrics


def per_source_metrics(batches: Sequence[Any], totals: Sequence[dict[str, Any]], *,
                       byte_level: bool) -> dict[str, float]:
  """{"eval_loss/<label>", "eval_bpb/<label>" or "eval_ppl/<label>"} of each source.

  Args:
    batches: the evaluation batches; a mixture's (`mixture_pipeline.EvalBatches`) name each batch's source in
      `.sources`, any other list gives {}.
    totals: per batch, the eval step's {"loss_sum", "tokens"} (scalars).
  """
  labels = getattr(batches, "sources", None)
  if not labels:
    return {}
  sums: dict[str, list[float]] = {}
  for label, t in zip(labels, totals):
    acc = sums.setdefault(label, [0.0, 0.0])
    acc[0] += float(t["loss_sum"])
    acc[1] += float(t["tokens"])
  out: dict[str, float] = {}
  for label, (loss_sum, tokens) in sums.items():
    metrics = loss_metrics(loss_sum / tokens, byte_level=byte_level, prefix="eval_")
    out.update({f"{k}/{label}": v for k, v in metrics.items()})
  return out
