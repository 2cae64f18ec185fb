"""Per-channel streaming statistics and the closed-form repair/distortion formulas.

All accumulators follow the ``add_batch`` pattern: running moments in
float64, never the activations themselves. Batches are merged with Chan's
parallel formula, so variances do not suffer from the cancellation of
``E[y^2] - E[y]^2``.

Shapes: activations are viewed as ``(B, C, X)`` (batch, channel, positions).
"""

from __future__ import annotations

import torch

__all__ = ["as_bcx", "ChannelMoments", "lambda_for", "repair_gamma", "LAMBDA_RULES", "distortions"]

LAMBDA_RULES = ("mean", "median")
# variances at or below this fraction of the site's mean dense variance count as dead channels
_DEAD_REL = 1e-12


def as_bcx(y: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """View an activation as ``(B, C, X)`` with channels at ``channel_dim``."""
    if channel_dim != 1:
        y = y.movedim(channel_dim, 1)
    return y.reshape(y.shape[0], y.shape[1], -1)


def _merge(
    n: int, mean: torch.Tensor, m2: torch.Tensor, nb: int, mean_b: torch.Tensor, m2_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel update of (mean, sum of squared deviations); returns (mean, m2, delta)."""
    delta = mean_b - mean
    tot = n + nb
    return mean + delta * (nb / tot), m2 + m2_b + delta * delta * (n * nb / tot), delta


class ChannelMoments:
    """Streaming per-channel count, mean and population variance of ``(B, C, X)`` tensors.

    Each batch is reduced with ``torch.var_mean`` (one fused pass, in the
    activation's dtype) and merged into float64 running moments with Chan's
    parallel formula: no ``E[y^2] - E[y]^2`` cancellation, any batch sizes.
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def add_batch(self, y: torch.Tensor) -> None:
        y = y.detach()
        nb = y.shape[0] * y.shape[2]
        if nb == 0:
            return
        v_b, m_b = torch.var_mean(y, dim=(0, 2), correction=0)
        m_b, m2_b = m_b.double(), v_b.double() * nb
        if self._mean is None:
            self._mean, self._m2 = m_b, m2_b
        else:
            self._mean, self._m2, _ = _merge(self.n, self._mean, self._m2, nb, m_b, m2_b)
        self.n += nb

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def var(self) -> torch.Tensor:
        return (self._m2 / self.n).clamp_min(0.0)


def lambda_for(v_p: torch.Tensor, rule: str | float = "mean") -> torch.Tensor:
    """ASR shrinkage strength for one site (last axis = channels): a rule name or a number."""
    if isinstance(rule, (int, float)):
        return torch.full(v_p.shape[:-1], float(rule), dtype=v_p.dtype, device=v_p.device)
    if rule == "mean":
        return v_p.mean(dim=-1)
    if rule == "median":
        # torch.median takes the lower middle; use the true median for even counts
        return v_p.quantile(0.5, dim=-1)
    raise ValueError(f"unknown lambda rule {rule!r}; use one of {LAMBDA_RULES} or a number")


def repair_gamma(v_d: torch.Tensor, v_p: torch.Tensor, method: str = "asr", lam: str | float = "mean") -> torch.Tensor:
    """Per-channel scale for ``lw``, ``naive`` or ``asr`` repair (last axis = channels).

    ``asr``: ``s = v_p / (v_p + lambda)``, ``gamma = s * sqrt(v_d / v_p) + (1 - s)``.
    Dead channels (``v_p`` ~ 0) keep ``gamma = 1``: there is no signal to rescale.
    """
    v_d = v_d.double()
    v_p = v_p.double()
    ref = v_d.mean(dim=-1, keepdim=True).clamp_min(1e-300)
    dead = v_p <= _DEAD_REL * ref
    safe_vp = torch.where(dead, torch.ones_like(v_p), v_p)
    if method == "lw":
        num = torch.where(dead, torch.zeros_like(v_d), v_d).sum(-1, keepdim=True)
        den = torch.where(dead, torch.zeros_like(v_p), v_p).sum(-1, keepdim=True)
        g = torch.sqrt(num / den.clamp_min(1e-300)).expand_as(v_p)
        return torch.where(den > 0, g, torch.ones_like(g)).clone()
    hat = torch.sqrt(v_d / safe_vp)
    if method == "naive":
        return torch.where(dead, torch.ones_like(hat), hat)
    if method != "asr":
        raise ValueError(f"unknown repair scale method {method!r}")
    lam_v = lambda_for(torch.where(dead, torch.zeros_like(v_p), v_p), lam).unsqueeze(-1)
    s = torch.where(lam_v > 0, v_p / (v_p + lam_v).clamp_min(1e-300), torch.ones_like(v_p))
    g = s * hat + (1.0 - s)
    return torch.where(dead, torch.ones_like(g), g)


def distortions(
    m: dict[str, torch.Tensor], lam: str | float = "mean", mean_shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``D_raw`` and ``D_res`` (after ASR) per grid point, from ``GramMoments.moments()`` (profile.py).

    With ``y_p = y_d + e``: ``v_p = v_d + 2 c_de + v_e``, ``cov(y_p, y_d) = v_d + c_de``;
    ``E[(y_p - y_d)^2] = v_e + mu_e^2``; for ``yhat = gamma (y_p - mu_p) + mu_d``,
    ``E[(yhat - y_d)^2] = (gamma-1)^2 v_d + 2 gamma (gamma-1) c_de + gamma^2 v_e``
    (plus ``mu_e^2`` without mean shift). Both are normalised by ``sum_i v_d,i``.
    """
    v_d, mu_e, v_e, c_de = m["v_d"], m["mu_e"], m["v_e"], m["c_de"]
    v_p = (v_d[None, :] + 2 * c_de + v_e).clamp_min(0.0)
    gamma = repair_gamma(v_d[None, :].expand_as(v_p), v_p, "asr", lam)
    raw = v_e + mu_e * mu_e
    res = ((gamma - 1) ** 2 * v_d[None, :] + 2 * gamma * (gamma - 1) * c_de + gamma**2 * v_e).clamp_min(0.0)
    if not mean_shift:
        res = res + mu_e * mu_e
    denom = v_d.sum().clamp_min(1e-300)
    return raw.sum(-1) / denom, res.sum(-1) / denom
