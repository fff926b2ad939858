"""`m2ort-fast info --backends`: what `--backend auto` would pick on this machine, its figures and
why (the remembered pick when there is one; ``retime``: timed again now).

    auto_info(checkpoint, device="auto", precision="auto", batch_size=64) -> dict (JSON-ready)
    format_auto_info(report) -> str
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from m2ort_fast.backends.auto import AutoBackend, Trial
from m2ort_fast.device import resolve_device


def auto_info(
    checkpoint: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    candidates: Sequence[str] | None = None,
    retime: bool = False,
    budget_s: float = 60.0,
) -> dict[str, Any]:
    """Build the auto backend for ``checkpoint`` as a run at ``batch_size`` would, and report it."""
    from m2ort_fast.checkpoint import load_checkpoint

    model, card = load_checkpoint(checkpoint)
    backend = AutoBackend(
        model,
        card,
        device=resolve_device(device),
        precision=precision,
        candidates=candidates,
        trial_batch_size=batch_size,
        retime=retime,
        budget_s=budget_s,
        checkpoint_path=checkpoint,
    )
    report = backend.report()
    report["device"] = str(backend.device)
    report["threads"] = torch.get_num_threads()
    report["checkpoint"] = checkpoint
    report["trials"] = [_trial_row(t, report["pick"]) for t in report["trials"]]
    return report


def _trial_row(trial: Trial, pick: str) -> dict[str, Any]:
    row = dataclasses.asdict(trial)
    spread = trial.spots_per_s_quartiles()
    row["spots_per_s_q25"], row["spots_per_s_q75"] = (spread[0], spread[2]) if spread else (None, None)
    row["picked"] = trial.name == pick
    return row


def format_auto_info(report: dict[str, Any]) -> str:
    """The report as text: the pick and where it comes from, why, then a table of the candidates."""
    lines = [
        f"--backend auto at batch {report['batch_size']} on {report['device']} ({report['threads']} threads): "
        f"{report['pick']} ({report['source']}"
        + (f", decided {report['decided_at']}" if report.get("decided_at") else "")
        + ")",
        f"  why: {report['reason']}",
    ]
    if report.get("record"):
        lines.append(f"  record: {report['record']}")
    elif report["source"] == "timed now":
        lines.append("  not remembered: " + ("; ".join(report.get("busy") or []) or "precision was not auto"))
    load = report.get("load")
    if load:
        lines.append(
            f"  load while timing: {load['threads']} threads of ours + {load['others_cores']:.2f} cores of other "
            f"processes + {load['steal_cores']:.2f} stolen, on {load['cores']} cores"
        )
    best = next((t["spots_per_s"] for t in report["trials"] if t["picked"]), None)
    lines.append("  | candidate | spots/s (median) | IQR | rounds | vs pick |")
    lines.append("  |---|---:|---:|---:|---:|")
    for t in report["trials"]:
        if t["spots_per_s"] is None:
            lines.append(f"  | {t['name']} | unavailable: {t['error']} | | | |")
            continue
        iqr = f"{t['spots_per_s_q25']:.1f}-{t['spots_per_s_q75']:.1f}" if t["spots_per_s_q25"] else "-"
        ratio = f"{t['spots_per_s'] / best:.2f}x" if best else "-"
        left = f" (out after {t['left_race']})" if t.get("left_race") else ""
        mark = " (picked)" if t["picked"] else ""
        lines.append(f"  | {t['name']}{mark} | {t['spots_per_s']:.1f} | {iqr} | {len(t['batch_s'])}{left} | {ratio} |")
    if report["source"] == "remembered":
        lines.append("  (the remembered pick; `m2ort-fast info --backends --retime` times the candidates again)")
    return "\n".join(lines)
