"""Save a training-like state, read back its metadata, restore it and check it bit for bit."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import stepsafe

base = sys.argv[1] if len(sys.argv) > 1 else "outputs/example/checkpoints"
rng = np.random.default_rng(0)
params = {f"layer_{i}": {"kernel": rng.standard_normal((512, 512), np.float32)} for i in range(8)}
state = {
    "step": 1000,
    "params": params,
    "opt_state": {"mu": {k: {"kernel": np.zeros_like(v["kernel"])} for k, v in params.items()}},
}
path = os.path.join(base, str(int(time.time())))
t = time.perf_counter()
stepsafe.save(path, state, custom_metadata={"note": "example"})
print(f"saved {path} in {time.perf_counter() - t:.3f} s")
print("metadata:", stepsafe.metadata(path)["params"]["layer_0"])
t = time.perf_counter()
restored = stepsafe.restore(path, state)
print(f"restored in {time.perf_counter() - t:.3f} s")
assert restored["step"] == 1000
assert all(np.array_equal(restored["params"][k]["kernel"], v["kernel"]) for k, v in params.items())
print("bit-exact: ok; latest under", base, "->", stepsafe.info(base).path)
