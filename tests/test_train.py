"""torchtitan integration on CPU: short real training runs in subprocesses, plus the pieces in-process.

The subprocess runs take ~15 s each (mostly imports); the whole file stays under four minutes
on two cores.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_close

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = ROOT / "train_configs" / "mom_debug.toml"
STEP_RE = re.compile(r"(?<!validate )step:\s*(\d+)\s+loss:\s*([-\w.]+)")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("momtitan_cache")
    os.environ["MOMTITAN_CACHE"] = str(path)  # the built-in tokenizer is trained once per session
    return path


def _env(cache_dir) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["MOMTITAN_CACHE"] = str(cache_dir)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train(cache_dir, dump: Path, *overrides: str, nproc: int = 1, log_ranks: str = "0",
          timeout: int = 600) -> tuple[dict[int, float], str]:
    """Run torchtitan's trainer on the debug config; returns ({step: loss}, the log of `log_ranks`)."""
    args = [
        "--job.config_file", str(DEBUG_TOML), "--job.dump_folder", str(dump),
        "--metrics.log_freq", "1", "--metrics.disable_color_printing", *overrides,
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--rdzv_backend", "c10d", f"--rdzv_endpoint=localhost:{_free_port()}", "--local-ranks-filter", log_ranks,
        "-m", "momtitan.train", "--experimental.custom_import", "momtitan.train",
        "--job.custom_config_module", "momtitan.train.job_config", *args,
    ]
    env = _env(cache_dir)
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}):\n{log[-6000:]}")
    losses = {int(s): float(v) for s, v in STEP_RE.findall(log)}
    return losses, log


# ---- end-to-end runs --------------------------------------------------------------------------------

def test_run_train_sh_debug_loss_falls(cache_dir, tmp_path):
    """The documented command trains the debug model: loss falls well below its start (ln V), and
    validation on held-out synthetic documents runs through momtitan's validator."""
    cmd = [str(ROOT / "run_train.sh"), "--job.config_file", str(DEBUG_TOML), "--job.dump_folder", str(tmp_path),
           "--training.steps", "20", "--training.local_batch_size", "4", "--metrics.log_freq", "5", "--metrics.disable_color_printing",
           "--checkpoint.no-enable", "--validation.enable", "--validation.freq", "20", "--validation.steps", "1",
           "--validation.local_batch_size", "2", "--validation.seq_len", "128", "--validation.dataset", "synthetic"]
    env = _env(cache_dir)
    env["PYTHON"] = sys.executable
    env["NGPU"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    losses = {int(s): float(v) for s, v in STEP_RE.findall(log)}
    assert sorted(losses) == [1, 5, 10, 15, 20], log[-3000:]
    assert 7.0 < losses[1] < 8.5  # about ln(2048) at init
    assert losses[20] < losses[1] - 1.5, losses
    assert losses[20] < losses[10] < losses[1], losses
    assert re.search(r"step:\s*20\s+ce: [\d.]+\s+aux: [\d.]+\s+load0: \[", log), "MoM metrics line missing"
    assert "tps:" in log and "mfu:" in log
    val = {int(s): float(v) for s, v in re.findall(r"validate step:\s*(\d+)\s+loss:\s*([\d.]+)", log)}
    assert sorted(val) == [1, 20] and val[20] < val[1] - 1.0, val  # held-out synthetic documents


def test_dcp_resume_matches_unbroken_run(cache_dir, tmp_path):
    """Stop at step 3 (full DCP checkpoint), resume to step 6: same losses as one 6-step run."""
    common = ["--lr_scheduler.total_steps", "6", "--lr_scheduler.warmup_steps", "2",
              "--checkpoint.interval", "3", "--training.local_batch_size", "4", "--training.seq_len", "128"]
    unbroken, _ = train(cache_dir, tmp_path / "unbroken", "--training.steps", "6", *common)
    first, _ = train(cache_dir, tmp_path / "resumed", "--training.steps", "3", *common)
    assert (tmp_path / "resumed" / "checkpoint" / "step-3" / ".metadata").exists()
    second, log = train(cache_dir, tmp_path / "resumed", "--training.steps", "6", *common)
    assert "Training starts at step 4" in log, log[-3000:]
    assert sorted(unbroken) == list(range(1, 7)) and sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first[step] == pytest.approx(unbroken[step], abs=1e-5)
    for step in (4, 5, 6):
        assert second[step] == pytest.approx(unbroken[step], abs=1e-4), (step, second, unbroken)
    assert unbroken[6] != unbroken[3]  # the steps after the restart really trained


def test_checkpoint_saved_and_loaded_in_hf_format(cache_dir, tmp_path):
    """torchtitan's `--checkpoint.last_save_in_hf` writes safetensors with `MoMForCausalLM`'s keys
    (through the TrainSpec's `MoMStateDictAdapter`), which the HF model loads strictly, and
    `--checkpoint.initial_load_in_hf` starts a run from them: its first loss is the loss the saved
    weights give, not a fresh initialisation's."""
    from safetensors.torch import load_file

    from momtitan.config import get_flavor
    from momtitan.hf.configuration import MoMConfig
    from momtitan.hf.modeling import MoMForCausalLM

    common = ["--training.local_batch_size", "2", "--training.seq_len", "64", "--debug.seed", "3"]
    train(cache_dir, tmp_path / "save", "--training.steps", "2", "--checkpoint.enable", "--checkpoint.interval", "2",
          "--checkpoint.last_save_in_hf", "--checkpoint.last_save_model_only", *common)
    folder = tmp_path / "save" / "checkpoint" / "step-2"
    weights = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        weights.update(load_file(f))
    args = get_flavor("debug").replace(vocab_size=weights["model.tok_embeddings.weight"].shape[0])
    hf_model = MoMForCausalLM(MoMConfig.from_model_args(args))
    hf_model.load_state_dict(weights, strict=True)
    # the converter makes that save a whole HF folder (config.json, tokenizer): the latest step is the
    # HF-format one (it used to be skipped for the DCP steps before it, having no .metadata)
    from momtitan.hf.convert import load_model, main_dcp_to_hf

    assert main_dcp_to_hf([str(tmp_path / "save" / "checkpoint"), str(tmp_path / "hf"), "--flavor", "debug",
                           "--tokenizer", "builtin"]) == 0
    tokens = torch.randint(0, args.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "hf").eval()(tokens).logits, hf_model.eval()(tokens).logits)

    fresh, _ = train(cache_dir, tmp_path / "fresh", "--training.steps", "1", "--checkpoint.no-enable", *common)
    loaded, log = train(cache_dir, tmp_path / "load", "--training.steps", "1", "--checkpoint.enable",
                        "--checkpoint.initial_load_path", str(folder), "--checkpoint.initial_load_in_hf",
                        "--checkpoint.initial_load_model_only", *common)
    assert "Loading the checkpoint" in log or "Loaded" in log, log[-3000:]
    assert loaded[1] < fresh[1] - 0.05, (loaded, fresh)  # two trained steps lower the loss of the same batch


def test_fsdp_two_ranks_on_cpu(cache_dir, tmp_path):
    """FSDP2 over two gloo ranks (sum-only reductions): finite, falling loss."""
    losses, log = train(cache_dir, tmp_path, "--training.steps", "8", "--training.local_batch_size", "4",
                        "--training.seq_len", "128", "--checkpoint.no-enable", nproc=2)
    assert "Applied FSDP to the model" in log
    assert sorted(losses) == list(range(1, 9))
    assert all(v == v and v < 9 for v in losses.values()), losses  # no NaN
    assert losses[8] < losses[1] - 0.3, losses
    # each rank initialises its own shards: memories on different ranks are not copies of each other
    line = re.search(r"step:\s*1\s+ce: .*", log).group(0)
    loads = [[float(v) for v in m.split()] for m in re.findall(r"load\d: \[([\d. ]+)\]", line)]
    assert loads and not all(row[:2] == row[2:] for row in loads), line


@pytest.mark.parametrize("shard, ep, nproc, applied", [(1, 1, 2, "DDP"), (2, 1, 4, "HSDP"), (2, 2, 4, "HSDP")],
                         ids=["ddp", "hsdp", "hsdp_ep"])
def test_replicated_data_parallel_sums_not_averages(cache_dir, tmp_path, shard, ep, nproc, applied):
    """DDP (replicate 2) and HSDP (replicate 2 x shard 2, also with expert parallelism over the
    shards) over gloo ranks against one process with the same global batch. The loss is already
    divided by the global token count, so gradients must be summed over ranks: averaged, the grad
    norm would be a fraction of the single-process one; under EP the memories' gradients must be
    summed over the replicas too."""
    common = ["--training.steps", "1", "--training.seq_len", "128", "--checkpoint.no-enable"]
    single, log1 = train(cache_dir, tmp_path / "one", *common, "--training.local_batch_size", "8")
    multi, log2 = train(cache_dir, tmp_path / "multi", *common, "--training.local_batch_size", str(8 // nproc),
                        "--parallelism.data_parallel_replicate_degree", "2",
                        "--parallelism.data_parallel_shard_degree", str(shard),
                        "--parallelism.expert_parallel_degree", str(ep), nproc=nproc, log_ranks=f"0,{nproc - 1}")
    assert f"Applied {applied} to the model" in log2
    grad_norm = r"step:\s*1\s+loss:.*?grad_norm:\s*([\d.]+)"
    norms = [float(v) for v in re.findall(grad_norm, log2)]  # rank 0 and the last rank (other replica)
    # every rank reports the same global norm unless some gradients were not summed over the replicas
    # (the memories' under EP before their FSDP mesh had dp_replicate: 0.9245 vs 0.9233)
    assert len(norms) == 2 and norms[0] == norms[1], norms
    assert multi[1] == pytest.approx(single[1], abs=0.05)  # same init, other documents: close losses
    assert norms[0] == pytest.approx(float(re.search(grad_norm, log1).group(1)), rel=0.2)


def test_memories_sharded_on_their_rows_sum_their_gradients(cache_dir, tmp_path):
    """2 memories, ep 2 over dp_shard 4: efsdp (2) outnumbers each ep rank's one memory, so FSDP shards
    the memories on dim 1. Against one process with the same global batch: every rank reports the same
    grad norm, close to the single process's (the memories' gradients summed over all ranks)."""
    common = ["--training.steps", "1", "--training.seq_len", "128", "--checkpoint.no-enable", "--mom.num_memories", "2",
              "--mom.topk", "1"]
    single, log1 = train(cache_dir, tmp_path / "one", *common, "--training.local_batch_size", "8")
    multi, log2 = train(cache_dir, tmp_path / "multi", *common, "--training.local_batch_size", "2",
                        "--parallelism.data_parallel_shard_degree", "4", "--parallelism.expert_parallel_degree", "2",
                        nproc=4, log_ranks="0,3")
    assert "Applied expert parallelism: 2 ranks" in log2
    grad_norm = r"step:\s*1\s+loss:.*?grad_norm:\s*([\d.]+)"
    norms = [float(v) for v in re.findall(grad_norm, log2)]
    assert len(norms) == 2 and norms[0] == norms[1], norms
    assert multi[1] == pytest.approx(single[1], abs=0.05)
    assert norms[0] == pytest.approx(float(re.search(grad_norm, log1).group(1)), rel=0.2)


def test_expert_parallel_degree_that_dp_shard_cannot_hold_stops_before_the_mesh(cache_dir, tmp_path):
    """ep 2 divides the world (2 ranks, replicated) but not dp_shard (1): `python -m momtitan.train`
    stops with the options and their values before torchtitan builds its device mesh."""
    with pytest.raises(RuntimeError) as failed:
        train(cache_dir, tmp_path, "--parallelism.data_parallel_replicate_degree", "2",
              "--parallelism.expert_parallel_degree", "2", "--checkpoint.no-enable", nproc=2, timeout=300)
    log = str(failed.value)
    assert re.search(r"ValueError: parallelism.expert_parallel_degree \(2\) .* must divide "
                     r"data_parallel_shard_degree \(1\)", log), log[-3000:]
    assert "Building device mesh" not in log


def test_activation_checkpointing_full_and_selective_keep_the_losses(cache_dir, tmp_path):
    """Recomputing a block in the backward changes memory, not the numbers."""
    common = ["--training.steps", "2", "--training.local_batch_size", "2", "--training.seq_len", "64",
              "--checkpoint.no-enable"]
    plain, _ = train(cache_dir, tmp_path / "none", *common)
    full, log_full = train(cache_dir, tmp_path / "full", *common, "--activation_checkpoint.mode", "full")
    layer, log_layer = train(cache_dir, tmp_path / "layer", *common, "--activation_checkpoint.mode", "selective",
                             "--activation_checkpoint.selective_ac_option", "1")
    assert "Applied full activation checkpointing" in log_full
    assert "Applied selective activation checkpointing" in log_layer
    for losses in (full, layer):
        assert losses[1] == pytest.approx(plain[1], abs=1e-5) and losses[2] == pytest.approx(plain[2], abs=1e-4)


def test_nonfinite_probe_stops_a_diverging_run(cache_dir, tmp_path):
    """`--debug.nonfinite_probe`: a learning rate of 1e30 sends the weights to ~1e30 after the first
    step (whose forward is finite); the second forward overflows, and the run stops there naming the
    module (torchtitan alone would log NaN losses to the end)."""
    with pytest.raises(RuntimeError) as failed:
        train(cache_dir, tmp_path, "--training.steps", "3", "--training.local_batch_size", "2", "--training.seq_len", "64",
              "--checkpoint.no-enable", "--optimizer.lr", "1e30", "--debug.nonfinite_probe")
    log = str(failed.value)
    assert re.search(r"FloatingPointError: non-finite values first in the output of layers\.0\.mixer \(forward 2;", log), log


@pytest.mark.slow
def test_compiled_blocks_with_op_sac_match_eager(cache_dir, tmp_path):
    """Per-block torch.compile(fullgraph) + per-op selective AC, the 340M and 1.3B recipes' path:
    same first-step loss as eager. (aot_eager backend: the graph capture and AC are what is tested;
    inductor is for the GPU.) About a minute; in the default run since it is the recipes' path."""
    common = ["--training.steps", "2", "--training.local_batch_size", "2", "--training.seq_len", "64",
              "--checkpoint.no-enable"]
    eager, _ = train(cache_dir, tmp_path / "eager", *common)
    compiled, log = train(cache_dir, tmp_path / "compiled", *common, "--compile.enable", "--compile.backend",
                          "aot_eager", "--activation_checkpoint.mode", "selective",
                          "--activation_checkpoint.selective_ac_option", "op")
    assert "Compiled each MoM block" in log and "Applied selective activation checkpointing" in log
    assert compiled[1] == pytest.approx(eager[1], abs=1e-4)
    assert compiled[2] == pytest.approx(eager[2], abs=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MOMTITAN_SLOW_TESTS"), reason="set MOMTITAN_SLOW_TESTS=1 (inductor on CPU, ~2 min)")
def test_memory_budget_checkpointing_with_inductor_on_cpu(cache_dir, tmp_path):
    """The compiler's memory-budget checkpointing with inductor on CPU trains to the losses of the
    uncheckpointed eager run (its vectorized C++ backward kernels corrupted the heap, torch 2.13;
    `parallelize.prepare_memory_budget` generates them scalar there)."""
    common = ["--training.steps", "2", "--training.local_batch_size", "2", "--training.seq_len", "64",
              "--checkpoint.no-enable"]
    eager, _ = train(cache_dir, tmp_path / "eager", *common)
    budget, log = train(cache_dir, tmp_path / "budget", *common, "--compile.enable", "--activation_checkpoint.mode",
                        "memory_budget", "--activation_checkpoint.memory_budget", "0.5")
    assert "scalar C++ kernels" in log
    assert budget[1] == pytest.approx(eager[1], abs=1e-4)
    assert budget[2] == pytest.approx(eager[2], abs=1e-3)


def test_profiling_on_cpu_writes_a_trace(cache_dir, tmp_path):
    """torchtitan's `--profiling.enable_profiling` on a machine without a GPU (cpu_shims item 4)."""
    train(cache_dir, tmp_path, "--training.steps", "4", "--training.local_batch_size", "1", "--training.seq_len", "32",
          "--checkpoint.no-enable", "--profiling.enable_profiling", "--profiling.profile_freq", "4")
    trace = tmp_path / "profile_traces" / "iteration_4" / "rank0_trace.json"
    assert trace.exists() and '"aten::mm"' in trace.read_text()


def test_missing_dataset_path_stops_at_once(cache_dir, tmp_path):
    missing = tmp_path / "no_such_data.jsonl"
    with pytest.raises(RuntimeError) as err:
        train(cache_dir, tmp_path, "--training.dataset", "local", "--training.dataset_path", str(missing),
              "--checkpoint.no-enable", timeout=300)
    assert "FileNotFoundError" in str(err.value) and str(missing) in str(err.value)
    assert "step:" not in str(err.value)


# ---- pieces, in-process -----------------------------------------------------------------------------

def _job_config(*cli: str):
    import momtitan.train  # noqa: F401  registers the spec (and the CPU shims)
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(
        ["--job.config_file", str(DEBUG_TOML), "--job.custom_config_module", "momtitan.train.job_config", *cli]
    )


def _args(*cli: str):
    from momtitan.train.spec import make_train_spec

    job = _job_config(*cli)
    spec = make_train_spec()
    args = spec.model_args[job.model.flavor]
    args.update_from_config(job)
    return job, spec, args


def test_toml_overrides_reach_model_args(cache_dir):
    job, _, args = _args("--mom.num_memories", "8", "--mom.topk", "3", "--mom.aux_loss_scale", "0.001",
                         "--mom.attn_layers", "1", "--training.seq_len", "1024")
    m = args.model
    assert (m.num_memories, m.topk, m.aux_loss_scale, m.attn_layers) == (8, 3, 0.001, (1,))
    assert m.vocab_size == 2048  # from the built-in tokenizer (2048 tokens, a multiple of 64)
    assert m.max_seq_len >= 1024
    # a second update starts again from the flavor, not from the previous run's values
    job2 = _job_config()
    args.update_from_config(job2)
    assert args.model.num_memories == 4 and args.model.attn_layers == ()


@pytest.mark.parametrize(
    "cli, match",
    [
        (["--mom.topk", "9"], "topk"),
        (["--mom.memory_rule", "bogus"], "memory_rule"),
        (["--mom.attn_layers", "7"], "attn_layers"),
        (["--mom.aux_loss_scale", "-1"], "aux_loss_scale"),
        (["--mom.vocab_size", "100"], "vocab_size"),
    ],
)
def test_bad_model_values_raise_valueerror(cache_dir, cli, match):
    with pytest.raises(ValueError, match=match):
        _args(*cli)


def test_unknown_flavor_dataset_and_tokenizer(cache_dir, tmp_path):
    from momtitan.train.data import open_source
    from momtitan.train.spec import make_train_spec
    from momtitan.train.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match="'huge'"):
        make_train_spec().model_args["huge"]
    with pytest.raises(ValueError, match="'nope'"):
        open_source("nope", None)
    with pytest.raises(ValueError, match="dataset_path"):
        open_source("synthetic", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing_tok"):
        load_tokenizer(str(tmp_path / "missing_tok"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .jsonl"):
        open_source("local", str(empty))
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "x.csv").write_text("a\n")
        open_source("local", str(tmp_path / "x.csv"))


def test_local_jsonl_packing_and_doc_starts(cache_dir, tmp_path):
    from momtitan.train.data import PackedDocuments, open_source
    from momtitan.train.tokenizer import load_tokenizer

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "document number {i} says hello"}}\n' for i in range(50)))
    tok = load_tokenizer("builtin")
    ds = PackedDocuments(open_source("local", str(path)), tok, seq_len=32, infinite=False)
    rows = list(ds)
    assert rows
    for inputs, labels in rows:
        x, starts = inputs["input"], inputs["doc_starts"]
        assert x.shape == labels.shape == starts.shape == (32,) and starts.dtype == torch.bool
        assert torch.equal(x[1:], labels[:-1])
        assert starts[0]
        assert torch.equal(starts[1:], x[:-1] == tok.eos_id)
        assert torch.equal(starts[1:], x[1:] == tok.bos_id)  # every document starts with BOS
    # resuming from a state gives the same rows as going on
    ds2 = PackedDocuments(open_source("local", str(path)), tok, seq_len=32, infinite=False)
    it = iter(ds2)
    next(it), next(it)
    state = ds2.state_dict()
    rest = [r[1] for r in it]
    ds3 = PackedDocuments(open_source("local", str(path)), tok, seq_len=32, infinite=False)
    ds3.load_state_dict(state)
    assert [r[1].tolist() for r in ds3] == [r.tolist() for r in rest]


def test_doc_starts_are_the_packed_documents_first_tokens(cache_dir, tmp_path, monkeypatch):
    """A document whose text holds the EOS / BOS strings (the tokenizer encodes them as those ids) is
    one segment: doc_starts marks the documents' first tokens as packed, not every token after an
    EOS id; a resumed state keeps the flags."""
    from momtitan.train.data import PackedDocuments, open_source
    from momtitan.train.tokenizer import load_tokenizer

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "doc {i} says a cat </s> sat <s> on {i}"}}\n' for i in range(30)))
    tok = load_tokenizer("builtin")
    docs = [tok.encode(f"doc {i} says a cat </s> sat <s> on {i}", add_bos=True, add_eos=True) for i in range(30)]
    assert any(t == tok.eos_id for t in docs[0][1:-1])  # the text's "</s>" is the EOS id inside the document
    starts = [flag for d in docs for flag in [True] + [False] * (len(d) - 1)]
    ds = PackedDocuments(open_source("local", str(path)), tok, seq_len=16, infinite=False)
    for r, (inputs, _) in enumerate(ds):
        expected = torch.tensor(starts[r * 17: r * 17 + 16])
        expected[0] = True
        assert torch.equal(inputs["doc_starts"], expected), r
    it = iter(PackedDocuments(open_source("local", str(path)), tok, seq_len=16, infinite=False))
    resumed = PackedDocuments(open_source("local", str(path)), tok, seq_len=16, infinite=False)
    first = iter(resumed)
    next(first)
    state = resumed.state_dict()
    again = PackedDocuments(open_source("local", str(path)), tok, seq_len=16, infinite=False)
    again.load_state_dict(state)
    next(it)
    assert [r[0]["doc_starts"].tolist() for r in again] == [r[0]["doc_starts"].tolist() for r in it]


def test_validation_reads_the_same_held_out_rows_every_time(cache_dir, tmp_path, monkeypatch):
    """The validation loader is built once and iterated at every validation: each pass starts from
    the first document (a finite file's second pass is not empty); hub datasets validate on their
    validation split; a DataLoader worker left without documents raises instead of looping forever."""
    import datasets

    from momtitan.train import data
    from momtitan.train.tokenizer import load_tokenizer

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "held out document {i}"}}\n' for i in range(12)))
    tok = load_tokenizer("builtin")
    ds = data.PackedDocuments(data.open_source("local", str(path)), tok, 16, infinite=False, restart=True)
    first, second = [r[1].tolist() for r in ds], [r[1].tolist() for r in ds]
    assert first and first == second

    local = data.open_source("local", str(path))  # before load_dataset is replaced below
    asked = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: asked.update(kw) or [])
    data.open_source("c4", None, split="validation")
    assert asked["split"] == "validation"

    class Worker:
        id, num_workers = 1, 2

    monkeypatch.setattr(data, "get_worker_info", lambda: Worker)
    lonely = data.PackedDocuments(local, tok, 16, dp_rank=1, dp_world_size=12)
    with pytest.raises(ValueError, match=r"rank 1 holds 1 documents, none for DataLoader worker 1 of 2"):
        next(iter(lonely))


def test_synthetic_data_shards_ranks(cache_dir):
    from momtitan.train.data import PackedDocuments, open_source
    from momtitan.train.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    rows = [next(iter(PackedDocuments(open_source("synthetic", None), tok, 64, dp_rank=r, dp_world_size=2)))
            for r in (0, 1)]
    again = next(iter(PackedDocuments(open_source("synthetic", None), tok, 64, dp_rank=0, dp_world_size=2)))
    assert not torch.equal(rows[0][1], rows[1][1])
    assert torch.equal(rows[0][1], again[1])


def test_dataloader_workers_split_the_rows_of_their_rank(cache_dir, tmp_path):
    """With `training.dataloader.num_workers` 2, each worker iterates its own copy of the dataset: the
    workers must read different documents (MQAR: the rank's examples, each once), not the same ones."""
    from torch.utils.data import DataLoader

    from momtitan.train.data import MQARRows, PackedDocuments, open_source
    from momtitan.train.job_config import MQAR
    from momtitan.train.tokenizer import load_tokenizer

    def rows(dataset, workers: int, n: int) -> list[tuple]:
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        return [tuple(labels.tolist()) for (_, labels), _ in zip(loader, range(n))]

    class Job:
        mqar = MQAR(vocab_size=128, num_kv_pairs=4)

    for limit in (None, 7):  # training, and validation's fixed first examples
        rank1 = rows(MQARRows(Job, 32, seed=0, dp_rank=1, dp_world_size=2, limit=limit), 0, 8)
        split = rows(MQARRows(Job, 32, seed=0, dp_rank=1, dp_world_size=2, limit=limit), 2, 8)
        assert sorted(split) == sorted(rank1), limit

    tok = load_tokenizer("builtin")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "document {i} is about the number {i * 7919 % 1000}"}}\n' for i in range(40)))
    for source in (open_source("synthetic", None), open_source("local", str(path))):
        split = rows(PackedDocuments(source, tok, 16, dp_rank=1, dp_world_size=2, infinite=False), 2, 12)
        assert len(split) == 12 and len(set(split)) == len(split), source


def test_optimizer_param_groups_exclude_decay(cache_dir):
    from momtitan.train.optimizer import build_optimizers, split_by_decay

    job, spec, args = _args("--optimizer.weight_decay", "0.1")
    torch.manual_seed(0)
    model = spec.model_cls(args)
    model.init_weights()
    decay, no_decay = split_by_decay(model)
    for name in no_decay:
        leaf = name.rsplit(".", 1)[-1]
        assert leaf in ("A_log", "dt_bias", "bias") or "norm" in name, name
    for name in decay:
        assert not name.endswith(("A_log", "dt_bias", ".bias")) and "norm" not in name, name
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith("dt_bias") for n in no_decay)
    assert any("mixer_norm" in n for n in no_decay) and "norm.weight" in no_decay
    assert "tok_embeddings.weight" in decay and any(n.endswith("k_proj") for n in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))

    opts = build_optimizers([model], job.optimizer, parallel_dims=None)
    (opt,) = opts.optimizers
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert {by_id[id(p)] for p in no_decay.values()} == {0.0}
    assert {by_id[id(p)] for p in decay.values()} == {0.1}
    assert opt.defaults["foreach"] and not opt.defaults["fused"]


def test_loss_adds_scaled_aux_term(cache_dir):
    from momtitan.model import MoMOutput
    from momtitan.train.loss import MoMLoss, RouterStats, cross_entropy_sum

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 0] = -100  # ignored: 9 valid tokens
    aux = torch.tensor(2.5, requires_grad=True)
    load = torch.full((3, 4), 0.25)
    fn = MoMLoss(aux_loss_scale=0.01)
    out = fn(MoMOutput(logits, aux, load), labels)
    ce = cross_entropy_sum(logits, labels)
    assert out.item() == pytest.approx(ce.item() + 0.01 * 2.5 * 9, rel=1e-6)
    out.backward()
    assert aux.grad.item() == pytest.approx(0.01 * 9)  # the aux term trains the router
    stats = RouterStats.summarize(fn.stats.pop(), fn.stats.load_shape)
    assert stats["loss_metrics/ce_loss"] == pytest.approx(ce.item() / 9, rel=1e-6)
    assert stats["loss_metrics/aux_loss"] == pytest.approx(2.5)
    assert stats["memory_load/layer2/mem3"] == pytest.approx(0.25)
    assert MoMLoss(0.0)(MoMOutput(logits, aux, load), labels).item() == pytest.approx(ce.item(), rel=1e-6)


def test_all_to_all_time_per_step_after_a_resume_and_a_validation(cache_dir, monkeypatch):
    """The all-to-all time is divided by the steps of the logging window, also when the run resumed at
    step 1000; the exchanges of validation forwards (and of the window's steps before them, as
    torchtitan restarts its own timing there) are left out."""
    from types import SimpleNamespace

    from torchtitan.distributed import ParallelDims

    from momtitan.parallel import comm_timer
    from momtitan.train.metrics import build_metrics_processor

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(comm_timer, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr("momtitan.train.loss.latest_stats", None)

    def exchange(seconds: float) -> None:
        with comm_timer.ALL_TO_ALL.measure(torch.device("cpu")):
            clock.now += seconds

    job = _job_config("--metrics.log_freq", "10")
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=2, etp=1, world_size=2)
    metrics = build_metrics_processor(job, dims)
    metrics.num_flops_per_token = 1
    logged = {}
    monkeypatch.setattr(metrics.logger, "log", lambda values, step: logged.update({step: values}))
    comm_timer.ALL_TO_ALL.pop_seconds()

    def steps(first: int, last: int) -> None:
        for step in range(first, last + 1):
            exchange(0.01)
            metrics.data_loading_times.append(0.0)
            if metrics.should_log(step):
                metrics.log(step, 1.0, 1.0, 1.0)

    steps(1001, 1010)  # resumed from the checkpoint of step 1000
    assert logged[1010]["time_metrics/all_to_all(s)"] == pytest.approx(0.01)
    steps(1011, 1015)
    exchange(0.5)  # a validation at step 1015
    metrics.log_validation(1.0, 1015)
    steps(1016, 1020)
    assert logged[1020]["time_metrics/all_to_all(s)"] == pytest.approx(0.01)


def test_float8_converter_skips_router_head_and_shared_memory(cache_dir):
    """torchtitan's float8 converter (emulated on CPU) swaps the block linears, not the router, the
    head or the shared memory's projections (whose weights the layer concatenates, never calling them)."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear
    from torchtitan.protocols.model_converter import build_model_converters

    job, spec, args = _args("--model.converters", "quantize.linear.float8", "--quantize.linear.float8.emulate",
                            "--mom.hidden_size", "64", "--mom.num_heads", "2", "--mom.head_dim", "32")
    assert {"router", "output", "shared_"} <= set(job.quantize.linear.float8.filter_fqns)
    mx, _, _ = _args("--model.converters", "quantize.linear.mx")  # MX swaps linears by the same rule
    assert {"router", "output", "shared_"} <= set(mx.quantize.linear.mx.filter_fqns)
    with torch.device("meta"):
        model = spec.model_cls(args)
    from torchtitan.distributed import ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    build_model_converters(job, parallel_dims=dims).convert(model)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["output"] is torch.nn.Linear
    assert kinds["layers.0.mixer.router"] is torch.nn.Linear
    assert kinds["layers.0.mixer.shared_k"] is torch.nn.Linear and kinds["layers.0.mixer.shared_v"] is torch.nn.Linear
    assert kinds["layers.0.mixer.q_proj"] is Float8Linear
    assert kinds["layers.0.mixer.o_proj"] is Float8Linear


def test_grouped_float8_targets_the_memories_and_aligns_their_groups(cache_dir):
    """`quantize.grouped_mm.float8` defaults its FQNs to the memories, and the MoM layers then pad
    each memory's rows to 16 (torchao's float8 grouped GEMM); the layer's output is unchanged."""
    from momtitan.layers.mom import MemoryProjections, MoMLayer
    from momtitan.parallel.float8 import align_memory_groups

    job, spec, args = _args("--model.converters", "quantize.grouped_mm.float8")
    assert job.quantize.grouped_mm.float8.fqns == ["memories"]
    torch.manual_seed(0)
    layer = MoMLayer(args.model).double()
    layer.reset_parameters()
    x = torch.randn(2, 37, args.model.hidden_size, dtype=torch.float64)
    before = layer(x)[0]
    assert align_memory_groups(layer, job) == 16
    assert all(m.group_alignment == 16 for m in layer.modules() if isinstance(m, MemoryProjections))
    assert_close("aligned output", layer(x)[0], before, 1e-12)
    plain, _, _ = _args()
    assert align_memory_groups(layer, plain) == 1
    with pytest.raises(ValueError, match="quantize.grouped_mm.float8.*expert_parallel_degree=2"):
        _args("--model.converters", "quantize.grouped_mm.float8", "--parallelism.expert_parallel_degree", "2")


def test_cpu_shims_only_without_accelerator():
    import momtitan.train  # noqa: F401
    from momtitan.train import cpu_shims

    if torch.accelerator.is_available():
        assert not cpu_shims._APPLIED
    else:
        from torchtitan.tools import utils

        assert cpu_shims._APPLIED and utils.device_type == "cpu" and utils.device_module is torch.cpu
        assert torch.cpu.get_device_properties().total_memory > 0


def test_validation_until_the_data_runs_out_is_refused_under_ep(cache_dir, tmp_path, caplog):
    """validation.steps -1 may hang (torchtitan warns); under EP a rank out of batches leaves its peers in
    an all-to-all, so it is refused there."""
    from torchtitan.distributed import ParallelDims

    from momtitan.train.tokenizer import load_tokenizer
    from momtitan.train.validate import build_validator

    path = tmp_path / "val.jsonl"
    path.write_text("".join(f'{{"text": "held-out document {i}"}}\n' for i in range(8)))
    job = _job_config("--validation.steps", "-1", "--validation.dataset", "local",
                      "--validation.dataset_path", str(path))

    def validator(ep: int):
        dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=ep, etp=1, world_size=2)
        return build_validator(job_config=job, dp_world_size=2, dp_rank=0, tokenizer=load_tokenizer("builtin"),
                               parallel_dims=dims, loss_fn=None, validation_context=None, maybe_enable_amp=None,
                               metrics_processor=None)

    with pytest.raises(ValueError, match="validation.steps must be positive under parallelism.expert_parallel_degree "
                                         "2, got -1"):
        validator(ep=2)
    validator(ep=1)
    assert "Setting validation steps to -1 might cause hangs" in caplog.text


def test_mqar_dataset_rows_and_recall_accuracy_in_validation(cache_dir, tmp_path):
    from momtitan.train.data import MQARRows
    from momtitan.train.job_config import MQAR

    class Job:
        mqar = MQAR(vocab_size=128, num_kv_pairs=4)

    rows = MQARRows(Job, seq_len=32, seed=0, dp_rank=1, dp_world_size=2, limit=3)
    batch = list(rows)
    assert len(batch) == 3 and list(rows)[0][1].tolist() == batch[0][1].tolist()  # validation passes repeat
    for inputs, labels in batch:
        answers = labels != -100
        assert int(answers.sum()) == 4 and inputs["input"].max() < 128 and inputs["doc_starts"][0]
        for pos in answers.nonzero().flatten().tolist():  # the answer is the value stored after the query key
            key = inputs["input"][pos]
            stored = (inputs["input"][:8:2] == key).nonzero().item()
            assert labels[pos] == inputs["input"][2 * stored + 1]

    losses, log = train(cache_dir, tmp_path / "mqar", "--training.dataset", "mqar", "--training.seq_len", "32",
                   "--training.steps", "6", "--validation.enable", "--validation.dataset", "mqar",
                   "--validation.freq", "3", "--validation.steps", "2", "--validation.seq_len", "32",
                   "--mqar.vocab_size", "128", "--mqar.num_kv_pairs", "4", "--checkpoint.no-enable")
    # validations at steps 1, 3 and 6, each over 2 steps x 8 rows x 4 answers
    labelled = re.findall(r"validate step:\s+(\d+)\s+accuracy: [\d.]+\s+\(labelled positions: (\d+)\)", log)
    assert labelled == [("1", "64"), ("3", "64"), ("6", "64")], log[-3000:]
    assert abs(losses[1] - math.log(128)) < 0.5, losses  # the model took the task's 128-token vocabulary


def test_validation_accuracy_is_the_share_of_answers_right(cache_dir, monkeypatch, caplog):
    """MoMValidator on mqar with a model that recalls the values of keys 0 and 2 of each row's 4 (and
    answers 0, never a value, elsewhere): accuracy exactly 0.5, over 3 steps x 4 rows x 4 answers."""
    import contextlib
    from types import SimpleNamespace

    from torchtitan.distributed import ParallelDims

    from momtitan.train.metrics import build_metrics_processor
    from momtitan.train.validate import build_validator

    n, vocab = 4, 128
    job = _job_config("--validation.dataset", "mqar", "--validation.steps", "3", "--validation.local_batch_size", "4",
                      "--validation.seq_len", "32", "--mqar.vocab_size", str(vocab), "--mqar.num_kv_pairs", str(n))

    class HalfRecall(torch.nn.Module):
        def forward(self, tokens, doc_starts=None):
            B, T = tokens.shape
            logits = torch.zeros(B, T, vocab)
            for j in (0, 2):
                query = tokens == tokens[:, 2 * j : 2 * j + 1]  # key j again, after the pairs
                query[:, : 2 * n] = False
                value = tokens[:, 2 * j + 1].view(B, 1, 1).expand(B, T, 1)
                logits.scatter_add_(2, value, query[..., None].float())
            return SimpleNamespace(logits=logits)

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    metrics = build_metrics_processor(job, dims)
    logged = {}
    monkeypatch.setattr(metrics.logger, "log", lambda values, step: logged.update(values))
    validator = build_validator(job_config=job, dp_world_size=1, dp_rank=0, tokenizer=None, parallel_dims=dims,
                                loss_fn=lambda pred, labels: torch.zeros(()), validation_context=contextlib.nullcontext,
                                maybe_enable_amp=contextlib.nullcontext(), metrics_processor=metrics)
    caplog.set_level("INFO")
    validator.validate([HalfRecall()], step=1)
    assert logged["validation_metrics/accuracy"] == 0.5
    assert "accuracy: 0.5000  (labelled positions: 48)" in caplog.text


def test_local_sources_read_the_split_asked_for(cache_dir, tmp_path):
    """Validation on a local path reads its held-out split: a saved DatasetDict's "validation", or the
    validation/ folder beside train/ (both used to give the training text to validation, and a folder's
    held-out files to training too); a split that is missing is named."""
    import datasets

    from momtitan.train.data import open_source

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["TRAIN 0", "TRAIN 1"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["HELD 0"]})}).save_to_disk(str(saved))
    files = tmp_path / "files"
    for split, text in (("train", "TRAIN"), ("validation", "HELD")):
        (files / split).mkdir(parents=True)
        (files / split / "part.jsonl").write_text(f'{{"text": "{text} 0"}}\n')
    for path in (saved, files):
        train = open_source("local", str(path))
        held = open_source("local", str(path), split="validation", section="validation")
        assert all(t.startswith("TRAIN") for t in train["text"]), path
        assert [t for t in held["text"]] == ["HELD 0"], path
    with pytest.raises(ValueError, match=r"validation.dataset_path .* holds train/validation folders, no 'test' folder"):
        open_source("local", str(files), split="test", section="validation")
    one_file = files / "train" / "part.jsonl"  # a single file is the same text for any split
    assert open_source("local", str(one_file), split="validation")["text"] == ["TRAIN 0"]
    # folders named otherwise, or only one of the two, are plain folders: every file, for both splits
    plain = tmp_path / "plain"
    for sub, text in (("shards", "A"), ("test", "B")):
        (plain / sub).mkdir(parents=True)
        (plain / sub / "part.jsonl").write_text(f'{{"text": "{text}"}}\n')
    for split in ("train", "validation"):
        assert sorted(open_source("local", str(plain), split=split)["text"]) == ["A", "B"]


def test_a_text_file_holds_a_document_per_paragraph(cache_dir, tmp_path):
    """Paragraphs, not lines (a line per document cut sentences apart and dropped the newlines), and not
    one document per file (a corpus kept as one file must still shard over ranks and workers)."""
    from momtitan.train.data import open_source

    path = tmp_path / "story.txt"
    path.write_text("Once upon a time\nthere was a river.\n\nThe end.\n")
    assert [t.strip() for t in open_source("local", str(path))["text"]] == ["Once upon a time\nthere was a river.", "The end."]


def test_hub_config_names_keep_their_case_and_errors_name_the_section(cache_dir, tmp_path, monkeypatch):
    import datasets

    from momtitan.train import data

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: asked.append((a, kw)) or [])
    data.open_source("hf:HuggingFaceFW/fineweb-edu:CC-MAIN-2024-10", None)
    data.open_source("FineWeb_Edu", None)
    data.open_source("c4_validation", None, section="validation")  # torchtitan's default validation.dataset
    assert [(a[0], kw["name"], kw["split"]) for a, kw in asked] == [
        ("HuggingFaceFW/fineweb-edu", "CC-MAIN-2024-10", "train"), ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train"),
        ("allenai/c4", "en", "validation")]
    with pytest.raises(ValueError, match=r"^validation.dataset 'synthetic' is generated and takes no dataset_path"):
        data.open_source("synthetic", str(tmp_path), split="validation", section="validation")
    with pytest.raises(ValueError, match=r"^unknown validation.dataset 'nope'"):
        data.open_source("nope", None, split="validation", section="validation")


def test_a_stream_resumed_after_it_relooped_continues_where_it_was(cache_dir):
    """`datasets` applies a saved stream position only in the epoch it was saved in: a resume after a
    re-loop (a later epoch) used to start the stream over from its first document."""
    import datasets

    from momtitan.train.data import PackedDocuments
    from momtitan.train.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    docs = datasets.Dataset.from_dict({"text": [f"doc {i} " + "word " * 12 for i in range(8)]})

    def packed():
        return PackedDocuments(docs.to_iterable_dataset(num_shards=4), tok, seq_len=16)

    source = packed()
    it = iter(source)
    for _ in range(12):  # past the first epoch's documents
        next(it)
    state = source.state_dict()
    assert state["data"]["epoch"] >= 1
    expected = [next(it)[1].tolist() for _ in range(6)]
    resumed = packed()
    resumed.load_state_dict(state)
    assert [r[1].tolist() for _, r in zip(range(6), resumed)] == expected


def test_memory_load_is_named_by_block_index_in_hybrid_models():
    from momtitan.train.loss import RouterStats

    stats = RouterStats(layer_ids=(1, 3))
    stats.add(torch.tensor(4.0), torch.tensor(1.0), torch.tensor(4), torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    metrics = stats.summarize(stats.pop(), stats.load_shape, stats.layer_ids)
    assert metrics["memory_load/layer1/mem0"] == 0.5 and metrics["memory_load/layer3/max_share"] == 0.75
    assert not any(k.startswith(("memory_load/layer0/", "memory_load/layer2/")) for k in metrics)
