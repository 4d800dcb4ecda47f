"""Innocent trials for `harden verify`: how the statistic behaves on models that were NOT derived from a key.

A suspect that never saw key K is, for K, exchangeable with the public null keys: its verify p-value over
the null keys is uniform, whatever the suspect.  What can go wrong is a key-level offset (the issue's
"innocents near z = +1": students differ from their teacher by something the one measured key happens to
correlate with) and, if the statistic were biased, a z that grows as probes are added.  Both are measured
here without training hundreds of students: every innocent model is tested against many candidate keys
(held out from the null keys), so each (model, key) pair is one innocent trial, and the same trials are
repeated with 4, 8 and 16 probes.

* ``trials(ys, rs, candidates, nulls, counts)``: z (and verify's verdict) of each candidate key, per probe
  count, through :func:`hardener.provenance.verify.scores` and ``each_against_nulls`` (`harden verify`'s
  statistic, for each candidate key against the same null keys).
* ``summarize``: per model and probe count, the mean, spread and maximum of the innocent z, how many trials
  a 1e-3 false-positive threshold flags, and how many verify would call "derived"; across probe counts, the
  mean change of a trial's z (the drift).
"""
from __future__ import annotations

import math

import numpy as np

from hardener.provenance.key import ProvenanceKey, generate_key, null_key
from hardener.provenance.verify import DEFAULT_ALPHA, each_against_nulls, pooled, scores

from .detection import GAUSS_Z

CANDIDATE_SEED0 = 50_000  # candidate keys: generate_key(CANDIDATE_SEED0 + i), disjoint from the null keys


def candidate_keys(count: int) -> list[ProvenanceKey]:
    return [generate_key(CANDIDATE_SEED0 + i) for i in range(count)]


def trials(ys: list[np.ndarray], rs: list[np.ndarray], candidates: list[ProvenanceKey], null_count: int,
           counts: list[int], output_index: int = 0, alpha: float = DEFAULT_ALPHA) -> dict[int, list[dict]]:
    """{probe count n: [verify statistic of candidate key i, on the first n probes]}."""
    nulls = [null_key(i) for i in range(null_count)]
    per = scores(ys[:max(counts)], rs[:max(counts)], candidates + nulls, output_index)["per_probe"]
    out = {}
    for n in counts:  # the first n probes' terms: each probe is computed once
        sc = pooled(per["dot"][:n], per["energy"][:n], per["r_energy"][:n], sum(per["sizes"][:n]))
        out[n] = each_against_nulls(sc["rho"], sc["amplitude"], len(candidates), alpha)
    return out


def summarize(by_count: dict[int, list[dict]]) -> dict:
    rows = {}
    for n, stats in sorted(by_count.items()):
        z = np.array([s["z"] for s in stats])
        rows[n] = {"probes": n, "trials": len(z), "z_mean": float(z.mean()), "z_sd": float(z.std(ddof=1)),
                   "z_max": float(z.max()), "flagged_at_1e-3": int((z >= GAUSS_Z).sum()),
                   "derived": int(sum(s["derived"] for s in stats)),
                   "p_empirical_min": float(min(s["p_empirical"] for s in stats))}
    counts = sorted(by_count)
    drift = None
    if len(counts) > 1:
        z0 = np.array([s["z"] for s in by_count[counts[0]]])
        z1 = np.array([s["z"] for s in by_count[counts[-1]]])
        d = z1 - z0
        half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
        drift = {"from": counts[0], "to": counts[-1], "mean_change": float(d.mean()),
                 "ci95": [float(d.mean() - half), float(d.mean() + half)],
                 "abs_z_mean": [float(np.abs(z0).mean()), float(np.abs(z1).mean())],
                 "correlation": float(np.corrcoef(z0, z1)[0, 1])}
    return {"by_probes": list(rows.values()), "drift": drift}
