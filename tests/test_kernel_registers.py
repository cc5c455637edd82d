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
    loads, scalar = cells[9].replace("(", "").replace(")", "").split()
    assert int(cells[8]) > int(loads) >= int(scalar) >= 0 and int(loads) > 0


def test_sass_counts_read_opcodes_past_predicates():
    kr = load_script("kernel_registers")
    sass = """
        /*0230*/                   LDG.E.64 R20, desc[UR56][R2.64] ;             /* 0x000000380214 */
                                                                                 /* 0x000ea8000c1e1b00 */
        /*0290*/                   LDG.E R101, desc[UR56][R4.64] ;               /* 0x0000003804657981 */
        /*0d10*/              @P6  LDG.E.128 R4, desc[UR56][R20.64] ;            /* 0x0000003814046981 */
        /*0d20*/              @!P4 LDG.E R8, desc[UR56][R22.64] ;                /* 0x0000003816084981 */
        /*11f0*/                   HGMMA.64x32x16.F32.BF16 R72, gdesc[UR4], RZ, !UPT ;
        /*3f90*/              @!P4 EXIT ;
"""
    assert kr.sass_counts(sass) == (6, 4, 2)
    pipelined = "        /*11a0*/                   LDGSTS.E.BYPASS.128 [R77], desc[UR54][R54.64], P1 ;\n"
    assert kr.sass_counts(sass + pipelined) == (7, 5, 2)  # copies into shared memory are global loads too


def test_sass_dir_writes_the_kernels_sass_with_source_lines(tmp_path, capsys):
    kr = load_script("kernel_registers")
    out = tmp_path / "sass"
    try:
        kr.main(["--kernels", "gates_kernel", "--heads", "64", "--sass-dir", str(out)])
    except FileNotFoundError as e:
        pytest.skip(f"no ptxas: {e}")
    (path,) = out.iterdir()
    assert path.name == "gates_kernel_gated_delta_bf16_d64_w1_s3.sass"
    text = path.read_text()
    assert "fwd_kernels.py" in text and "LDG" in text
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--sass-dir must be a folder .*, got the file '.*file'"):
        kr.parse_args(["--sass-dir", str(tmp_path / "file")])


def test_rule_and_norm_flags_pick_the_kernel_variant(capsys):
    """The ungated, unnormalised variant of the local-du kernel loads neither gates nor norms."""
    kr = load_script("kernel_registers")
    counts = {}
    for args in (["--rule", "gated_delta"], ["--rule", "linear", "--no-qk-l2norm"]):
        try:
            kr.main(["--kernels", "local_du_kernel", "--heads", "64", *args])
        except FileNotFoundError as e:
            pytest.skip(f"no ptxas: {e}")
        row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| local_du_kernel")]
        counts[args[1]] = int(row[0].strip("|").split("|")[9].split()[0])
    assert counts["linear"] < counts["gated_delta"], counts


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
    with pytest.raises(SystemExit):
        kr.parse_args(["--rule", "gla"])
    with pytest.raises(ValueError, match=r"--rule gated launches none of \['inverse_kernel', 'wy_kernel'\]"):
        kr.main(["--kernels", "wy_kernel", "--heads", "64", "--rule", "gated"])


def test_pointer_dtypes_follow_the_rule(monkeypatch):
    """Without beta the local-du kernel writes dv (v's dtype) through dul_ptr; the delta rules' du and
    du's chunk-local part take the plan's du dtype. T, dq and dk are in the inputs' dtype (the L2 norm's
    scratch in fp32)."""
    import torch

    kr = load_script("kernel_registers")
    from momtitan.ops.triton import launch

    x = torch.zeros(1, 1, 2, 64, dtype=torch.bfloat16)
    plan = launch._Plan(x, x, x, None, x[..., 0], None, None, None, False, launch.DEFAULT_CHUNK)
    assert kr.pointer_dtypes(plan, "bf16", "gated")["du_ptr"] == "bf16"
    assert kr.pointer_dtypes(plan, "bf16", "gated_delta")["du_ptr"] == "bf16"
    assert kr.pointer_dtypes(plan, "bf16", "gated")["dul_ptr"] == "bf16"
    monkeypatch.setattr(launch, "OVERRIDES", {"du_in_input_dtype": 0})
    fp32_du = launch._Plan(x, x, x, None, x[..., 0], None, None, None, False, launch.DEFAULT_CHUNK)
    assert kr.pointer_dtypes(fp32_du, "bf16", "gated_delta")["du_ptr"] == "fp32"
    assert kr.pointer_dtypes(plan, "bf16", "gated_delta")["t_ptr"] == "bf16"
    assert kr.pointer_dtypes(plan, "bf16", "gated_delta")["dq_ptr"] == "bf16"
    assert "dqn_ptr" not in kr.pointer_dtypes(plan, "bf16", "gated_delta")  # fp32 scratch


def test_state_passes_split_along_k_for_the_rules_without_beta(monkeypatch):
    """Under `state_k_split` the state passes are compiled with NKS programs of NKB / NKS blocks each, as
    `launch.py` launches them: four of one at d = 256 without beta; the delta rules keep one of four."""
    import torch

    kr = load_script("kernel_registers")
    from momtitan.ops.triton import launch

    monkeypatch.setattr(launch, "OVERRIDES", {"state_k_split": 1})
    x = torch.zeros(1, 1, 1, 256, dtype=torch.bfloat16)
    plan = launch._Plan(x, x, x, None, x[..., 0], None, None, None, False, launch.DEFAULT_CHUNK)
    for name in ("state_kernel", "state_bwd_kernel"):
        split = kr.constants(name, plan, None, rule="gated")[0]
        whole = kr.constants(name, plan, None, rule="gated_delta")[0]
        assert (split["NKS"], split["NKB"], whole["NKS"], whole["NKB"]) == (4, 1, 1, 4)
    assert kr.constants("output_kernel", plan, None, rule="gated")[0]["NKB"] == 4  # the chunk kernels: all rows
