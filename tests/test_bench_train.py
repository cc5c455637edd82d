"""scripts/bench_train.py: parsing torchtitan's step lines and the table rows (no training run)."""


import pytest

from tests.scripts import load_script

bench = load_script("bench_train")


def log(tps: int, a2a: bool) -> str:
    lines = []
    for step in (1, 2, 3):
        lines.append(f"[rank0]: \x1b[31mstep:  {step}  \x1b[32mloss:  {8 - step:.5f}  grad_norm:  1.0  "
                     f"memory:  2.50GiB(1.0%)  tps: {tps:,}  tflops: 1.0  mfu: 0.{step}0%\x1b[39m")
        lines.append(f"[rank0]: step:  {step}  ce: 7.0  aux: 2.0  load0: [0.5 0.5]"
                     + (f"  a2a: {step}.5ms ({step}.0%)" if a2a else ""))
    return "\n".join(lines)


def test_parse_and_summarize_with_scaling_efficiency():
    rows = bench.parse(log(1000, a2a=True))
    assert rows[1] == (2, 6.0, 2.5, 1000.0, 0.2, (2.5, 2.0))
    one = {"name": "1 GPU", "ngpu": 1, "rc": 0, "rows": bench.parse(log(2000, a2a=False)), "wall": 10.0}
    two = {"name": "2 GPUs EP", "ngpu": 2, "rc": 0, "rows": rows, "wall": 12.0}
    assert bench.summarize(two, warmup=1, one_gpu=one) == (
        "| 2 GPUs EP | 2 | 3 | 7.000 → 5.000 | 1,000 | 0.2 | 2.50 | 3.0 (2.5%) | 50% | - | 12 |")
    four = {"name": "4 GPUs EP", "ngpu": 4, "rc": 0, "rows": bench.parse(log(800, a2a=True)), "wall": 9.0}
    assert "| 40% | 80% | 9 |" in bench.summarize(four, warmup=1, one_gpu=one, two_gpu=two)
    assert "| - | - | - |" in bench.summarize(one, warmup=1)
    failed = dict(two, rc="timeout 5 s")
    assert "failed (rc timeout 5 s)" in bench.summarize(failed, warmup=1)
    # a run that trained to NaN says so (torchtitan logs "loss:      nan" and goes on, exit status 0)
    nan_log = log(1000, a2a=False).replace("loss:  5.00000", "loss:      nan")
    assert "| 7.000 → nan (non-finite from step 3) |" in bench.summarize(dict(one, rows=bench.parse(nan_log)), warmup=1)
    assert "| no step logged |" in bench.summarize(dict(one, rows=[]), warmup=1)
    assert bench.versions().startswith("torch ")
    assert bench.variant(bench.SUITES["ep_2gpu"][0][2]) == ("train_configs/mom_340m.toml", "", 1)
    assert bench.variant(bench.SUITES["ep_2gpu"][5][2]) == ("train_configs/mom_340m.toml", "quantize.linear.float8", 2)
    assert bench.baseline_variant(("c", "f8", 4), 2) == ("c", "f8", 2)
    assert bench.baseline_variant(("c", "f8", 4), 1) == ("c", "f8", 1)


def test_pack_runs_cases_side_by_side_on_disjoint_gpus(monkeypatch, tmp_path):
    """--pack: the widest cases first, each on free GPUs, the next one as soon as enough are free."""
    started, pinned, polls = [], [], {}

    def start(name, ngpu, flags, steps, out_dir, gpus, cores=None):
        started.append((name, gpus))
        pinned.append(cores)
        return {"name": name, "ngpu": ngpu, "gpus": gpus}

    def finish(case, timeout):
        polls[case["name"]] = polls.get(case["name"], 0) + 1
        done = polls[case["name"]] >= case["ngpu"]  # a 2-GPU case takes two polls, a 1-GPU case one
        return dict(case, rc=0, rows=[]) if done else None

    monkeypatch.setattr(bench, "start_case", start)
    monkeypatch.setattr(bench, "finish_case", finish)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: set(range(12)))
    order = []
    cases = [("a1", 1, []), ("b2", 2, []), ("c2", 2, []), ("d1", 1, [])]
    bench.run_cases(cases, 3, tmp_path, 10, available=3, pack=True, on_result=lambda i, r: order.append(cases[i][0]))
    assert started[:2] == [("b2", [0, 1]), ("a1", [2])]
    assert sorted(order) == ["a1", "b2", "c2", "d1"]
    assert all(len(gpus) == 2 for name, gpus in started if name in ("b2", "c2"))
    # each packed case on its GPUs' share of the cores: the first two, side by side, on disjoint cores
    assert pinned[:2] == [set(range(8)), set(range(8, 12))]
    started.clear()
    bench.run_cases(cases, 3, tmp_path, 10, available=3, pack=False, on_result=lambda i, r: None)
    assert started == [(name, None) for name, _, _ in cases]
    assert pinned[-len(cases):] == [None] * len(cases)  # unpacked cases run on every core


def test_cores_for_gives_each_gpu_an_equal_disjoint_share(monkeypatch):
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert bench.cores_for([0], 4) == set(range(16))
    assert bench.cores_for([2, 3], 4) == set(range(32, 64))
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1})  # fewer cores than GPUs: no pinning
    assert bench.cores_for([3], 4) == {0, 1}


def test_report_takes_the_longest_stored_run_of_each_case(tmp_path, capsys):
    """--report: the table from stored runs (any step count, the longest per case), nothing run."""
    name1, n1, flags1 = bench.SUITES["scaling_1p3b"][0]
    name4, n4, flags4 = next(case for case in bench.SUITES["scaling_1p3b"] if case[1] == 4)

    def stored(tps, steps, ngpu):
        return {"name": "old name", "ngpu": ngpu, "rc": 0, "rows": bench.parse(log(tps, a2a=ngpu > 1)), "wall": 5.0,
                "cmd": f"NGPU={ngpu} run", "gpus": None, "versions": "torch 9, triton 9, torchtitan 9, torchao 9"}

    store = {bench.case_key(n1, flags1, 50, "GPU X"): stored(2000, 50, n1),
             bench.case_key(n1, flags1, 200, "GPU X"): stored(1000, 200, n1),
             bench.case_key(n1, flags1, 300, "GPU Y"): stored(4000, 300, n1),
             bench.case_key(n4, flags4, 80, "GPU X"): stored(500, 80, n4)}
    store[bench.case_key(n4, flags4, 90, "GPU X")] = dict(stored(600, 90, n4), rc=1)  # failed: not taken
    path = tmp_path / "runs.json"
    path.write_text(bench.json.dumps(store))
    assert bench.longest_stored(store, n1, flags1, "GPU X")["rows"][0][3] == 1000.0
    args = bench.argparse.Namespace(suite="scaling_1p3b", report="GPU X", results=path, warmup=1, no_write=True)
    bench.report(args)
    text = capsys.readouterr().out
    assert "4 × GPU X; torch 9, triton 9, torchtitan 9, torchao 9" in text
    assert f"| {name1} | 1 | 3 | 7.000 → 5.000 | 1,000 |" in text
    assert f"| {name4} | 4 |" in text and "| 50% | - |" in text
    assert "Not (yet) run:" in text and "8 GPUs" in text
    args.report = "GPU Z"
    with pytest.raises(ValueError, match="no successful run"):
        bench.report(args)


def test_a_cut_off_run_keeps_its_logged_steps(tmp_path):
    """A case killed at its time limit is reported with the steps it logged, marked cut off, and a
    finished run of the same case is preferred to it."""
    rows = bench.parse(log(900, a2a=True))
    cut = {"name": "4 GPUs EP", "ngpu": 4, "rc": "timeout 9 s", "cut_off": True, "steps": 200, "rows": rows, "wall": 9.0}
    one = {"name": "1 GPU", "ngpu": 1, "rc": 0, "rows": bench.parse(log(1800, a2a=False)), "wall": 10.0}
    assert bench.summarize(cut, warmup=1, one_gpu=one) == (
        "| 4 GPUs EP | 4 | 3 of 200 (cut off) | 7.000 → 5.000 | 900 | 0.2 | 2.50 | 3.0 (2.5%) | 50% | - | 9 |")
    crashed = dict(cut, cut_off=False, rc=1)
    assert "failed (rc 1)" in bench.summarize(crashed, warmup=1)
    assert "failed" in bench.summarize(dict(cut, rows=[]), warmup=1)  # cut off before its first step

    name, ngpu, flags = next(case for case in bench.SUITES["scaling_1p3b"] if case[1] == 4)
    store = {bench.case_key(ngpu, flags, 200, "GPU X"): cut}
    assert bench.longest_stored(store, ngpu, flags, "GPU X") is cut
    finished = {"name": name, "ngpu": ngpu, "rc": 0, "rows": rows[:2], "wall": 5.0}
    store[bench.case_key(ngpu, flags, 100, "GPU X")] = finished
    assert bench.longest_stored(store, ngpu, flags, "GPU X") is finished


def test_deadline_cuts_off_the_running_case_and_starts_no_other(monkeypatch, tmp_path):
    clock = [0.0]
    started, limits = [], []

    def start(name, ngpu, flags, steps, out_dir, gpus, cores=None):
        started.append(name)
        return {"name": name, "ngpu": ngpu, "gpus": gpus, "start": clock[0]}

    def finish(case, timeout):
        limits.append(timeout)
        return dict(case, rc="timeout", cut_off=True, rows=[]) if clock[0] - case["start"] >= timeout else None

    def sleep(seconds):
        clock[0] += seconds

    monkeypatch.setattr(bench, "start_case", start)
    monkeypatch.setattr(bench, "finish_case", finish)
    monkeypatch.setattr(bench.time, "sleep", sleep)
    monkeypatch.setattr(bench.time, "time", lambda: clock[0])
    results = []
    cases = [("a", 1, []), ("b", 1, [])]
    bench.run_cases(cases, 3, tmp_path, timeout=100, available=1, pack=False,
                    on_result=lambda i, r: results.append(cases[i][0]), deadline=5.0)
    assert started == ["a"] and results == ["a"]
    assert set(limits) == {5.0}  # the deadline, not the case timeout of 100 s
