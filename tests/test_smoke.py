from __future__ import annotations

import numpy as np

import stepsafe


def test_save_restore_simple_tree(tmp_path):
    tree = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "step": 7}
    stepsafe.save(tmp_path / "7", tree)
    out = stepsafe.restore(tmp_path / "7")
    assert out["step"] == 7
    np.testing.assert_array_equal(out["params"]["w"], tree["params"]["w"])
