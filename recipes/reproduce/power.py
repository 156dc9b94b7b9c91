"""The power calculation behind the suite's budgets: how many steps (and seeds) a check needs to detect its claim.

Every check compares two arms trained from the same seed, which fixes the same data order (train.py's
WindowSampler is seeded by ``seed`` alone, and every preset of a check shares data, batch size and
sequence length: tests/recipes/reproduce checks this). The decision therefore uses the per-seed
differences d_s = method_s − baseline_s: with n seeds, mean d̄ and sample std σ_d, the standard error is
SE = σ_d / √n and the one-sided test at level α = 0.05 (the direction is the paper's claim, fixed in
advance) declares **held** when d̄ + t₀.₉₅(n−1)·SE < 0.

Power. To detect a true effect δ (in the claim's direction) with probability 1 − β = 0.8 one needs
δ ≥ (t₀.₉₅(n−1) + t₀.₈₀(n−1)) · σ_d / √n.

Scaling with steps (**the assumption**, stated because nothing here measures it yet): the seed noise of
the difference shrinks like the noise of a mean over the training tokens, σ_d(S) = σ_d(100)·√(100/S),
while the claimed effect δ stays at its paper size. Then the steps a check needs with n seeds are

    S_req = 100 · ((t₀.₉₅ + t₀.₈₀) · σ_d(100) / (δ·√n))².

Why this assumption: at 100 steps (≈0.4M tokens) the arms are far from converged and the spread
between seeds comes from which windows were drawn and from the initial weights; both average out over
more tokens. It is optimistic if σ_d has a floor (init-dependent minima) and pessimistic if effects grow
with training (as the papers' curves suggest for MoE vs dense); the full tier's own report re-measures
σ_d, so the assumption is checked by the next run, not trusted.
"""

from __future__ import annotations

import math

# one-sided Student-t quantiles, df = 1..10 (scipy.stats.t.ppf); beyond, the Cornish–Fisher expansion
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)
_T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879)
_Z = {0.95: 1.6449, 0.80: 0.8416}
REFERENCE_STEPS = 100  # the committed report's steps per run (where sigma_100 was measured)
POWER = 0.8


def t_quantile(q: float, df: int) -> float:
    """One-sided Student-t quantile for q ∈ {0.95, 0.80}."""
    if q not in _Z:
        raise ValueError(f"q={q} is not supported; allowed: {sorted(_Z)}")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df={df!r} must be an integer >= 1")
    if df <= 10:
        return (_T95 if q == 0.95 else _T80)[df - 1]
    z = _Z[q]
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def critical(n: int) -> float:
    """t₀.₉₅(n−1): the multiple of SE = σ_d/√n that the verdict rule needs."""
    return t_quantile(0.95, n - 1)


def detectable_effect(sigma_d: float, n: int) -> float:
    """The smallest true effect found with 80% power by the one-sided 5% test over n paired seeds."""
    if n < 2:
        raise ValueError(f"n={n} seeds: a paired test needs at least 2")
    return (t_quantile(0.95, n - 1) + t_quantile(POWER, n - 1)) * sigma_d / math.sqrt(n)


def required_steps(sigma_100: float, effect: float, n: int, reference_steps: int = REFERENCE_STEPS) -> float:
    """Steps per run so that ``effect`` is detectable with n seeds, under σ_d ∝ 1/√steps (module docstring)."""
    if effect <= 0 or sigma_100 < 0:
        raise ValueError(f"effect={effect} must be > 0 and sigma_100={sigma_100} >= 0")
    return reference_steps * (detectable_effect(sigma_100, n) / effect) ** 2


def required_seeds(sigma_d: float, effect: float, max_seeds: int = 64) -> int | None:
    """Seeds needed at the measured step count (σ_d fixed); None if more than ``max_seeds``."""
    if effect <= 0:
        raise ValueError(f"effect={effect} must be > 0")
    return next((n for n in range(2, max_seeds + 1) if detectable_effect(sigma_d, n) <= effect), None)


def check_power(check, seeds: int, steps: int, sigma_d: float | None = None) -> dict:
    """The power row of one check at (seeds, steps): inputs, detectable effect, steps and seeds required.

    ``sigma_d`` is the σ of the differences measured now (at ``steps``); without it the committed 100-step
    value ``check.sigma_100`` is scaled to ``steps`` by the assumption above.
    """
    row = {
        "effect": check.effect,
        "sigma_100": check.sigma_100,
        "seeds": seeds,
        "steps": steps,
        "sigma_at_steps": None,
        "detectable": None,
        "steps_required": None,
        "seeds_required_at_100": None,
    }
    if check.effect <= 0 or (check.sigma_100 is None and sigma_d is None) or seeds < 2:
        return row
    if sigma_d is not None:  # re-measured: scale it back to 100 steps for the requirement
        row["sigma_at_steps"] = sigma_d
        sigma_100 = sigma_d * math.sqrt(steps / REFERENCE_STEPS)
    else:
        sigma_100 = check.sigma_100
        row["sigma_at_steps"] = sigma_100 * math.sqrt(REFERENCE_STEPS / steps)
    row["detectable"] = detectable_effect(row["sigma_at_steps"], seeds)
    row["steps_required"] = required_steps(sigma_100, check.effect, seeds)
    row["seeds_required_at_100"] = required_seeds(sigma_100, check.effect) if check.sigma_100 is not None else None
    return row
