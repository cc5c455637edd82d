"""scripts/kernel_registers.py: the ahead-of-time sm_90 compile and ptxas report run on a CPU."""

import os

import pytest

from tests.scripts import load_script

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles for sm_90: the interpreter replaces the kernels' JIT functions")


def test_reports_registers_and_spills_of_a_kernel(capsys):
    kr = load_script("kernel_registers")
    try:
        kr.main(["--kernels", "local_du_kernel", "--heads", "64", "--warps", "4"])
    except FileNotFoundError as e:  # a Triton wheel without the NVIDIA backend's ptxas
        pytest.skip(f"no ptxas: {e}")
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| local_du_kernel")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1:4] == ["64", "4", "3"]  # the launcher passes no stages: Triton's default
    assert 0 < int(cells[4]) <= 255 and all(int(x) >= 0 for x in cells[5].split(" / ")) and int(cells[6]) > 0
    assert float(cells[7]) >= 0


def test_gradient_kernel_fits_hopper_shared_memory_with_fp32_inputs(capsys):
    """With fp32 inputs at Triton's default 3 stages the gradient kernel's pipelined loops need 240 KB of
    shared memory, and its launch failed on an H200 (OutOfResources): the launcher's stages must fit."""
    kr = load_script("kernel_registers")
    try:
        kr.main(["--kernels", "grads_kernel", "--heads", "128", "--dtype", "fp32"])
    except FileNotFoundError as e:
        pytest.skip(f"no ptxas: {e}")
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| grads_kernel")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert 0 < int(cells[6]) <= kr.HOPPER_SHARED_BYTES, row


def test_bad_arguments_raise():
    kr = load_script("kernel_registers")
    with pytest.raises(ValueError, match="--kernels takes names from .*, got \\['nope'\\]"):
        kr.main(["--kernels", "nope", "--heads", "64"])
    with pytest.raises(SystemExit):
        kr.parse_args(["--heads", "a,b"])
    with pytest.raises(ValueError, match=r"--heads takes head dims from 1 to 256 .*, got '64,0'"):
        kr.parse_args(["--heads", "64,0"])
    with pytest.raises(ValueError, match=r"--heads takes head dims from 1 to 256 .*, got '512'"):
        kr.parse_args(["--heads", "512"])
    with pytest.raises(ValueError, match=r"--warps takes powers of two .*, got '4,3'"):
        kr.parse_args(["--warps", "4,3"])
    with pytest.raises(ValueError, match=r"--warps takes powers of two .*, got '0'"):
        kr.parse_args(["--warps", "0"])
    with pytest.raises(ValueError, match="--stages must be >= 1, got 0"):
        kr.parse_args(["--stages", "0"])
