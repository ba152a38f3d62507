"""Normalisations and the complex EMA of Megalodon, in plain PyTorch.

See docs/model.md#cema, docs/model.md#timestep-norm and docs/model.md#attention.

Every module keeps the official parameter names and shapes, so `state_dict()` keys match the official model.
Numerics-critical parts run in float32 whatever the parameter dtype: norm statistics, TimestepNorm's running
statistics, the CEMA coefficients, kernel, FFT and state (complex64).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormState = tuple[Tensor, Tensor, Tensor]  # count (B,) int64, mean (B, G) float32, var (B, G) float32


class RMSNorm(nn.Module):
  """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * (1 + weight); `weight` absent if not affine."""

  def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

  def forward(self, x: Tensor) -> Tensor:
    """x: (..., K) any float dtype; mean square in float32. Returns (..., K) in x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
    if self.weight is not None:
      y = y * (1.0 + self.weight.float())
    return y.to(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with the plus-one scale (1 + weight) and shift bias (zero-initialised)."""

  def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
    super().__init__()
    self.dim, self.eps = dim, eps
    self.weight = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None
    self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

  def forward(self, x: Tensor) -> Tensor:
    """x: (..., K) any float dtype; statistics in float32. Returns (..., K) in x.dtype."""
    w = None if self.weight is None else 1.0 + self.weight.float()
    b = None if self.bias is None else self.bias.float()
    return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).to(x.dtype)


def _chan_merge(a: NormState, b: NormState) -> NormState:
  """Merges summaries a then b, each (count, mean, population variance); the Chan/Welford pairwise formula."""
  na, ma, sa = a
  nb, mb, sb = b
  n = na + nb
  wa, wb = na / n, nb / n
  delta = mb - ma
  return n, ma + wb * delta, wa * sa + wb * sb + (wa * wb) * delta.square()


def cumulative_group_stats(x: Tensor, num_groups: int, count: Tensor, mean: Tensor, var: Tensor):
  """Cumulative mean and population variance per group over time, including the carried state.

  See docs/model.md#timestep-norm.

  At step t the statistics are those of the multiset made of `count` pseudo-rows (mean `mean`, variance `var`)
  and every scalar of the group seen at steps ≤ t. Computed as a log-depth parallel prefix of exact pairwise
  (Chan) merges in float32: the same formula as the official one-step-at-a-time merge, without the cancellation
  of a running sum of squares.

  Args:
    x: (B, L, D) any float dtype.
    num_groups: G; group g is features [g·D/G, (g+1)·D/G).
    count: (B,) int64 steps already merged; mean, var: (B, G) carried statistics.
  Returns:
    mean, var: (B, L, G) float32, and the state after the last step (count (B,) int64, mean, var (B, G) float32).
  """
  b, l, d = x.shape
  xf = x.float().view(b, l, num_groups, d // num_groups)
  step_mean = xf.mean(-1)
  step_var = (xf - step_mean.unsqueeze(-1)).square().mean(-1)
  n = torch.ones(1, l, 1, dtype=torch.float32, device=x.device)
  m, s = step_mean, step_var
  shift = 1
  while shift < l:  # Hillis-Steele scan: after the pass with `shift`, position t summarises steps (t-2·shift, t]
    nn_, mm, ss = _chan_merge((n[:, :-shift], m[:, :-shift], s[:, :-shift]), (n[:, shift:], m[:, shift:], s[:, shift:]))
    n = torch.cat([n[:, :shift], nn_], 1)
    m = torch.cat([m[:, :shift], mm], 1)
    s = torch.cat([s[:, :shift], ss], 1)
    shift *= 2
  n0 = count.to(torch.float32).view(b, 1, 1)
  _, m, s = _chan_merge((n0, mean.float().unsqueeze(1), var.float().unsqueeze(1)), (n, m, s))
  return m, s, (count + l, m[:, -1], s[:, -1])


class TimestepNorm(nn.Module):
  """Group normalisation with cumulative statistics over time (official `TimestepNorm`, prior_count = 0).

  Parameters: weight (plus-one scale), bias, both (D,). Buffers: prior_count () int64, prior_mean and
  prior_logv (G,): the state a fresh stream starts from, (prior_count, prior_mean, exp(prior_logv)).
  """

  def __init__(self, dim: int, num_groups: int, eps: float = 1e-5):
    super().__init__()
    self.dim, self.num_groups, self.eps = dim, num_groups, eps
    self.weight = nn.Parameter(torch.zeros(dim))
    self.bias = nn.Parameter(torch.zeros(dim))
    self.register_buffer("prior_count", torch.zeros((), dtype=torch.int64))
    self.register_buffer("prior_mean", torch.zeros(num_groups))
    self.register_buffer("prior_logv", torch.zeros(num_groups))

  def initial_state(self, batch_size: int) -> NormState:
    """(count (B,) int64, mean (B, G) float32, var (B, G) float32) of an empty stream."""
    count = self.prior_count.expand(batch_size).clone()
    mean = self.prior_mean.float().expand(batch_size, -1).clone()
    var = self.prior_logv.float().exp().expand(batch_size, -1).clone()
    return count, mean, var

  def forward(self, x: Tensor, prev_count: Optional[Tensor] = None, prev_mean: Optional[Tensor] = None,
              prev_var: Optional[Tensor] = None):
    """Normalises x with the running statistics continued from (prev_count, prev_mean, prev_var).

    Args:
      x: (B, L, D) any float dtype.
      prev_count: (B,) int64, prev_mean / prev_var: (B, G); all None to start from the priors.
    Returns:
      y (B, L, D) in x.dtype, and the state after the last step: count (B,) int64, mean and var (B, G) float32
      (float32 even for bfloat16 activations, so that a stream continues exactly as one long forward).
    """
    if prev_count is None or prev_mean is None or prev_var is None:
      prev_count, prev_mean, prev_var = self.initial_state(x.shape[0])
    b, l, d = x.shape
    mean, var, (count, last_mean, last_var) = cumulative_group_stats(x, self.num_groups, prev_count, prev_mean,
                                                                     prev_var)
    xf = x.float().view(b, l, self.num_groups, d // self.num_groups)
    y = (xf - mean.unsqueeze(-1)) * torch.rsqrt(var.unsqueeze(-1) + self.eps)
    y = y.reshape(b, l, d) * (1.0 + self.weight.float()) + self.bias.float()
    return y.to(x.dtype), count, last_mean, last_var

  def extra_repr(self) -> str:
    return f"{self.dim}, groups={self.num_groups}, eps={self.eps}"


def _powers(log_mag: Tensor, phase: Tensor, exponents: Tensor) -> Tensor:
  """q^j = |q|^j e^{i j φ} for each exponent j: (D, N, J) complex64 from log|q|, φ (D, N) and j (J,)."""
  j = exponents.to(torch.float32)
  return torch.polar(torch.exp(log_mag.unsqueeze(-1) * j), phase.unsqueeze(-1) * j)


class ComplexEMA(nn.Module):
  """Per-channel complex EMA with skip weight (official `MultiHeadComplexEMA`, docs/model.md#cema).

  h_t = q ⊙ h_{t-1} + p ⊙ u_t,  y_t = Re(Σ_n γ̃_n h_{t,n}) + ω u_t, with p = σ(alpha),
  q = (1 - σ(alpha)σ(delta)) e^{i n ϑ}, ϑ = σ(theta)·2π/N, γ̃ = (gamma_re + i gamma_im)/√N.
  Parameters: alpha, delta (D, N, 1); theta (D, 1, 1); gamma (D, N, 2) (re, im); omega (D, 1).
  """

  def __init__(self, dim: int, ndim: int):
    super().__init__()
    self.dim, self.ndim = dim, ndim
    self.alpha = nn.Parameter(torch.zeros(dim, ndim, 1))
    self.delta = nn.Parameter(torch.zeros(dim, ndim, 1))
    self.theta = nn.Parameter(torch.zeros(dim, 1, 1))
    self.gamma = nn.Parameter(torch.zeros(dim, ndim, 2))
    self.omega = nn.Parameter(torch.zeros(dim, 1))

  @torch.no_grad()
  def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
    """The official initialisation (docs/model.md#initialisation)."""
    d = self.dim
    self.alpha.copy_(0.2 * torch.randn(self.alpha.shape, generator=generator))
    self.delta.copy_(0.2 * torch.randn(self.delta.shape, generator=generator))
    f = torch.exp(torch.arange(1, d + 1, dtype=torch.float32) * -(math.log(d) / d))
    f = f[torch.randperm(d, generator=generator)]
    self.theta.copy_(torch.log(f / (1.0 - f)).view(d, 1, 1))
    self.gamma.zero_()
    self.gamma[..., 0].copy_(torch.randn((d, self.ndim), generator=generator))
    self.omega.copy_(nn.init.trunc_normal_(torch.empty(d, 1), std=0.25, a=-1.0, b=1.0, generator=generator))

  def coefficients(self):
    """p (D, N) float32, log|q| and phase φ (D, N) float32, γ̃ (D, N) complex64, from the float32 parameters."""
    n = self.ndim
    a = torch.sigmoid(self.alpha.float()).squeeze(-1)
    log_mag = torch.log1p(-a * torch.sigmoid(self.delta.float()).squeeze(-1))
    base = torch.sigmoid(self.theta.float()).view(-1, 1) * (2 * math.pi / n)
    phase = base * torch.arange(1, n + 1, dtype=torch.float32, device=base.device)
    g = self.gamma.float() * math.sqrt(1.0 / n)
    return a, log_mag, phase, torch.complex(g[..., 0], g[..., 1])

  def forward(self, x: Tensor, hx: Optional[Tensor] = None, compute_last_state: bool = False):
    """CEMA over a sequence by FFT convolution (the official training path), optionally from a state.

    Powers q^j are factored as (q^T)^a · q^b with j = a·T + b and T ≈ √L, so no (D, N, L) table is built.

    Args:
      x: (B, L, D) the TimestepNorm output, any float dtype (computed in float32).
      hx: optional (B, D, N) complex64 state before the first step; None means zeros.
      compute_last_state: also return the state after the last step.
    Returns:
      y (B, L, D) in x.dtype (including the ω skip), and the final state (B, D, N) complex64 or None.
    """
    b, l, d = x.shape
    p, log_mag, phase, g = self.coefficients()
    u = x.float().transpose(1, 2)  # (B, D, L)
    block = math.isqrt(max(l - 1, 0)) + 1
    nblocks = -(-l // block)
    dev = x.device
    inner = _powers(log_mag, phase, torch.arange(block + 1, device=dev))  # q^b, b ≤ T: (D, N, T+1)
    outer = _powers(log_mag, phase, torch.arange(nblocks, device=dev) * block)  # (q^T)^a: (D, N, M)

    # Kernel K_j = Re Σ_n p γ̃ q^j, j < L.
    kern = torch.einsum("dna,dnb->dab", (p * g).unsqueeze(-1) * outer, inner[..., :block]).real
    kern = kern.reshape(d, -1)[:, :l]
    nfft = 2 * (1 << max(0, (l - 1).bit_length()))  # linear (not circular) convolution, as the official fftconv
    y = torch.fft.irfft(torch.fft.rfft(u, n=nfft) * torch.fft.rfft(kern, n=nfft), n=nfft)[..., :l]
    if hx is not None:
      # Contribution of the initial state: b_t = Re Σ_n γ̃ q^{t+1} h0.
      w = (g * hx.to(torch.complex64)).unsqueeze(-1) * outer  # (B, D, N, M)
      y = y + torch.einsum("zdna,dnb->zdab", w, inner[..., 1:]).real.reshape(b, d, -1)[..., :l]
    y = y + u * self.omega.float()
    state = None
    if compute_last_state:
      # h_L = q^L h0 + Σ_j p q^{L-1-j} u_j; the reversed input in blocks gives Σ_a (q^T)^a Σ_b q^b u_{L-1-aT-b}.
      rev = F.pad(u.flip(-1), (0, nblocks * block - l)).view(b, d, nblocks, block).to(torch.complex64)
      state = p * torch.einsum("dna,zdab,dnb->zdn", outer, rev, inner[..., :block])
      if hx is not None:
        state = state + _powers(log_mag, phase, torch.tensor([l], device=dev)).squeeze(-1) * hx.to(torch.complex64)
    return y.transpose(1, 2).to(x.dtype), state

  def extra_repr(self) -> str:
    return f"dim={self.dim}, ndim={self.ndim}"
