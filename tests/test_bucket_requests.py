"""What a save and a restore cost in requests on a bucket, counted by a proxy that breaks
nothing: each data file goes up in one request, and a restore reads arrays that lie side by
side in a file with one ranged GET, not one per array (every request is a round trip)."""

from __future__ import annotations

from urllib.parse import unquote

import numpy as np
import pytest
from trees import assert_bit_exact

import stepsafe
from stepsafe.format import CheckpointReader
from stepsafe.storage import storage_for


@pytest.mark.parametrize("bucket_url", ["s3", "gcs"], indirect=True)
def test_small_arrays_cost_one_request_per_data_file(bucket_url, proxied):
    seen: list[tuple[str, str]] = []
    proxied(rate=0.0, max_faults=0, only=lambda m, p: seen.append((m, unquote(p))) and False)
    rng = np.random.default_rng(1)
    state = {f"a{i:03d}": rng.standard_normal(8192) for i in range(100)}  # 100 x 64 KiB
    path = f"{bucket_url}/1"
    stepsafe.save(path, state, data_file_size_bytes=4 << 20)
    storage, local = storage_for(path)
    with CheckpointReader(storage, local) as reader:
        files = len(reader.manifest.files)
    assert files == 2
    writes = [(m, p) for m, p in seen if m in ("PUT", "POST")]
    assert len(writes) == files + 2, writes  # the data files, the manifest, the marker

    seen.clear()
    assert_bit_exact(stepsafe.restore(path), state)
    media = "" if bucket_url.startswith("s3") else "alt=media"  # not GCS' metadata GETs
    reads = [p for m, p in seen if m == "GET" and ".data" in p and media in p]
    assert len(reads) == files, reads


@pytest.mark.parametrize("bucket_url", ["s3"], indirect=True)
def test_a_resharding_restore_costs_one_get_per_data_file(bucket_url, proxied):
    """Saved whole, restored onto 4 devices each holding a quarter of the columns: every
    device's box needs part of the same saved shard, and the restore still costs one GET per
    data file, not one per box."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    seen: list[tuple[str, str]] = []
    proxied(rate=0.0, max_faults=0, only=lambda m, p: seen.append((m, unquote(p))) and False)
    rng = np.random.default_rng(2)
    state = {f"w{i}": rng.standard_normal((64, 256)).astype(np.float32) for i in range(8)}
    path = f"{bucket_url}/1"
    stepsafe.save(path, state)
    by_cols = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("x",)), PartitionSpec(None, "x"))
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=by_cols) for k, v in state.items()}
    seen.clear()
    restored = stepsafe.restore(path, target)
    reads = [p for m, p in seen if m == "GET" and ".data" in p]
    assert len(reads) == 1, reads  # one data file
    for k, v in state.items():
        assert restored[k].sharding == by_cols
        np.testing.assert_array_equal(np.asarray(restored[k]), v)
