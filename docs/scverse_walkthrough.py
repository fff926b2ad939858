# %% [markdown]
# # m2ort-fast in the scverse: predict, cluster, autocorrelate, plot
#
# A notebook-style script (cells marked `# %%`; open it in Jupyter with jupytext or VS Code, or
# run it whole: `python docs/scverse_walkthrough.py [OUT_DIR]`). It needs the `[spatial]` extra:
# `pip install -c constraints.txt "m2ort-fast[spatial]"` (scanpy, squidpy, igraph and leidenalg).
# CI runs it (`tests/test_ecosystem.py`).
#
# The predictions are log1p CPM (`uns["log1p"]` says so), so scanpy's pipeline starts after its
# normalisation steps. The shipped model's predictions are nearly one-dimensional (README: 98% of
# their variance on one axis): expect clusters that follow "how much tissue, how dark".

# %%
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: the script also runs headless in CI
import matplotlib.pyplot as plt
import scanpy as sc
import squidpy as sq

from m2ort_fast import Predictor
from m2ort_fast.predict import DEMO_SLIDE

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "m2ort-fast-walkthrough")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Predict the demo slide on a Visium-like grid (100 um), in memory

# %%
predictor = Predictor(device="cpu", progress=False)
adata = predictor.predict(DEMO_SLIDE)  # an AnnData laid out as Space Ranger + scanpy lay out Visium
print(adata)

# %% [markdown]
# ## 2. Expression neighbours and Leiden clusters (scanpy at its defaults)

# %%
sc.pp.pca(adata, n_comps=10)
sc.pp.neighbors(adata)
sc.tl.leiden(adata)  # igraph + leidenalg, from the [spatial] extra
print(adata.obs["leiden"].value_counts())

# %% [markdown]
# ## 3. Spatial neighbours and Moran's I of every predicted gene (squidpy)

# %%
# squidpy >= 1.8 names the grid builder spatial_neighbors_grid (spatial_neighbors is deprecated there)
getattr(sq.gr, "spatial_neighbors_grid", sq.gr.spatial_neighbors)(adata)  # the grid's six neighbours
sq.gr.spatial_autocorr(adata, mode="moran", n_perms=None)
morans = adata.uns["moranI"].sort_values("I", ascending=False)
print(morans.head(5))
morans.to_csv(OUT / "morans_i.csv")

# %% [markdown]
# ## 4. The clusters and the most autocorrelated gene on the slide

# %%
top_gene = morans.index[0]
sq.pl.spatial_scatter(adata, color=["leiden", top_gene])
plt.savefig(OUT / "spatial_scatter.png", dpi=100, bbox_inches="tight")
plt.close("all")
adata.write_h5ad(OUT / "walkthrough.h5ad")
print(f"wrote {OUT / 'spatial_scatter.png'}, {OUT / 'morans_i.csv'} and {OUT / 'walkthrough.h5ad'}")
