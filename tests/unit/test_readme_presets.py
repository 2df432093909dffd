"""README's table of data presets states each preset's cutoff and ``sel`` as its config does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.hydra import compose_cfg

README = Path(__file__).resolve().parents[2] / "README.md"
PRESETS = ("cu_emt", "cu_pwmat", "si_mlearn", "water_deepmd", "mapbi3_dpgen", "ec_pwmat")


def _table_row(preset: str) -> str:
    rows = [
        line
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith(f"| `{preset}`") and "rcut" not in line
    ]
    rows = [r for r in rows if re.search(r"\| [\d.]+ / [\d.]+, \[", r)]
    assert len(rows) == 1, f"README has {len(rows)} preset-table rows for {preset}"
    return rows[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_readme_gives_each_presets_cutoff_and_sel(preset, tmp_path):
    data = compose_cfg("train", [f"data={preset}"], tmp_path).data
    m = re.search(r"\| ([\d.]+) / ([\d.]+), \[([\d, ]+)\]", _table_row(preset))
    assert m, preset
    assert float(m.group(1)) == data.rcut and float(m.group(2)) == data.rcut_smth
    assert [int(x) for x in m.group(3).split(",")] == list(data.sel)
