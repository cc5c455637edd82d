"""scripts/tune_kernels.py and the tile overrides it sets (`launch.OVERRIDES`), on CPU: the kernels
run under the Triton interpreter in a subprocess, at a tiny shape."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
tune = load_script("tune_kernels")


def test_candidates_keep_tiles_within_the_head_and_skip_16_wide_tiles_at_8_warps():
    assert tune.default_choices(128) == dict(BV=128, BVG=32, BVS=64, BVS_bwd=64, warps_seq=4, warps_chunk=4,
                                             warps_grad=8, warps_inverse=1, stages_state=2, stages_state_bwd=2,
                                             stages_grad=3, chunk_states_in_input_dtype=1, wy_in_input_dtype=1,
                                             du_in_input_dtype=1, state_bwd_dots_in_input_dtype=1, state_k_split=0,
                                             state_tiles_side_by_side=1)
    fp32 = tune.default_choices(128, "float32")
    assert fp32["stages_grad"] == 2  # 3 need more shared memory than Hopper has
    assert (fp32["BV"], fp32["warps_chunk"]) == (64, 8)  # 128-wide chunk tiles of fp32 operands would spill
    # 64-wide state blocks would spill at d = 256 and with fp32, and halve the programs at d = 64
    assert fp32["BVS"] == tune.default_choices(256)["BVS"] == tune.default_choices(64)["BVS"] == 32
    storage = tune.candidates(["storage"], head_dim=128)
    assert len(storage) == 7 and storage[0] == dict(chunk_states_in_input_dtype=0, wy_in_input_dtype=1,
                                                      du_in_input_dtype=1, group="storage")
    assert storage[-1] == dict(chunk_states_in_input_dtype=0, wy_in_input_dtype=0, du_in_input_dtype=0, group="storage")
    seq = tune.candidates(["seq"], head_dim=128)
    assert {c["BVS"] for c in seq} == {c["BVS_bwd"] for c in seq} == {16, 32, 64, 128}
    assert {c["stages_state"] for c in seq} == {c["stages_state_bwd"] for c in seq} == {1, 2, 3}
    assert not any(16 in (c["BVS"], c["BVS_bwd"]) and c["warps_seq"] == 8 for c in seq)
    # no 16-wide tile at 8 warps (63 of the 144 at 8 warps), and not the defaults themselves
    assert len(seq) == 16 * 3 * 9 - 63 - 1
    # nearest the defaults (BVS 64 forward and reverse, 4 warps, 2 stages each) first: one choice changed in each of
    # the first eleven
    near = (("BVS", 64), ("BVS_bwd", 64), ("warps_seq", 4), ("stages_state", 2), ("stages_state_bwd", 2))
    assert all(sum(c[k] != v for k, v in near) == 1 for c in seq[:11])
    assert tune.candidates(["inverse"], head_dim=64) == [dict(warps_inverse=w, group="inverse") for w in (2, 4)]
    # no chunk tile narrower than 64 at d > 64 with 16-bit inputs (Triton 3.6 builds it wrong: `_Plan.allowed`)
    assert {c["BV"] for c in tune.candidates(["chunk"], head_dim=256)} == {64, 128}
    assert {c["BV"] for c in tune.candidates(["chunk"], head_dim=256, dtype="float32")} == {32, 64, 128}
    assert {c["BV"] for c in tune.candidates(["chunk"], head_dim=64)} == {32, 64}
    assert {c["BVG"] for c in tune.candidates(["grad"], head_dim=256)} == {16, 32, 64}
    # 16-bit reverse-pass dots at d >= 128 with 16-bit inputs (TF32 at d <= 64)
    assert tune.candidates(["dots"], head_dim=64) == [dict(state_bwd_dots_in_input_dtype=1, group="dots")]
    assert tune.candidates(["dots"], head_dim=128) == [dict(state_bwd_dots_in_input_dtype=0, group="dots")]
    assert tune.candidates(["dots"], head_dim=256) == [dict(state_bwd_dots_in_input_dtype=0, group="dots")]
    assert tune.default_choices(128, "float32")["BVS_bwd"] == tune.default_choices(256)["BVS_bwd"] == 32
    assert tune.candidates(["split"], head_dim=256) == [dict(state_k_split=s, group="split") for s in (0, 1, 2)]
    assert tune.candidates(["order"], head_dim=64) == [dict(state_tiles_side_by_side=s, group="order") for s in (0, 1)]
    groups = "seq, chunk, inverse, grad, storage, dots, split and order"
    with pytest.raises(ValueError, match=f"--groups takes {groups}, got 'tiles'"):
        tune.candidates(["tiles"], head_dim=64)
    with pytest.raises(ValueError, match="--heads must be H x d"):
        tune.parse_args(["--heads", "32"])


@pytest.mark.parametrize("flags, match", [(["--limit", "0"], "--limit must be >= 1, got 0"),
                                          (["--timeout", "0"], "--timeout must be >= 1, got 0"),
                                          (["--tolerance", "-1"], "--tolerance must be >= 0, got -1.0"),
                                          (["--tolerance", "nan"], "--tolerance must be >= 0, got nan")])
def test_bad_options_raise(flags, match):
    with pytest.raises(ValueError, match=match):
        tune.parse_args(flags)


def test_a_failed_default_stops_the_run_before_the_candidates(monkeypatch):
    """The default choices' results are the reference: if they fail, no candidate is measured (the first
    one would otherwise become the reference and differ by 0 from itself)."""
    ran = []

    def fail(a, overrides, timeout):
        ran.append(overrides["group"])
        return dict(overrides, status="failed (rc 1): boom")

    monkeypatch.setattr(tune, "run_candidate", fail)
    with pytest.raises(RuntimeError, match=r"the default choices did not run: failed \(rc 1\): boom"):
        tune.main(["--heads", "1x32", "--groups", "seq", "--limit", "2", "--no-write"])
    assert ran == ["default"]


def test_forward_state_tile_narrows_where_its_programs_are_few(monkeypatch):
    """The forward state pass halves its V tile (down to 16) while its programs, segments x heads x V tiles x
    K splits, are at most the SMs and, halved, their k and W rows per chunk step at most 256 x SMs; an override
    of BVS, and a GPU of 0 SMs (the CPU), leave it alone."""
    from momtitan.ops.triton import launch

    def plan(B, H, d, g=True, beta=True):
        x = torch.zeros(B, 64, H, d, dtype=torch.bfloat16)
        gate = torch.zeros(B, 64, H)
        p = launch._Plan(x, x, x, gate if g else None, gate if beta else None, None, None, None, False, 64)
        return p.BVS, p.N * H * p.NVBS * p.NKS

    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 132)
    assert plan(8, 32, 128) == (64, 512)  # many programs: the widest tile
    assert plan(2, 32, 128) == (32, 256)  # 128 at 64 wide
    assert plan(1, 32, 128) == (16, 256)  # 64, then 128 (one per SM), then 256
    assert plan(1, 16, 128) == (16, 128)  # 16 wide at the narrowest
    assert plan(1, 4, 256) == (16, 64) and plan(2, 4, 256) == (16, 128)
    assert plan(4, 4, 256) == (32, 128)  # 256 programs of 256 rows would load too much k and W per step
    assert plan(8, 4, 256) == (32, 256)
    # without beta the pass is split along K first (`state_k_split`), which counts
    assert plan(1, 32, 128, beta=False) == (32, 256) and plan(2, 32, 128, beta=False) == (64, 256)
    assert plan(1, 4, 256, beta=False) == (16, 256)
    # the reverse pass keeps its tile
    x = torch.zeros(1, 64, 32, 128, dtype=torch.bfloat16)
    assert launch._Plan(x, x, x, None, x[..., 0], None, None, None, False, 64).BVS_bwd == 64
    monkeypatch.setattr(launch, "OVERRIDES", {"BVS": 64})
    assert plan(1, 32, 128) == (64, 64)
    monkeypatch.setattr(launch, "OVERRIDES", {"warps_seq": 8})  # never 16 wide at 8 warps
    assert plan(1, 32, 128) == (32, 128)
    monkeypatch.setattr(launch, "OVERRIDES", {})
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 0)
    assert plan(1, 32, 128) == (64, 64)


def test_forward_state_pass_pipelines_deeper_where_split_and_narrowed(monkeypatch):
    """4 pipeline stages in the forward state pass where it is split along K (no beta) and its V tile was
    narrowed for few programs, with 16-bit inputs; 2 elsewhere, and an override wins."""
    from momtitan.ops.triton import launch

    def stages(B, H, d, beta=False, dtype=torch.bfloat16):
        x = torch.zeros(B, 64, H, d, dtype=dtype)
        gate = torch.zeros(B, 64, H)
        return launch._Plan(x, x, x, gate, gate if beta else None, None, None, None, False, 64).stages_state

    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 132)
    assert stages(1, 4, 256) == 4 and stages(1, 32, 128) == 4 and stages(1, 16, 128) == 4
    assert stages(2, 32, 128) == 2  # split, not narrowed
    assert stages(8, 32, 128) == 2  # neither
    assert stages(1, 4, 256, beta=True) == 2 and stages(1, 32, 128, beta=True) == 2  # the delta rules
    assert stages(1, 4, 256, dtype=torch.float32) == 2
    monkeypatch.setattr(launch, "OVERRIDES", {"stages_state": 3})
    assert stages(1, 4, 256) == 3
    monkeypatch.setattr(launch, "OVERRIDES", {})
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 0)  # CPU: no split, no narrowing
    assert stages(1, 4, 256) == 2


def test_overrides_reach_the_plan_and_bad_ones_raise(monkeypatch):
    from momtitan.ops.triton import launch

    q = torch.randn(1, 40, 2, 64)
    v = torch.randn(1, 40, 2, 64)

    def plan():
        return launch._Plan(q, q, v, None, None, None, None, None, False, 64)

    monkeypatch.setattr(launch, "OVERRIDES", {"BVS": 64, "stages_state": 3})
    p = plan()
    assert (p.BVS, p.NVBS, p.stages_state, p.stages_state_bwd) == (64, 1, 3, 2)
    monkeypatch.setattr(launch, "OVERRIDES", {"tile": 32})
    with pytest.raises(ValueError, match="OVERRIDES may set .* got 'tile'"):
        plan()
    monkeypatch.setattr(launch, "OVERRIDES", {"BV": 128})
    with pytest.raises(ValueError, match=r"OVERRIDES\['BV'\] must be one of \(16, 32, 64\) at head dim 64 with "
                                         r"torch.float32 inputs, got 128"):
        plan()
    # 32-wide chunk tiles at d > 64 with 16-bit inputs fault on Hopper (Triton 3.6): refused, the state passes'
    # 32-wide tiles not
    wide = torch.randn(1, 40, 2, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(launch, "OVERRIDES", {"BV": 32})
    with pytest.raises(ValueError, match=r"OVERRIDES\['BV'\] must be one of \(64, 128\) at head dim 128 with "
                                         r"torch.bfloat16 inputs, got 32"):
        launch._Plan(wide, wide, wide, None, None, None, None, None, False, 64)
    monkeypatch.setattr(launch, "OVERRIDES", {"BVS": 32, "BVG": 16})
    assert launch._Plan(wide, wide, wide, None, None, None, None, None, False, 64).BVS == 32
    monkeypatch.setattr(launch, "OVERRIDES", {"stages_state_bwd": 0})
    with pytest.raises(ValueError, match=r"OVERRIDES\['stages_state_bwd'\] must be one of \(1, 2, 3, 4\) at .*, got 0"):
        plan()
    monkeypatch.setattr(launch, "OVERRIDES", {"chunk_states_in_input_dtype": 1, "wy_in_input_dtype": 1,
                                              "du_in_input_dtype": 1})
    assert plan().chunk_state_dtype == plan().wy_dtype == plan().du_dtype == torch.float32  # fp32 inputs
    q16, v16 = q.bfloat16(), v.bfloat16()
    plan16 = launch._Plan(q16, q16, v16, None, None, None, None, None, False, 64)
    assert plan16.chunk_state_dtype == plan16.wy_dtype == plan16.du_dtype == torch.bfloat16
    assert plan16.dot_mode_state_bwd == 3  # TF32 unless the dots group asks for 16-bit operands
    monkeypatch.setattr(launch, "OVERRIDES", {"state_bwd_dots_in_input_dtype": 1})
    assert launch._Plan(q16, q16, v16, None, None, None, None, None, False, 64).dot_mode_state_bwd == 1
    assert plan().dot_mode_state_bwd == 0  # fp32 inputs: 3xTF32 either way
    monkeypatch.setattr(launch, "OVERRIDES", {})
    assert plan().stages_state == 2 and plan().chunk_state_dtype == plan().wy_dtype == torch.float32


def test_state_k_split_by_default_where_the_state_programs_are_few(monkeypatch):
    """Split along K, the rules without beta only: both state passes where segments x heads x V tiles
    are at most the SMs, the reverse pass only where at most twice the SMs; never on CPU (no SMs), and
    an override wins."""
    from momtitan.ops.triton import launch

    def split(B, H, d, dtype=torch.bfloat16, beta=False):
        x = torch.zeros(B, 1, H, d, dtype=dtype)
        p = launch._Plan(x, x, x, None, x[..., 0] if beta else None, None, None, None, False, 64)
        return p.state_k_split, p.NKS, p.NKS_bwd

    assert split(1, 4, 256) == (0, 1, 1)  # CPU
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 132)
    assert split(1, 4, 256) == (1, 4, 4) and split(8, 4, 256) == (2, 1, 4)  # 32 and 256 programs (8 V tiles of 32)
    assert split(2, 16, 128) == (1, 2, 2)  # 64 programs (2 V tiles of 64)
    assert split(8, 16, 128) == (2, 1, 2) and split(8, 32, 128) == (0, 1, 1)  # 256 and 512
    assert split(8, 16, 128, torch.float32) == (0, 1, 1)  # 4 V tiles of 32: 512
    assert split(1, 4, 256, beta=True) == (1, 1, 1)  # the delta rules hold every row
    monkeypatch.setattr(launch, "OVERRIDES", {"state_k_split": 0})
    assert split(1, 4, 256) == (0, 1, 1)
    monkeypatch.setattr(launch, "OVERRIDES", {"state_k_split": 2})
    assert split(1, 4, 256) == (2, 1, 4)


def test_state_tiles_side_by_side_by_default_where_the_state_programs_are_many(monkeypatch):
    """The state passes' tiles side by side where their programs (segments x heads x V tiles x K splits)
    are more than twice the SMs; always on CPU (no SMs); an override wins; the grid follows."""
    from momtitan.ops.triton import launch

    def plan(B, H, d, beta=True, split=None):
        x = torch.zeros(B, 1, H, d, dtype=torch.bfloat16)
        monkeypatch.setattr(launch, "OVERRIDES", {} if split is None else {"state_k_split": split})
        return launch._Plan(x, x, x, None, x[..., 0] if beta else None, None, None, None, False, 64)

    assert plan(1, 4, 256).state_tiles_side_by_side == 1  # CPU
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 132)
    # the delta rules: 32 programs at 4/256 B1 (8 V tiles of 32), 256 at B8, 512 at 32/128 B8 (2 of 64)
    assert [plan(B, H, d).state_tiles_side_by_side for B, H, d in ((1, 4, 256), (8, 4, 256), (8, 32, 128))] == [0, 0, 1]
    # without beta, split along K: 4 x 256 = 1024 at 4/256 B8
    assert plan(8, 4, 256, beta=False, split=1).state_tiles_side_by_side == 1
    p = plan(8, 4, 256, beta=False, split=0)
    assert p.state_tiles_side_by_side == 0 and p.state_grid(8) == (8, 4, 8)
    p = plan(8, 32, 128)
    assert p.state_grid(2) == (16, 32)
    monkeypatch.setattr(launch, "OVERRIDES", {"state_tiles_side_by_side": 1})
    assert launch._Plan(*(torch.zeros(1, 1, 4, 256, dtype=torch.bfloat16),) * 3, None, None, None, None, None, False,
                        64).state_tiles_side_by_side == 1


def test_overrides_from_the_environment_reach_the_plan_and_bad_ones_raise(monkeypatch):
    """`MOMTITAN_KERNEL_OVERRIDES` sets choices for a whole process (a test suite under a candidate);
    `OVERRIDES` set in the process win over it."""
    from momtitan.ops.triton import launch

    q = torch.randn(1, 40, 2, 64)

    def plan():
        return launch._Plan(q, q, q, None, None, None, None, None, False, 64)

    monkeypatch.setenv(launch.OVERRIDES_ENV, '{"warps_inverse": 2, "BVS": 16}')
    assert (plan().warps_inverse, plan().BVS) == (2, 16)
    monkeypatch.setattr(launch, "OVERRIDES", {"BVS": 64})
    assert (plan().warps_inverse, plan().BVS) == (2, 64)
    monkeypatch.setattr(launch, "OVERRIDES", {})
    monkeypatch.setenv(launch.OVERRIDES_ENV, "warps_inverse=1")
    with pytest.raises(ValueError, match="MOMTITAN_KERNEL_OVERRIDES must be a JSON object of tile choices, got 'warps_inverse=1'"):
        plan()
    monkeypatch.setenv(launch.OVERRIDES_ENV, '{"warps_inverse": 3}')
    with pytest.raises(ValueError, match=r"^MOMTITAN_KERNEL_OVERRIDES\['warps_inverse'\] must be one of \(1, 2, 4, 8, 16\) at .*, got 3"):
        plan()
    with pytest.raises(ValueError, match=r"unset MOMTITAN_KERNEL_OVERRIDES to tune"):  # it would move the defaults row
        tune.main(["--heads", "1x32", "--groups", "seq", "--no-write"])


def test_tuning_run_on_the_interpreter_agrees_with_the_defaults(tmp_path):
    """The nearest candidate of each group (for fp32 inputs the storage one changes nothing but the code
    path), each in its own process: every one runs and matches the default choices' output, final
    state and gradients."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "scripts" / "tune_kernels.py"), "--heads", "1x32", "--seq-len", "40",
           "--batch", "2", "--dtype", "float32", "--warmup", "0", "--reps", "1", "--groups", "seq,inverse,grad,storage",
           "--limit", "1", "--no-write"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "defaults" not in line
            and not line.startswith("| group")]
    assert [row.split("|")[1].strip() for row in rows] == ["seq", "inverse", "grad", "storage"], done.stdout
    assert all(row.rstrip().endswith("| ok |") for row in rows), done.stdout
    assert "| default | defaults |" in done.stdout and "Fastest agreeing candidate" in done.stdout


def test_given_choices_are_checked_and_timed_on_the_interpreter(tmp_path):
    """`--choices`: exactly the candidates given, each checked against what the plan allows before any runs,
    then run like a group's (here 3 pipeline stages in the forward state pass, fp32 on the interpreter)."""
    assert tune.given_candidates('[{"stages_state": 4}, {"BVS": 16, "warps_seq": 2}]', 128) == [
        dict(stages_state=4, group="given"), dict(BVS=16, warps_seq=2, group="given")]
    for text in ("stages_state=4", "{}", "[]", '[{"stages_state": 4}, 3]', "[{}]"):
        with pytest.raises(ValueError, match=r"--choices must be a JSON list of objects of tile choices, got "):
            tune.given_candidates(text, 128)
    with pytest.raises(ValueError, match=r"--choices may set .* got 'tile'"):
        tune.given_candidates('[{"tile": 16}]', 128)
    with pytest.raises(ValueError, match=r"--choices\['BV'\] must be one of \(64, 128\) at head dim 128 with "
                                         r"torch.bfloat16 inputs, got 32"):
        tune.parse_args(["--heads", "4x128", "--choices", '[{"BV": 32}]'])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "scripts" / "tune_kernels.py"), "--heads", "1x32", "--seq-len", "40",
           "--batch", "2", "--dtype", "float32", "--warmup", "0", "--reps", "1", "--choices", '[{"stages_state": 3}]',
           "--no-write"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "float32, given" in done.stdout and "--choices '[{\"stages_state\": 3}]'" in done.stdout, done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| given |")]
    assert len(rows) == 1 and "stages_state=3" in rows[0] and rows[0].rstrip().endswith("| ok |"), done.stdout
