"""The wheel a user builds (`pip wheel .`) installs into a fresh environment and works there:
it imports, its version is the one source's, `levattn info` and `levattn-mpi` are on the
environment's PATH, and attention matches numpy.

LEVATTN_WHEEL names a wheel already built (scripts/test passes the one its build made); without
it the test builds one from the source tree with `pip wheel` (a full build, a few minutes)."""
import glob
import os
import re
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = r"""
import sys, numpy as np, levattn
assert levattn.__file__.startswith(sys.prefix), levattn.__file__
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 3, 40, 8)).astype(np.float32) for _ in range(3))
s = q @ np.swapaxes(k, -1, -2) / np.sqrt(8)
p = np.exp(s - s.max(-1, keepdims=True))
dense = (p / p.sum(-1, keepdims=True)) @ v
assert np.allclose(levattn.attention(q, k, v, select="full"), dense, atol=1e-5)
out = levattn.attention(q, k, v, select="leverage:8+window:2")
assert out.shape == (2, 3, 40, 8) and np.isfinite(out).all()
print(levattn.__version__, bool(levattn.build_info()["mpi"]))
"""


def project_version():
    text = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    return re.search(r"project\(levattn VERSION ([0-9.]+)", text).group(1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    given = os.environ.get("LEVATTN_WHEEL")
    if given:
        return given
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), ROOT], check=True)
    (built,) = glob.glob(str(out / "levattn-*.whl"))
    return built


def test_wheel_installs_into_a_fresh_environment(wheel, tmp_path):
    version = project_version()
    assert os.path.basename(wheel).startswith(f"levattn-{version}-"), wheel
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    import numpy  # the same numpy release as here: in the wheel cache, so the install is offline

    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel,
                    f"numpy=={numpy.__version__}"], check=True)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEVATTN_WHEEL")}
    clean["PATH"] = f"{bin_dir}{os.pathsep}{clean.get('PATH', '')}"
    smoke = subprocess.run([str(py), "-c", SMOKE], cwd=tmp_path, env=clean, capture_output=True, text=True)
    assert smoke.returncode == 0, smoke.stderr
    got_version, mpi = smoke.stdout.split(maxsplit=1)
    assert got_version == version

    info = subprocess.run(["levattn", "info"], cwd=tmp_path, env=clean, capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert version in info.stdout
    assert (bin_dir / "levattn").exists()
    # levattn-mpi comes with the wheel exactly when the build found MPI.
    assert (bin_dir / "levattn-mpi").exists() == (mpi.strip() == "True"), mpi
    meta = subprocess.run([str(py), "-c", "import importlib.metadata as m; d = m.metadata('levattn'); "
                           "print(d['Version'], d['License-Expression'], d['Requires-Python'])"],
                          env=clean, capture_output=True, text=True)
    assert meta.stdout.split() == [version, "MIT", ">=3.10"], meta.stdout + meta.stderr
