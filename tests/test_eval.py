"""lm-eval glue (momtitan/eval/harness.py): HF folder and DCP input, tables, errors, and that lm-eval's
scores equal the model's own log-likelihoods. CPU, offline: the tasks are local stand-ins for the
paper's (tests/assets/lm_eval), shadowing the built-in names through include_path."""

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from momtitan.config import get_flavor  # noqa: E402
from momtitan.eval import harness  # noqa: E402
from momtitan.hf import MoMConfig, MoMForCausalLM  # noqa: E402
from momtitan.train.tokenizer import builtin_tokenizer_dir  # noqa: E402

ASSETS = Path(__file__).parent / "assets" / "lm_eval"
LOCAL_TASKS = ["wikitext", "lambada_standard", "arc_easy", "squad_completion"]
MAX_LEN = 64  # short, so wikitext pages need several rolling windows and lambada contexts fit
COMMONSENSE_HEADER = "| Model | Wiki ppl | LMB ppl | ARC-e | ARC-c | Hella | LMB acc | PIQA | Wino | Avg |"
RECALL_HEADER = "| Model | FDA | SWDE | SQuAD | Avg |"


def n_lines(name: str) -> int:
    return sum(1 for line in (ASSETS / f"{name}.jsonl").read_text().splitlines() if line.strip())


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny MoMForCausalLM saved as an HF folder with the built-in tokenizer."""
    torch.manual_seed(0)
    args = get_flavor("debug").replace(max_seq_len=MAX_LEN)
    model = MoMForCausalLM(MoMConfig.from_model_args(args)).eval()
    folder = tmp_path_factory.mktemp("models") / "tiny_hf"
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir())
    tokenizer.save_pretrained(folder)
    return {"args": args, "model": model, "tokenizer": tokenizer, "hf": folder}


@pytest.fixture(scope="module")
def manager():
    return harness.task_manager(ASSETS)  # built once: lm-eval's task index takes seconds


def table_row(markdown: str, header: str) -> dict[str, str]:
    lines = markdown.splitlines()
    i = lines.index(header)
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in lines[i + 2].strip("|").split("|")]
    assert len(cells) == len(names), lines[i + 2]
    return dict(zip(names, cells))


def test_hf_folder_end_to_end_writes_paper_tables(tiny, manager, tmp_path):
    out = tmp_path / "out"
    summary = harness.evaluate(tiny["hf"], tasks=LOCAL_TASKS, include_path=ASSETS, output_dir=out, batch_size=8,
                               bootstrap_iters=0, manager=manager)
    md = (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert summary["files"] == {"json": str(out / "results.json"), "markdown": str(out / "results.md")}

    row = table_row(md, COMMONSENSE_HEADER)
    assert row["Model"] == "tiny_hf"
    for column in ("Wiki ppl", "LMB ppl", "ARC-e", "LMB acc"):
        assert math.isfinite(float(row[column])), (column, row[column])
    for column in ("ARC-c", "Hella", "PIQA", "Wino", "Avg"):  # tasks not run: no number, no partial average
        assert row[column] == "–"
    recall = table_row(md, RECALL_HEADER)
    assert 0.0 <= float(recall["SQuAD"]) <= 100.0 and recall["FDA"] == recall["Avg"] == "–"

    # the tables are lm-eval's metrics, mapped as in the paper (accuracies in %)
    results = saved["lm_eval"]["results"]
    table = saved["tables"]["commonsense"]
    assert table["Wiki ppl"] == pytest.approx(results["wikitext"]["word_perplexity,none"])
    assert table["LMB ppl"] == pytest.approx(results["lambada_standard"]["perplexity,none"])
    assert table["ARC-e"] == pytest.approx(100 * results["arc_easy"]["acc,none"])
    assert table["LMB acc"] == pytest.approx(100 * results["lambada_standard"]["acc,none"])
    assert saved["tables"]["recall"]["SQuAD"] == pytest.approx(100 * results["squad_completion"]["contains,none"])
    assert table["LMB ppl"] > 1.0 and table["Wiki ppl"] > 1.0
    # every document of the local data was scored, with the paper's settings
    assert saved["n_samples"] == {t: n_lines(t) for t in LOCAL_TASKS}
    assert saved["settings"]["num_fewshot"] == 0 and saved["settings"]["dtype"] == "float32"
    assert saved["settings"]["max_length"] == MAX_LEN and saved["kind"] == "hf"


def test_dcp_step_matches_hf_folder_and_leaves_source_untouched(tiny, manager, tmp_path, monkeypatch, capsys):
    model = tiny["model"]
    run = tmp_path / "run"
    state = {k: v.clone() for k, v in model.model.state_dict().items()}  # MoMTransformer keys, as torchtitan saves
    state["optimizer"] = {"state": {"layers.0.mixer.q_proj.weight": {"exp_avg": torch.randn(3)}}}
    state["train_state"] = {"step": 7}
    dcp.save(state, checkpoint_id=str(run / "checkpoint" / "step-7"), no_dist=True)
    source = tree_hash(run / "checkpoint")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the temporary HF folder goes

    # the CLI on the checkpoint folder: latest step, model from a flavor + override, default output folder
    monkeypatch.setattr(harness, "task_manager", lambda include_path=None: manager)
    code = harness.main([str(run / "checkpoint"), "--flavor", "debug", "--set", f"max_seq_len={MAX_LEN}",
                         "--tokenizer", "builtin", "--tasks", "lambada_standard,arc_easy", "--limit", "6",
                         "--include-path", str(ASSETS), "--batch-size", "4", "--bootstrap-iters", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert COMMONSENSE_HEADER in printed
    out = run / "eval" / "step-7"
    dcp_run = json.loads((out / "results_limit6.json").read_text())
    assert dcp_run["kind"] == "dcp" and dcp_run["name"] == "run/step-7"
    assert dcp_run["n_samples"] == {"lambada_standard": 6, "arc_easy": 6}
    assert tree_hash(run / "checkpoint") == source  # the source is only read
    assert list(scratch.iterdir()) == []  # the temporary HF folder is gone

    # same weights as the HF folder: the same scores
    hf_run = harness.evaluate(tiny["hf"], tasks=["lambada_standard", "arc_easy"], include_path=ASSETS, limit=6,
                              batch_size=4, bootstrap_iters=0, manager=manager, write=False)
    for task, metric in (("lambada_standard", "perplexity,none"), ("lambada_standard", "acc,none"),
                         ("arc_easy", "acc,none"), ("arc_easy", "acc_norm,none")):
        assert dcp_run["lm_eval"]["results"][task][metric] == pytest.approx(
            hf_run["lm_eval"]["results"][task][metric], rel=1e-6), (task, metric)


def test_bad_paths_options_and_tasks_raise_clear_errors(tiny, manager, tmp_path):
    hf = tiny["hf"]
    with pytest.raises(FileNotFoundError, match="checkpoint path not found"):
        harness.evaluate(tmp_path / "nowhere", tasks="arc_easy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face folder"):
        harness.evaluate(tmp_path / "empty", tasks="arc_easy")
    with pytest.raises(ValueError, match="unknown lm-eval task.*'arc_esay'.*did you mean arc_easy"):
        harness.evaluate(hf, tasks="arc_esay,wikitext", manager=manager)
    with pytest.raises(ValueError, match="unknown lm-eval task.*'no_such_task_xyz'"):
        harness.check_tasks(harness.resolve_tasks("paper,no_such_task_xyz"), manager)
    with pytest.raises(FileNotFoundError, match="include path"):
        harness.evaluate(hf, tasks="arc_easy", include_path=tmp_path / "no_tasks_here")
    with pytest.raises(ValueError, match="limit"):
        harness.evaluate(hf, tasks="arc_easy", limit=0)
    with pytest.raises(ValueError, match="Hugging Face folder.*only to DCP"):
        harness.evaluate(hf, tasks="arc_easy", step=3)
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((hf / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        harness.evaluate(no_tok, tasks="arc_easy")

    step = tmp_path / "ckpt" / "step-1"
    dcp.save({k: v.clone() for k, v in tiny["model"].model.state_dict().items()}, checkpoint_id=str(step), no_dist=True)
    with pytest.raises(ValueError, match="holds no model config"):
        harness.evaluate(step, tasks="arc_easy", tokenizer="builtin")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        harness.evaluate(step, tasks="arc_easy", flavor="debug")
    with pytest.raises(FileNotFoundError, match=r"step 5 not found.*\[1\]"):
        harness.evaluate(step.parent, tasks="arc_easy", step=5, flavor="debug", tokenizer="builtin")
    with pytest.raises(FileNotFoundError, match="job_config file not found"):
        harness.evaluate(step, tasks="arc_easy", job_config=tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="does not match the model config"):  # wrong model for the weights
        with harness.open_checkpoint(step, flavor="debug", overrides=["num_memories=8"], tokenizer="builtin"):
            pass

    assert harness.resolve_tasks(None) == list(harness.COMMONSENSE_TASKS + harness.RECALL_TASKS)
    assert harness.resolve_tasks(["recall", "piqa,fda"]) == ["fda", "swde", "squad_completion", "piqa"]


def by_hand(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """Sum of log p(continuation | context) from one unpadded forward of the model, in fp64."""
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits[0].double()
    logp = F.log_softmax(logits, dim=-1)
    positions = range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1)
    total = sum(logp[p, t].item() for p, t in zip(positions, continuation_ids))
    greedy = all(logits[p].argmax().item() == t for p, t in zip(positions, continuation_ids))
    return total, greedy


def test_lm_eval_scores_equal_the_models_log_likelihood(tiny):
    model, tok = tiny["model"], tiny["tokenizer"]
    lm = harness.build_lm(model, tok, batch_size=4)
    assert lm.max_length == MAX_LEN
    pairs = [("The cat sat on the", " mat"), ("Rain fell all afternoon, so the game was moved", " indoors to the gym"),
             ("He poured", " the hot coffee into his mug"), ("A", " b"),
             ("She planted tomatoes in the spring and by late summer the garden was full of", " fruit")]
    requests = [Instance("loglikelihood", {}, pair, idx=0) for pair in pairs]
    got = lm.loglikelihood(requests)  # one right-padded batch of 4 and one of 1, sorted by length
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx = tok(context)["input_ids"]
        whole = tok(context + continuation)["input_ids"]
        assert whole[:len(ctx)] == ctx  # the split is unambiguous for these strings
        expected, expected_greedy = by_hand(model, ctx, whole[len(ctx):])
        assert logprob == pytest.approx(expected, abs=1e-4, rel=1e-5), (context, continuation)
        assert greedy == expected_greedy

    # rolling log-likelihood (wikitext): a text shorter than the window, and one needing several windows
    short = "The library was quiet except for the sound of turning pages."
    long = json.loads((ASSETS / "wikitext.jsonl").read_text().splitlines()[0])["page"]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), idx=0) for text in (short, long)])
    for text, logprob in zip((short, long), got):
        ids = tok(text)["input_ids"]
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=ids, prefix_token=tok.bos_token_id, max_seq_len=MAX_LEN, context_len=1)]
        assert sum(len(cont) for _, cont in windows) == len(ids)
        if text is short:
            assert windows == [([tok.bos_token_id], ids)]
        else:
            assert len(windows) > 1
        expected = sum(by_hand(model, ctx, cont)[0] for ctx, cont in windows)
        assert logprob == pytest.approx(expected, abs=1e-3, rel=1e-5), text[:30]


def test_lm_eval_generation_equals_unpadded_greedy_generation(tiny):
    model, tok = tiny["model"], tiny["tokenizer"]
    lm = harness.build_lm(model, tok, batch_size=3)
    prompts = ["The capital of the island is", "Once upon a time there was a very old dog who", "Hello"]
    gen = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (p, dict(gen)), idx=0) for p in prompts])
    for prompt, text in zip(prompts, got):  # the batch was left-padded; each prompt alone is not
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert text == expected, prompt


def test_all_metrics_keep_every_filter():
    """A task reporting one metric under several filters (gsm8k: strict-match, flexible-extract) keeps
    each value, labelled with its filter; the usual filter "none" keeps the bare metric name."""
    from momtitan.eval.harness import _all_metrics

    results = {"results": {"gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
                                     "exact_match,flexible-extract": 0.3, "exact_match_stderr,flexible-extract": 0.02,
                                     "alias": "gsm8k"},
                           "piqa": {"acc,none": 0.6, "acc_stderr,none": 0.05}}}
    assert _all_metrics(results) == {
        "gsm8k": {"exact_match (strict-match)": (0.1, 0.01), "exact_match (flexible-extract)": (0.3, 0.02)},
        "piqa": {"acc": (0.6, 0.05)},
    }
