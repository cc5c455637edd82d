"""MQAR grid: MoM vs single-memory Gated DeltaNet at matched active / total state vs attention.

For every (num_kv_pairs, d_model) of the grid, trains the four arms of `momtitan.eval.mqar`
(fresh 2-layer models, same data, same optimiser) and reports test accuracy against the
recurrent state size (ANCHORS.md section 2.4: MoM must be compared at matched state, not only
at matched width). With several learning rates, the best one per (arm, setting) is reported,
as in Zoology.

Outputs:
    a JSON of every run                    --json  (default outputs/mqar/mqar_{full|quick}.json)
    a markdown section in docs/quality.md  (replaced between its markers on each run of the mode)
    a PNG plot                             --plot  (default docs/mqar.png; needs matplotlib)

    python scripts/mqar.py --jobs 12 --amp bfloat16   # full grid on one GPU, 12 runs side by side
    python scripts/mqar.py --jobs 12 --amp bfloat16 --stop-at 0.99   # runs end once solved; lrs in turn
    python scripts/mqar.py --jobs 12 --amp bfloat16 --stop-at 0.99 --mps   # the grid in ~9 min on one H100
    python scripts/mqar.py --quick --device cpu  # a CPU-sized smoke run of the same pipeline
    python scripts/mqar.py --arms mom --kv-pairs 32 --d-models 128 --lrs 1e-3 --amp bfloat16 --steps 40 \
        --profile outputs/mqar/profile           # where one run's step time goes (top kernels, trace)

On a machine of several GPUs the grid splits into shards, one process per GPU, each writing only
its JSON; `--merge` then writes the markdown and the plot from the shards' JSONs:

    CUDA_VISIBLE_DEVICES=0 python scripts/mqar.py --shard 0/2 --json outputs/mqar/s0.json &
    CUDA_VISIBLE_DEVICES=1 python scripts/mqar.py --shard 1/2 --json outputs/mqar/s1.json; wait
    python scripts/mqar.py --merge outputs/mqar/s0.json,outputs/mqar/s1.json

A run's outcome can turn on its seed, and even on GPU nondeterminism (docs/quality.md), so a ranking
needs several seeds: one grid per seed (`--seed`, `--no-write`), then `--merge` of their JSONs reports
each cell's median over the seeds, its range and how many seeds solved it:

    for s in 0 1 2; do python scripts/mqar.py --jobs 12 --amp bfloat16 --stop-at 0.99 --mps --seed $s \
        --json outputs/mqar/seed$s.json --no-write; done
    python scripts/mqar.py --merge outputs/mqar/seed0.json,outputs/mqar/seed1.json,outputs/mqar/seed2.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import multiprocessing
import os
import platform
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Cost (docs/quality.md). bf16, the costliest cell (MoM, kv 32, d 128), one process on an H200: 127 ms
# per step with per-block compile, 50.5 ms with `--compile-mode reduce-overhead` (CUDA graphs), of
# which ~18 ms are kernels. `--jobs` trains several runs side by side on one GPU and hides the host as
# CUDA graphs do, so the grid's cost is its kernels' time per step times its steps. Small kernels of
# separate processes take turns on the GPU; under an MPS server (`--mps`) they share its SMs at once.
# The whole grid with `--jobs 12 --stop-at 0.99 --mps`: 547 s on one H100 (44 of its 48 runs: a
# solved cell skips its other learning rate).
from momtitan.eval.mqar import ARM_LABELS, ARMS, MQARTask, TrainConfig, build_model_args, generate_mqar, train_mqar  # noqa: E402

# Full grid: Zoology's T=256 setting at three recall loads, two widths (Zoology Fig. 2 / GDN sweep
# widths), vocab 8192; 1500 steps of batch 128 over 24K examples (8 epochs).
FULL = dict(vocab_size=8192, seq_len=256, kv_pairs=[16, 32, 64], d_models=[64, 128], lrs=[1e-3, 3e-3], steps=1500,
            batch_size=128, num_train=24_000, num_test=1_000, num_heads=2)
# Quick: a CPU-sized case of the same pipeline (two kv loads, one width).
QUICK = dict(vocab_size=64, seq_len=32, kv_pairs=[2, 4], d_models=[32], lrs=[1e-2], steps=150, batch_size=16,
             num_train=4_000, num_test=256, num_heads=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized grid (a few minutes on a laptop CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list from {ARMS}")
    p.add_argument("--kv-pairs", default=None, help="comma list of num_kv_pairs (overrides the grid)")
    p.add_argument("--d-models", default=None, help="comma list of model widths (overrides the grid)")
    p.add_argument("--lrs", default=None, help="comma list of learning rates; the best per run is reported")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--num-test", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None, help="MoM heads (the GDN arms scale it by k+1 and E+1)")
    p.add_argument("--num-memories", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--amp", default=None, choices=["bfloat16", "float16"], help="autocast dtype (default: fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block with inductor (default: on for CUDA, off on CPU)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                             "max-autotune-no-cudagraphs"],
                   help="inductor's mode for the compiled blocks (reduce-overhead: CUDA graphs; needs --compile)")
    p.add_argument("--stop-at", type=float, default=None, metavar="ACC",
                   help="end a run once a training batch answers this share of its queries right (checked every "
                        "100 steps), and train a cell's next learning rate only if the last one stayed below it on "
                        "the test set (lrs in the order given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run the I-th of N interleaved parts of the grid and write only its JSON")
    p.add_argument("--merge", default=None, metavar="A.json,B.json",
                   help="train nothing: write the markdown and plot of the shards' JSONs (in the quick run's section "
                        "or the full grid's, as they were trained)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes training runs side by side on the device (default 1)")
    p.add_argument("--mps", action="store_true",
                   help="start an MPS server of its own for the run (nvidia-cuda-mps-control), so that the --jobs "
                        "workers' kernels run side by side instead of taking turns; stopped at the end")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile training steps 21-25 (fewer steps: the last five after two of warmup) of the one run "
                        "the options select (one kv, d_model, arm and lr; --jobs 1): a chrome trace in DIR "
                        "(scripts/trace_summary.py reads it) and the top kernels printed; no markdown")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=str(ROOT / "docs" / "mqar.png"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "quality.md"))
    p.add_argument("--no-write", action="store_true", help="print only; write no markdown or plot")
    a = p.parse_args(argv)
    a.shard_index, a.num_shards = _shard(a.shard)
    if a.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {a.jobs}")
    return a


def _shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return i, n


def _list(text, cast):
    return [cast(x) for x in text.split(",") if x.strip()]


def grid_from_args(a) -> dict:
    g = dict(QUICK if a.quick else FULL)
    for key, attr, cast in (("kv_pairs", "kv_pairs", int), ("d_models", "d_models", int), ("lrs", "lrs", float)):
        if getattr(a, attr) is not None:
            g[key] = _list(getattr(a, attr), cast)
    for key in ("seq_len", "vocab_size", "steps", "batch_size", "num_train", "num_test", "num_heads"):
        if getattr(a, key) is not None:
            g[key] = getattr(a, key)
    g["arms"] = _list(a.arms, str)
    for arm in g["arms"]:
        if arm not in ARMS:
            raise ValueError(f"--arms: unknown arm {arm!r}; choose from {ARMS}")
    g["num_memories"], g["topk"] = a.num_memories, a.topk
    if a.stop_at is not None and not 0 < a.stop_at <= 1:
        raise ValueError(f"--stop-at must be in (0, 1], got {a.stop_at}")
    g["stop_at"] = a.stop_at
    return g


def grid_runs(g: dict, shard: tuple[int, int] = (0, 1)) -> list[tuple[int, int, str, float]]:
    """The `(kv, d_model, arm, lr)` runs of the grid, or of the shard's part of it: the runs at grid indices
    (i, j, a) go to shard (i + j + a) % N, which spreads each arm's costly cells over the shards. Costliest
    first (recurrent arms, wide, many pairs), so that a pool of workers ends together."""
    runs = [(kv, d, arm, lr)
            for i, kv in enumerate(g["kv_pairs"]) for j, d in enumerate(g["d_models"]) for a, arm in enumerate(g["arms"])
            if (i + j + a) % shard[1] == shard[0] for lr in g["lrs"]]
    return sorted(runs, key=lambda r: (r[2] == "attention", -r[1], -r[0]))


@functools.lru_cache(maxsize=2)
def _data(task: MQARTask, num_train: int, num_test: int, seed: int):
    t = time.perf_counter()
    data = (*generate_mqar(task, num_train, seed=seed), *generate_mqar(task, num_test, seed=seed + 1))
    print(f"[data] T={task.seq_len} kv={task.num_kv_pairs} vocab={task.vocab_size}: {num_train} train / {num_test} "
          f"test in {time.perf_counter() - t:.1f}s", flush=True)
    return data


def train_run(g: dict, device: str, amp: str | None, seed: int, compile_blocks: bool, compile_mode: str | None,
              stop_at: float | None, run: tuple[int, int, str, float], on_step=None) -> dict:
    """Train one `(kv, d_model, arm, lr)` of the grid; the result row of the JSON. `on_step`: see `train_mqar`."""
    kv, d, arm, lr = run
    task = MQARTask(vocab_size=g["vocab_size"], seq_len=g["seq_len"], num_kv_pairs=kv)
    args = build_model_args(arm, d, vocab_size=task.vocab_size, seq_len=task.seq_len, num_heads=g["num_heads"],
                            num_memories=g["num_memories"], topk=g["topk"])
    cfg = TrainConfig(steps=g["steps"], batch_size=g["batch_size"], lr=lr, num_train=g["num_train"],
                      num_test=g["num_test"], seed=seed, device=device, amp_dtype=amp,
                      compile_backend="inductor" if compile_blocks else None, compile_mode=compile_mode,
                      stop_at=stop_at)
    r = train_mqar(args, task, cfg, data=_data(task, g["num_train"], g["num_test"], seed), on_step=on_step)
    r.update(arm=arm, d_model=d, num_kv_pairs=kv, seq_len=task.seq_len, lr=lr, seed=seed,
             heads=args.num_heads, head_dim=args.head_dim, head_v_dim=args.head_v_dim,
             streams_total=args.num_memories + int(args.shared_mem) if not args.attn_layers else 0,
             streams_active=args.topk + int(args.shared_mem) if not args.attn_layers else 0)
    r.pop("model_args")
    return r


def _worker_init(device: str) -> None:
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True


def lr_schedule(todo: list[tuple[int, int, str, float]], stop_at: float | None):
    """`(first, later)`: the runs to start with, and per cell `(kv, d_model, arm)` the learning rates
    that run only if the one before stayed below `stop_at` (every run is a first run without it)."""
    if stop_at is None:
        return list(todo), {}
    first, later = [], {}
    for run in todo:
        if run[:3] in later:
            later[run[:3]].append(run)
        else:
            first.append(run)
            later[run[:3]] = []
    return first, later


def _failure_text(run, err: BaseException) -> str:
    kv, d, arm, lr = run
    return f"kv={kv} d={d} {arm} lr={lr:.0e}: {type(err).__name__}: {err}"


def run_grid(g: dict, device: str, amp: str | None, seed: int, compile_blocks: bool,
             shard: tuple[int, int] = (0, 1), on_run=None, jobs: int = 1, compile_mode: str | None = None,
             stop_at: float | None = None) -> list[dict]:
    """Train the shard's runs of the grid (`grid_runs`), one after another, or with `jobs > 1` in that
    many worker processes sharing the device (a tiny model's step leaves a GPU mostly idle). With
    `stop_at`, runs end early once they reach it (`TrainConfig.stop_at`) and a cell's learning rates
    run in turn, each only if the ones before stayed below it on the test set. A run that fails does
    not stop the others: once they are done, a RuntimeError names every failed run (the finished ones
    have reached `on_run`, i.e. the JSON)."""
    todo = grid_runs(g, shard)
    to_run, later = lr_schedule(todo, stop_at)
    work = functools.partial(train_run, g, device, amp, seed, compile_blocks, compile_mode, stop_at)
    runs = []

    def finished(r: dict) -> tuple[int, int, str, float] | None:
        """Record a run; the cell's next run, if it is due."""
        runs.append(r)
        print(f"  kv={r['num_kv_pairs']:3d} d={r['d_model']:4d} {r['arm']:10s} lr={r['lr']:.0e}  "
              f"acc={r['accuracy']:.3f}  loss={r['final_train_loss']:.3f}  state={r['state_total']:>8d} "
              f"(active {r['state_active']:>8d})  params={r['num_params']:>8d}  train {r['train_seconds']:.1f}s, "
              f"{r['steps_run']} steps ({1e3 * r['train_seconds'] / r['steps_run']:.1f} ms/step)  "
              f"[{len(runs)} of at most {len(todo)}]", flush=True)
        if on_run is not None:
            on_run(runs)
        rest = later.get((r["num_kv_pairs"], r["d_model"], r["arm"]))
        return rest.pop(0) if rest and r["accuracy"] < stop_at else None

    failed = []  # (run, error): the other runs go on, and the grid raises once they are done

    def failure(run, err: BaseException) -> None:
        failed.append((run, err))
        print(f"  FAILED {_failure_text(run, err)}", flush=True)

    if jobs == 1:
        while to_run:
            run = to_run.pop(0)
            try:
                r = work(run)
            except Exception as err:  # noqa: BLE001 -- re-raised below, after the other runs
                failure(run, err)
                continue
            follow = finished(r)
            if follow is not None:
                to_run.append(follow)
    else:
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # the workers compile side by side
        pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(todo)), _worker_init, (device,))
        results = queue.SimpleQueue()  # (run, result or error), filled by the pool's result thread

        def submit(run):
            pool.apply_async(work, (run,), callback=lambda r, run=run: results.put((run, r)),
                             error_callback=lambda e, run=run: results.put((run, e)))

        for run in to_run:
            submit(run)
        outstanding = len(to_run)
        try:
            while outstanding:
                run, r = results.get()
                outstanding -= 1
                if isinstance(r, BaseException):
                    failure(run, r)
                    continue
                follow = finished(r)
                if follow is not None:
                    submit(follow)
                    outstanding += 1
        finally:
            pool.terminate()
    if failed:
        names = "; ".join(_failure_text(r, e) for r, e in failed)
        raise RuntimeError(f"{len(failed)} of the grid's runs failed ({len(runs)} finished, in the JSON): {names}") \
            from failed[0][1]
    return runs


def _seed(r: dict) -> int:
    return r.get("seed", 0)  # JSONs written before runs recorded their seed ran seed 0


def best_runs(runs: list[dict]) -> list[dict]:
    """The best learning rate of each (arm, kv, d_model) and seed."""
    best = {}
    for r in runs:
        key = (r["num_kv_pairs"], r["d_model"], r["arm"], _seed(r))
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(best.values(), key=lambda r: (r["num_kv_pairs"], r["d_model"], order[r["arm"]], _seed(r)))


def cell_accuracies(best: list[dict]) -> dict[tuple[int, int, str], list[float]]:
    """`(kv, d_model, arm)` -> the best accuracy of each seed, in seed order."""
    cells = {}
    for r in best:
        cells.setdefault((r["num_kv_pairs"], r["d_model"], r["arm"]), []).append(r["accuracy"])
    return cells


def summarize(accs: list[float], solved_at: float) -> str:
    """One seed: its accuracy. Several: the median, the range and how many seeds solved the cell."""
    if len(accs) == 1:
        return f"{accs[0]:.3f}"
    lo, mid, hi = min(accs), statistics.median(accs), max(accs)
    return f"{mid:.3f} ({lo:.3f}-{hi:.3f}; {sum(a >= solved_at for a in accs)}/{len(accs)})"


def incomplete_cells(g: dict, runs: list[dict]) -> list[tuple[int, int]]:
    """The (kv, d_model) cells with an arm still to train in one of the runs' seeds: not every
    learning rate ran, and (with `stop_at`) none of those that ran reached it."""
    stop_at = g.get("stop_at")
    missing = set()
    for kv in g["kv_pairs"]:
        for d in g["d_models"]:
            for arm in g["arms"]:
                for seed in sorted({_seed(r) for r in runs}) or [0]:
                    mine = [r for r in runs if (r["num_kv_pairs"], r["d_model"], r["arm"], _seed(r)) == (kv, d, arm, seed)]
                    solved = stop_at is not None and any(r["accuracy"] >= stop_at for r in mine)
                    if len({r["lr"] for r in mine}) < len(g["lrs"]) and not solved:
                        missing.add((kv, d))
    return sorted(missing)


def _shape(r):
    if r["arm"] == "attention":
        return "attention"
    s = f"{r['heads']}×{r['head_dim']}×{r['head_v_dim']}"
    return f"{r['streams_total']}×({s})" if r["streams_total"] > 1 else s


def markdown(g: dict, runs: list[dict], meta: dict, plot: str | None, quick: bool) -> str:
    best = best_runs(runs)
    title = "### MQAR — CPU quick run (`scripts/mqar.py --quick`), not the full grid" if quick else "### MQAR — full grid"
    lines = [title, ""]
    missing = incomplete_cells(g, runs)
    if missing:
        lines += [f"**Partial: {len(runs)} runs; cells not complete (kv, d_model): {', '.join(map(str, missing))}** "
                  "(the run was stopped before the rest).", ""]
    if quick:
        lines += ["A smoke-sized run of the pipeline on CPU: tiny vocabulary, short sequences, one width and "
                  "few steps. It shows the harness end to end; it does not rank the architectures.", ""]
    seeds = sorted({_seed(r) for r in best})
    solved_at = g.get("stop_at") or 0.99
    walls = meta.get("part_walls_s")
    lines += [
        f"Run {meta['date']} on {meta['device']} ({meta['host']}), torch {meta['torch']}, "
        + (f"{len(walls)} parts of {', '.join(f'{w:.0f}' for w in walls)} s wall. " if walls else f"{meta['wall_s']:.0f} s wall. ")
        + f"Command: `{meta['command']}`.",
        "",
        f"Task: vocab {g['vocab_size']}, T = {g['seq_len']}, power_a 0.01, random filler; {g['num_train']} train / "
        f"{g['num_test']} test examples (test seed = train seed + 1). Training: {g['steps']} steps × batch "
        f"{g['batch_size']}, AdamW (β 0.9/0.98, wd 0.1), warmup 10 % then cosine, lr ∈ {g['lrs']} "
        f"(best per cell reported"
        + ("" if not g.get("stop_at") else
           f"; a run stops once a training batch answers {g['stop_at']} of its queries right, checked every 100 "
           f"steps, and a cell's next lr runs only if the last stayed below {g['stop_at']} on the test set")
        + f"), fp32{'' if not meta.get('amp') else ' + autocast ' + meta['amp']}"
        f"{'' if not meta.get('compile') else ', blocks compiled (inductor, mode ' + (meta.get('compile_mode') or 'default') + ')'}. "
        f"Models: 2 layers, SwiGLU 2·d, tied embeddings; recurrent arms use the gated delta rule with short conv 4, "
        f"heads of d_k = d_v = d_model / {g['num_heads']}.",
        "",
        f"Arms: **mom** = top-{g['topk']} of {g['num_memories']} memories + shared, {g['num_heads']} heads per memory; "
        f"**gdn_active** = one memory with {(g['topk'] + 1) * g['num_heads']} heads (MoM's per-token active state); "
        f"**gdn_total** = one memory with {(g['num_memories'] + 1) * g['num_heads']} heads (MoM's total state); "
        "**attention** = softmax attention in both layers. State = Σ over layers of streams × H × d_k × d_v "
        "(elements; short-conv caches not counted; attention has a KV cache of 2·T·d per layer instead).",
        "",
        "Accuracy = share of query positions whose argmax is the right value; chance = 1/#values "
        f"= {1 / (g['vocab_size'] - g['vocab_size'] // 2):.2g}.",
        "",
        "| kv pairs | d_model | arm | state shape (streams×H×d_k×d_v) | state total | state active | params | seed | lr "
        "| steps | accuracy | final loss | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in best:
        state_t = f"{r['state_total']:,}" if r["arm"] != "attention" else f"(KV {r['kv_cache']:,})"
        state_a = f"{r['state_active']:,}" if r["arm"] != "attention" else "—"
        lines.append(f"| {r['num_kv_pairs']} | {r['d_model']} | {r['arm']} | {_shape(r)} | {state_t} | {state_a} | "
                     f"{r['num_params']:,} | {_seed(r)} | {r['lr']:.0e} | {r.get('steps_run', g['steps'])} | {r['accuracy']:.3f} | "
                     f"{r['final_train_loss']:.3f} | "
                     f"{r['train_seconds']:.1f} |")
    # compact pivot
    arms = [a for a in ARMS if any(r["arm"] == a for r in best)]
    by_seed = "" if len(seeds) == 1 else (f" median over seeds {seeds} (range; seeds whose best lr reached "
                                           f"{solved_at})")
    lines += ["", f"Accuracy by cell{by_seed}:", "", "| kv pairs | d_model | " + " | ".join(arms) + " |",
              "|---|---|" + "---|" * len(arms)]
    accs = cell_accuracies(best)
    for kv, d in sorted({(r["num_kv_pairs"], r["d_model"]) for r in best}):
        lines.append(f"| {kv} | {d} | " + " | ".join(summarize(accs[kv, d, a], solved_at) if (kv, d, a) in accs else "—"
                                                    for a in arms) + " |")
    lines.append("")
    if plot:
        rel = Path(plot).name if Path(plot).parent == ROOT / "docs" else plot
        lines += [f"![MQAR accuracy vs kv pairs and vs recurrent state]({rel})", "",
                  f"Plot `{rel}`: written by this run (a later run of either mode overwrites it).", ""]
    else:
        lines += [f"(No plot: {meta.get('plot_note', 'not written')}.)", ""]
    return "\n".join(lines)


def write_section(path: Path, text: str, quick: bool) -> None:
    tag = "mqar-quick" if quick else "mqar-full"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    block = f"{begin}\n{text}\n{end}"
    if path.exists():
        doc = path.read_text()
    else:
        doc = "# Quality\n\nModel-quality results for momtitan. Each section is written by the script it names.\n\n## MQAR (multi-query associative recall)\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: block, doc)
    else:
        # the full grid goes before the quick run
        other = "<!-- mqar-quick:begin -->"
        if not quick and other in doc:
            doc = doc.replace(other, block + "\n\n" + other)
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def plot(runs: list[dict], path: str, title: str) -> str | None:
    """Accuracy vs kv pairs, and accuracy vs total recurrent state for each kv. Returns None, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    best = best_runs(runs)
    accs = cell_accuracies(best)
    # one point per cell: the median over its seeds (the only value with one seed)
    first = {}
    for r in best:
        first.setdefault((r["num_kv_pairs"], r["d_model"], r["arm"]), r)
    best = [dict(r, accuracy=statistics.median(accs[cell])) for cell, r in first.items()]
    kvs = sorted({r["num_kv_pairs"] for r in best})
    ds = sorted({r["d_model"] for r in best})
    colors = {"mom": "tab:red", "gdn_active": "tab:blue", "gdn_total": "tab:green", "attention": "tab:gray"}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 1 + len(kvs), figsize=(4.2 * (1 + len(kvs)), 3.8), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    for arm in ARMS:
        for i, d in enumerate(ds):
            pts = sorted((r["num_kv_pairs"], r["accuracy"]) for r in best if r["arm"] == arm and r["d_model"] == d)
            if pts:
                ax.plot(*zip(*pts), styles[i % len(styles)], marker="o", color=colors[arm], label=f"{arm} d={d}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("num_kv_pairs")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy vs recall load")
    ax.legend(fontsize=6)
    for ax, kv in zip(axes[1:], kvs):
        for arm in ARMS:
            pts = sorted((r["state_total"], r["accuracy"], r["state_active"]) for r in best if r["arm"] == arm and r["num_kv_pairs"] == kv)
            if not pts:
                continue
            if arm == "attention":
                for _, acc, _ in pts:
                    ax.axhline(acc, color=colors[arm], ls="--", lw=1)
                ax.plot([], [], "--", color=colors[arm], label="attention (no recurrent state)")
                continue
            xs, ys, act = zip(*pts)
            ax.plot(xs, ys, marker="o", color=colors[arm], label=ARM_LABELS[arm])
            if arm == "mom":
                ax.plot(act, ys, marker="o", mfc="none", ls=":", color=colors[arm], label="MoM at its active state")
        ax.set_xscale("log")
        ax.set_xlabel("recurrent state, elements (Σ layers)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"kv = {kv}")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None


def merge(a) -> list[dict]:
    """Markdown and plot of several JSONs of the same grid: shards (disjoint runs) and/or seeds."""
    parts = [json.loads(Path(f).read_text()) for f in a.merge.split(",") if f.strip()]
    if not parts:
        raise ValueError(f"--merge needs JSON files, got {a.merge!r}")
    # quick or full as the JSONs say (JSONs written before they said it: as --quick says)
    grids = [(part["grid"], part["meta"].get("quick", a.quick)) for part in parts]
    if any(grid != grids[0] for grid in grids):
        raise ValueError(f"--merge: the JSONs {a.merge!r} come from different grids")
    (g, quick), runs = grids[0], [r for part in parts for r in part["runs"]]
    meta = dict(parts[0]["meta"], wall_s=max(part["meta"]["wall_s"] for part in parts),
                part_walls_s=[part["meta"]["wall_s"] for part in parts] if len(parts) > 1 else None,
                command=" ; ".join(part["meta"]["command"] for part in parts) + f" ; python scripts/mqar.py --merge {a.merge}")
    return write_outputs(a, g, runs, meta, quick)


def write_outputs(a, g: dict, runs: list[dict], meta: dict, quick: bool) -> list[dict]:
    if a.no_write:
        print(markdown(g, runs, meta, None, quick))
        return runs
    seeds = sorted({_seed(r) for r in runs})
    note = plot(runs, a.plot, f"MQAR {'quick CPU run' if quick else 'grid'}: T={g['seq_len']}, vocab={g['vocab_size']}, "
                f"{g['steps']} steps, {meta['device']}" + (f", median of seeds {seeds}" if len(seeds) > 1 else ""))
    if note:
        print(f"no plot: {note}")
        meta["plot_note"] = note
    else:
        print(f"wrote {a.plot}")
    text = markdown(g, runs, meta, None if note else a.plot, quick)
    write_section(Path(a.markdown), text, quick)
    print(f"wrote {a.markdown}")
    print(text)
    return runs


def profile_run(a, g: dict, device: str, compile_blocks: bool, n_runs: int) -> str:
    """`--profile`: trace five training steps of a single run; returns the printed kernel table."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if n_runs != 1 or a.jobs != 1:
        raise ValueError(f"--profile traces one run with --jobs 1; the options select {n_runs} runs, --jobs {a.jobs}")
    if g["steps"] < 7:
        raise ValueError(f"--profile needs at least 7 steps (2 of warmup, 5 traced), got {g['steps']}")
    out = Path(a.profile)
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wait = min(20, g["steps"] - 7)
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=2, active=5)) as prof:
        run = grid_runs(g)[0]
        train_run(g, device, a.amp, a.seed, compile_blocks, a.compile_mode, None, run, on_step=prof.step)
    trace = out / "mqar_trace.json"
    prof.export_chrome_trace(str(trace))
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25)
    print(f"profile of {run} (steps {wait + 3}-{wait + 7}), trace {trace}:\n{table}", flush=True)
    return table


@contextlib.contextmanager
def mps_server(device: str):
    """A CUDA MPS control daemon of this run's own (pipe and log directories in a temporary folder,
    so another user's server is untouched): the processes started inside, `--jobs` workers included,
    become its clients and their kernels can occupy the GPU's SMs together. Enter it before CUDA
    is initialised in this process."""
    if not device.startswith("cuda"):
        raise ValueError(f"--mps needs a CUDA device, got --device {device!r}")
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise SystemExit("--mps needs nvidia-cuda-mps-control (the CUDA driver's MPS tools) on PATH; run without --mps")
    if torch.cuda.is_initialized():
        raise RuntimeError("mps_server must start before this process initialises CUDA")
    root = Path(tempfile.mkdtemp(prefix="momtitan-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for d in env.values():
        Path(d).mkdir()
    subprocess.run([exe, "-d"], env={**os.environ, **env}, check=True)
    os.environ.update(env)
    print(f"MPS server started (pipe {env['CUDA_MPS_PIPE_DIRECTORY']})", flush=True)
    try:
        yield
    finally:
        subprocess.run([exe], input="quit\n", text=True, env={**os.environ, **env}, timeout=60, check=False)
        for key in env:
            os.environ.pop(key, None)


def main(argv=None):
    a = parse_args(argv)
    if a.merge:
        return merge(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with mps_server(device) if a.mps else contextlib.nullcontext():
        return train_and_report(a, device, argv)


def train_and_report(a, device: str, argv):
    """Everything after the arguments: the grid (or one profiled run), its JSON and its report."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    g = grid_from_args(a)
    if device.startswith("cuda"):
        from momtitan.ops import triton as mt_triton

        if getattr(mt_triton, "DISABLED", False):
            print("warning: momtitan's Triton kernels are off (MOMTITAN_TRITON=0); the recurrent arms run on the "
                  "chunked PyTorch path, ~1 s/step for MoM at the full grid's size", flush=True)
    n_runs = len(g["kv_pairs"]) * len(g["d_models"]) * len(g["arms"]) * len(g["lrs"])
    print(f"MQAR grid ({'quick' if a.quick else 'full'}) on {device}: {'at most ' if a.stop_at else ''}{n_runs} runs: "
          f"kv {g['kv_pairs']}, d_model "
          f"{g['d_models']}, arms {g['arms']}, lrs {g['lrs']}, T={g['seq_len']}, vocab={g['vocab_size']}, "
          f"{g['steps']} steps × batch {g['batch_size']}", flush=True)
    compile_blocks = device.startswith("cuda") if a.compile is None else a.compile
    if a.compile_mode is not None and not compile_blocks:
        raise ValueError(f"--compile-mode {a.compile_mode} needs compiled blocks (--compile, the default on CUDA)")
    if a.profile is not None:  # one run traced; no JSON, markdown or plot
        return profile_run(a, g, device, compile_blocks, n_runs)
    dev_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    meta = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), device=dev_name, host=platform.node(),
                torch=torch.__version__, wall_s=0.0, quick=a.quick, amp=a.amp, compile=compile_blocks,
                compile_mode=a.compile_mode,
                command="python scripts/mqar.py " + " ".join(sys.argv[1:] if argv is None else argv))
    part = f"_shard{a.shard_index}of{a.num_shards}" if a.num_shards > 1 else ""
    json_path = Path(a.json or ROOT / "outputs" / "mqar" / f"mqar_{'quick' if a.quick else 'full'}{part}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save(runs):  # after every run, so a run cut off by a timeout keeps what it trained
        meta["wall_s"] = time.perf_counter() - t0
        json_path.write_text(json.dumps(dict(meta=meta, grid=g, runs=runs), indent=1))

    runs = run_grid(g, device, a.amp, a.seed, compile_blocks, (a.shard_index, a.num_shards), on_run=save, jobs=a.jobs,
                    compile_mode=a.compile_mode, stop_at=a.stop_at)
    save(runs)
    print(f"done: {len(runs)} runs in {meta['wall_s']:.0f}s", flush=True)
    print(f"wrote {json_path}")
    if a.num_shards > 1:
        print(f"shard {a.shard}: {len(runs)} runs; write the markdown with --merge once every shard has run")
        return runs
    return write_outputs(a, g, runs, meta, a.quick)


if __name__ == "__main__":
    main()
