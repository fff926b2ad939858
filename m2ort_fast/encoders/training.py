"""`m2ort-fast train --encoder ...`: M2ORT over a frozen pretrained encoder, on cached features.

The encoder is frozen, so its maps of every spot (and of ``encoder_views - 1`` stain / scanner
augmented views of it: :mod:`m2ort_fast.encoders.augment`) are computed once and cached
(:class:`m2ort_fast.encoders.features.FeatureStore`); training then runs only the token
projections, the ITMM / ICMM blocks and the head on them, drawing one view per spot per epoch:
seconds an epoch on 2 CPU cores. Data, gene panel, targets, loss options, model selection and the
checkpoint's card are those of :mod:`m2ort_fast.train`; the card's ``encoder`` entry names the
encoder. Validation and test use view 0 (the spots as read).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from m2ort_fast import metrics as M
from m2ort_fast.errors import M2ORTError


def forward_features(model, features: list[torch.Tensor]) -> torch.Tensor:
    """The model on cached encoder maps (one per level, (B, C, h, w)) -> (B, n_genes)."""
    return model.head(model.encode(model.fuse(model.token_embed.tokens(features))))


@torch.no_grad()
def predict_features(model, features: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Predictions (N, G) from view 0 of cached features (per level (N, V, C, h, w))."""
    model.eval()
    out = []
    for start in range(0, len(features[0]), batch_size):
        batch = [torch.from_numpy(f[start : start + batch_size, 0]).float() for f in features]
        out.append(forward_features(model, batch).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.n_genes), np.float32)


def _setup(cfg, progress: bool):
    """Data, encoder, cached features of every set, and the untrained model."""
    from m2ort_fast.encoders import build_encoder, encoder_model
    from m2ort_fast.encoders.features import FeatureStore
    from m2ort_fast.model import set_fused_attention
    from m2ort_fast.train import prepare_data

    sets, info = prepare_data(cfg, progress=progress)
    if len(sets["train"]) == 0:
        raise M2ORTError("no training spots (all spots have a zero total over the gene panel?)")
    encoder = build_encoder(cfg.encoder, cfg.encoder_weights or None)
    store = FeatureStore(encoder, n_views=cfg.encoder_views, root=cfg.feature_cache_dir or None)
    t0 = time.perf_counter()
    features = {role: store.get(s.levels, progress) for role, s in sets.items() if len(s)}
    info["feature_seconds"] = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    model = encoder_model(encoder, len(info["genes"]), cfg.variant, cfg.encoder_grid, cfg.token_dropout)
    set_fused_attention(model, True)
    return sets, info, features, model


def _card(cfg, info, model, train_mean, command):
    """The checkpoints' card: the encoder and everything :mod:`m2ort_fast.train` records."""
    from m2ort_fast.checkpoint import ModelCard
    from m2ort_fast.encoders import encoder_card

    card = ModelCard.for_variant(
        cfg.variant,
        info["genes"],
        info["mpp"],
        trained=True,
        model_id=cfg.model_id or f"m2ort-{cfg.variant}-{cfg.encoder.replace(':', '-')}",
        encoder=encoder_card(model.token_embed),
    )
    loss = "MSE" + (
        f" + {cfg.pcc_loss_weight:g} * (1 - mean per-gene PCC over the batch)" if cfg.pcc_loss_weight else ""
    )
    card.provenance = {
        "data": info["data"],
        "split": {**info["split"], "validation": info["val_source"]},
        "gene_panel_rule": info["panel_rule"],
        "target_transform": (
            "counts over the panel -> CPM of the spot's panel total -> log1p; spots with panel total 0 dropped"
        ),
        "level_source": cfg.level_source,
        "config": dataclasses.asdict(cfg),
        "command": command or "m2ort_fast.encoders.training.train_encoder(...)",
        "train_mean_expression": [round(float(v), 5) for v in train_mean],
        "loss": loss + (" on per-gene standardised targets" if cfg.standardize_targets else " on log1p CPM"),
        "augmentation": (
            f"encoder frozen, features cached for {cfg.encoder_views} views per spot (view 0 as read; the others "
            "dihedral + random stain matrix + HED jitter + brightness + blur + JPEG, m2ort_fast.encoders.augment); "
            "one view drawn per spot per epoch"
        ),
        "selection": f"best validation {cfg.select_metric}",
        "torch": torch.__version__,
    }
    return card


def _epoch(model, optimizer, features, targets, cfg, generator) -> float:
    """One pass over the training spots, a random view of each; returns the mean loss."""
    from m2ort_fast.train import training_loss

    n, n_views = len(targets), features[0].shape[1]
    order = torch.randperm(n, generator=generator).numpy()
    views = torch.randint(n_views, (n,), generator=generator).numpy()
    model.train()
    total = 0.0
    for start in range(0, n, cfg.batch_size):
        rows = np.sort(order[start : start + cfg.batch_size])
        batch = [torch.from_numpy(f[rows, views[rows]]).float() for f in features]
        loss = training_loss(forward_features(model, batch), torch.from_numpy(targets[rows]), cfg.pcc_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(rows)
    return total / n


def train_encoder(cfg, *, progress: bool = True, command: str | None = None) -> dict:
    """Train M2ORT over ``cfg.encoder`` (frozen, cached features); writes what ``train`` writes
    (best / last checkpoints, metrics.json, summary.json with the test sections' metrics)."""
    from m2ort_fast.checkpoint import save_checkpoint
    from m2ort_fast.train import fold_standardization, target_scaling

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    sets, info, features, model = _setup(cfg, progress)
    train_set = sets["train"]
    train_mean = train_set.targets.mean(axis=0)
    mean, std = target_scaling(train_set.targets) if cfg.standardize_targets else (None, None)
    targets = (train_set.targets - mean) / std if mean is not None else train_set.targets
    with torch.no_grad():
        model.head.bias.copy_(torch.zeros(len(train_mean)) if mean is not None else torch.from_numpy(train_mean))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    card = _card(cfg, info, model, train_mean, command)

    def inference_model():
        return fold_standardization(model, mean, std) if mean is not None else copy.deepcopy(model)

    history, best, best_model = [], -math.inf, None
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout
        row = {"epoch": epoch + 1, "train_loss": _epoch(model, optimizer, features["train"], targets, cfg, generator)}
        current = -row["train_loss"]
        if "val" in features:
            val = M.summarize(predict_features(inference_model(), features["val"]), sets["val"].targets)
            row.update({f"val_{k}": v for k, v in val.items() if not k.startswith("n_")})
            current = val[cfg.select_metric]
        row["epoch_seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        if best_model is None or (np.isfinite(current) and current > best):
            best, best_model = (current if np.isfinite(current) else best), inference_model()
            card.provenance["epoch"] = epoch + 1
        if progress:
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} {cfg.select_metric} {current:.4f}",
                file=sys.stderr,
            )
    card.provenance["metrics"] = {"history_tail": history[-3:]}
    save_checkpoint(out / "last.safetensors", inference_model(), card)
    summary = _summary(cfg, info, sets, features, best_model, best, history, train_mean)
    card.provenance["metrics"].update({"test": summary["test"], "test_mean_baseline": summary["test_mean_baseline"]})
    assert best_model is not None  # epochs >= 1 (positive_int)
    save_checkpoint(out / "best.safetensors", best_model, card)
    (out / "metrics.json").write_text(json.dumps(history, indent=1))
    tmp = out / ".summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=1, default=float))
    os.replace(tmp, out / "summary.json")
    return summary


def _summary(cfg, info, sets, features, best_model, best, history, train_mean) -> dict:
    """The run's summary: best validation score and the test sections' metrics (view 0)."""
    test, baseline = {}, {}
    if "test" in features:
        pred = predict_features(best_model, features["test"])
        names = np.asarray(sets["test"].section)
        for name in info["split"]["test"]:
            rows = names == name
            test[name] = M.summarize(pred[rows], sets["test"].targets[rows])
            baseline[name] = M.summarize(
                np.broadcast_to(train_mean, (int(rows.sum()), len(train_mean))), sets["test"].targets[rows]
            )
    return {
        "out": str(cfg.out),
        "epochs": cfg.epochs,
        "best_" + cfg.select_metric: best,
        "split": info["split"],
        "validation": info["val_source"],
        "n_train_spots": len(sets["train"]),
        "n_val_spots": len(sets["val"]),
        "n_test_spots": len(sets["test"]),
        "history": history,
        "feature_seconds": round(info["feature_seconds"], 2),
        "test": test,
        "test_mean_baseline": baseline,
    }
