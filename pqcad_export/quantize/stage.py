"""The quantize stage, once: calibration set -> quantized model dir. `quantize`, `build` and research all call it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..bits import BitSpec
from ..errors import UsageError
from .config import ReconConfig
from .driver import quantize_model
from .model import QuantizedModel
from .saved import save_quantized

CHECKPOINTS = "checkpoints"
CALIB_BATCH = 64


def calib_keys(cset) -> list[str]:
    """The UNet inputs a calibration set holds (conditional sets add encoder_hidden_states)."""
    return [k for k in ("sample", "timestep", "encoder_hidden_states") if k in cset.fields]


def set_conditioning(cset) -> Optional[dict[str, Any]]:
    """quant.json `conditioning` read from a conditional set's manifest (the length export and engines must take)."""
    cm = cset.manifest.get("conditioning") if "encoder_hidden_states" in cset.fields else None
    if not cm:
        return None
    shape = cm.get("shape") or [cm.get("tokens"), cm.get("dim")]
    return {"source": f"calibration set ({cm.get('source')})", "shape": [None, *shape]}


def finite_batches(batches: Iterable[dict], calib) -> Iterator[dict]:
    """A calibration set with NaN/inf rows (collected from a broken model) is refused as such, not blamed on the
    first block that sees it."""
    import torch

    for b in batches:
        for k, v in b.items():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                raise UsageError(f"calibration set {calib} holds NaN/inf values in '{k}'; recollect it from a "
                                 f"healthy model")
        yield b


def run_quantize(teacher, calib_dir: str | Path, bits: BitSpec, method: str, cfg: ReconConfig, out_dir: str | Path,
                 device, *, seed: int, meta: Optional[dict[str, Any]] = None, conditioning: Any = "from-set",
                 compare_direct: bool = False, curve: Optional[str] = None, keep_checkpoints: bool = True
                 ) -> QuantizedModel:
    """Quantize `teacher` from the C_QC set in `calib_dir` into `out_dir` (quant.json, weights, log).

    seed shuffles the calibration rows (the quick preset keeps only the first max_calib, which must span all
    steps); `conditioning` is written as quant.json `conditioning` ("from-set": read from the set's manifest);
    compare_direct also runs direct AdaRound and logs Delta_Pert; `curve` names the loss-curve PNG (pq/bitshrink);
    checkpoints under out_dir/checkpoints let a rerun reuse finished blocks and are removed unless kept."""
    from calibration.storage import open_set

    out = Path(out_dir)
    ckpt = out / CHECKPOINTS
    cset = open_set(calib_dir, "c_qc", expect_fingerprint=teacher.fingerprint)
    keys = calib_keys(cset)

    def batches():
        return cset.iter_batches(batch_size=CALIB_BATCH, shuffle=True, seed=seed, keys=keys)

    qm = quantize_model(teacher, finite_batches(batches(), calib_dir), bits, method, cfg, device,
                        checkpoint_dir=ckpt)
    if compare_direct and method != "direct":
        from .progressive import delta_pert

        dq = quantize_model(teacher, batches(), bits, "direct", cfg, device)
        qm.log["direct_geomean_pert"] = dq.log["geomean_pert"]
        qm.log["delta_pert_vs_direct"] = delta_pert(qm.log, dq.log)
    cond = set_conditioning(cset) if isinstance(conditioning, str) and conditioning == "from-set" else conditioning
    save_quantized(qm, out, {**(meta or {}), "conditioning": cond})
    if (out / "sensitivity.json").is_file() and qm.sensitivity is None:
        (out / "sensitivity.json").unlink()  # a stale measurement from an earlier auto run
    if curve and method in ("pq", "bitshrink"):
        from .progressive import plot_loss_curve

        plot_loss_curve(qm.log, out / curve, cfg.curve_unit)
    if not keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return qm
