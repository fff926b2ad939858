#!/usr/bin/env bash
# The HER2ST protocol of issue 6: leave-one-section-out on the four sections of
# ../shared/data/her2st (train on three, test on the fourth), then the final model on all four.
#
#   scripts/train_her2st.sh [VARIANT] [EPOCHS] [RUNS_DIR]        (defaults: small 200 runs/her2st)
#
# The recipe is configs/her2st_small.toml (the paper's) unless M2ORT_CONFIG names another, e.g.
#   M2ORT_CONFIG=configs/her2st_std_pcc.toml scripts/train_her2st.sh tiny 100 runs/her2st_std
# (standardised targets + PCC loss + colour augmentation, selected on PCC per gene: issue 12).
#
# Every run writes RUNS_DIR/<name>/{best,last}.safetensors, resume.pt, metrics.csv/json and
# summary.json; an interrupted run continues where it stopped when the script is run again.
# Validation: 10% of the training spots (four sections cannot spare one), model kept at the best
# validation PCC per spot. Extra train options go in M2ORT_TRAIN_ARGS (e.g. "--device cuda").
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT="${1:-small}"
EPOCHS="${2:-200}"
RUNS="${3:-runs/her2st}"
CONFIG="${M2ORT_CONFIG:-configs/her2st_small.toml}"
DATA=../shared/data/her2st
SECTIONS=(C2 C3 C4 C5)
EXTRA=(${M2ORT_TRAIN_ARGS:-})

train() {  # train NAME [options...]: resume if the run has a resume file
  local name="$1"; shift
  local out="$RUNS/${VARIANT}_${name}"
  local resume=()
  [[ -f "$out/resume.pt" ]] && resume=(--resume)
  m2ort-fast train --config "$CONFIG" --variant "$VARIANT" --epochs "$EPOCHS" --out "$out" "${resume[@]}" "$@" "${EXTRA[@]}"
}

# 1. Leave one section out, four folds; evaluate each fold's best model on its held-out section.
for held in "${SECTIONS[@]}"; do
  train "loso_${held}" --test-sections "$held"
  m2ort-fast evaluate --checkpoint "$RUNS/${VARIANT}_loso_${held}/best.safetensors" "$DATA/$held" \
    --out "$RUNS/${VARIANT}_loso_${held}/eval_${held}" --quiet
done

# 2. The shipped model: all four sections (the held-out figures above are its expected accuracy).
train all

# 3. One table: held-out PCC / RMSE per fold next to the mean baseline (and the ridge baseline and
#    the predictions' / measurement's PC1 variance share where the evaluate report has them).
python - "$RUNS" "$VARIANT" "${SECTIONS[@]}" <<'PY'
import json, sys
runs, variant, sections = sys.argv[1], sys.argv[2], sys.argv[3:]
nan = float("nan")
print(f"{'fold':<6} {'PCC/spot':>9} {'base':>7} {'ridge':>7} {'RMSE/spot':>10} {'base':>7} {'ridge':>7} "
      f"{'PCC/gene':>9} {'ridge':>7} {'top50':>7} {'PC1 pred':>9} {'PC1 true':>9}")
for s in sections:
    report = json.load(open(f"{runs}/{variant}_loso_{s}/eval_{s}/report.json"))["sections"][0]
    m, b = report["metrics"], report["baseline_metrics"]
    r = report.get("ridge_baseline_metrics") or {}
    print(f"{s:<6} {m['pcc_spot_mean']:9.4f} {b['pcc_spot_mean']:7.4f} {r.get('pcc_spot_mean', nan):7.4f} "
          f"{m['rmse_spot_mean']:10.4f} {b['rmse_spot_mean']:7.4f} {r.get('rmse_spot_mean', nan):7.4f} "
          f"{m['pcc_gene_mean']:9.4f} {r.get('pcc_gene_mean', nan):7.4f} {m['pcc_gene_top50_mean']:7.4f} "
          f"{m.get('var_share_pc1_pred', nan):9.4f} {m.get('var_share_pc1_true', nan):9.4f}")
PY
