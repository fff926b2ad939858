"""Package the final model of `scripts/train_her2st.sh` as the embedded default checkpoint.

Copies RUNS/<variant>_all/best.safetensors to OUT with the held-out figures of the four
leave-one-section-out folds (and the mean baseline's) added to its card's provenance, so that
`m2ort-fast info --checkpoint OUT` shows what the model is expected to achieve on unseen sections.

    python scripts/package_model.py RUNS VARIANT OUT
    python scripts/package_model.py runs/her2st tiny m2ort_fast/assets/m2ort_her2st_tiny.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from m2ort_fast.checkpoint import load_checkpoint, save_checkpoint

SECTIONS = ("C2", "C3", "C4", "C5")
REPORTED = ("pcc_spot_mean", "rmse_spot_mean", "mae", "pcc_gene_mean", "pcc_gene_top50_mean", "n_spots")


def main(runs: str, variant: str, out: str) -> None:
    runs_dir = Path(runs)
    model, card = load_checkpoint(runs_dir / f"{variant}_all" / "best.safetensors")
    folds = {}
    for held_out in SECTIONS:
        report = json.loads((runs_dir / f"{variant}_loso_{held_out}" / f"eval_{held_out}" / "report.json").read_text())
        section = report["sections"][0]
        folds[held_out] = {
            "model": {k: section["metrics"][k] for k in REPORTED},
            "mean_baseline": {
                k: section["baseline_metrics"][k] for k in REPORTED if k.startswith(("pcc_spot", "rmse", "mae"))
            },
        }
        for name, key in (("colour_ridge", "ridge_baseline_metrics"), ("encoder_probe", "probe_baseline_metrics")):
            if key in section:  # the fitted baselines of `evaluate` (issue 12, issue 25)
                folds[held_out][name] = {k: section[key][k] for k in REPORTED}
    card.provenance["held_out_leave_one_section_out"] = folds
    card.provenance["protocol"] = (
        f"scripts/train_her2st.sh {variant} <epochs>: four folds, each trained on three "
        "sections and evaluated on the fourth; this model: trained on all four"
    )
    card.model_id = f"m2ort-her2st-{variant}" + (f"-{card.encoder['name']}" if card.encoder else "")
    save_checkpoint(out, model, card)
    print(json.dumps(folds, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
