"""Tests for notebooks/helpers/model.py, on CPU, with the tiny NemotronH (no download, no GPU)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import PeftModel

import train
from helpers import model as mh
from helpers.config import TrainConfig
from recipe import offline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model folder built once for this file (tokenizer trained on data/sample)."""
    return offline.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny(tiny_dir):
    """A fresh (model, tokenizer) pair loaded from the tiny folder."""
    return train.load_model(tiny_dir)


def batch(tokenizer):
    """A short padded batch shaped like the tutorial's prompts."""
    texts = ["Question: Which nerve supplies the deltoid? Answer: A", "Answer: B. Radial nerve"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def add_lora(model, r=4, routed_experts=False, init_lora_weights=True, **changes):
    """The tutorial's LoRA (train.lora_config, as notebook 03 builds it) on `model`; init_lora_weights=False
    starts lora_B away from zero so that A gets gradients too."""
    from peft import get_peft_model

    config = train.lora_config(TrainConfig(lora_r=r, lora_alpha=2 * r, routed_experts=routed_experts, **changes))
    config.init_lora_weights = init_lora_weights
    mh.check_lora_targets(config)
    return get_peft_model(model, config)


def lora_parameters(peft_model):
    """Every lora_A / lora_B weight, by name."""
    return {n: p for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n}


# --- the real architecture ---------------------------------------------------------------------


def test_real_config_has_31_58b_parameters_and_about_3_6b_active():
    from transformers import NemotronHForCausalLM

    config = offline.nemotron_nano_config()
    assert config.layers_block_type.count("linear_attention") == 23
    assert config.layers_block_type.count("moe") == 23
    assert config.layers_block_type.count("full_attention") == 6
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    counts = mh.count_parameters(model)
    print("\n" + mh.parameter_table(counts))
    assert round(counts["total"] / 1e9, 2) == 31.58
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    parts = {k: v for k, v in counts.items() if k not in ("total", "active_per_token")}
    assert sum(parts.values()) == counts["total"] and counts["other"] == 0
    assert 3.0e9 < counts["active_per_token"] < 4.0e9


# --- tiny model and tokenizer ------------------------------------------------------------------


def test_tiny_model_saves_reloads_and_runs(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "nemotron_h"
    assert {"linear_attention", "moe", "full_attention"} <= set(model.config.layers_block_type)
    assert model.config.n_routed_experts > model.config.num_experts_per_tok
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    inputs = batch(tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()
    counts = mh.count_parameters(model)
    for block in ("mamba", "attention", "routed_experts", "shared_experts", "router"):
        assert counts[block] > 0, block
    weights = next(tiny_dir.glob("*.safetensors")).stat().st_mtime_ns
    assert offline.build_tiny_model(tiny_dir) == tiny_dir  # reused, not rebuilt
    assert next(tiny_dir.glob("*.safetensors")).stat().st_mtime_ns == weights


@pytest.mark.parametrize("vocab_size", [2048, 262])  # 262: no room for merges, added tokens step in
def test_answer_letters_are_single_tokens(vocab_size):
    tokenizer = offline.train_tiny_tokenizer(offline.FALLBACK_TEXTS, vocab_size=vocab_size)
    letter_ids = [tokenizer.encode(t, add_special_tokens=False) for t in offline.ANSWER_TOKENS]
    assert all(len(ids) == 1 for ids in letter_ids), letter_ids
    ids = tokenizer.encode("Answer: B. text", add_special_tokens=False)
    assert letter_ids[1][0] in ids
    assert tokenizer.decode(ids) == "Answer: B. text"
    assert tokenizer.decode(tokenizer.encode(" About Bob", add_special_tokens=False)) == " About Bob"


def test_sample_texts_reads_medmcqa_rows(tmp_path):
    row = '{"id": "x", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0, "exp": null}'
    (tmp_path / "train.jsonl").write_text(row + "\n")
    assert offline.sample_texts(tmp_path) == ["Q?", "a", "b", "c", "d"]
    assert offline.sample_texts(tmp_path / "missing") == offline.FALLBACK_TEXTS


# --- LoRA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["out_proj", "conv1d"])
def test_lora_targets_that_would_be_bypassed_are_refused(target):
    config = train.lora_config(TrainConfig())
    config.target_modules = {"q_proj", target}
    with pytest.raises(ValueError, match=target):
        mh.check_lora_targets(config)
    with pytest.raises(ValueError, match="dropout"):
        mh.check_lora_targets(train.lora_config(TrainConfig(routed_experts=True, lora_dropout=0.05)))
    mh.check_lora_targets(train.lora_config(TrainConfig(routed_experts=True)))


def test_fused_mamba_kernel_reads_out_proj_weight_directly(tiny, monkeypatch):
    """Why out_proj is refused: with mamba_ssm, training never calls the out_proj module."""
    from transformers.models.nemotron_h import modeling_nemotron_h

    model, tokenizer = tiny
    weights_seen, out_proj_calls = [], []

    def fake_fused_kernel(zxbcdt, *args, outproj_weight=None, outproj_bias=None, **kwargs):
        weights_seen.append(outproj_weight)  # mamba_ssm applies it inside its own kernel
        return torch.nn.functional.linear(zxbcdt[..., : outproj_weight.shape[1]], outproj_weight)

    monkeypatch.setattr(modeling_nemotron_h, "mamba2_split_conv1d_scan_combined", fake_fused_kernel)
    mixers = [layer.mixer for layer in model.model.layers if layer.block_type == "linear_attention"]
    for mixer in mixers:
        mixer.out_proj.register_forward_hook(lambda *args: out_proj_calls.append(1))
    model.train()
    model(**batch(tokenizer), use_cache=False)
    assert [id(w) for w in weights_seen] == [id(m.out_proj.weight) for m in mixers]
    assert out_proj_calls == []  # a LoRA wrapper around out_proj would never run


@pytest.mark.parametrize("routed_experts", [False, True])
def test_lora_wraps_the_intended_modules(tiny, routed_experts):
    from peft.tuners.lora.layer import ParamWrapper

    model, _ = tiny
    peft_model = add_lora(model, routed_experts=routed_experts)
    names = peft_model.targeted_module_names + peft_model.targeted_parameter_names  # as notebook 02 lists them
    print(names)
    suffixes = {name.split(".mixer.")[1] for name in names}
    attention_and_mamba = {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj"}
    expected = attention_and_mamba | {"shared_experts.up_proj", "shared_experts.down_proj"}
    routed = {"experts.up_proj", "experts.down_proj"}
    assert suffixes == (expected | routed if routed_experts else expected)
    wrappers = [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == (2 * model.config.layers_block_type.count("moe") if routed_experts else 0)
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert 0 < trainable < total / 2


@pytest.mark.parametrize("routed_experts", [False, True])
def test_every_lora_parameter_gets_a_gradient(tiny, routed_experts):
    """A silently bypassed adapter would keep a zero (or missing) gradient here."""
    model, tokenizer = tiny
    peft_model = add_lora(model, routed_experts=routed_experts, init_lora_weights=False)
    peft_model.train()
    inputs = batch(tokenizer)
    peft_model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
    params = lora_parameters(peft_model)
    assert len(params) == 2 * len(peft_model.targeted_module_names + peft_model.targeted_parameter_names)
    no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_dir):
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = train.load_model(tiny_dir)
        torch.manual_seed(0)
        peft_model = add_lora(model, routed_experts=True, init_lora_weights=False)
        if checkpointing:
            peft_model.gradient_checkpointing_enable()
        peft_model.train()
        inputs = batch(tokenizer)
        peft_model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in lora_parameters(peft_model).items()})
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_merge_and_adapter_round_trip_keep_the_logits(tiny_dir, tmp_path):
    model, tokenizer = train.load_model(tiny_dir)
    torch.manual_seed(0)
    peft_model = add_lora(model, routed_experts=True, init_lora_weights=False)
    peft_model.eval()
    inputs = batch(tokenizer)
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        peft_model.save_pretrained(tmp_path / "adapter")
        base, _ = train.load_model(tiny_dir)
        assert not torch.allclose(base(**inputs).logits, adapted, atol=1e-3)  # the adapter matters
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # as notebook 03 reloads it
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, atol=1e-5, rtol=1e-5)
        merged = peft_model.merge_and_unload(safe_merge=True)
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-4, rtol=1e-4)


def test_save_merged_checks_the_disk_first(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    saved = mh.save_merged(model, tokenizer, tmp_path / "merged")
    assert (saved / "config.json").is_file() and (saved / "tokenizer_config.json").is_file()
    monkeypatch.setattr(mh.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(RuntimeError, match="Not enough disk"):
        mh.save_merged(model, tokenizer, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


# --- pre-flight -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
def test_preflight_on_cpu_fails_gpu_check_with_a_fix_and_never_raises(tiny_dir, capsys):
    checks = mh.preflight()
    by_name = {check.name: check for check in checks}
    assert not by_name["GPU"].ok and "no GPU" in by_name["GPU"].message and by_name["GPU"].fix
    assert not by_name["Mamba kernels"].ok and "10x slower" in by_name["Mamba kernels"].message
    assert "kernels" in by_name["Mamba kernels"].fix
    assert "--preset smoke" in by_name["GPU"].fix
    assert "[FAIL] GPU" in capsys.readouterr().out
    with pytest.raises(mh.PreflightFailed) as error:
        mh.require(checks)
    assert by_name["GPU"].message in str(error.value) and by_name["GPU"].fix in str(error.value)
    mh.require([c for c in checks if c.name == "model"])  # the model's type is fine; only the machine is not

    tiny_checks = mh.preflight(model_id=tiny_dir)  # the tiny model is fine on CPU
    mh.require(tiny_checks)
    assert [c.name for c in tiny_checks] == ["model", "GPU", "disk", "Mamba kernels"]
    assert "nemotron_h" in tiny_checks[0].message and "tiny model" in tiny_checks[1].message


def test_fast_kernels_status_reports_what_transformers_bound():
    status = mh.fast_kernels_status()
    assert set(status) == {"cuda", "mamba_ssm", "causal_conv1d", "implementations", "fast_path"}
    if status["mamba_ssm"] is None:
        assert not status["fast_path"]
        assert all(where == "torch reference" for where in status["implementations"].values())


def test_preflight_refuses_other_architectures_before_any_download(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path
    )
    check = mh.preflight(tmp_path)[0]
    assert check.name == "model" and not check.ok and "'llama' model" in check.message and "nemotron_h" in check.message
    assert "tiny model" in check.fix and "[FAIL] model" in capsys.readouterr().out
    with pytest.raises(mh.PreflightFailed, match="'llama' model"):
        mh.require(mh.preflight(tmp_path)[:1])


def test_preflight_names_a_model_folder_that_is_not_there(tmp_path, capsys):
    """A mistyped MODEL_ID folder: the model check says no model is there and what MODEL_ID may be; the disk check
    does not fail on the same mistake."""
    checks = {c.name: c for c in mh.preflight(tmp_path / "tiny-nemotrn")}
    assert not checks["model"].ok and "no model found there" in checks["model"].message
    assert "config.json" in checks["model"].fix and "the check itself failed" not in capsys.readouterr().out
    assert checks["disk"].ok and "not checked" in checks["disk"].message


def test_load_tokenizer_builds_the_tiny_model_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setattr(mh, "TINY_MODEL", str(tmp_path / "tiny-nemotron"))
    tokenizer = mh.load_tokenizer(tmp_path / "tiny-nemotron")
    assert (tmp_path / "tiny-nemotron" / "config.json").is_file()
    assert tokenizer.pad_token == "<pad>" and tokenizer.model_max_length == 1024


def test_parameter_counts_read_in_units_that_suit_them():
    assert [mh.readable(n) for n in (31_580_000_000, 57_600_000, 412_300, 12)] == ["31.58B", "57.6M", "412.3K", "12"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes the GPU on a CPU machine")
@pytest.mark.parametrize("total_gib, load_in_4bit, ok, words", [
    (80, "auto", True, "bf16 weights need"), (40, "auto", True, "enough for the 4-bit"),
    (40, "false", False, "allow 4-bit"), (16, "auto", False, "smallest allowed mode")])
def test_gpu_check_knows_the_4bit_fallback(monkeypatch, total_gib, load_in_4bit, ok, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (total_gib * mh.GIB * 0.95, total_gib * mh.GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    allow = str(load_in_4bit).lower() != "false"
    bf16 = mh.WEIGHTS_GIB["bf16"]
    check = mh._check_gpu(bf16, bf16 * mh.NF4_SHARE if allow else None)
    assert check.ok is ok and words in f"{check.message} {check.fix}"
