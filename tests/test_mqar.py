"""MQAR: the generator's properties, the state-size accounting of the four arms, and a tiny MoM
that learns an easy MQAR setting on CPU."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from momtitan.config import MoMModelArgs
from momtitan.eval.mqar import (
    ARMS,
    IGNORE_INDEX,
    MQARTask,
    TrainConfig,
    answer_positions,
    build_model,
    build_model_args,
    evaluate,
    generate_mqar,
    state_size,
    train_mqar,
)
from tests.scripts import load_script


# ---- generator ------------------------------------------------------------------------------
def test_shapes_and_dtypes():
    task = MQARTask(vocab_size=128, seq_len=64, num_kv_pairs=8)
    x, y = generate_mqar(task, 37, seed=3)
    assert x.shape == y.shape == (37, 64)
    assert x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < 128


def test_deterministic_per_seed():
    task = MQARTask(vocab_size=256, seq_len=64, num_kv_pairs=8)
    a = generate_mqar(task, 50, seed=11)
    torch.manual_seed(123)  # the global RNG must not matter
    b = generate_mqar(task, 50, seed=11)
    c = generate_mqar(task, 50, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("random_filler", [True, False])
@pytest.mark.parametrize("vocab,T,n", [(64, 32, 4), (256, 128, 32), (8192, 256, 64), (20, 16, 4)])
def test_queries_answer_with_the_paired_value(vocab, T, n, random_filler):
    task = MQARTask(vocab_size=vocab, seq_len=T, num_kv_pairs=n, random_non_queries=random_filler)
    x, y = generate_mqar(task, 64, seed=0, chunk=17)  # several chunks
    (k_lo, k_hi), (v_lo, v_hi) = task.key_range, task.value_range
    for i in range(x.shape[0]):
        keys, values = x[i, 0 : 2 * n : 2], x[i, 1 : 2 * n : 2]
        assert ((keys >= k_lo) & (keys < k_hi)).all() and ((values >= v_lo) & (values < v_hi)).all()
        assert keys.unique().numel() == n and values.unique().numel() == n
        pairs = dict(zip(keys.tolist(), values.tolist()))
        answer_pos = (y[i] != IGNORE_INDEX).nonzero().flatten()
        # exactly one query per key, all after the pairs, at even offsets from the end of the pairs
        assert answer_pos.numel() == n
        assert (answer_pos >= 2 * n).all() and ((answer_pos - 2 * n) % 2 == 0).all()
        assert sorted(x[i, answer_pos].tolist()) == sorted(pairs)
        for p in answer_pos.tolist():
            assert y[i, p].item() == pairs[x[i, p].item()]
        if not random_filler:
            filler = torch.ones(T, dtype=torch.bool)
            filler[: 2 * n] = False
            filler[answer_pos] = False
            assert (x[i, filler] == 0).all()


def test_power_law_prefers_short_gaps():
    def mean_answer_pos(power_a):
        task = MQARTask(vocab_size=512, seq_len=256, num_kv_pairs=4, power_a=power_a)
        _, y = generate_mqar(task, 400, seed=5)
        return (y != IGNORE_INDEX).nonzero()[:, 1].float().mean().item()

    # power_a = 1 is uniform over the 124 gap slots (mean position ~ 8 + 2*61.5 = 131)
    uniform = mean_answer_pos(1.0)
    assert 120 < uniform < 142
    assert mean_answer_pos(0.01) < uniform - 15


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seq_len=30, num_kv_pairs=8), "seq_len=30"),
        (dict(vocab_size=16, seq_len=64, num_kv_pairs=8), "vocab_size=16"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(seq_len=-4), "seq_len"),
        (dict(power_a=0.0), "power_a"),
        (dict(vocab_size=64.0), "vocab_size"),
    ],
)
def test_bad_task_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARTask(**kwargs)


def test_bad_generate_arguments_raise():
    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4)
    with pytest.raises(ValueError, match="num_examples"):
        generate_mqar(task, 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        generate_mqar(task, 4, seed=1.5)
    with pytest.raises(ValueError, match="task"):
        generate_mqar(dict(vocab_size=64), 4, seed=0)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


# ---- arms and state accounting --------------------------------------------------------------
def test_state_size_formula():
    args = MoMModelArgs(vocab_size=64, hidden_size=64, num_hidden_layers=3, num_heads=2, head_dim=16, expand_v=2.0,
                        num_memories=4, topk=2, shared_mem=True, intermediate_size=64, attn_num_heads=2, attn_layers=(1,))
    s = state_size(args, seq_len=100)
    per_stream = 2 * 16 * 32
    assert s.per_layer_total == 5 * per_stream and s.per_layer_active == 3 * per_stream
    assert s.total == 2 * 5 * per_stream and s.active == 2 * 3 * per_stream  # two MoM layers
    assert s.kv_cache == 1 * 2 * 100 * 64  # one attention layer, K and V, 2 heads x 32
    no_shared = state_size(args.replace(shared_mem=False, attn_layers=()))
    assert no_shared.per_layer_total == 4 * per_stream and no_shared.per_layer_active == 2 * per_stream
    assert no_shared.kv_cache == 0


@pytest.mark.parametrize("d_model", [32, 64, 128])
def test_arms_match_active_and_total_state(d_model):
    sizes = {arm: state_size(build_model_args(arm, d_model, vocab_size=256, seq_len=64), seq_len=64) for arm in ARMS}
    head = d_model // 2
    assert sizes["mom"].per_layer_total == 5 * 2 * head * head
    assert sizes["mom"].per_layer_active == 3 * 2 * head * head
    assert sizes["gdn_active"].total == sizes["gdn_active"].active == sizes["mom"].active
    assert sizes["gdn_total"].total == sizes["gdn_total"].active == sizes["mom"].total
    assert sizes["attention"].total == 0 and sizes["attention"].kv_cache == 2 * 2 * 64 * d_model


def test_arms_build_and_run():
    for arm in ARMS:
        args = build_model_args(arm, 32, vocab_size=64, seq_len=32)
        model = build_model(args, seed=0)
        out = model(torch.randint(0, 64, (2, 32)))
        assert out.logits.shape == (2, 32, 64) and torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="arm"):
        build_model_args("mamba", 32, vocab_size=64, seq_len=32)


def test_attention_heads_are_attn_head_dim_wide():
    def head_dim(d_model, **kwargs):
        args = build_model_args("attention", d_model, vocab_size=64, seq_len=32, **kwargs)
        return args.hidden_size // args.attn_num_heads

    assert head_dim(96) == 32 and head_dim(80, attn_head_dim=16) == 16
    assert head_dim(16) == 16  # smaller than attn_head_dim: one head of d_model
    with pytest.raises(ValueError, match=r"d_model=80 must be a multiple of attn_head_dim=32"):
        build_model_args("attention", 80, vocab_size=64, seq_len=32)
    with pytest.raises(ValueError, match=r"attn_head_dim must be a positive integer, got 0"):
        build_model_args("attention", 80, vocab_size=64, seq_len=32, attn_head_dim=0)


class _Oracle(torch.nn.Module):
    """Answers every query from the pairs at the start of its sequence (or always token 0)."""

    def __init__(self, n, vocab, perfect):
        super().__init__()
        self.n, self.vocab, self.perfect = n, vocab, perfect
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, logits_at):
        logits = torch.zeros(*x.shape, self.vocab)
        if self.perfect:
            for i in range(x.shape[0]):
                pairs = dict(zip(x[i, 0 : 2 * self.n : 2].tolist(), x[i, 1 : 2 * self.n : 2].tolist()))
                for t in range(2 * self.n, x.shape[1]):
                    logits[i, t, pairs.get(x[i, t].item(), 0)] = 1.0
        return SimpleNamespace(logits=logits.gather(1, logits_at[..., None].expand(-1, -1, self.vocab)))


def test_answer_positions_are_the_labelled_ones_in_order():
    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4)
    _, y = generate_mqar(task, 50, seed=3)
    pos = answer_positions(y)
    assert pos.shape == (50, 4) and pos.dtype == torch.int64
    assert (pos[:, 1:] > pos[:, :-1]).all()
    assert (y.gather(1, pos) != -100).all() and (y != -100).sum() == pos.numel()
    y[0, pos[0, 0]] = -100
    with pytest.raises(ValueError, match="same number of answers in every row, got counts from 3 to 4"):
        answer_positions(y)
    with pytest.raises(ValueError, match="labels must be an \\[N, T\\] tensor"):
        answer_positions(y[0])


def test_evaluate_scores_answers_only():
    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4, random_non_queries=False)
    x, y = generate_mqar(task, 40, seed=1)
    assert evaluate(_Oracle(4, 64, perfect=True), x, y, batch_size=16) == 1.0
    assert evaluate(_Oracle(4, 64, perfect=False), x, y, batch_size=16) == 0.0  # token 0 is never a value


# ---- learning --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOMTITAN_MQAR_LEARN") != "1",
                    reason="opt-in (MOMTITAN_MQAR_LEARN=1): minutes on CPU; not yet tuned to pass reliably in 60 s")
def test_tiny_mom_learns_easy_mqar():
    """vocab 64 (32 values, chance 1/32), T = 16, 4 pairs: a 2-layer MoM (top-2 of 4 + shared)
    must recall well above chance. On an H200 this setting reached 0.54 test accuracy after 500
    steps and 0.75 after 600 (constant lr 3e-3, batch 16); on a busy 2-core CPU 600 steps with
    cosine decay reached only 0.08, so this is opt-in until it is tuned."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and stable on a busy machine
    try:
        task = MQARTask(vocab_size=64, seq_len=16, num_kv_pairs=4)
        args = build_model_args("mom", 32, vocab_size=64, seq_len=16)
        cfg = TrainConfig(steps=1000, batch_size=16, lr=3e-3, warmup_frac=0.05, num_train=4000, num_test=256, seed=0)
        result = train_mqar(args, task, cfg)
    finally:
        torch.set_num_threads(threads)
    assert result["chance"] == 1 / 32
    assert result["accuracy"] > 0.5, result


def _cli():
    return load_script("mqar")


def test_mqar_script_runs_a_tiny_grid_end_to_end(tmp_path):
    """The CLI path CI can afford: two arms, one cell, a few steps; JSON, markdown table and plot written."""
    import json

    cli = _cli()
    out = tmp_path / "q.md"
    out.write_text("# Quality\n")
    runs = cli.main(["--device", "cpu", "--arms", "mom,attention", "--kv-pairs", "2", "--d-models", "16",
                     "--seq-len", "16", "--vocab-size", "32", "--steps", "8", "--batch-size", "8", "--num-train", "64",
                     "--num-test", "32", "--lrs", "0.003", "--stop-at", "0.99", "--json", str(tmp_path / "r.json"),
                     "--markdown", str(out), "--plot", str(tmp_path / "p.png")])
    assert {r["arm"] for r in runs} == {"mom", "attention"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in runs)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["runs"]) == 2 and saved["grid"]["kv_pairs"] == [2]
    assert "mom" in out.read_text() and "attention" in out.read_text()
    assert "a run stops once a training batch answers 0.99 of its queries right" in out.read_text()
    with pytest.raises(ValueError, match=r"--stop-at must be in \(0, 1\], got 1.5"):
        cli.main(["--device", "cpu", "--quick", "--stop-at", "1.5", "--no-write"])


def test_profile_traces_one_run(tmp_path):
    """--profile: five steps of the single run the options select, as a chrome trace and a table."""
    cli = _cli()
    tiny = ["--device", "cpu", "--kv-pairs", "2", "--d-models", "16", "--seq-len", "16", "--vocab-size", "32",
            "--batch-size", "8", "--num-train", "64", "--num-test", "32", "--lrs", "0.003", "--no-write"]
    table = cli.main(tiny + ["--arms", "mom", "--steps", "9", "--profile", str(tmp_path)])
    assert "aten::" in table and "Self CPU time total" in table
    assert '"ProfilerStep#' in (tmp_path / "mqar_trace.json").read_text()
    with pytest.raises(ValueError, match=r"--profile traces one run with --jobs 1; the options select 2 runs"):
        cli.main(tiny + ["--arms", "mom,attention", "--steps", "9", "--profile", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--profile needs at least 7 steps .* got 5"):
        cli.main(tiny + ["--arms", "mom", "--steps", "5", "--profile", str(tmp_path)])


def test_mqar_shards_split_the_grid_and_merge(tmp_path):
    """Two shards train disjoint halves of the grid; --merge writes one table of both."""
    cli = _cli()
    common = ["--device", "cpu", "--arms", "mom,attention", "--kv-pairs", "2", "--d-models", "16", "--seq-len", "16",
              "--vocab-size", "32", "--steps", "2", "--batch-size", "4", "--num-train", "16", "--num-test", "8",
              "--lrs", "0.003"]
    shards = [cli.main(common + ["--shard", f"{i}/2", "--json", str(tmp_path / f"s{i}.json")]) for i in range(2)]
    assert [[r["arm"] for r in runs] for runs in shards] == [["mom"], ["attention"]]
    out = tmp_path / "q.md"
    merged = cli.main(["--merge", f"{tmp_path / 's0.json'},{tmp_path / 's1.json'}", "--markdown", str(out),
                       "--plot", str(tmp_path / "p.png")])
    assert sorted(r["arm"] for r in merged) == ["attention", "mom"]
    assert "| 2 | 16 | mom |" in out.read_text() and "| 2 | 16 | attention |" in out.read_text()
    with pytest.raises(ValueError, match="--shard"):
        cli.main(common + ["--shard", "2/2"])


def test_merging_quick_runs_writes_the_quick_section(tmp_path):
    """--merge writes into the section of the grid its JSONs ran: quick JSONs leave the full grid's alone."""
    cli = _cli()
    cli.main(["--device", "cpu", "--quick", "--arms", "mom", "--kv-pairs", "2", "--d-models", "16", "--seq-len", "16",
              "--vocab-size", "32", "--steps", "2", "--batch-size", "4", "--num-train", "16", "--num-test", "8",
              "--json", str(tmp_path / "quick.json"), "--no-write"])
    out = tmp_path / "q.md"
    out.write_text("# Quality\n\n<!-- mqar-full:begin -->\nthe full grid\n<!-- mqar-full:end -->\n")
    cli.main(["--merge", str(tmp_path / "quick.json"), "--markdown", str(out), "--plot", str(tmp_path / "p.png")])
    text = out.read_text()
    assert "the full grid" in text and "<!-- mqar-quick:begin -->" in text and "CPU quick run" in text


def test_unknown_arm_raises_valueerror():
    with pytest.raises(ValueError, match=r"--arms: unknown arm 'bogus'"):
        _cli().main(["--device", "cpu", "--quick", "--arms", "mom,bogus", "--no-write"])


def test_mqar_merges_seeds_into_medians(tmp_path):
    """Grids of two seeds merge into one report: each seed's best lr per cell in the table, and per
    cell the median over seeds, their range and how many solved it."""
    cli = _cli()
    assert cli.summarize([0.1, 0.995, 0.5], 0.99) == "0.500 (0.100-0.995; 1/3)"
    assert cli.summarize([0.25], 0.99) == "0.250"
    rows = [dict(num_kv_pairs=2, d_model=16, arm="mom", seed=s, lr=lr, accuracy=acc)
            for s, lr, acc in [(0, 1e-3, 0.2), (0, 3e-3, 0.9), (1, 1e-3, 0.4), (1, 3e-3, 0.1)]]
    best = cli.best_runs(rows)
    assert [(r["seed"], r["lr"]) for r in best] == [(0, 3e-3), (1, 1e-3)]
    assert cli.cell_accuracies(best) == {(2, 16, "mom"): [0.9, 0.4]}

    common = ["--device", "cpu", "--arms", "mom,attention", "--kv-pairs", "2", "--d-models", "16", "--seq-len", "16",
              "--vocab-size", "32", "--steps", "2", "--batch-size", "4", "--num-train", "16", "--num-test", "8",
              "--lrs", "0.003", "--no-write"]
    for seed in (0, 1):
        runs = cli.main(common + ["--seed", str(seed), "--json", str(tmp_path / f"seed{seed}.json")])
        assert {r["seed"] for r in runs} == {seed}
    out = tmp_path / "q.md"
    merged = cli.main(["--merge", f"{tmp_path / 'seed0.json'},{tmp_path / 'seed1.json'}", "--markdown", str(out),
                       "--plot", str(tmp_path / "p.png")])
    assert len(merged) == 4
    text = out.read_text()
    assert "Accuracy by cell median over seeds [0, 1]" in text and "2 parts of" in text
    for seed in (0, 1):  # each seed's best run of each cell is a row of the table
        rows = [line for line in text.splitlines()
                if line.startswith("| 2 | 16 | mom | 5×(2×8×8) | 1,280 | 768 | ") and f" | {seed} | 3e-03 | 2 | " in line]
        assert len(rows) == 1
    pivot = [line for line in text.splitlines() if line.startswith("| 2 | 16 | ") and line.count("|") == 5]
    assert len(pivot) == 1 and pivot[0].count("/2)") == 2


def test_mqar_jobs_train_the_grid_in_worker_processes(tmp_path):
    """`--jobs 2`: the runs are trained by two spawned workers and all reach the JSON; bad --jobs raises."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "scripts" / "mqar.py"), "--device", "cpu", "--arms", "mom,attention",
           "--kv-pairs", "2", "--d-models", "16", "--seq-len", "16", "--vocab-size", "32", "--steps", "2",
           "--batch-size", "4", "--num-train", "16", "--num-test", "8", "--lrs", "0.001,0.003", "--no-write",
           "--json", str(tmp_path / "r.json")]
    done = subprocess.run(cmd + ["--jobs", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert sorted((r["arm"], r["lr"]) for r in runs) == [("attention", 0.001), ("attention", 0.003),
                                                         ("mom", 0.001), ("mom", 0.003)]
    bad = subprocess.run(cmd + ["--jobs", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--jobs must be >= 1, got 0" in bad.stderr


def test_mps_server_starts_and_stops_its_own_daemon(tmp_path, monkeypatch):
    """`--mps`: the control daemon is started with its own pipe/log folders (set for the workers while
    it runs), told to quit at the end, and refused without a CUDA device or without the tool."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "nvidia-cuda-mps-control"
    fake.write_text(f'#!/bin/sh\necho "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cli = _cli()
    with cli.mps_server("cuda"):
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        assert Path(pipe).is_dir() and Path(os.environ["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    start, stop = log.read_text().splitlines()
    assert start.startswith("args=-d ") and f"pipe={pipe}" in start
    assert stop == f"args= pipe={pipe} stdin=quit"
    with pytest.raises(ValueError, match="--mps needs a CUDA device, got --device 'cpu'"):
        cli.main(["--device", "cpu", "--quick", "--mps", "--no-write"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="--mps needs nvidia-cuda-mps-control"):
        cli.main(["--device", "cuda", "--quick", "--mps", "--no-write"])


def test_a_failed_run_lets_the_others_finish_then_fails_the_grid(tmp_path):
    """With --jobs 2, MoM's runs fail (top-2 of one memory) while attention's train: the JSON keeps
    attention's runs and the command exits non-zero naming each failed run and its error."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "scripts" / "mqar.py"), "--device", "cpu", "--arms", "mom,attention",
           "--kv-pairs", "2", "--d-models", "16", "--seq-len", "16", "--vocab-size", "32", "--steps", "2",
           "--batch-size", "4", "--num-train", "16", "--num-test", "8", "--lrs", "0.001,0.003", "--no-write",
           "--num-memories", "1", "--topk", "2", "--jobs", "2", "--json", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "RuntimeError: 2 of the grid's runs failed (2 finished, in the JSON): " in done.stderr
    for lr in ("1e-03", "3e-03"):
        assert f"kv=2 d=16 mom lr={lr}: ValueError: topk must be <= num_memories (1), got topk=2" in done.stderr
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert sorted((r["arm"], r["lr"]) for r in runs) == [("attention", 0.001), ("attention", 0.003)]


def test_compile_mode_needs_inductor_and_a_known_mode():
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="reduce-overhead")  # no compile backend
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_backend="inductor", compile_mode="fastest")
    assert TrainConfig(compile_backend="inductor", compile_mode="reduce-overhead").cuda_graphs
    assert not TrainConfig(compile_backend="inductor", compile_mode="default").cuda_graphs
    with pytest.raises(ValueError, match="--compile-mode reduce-overhead needs compiled blocks"):
        _cli().main(["--device", "cpu", "--quick", "--compile-mode", "reduce-overhead", "--no-write"])


def test_compiled_blocks_train_like_eager():
    """Per-block torch.compile (fullgraph; aot_eager here: inductor takes minutes on CPU, the GPU
    runs it) gives the eager losses."""
    task = MQARTask(vocab_size=32, seq_len=16, num_kv_pairs=2)
    args = build_model_args("mom", 16, vocab_size=32, seq_len=16)
    results = [train_mqar(args, task, TrainConfig(steps=3, batch_size=4, num_train=16, num_test=8, compile_backend=c),
                          log_every=1) for c in (None, "aot_eager")]
    eager, compiled = ([loss for _, loss in r["loss_log"]] for r in results)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_one_process_compiles_runs_of_many_arms_and_widths():
    """A grid's process trains every arm and width: their blocks' graphs must not add up to dynamo's
    recompile limit (a fullgraph compile fails when it is hit; seen on a GPU at the grid's 33rd run)."""
    task = MQARTask(vocab_size=32, seq_len=16, num_kv_pairs=2)
    cfg = TrainConfig(steps=1, batch_size=4, num_train=8, num_test=4, compile_backend="eager")
    with torch._dynamo.config.patch(recompile_limit=2):
        for arm, d in [("mom", 16), ("gdn_active", 16), ("mom", 32), ("attention", 16)]:
            args = build_model_args(arm, d, vocab_size=32, seq_len=16, attn_head_dim=16)
            assert train_mqar(args, task, cfg)["steps_run"] == 1


def test_stop_at_ends_a_run_early_and_is_validated():
    """`stop_at`: training ends at the first check where a training batch reaches it; the result says
    how many steps ran, and the test accuracy is still measured."""
    task = MQARTask(vocab_size=32, seq_len=16, num_kv_pairs=2)
    args = build_model_args("mom", 16, vocab_size=32, seq_len=16)
    cfg = TrainConfig(steps=60, batch_size=8, num_train=64, num_test=16, stop_at=1e-6, check_every=1)
    result = train_mqar(args, task, cfg)
    assert 1 <= result["steps_run"] < 60 and 0 <= result["accuracy"] <= 1, result
    assert result["epochs"] == result["steps_run"] * 8 / 64
    assert train_mqar(args, task, TrainConfig(steps=3, batch_size=8, num_train=64, num_test=16))["steps_run"] == 3
    with pytest.raises(ValueError, match=r"stop_at must be in \(0, 1\] or None, got 0"):
        TrainConfig(stop_at=0)
    with pytest.raises(ValueError, match="check_every"):
        TrainConfig(check_every=0)


def test_stop_at_skips_the_next_learning_rate_of_a_solved_cell(monkeypatch):
    """With `stop_at`, a cell's learning rates run in turn and stop at the first that reaches it on the
    test set; cells that no learning rate solves run them all, and count as complete in the table."""
    cli = _cli()
    accuracy = {("mom", 1e-3): 0.995, ("attention", 1e-3): 0.2, ("attention", 3e-3): 0.4}

    def fake_run(g, device, amp, seed, compile_blocks, compile_mode, stop_at, run):
        kv, d, arm, lr = run
        assert stop_at == 0.99
        return dict(num_kv_pairs=kv, d_model=d, arm=arm, lr=lr, accuracy=accuracy[arm, lr], final_train_loss=0.0,
                    state_total=1, state_active=1, num_params=1, train_seconds=1.0, steps_run=10)

    monkeypatch.setattr(cli, "train_run", fake_run)
    g = dict(kv_pairs=[2], d_models=[16], arms=["mom", "attention"], lrs=[1e-3, 3e-3], steps=10, stop_at=0.99)
    runs = cli.run_grid(g, "cpu", None, 0, False, stop_at=0.99)
    assert sorted((r["arm"], r["lr"]) for r in runs) == [("attention", 1e-3), ("attention", 3e-3), ("mom", 1e-3)]
    assert cli.incomplete_cells(g, runs) == []
    assert cli.incomplete_cells(g, runs[:1]) == [(2, 16)]
    assert cli.incomplete_cells(dict(g, stop_at=None), runs) == [(2, 16)]  # without stop_at mom lacks lr 3e-3
    first, later = cli.lr_schedule(cli.grid_runs(g), None)
    assert len(first) == 4 and later == {}
