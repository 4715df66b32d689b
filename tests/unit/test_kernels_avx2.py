"""The AVX2-only kernel build (what an AMD Zen 3 compiles) on whatever x86 CPU runs the tests.

A subprocess with LEANLM_KERNEL_VARIANT=avx2 builds it (cached apart from the native build, about a minute the
first time), runs tests/unit/test_kernels.py in it (every kernel against its reference: odd shapes, batch 1 and
above, int8 and float activations), and writes every kernel's outputs on fixed inputs, which must equal the native
build's bit for bit, as the code promises: integer sums are exact, and float work runs in the same order whatever
the vector width (no fast-math reassociation, -ffp-contract=off).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_outputs import kernel_outputs

from leanlm.kernels import build

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,  # a second kernel build, about a minute the first time
    pytest.mark.skipif(not build.load_kernels(), reason="leanlm kernels unavailable (no compiler or AVX2)"),
]


def avx2_environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, build.VARIANT_ENV: "avx2", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def avx2(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("avx2") / "outputs.pt"
    script = Path(__file__).with_name("kernel_outputs.py")
    result = subprocess.run(
        [sys.executable, str(script), str(out)], env=avx2_environment(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def test_the_avx2_build_targets_avx2_only(avx2):
    assert avx2["facts"]["variant"] == "avx2"
    ninja = avx2["facts"]["build.ninja"]
    assert "-march=x86-64-v3" in ninja and "-march=native" not in ninja
    assert build.build_directory("avx2") != build.build_directory("native")


def test_kernel_tests_pass_in_the_avx2_build(avx2):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/unit/test_kernels.py")],
        env=avx2_environment(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_avx2_build_gives_the_native_bits(avx2):
    native = kernel_outputs()
    theirs = avx2["outputs"]
    # 50 + 8 + 18 16-bit linear, 25 dequantize, 4 fused; q8-sub16 (6-bit codes) and q5 run the packed layouts
    assert native.keys() == theirs.keys() and len(native) == 105
    for key in native:
        assert torch.equal(native[key], theirs[key]), key


def test_an_unknown_variant_is_refused(monkeypatch):
    monkeypatch.setenv(build.VARIANT_ENV, "avx10")
    with pytest.raises(Exception, match="Unknown LEANLM_KERNEL_VARIANT='avx10'. Use one of: native, avx2"):
        build.variant()
