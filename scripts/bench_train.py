"""Training benchmarks through `run_train.sh`: several configurations, one table.

Each named case is a `run_train.sh` invocation (GPU count + flags). The script runs them one after
another, parses torchtitan's step lines (loss, tokens/s per GPU, MFU, memory), and writes a table
with the machine, versions and the exact commands to docs/benchmarks.md under a section title.
tokens/s, MFU and the all-to-all time are medians over the steps after `--warmup` steps, memory the
peak; multi-GPU cases get a scaling efficiency against the suite's 1-GPU (and 2-GPU) case of the same
model and precision.

    python scripts/bench_train.py --suite multi_gpu_debug --steps 30
    python scripts/bench_train.py --suite single_gpu_340m --steps 20
    python scripts/bench_train.py --suite ep_2gpu --pack --results outputs/bench_train.json  # 4 GPUs: 2 cases at a time
    python scripts/bench_train.py --suite fsdp_scaling_1p3b --pack --steps 60 --warmup 10  # 1, 2, 4 (8) GPUs, one call

`--pack` gives each case its GPUs' share of the CPU cores: the steps of these models are short enough
to be bound by the host, and cases side by side on shared cores slow each other down.

Suites are defined in SUITES below; a case runs only if the machine has its GPU count.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from doc_sections import write_section  # noqa: E402
DEBUG = ["--job.config_file", "train_configs/mom_debug.toml", "--training.mixed_precision_param", "bfloat16",
         "--training.seq_len", "512", "--checkpoint.no-enable"]
# The recipes' global batch (256 x 2048 tokens) would mean 64 accumulation micro-steps per step on
# one GPU; -1 makes each step one micro-batch per rank.
M340 = ["--job.config_file", "train_configs/mom_340m.toml", "--training.dataset", "synthetic",
        "--model.hf_assets_path", "builtin", "--training.seq_len", "2048", "--checkpoint.no-enable",
        "--lr_scheduler.warmup_steps", "2", "--training.global_batch_size", "-1"]
M1P3 = ["--job.config_file", "train_configs/mom_1.3b.toml", "--training.dataset", "synthetic",
        "--model.hf_assets_path", "builtin", "--training.seq_len", "2048", "--checkpoint.no-enable",
        "--lr_scheduler.warmup_steps", "2", "--training.global_batch_size", "-1", "--training.local_batch_size", "2"]
COMPILE = ["--compile.enable"]
EAGER = ["--compile.no-enable"]  # the 340M and 1.3B recipes compile by default
FLOAT8 = ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.recipe_name", "rowwise"]
# float8 in the memories' grouped GEMMs too (torchao's MoE prototype; rows padded to 16 per memory)
FLOAT8_ALL = ["--model.converters", "quantize.linear.float8,quantize.grouped_mm.float8",
              "--quantize.linear.float8.recipe_name", "rowwise"]

SUITES = {
    # same global batch (8 x 512 tokens) on 1 GPU, 2-GPU FSDP, 2-GPU FSDP + EP
    "multi_gpu_debug": [
        ("1 GPU", 1, DEBUG + ["--training.local_batch_size", "8"]),
        ("2 GPU FSDP", 2, DEBUG + ["--training.local_batch_size", "4"]),
        ("2 GPU FSDP + EP=2", 2, DEBUG + ["--training.local_batch_size", "4", "--parallelism.expert_parallel_degree", "2"]),
    ],
    "single_gpu_debug": [
        ("bf16 eager", 1, DEBUG + ["--training.local_batch_size", "8"]),
        ("bf16 compile", 1, DEBUG + ["--training.local_batch_size", "8"] + COMPILE),
        ("float8 compile", 1, DEBUG + ["--training.local_batch_size", "8"] + COMPILE + FLOAT8),
    ],
    "single_gpu_340m": [
        ("340M bf16 eager", 1, M340 + ["--training.local_batch_size", "4"] + EAGER),
        ("340M bf16 compile", 1, M340 + ["--training.local_batch_size", "4"] + COMPILE),
        ("340M float8 compile", 1, M340 + ["--training.local_batch_size", "4"] + COMPILE + FLOAT8),
        ("340M float8 (+ memories) compile", 1, M340 + ["--training.local_batch_size", "4"] + COMPILE + FLOAT8_ALL),
    ],
    # the expert-parallel issue: EP=2 against FSDP on 2 GPUs and against 1 GPU, 340M and 1.3B, float8 off and on
    "ep_2gpu": [
        (f"{model} {n} GPU{'s' if n > 1 else ''} {par}{' float8' if fp8 else ''}", n,
         base + COMPILE + (FLOAT8 if fp8 else []) + (["--parallelism.expert_parallel_degree", str(ep)] if ep > 1 else []))
        for model, base in (("340M", M340 + ["--training.local_batch_size", "4"]), ("1.3B", M1P3))
        for fp8 in (False, True)
        for n, ep, par in ((1, 1, "FSDP"), (2, 1, "FSDP"), (2, 2, "FSDP+EP2"))
    ] + [("340M 1 GPU FSDP float8 (+ memories)", 1, M340 + ["--training.local_batch_size", "4"] + COMPILE + FLOAT8_ALL)],
    # the scaling issue: 1.3B, compile on, FSDP alone and FSDP x EP (ep = 2 .. n) at 2-8 GPUs against
    # 1 GPU, float8 off and on (the 1- and 2-GPU cases share ep_2gpu's flags: --results reuses them)
    "scaling_1p3b": [
        (f"1.3B {n} GPU{'s' if n > 1 else ''} {par}{' float8' if fp8 else ''}", n,
         M1P3 + COMPILE + (FLOAT8 if fp8 else []) + (["--parallelism.expert_parallel_degree", str(ep)] if ep > 1 else []))
        for n in (1, 2, 4, 8)
        for ep, par in ((1, "FSDP"), (2, "FSDP+EP2"), (4, "FSDP+EP4"), (8, "FSDP+EP8"))
        if ep <= n
        for fp8 in (False, True)
    ],
}

# the scaling suite's cases without expert parallelism: small enough to run on one machine in one call, so
# that the efficiencies compare runs measured side by side
SUITES["fsdp_scaling_1p3b"] = [case for case in SUITES["scaling_1p3b"]
                               if "--parallelism.expert_parallel_degree" not in case[2]]

STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.]+|nan|-?inf).*?memory:\s*(-?[\d.]+)GiB.*?tps:\s*([\d,]+).*?mfu:\s*([\d.]+)%")
A2A = re.compile(r"step:\s*(\d+)\s+ce:.*?a2a:\s*([\d.]+)ms\s*\(([\d.]+)%\)")  # expert-parallel runs only


def parse(log: str) -> list[tuple[int, float, float, float, float, tuple[float, float] | None]]:
    """Per logged step: (step, loss, memory GiB, tokens/s, MFU %, (all-to-all ms, % of step) or None)."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", log)
    a2a = {int(s): (float(ms), float(pct)) for s, ms, pct in A2A.findall(clean)}
    return [(int(s), float(loss), float(mem), float(tps.replace(",", "")), float(mfu), a2a.get(int(s)))
            for s, loss, mem, tps, mfu in STEP.findall(clean)]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def case_key(ngpu: int, flags: list[str], steps: int, device: str) -> str:
    """What makes two runs the same measurement: machine, GPU count, flags and steps (not the case's name)."""
    return f"{device} | {ngpu} | {steps} | {' '.join(flags)}"


def usable(result: dict) -> bool:
    """A run whose steps can be reported: it finished, or was cut off by its time limit after logging steps."""
    return result["rc"] == 0 or (result.get("cut_off", False) and bool(result["rows"]))


def longest_stored(store: dict, ngpu: int, flags: list[str], device: str) -> dict | None:
    """The stored run of this case on `device` with the most steps (a finished run before any cut-off
    one), or None."""
    best, best_rank = None, None
    for key, result in store.items():
        k_device, k_ngpu, k_steps, k_flags = key.split(" | ", 3)
        if (k_device, int(k_ngpu), k_flags) == (device, ngpu, " ".join(flags)) and usable(result):
            finished = result["rc"] == 0
            rank = (finished, int(k_steps) if finished else max(r[0] for r in result["rows"]))
            if best_rank is None or rank > best_rank:
                best, best_rank = result, rank
    return best


def versions() -> str:
    return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "triton", "torchtitan", "torchao"))


def cores_for(gpus: list[int], available: int) -> set[int]:
    """The CPU cores a packed case runs on: an equal share of this process's cores per GPU of the machine,
    so that cases side by side do not take each other's cores (a 1.3B step at 4K tokens per GPU is bound
    by the host: docs/benchmarks.md, "Training: fsdp_scaling_1p3b")."""
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // max(available, 1)
    return {c for g in gpus for c in cores[g * share:(g + 1) * share]} if share else set(cores)


def start_case(name: str, ngpu: int, flags: list[str], steps: int, out_dir: Path, gpus: list[int] | None,
               cores: set[int] | None = None) -> dict:
    """Start one case in its own process group; its log streams to `out_dir/<case>.log` (kept if the case
    hangs or is killed). `gpus`: the CUDA devices it may see (None: all); `cores`: the CPU cores it and
    its children run on (None: all)."""
    dump = out_dir / re.sub(r"\W+", "_", name)
    cmd = ["./run_train.sh", *flags, "--training.steps", str(steps), "--metrics.log_freq", "1", "--job.dump_folder", str(dump)]
    env = dict(os.environ, NGPU=str(ngpu), PYTHON=sys.executable)
    if gpus is not None:  # indices into this process's visible devices
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[g] if len(visible) > g and visible[g] else str(g) for g in gpus)
    log_path = out_dir / (dump.name + ".log")
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))
    return {"name": name, "ngpu": ngpu, "steps": steps, "cmd": f"NGPU={ngpu} " + " ".join(cmd), "proc": proc,
            "log_file": log_file, "log_path": log_path, "start": time.time(), "gpus": gpus,
            "pinned": cores is not None}


def finish_case(case: dict, timeout: float) -> dict | None:
    """The case's result once it has ended (killing it past `timeout` seconds: `cut_off`, its logged
    steps kept), else None."""
    proc, elapsed = case["proc"], time.time() - case["start"]
    rc = proc.poll()
    if rc is None and elapsed < timeout:
        return None
    cut_off = rc is None
    if cut_off:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = f"timeout {timeout:.0f} s"
    case["log_file"].close()
    log = case["log_path"].read_text()
    return {"name": case["name"], "ngpu": case["ngpu"], "cmd": case["cmd"], "rc": rc, "cut_off": cut_off,
            "steps": case["steps"], "rows": parse(log), "wall": elapsed, "tail": log[-2000:], "gpus": case["gpus"],
            "pinned": case.get("pinned", False)}


def run_cases(cases: list[tuple[str, int, list[str]]], steps: int, out_dir: Path, timeout: float, available: int,
              pack: bool, on_result, deadline: float | None = None) -> None:
    """Run the cases one after another, or with `pack` at the same time on disjoint GPUs (the widest
    first, each on the lowest free devices). `on_result(case_index, result)` is called as each ends.
    `deadline` (a `time.time()`): no case starts after it, and a running one is cut off at it."""
    free = list(range(available)) if pack and available else None
    pending = sorted(range(len(cases)), key=lambda i: -cases[i][1]) if pack else list(range(len(cases)))
    running: dict[int, dict] = {}
    limits: dict[int, float] = {}
    while pending or running:
        if deadline is not None and time.time() >= deadline and pending:
            print("not started (deadline): " + ", ".join(cases[i][0] for i in pending), flush=True)
            pending = []
        for i in list(pending):
            name, ngpu, flags = cases[i]
            if free is None and running:
                break
            if free is not None and len(free) < ngpu:
                continue
            gpus = None if free is None else [free.pop(0) for _ in range(ngpu)]
            print(f"start {name}" + (f" on GPUs {gpus}" if gpus else ""), flush=True)
            limits[i] = timeout if deadline is None else min(timeout, deadline - time.time())
            cores = None if gpus is None else cores_for(gpus, available)
            running[i] = start_case(name, ngpu, flags, steps, out_dir, gpus, cores=cores)
            pending.remove(i)
        time.sleep(1)
        for i, case in list(running.items()):
            result = finish_case(case, limits[i])
            if result is not None:
                del running[i]
                if free is not None:
                    free = sorted(free + result["gpus"])
                on_result(i, result)


def variant(flags: list[str]) -> tuple[str, str, int]:
    """What a case trains and how it routes: (config file, model converters, expert-parallel degree)."""
    def value(flag: str, default: str = "") -> str:
        return flags[flags.index(flag) + 1] if flag in flags else default

    return value("--job.config_file"), value("--model.converters"), int(value("--parallelism.expert_parallel_degree", "1"))


def baseline_variant(of: tuple[str, str, int], ngpu: int) -> tuple[str, str, int]:
    """The variant a scaling efficiency compares with on `ngpu` GPUs: same model and precision, the
    expert-parallel degree capped at `ngpu` (4-GPU EP4 against 2-GPU EP2 and 1-GPU FSDP)."""
    return of[0], of[1], min(of[2], ngpu)


def median_tps(result: dict, warmup: int) -> float | None:
    rows = [r for r in result["rows"] if r[0] > warmup]
    return statistics.median(r[3] for r in rows) if usable(result) and rows else None


def efficiency(tps: float, result: dict | None, warmup: int) -> str:
    base = median_tps(result, warmup) if result is not None else None
    return f"{100 * tps / base:.0f}%" if base else "-"


def summarize(result: dict, warmup: int, one_gpu: dict | None = None, two_gpu: dict | None = None) -> str:
    """One table row; `one_gpu` / `two_gpu` (results of the same variant on 1 and 2 GPUs) give the scaling
    efficiencies, tokens/s per GPU here over tokens/s per GPU there."""
    rows = [r for r in result["rows"] if r[0] > warmup]
    if not usable(result) or not rows:
        why = f"failed (rc {result['rc']})" if result["rc"] != 0 else "no step logged"
        return f"| {result['name']} | {result['ngpu']} | | {why} | | | | | | | |"
    losses = {r[0]: r[1] for r in result["rows"]}
    first, last = min(losses), max(losses)
    diverged = [step for step, loss in sorted(losses.items()) if not math.isfinite(loss)]
    loss_cell = f"{losses[first]:.3f} → {losses[last]:.3f}" + (f" (non-finite from step {diverged[0]})" if diverged else "")
    tps = median_tps(result, warmup)
    mfu = statistics.median(r[4] for r in rows)
    mem = max(r[2] for r in rows)
    a2a = [r[5] for r in rows if r[5] is not None]
    a2a_cell = (f"{statistics.median(ms for ms, _ in a2a):.1f} ({statistics.median(p for _, p in a2a):.1f}%)"
                if a2a else "-")
    steps = f"{last} of {result['steps']} (cut off)" if result["rc"] != 0 else f"{last}"
    return (f"| {result['name']} | {result['ngpu']} | {steps} | {loss_cell} | {tps:,.0f} | "
            f"{mfu:.1f} | {mem:.2f} | {a2a_cell} | {efficiency(tps, one_gpu, warmup)} | "
            f"{efficiency(tps, two_gpu, warmup)} | {result['wall']:.0f} |")


def load_results(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    return json.loads(path.read_text())


def section(args, results: list[dict], missing: list[str], device: str, available: int) -> str:
    stack = "; ".join(sorted({r.get("versions", "versions not recorded") for r in results})) or versions()
    kernels = ("Triton kernels" if available and os.environ.get("MOMTITAN_TRITON") != "0"
               else "PyTorch chunked path" + (" (MOMTITAN_TRITON=0)" if available else ""))
    packed_runs = [r for r in results if r.get("gpus") is not None]
    packed = (" Cases narrower than the machine ran at the same time on disjoint GPUs (`--pack`), "
              + ("each on its share of the CPU cores." if all(r.get("pinned") for r in packed_runs)
                 else "some sharing the CPU cores (runs before the cores were split).")
              if packed_runs else "")
    reused = [r["name"] for r in results if r.get("reused")] if args.report is None else []
    cut = (" A case cut off by its time limit (`--case-timeout`, `--deadline`) shows the steps it logged "
           "(\"166 of 200 (cut off)\") and its medians over them." if any(r.get("cut_off") for r in results) else "")
    lines = [f"{time.strftime('%Y-%m-%d')}, {available} × {device}; {stack}; recurrence: {kernels}.",
             f"tokens/s per GPU, MFU and the all-to-all time (rank 0, expert-parallel runs) are medians over the "
             f"steps after step {args.warmup}; memory is the peak. Scaling efficiency: tokens/s per GPU over that "
             f"of the 1-GPU (2-GPU) case of the same model and precision, the latter with the same expert-parallel "
             f"degree, at most 2.{packed}{cut}"
             + (f" Reused from an earlier run on the same machine kind, same flags: {', '.join(reused)}." if reused else "")
             + (f" Built with `--report` from the runs stored in {args.results} (the longest run of each case)."
                if args.report is not None else ""),
             "",
             "| case | GPUs | steps | loss first → last | tokens/s/GPU | MFU % | peak memory GiB "
             "| all-to-all ms/step (% of step) | efficiency vs 1 GPU | vs 2 GPUs | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_gpus = {}
    for r in results:
        by_gpus.setdefault((r["variant"], r["ngpu"]), r)
    lines += [summarize(r, args.warmup, by_gpus.get((baseline_variant(r["variant"], 1), 1)) if r["ngpu"] > 1 else None,
                        by_gpus.get((baseline_variant(r["variant"], 2), 2)) if r["ngpu"] > 2 else None)
              for r in results]
    if missing:
        lines += ["", f"Not (yet) run: {', '.join(missing)}."]
    lines += ["", "Loss per step:", "", "| step | " + " | ".join(r["name"] for r in results) + " |",
              "|---" * (len(results) + 1) + "|"]
    steps = sorted({s for r in results for s, *_ in r["rows"]})
    for s in steps:
        cells = [next((f"{row[1]:.4f}" for row in r["rows"] if row[0] == s), "") for r in results]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""] + [f"    {r['cmd']}" for r in results]
    return "\n".join([f"## Training: {args.suite}", ""] + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "bench_train")
    parser.add_argument("--case-timeout", type=float, default=600, help="seconds before a case is killed")
    parser.add_argument("--pack", action="store_true", help="run cases at the same time on disjoint GPUs")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="from now: start no case after it, and cut a running case off at it (its logged steps "
                             "are kept and reported as cut off); for a machine lent for a fixed time")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON of finished cases: a case measured there on the same GPU with the same flags and "
                             "steps is reused, not rerun; every new result is added")
    parser.add_argument("--cases", default=None,
                        help="regular expression: run only the suite's cases whose name it matches (the table keeps "
                             "every case found in --results)")
    parser.add_argument("--report", metavar="GPU_NAME", default=None,
                        help="run nothing: write the table from the runs stored in --results on this GPU (as "
                             "torch.cuda.get_device_name() names it), the longest run of each case, any step count")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    deadline = None if args.deadline is None else time.time() + args.deadline
    if args.steps <= args.warmup:
        raise ValueError(f"--steps must exceed --warmup ({args.warmup}), got {args.steps}")
    if args.report is not None:
        report(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    available = gpu_count()
    device = torch.cuda.get_device_name() if available else "CPU"
    store = load_results(args.results)
    wanted = re.compile(args.cases) if args.cases is not None else None
    cases, done = [], {}
    for name, ngpu, flags in SUITES[args.suite]:
        if ngpu > max(available, 1):
            print(f"skip {name}: needs {ngpu} GPUs, have {available}")
            continue
        key = case_key(ngpu, flags, args.steps, device)
        if key in store and store[key]["rc"] == 0:
            done[len(cases)] = dict(store[key], name=name, variant=variant(flags), reused=True)
            print(f"reuse {name} from {args.results}")
        elif wanted is not None and not wanted.search(name):
            continue
        cases.append((name, ngpu, flags))

    def write(missing: list[str]) -> str:
        text = section(args, [done[i] for i in sorted(done)], missing, device, available)
        if not args.no_write:
            write_section(ROOT / "docs" / "benchmarks.md", text)
        return text

    def on_result(i: int, result: dict) -> None:
        _, ngpu, flags = todo[i]
        result["variant"], result["versions"] = variant(flags), versions()
        done[index[i]] = result
        print(summarize(result, args.warmup), flush=True)
        if result["rc"] != 0:
            print(result["tail"])
        if args.results is not None:
            store = load_results(args.results)
            store[case_key(ngpu, flags, args.steps, device)] = {k: v for k, v in result.items() if k != "variant"}
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(store, indent=1))
        write([todo[j][0] for j in range(len(todo)) if index[j] not in done])

    index = [i for i in range(len(cases)) if i not in done]
    todo = [cases[i] for i in index]
    run_cases(todo, args.steps, args.out, args.case_timeout, available, args.pack, on_result, deadline)
    print(write([]))


def report(args) -> None:
    """`--report`: the suite's table from stored runs, without running anything."""
    if args.results is None or not args.results.exists():
        raise ValueError(f"--report needs --results naming a JSON of stored runs, got {args.results}")
    store = load_results(args.results)
    results, missing = [], []
    for name, ngpu, flags in SUITES[args.suite]:
        stored = longest_stored(store, ngpu, flags, args.report)
        if stored is None:
            missing.append(name)
        else:
            results.append(dict(stored, name=name, variant=variant(flags)))
    if not results:
        raise ValueError(f"--results {args.results} holds no successful run of suite {args.suite} on {args.report!r}")
    text = section(args, results, missing, args.report, max(r["ngpu"] for r in results))
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", text)
    print(text)


if __name__ == "__main__":
    main()
