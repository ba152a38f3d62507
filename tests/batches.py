"""Global batches assembled from several simulated processes' iterators, and their comparison (the data-order and
mixture tests)."""

import numpy as np


def global_batches(iterators, steps):
  """`steps` global batches: the process-local rows of every process, concatenated in process order."""
  out = []
  for _ in range(steps):
    local = [next(it) for it in iterators]
    out.append({k: np.concatenate([b[k] for b in local]) for k in local[0]})
  return out


def assert_same(got, want, keys=None):
  """Equal lists of batches, int32 arrays, with exactly `keys` (default: the keys `want` has)."""
  assert len(got) == len(want)
  for g, w in zip(got, want):
    expected = set(w) if keys is None else set(keys)
    assert set(g) == expected
    for k in sorted(expected):
      assert g[k].dtype == np.int32
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)
