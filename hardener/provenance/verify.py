"""`harden verify`: does a suspect model (or a folder of its outputs) carry a key's output mark?

Statistic.  On probe inputs x_i: y = original(x), r = suspect(x) - y.  For the true key and N public null
keys k: t_k = g0_k(y) (the mark each key would add, unit eps).  Both r and t_k are projected, per probe
image and channel, onto the orthogonal complement of the "generic residuals": a constant and every 3x3
linear filter of y across its channels (28 regressors, least squares).  That removes what innocent models
differ by in the first place (blur, sharpening, colour and contrast shifts), on top of the mark being an
even function of local detail (signal.py).  Score: rho_k = cos(P r, P t_k), pooled over all probes.
z = (rho_true - mean(rho_null)) / std(rho_null); empirical p = (1 + #{null >= true}) / (N + 1) (floors at
1 / (N + 1)); Gaussian tail p = P(Z >= z).  Effect size: the mark amplitude present in the suspect,
a = <P r, P t_true> / |P t_true|^2 (in units of eps: the marked model itself has a = eps).

Verdict "derived" when the Gaussian p < alpha AND no null key scores as high as the true key.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .. import __version__
from ..errors import UsageError
from .key import ProvenanceKey, mark_weights, null_key
from .mark import image_outputs, read_mark_manifest

DEFAULT_NULL_KEYS = 256
DEFAULT_ALPHA = 1e-6
KEY_CHUNK = 16


# ------------------------------------------------------------------------------------------- statistic
def _patches(y: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) -> (H*W, C*9) edge-padded 3x3 neighbourhoods, in Conv weight order (c, dy, dx)."""
    p = F.unfold(F.pad(y, (1, 1, 1, 1), mode="replicate"), 3)  # (1, C*9, H*W)
    return p[0].T.contiguous()


def scores(ys: list[np.ndarray], rs: list[np.ndarray], keys: list[ProvenanceKey], output_index: int = 0,
           chunk: int = KEY_CHUNK, project: bool = True) -> dict:
    """rho_k for each key (first = true key) and the amplitude a_k; ys, rs: (C, H, W) arrays.

    ``per_probe`` holds each probe's terms (dot (P, K), energy (P, K), residual energy (P,)): the statistic
    on the first n probes is :func:`pooled` of their first n rows, without computing anything again."""
    c = ys[0].shape[0]
    weights = [mark_weights(k.secret, c, output_index) for k in keys]
    w1 = torch.from_numpy(np.stack([w.reshape(w.shape[0], -1) for w, _ in weights]).astype(np.float32))  # K,16,C*9
    w2 = torch.from_numpy(np.stack([w for _, w in weights]).astype(np.float32))  # K, C, 16
    nk, hidden = w1.shape[:2]
    dot = np.zeros((len(ys), nk))
    energy = np.zeros((len(ys), nk))
    r_energy = np.zeros(len(ys))
    for i, (y, r) in enumerate(zip(ys, rs)):
        yt = torch.from_numpy(np.ascontiguousarray(y, np.float32))[None]
        patch = _patches(yt)  # (M, C*9)
        m = patch.shape[0]
        reg = torch.ones(m, 1, dtype=torch.float64)
        if project:
            reg = torch.cat([reg, patch.double()], 1)
        q, _ = torch.linalg.qr(reg)  # (M, 28) orthonormal basis of the generic residuals
        rt = torch.from_numpy(np.ascontiguousarray(r, np.float64)).reshape(c, -1).T  # (M, C)
        pr = rt - q @ (q.T @ rt)
        r_energy[i] = float((pr * pr).sum())
        pr32, q32 = pr.float(), q.float()
        for s in range(0, nk, chunk):
            u = patch @ w1[s:s + chunk].reshape(-1, w1.shape[-1]).T  # (M, k*16)
            u.tanh_()
            u.mul_(u)
            g = torch.bmm(u.view(m, -1, hidden).transpose(0, 1), w2[s:s + chunk].transpose(1, 2))  # (k, M, C)
            dot[i, s:s + chunk] = torch.einsum("kmc,mc->k", g, pr32).double().numpy()
            qg = torch.einsum("mj,kmc->kjc", q32, g)
            energy[i, s:s + chunk] = ((g.double() ** 2).sum((1, 2)) - (qg.double() ** 2).sum((1, 2))).numpy()
    out = pooled(dot, energy, r_energy, sum(r.size for r in rs))
    out["per_probe"] = {"dot": dot, "energy": energy, "r_energy": r_energy, "sizes": [r.size for r in rs]}
    return out


def pooled(dot: np.ndarray, energy: np.ndarray, r_energy: np.ndarray, size: int) -> dict:
    """rho, amplitude and residual rms from per-probe terms (rows = probes), summed over the probes."""
    dot, energy = dot.sum(axis=0), np.maximum(energy.sum(axis=0), 1e-300)
    r_total = float(np.sum(r_energy))
    rho = dot / math.sqrt(max(r_total, 1e-300)) / np.sqrt(energy)
    return {"rho": rho, "amplitude": dot / energy, "residual_rms": math.sqrt(r_total / size)}


def each_against_nulls(rho: np.ndarray, amplitude: np.ndarray, count: int, alpha: float) -> list[dict]:
    """:func:`statistic` of each of the first ``count`` keys, each against the same null keys (the rest)."""
    return [statistic(np.concatenate([rho[i:i + 1], rho[count:]]),
                      np.concatenate([amplitude[i:i + 1], amplitude[count:]]), alpha) for i in range(count)]


def _gauss_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def statistic(rho: np.ndarray, amplitude: np.ndarray, alpha: float) -> dict:
    true, null = float(rho[0]), rho[1:]
    mu, sd = float(null.mean()), float(null.std(ddof=1))
    z = (true - mu) / sd if sd > 0 else 0.0
    above = int((null >= true).sum())
    p_emp = (1 + above) / (len(null) + 1)
    p_gauss = _gauss_tail(z)
    null_z = (null - mu) / sd if sd > 0 else null * 0
    derived = bool(p_gauss < alpha and above == 0)
    return {"z": z, "p_empirical": p_emp, "p_gaussian": p_gauss, "rho": true, "amplitude": float(amplitude[0]),
            "null_keys": len(null), "null_keys_at_or_above": above, "null_rho_mean": mu, "null_rho_std": sd,
            "null_z_max": float(null_z.max()), "null_z_min": float(null_z.min()),
            "alpha": alpha, "derived": derived}


# ---------------------------------------------------------------------------------------- model running
class Runner:
    """One ONNX model run on (3, H, W) probes, one at a time: the chosen output as (C, H', W')."""

    def __init__(self, path: Path, role: str):
        from ..model_io import load_model
        from .mark import _runnable, _session

        self.loaded = load_model(path)
        self.role = role
        src = self.loaded.path if not self.loaded.has_external_data else _runnable(self.loaded.model, self.loaded)
        self.session = _session(src)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise UsageError(f"{role} {path} must take one (N, C, H, W) image input; it takes "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input = inputs[0]
        shape = self.input.shape
        if isinstance(shape[1], int) and shape[1] != 3:
            raise UsageError(f"{role} {path} takes {shape[1]}-channel input; the probes are RGB (3 channels)")
        self.static_hw = tuple(d if isinstance(d, int) else None for d in shape[2:])
        if self.input.type != "tensor(float)":
            raise UsageError(f"{role} {path} takes {self.input.type}; verify feeds float32 images in [0, 1]")

    def __call__(self, probe: np.ndarray, output: str) -> np.ndarray:
        h, w = probe.shape[1:]
        sh, sw = self.static_hw
        if (sh and sh != h) or (sw and sw != w):
            raise UsageError(f"{self.role} {self.loaded.path} needs {sh}x{sw} inputs but a probe is {h}x{w}; "
                             "give --probes with images of that size")
        try:
            return self.session.run([output], {self.input.name: probe[None].astype(np.float32)})[0][0]
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"{self.role} {self.loaded.path} failed on a {h}x{w} probe: "
                             f"{' '.join(str(exc).split())[:300]}")


_OUTPUT_SUFFIXES = (".npy", ".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".webp")


def load_output_folder(folder: Path, names: list[str], channels: int) -> tuple[list[np.ndarray], list[str]]:
    """The suspect's outputs, one file per probe named after it: <probe>.npy (float (C,H,W), (1,C,H,W) or
    (H,W,C); integer arrays are scaled like images) or an image file (8-bit /255, 16-bit /65535)."""
    notes = set()
    out = []
    by_stem: dict[str, list[Path]] = {}
    for p in Path(folder).iterdir():
        if p.suffix.lower() in _OUTPUT_SUFFIXES:
            by_stem.setdefault(p.stem, []).append(p)
    missing = [n for n in names if n not in by_stem]
    if missing:
        raise UsageError(f"suspect folder {folder} has no output for probe(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (expected <probe>.npy or <probe>.png)")
    for name in names:
        files = by_stem[name]
        if len(files) > 1:
            raise UsageError(f"suspect folder {folder} has several files for probe '{name}': "
                             f"{', '.join(sorted(p.name for p in files))}")
        path = files[0]
        if path.suffix.lower() == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except Exception as exc:  # noqa: BLE001
                raise UsageError(f"cannot read {path}: {exc}") from None
            if arr.ndim == 4 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim == 3 and arr.shape[0] not in (1, 3) and arr.shape[-1] in (1, 3):
                arr = arr.transpose(2, 0, 1)
                notes.add(".npy arrays in (H, W, C) layout were transposed to (C, H, W)")
            if arr.ndim != 3:
                raise UsageError(f"{path} has shape {arr.shape}; expected (C, H, W), (1, C, H, W) or (H, W, C)")
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
                notes.add("uint8 .npy outputs were scaled by 1/255 to [0, 1]")
            elif arr.dtype == np.uint16:
                arr = arr.astype(np.float32) / 65535.0
                notes.add("uint16 .npy outputs were scaled by 1/65535 to [0, 1]")
            elif not np.issubdtype(arr.dtype, np.floating):
                raise UsageError(f"{path} holds {arr.dtype}; expected float, uint8 or uint16")
            out.append(arr.astype(np.float64))
        else:
            from ..inputs import read_image

            out.append(read_image(path, channels).astype(np.float64))
            notes.add("image-file outputs were read as RGB and scaled to [0, 1] (8-bit /255, 16-bit /65535); "
                      "8-bit quantisation adds noise of about 1/255/sqrt(12) per pixel")
    return out, sorted(notes)


def _harmonise(outs: list[np.ndarray], ys: list[np.ndarray], names: list[str], resize: bool) -> tuple[list, list]:
    """Apply the stated size / colour / range policy to the suspect's outputs; returns (outputs, notes)."""
    notes = []
    fixed = []
    resized = 0
    for o, y, name in zip(outs, ys, names):
        if not np.all(np.isfinite(o)):
            raise UsageError(f"the suspect's output for probe '{name}' contains NaN or infinity")
        if o.shape[0] != y.shape[0]:
            raise UsageError(f"the suspect's output for probe '{name}' has {o.shape[0]} channel(s), the original's "
                             f"{y.shape[0]}: colour layouts differ (policy: refused, never guessed)")
        if o.shape[1:] != y.shape[1:]:
            if not resize:
                raise UsageError(f"the suspect's output for probe '{name}' is {o.shape[1]}x{o.shape[2]}, the "
                                 f"original's {y.shape[1]}x{y.shape[2]}; pass --resize to resample it (bicubic)")
            t = torch.from_numpy(np.ascontiguousarray(o))[None]
            o = F.interpolate(t, size=y.shape[1:], mode="bicubic", align_corners=False,
                              antialias=o.shape[1] > y.shape[1])[0].numpy()
            resized += 1
        fixed.append(o)
    if resized:
        notes.append(f"{resized} suspect output(s) resized to the original's size (bicubic, --resize)")
    num = sum(float(np.sum(o * y)) for o, y in zip(fixed, ys))
    den = sum(float(np.sum(y * y)) for y in ys)
    scale = num / den if den > 0 else 1.0
    if 127.0 <= scale <= 512.0:
        fixed = [o / 255.0 for o in fixed]
        notes.append(f"suspect outputs are on a 0-255 scale (least-squares scale {scale:.1f} against the "
                     "original): divided by 255")
    elif not 0.5 <= scale <= 2.0:
        raise UsageError(f"the suspect's outputs are not on the original's value range (least-squares scale "
                         f"{scale:.3g}); policy: only [0, 1] and [0, 255] are accepted")
    return fixed, notes


def verify(suspect: Path, key: ProvenanceKey, original: Path, *, probes_dir: Path | None = None,
           num_probes: int | None = None, null_keys: int = DEFAULT_NULL_KEYS, alpha: float = DEFAULT_ALPHA,
           resize: bool = False) -> dict:
    """The verification report (a dict); raises UsageError on any mismatch."""
    from .probes import default_probes, describe_default, probe_folder

    if null_keys < 20:
        raise UsageError(f"--null-keys must be at least 20, got {null_keys}")
    if not 0 < alpha < 0.5:
        raise UsageError(f"--alpha must be in (0, 0.5), got {alpha}")
    suspect = Path(suspect)
    if not suspect.exists():
        raise UsageError(f"suspect not found: {suspect}")
    orig = Runner(Path(original), "original")
    outs = image_outputs(orig.loaded.model)
    if not outs:
        raise UsageError(f"original {original} has no image output (float32 (N, C, H, W), C = 1 or 3)")
    spec = outs[0]
    manifest = read_mark_manifest(orig.loaded.model)
    notes = []
    if manifest is not None:
        if manifest.get("key_id") == key.key_id:
            raise UsageError(f"--original {original} carries this key's mark; pass the UNMARKED original model")
        notes.append("the original carries a provenance mark of another key (key id "
                     f"{str(manifest.get('key_id'))[:16]}); it is treated as the reference as it is")
    if probes_dir is not None:
        probes = probe_folder(Path(probes_dir), num_probes)
        probe_text = f"{len(probes)} probes from {probes_dir}"
    else:
        probes = default_probes(num_probes)
        probe_text = describe_default(len(probes))
    names = [n for n, _ in probes]
    ys = [orig(p, spec.name).astype(np.float64) for _, p in probes]

    suspect_info: dict = {"path": str(suspect)}
    if suspect.is_dir():
        raw, file_notes = load_output_folder(suspect, names, spec.channels)
        notes += file_notes
        suspect_info["kind"] = "folder of outputs"
    else:
        sus = Runner(suspect, "suspect")
        sus_outs = [o.name for o in sus.session.get_outputs()]
        name = spec.name if spec.name in sus_outs else sus_outs[min(spec.index, len(sus_outs) - 1)]
        if name != spec.name:
            notes.append(f"the suspect has no output named '{spec.name}'; its output '{name}' was used")
        raw = [sus(p, name).astype(np.float64) for _, p in probes]
        suspect_info.update({"kind": "onnx model", "sha256": sus.loaded.sha256, "output": name})
        sm = read_mark_manifest(sus.loaded.model)
        if sm is not None:
            suspect_info["manifest_key_id"] = sm.get("key_id")
            suspect_info["manifest_eps"] = [o.get("eps") for o in sm.get("outputs", [])]
    rs_out, harm_notes = _harmonise(raw, ys, names, resize)
    notes += harm_notes
    rs = [o - y for o, y in zip(rs_out, ys)]
    keys = [key] + [null_key(i) for i in range(null_keys)]
    sc = scores(ys, rs, keys, spec.index)
    stat = statistic(sc["rho"], sc["amplitude"], alpha)
    stat["residual_rms"] = sc["residual_rms"]
    if sc["residual_rms"] == 0.0:
        notes.append("the suspect's outputs equal the original's exactly on every probe: no mark, no evidence")
    if suspect_info.get("manifest_key_id") == key.key_id and suspect_info.get("manifest_eps"):
        eps = suspect_info["manifest_eps"][0]
        stat["eps_in_suspect_manifest"] = eps
        stat["amplitude_over_eps"] = stat["amplitude"] / eps if eps else None
    return {
        "tool": "hardener", "version": __version__, "command": "verify",
        "verdict": "derived" if stat["derived"] else "not shown", "exit_code": 0 if stat["derived"] else 1,
        "key_id": key.key_id, "original": {"path": str(original), "sha256": orig.loaded.sha256, "output": spec.name},
        "suspect": suspect_info, "probes": {"count": len(probes), "names": names, "source": probe_text},
        "statistic": stat, "policy_notes": notes,
        "method": "rho = cos(P r, P t_k) pooled over probes; P removes a constant and every 3x3 linear filter "
                  "of the original's output per probe and channel; z against public null keys",
    }


def verify_summary(report: dict) -> str:
    s = report["statistic"]
    lines = [f"suspect   {report['suspect']['path']} ({report['suspect']['kind']})",
             f"original  {report['original']['path']} (output {report['original']['output']})",
             f"key id    {report['key_id'][:16]}",
             f"probes    {report['probes']['source']}"]
    for note in report["policy_notes"]:
        lines.append(f"note      {note}")
    lines.append(f"z = {s['z']:+.2f} against {s['null_keys']} null keys (null z range {s['null_z_min']:+.2f} .. "
                 f"{s['null_z_max']:+.2f}; {s['null_keys_at_or_above']} at or above the key)")
    lines.append(f"p (Gaussian tail) = {s['p_gaussian']:.2e}   p (empirical, floor 1/{s['null_keys'] + 1}) = "
                 f"{s['p_empirical']:.2e}")
    eff = f"effect: rho = {s['rho']:+.4f}, mark amplitude in suspect = {s['amplitude']:.3g}"
    if s.get("amplitude_over_eps") is not None:
        eff += f" ({s['amplitude_over_eps']:.2f} x the eps in its manifest)"
    lines.append(eff + f", residual rms {s['residual_rms']:.2e}")
    if s["derived"]:
        lines.append(f"DERIVED | the suspect carries this key's mark: p < {s['alpha']:g} and no null key scores as high")
    else:
        lines.append(f"NOT SHOWN | no evidence at alpha {s['alpha']:g} that the suspect carries this key's mark "
                     "(this does not prove it was not distilled)")
    return "\n".join(lines)
