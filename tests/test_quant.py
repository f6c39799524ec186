"""notebooks/helpers/quant.py on CPU with the tiny NemotronH (bitsandbytes' CPU backend): 4-bit loading, LoRA
training through TRL's SFTTrainer, reloading and merging into the full-precision base, the bf16-or-NF4 decision,
and a smoke run of benchmarks/qlora.py.

Tolerances, measured here on the tiny random model (float32 on a CPU): NF4 stores a Gaussian weight with ~9%
relative error (blocks of 64 values, one float32 scale each); the two expert matmuls with ReLU^2 between them
carry ~14% to the experts' output, and the whole model's logits move ~4.5% (~6% with a trained adapter).
Merging itself is exact to ~5e-7.
"""

import importlib.metadata
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from helpers import quant
from helpers.model import check_lora_targets

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "outputs" / "tiny-nemotron")  # built on first use by the loaders
ROWS = {"prompt": [f"Question {i}: which nerve supplies the deltoid muscle? Answer:" for i in range(16)],
        "completion": [" A. The axillary nerve (C5, C6)." for _ in range(16)]}


def relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are microseconds long: spinning OpenMP threads on a busy 2-core machine only slows them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full():
    """The tiny model in float32: the reference every 4-bit output is compared with."""
    from transformers import AutoModelForCausalLM

    quant.load_model_4bit(TINY)  # builds the tiny model if this is its first use
    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)


def sft_train(model, tokenizer, out_dir, steps: int):
    """`steps` SFTTrainer steps as notebook 03 configures them (CPU: float32, TRL's loss through the CPU stand-in)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from helpers import training

    args = SFTConfig(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, completion_only_loss=True, max_length=64, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no", report_to=[],
                     disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False)
    with training.cpu_loss_fallback():
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(ROWS), processing_class=tokenizer)
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=quant.LORA_TARGETS_4BIT, task_type="CAUSAL_LM")
    check_lora_targets(config, "nf4")
    torch.manual_seed(0)
    return get_peft_model(model, config)


def gradients_after_training(model) -> dict:
    """Each trainable tensor's gradient norm on one batch (train mode, checkpointing on, as the trainer left it)."""
    model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(4, 2000, (2, 32), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    norms = {n: (p.grad.norm().item() if p.grad is not None else 0.0)
             for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return norms


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model with NF4 routed experts, LoRA on the tutorial's targets, 4 SFTTrainer steps, adapter saved."""
    model, tokenizer = quant.load_model_4bit(TINY)
    peft_model = lora(model)
    out = tmp_path_factory.mktemp("qlora")
    losses = sft_train(peft_model, tokenizer, out / "trainer", steps=4)
    peft_model.save_pretrained(out / "adapter")
    return {"model": peft_model, "losses": losses, "adapter": out / "adapter", "tokenizer": tokenizer}


def lora_module_names(model) -> list[str]:
    return [n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")]


def experts_of(model):
    return [m for m in model.modules() if type(m).__name__.endswith("NemotronHExperts")]


# Deciding bf16 or NF4 ---------------------------------------------------------------------------


@pytest.mark.parametrize("total, mode, says", [
    (23.6, "nf4", "NF4 experts and linears"),  # a 24 GB card: the other linears in NF4 too
    (31.4, "nf4", "NF4 routed experts ("),     # 32 GB: routed experts only
    (39.4, "nf4", "NF4 routed experts ("),     # A100 40GB
    (47.5, "nf4", "NF4 routed experts ("),     # 48 GB
    (68.9, "nf4", "bf16 needs ~69"),  # just below what bf16 training needs
    (79.2, "bf16", "has room"),       # an 80 GB card
    (139.8, "bf16", "has room"),      # H200
])
def test_auto_picks_by_card(total, mode, says):
    chosen, reason = quant.choose_precision("auto", gpu_total_gib=total)
    assert chosen == mode and says in reason


def test_forced_choices_cpu_and_mistakes(monkeypatch):
    assert quant.choose_precision(True, gpu_total_gib=79.2)[0] == "nf4"
    assert quant.choose_precision("TRUE", gpu_total_gib=23.6) == quant.choose_precision(True, gpu_total_gib=23.6)
    mode, reason = quant.choose_precision("false", gpu_total_gib=39.4)
    assert mode == "bf16" and "expect out of memory" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert quant.choose_precision("auto")[0] == "bf16" and "no GPU" in quant.choose_precision("auto")[1]
    assert quant.choose_precision("true")[0] == "nf4"
    with pytest.raises(ValueError, match='"auto", "true" or "false"'):
        quant.choose_precision("yes")


def test_old_or_missing_bitsandbytes_is_refused(monkeypatch):
    assert tuple(int(x) for x in quant.require_bitsandbytes().split(".")[:2]) >= (0, 50)
    real = importlib.metadata.version

    def version(name, found="0.49.0"):
        if name != "bitsandbytes":
            return real(name)
        if found is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return found

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(RuntimeError, match=r"bitsandbytes >= 0.50 \(found: 0.49.0;.*Fix: run through `./run"):
        quant.load_model_4bit(TINY)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version(name, None))
    with pytest.raises(RuntimeError, match="not installed"):
        quant.load_model_4bit(TINY)


# The 4-bit model ---------------------------------------------------------------------------------


def test_routed_experts_are_nf4_and_close_to_full_precision(trained, full):
    experts = experts_of(trained["model"])
    assert len(experts) == 2  # the tiny model's two MoE layers
    for quantized, reference in zip(experts, experts_of(full)):
        for name in quant.EXPERT_PARAMETERS:
            stored = quantized.parametrizations[name].original
            state = quantized.parametrizations[name][0].quant_state
            weight, original = getattr(quantized, name), getattr(reference, name).detach()
            assert stored.dtype == torch.uint8 and not stored.requires_grad
            assert stored.numel() * 2 == original.numel()  # two 4-bit codes per byte
            packed_bytes = stored.numel() + state.absmax.numel() * state.absmax.element_size()
            assert packed_bytes < 0.2 * original.numel() * original.element_size()  # vs float32: ~14%
            assert weight.shape == original.shape and weight.dtype == original.dtype  # dequantized on access
            assert 0.05 < relative(weight, original) < 0.11  # quantized, and as well as NF4 does
        hidden = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        index = torch.randint(0, 4, (64, 2), generator=torch.Generator().manual_seed(1))
        weights = torch.rand(64, 2, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert relative(quantized(hidden, index, weights), reference(hidden, index, weights)) < 0.2


def test_model_outputs_close_to_full_precision_with_and_without_lora(trained, full):
    from peft import PeftModel

    ids = torch.randint(4, 2000, (4, 48), generator=torch.Generator().manual_seed(0))
    model = trained["model"]
    with torch.no_grad():
        with model.disable_adapter():
            assert relative(model(input_ids=ids).logits, full(input_ids=ids).logits) < 0.1
        on_full = PeftModel.from_pretrained(full, str(trained["adapter"]))
        adapted, reference = model(input_ids=ids).logits, on_full(input_ids=ids).logits
        assert relative(adapted, reference) < 0.1
        with on_full.disable_adapter():
            assert relative(reference, on_full(input_ids=ids).logits) > 0.3  # the adapter does change the output
    on_full.unload()


def test_lora_targets_4bit_are_the_tutorials_targets(trained, full):
    from peft import LoraConfig, get_peft_model

    from helpers.model import LORA_TARGET_MODULES

    def names(model, targets):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
        wrapped = get_peft_model(model, config)
        found = lora_module_names(wrapped)
        wrapped.unload()
        return found

    on_4bit = lora_module_names(trained["model"])
    assert names(full, LORA_TARGET_MODULES) == names(full, quant.LORA_TARGETS_4BIT) == on_4bit
    assert len(on_4bit) == 10 and not any(".experts." in n for n in on_4bit)
    model, _ = quant.load_model_4bit(TINY)
    with pytest.raises(ValueError, match="not supported"):  # the list matches the NF4 container by name
        get_peft_model(model, LoraConfig(target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="LORA_TARGETS_4BIT"):
        check_lora_targets(LoraConfig(target_modules=LORA_TARGET_MODULES), "nf4")
    with pytest.raises(ValueError, match="routed experts.*Fix"):
        check_lora_targets(LoraConfig(target_modules=quant.LORA_TARGETS_4BIT,
                                      target_parameters=["mixer.experts.up_proj"]), "nf4")


def test_sft_trainer_trains_the_4bit_model(trained):
    losses = trained["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1
    norms = gradients_after_training(trained["model"])
    assert norms and all(name.count("lora_") == 1 for name in norms)  # only LoRA trains
    assert [n for n, g in norms.items() if not g > 0] == []  # every LoRA tensor gets a gradient


def test_adapter_merges_into_the_full_precision_base(trained, full):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY, dtype="auto", device_map="cpu")  # as notebook 03's merge cell
    merged = PeftModel.from_pretrained(base, str(trained["adapter"])).merge_and_unload(safe_merge=True)
    assert not any("lora_" in n or "parametrizations" in n for n, _ in merged.named_parameters())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}  # the tiny checkpoint's own dtype
    ids = torch.randint(4, 2000, (4, 48), generator=torch.Generator().manual_seed(0))
    on_full = PeftModel.from_pretrained(full, str(trained["adapter"]))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - on_full(input_ids=ids).logits).abs().max() < 1e-5  # merging is exact
    on_full.unload()
    with torch.no_grad():  # the merged model against the adapter on the 4-bit model it trained on
        adapted, deployed = (m.eval()(input_ids=ids).logits for m in (trained["model"], merged))
        with trained["model"].disable_adapter():
            base_error = relative(trained["model"](input_ids=ids).logits, full(input_ids=ids).logits)
    # what is left is the routed experts' quantization error, which the adapter was trained against
    assert 0.3 * base_error < relative(deployed, adapted) < 0.1
    assert (adapted.argmax(-1) == deployed.argmax(-1)).float().mean() > 0.8


def test_parameter_counts_of_the_4bit_model_are_those_of_the_full_one(trained, full):
    """Notebook 02's table in 4-bit: the packed NF4 experts (and, in the 24 GB mode, linears) count every weight."""
    from helpers.model import count_parameters

    reference = count_parameters(full)
    blocks = [key for key in reference if key not in ("lora", "total", "active_per_token")]
    for model in (trained["model"], quant.load_model_4bit(TINY, all_linears=True)[0]):  # with LoRA; 24 GB mode
        counts = count_parameters(model)
        assert {key: counts[key] for key in blocks} == {key: reference[key] for key in blocks}
    assert reference["routed_experts"] > 0


def test_24gb_mode_quantizes_the_other_linears_and_trains(tmp_path):
    import bitsandbytes as bnb

    model, tokenizer = quant.load_model_4bit(TINY, all_linears=True)
    mamba, moe, attention = model.model.layers[0].mixer, model.model.layers[1].mixer, model.model.layers[3].mixer
    for module in (mamba.in_proj, moe.shared_experts.up_proj, moe.shared_experts.down_proj, attention.q_proj,
                   attention.o_proj):
        assert isinstance(module, bnb.nn.Linear4bit)
    for module in (mamba.out_proj, model.lm_head):  # the fused Mamba kernel reads out_proj; the head stays
        assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
    assert experts_of(model)[0].parametrizations.up_proj[0].quant_state.nested  # double quantization
    peft_model = lora(model)
    losses = sft_train(peft_model, tokenizer, tmp_path, steps=2)
    assert all(math.isfinite(x) for x in losses)
    norms = gradients_after_training(peft_model)
    assert len(norms) == 20 and all(g > 0 for g in norms.values())


# The GPU benchmark's smoke run ----------------------------------------------------------------------


@pytest.mark.slow
def test_qlora_benchmark_runs_every_phase_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("qlora_bench", REPO / "benchmarks" / "qlora.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = bench.main(["--arch", "tiny", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "out"),
                          "--save-dir", str(tmp_path)])
    by_phase = {r["phase"]: r for r in records}
    assert list(by_phase) == ["bf16", "nf4-40GB", "quality", "nf4-24GB", "load-disk"]
    assert len(list((tmp_path / "out").glob("*_cpu_tiny_*.json"))) == 5  # one record per measurement
    for phase in ("bf16", "nf4-40GB", "nf4-24GB"):
        train = by_phase[phase]["train"]
        assert train["status"] == "ok" and len(train["step_seconds"]) == 2 and train["tokens_per_second"] > 0
        assert all(math.isfinite(x) for x in train["losses"]) and by_phase[phase]["lora_tensors_without_grad"] == 0
        if phase != "bf16":
            errors = by_phase[phase]["expert_weight_error"]
            assert 0.05 < errors["up_proj"] < 0.11 and 0.05 < errors["down_proj"] < 0.11
    quality = by_phase["quality"]
    assert abs(quality["first_batch_loss"]["difference"]) < 0.05
    assert quality["lora_gradients_nf4_vs_bf16"]["cosine"] > 0.9
    assert by_phase["load-disk"]["status"] == "ok" and by_phase["load-disk"]["cpu_ram"]["ru_maxrss_gib"] > 0
    assert not list(tmp_path.glob("qlora-bench-*"))  # the saved checkpoint is removed again
