"""Fused Triton kernels of the ITMM and ICMM blocks (one module per op, each beside its PyTorch
reference), and their custom-op form for torch.export / AOTInductor (:mod:`.ops`)."""


def export_ops():
    """``{"itmm": f, "icmm": g}``, the traceable block ops that AOTInductor packages embed
    (see :mod:`.ops`), or None when Triton is not installed."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None
    from m2ort_fast.kernels.ops import export_ops as ops

    return ops()
