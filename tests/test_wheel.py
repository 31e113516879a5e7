"""A plain wheel works: configs, checkpoints and CUDA sources are package data, and ``lowbit`` runs
end to end from an installed wheel in a folder that has nothing of the source tree.

The wheel is built offline (``--no-build-isolation``, the build backend of lowbit's venv) from a
copy of the sources, so the working tree gets no ``build/`` or ``*.egg-info``. It is installed
with ``--no-deps`` into a fresh venv that sees the dependencies (torch …) of lowbit's venv through
a ``.pth`` line. A ``.pth`` line only appends a folder to ``sys.path``: the ``.pth`` files inside
that folder, among them the editable install's finder, are not run, so ``import lowbit`` finds
the wheel's copy, which the test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed with rc {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def _clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOWBIT_", "PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), HOME=str(tmp / "home"))
    (tmp / "home").mkdir(exist_ok=True)
    return env


def _build_wheel(tmp: Path, env: dict[str, str]) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "lowbit", src / "lowbit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(out), str(src)], cwd=tmp, env=env, timeout=600)
    (wheel,) = out.glob("lowbit-*.whl")
    return wheel


def _check_package_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    want = [p.relative_to(ROOT).as_posix() for pattern in
            ("conf/**/*.yaml", "kernels/*.cu", "kernels/*.cuh", "assets/*.safetensors",
             "assets/*.json") for p in (ROOT / "lowbit").glob(pattern)]
    assert want and "lowbit/conf/config.yaml" in want and "lowbit/kernels/gemm_lowbit.cu" in want
    missing = sorted(set(want) - names)
    assert not missing, f"package data missing from {wheel.name}: {missing}"


def _make_venv(tmp: Path, env: dict[str, str], wheel: Path) -> tuple[Path, Path]:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env, timeout=300)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp, env=env, timeout=60).stdout.strip())
    # the dependencies of lowbit's own venv, without running its .pth files (editable finder)
    (site / "_lowbit_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp, env=env, timeout=600)
    return py, site


def test_wheel_installs_and_runs_from_an_empty_folder(tmp_path):
    env = _clean_env(tmp_path)
    wheel = _build_wheel(tmp_path, env)
    _check_package_data(wheel)
    py, site = _make_venv(tmp_path, env, wheel)

    # the wheel's lowbit, its configs and its kernel sources — not the source tree's
    probe = _run([str(py), "-c", (
        "import json, lowbit, lowbit.cli as c, lowbit.ops.cuda as k\n"
        "from lowbit.quant import QuantConfig\n"
        "print(json.dumps({'lowbit': lowbit.__file__, 'conf': str(c.CONF_DIR),\n"
        "  'kernels': str(k.kernel_dir()), 'cu': sorted(p.name for p in k.kernel_dir().iterdir()),\n"
        "  'label': QuantConfig.preset('w4a4', act={'granularity': 'channel'}).label()}))")],
        cwd=tmp_path, env=env, timeout=300)
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    for key in ("lowbit", "conf", "kernels"):
        assert Path(info[key]).resolve().is_relative_to(site.resolve()), (key, info[key])
    assert Path(info["kernels"]).is_dir()
    assert {"gemm_lowbit.cu", "quantize_act.cu", "lowbit_common.cuh"} <= set(info["cu"])
    assert info["label"] == "w4a4_pchan"  # bits presets load from the installed package

    work = tmp_path / "empty"
    work.mkdir()
    _run([str(py.parent / "lowbit"), "metrics.num_samples=20", "sampler.steps=5", "logger=none"],
         cwd=work, env=env, timeout=1200)
    results = sorted((work / "logs").glob("lowbit/runs/*/results.json"))
    assert len(results) == 1, sorted(p.relative_to(work) for p in work.rglob("*"))[:50]
    res = json.loads(results[0].read_text())
    assert res["status"] == "done"
    assert (res["model"], res["method"], res["bits"]) == ("digits", "fp", "fp")
