"""The ViT experiment's pipeline end to end on a subset: the model trains (loss falls) with the
leverage selection and evaluates with other selections (docs/vit.md has the full runs)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
vit = pytest.importorskip("vit_fashion")


@pytest.mark.skipif(not os.path.exists(vit.DATA), reason="dataset-fashion-mnist is not installed")
def test_quick_mode_trains_and_evaluates():
    info, acc = vit.quick()
    assert info["last_loss"] < info["first_loss"]
    assert info["steps"] == 32 and 0.0 <= acc <= 1.0
