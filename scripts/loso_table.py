"""One leave-one-section-out table from the evaluate reports of `scripts/train_her2st.sh`, with the
model, the colour ridge and the encoder probe side by side, and the ship rule of issue 25.

    python scripts/loso_table.py RUNS VARIANT        (reads RUNS/<variant>_loso_<S>/eval_<S>/report.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SECTIONS = ("C2", "C3", "C4", "C5")
ROWS = (("model", "metrics"), ("colour ridge", "ridge_baseline_metrics"), ("encoder probe", "probe_baseline_metrics"))
COLUMNS = ("pcc_spot_mean", "rmse_spot_mean", "pcc_gene_mean", "pcc_gene_top50_mean", "pcc_gene_beyond_pc1_mean")


def main(runs: str, variant: str) -> None:
    table: dict[str, dict[str, dict]] = {}
    truth_pc1, signal = {}, {}
    for s in SECTIONS:
        path = Path(runs) / f"{variant}_loso_{s}" / f"eval_{s}" / "report.json"
        section = json.loads(path.read_text())["sections"][0]
        table[s] = {label: section.get(key, {}) for label, key in ROWS}
        truth_pc1[s] = section["metrics"]["var_share_pc1_true"]
        signal[s] = section["measurement"]  # metrics.measurement_signal: counting noise removed
    columns = "PCC/spot | RMSE | PCC/gene | top 50 | PCC/gene beyond PC1 | PC1 share (truth; its signal)"
    print(f"| held out | predictor | {columns} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in SECTIONS:
        for label, _ in ROWS:
            m = table[s][label]
            if not m:
                continue
            cells = " | ".join(f"{m[c]:.3f}" for c in COLUMNS)
            pc1 = f"{m['var_share_pc1_pred']:.2f} ({truth_pc1[s]:.2f}; {signal[s]['var_share_pc1_signal']:.2f})"
            print(f"| {s} | {label} | {cells} | {pc1} |")
    means = {
        label: {c: float(np.mean([table[s][label][c] for s in SECTIONS])) for c in (*COLUMNS, "var_share_pc1_pred")}
        for label, _ in ROWS
        if all(table[s][label] for s in SECTIONS)
    }
    truth = float(np.mean(list(truth_pc1.values())))
    signal_pc1 = float(np.mean([signal[s]["var_share_pc1_signal"] for s in SECTIONS]))
    ceiling = float(np.mean([signal[s]["pcc_gene_ceiling_mean"] for s in SECTIONS]))
    for label, m in means.items():
        cells = " | ".join(f"{m[c]:.3f}" for c in COLUMNS)
        print(f"| mean | {label} | {cells} | {m['var_share_pc1_pred']:.2f} ({truth:.2f}; {signal_pc1:.2f}) |")
    model = means["model"]["pcc_gene_mean"]
    beats = all(model > means[b]["pcc_gene_mean"] for b in means if b != "model")
    never_below = all(table[s]["model"]["pcc_gene_mean"] >= table[s]["colour ridge"]["pcc_gene_mean"] for s in SECTIONS)
    pc1_ok = means["model"]["var_share_pc1_pred"] <= 2.5 * truth
    print(
        f"\nship rule (mean PCC/gene above every baseline's, never below the colour ridge on a fold): "
        f"{'HOLDS' if beats and never_below else 'FAILS'} (beats the baselines' means: {beats}; "
        f"never below the colour ridge: {never_below}); goal PCC/gene >= 0.40: {model >= 0.40} ({model:.3f}); "
        f"PC1 share <= 2.5x the truth's: {pc1_ok}; the measurement's signal (counting noise removed): "
        f"PC1 share {signal_pc1:.2f}, PCC/gene ceiling {ceiling:.3f}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
