"""The optax optimizer against the official recipe: LambdaLR schedule formulas, and step-by-step parity with
torch.optim.AdamW + LambdaLR + the FSDP-style global-norm clip (docs/training.md#optimizer)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from megalodon_jax.training.optimizer import clip_by_global_norm_official, lr_schedule, make_optimizer


def ref_ratio(step, warmup, total, scheduler, init, end, cycles):
  """The official multiplier, written out from docs/training.md#learning-rate-schedule independently of the module
  under test."""
  if step < warmup:
    return init + step * (1.0 - init) / warmup
  if scheduler == "constant":
    return 1.0
  if step > total:
    return end
  s = (step - warmup) / (total - warmup)
  if scheduler == "linear":
    return s * end + (1.0 - s)
  return end + 0.5 * (1.0 - end) * (1.0 + math.cos(math.pi * s * cycles))


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total,init,end,cycles", [(10, 50, 1e-4, 0.01, 1.0), (7, 40, 0.1, 0.2, 0.5),
                                                          (0, 20, 1e-4, 0.05, 2.0)])
def test_schedule_matches_formula(scheduler, warmup, total, init, end, cycles):
  peak = 3e-4
  sched = lr_schedule(peak, total, warmup, scheduler, init, end, cycles)
  steps = np.arange(0, total + 15)
  got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(steps)))
  want = np.array([peak * ref_ratio(int(k), warmup, total, scheduler, init, end, cycles) for k in steps])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)


def test_schedule_boundaries():
  peak, warmup, total, init, end = 2.0, 4, 12, 1e-4, 0.01
  lin = lr_schedule(peak, total, warmup, "linear", init, end)
  cos = lr_schedule(peak, total, warmup, "cosine", init, end)
  const = lr_schedule(peak, total, warmup, "constant", init, end)
  for sched in (lin, cos, const):
    np.testing.assert_allclose(sched(0), peak * init, rtol=1e-6)  # step 0 starts at init_ratio
    np.testing.assert_allclose(sched(warmup), peak, rtol=1e-6)  # warmup ends exactly at the peak
    np.testing.assert_allclose(sched(warmup - 1), peak * (init + (warmup - 1) * (1 - init) / warmup), rtol=1e-6)
  for sched in (lin, cos):
    np.testing.assert_allclose(sched(total), peak * end, rtol=1e-6)
    np.testing.assert_allclose(sched(total + 1), peak * end, rtol=1e-6)
    np.testing.assert_allclose(sched(10 * total), peak * end, rtol=1e-6)
  np.testing.assert_allclose(const(10 * total), peak, rtol=1e-6)
  # Cosine with cycles != 1 is not at end_ratio at `total` (the formula is used through step == total), then
  # jumps to end_ratio after it, as the official lambda does.
  cos2 = lr_schedule(peak, total, warmup, "cosine", init, end, cycles=0.5)
  np.testing.assert_allclose(cos2(total), peak * (end + 0.5 * (1 - end)), rtol=1e-6)
  np.testing.assert_allclose(cos2(total + 1), peak * end, rtol=1e-6)


def _official_clip_(params, max_norm):
  """The official clip: global L2 norm over all grads, scale by max_norm / (norm + 1e-6) if that is < 1."""
  norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
  coef = max_norm / (norm.item() + 1e-6)
  if coef < 1:
    for p in params:
      p.grad.mul_(coef)
  return norm.item(), coef < 1


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_matches_torch_adamw_lambdalr(scheduler):
  peak, warmup, total, init, end, cycles, clip = 1e-2, 3, 8, 1e-4, 0.01, 1.0, 1.0
  b1, b2, eps, wd = 0.9, 0.98, 1e-8, 0.1
  n_steps = 11  # updates 0..2 warm up, 3..8 decay, 9..10 are past `total`
  rng = np.random.default_rng(0)
  shapes = {"w": (4, 3), "b": (3,), "norm": (5,), "emb": (2, 3, 2)}
  init_params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  # Large scales trigger the clip, small ones leave the gradients untouched; both paths must match.
  scales = [30.0, 0.01, 5.0, 0.05, 100.0, 0.02, 1.0, 0.03, 10.0, 0.01, 50.0]
  grads = [{k: (rng.standard_normal(s) * sc).astype(np.float32) for k, s in shapes.items()} for sc in scales]

  lam = lambda step: ref_ratio(step, warmup, total, scheduler, init, end, cycles)
  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init_params.items()}
  plist = list(tparams.values())
  topt = torch.optim.AdamW(plist, lr=peak, betas=(b1, b2), eps=eps, weight_decay=wd)
  tsched = torch.optim.lr_scheduler.LambdaLR(topt, lam)

  tx = make_optimizer(peak, total, warmup, scheduler=scheduler, init_ratio=init, end_ratio=end, cycles=cycles,
                      b1=b1, b2=b2, eps=eps, weight_decay=wd, clip=clip)
  params = jax.tree_util.tree_map(jnp.asarray, init_params)
  state = tx.init(params)
  sched = lr_schedule(peak, total, warmup, scheduler, init, end, cycles)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  clipped = []
  for k in range(n_steps):
    # Step indexing: the lr torch uses for update k (set by k prior scheduler.step() calls) is peak * lambda(k),
    # and optax evaluates the schedule at count k for the same update.
    torch_lr = topt.param_groups[0]["lr"]
    assert torch_lr == pytest.approx(peak * lam(k), rel=1e-12)
    assert float(sched(k)) == pytest.approx(torch_lr, rel=1e-6)
    if k < total:
      # The test distinguishes an off-by-one: neighbouring multipliers differ here.
      assert abs(lam(k + 1) - lam(k)) > 1e-3 * lam(k)

    topt.zero_grad()
    for name, p in tparams.items():
      p.grad = torch.tensor(grads[k][name])
    clipped.append(_official_clip_(plist, clip)[1])
    topt.step()
    tsched.step()

    params, state = step(params, state, jax.tree_util.tree_map(jnp.asarray, grads[k]))
    for name, p in tparams.items():
      np.testing.assert_allclose(np.asarray(params[name]), p.detach().numpy(), rtol=1e-6, atol=1e-7,
                                 err_msg=f"param {name} after update {k}")
  assert any(clipped) and not all(clipped)  # both clipped and unclipped updates were compared


def test_off_by_one_schedule_would_fail():
  """A schedule shifted by one update (lambda(k+1) for update k) diverges from torch: the parity above is tight."""
  peak, warmup, total = 1e-2, 3, 8
  good = lr_schedule(peak, total, warmup, "linear")
  lam = lambda step: ref_ratio(step, warmup, total, "linear", 1e-4, 0.01, 1.0)
  for k in range(total):
    assert float(good(k)) == pytest.approx(peak * lam(k), rel=1e-6)
    assert float(good(k)) != pytest.approx(peak * lam(k + 1), rel=1e-3)


def test_clip_official_epsilon():
  clip = clip_by_global_norm_official(1.0)
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0]])}  # global norm 5
  out, _ = clip.update(g, clip.init(g))
  np.testing.assert_allclose(out["a"], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-7)
  # Below the threshold: untouched, bit for bit.
  small = {"a": jnp.array([0.3, 0.4])}
  out, _ = clip.update(small, clip.init(small))
  np.testing.assert_array_equal(out["a"], small["a"])
  # Norm exactly max_norm: max_norm / (norm + 1e-6) < 1, so the official clip still scales (optax's would not).
  edge = {"a": jnp.array([1.0])}
  out, _ = clip.update(edge, clip.init(edge))
  assert float(out["a"][0]) < 1.0
  with pytest.raises(ValueError, match="max_norm"):
    clip_by_global_norm_official(0.0)


@pytest.mark.parametrize("decay_mask,vector_decays", [("all", True), ("matrices", False)])
def test_decay_mask(decay_mask, vector_decays):
  peak, wd = 0.1, 0.5
  tx = make_optimizer(peak, 10, 0, scheduler="constant", weight_decay=wd, decay_mask=decay_mask)
  params = {"w": jnp.ones((3, 2)), "bias": jnp.ones((2,)), "nested": {"gamma": jnp.full((4,), 2.0)}}
  state = tx.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  # Zero grads: Adam's term is 0 / (0 + eps) = 0, so the update is pure decoupled decay -lr * wd * p.
  updates, state = tx.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"], params["w"] * (1 - peak * wd), rtol=1e-6)
  for got, old in [(new["bias"], params["bias"]), (new["nested"]["gamma"], params["nested"]["gamma"])]:
    if vector_decays:
      np.testing.assert_allclose(got, old * (1 - peak * wd), rtol=1e-6)
    else:
      np.testing.assert_array_equal(got, old)


def test_grad_accum_applies_mean_every_second_step():
  kwargs = dict(scheduler="linear", init_ratio=0.5, end_ratio=0.1, cycles=1.0, weight_decay=0.1, clip=1.0)
  tx_acc = make_optimizer(1e-2, 6, 1, grad_accum_steps=2, **kwargs)
  tx_ref = make_optimizer(1e-2, 6, 1, **kwargs)
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((3, 3)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((3,)), jnp.float32)}
  micro = [jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 3, jnp.float32), params)
           for _ in range(6)]
  p_acc, s_acc = params, tx_acc.init(params)
  p_ref, s_ref = params, tx_ref.init(params)
  for i, g in enumerate(micro):
    before = p_acc
    u, s_acc = tx_acc.update(g, s_acc, p_acc)
    p_acc = optax.apply_updates(p_acc, u)
    if i % 2 == 0:
      for name in params:
        np.testing.assert_array_equal(p_acc[name], before[name])  # no update on the first micro-batch
    else:
      mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, micro[i - 1], g)
      u, s_ref = tx_ref.update(mean, s_ref, p_ref)
      p_ref = optax.apply_updates(p_ref, u)
      for name in params:
        np.testing.assert_allclose(p_acc[name], p_ref[name], rtol=1e-6, atol=1e-7)
        assert not np.array_equal(p_acc[name], before[name])


@pytest.mark.parametrize("kwargs,name", [
    (dict(warmup_steps=20, total_steps=10), "warmup_steps"),
    (dict(warmup_steps=10, total_steps=10), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10.5), "total_steps"),
    (dict(lr=0.0), r"\.lr=0\.0"),
    (dict(lr=float("nan")), r"\.lr=nan"),
    (dict(scheduler="step"), "scheduler"),
    (dict(init_ratio=-0.1), "init_ratio"),
    (dict(end_ratio=1.5), "end_ratio"),
    (dict(cycles=0.0), "cycles"),
])
def test_schedule_bad_args(kwargs, name):
  args = dict(lr=1e-3, total_steps=100, warmup_steps=10, scheduler="linear")
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    lr_schedule(**args)
  with pytest.raises(ValueError, match=name):
    make_optimizer(args.pop("lr"), args.pop("total_steps"), args.pop("warmup_steps"), **args)


@pytest.mark.parametrize("kwargs,name", [
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(clip=0.0), "clip"),
    (dict(decay_mask="norms"), "decay_mask"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
])
def test_optimizer_bad_args(kwargs, name):
  with pytest.raises(ValueError, match=name):
    make_optimizer(1e-3, 100, 10, **kwargs)


def test_constant_allows_warmup_equal_total_and_clip_none():
  sched = lr_schedule(1.0, 10, 10, "constant")
  assert float(sched(10)) == pytest.approx(1.0)
  # clip=None is plain AdamW with the schedule: compare against optax.adamw on a gradient far above any clip.
  tx = make_optimizer(1.0, 10, 10, scheduler="constant", clip=None)
  ref = optax.adamw(sched, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1)
  p = {"a": jnp.array([1.0, -2.0])}
  s_tx, s_ref = tx.init(p), ref.init(p)
  for g in ([1e3, -5e2], [2e3, 1.0]):
    g = {"a": jnp.array(g)}
    u, s_tx = tx.update(g, s_tx, p)
    u_ref, s_ref = ref.update(g, s_ref, p)
    np.testing.assert_array_equal(u["a"], u_ref["a"])
