"""levattn: the heavy entries of attention, and attention over them in time linear in n.

The numpy API mirrors the C++ library (include/levattn/*.hpp): arrays in (any numeric array-like;
C-contiguous float32 is taken without a copy), numpy arrays and small result objects out, the
GIL released while the library computes. Errors: ValueError for bad arguments, shapes and
values (NaN/Inf, empty arrays, wrong dtypes), OSError for files, RuntimeError for internal ones.

PyTorch: ``import levattn.torch`` for ``lev_attention`` (differentiable, C++ forward and
backward) and the ``LevSelfAttention`` module.
"""
from . import _core
from ._core import (  # noqa: F401
    AttentionResult,
    HeavyAgreement,
    HeavyEntries,
    KVCache,
    KeyGram,
    LeverageOptions,
    LeverageScores,
    LewisWeights,
    PlantedInstance,
    Reduced,
    Selection,
    StreamingUniversalSet,
    UniversalSet,
    adaptive_budget,
    attention,
    attention_backward,
    attention_forward,
    build_info,
    causal_universal_sets,
    compare_heavy_entries,
    evaluate,
    heavy_entries,
    heavy_entries_brute_force,
    key_gram,
    leverage_scores,
    lewis_weights,
    parse_selection,
    planted,
    reduce_dimension,
    select_keys,
    selection_metrics,
    sensitivity_bounds,
    sketch_rows,
    softmax_gram_error,
    universal_set,
    version,
)

__version__ = version()

_NUMPY_FILES = {"read_npy": "numpy.load", "read_npz": "numpy.load", "write_npy": "numpy.save", "write_npz": "numpy.savez"}


def __getattr__(name):
    if name in _NUMPY_FILES:
        raise AttributeError(f"levattn.{name} is gone: numpy reads and writes .npy and .npz files "
                             f"({_NUMPY_FILES[name]})")
    raise AttributeError(f"module 'levattn' has no attribute {name!r}")


def info():
    """What ``levattn info`` prints, plus the numpy and torch versions."""
    import numpy

    lines = [_core.info_text().rstrip("\n"), f"numpy:     {numpy.__version__}"]
    try:
        import torch
        lines.append(f"torch:     {torch.__version__}")
    except ImportError:
        lines.append("torch:     not installed")
    return "\n".join(lines)
