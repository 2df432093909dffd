"""The paper estimate of the largest sharded model, and the distributed benchmark (1-2 ranks)."""

from __future__ import annotations

import pytest

from rlekf.bench_distributed import largest_model, main, shard_bytes
from rlekf.optim import RLEKF


@pytest.mark.parametrize("n", [5120, 5121, 3 * 5120 + 77, 40_000])
def test_shard_bytes_one_rank_is_the_whole_covariance(n):
    assert shard_bytes(n, 5120, 1) == RLEKF.estimate_p_bytes([n], 5120)
    assert shard_bytes(n, 5120, 1, "float32") == RLEKF.estimate_p_bytes([n], 5120, "float32")


def test_shard_bytes_balances_equal_blocks():
    # 8 full blocks on 4 ranks: 2 each; 9 blocks: one rank holds 3 (lower tiles of 256:
    # 4 x 4 tiles of a 1000-block, 10 of them stored, the last row/column 232 wide)
    tri = sum(
        min(256, 1000 - 256 * r) * min(256, 1000 - 256 * c) for r in range(4) for c in range(r + 1)
    )
    assert shard_bytes(8 * 1000, 1000, 4) == 2 * tri * 8
    assert shard_bytes(9 * 1000, 1000, 4) == 3 * tri * 8


@pytest.mark.parametrize(("gpus", "dtype"), [(1, "float64"), (8, "float64"), (8, "float32")])
def test_largest_model_is_the_boundary(gpus, dtype):
    n = largest_model(gpus, 1.0, 512, dtype, usable_fraction=0.5, k=5)
    item = {"float64": 8, "float32": 4}[dtype]

    def need(m):
        return shard_bytes(m, 512, gpus, dtype) + 8 * m * item

    assert need(n) <= 0.5 * 2**30 < need(n + 1)


def test_largest_model_grows_with_gpus():
    one, eight = (largest_model(g, 80.0, 5120) for g in (1, 8))
    assert 7 * one < eight <= 8 * one + 5120


@pytest.mark.slow  # 16 s: two spawned ranks (make test-full); sharding itself: test_distributed
def test_bench_distributed_two_cpu_ranks(tmp_path, capsys):
    main(["--ranks", "1", "2", "--models", "Cu", "--repeats", "1", "--out", str(tmp_path)])
    md = next(tmp_path.glob("*-dist.md")).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| Cu |")]
    assert len(rows) == 2
    p_max = [float(r.split("|")[6]) for r in rows]
    assert p_max[1] < 0.6 * p_max[0]  # the 2-rank shard holds about half of P
