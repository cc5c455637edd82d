"""Checkpoint conversion: DCP -> HF (momtitan / fla format) -> DCP, errors, sources untouched, fla parity (GPU)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from momtitan.config import get_flavor
from momtitan.hf.convert import (
    dcp_to_hf, hf_to_dcp, load_model, main_dcp_to_hf, main_hf_to_dcp, read_dcp, read_hf, resolve_args,
)
from momtitan.hf.state_dict_adapter import MoMStateDictAdapter, args_from_fla_config, fla_config, from_fla, to_fla
from momtitan.model import MoMTransformer
from tests.conftest import assert_close

VOCAB = 2048


def tiny(**changes):
    args = get_flavor("debug").replace(**changes)
    model = MoMTransformer(args)
    model.init_weights()
    return args, model.eval()


def save_training_checkpoint(folder: Path, model, step: int) -> Path:
    """A torchtitan-like full checkpoint: flattened model keys plus non-model state."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["optimizer"] = {"state": {"layers.0.mixer.q_proj.weight": {"exp_avg": torch.randn(3)}}}
    state["train_state"] = {"step": step}
    path = folder / f"step-{step}"
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt,tie", [("momtitan", False), ("momtitan", True), ("fla", False), ("fla", True)])
def test_dcp_to_hf_to_dcp_round_trip_is_identical(tmp_path, fmt, tie):
    args, model = tiny(tie_word_embeddings=tie)
    ckpt = tmp_path / "checkpoint"
    save_training_checkpoint(ckpt, model, 10)
    source_hash = tree_hash(ckpt)

    hf = dcp_to_hf(ckpt, tmp_path / "hf", args, fmt=fmt, tokenizer="builtin")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in hf.iterdir()}
    back = hf_to_dcp(hf, tmp_path / "dcp" / "step-0")
    assert tree_hash(ckpt) == source_hash  # the source checkpoint is untouched

    restored = read_dcp(back, args)
    original = model.state_dict()
    assert set(restored) == set(original)
    for key, value in original.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key

    # the HF folder loads as a MoMForCausalLM with the same logits
    tokens = torch.randint(0, VOCAB, (2, 9))
    assert_close("logits", load_model(hf)(tokens).logits, model(tokens).logits, 1e-6)
    # a full round trip of the HF folder through hf_to_dcp -> dcp_to_hf is byte-identical in tensors
    hf2 = dcp_to_hf(back, tmp_path / "hf2", args, fmt=fmt)
    with safe_open(str(hf / "model.safetensors"), "pt") as a, safe_open(str(hf2 / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_fla_layout():
    args, model = tiny(tie_word_embeddings=True)
    sd = model.state_dict()
    fla = to_fla(sd, args)
    K, V, D, W = args.key_dim, args.value_dim, args.hidden_size, args.conv_size
    assert "lm_head.weight" not in fla and "model.embeddings.weight" in fla
    layer = "model.layers.1.attn."
    for m in range(args.num_memories):
        assert torch.equal(fla[f"{layer}k_proj.{m}.weight"], sd["layers.1.mixer.memories.k_proj"][m])
        assert fla[f"{layer}v_proj.{m}.weight"].shape == (V, D)
        assert fla[f"{layer}b_proj.{m}.weight"].shape == (args.num_heads, D)
        assert torch.equal(fla[f"{layer}a_proj.{m}.weight"], sd["layers.1.mixer.memories.a_proj"][m])
    conv = sd["layers.1.mixer.conv_weight"]
    assert torch.equal(fla[f"{layer}q_conv1d.weight"], conv[:K, None])
    assert torch.equal(fla[f"{layer}k_conv1d.weight"], conv[K:2 * K, None])
    assert torch.equal(fla[f"{layer}v_conv1d.weight"], conv[2 * K:, None])
    assert fla[f"{layer}q_conv1d.weight"].shape == (K, 1, W)
    assert torch.equal(fla[f"{layer}gate.weight"], sd["layers.1.mixer.router.weight"])
    assert torch.equal(fla["model.layers.0.attn_norm.weight"], sd["layers.0.mixer_norm.weight"])
    assert torch.equal(fla["model.layers.0.mlp.down_proj.weight"], sd["layers.0.mlp.down_proj.weight"])
    for name in ("shared_k.weight", "shared_a.weight", "A_log", "dt_bias", "o_norm.weight", "g_proj.weight"):
        assert layer + name in fla
    back = from_fla(fla, args)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    cfg = fla_config(args)
    assert cfg["model_type"] == "mom" and cfg["tie_word_embeddings"] is True and cfg["shared_mem"] is True
    assert args_from_fla_config(cfg).replace(attn_num_heads=args.attn_num_heads) == args  # attention fields: n/a
    adapter = MoMStateDictAdapter(args, None, fmt="fla")
    assert set(adapter.from_hf(adapter.to_hf(sd))) == set(sd)


def test_fla_cannot_represent_raises():
    for changes, match in [({"memory_rule": "delta"}, "memory_rule"), ({"attn_layers": (1,)}, "attn_layers"),
                           ({"qk_l2norm": False}, "qk_l2norm")]:
        args = get_flavor("debug").replace(**changes)
        with pytest.raises(ValueError, match=match):
            fla_config(args)
        with pytest.raises(ValueError, match=match):
            MoMStateDictAdapter(args, None, fmt="fla")
    cfg = fla_config(get_flavor("debug"))
    for key, value in [("single_kv_proj", True), ("use_output_gate", False), ("attn", {"layers": [1]}),
                       ("mom_backend", "gla")]:
        with pytest.raises(ValueError, match=key):
            args_from_fla_config({**cfg, key: value})


def test_errors_for_bad_paths_steps_configs_and_outputs(tmp_path):
    args, model = tiny()
    ckpt = tmp_path / "checkpoint"
    save_training_checkpoint(ckpt, model, 5)
    save_training_checkpoint(ckpt, model, 20)
    source_hash = tree_hash(ckpt)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        dcp_to_hf(tmp_path / "nowhere", tmp_path / "out", args)
    with pytest.raises(FileNotFoundError, match=r"step 7 not found.*\[5, 20\]"):
        dcp_to_hf(ckpt, tmp_path / "out", args, step=7)
    with pytest.raises(ValueError, match="does not match the model config"):
        dcp_to_hf(ckpt, tmp_path / "out", args.replace(num_memories=8))
    with pytest.raises(ValueError, match="hidden_size|shape"):
        dcp_to_hf(ckpt, tmp_path / "out", args.replace(hidden_size=128, intermediate_size=None))
    with pytest.raises(ValueError, match="unexpected"):
        dcp_to_hf(ckpt, tmp_path / "out", args.replace(num_hidden_layers=1))
    with pytest.raises(ValueError, match="must not be"):
        dcp_to_hf(ckpt, ckpt / "hf", args)  # inside the source
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        dcp_to_hf(ckpt, tmp_path / "out", args, tokenizer=tmp_path / "no_tokenizer")
    assert not (tmp_path / "out").exists()  # failed conversions leave nothing behind

    hf = dcp_to_hf(ckpt, tmp_path / "hf", args, step=5)
    with pytest.raises(FileExistsError, match="not empty"):
        dcp_to_hf(ckpt, hf, args)
    dcp_to_hf(ckpt, hf, args, overwrite=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_to_dcp(tmp_path, tmp_path / "dcp")
    with pytest.raises(ValueError, match="must not be"):
        hf_to_dcp(hf, tmp_path, overwrite=True)  # would delete the source
    cfg = json.loads((hf / "config.json").read_text())
    bad = tmp_path / "bad_hf"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "num_memories": 8}))
    (bad / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        read_hf(bad)
    assert tree_hash(ckpt) == source_hash


def test_command_lines_and_config_sources(tmp_path):
    args, model = tiny(num_memories=8, topk=3, vocab_size=1024)
    ckpt = tmp_path / "run" / "checkpoint"
    save_training_checkpoint(ckpt, model, 3)
    job = tmp_path / "job.toml"
    job.write_text('[model]\nflavor = "debug"\n\n[mom]\nnum_memories = 8\ntopk = 3\n\n[training]\nseq_len = 256\n')
    # vocab_size comes from the checkpoint, as training takes it from the tokenizer
    assert main_dcp_to_hf([str(ckpt), str(tmp_path / "hf"), "--job-config", str(job), "--format", "fla"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 1024
    assert main_hf_to_dcp([str(tmp_path / "hf"), str(tmp_path / "dcp")]) == 0
    restored = read_dcp(tmp_path / "dcp", args)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())

    assert resolve_args(flavor="debug", overrides=["num_memories=8", "topk=3", "vocab_size=1024"]) == args
    from_fla_json = resolve_args(config=tmp_path / "hf" / "config.json")
    assert from_fla_json.replace(attn_num_heads=args.attn_num_heads) == args  # fla has no attention fields
    (tmp_path / "args.json").write_text(json.dumps(args.to_dict()))
    assert resolve_args(config=tmp_path / "args.json") == args
    with pytest.raises(ValueError, match="unknown model fields"):
        resolve_args(flavor="debug", overrides=["num_memory=8"])
    with pytest.raises(ValueError, match="flavor"):
        resolve_args(flavor="huge")
    with pytest.raises(SystemExit):
        main_dcp_to_hf([str(ckpt), str(tmp_path / "x")])  # no config source


@pytest.mark.gpu
@pytest.mark.parametrize("T", [40, 150])  # fla: fused_recurrent (T <= 64) and chunk mode
def test_fla_parity_eval_logits(tmp_path, T):
    """Export to fla's format, load `fla.models.MomForCausalLM`, compare eval logits."""
    fla_models = pytest.importorskip("fla.models")
    args, model = tiny(tie_word_embeddings=True, num_hidden_layers=3, head_dim=64, num_heads=2)
    ckpt = tmp_path / "ckpt"
    save_training_checkpoint(ckpt, model, 1)
    hf = dcp_to_hf(ckpt, tmp_path / "fla", args, fmt="fla")
    theirs = fla_models.MomForCausalLM.from_pretrained(hf, dtype=torch.float32).cuda().eval()
    ours = model.cuda()
    tokens = torch.randint(0, VOCAB, (2, T), device="cuda")
    with torch.no_grad():
        expected = theirs(input_ids=tokens, use_cache=False).logits.float()
        actual = ours(tokens).logits.float()
    assert_close("fla vs momtitan logits", actual, expected, 2e-3)


@pytest.mark.parametrize("fmt", ["momtitan", "fla"])
def test_load_model_keeps_the_stored_dtype_and_fp32_decay(tmp_path, fmt):
    """A bf16 folder loads as bf16 when no dtype is given (as stored); A_log and dt_bias stay fp32
    in either format, with or without a dtype."""
    args, model = tiny()
    ckpt = tmp_path / "checkpoint"
    save_training_checkpoint(ckpt, model, 1)
    hf = dcp_to_hf(ckpt, tmp_path / "hf", args, fmt=fmt, dtype=torch.bfloat16)
    for dtype, expected in ((None, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        loaded = load_model(hf, dtype=dtype)
        params = dict(loaded.model.named_parameters())
        assert params["tok_embeddings.weight"].dtype == expected, dtype
        assert params["layers.0.mixer.A_log"].dtype == params["layers.0.mixer.dt_bias"].dtype == torch.float32, dtype
    fp32 = dcp_to_hf(ckpt, tmp_path / "hf32", args, fmt=fmt)
    assert load_model(fp32).model.tok_embeddings.weight.dtype == torch.float32


@pytest.mark.parametrize("fmt", ["momtitan", "fla"])
def test_load_model_in_a_low_precision_keeps_the_decay_parameters_exact(tmp_path, fmt):
    """A fp32 folder loaded in bf16: A_log and dt_bias are the stored fp32 values (they were rounded
    through bf16 for fla folders), the other weights rounded once."""
    args, model = tiny()
    ckpt = tmp_path / "checkpoint"
    save_training_checkpoint(ckpt, model, 1)
    loaded = load_model(dcp_to_hf(ckpt, tmp_path / "hf", args, fmt=fmt), dtype=torch.bfloat16)
    params, stored = dict(loaded.model.named_parameters()), model.state_dict()
    for name in ("layers.0.mixer.A_log", "layers.0.mixer.dt_bias"):
        assert torch.equal(params[name], stored[name]), name
    assert torch.equal(params["tok_embeddings.weight"], stored["tok_embeddings.weight"].bfloat16())


def test_outputs_get_a_normal_folder_mode(tmp_path):
    """Converted folders follow the umask like any new folder (mkdtemp's are private, 0700)."""
    import os

    args, model = tiny()
    ckpt = tmp_path / "checkpoint"
    save_training_checkpoint(ckpt, model, 1)
    umask = os.umask(0o022)
    try:
        hf = dcp_to_hf(ckpt, tmp_path / "hf", args)
        back = hf_to_dcp(hf, tmp_path / "dcp")
    finally:
        os.umask(umask)
    assert (hf.stat().st_mode & 0o777) == (back.stat().st_mode & 0o777) == 0o755


def test_the_tokenizer_sets_bos_eos_and_padding(tmp_path):
    """The exported ids are the run's tokenizer's (training ends documents with its EOS), unless
    overridden; the written tokenizer pads (EOS as pad, on the left) so a batch of prompts tokenizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    vocab = {"</s>": 0, "<s>": 1, "!": 2, "a": 3, "b": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="!"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    args = resolve_args(flavor="debug", tokenizer=folder)
    assert (args.bos_token_id, args.eos_token_id) == (1, 0)
    assert resolve_args(flavor="debug", tokenizer=folder, overrides=["eos_token_id=4"]).eos_token_id == 4
    assert resolve_args(flavor="debug").eos_token_id == 2  # no tokenizer: the config's default

    _, model = tiny()
    ckpt = tmp_path / "checkpoint"
    save_training_checkpoint(ckpt, model, 1)
    hf = dcp_to_hf(ckpt, tmp_path / "hf", args, tokenizer=str(folder))
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == 0
    assert json.loads((folder / "tokenizer_config.json").read_text()).get("pad_token") is None  # source untouched
    loaded = AutoTokenizer.from_pretrained(str(hf))
    batch = loaded(["a b a", "b"], padding=True, return_tensors="pt")
    assert batch.input_ids.tolist()[1] == [0, 0, 4] and batch.attention_mask.tolist()[1] == [0, 0, 1]


def test_an_exported_hf_folder_is_not_taken_for_a_checkpoint_step_and_odd_tokenizers_keep_the_ids(tmp_path):
    """An HF export holds safetensors like a --checkpoint.last_save_in_hf step, but its config.json
    defines the model: the DCP->HF converter refuses it instead of re-reading it under the command
    line's flavor. A tokenizer torchtitan cannot read (tokenizer.model only) leaves the ids as configured."""
    args, model = tiny()
    ckpt = tmp_path / "checkpoint"
    save_training_checkpoint(ckpt, model, 1)
    hf = dcp_to_hf(ckpt, tmp_path / "hf", args)
    with pytest.raises(FileNotFoundError, match=r"it is an exported HF folder: it has a config.json"):
        main_dcp_to_hf([str(hf), str(tmp_path / "again"), "--flavor", "debug"])
    sp = tmp_path / "sp"
    sp.mkdir()
    (sp / "tokenizer.model").write_bytes(b"not read")
    assert resolve_args(flavor="debug", tokenizer=str(sp)).eos_token_id == get_flavor("debug").eos_token_id
