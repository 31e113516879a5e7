"""notebooks/: each notebook runs top to bottom with nbclient on tiny settings (a cell after its
``parameters`` cell overrides them, as papermill does) and shows what it promises; the committed
files carry no outputs (nbstripout)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def execute(name: str, params: dict, tmp_path: Path) -> tuple[nbformat.NotebookNode, Path]:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    out = tmp_path / "out"
    params = {**params, "OUT": str(out)}
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in params.items())))
    env = {"LOWBIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, out


def _text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", ""))
            data = o.get("data", {})
            parts.append(data.get("text/plain", ""))
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_committed_notebooks_have_no_outputs():
    assert NAMES == ["1_quickstart", "2_quantize_your_model", "3_analyse_a_sweep",
                     "4_deepcache_tradeoffs"]
    for name in NAMES:
        nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), name
        assert any("parameters" in c["metadata"].get("tags", []) for c in code), name


def test_quickstart(tmp_path):
    nb, out = execute("1_quickstart", {"NUM_SAMPLES": 20, "STEPS": 4}, tmp_path)
    for run in ("fp", "ptq_w8a8"):
        res = json.loads((out / run / "results.json").read_text())
        assert res["status"] == "done" and res["sampler"] == "ddim4"
    text = _text(nb)
    assert "ptq_w8a8" in text and "cond_acc" in text
    assert _images(nb) == 2  # the two grids


def test_quantize_your_model(tmp_path):
    nb, _ = execute("2_quantize_your_model",
                    {"CALIB_N": 8, "NUM_SAMPLES": 10, "STEPS": 4}, tmp_path)
    text = _text(nb)
    assert "UNet2DModel: 41 linear, 35 conv" in text  # quantize_'s report
    assert "calibrated=" in text and "never_called=[]" in text
    assert "PSNR of the w8a8 samples to the FP samples" in text
    assert "packed layers by mode: {'int': 76}" in text
    assert _images(nb) == 1


def test_analyse_a_sweep(tmp_path):
    nb, out = execute("3_analyse_a_sweep", {"SWEEP": "experiments/ptq_digits/sweep",
                                            "METRICS": ["fid", "psnr"]}, tmp_path)
    assert {"fid_vs_bits.png", "size_mb_vs_fid.png", "grids.png"} <= {
        p.name for p in out.glob("*.png")}
    text = _text(nb)
    assert "w8a8" in text and "fid_std" in text
    assert _images(nb) >= 3


def test_deepcache_tradeoffs(tmp_path):
    nb, out = execute("4_deepcache_tradeoffs", {"INTERVALS": [1, 3], "NUM_SAMPLES": 20}, tmp_path)
    for n in (1, 3):
        assert json.loads((out / f"N{n}" / "results.json").read_text())["status"] == "done"
    text = _text(nb)
    assert "deepcache(N=" in text and "cache_speedup" in text
    assert _images(nb) == 3
