"""Issue 24: ``dir(m2ort_fast)`` lists the public API (before: lazy exports without ``__dir__``
left it out), and every name it lists resolves."""

from __future__ import annotations

import m2ort_fast


def test_dir_lists_the_public_api():
    listed = dir(m2ort_fast)
    for name in ("Predictor", "predict_slides", "predict_cohort", "open_slide", "load_checkpoint", "as_spots"):
        assert name in listed
    assert set(m2ort_fast.__all__) <= set(listed) and "__version__" in listed


def test_every_exported_name_resolves():
    for name in m2ort_fast.__all__:
        if name != "predict_cohort":  # imports Ray's integration lazily; resolved in test_cohort
            assert getattr(m2ort_fast, name) is not None
    assert m2ort_fast.as_spots([[1.0, 2.0]]).centers_px.tolist() == [[1.0, 2.0]]
