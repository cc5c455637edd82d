"""scripts/bench_inference.py on the CPU: the smoke configuration end to end, the report, argument errors."""

import pytest

from tests.scripts import load_script

SMOKE = ["--device", "cpu", "--flavor", "debug", "--prefill-lens", "64,128", "--batch-sizes", "1,2",
         "--new-tokens", "8", "--prefill-chunk", "48", "--no-write"]


@pytest.fixture(scope="module")
def cli():
    return load_script("bench_inference")


@pytest.fixture(scope="module")
def smoke(cli):
    return cli.main(SMOKE)


def test_smoke_run_measures_every_cell(smoke, capsys):
    decode, prefill = smoke["decode"], smoke["prefill"]
    for arm in ("momtitan", "momtitan-hf", "llama"):
        rows = [r for r in decode if r["arm"] == arm]
        assert [r["batch"] for r in rows] == [1, 2]
        for r in rows:
            assert r["status"] == "ok", r
            assert r["new_tokens"] == 8 and r["seconds"] > 0 and r["tokens_per_s"] > 0
            assert r["tokens_per_s"] == pytest.approx(r["batch"] * 8 / r["seconds"])
            assert r["peak"] is None  # no memory statistics on the CPU
    for arm in ("momtitan", "momtitan-chunked", "llama"):
        rows = [r for r in prefill if r["arm"] == arm]
        assert [r["seq_len"] for r in rows] == [64, 128]
        assert all(r["status"] == "ok" and r["ms"] > 0 and r["tokens_per_s"] > 0 for r in rows), rows
    # fla never runs on the CPU (Triton kernels): skipped with a reason, never an error
    fla = [r for r in decode + prefill if r["arm"] == "fla"]
    assert len(fla) == 4 and all(r["status"] in ("not installed", "skipped: fla's kernels are Triton (CUDA only)")
                                 for r in fla)
    assert not any(r["status"].startswith(("error", "OOM")) for r in decode + prefill)
    assert "last_logits" not in prefill[0]
    assert smoke["meta"]["params"]["momtitan"] > smoke["meta"]["params"]["llama"] > 0


def test_report_tables_and_section_replacement(cli, smoke, tmp_path):
    a = cli.parse_args(SMOKE)
    a.argv = SMOKE
    text = cli.markdown(smoke, a, "CPU", None)
    assert text.startswith(cli.SECTION)
    assert "| momtitan Generator (eager) | 2 | 8 |" in text
    assert "| Llama SDPA forward | 128 |" in text
    assert "| momtitan prefill in chunks of 48 | 128 |" in text
    fla_rows = [line for line in text.splitlines() if line.startswith("| fla MomForCausalLM")]
    assert len(fla_rows) == 4 and all("| not installed |" in line or "| skipped" in line for line in fla_rows)
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\n{cli.SECTION}\n\nOLD-TABLE\n\n## Later section\n\nkeep\n")
    cli.write_section(out, text)
    new = out.read_text()
    assert "OLD-TABLE" not in new and new.count(cli.SECTION) == 1 and new.endswith("## Later section\n\nkeep\n")
    # the plot needs memory numbers: none on the CPU; with some, a PNG is written
    assert cli.plot(smoke["prefill"], str(tmp_path / "none.png"), "t") is not None
    pytest.importorskip("matplotlib")
    rows = [dict(arm=arm, seq_len=T, status="ok", peak=T * k * 2**20, state=k * 2**20)
            for k, arm in enumerate(cli.PREFILL_ARMS, 1) for T in (64, 128)]
    rows.append(dict(arm="llama", seq_len=256, status="OOM"))
    assert cli.plot(rows, str(tmp_path / "mem.png"), "t") is None
    assert (tmp_path / "mem.png").stat().st_size > 0


@pytest.mark.parametrize("flag,value", [("--batch-sizes", "1,x"), ("--prefill-lens", "0"), ("--arms", "momtitan,gpt"),
                                        ("--new-tokens", "0"), ("--vocab-size", "2"), ("--flavor", "huge"),
                                        ("--device", "tpu")])
def test_bad_arguments_raise_value_error_naming_them(cli, flag, value):
    with pytest.raises(ValueError, match=flag):
        cli.parse_args(["--device", "cpu", "--no-write", flag, value])


def test_guarded_reports_errors_per_cell(cli):
    def boom():
        raise RuntimeError("bad | cell\nsecond line")

    assert cli.guarded(lambda: 3, "cpu") == (3, None)
    assert cli.guarded(boom, "cpu") == (None, "error: RuntimeError: bad / cell")


def test_decode_budget_is_sized_on_a_call_without_one_off_costs(cli):
    """An HF arm whose first call is slow (autotuning) is timed over as many tokens as its steady
    per-token time fits in the budget, not as few as the first call predicted."""
    import time

    import torch

    calls = []

    def generate(prompt, n):
        time.sleep(0.5 if not calls else 0.002 * n)
        calls.append(n)
        return torch.zeros(prompt.shape[0], n, dtype=torch.long)

    prompt = torch.zeros(1, 4, dtype=torch.long)
    n, warm_s, runs = cli.decode_cell(generate, prompt, 256, torch.device("cpu"), repeats=1, budget_s=0.2,
                                      full_warmup=False)
    assert warm_s >= 0.5 and calls[:2] == [cli.WARMUP_TOKENS, cli.WARMUP_TOKENS]
    assert 40 <= n <= 100 and calls[-1] == n and len(runs) == 1
