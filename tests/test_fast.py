"""The fast path (fastpath/) trains the same thing as the standard path, refuses where it could not, and leaves
the process exactly as it found it.

Packing is exact only where every layer sees row boundaries. On CPU the Mamba layers run the PyTorch
reference, which ignores `seq_idx`, so the equality checks use tiny models of attention + MoE blocks only;
the real architecture (with the fused Mamba kernels) is checked on a GPU by benchmarks/check_fast.py.
"""

import gc
import importlib
import json

import pytest
import torch

import fastpath
import fastpath.experts
import fastpath.layers
import fastpath.undo
import fastpath.versions
import train
from helpers import data, training
from helpers import model as hmodel
from helpers.config import TrainConfig

ALL_ON_CPU = fastpath.Settings()  # the default pieces: every one but GPU_ONLY on this CPU machine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from recipe.offline import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-nemotron")


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return hmodel.load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def rows(tok):
    """The shipped sample's training questions as prompt/completion rows (49 rows of ~60-170 tokens)."""
    from datasets import Dataset

    lines = (data.SAMPLE_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()
    examples = [data.format_example(json.loads(line), True, tok.eos_token) for line in lines if line.strip()]
    return Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])


def tiny_model(tiny_dir, pattern: str, seed: int = 0):
    """The tiny model's config with another block pattern (e.g. '*E*E': attention + MoE, no Mamba)."""
    from transformers import AutoConfig, NemotronHConfig, NemotronHForCausalLM

    values = AutoConfig.from_pretrained(tiny_dir).to_dict()
    values.pop("layers_block_type", None)
    values["hybrid_override_pattern"] = pattern
    torch.manual_seed(seed)
    return NemotronHForCausalLM(NemotronHConfig(**values))


def cfg_for(tmp_path, **kw):
    base = dict(run_name="f", output_root=str(tmp_path), max_length=512, per_device_train_batch_size=6,
                gradient_accumulation_steps=1, learning_rate=2e-3, warmup_ratio=0.0, logging_steps=1,
                save_steps=1000, seed=0)
    return TrainConfig(**{**base, **kw})


def with_lora(llm, **kw):
    """`llm` with the tutorial's LoRA (train.lora_config), B set to small random values so A gets gradients too."""
    from peft import get_peft_model

    peft_model = get_peft_model(llm, train.lora_config(TrainConfig(**kw)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return peft_model


def make_trainer(peft_model, tok, rows, tmp_path, settings=None, callbacks=(), **args):
    """An SFTTrainer as train.py builds it (fastpath's collator when `settings` pack), no files written."""
    from trl import SFTTrainer

    cfg = cfg_for(tmp_path)
    collator = fastpath.collator(peft_model, tok, settings) if settings else None
    return SFTTrainer(model=peft_model, processing_class=tok, train_dataset=rows, data_collator=collator,
                      callbacks=list(callbacks),
                      args=train.sft_config(cfg, save_strategy="no", report_to=[], disable_tqdm=True, **args))


def lora_grads(peft_model) -> dict:
    return {n: p.grad.float().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def rel_errors(a: dict, b: dict) -> list[float]:
    assert a.keys() == b.keys() and a
    return sorted(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


def loss_and_grads(trainer, peft_model, batch, autocast: bool = False):
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), training.cpu_loss_fallback():
        loss = trainer.compute_loss(peft_model, batch)
    loss.backward()
    return loss.item(), lora_grads(peft_model)


# --- the process as fastpath found it -----------------------------------------------------------------------------

_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


def process_state(trainer) -> dict:
    """Everything a fast piece could leave behind, flattened to {where: value}: every attribute of every module
    of the model (with its submodules, parameters, buffers and hooks) and of its class, every config, the library
    bindings and registries fastpath may change (fastpath.undo), the module globals of the libraries it patches,
    the trainer's callbacks, and the garbage collector's state."""
    state = {}

    def add(prefix, mapping):
        for key, value in dict(mapping).items():
            if isinstance(value, dict):
                state[(*prefix, key, "keys")] = tuple(value)
                for inner, item in value.items():
                    state[(*prefix, key, inner)] = item
            else:
                state[(*prefix, key)] = value

    for name, module in trainer.model.named_modules():
        add(("module", name), vars(module))
        add(("class", type(module).__qualname__), vars(type(module)))
        if hasattr(module, "config") and hasattr(module.config, "to_dict"):
            add(("config", name), vars(module.config))
    for module_name, attribute in fastpath.undo.LIBRARY_TARGETS:
        state[("binding", module_name, attribute)] = getattr(importlib.import_module(module_name), attribute)
    for registry in fastpath.undo.registries():
        add(("registry", registry.__name__), registry._global_mapping)
    for module_name in ("transformers.models.nemotron_h.modeling_nemotron_h", "transformers.integrations.moe",
                        "transformers.masking_utils", "peft.tuners.lora.layer", "peft.tuners.tuners_utils",
                        "trl.trainer.sft_trainer", "trl.trainer.utils"):
        add(("globals", module_name), vars(importlib.import_module(module_name)))
    state[("trainer", "callbacks")] = tuple(trainer.callback_handler.callbacks)
    state[("gc",)] = (gc.get_freeze_count(), gc.isenabled())
    return state


def differences(before: dict, after: dict) -> list:
    """Where `after` differs from `before` (plain values by equality, everything else by identity)."""
    def same(a, b):
        if a is b:
            return True
        if isinstance(a, tuple) and isinstance(b, tuple):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return isinstance(a, _PLAIN) and isinstance(b, _PLAIN) and a == b
    return sorted((str(key) for key in before.keys() ^ after.keys()), key=str) + [
        str(key) for key in before.keys() & after.keys() if not same(before[key], after[key])]


class _StopAtFirstStep:
    """A TrainerCallback that records what training looked like at the end of step 1, then ends it by `how`."""

    def __new__(cls, how: str, peft_model):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            seen = {}

            def on_step_end(self, args, state, control, **kw):
                base = peft_model.get_base_model()
                self.seen.update(flags=[b.gradient_checkpointing for b in base.model.layers],
                                 frozen=gc.get_freeze_count(), experts=base.config._experts_implementation,
                                 attention=base.config._attn_implementation)
                if how == "interrupt":
                    raise KeyboardInterrupt  # Ctrl-C during training
                if how == "error":
                    raise RuntimeError("a step failed")

        return Stop()


@pytest.mark.parametrize("how", ["interrupt", "error", "normal"])
def test_applied_leaves_the_process_as_it_found_it_on_any_exit(tiny_dir, tok, rows, tmp_path, how):
    """Ctrl-C at step 1, an exception at step 1, or the end of training: afterwards every module, config, library
    binding, registry, callback, checkpointing flag and the garbage collector are exactly as before."""
    peft_model = with_lora(tiny_model(tiny_dir, "*E*E"))
    peft_model.train()
    # checkpointing turned on the way the Trainer does it, before the snapshot (the Trainer's own re-enabling
    # would replace objects that are not fastpath's to restore)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = fastpath.Settings(checkpointing="moe:1")
    stop = _StopAtFirstStep(how, peft_model)
    trainer = make_trainer(peft_model, tok, rows, tmp_path, settings, callbacks=[stop], max_steps=1,
                           gradient_checkpointing=False)
    before, raised = process_state(trainer), None
    try:
        with fastpath.applied(trainer, settings) as report, training.cpu_loss_fallback():
            trainer.train()
    except (KeyboardInterrupt, RuntimeError) as error:
        raised = error
    assert type(raised) is {"interrupt": KeyboardInterrupt, "error": RuntimeError, "normal": type(None)}[how]
    # the one change that is the Trainer's own: accelerate marks the model it prepared inside train()
    left = set(differences(before, process_state(trainer))) - {str(("module", "", "_is_accelerate_prepared"))}
    assert left == set(), "\n".join(left)
    # while it trained: the policy (attention, moe, attention, moe: only the first MoE block recomputes), the
    # frozen collector, the pieces
    assert stop.seen["flags"] == [False, True, False, False]
    assert stop.seen["frozen"] > 10_000 and gc.get_freeze_count() == 0
    assert (stop.seen["experts"], stop.seen["attention"]) == ("compact_grouped_mm", "packed_varlen")
    lora = sum(1 for m in peft_model.modules() if hasattr(m, "lora_A"))
    assert lora == 12  # q, k, v, o x 2 attention blocks + the shared experts' up and down x 2 MoE blocks
    assert report == {"packing": 1, "round_lengths": 1, "lean_experts": 2, "varlen_attention": 2, "lora_bf16": lora,
                      "bf16_relu2": 2, "compact_experts": 2, "lora_addmm": lora, "gc_freeze": 1, "checkpointing": 3}


def test_the_state_snapshot_catches_a_change_left_behind(tiny_dir, tok, rows, tmp_path):
    """The check above can fail: each kind of leftover shows up in `differences` (and is then taken back)."""
    from transformers import AttentionInterface, TrainerCallback
    from transformers.models.nemotron_h import modeling_nemotron_h

    peft_model = with_lora(tiny_model(tiny_dir, "*E"))
    trainer = make_trainer(peft_model, tok, rows, tmp_path)
    base = peft_model.get_base_model()
    q_proj, block, kernel = base.model.layers[0].mixer.q_proj, base.model.layers[1], modeling_nemotron_h.__dict__
    binding = fastpath.undo.LIBRARY_TARGETS[0][1]
    leftovers = {  # kind: (leave it, take it back)
        "forward": (lambda: setattr(q_proj, "forward", print), lambda: vars(q_proj).pop("forward")),
        "flag": (lambda: setattr(block, "gradient_checkpointing", True),
                 lambda: vars(block).pop("gradient_checkpointing")),
        "config": (lambda: setattr(base.config, "_experts_implementation", "batched_mm"),
                   lambda: setattr(base.config, "_experts_implementation", "grouped_mm")),
        "registry": (lambda: AttentionInterface.register("leftover", print),
                     lambda: AttentionInterface._global_mapping.pop("leftover")),
        "binding": (lambda: kernel.update({binding: print}), lambda: kernel.update({binding: saved[("binding",
                    fastpath.undo.LIBRARY_TARGETS[0][0], binding)]})),
        "callback": (lambda: trainer.add_callback(TrainerCallback()), trainer.callback_handler.callbacks.pop),
        "gc": (gc.freeze, gc.unfreeze),
    }
    before = process_state(trainer)
    for kind, (leave, take_back) in leftovers.items():
        saved = process_state(trainer)
        leave()
        assert differences(saved, process_state(trainer)), kind
        take_back()
    assert differences(before, process_state(trainer)) == []


# --- settings, versions, refusals ------------------------------------------------------------------------------


def test_settings_default_to_every_piece_this_machine_runs_and_check_their_names():
    assert ALL_ON_CPU.pieces == set(fastpath.FEATURES) - (set() if torch.cuda.is_available() else
                                                          set(fastpath.GPU_ONLY))
    assert fastpath.Settings("packing, lean_experts").pieces == {"packing", "lean_experts"}
    with pytest.raises(fastpath.Refused, match="unknown fast-path piece.*lean_expert.*--fast-features.*packing"):
        fastpath.Settings("packing,lean_expert")
    with pytest.raises(fastpath.Refused, match="add packing to --fast-features"):
        fastpath.Settings("lean_experts,varlen_attention")
    with pytest.raises(fastpath.Refused, match="add lean_experts"):
        fastpath.Settings("packing,compact_experts")
    for name in ("fused_expert_act", "fused_slot_sum"):
        with pytest.raises(fastpath.Refused, match="add compact_experts"):
            fastpath.Settings(f"packing,{name}")


@pytest.mark.parametrize("policy", ["mamba,experts", "moe:x"])
def test_bad_checkpointing_policy_names_the_choices_and_the_flag(policy):
    with pytest.raises(fastpath.Refused, match="--checkpointing .* 'all', 'none' or a comma list"):
        fastpath.Settings(checkpointing=policy)


def test_checkpointing_policy_counts_blocks():
    assert fastpath.parse_policy("mamba, moe:8") == {"mamba": None, "moe": 8}
    assert fastpath.parse_policy("all") == {"mamba": None, "moe": None, "attention": None}
    assert fastpath.parse_policy("none") == {}


def test_version_guard_names_the_verified_versions_and_can_be_overridden(monkeypatch, capsys):
    real = fastpath.versions.installed
    assert fastpath.check_versions()["transformers"] == "5.17.0"  # this machine runs the verified stack
    monkeypatch.setattr(fastpath.versions, "installed",
                        lambda p: {"transformers": "5.18.0", "torch": "2.11.0+cu130"}.get(p) or real(p))
    with pytest.raises(fastpath.Refused, match=r"verified with torch 2\.11\.0, transformers 5\.17\.0, peft 0\.21\.0 "
                                               r"or 0\.21\.2.*has transformers 5\.18\.0\..*--any-version") as refused:
        fastpath.check_versions()
    assert "torch 2.11.0+cu130" not in str(refused.value)  # a local tag is the same release
    assert fastpath.check_versions(allow_other_versions=True)["transformers"] == "5.18.0"
    assert "5.18.0" in capsys.readouterr().out
    monkeypatch.setitem(fastpath.versions.NEEDED, "transformers.integrations.moe._gone", ("lean_experts",))
    with pytest.raises(fastpath.Refused, match=r"_gone \(used by lean_experts\)"):
        fastpath.check_versions(allow_other_versions=True)  # a missing name cannot be overridden
    assert fastpath.check_versions(allow_other_versions=True, settings=fastpath.Settings("packing"))


def test_a_piece_that_changes_nothing_is_refused_when_named_and_left_out_by_default(tiny_dir, capsys):
    attention_only = tiny_model(tiny_dir, "*")
    with pytest.raises(fastpath.Refused, match="lean_experts changes nothing here: the model has no routed experts"):
        with fastpath.model_pieces(attention_only, fastpath.Settings("lean_experts")):
            pass
    routed = with_lora(tiny_model(tiny_dir, "E*E"), routed_experts=True)
    with pytest.raises(fastpath.Refused, match="compact_experts changes nothing here: every routed expert trains"):
        with fastpath.model_pieces(routed, fastpath.Settings("lean_experts,compact_experts")):
            pass
    with fastpath.model_pieces(routed, ALL_ON_CPU) as report:
        assert report["lean_experts"] == 2 and "compact_experts" not in report  # one per MoE block
        assert routed.get_base_model().config._experts_implementation == "lean_grouped_mm"
    out = capsys.readouterr().out
    assert "compact_experts: left out (every routed expert trains" in out and "lean_experts: 2 routed-expert" in out
    assert "frozen_out_proj: left out (the model has no Mamba layer" in out
    assert routed.get_base_model().config._experts_implementation == "grouped_mm"


def test_applied_refuses_a_trainer_whose_collator_does_not_match(tiny_dir, tok, rows, tmp_path):
    peft_model = with_lora(tiny_model(tiny_dir, "*E"))
    padded = make_trainer(peft_model, tok, rows, tmp_path)
    with pytest.raises(fastpath.Refused, match=r"data_collator=fastpath.collator\(model, tokenizer, settings\)"):
        with fastpath.applied(padded, ALL_ON_CPU):
            pass
    assert "forward" not in vars(peft_model.get_base_model().model.layers[0].mixer.q_proj)
    with pytest.raises(fastpath.Refused, match="recomputes every block of this model"):
        with fastpath.applied(padded, fastpath.Settings("lean_experts", checkpointing="moe,attention")):
            pass


def test_fast_path_refuses_mamba_layers_without_the_fused_kernels(tiny_dir, tok):
    with_mamba = with_lora(tiny_model(tiny_dir, "ME*E"))  # CPU: the Mamba reference, which ignores seq_idx
    with pytest.raises(fastpath.PackingUnsupported, match="fused mamba_ssm kernels"):
        fastpath.collator(with_mamba, tok, ALL_ON_CPU)
    assert fastpath.collator(with_mamba, tok, fastpath.Settings("lean_experts")) is None  # no packing, no collator
    assert issubclass(fastpath.PackingUnsupported, fastpath.Refused)


@pytest.mark.skipif(fastpath.kernels_problem() is None, reason="this machine has the fused Mamba kernels")
def test_prepare_process_refuses_packing_before_any_model_loads(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with pytest.raises(fastpath.Refused, match="fused mamba_ssm kernels.*without --fast"):
        fastpath.prepare_process(ALL_ON_CPU)
    fastpath.prepare_process(fastpath.Settings("lean_experts"))
    import os
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_expandable_segments_are_asked_for_unless_the_user_chose(monkeypatch):
    import os

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert fastpath.prefer_expandable_segments() is (not torch.cuda.is_initialized())
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert fastpath.prefer_expandable_segments() is False
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"  # the user's choice stays


def test_fold_accumulation_keeps_the_effective_batch():
    folded = fastpath.fold_accumulation(TrainConfig(per_device_train_batch_size=8, gradient_accumulation_steps=4))
    assert (folded.per_device_train_batch_size, folded.gradient_accumulation_steps) == (32, 1)


# --- packing --------------------------------------------------------------------------------------------------------


def test_seq_idx_numbers_the_rows_of_a_packed_batch():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    assert fastpath.seq_idx_from_position_ids(position_ids).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert fastpath.seq_idx_from_position_ids(position_ids).dtype == torch.int32


def test_packed_collator_concatenates_rows_without_padding():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = fastpath.PackedCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]
    assert "attention_mask" not in batch  # a mask of ones would hide the row boundaries from attention
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3  # read on the CPU
    rounded = fastpath.PackedCollator(0, fastpath.ROUND_TO)(examples)
    assert rounded["input_ids"].shape == (1, 256) and rounded["labels"][0, 5:].eq(-100).all()


def test_row_bounds_are_flash_attentions_row_offsets():
    cu_seqlens, longest = fastpath.row_bounds(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]]))
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 10] and cu_seqlens.dtype == torch.int32 and longest == 4


@pytest.mark.parametrize("routed_experts", [False, True])
def test_packed_and_padded_batches_give_the_same_loss_rows_and_lora_gradients(tiny_dir, tok, rows, tmp_path,
                                                                              routed_experts):
    """Every CPU piece on (float32): the trainer's own loss and every LoRA gradient match the padded batch's to
    float32 rounding, and each row's logits inside the packed row match the row alone. Frozen routed experts run
    compact_experts; with LoRA on them (routed_experts) the lean experts run, and their LoRA gradients match too."""
    peft_model = with_lora(tiny_model(tiny_dir, "*E*E"), routed_experts=routed_experts)
    trainer = make_trainer(peft_model, tok, rows, tmp_path)
    examples = [trainer.train_dataset[i] for i in range(6)]
    standard_loss, standard = loss_and_grads(trainer, peft_model, trainer.data_collator(examples))
    packed = fastpath.collator(peft_model, tok, ALL_ON_CPU)(examples)
    with fastpath.model_pieces(peft_model, ALL_ON_CPU, quiet=True) as report:
        assert {"lean_experts", "varlen_attention", "lora_addmm", "lora_bf16", "bf16_relu2"} <= report.keys()
        assert ("compact_experts" in report) is not routed_experts
        fast_loss, fast = loss_and_grads(trainer, peft_model, packed)
        with torch.no_grad():
            logits = peft_model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
            alone = [peft_model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    assert abs(fast_loss - standard_loss) < 1e-5
    assert any(".experts." in n for n in standard) is routed_experts and max(rel_errors(fast, standard)) < 1e-4
    assert torch.allclose(logits[:sum(len(a) for a in alone)], torch.cat(alone), atol=1e-5)


def test_in_bf16_the_fast_path_is_as_close_to_float32_as_the_standard_path(tiny_dir, tok, rows, tmp_path):
    """Under bf16 autocast both paths round, in different places. Against the float32 gradient the fast path may
    be no more than a quarter farther off than the standard path, and the two may differ by at most half of the
    standard path's own bf16 error: a precision bug in a fast piece (say, routing weights rounded too coarsely)
    breaks the second. On this model the fast-vs-standard gap is bf16 noise, not an error."""
    peft_model = with_lora(tiny_model(tiny_dir, "*EEE"))
    trainer = make_trainer(peft_model, tok, rows, tmp_path)
    examples = [trainer.train_dataset[i] for i in range(8)]
    exact = loss_and_grads(trainer, peft_model, trainer.data_collator(examples))[1]
    peft_model.get_base_model().to(torch.bfloat16)
    for module in peft_model.modules():
        if hasattr(module, "lora_A"):  # PEFT keeps LoRA in float32 beside a bf16 model
            module.lora_A.float(), module.lora_B.float()
    standard = loss_and_grads(trainer, peft_model, trainer.data_collator(examples), autocast=True)[1]
    with fastpath.model_pieces(peft_model, ALL_ON_CPU, quiet=True):
        packed = fastpath.collator(peft_model, tok, ALL_ON_CPU)(examples)
        fast = loss_and_grads(trainer, peft_model, packed, autocast=True)[1]

    def median(a, b):
        errors = rel_errors(a, b)
        return errors[len(errors) // 2]
    standard_error, fast_error, between = median(standard, exact), median(fast, exact), median(fast, standard)
    assert 0 < standard_error < 0.2 and fast_error < 1.25 * standard_error, (standard_error, fast_error)
    # the two paths' roundings are mostly the same: they differ by far less than bf16 costs either of them
    # (fp8 routing weights in CompactExperts, for one, take this from ~0.26 to ~0.72)
    assert between < 0.5 * standard_error, (between, standard_error)


# --- experts --------------------------------------------------------------------------------------------------------


def _moe_run(peft_model, x):
    """Output of the first MoE block for `x`, and every gradient (x's and the LoRA parameters')."""
    peft_model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    moe = peft_model.get_base_model().model.layers[0].mixer
    out = moe(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), x.grad, grads


def _assert_close(a, b):
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_lean_experts_match_transformers_experts_with_routed_expert_lora(tiny_dir):
    """Same outputs and the same LoRA gradients (routed experts included) as transformers' own implementation."""
    llm = tiny_model(tiny_dir, "E")
    peft_model = with_lora(llm, routed_experts=True)
    x = torch.randn(37, llm.config.hidden_size)
    reference, _, ref_grads = _moe_run(peft_model, x)
    with fastpath.model_pieces(peft_model, fastpath.Settings("lean_experts"), quiet=True) as report:
        assert report == {"lean_experts": 1} and llm.config._experts_implementation == "lean_grouped_mm"
        lean, _, lean_grads = _moe_run(peft_model, x)
    _assert_close(lean, reference)
    assert ref_grads.keys() == lean_grads.keys() and any(".experts." in n for n in ref_grads)
    for name in ref_grads:
        _assert_close(lean_grads[name], ref_grads[name])


def test_compact_experts_match_lean_experts(tiny_dir, monkeypatch):
    """The written-out backward gives the same output and gradients as autograd through the lean experts: the
    input's gradient (through the experts and through the routing weights) and every LoRA gradient."""
    llm = tiny_model(tiny_dir, "E")
    peft_model = with_lora(llm)
    x = torch.randn(37, llm.config.hidden_size)
    with fastpath.model_pieces(peft_model, fastpath.Settings("lean_experts"), quiet=True):
        lean, lean_x_grad, lean_grads = _moe_run(peft_model, x)
    calls, original = [], fastpath.experts.CompactExperts.apply
    monkeypatch.setattr(fastpath.experts.CompactExperts, "apply", lambda *a: calls.append(1) or original(*a))
    with fastpath.model_pieces(peft_model, fastpath.Settings("lean_experts,compact_experts"), quiet=True) as report:
        assert report == {"lean_experts": 1, "compact_experts": 1}
        compact, compact_x_grad, compact_grads = _moe_run(peft_model, x)
    assert calls
    _assert_close(compact, lean)
    _assert_close(compact_x_grad, lean_x_grad)
    assert lean_grads.keys() == compact_grads.keys() and lean_grads
    for name in lean_grads:
        _assert_close(compact_grads[name], lean_grads[name])


def test_compact_experts_hand_experts_that_train_to_the_lean_experts(tiny_dir, monkeypatch):
    experts = tiny_model(tiny_dir, "E").model.layers[0].mixer.experts
    monkeypatch.setattr(fastpath.experts.CompactExperts, "apply", lambda *a: pytest.fail("compact ran"))
    x, index = torch.randn(7, experts.hidden_dim), torch.randint(0, experts.num_experts, (7, 2))
    weights = torch.rand(7, 2)
    assert experts.up_proj.requires_grad  # a model without PEFT: every weight trains
    _assert_close(fastpath.experts.compact_experts_forward(experts, x, index, weights),
                  fastpath.experts.lean_experts_forward(experts, x, index, weights))


@pytest.mark.filterwarnings("ignore:Input #")
def test_compact_experts_gradients_match_finite_differences():
    """Both inputs' gradients, the routing weights' included, against torch.autograd.gradcheck (float32: the
    grouped GEMM has no float64 kernel)."""
    torch.manual_seed(0)
    tokens, experts, k, hidden, inner = 5, 4, 2, 4, 8  # widths: multiples of 16 bytes for the CPU kernel
    x = torch.randn(tokens, hidden, requires_grad=True)
    weights = torch.rand(tokens, k, requires_grad=True)
    index = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    up, down = torch.randn(experts, inner, hidden), torch.randn(experts, hidden, inner)
    assert torch.autograd.gradcheck(lambda a, b: fastpath.experts.CompactExperts.apply(a, b, index, up, down, False),
                                    (x, weights), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_fused_expert_steps_compile_the_same_maths():
    """fused_expert_act + fused_slot_sum: the torch.compile'd steps give CompactExperts' eager results
    (here on a CPU, where inductor writes C++; on a GPU it writes one Triton kernel each)."""
    experts_module = fastpath.experts
    torch.manual_seed(0)
    tokens, experts, k, hidden, inner = 9, 4, 2, 8, 16
    index = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    up, down = torch.randn(experts, inner, hidden), torch.randn(experts, hidden, inner)
    x, weights, grad = torch.randn(tokens, hidden), torch.rand(tokens, k), torch.randn(tokens, hidden)
    results = []
    for fused in (frozenset(), frozenset({"act", "sum"})):
        xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = experts_module.CompactExperts.apply(xi, wi, index, up, down, False, fused)
        out.backward(grad)
        results.append((out.detach(), xi.grad, wi.grad))
    for eager, fused in zip(*results):
        assert torch.allclose(fused, eager, atol=1e-5, rtol=1e-5)
    assert {experts_module._relu2_weighted, experts_module._relu2_weighted_backward,
            experts_module._add_up_slots} <= set(experts_module._COMPILED)


def test_the_compiled_expert_steps_are_marked_on_the_frozen_experts_and_taken_back(tiny_dir):
    llm = tiny_model(tiny_dir, "E")
    for p in llm.parameters():
        p.requires_grad_(False)
    experts = llm.model.layers[0].mixer.experts
    with fastpath.model_pieces(llm, fastpath.Settings("lean_experts,compact_experts,fused_slot_sum"), quiet=True):
        assert experts._fast_fused == frozenset({"sum"}) and llm.config._experts_implementation == "compact_grouped_mm"
    assert not hasattr(experts, "_fast_fused") and llm.config._experts_implementation == "grouped_mm"


# --- layers ---------------------------------------------------------------------------------------------------------


def test_bf16_relu2_gives_the_float32_squares_bits_without_float32_tensors(tiny_dir):
    """ReLUSquared in bf16 == the float32 square rounded to bf16 (what autocast feeds the next matmul), forward
    and backward; it goes into the shared experts and back out."""
    x = torch.randn(4096, dtype=torch.bfloat16).requires_grad_(True)
    grad = torch.randn(4096, dtype=torch.bfloat16)
    out = fastpath.layers.ReLUSquared()(x)
    out.backward(grad)
    reference_x = x.detach().float().requires_grad_(True)
    reference = torch.square(torch.relu(reference_x))
    reference.backward(grad.float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.to(torch.bfloat16))
    assert torch.equal(x.grad, reference_x.grad.to(torch.bfloat16))

    llm = tiny_model(tiny_dir, "*E")
    shared = llm.model.layers[1].mixer.shared_experts
    stock = shared.act_fn
    with fastpath.model_pieces(llm, fastpath.Settings("bf16_relu2"), quiet=True) as report:
        assert report == {"bf16_relu2": 1} and isinstance(shared.act_fn, fastpath.layers.ReLUSquared)
    assert shared.act_fn is stock


def _logits_and_lora_grads(peft_model, ids, autocast: bool = False):
    peft_model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = peft_model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}


def test_lora_addmm_gives_peft_outputs_and_gradients_and_leaves_other_adapters_to_peft(tiny_dir):
    """One GEMM that adds the scaled low-rank product into the frozen output: PEFT's logits and LoRA gradients
    (float32 to 1e-5; under bf16 autocast to bf16 rounding); with dropout PEFT's own forward runs."""
    peft_model = with_lora(tiny_model(tiny_dir, "*E"))
    ids = torch.randint(3, 200, (2, 13))
    reference, ref_grads = _logits_and_lora_grads(peft_model, ids)
    ref_bf16, _ = _logits_and_lora_grads(peft_model, ids, autocast=True)
    peft_calls = []  # PEFT's own forward calls lora_B as a module; the addmm path only reads its weight
    hook = peft_model.get_base_model().model.layers[0].mixer.q_proj.lora_B["default"].register_forward_hook(
        lambda *a: peft_calls.append(1))
    with fastpath.model_pieces(peft_model, fastpath.Settings("lora_addmm"), quiet=True) as report:
        assert report == {"lora_addmm": 6}  # q, k, v, o + the shared experts' up and down
        fused, grads = _logits_and_lora_grads(peft_model, ids)
        fused_bf16, _ = _logits_and_lora_grads(peft_model, ids, autocast=True)
        assert not peft_calls and torch.allclose(fused, reference, atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys() and grads
        for name in grads:
            _assert_close(grads[name], ref_grads[name])
        assert (fused_bf16.float() - ref_bf16.float()).abs().max() < 0.05 * ref_bf16.float().abs().max()
        peft_model.get_base_model().to(torch.bfloat16)  # bf16 layers, float32 LoRA, no autocast: PEFT's float32 sum
        for module in peft_model.modules():
            if hasattr(module, "lora_A"):
                module.lora_A.float(), module.lora_B.float()
        with torch.no_grad():
            assert peft_model(input_ids=ids).logits.dtype == torch.float32 and peft_calls
    hook.remove()
    assert all("forward" not in vars(m) for m in peft_model.modules())

    with_dropout = with_lora(tiny_model(tiny_dir, "*E"), lora_dropout=0.5)
    with_dropout.eval()  # dropout off in eval, but the layer has a Dropout: PEFT's forward must run
    layer = with_dropout.get_base_model().model.layers[0].mixer.q_proj
    seen = []
    layer.lora_B["default"].register_forward_hook(lambda *a: seen.append(1))
    with fastpath.model_pieces(with_dropout, fastpath.Settings("lora_addmm"), quiet=True), torch.no_grad():
        with_dropout(input_ids=ids)
    assert seen


def test_varlen_attention_keeps_packed_rows_apart_and_leaves_padded_batches_to_sdpa(tiny_dir, monkeypatch):
    """Packed rows attend only to themselves (same logits as each row alone); a padded batch with a mask,
    e.g. in evaluation, gets exactly the SDPA result."""
    llm = tiny_model(tiny_dir, "*E*E").eval()
    rows = [torch.randint(3, 200, (n,)) for n in (5, 9, 3)]
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
    mask = (torch.arange(padded.shape[1]) < torch.tensor([[5], [9], [3]])).long()
    calls, original = [], fastpath.layers._attend_row_by_row

    def spy(q, k, v, cu_seqlens, scale):
        calls.append(cu_seqlens.tolist())
        return original(q, k, v, cu_seqlens, scale)
    monkeypatch.setattr(fastpath.layers, "_attend_row_by_row", spy)
    with torch.no_grad():
        alone = [llm(input_ids=r[None]).logits[0] for r in rows]
        sdpa_padded = llm(input_ids=padded, attention_mask=mask).logits
        with fastpath.model_pieces(llm, fastpath.Settings("packing,varlen_attention"), quiet=True) as report:
            assert report == {"varlen_attention": 2} and llm.config._attn_implementation == "packed_varlen"
            packed_ids = torch.cat(rows)[None]
            position_ids = torch.cat([torch.arange(len(r)) for r in rows])[None]
            packed = llm(input_ids=packed_ids, position_ids=position_ids).logits[0]
            varlen_padded = llm(input_ids=padded, attention_mask=mask).logits
            # PackedCollator's batch carries the bounds, read on the CPU: no row_bounds (and no GPU wait) at all
            batch = fastpath.PackedCollator(0)([{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows])
            monkeypatch.setattr(fastpath.layers, "row_bounds", lambda position_ids: pytest.fail("bounds found again"))
            from_collator = llm(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    assert llm.config._attn_implementation == "sdpa"
    assert calls and calls[0] == [0, 5, 14, 17]  # the row path ran, with the rows' bounds
    assert calls[-1] == [0, 5, 14, 17] and torch.equal(from_collator, packed)
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)
    assert torch.equal(varlen_padded, sdpa_padded)


def test_lora_bf16_skips_only_the_float32_round_trip_under_autocast(tiny_dir):
    """Under bf16 autocast the LoRA layers see bf16 inputs and give bit-identical outputs; outside it PEFT's cast
    still runs, and leaving the block undoes the switch."""
    peft_model = with_lora(tiny_model(tiny_dir, "*E").to(torch.bfloat16))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
             for n, m in peft_model.named_modules() if n.endswith("lora_A.default")]
    ids = torch.randint(3, 200, (2, 11))

    def logits(autocast: bool):
        seen.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return peft_model(input_ids=ids).logits

    reference = logits(True)
    assert set(seen) == {torch.float32}  # PEFT's copy of every LoRA input
    with fastpath.model_pieces(peft_model, fastpath.Settings("lora_bf16"), quiet=True):
        assert torch.equal(logits(True), reference) and set(seen) == {torch.bfloat16}
        logits(False)
        assert set(seen) == {torch.float32}  # no autocast: PEFT's cast as before, so bf16 x float32 cannot clash
    logits(True)
    assert set(seen) == {torch.float32}
    for hook in hooks:
        hook.remove()


def _fake_fused_kernel(calls):
    """Stands in for mamba_ssm's fused Mamba kernel: a pre-projection step, then the projection if given."""
    def kernel(zxbcdt, outproj_weight=None, outproj_bias=None, return_final_states=False):
        calls.append(outproj_weight)
        out = zxbcdt * 3.0  # saves nothing for backward, so any saved activation below is the projection's
        return out if outproj_weight is None else torch.nn.functional.linear(out, outproj_weight, outproj_bias)
    return kernel


def test_frozen_out_proj_projects_after_the_kernel_with_the_same_result_and_no_saved_activation():
    project_after_kernel = fastpath.layers.project_after_kernel
    calls = []
    kernel = _fake_fused_kernel(calls)
    z = torch.randn(16, 8, requires_grad=True)
    weight, bias = torch.randn(5, 8), torch.randn(5)
    expected = kernel(z, outproj_weight=weight, outproj_bias=bias)
    expected_grad, = torch.autograd.grad(expected.square().sum(), z)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = project_after_kernel(kernel, z, outproj_weight=weight, outproj_bias=bias)
    grad, = torch.autograd.grad(out.square().sum(), z)
    assert calls[-1] is None  # the kernel ran without the projection
    assert torch.equal(out, expected) and torch.equal(grad, expected_grad)
    assert z.shape not in saved  # a frozen weight: F.linear keeps no copy of its input

    trainable = weight.clone().requires_grad_(True)
    project_after_kernel(kernel, z, outproj_weight=trainable, outproj_bias=bias)
    assert calls[-1] is trainable  # a projection that trains stays inside the kernel
    project_after_kernel(kernel, z, outproj_weight=weight, return_final_states=True)
    assert calls[-1] is weight
    assert project_after_kernel(lambda *a, **k: None, z, outproj_weight=weight) is None  # transformers' stub


def test_frozen_out_proj_reaches_nemotron_h_mamba_layers_and_is_put_back(tiny_dir, monkeypatch):
    """The mixer hands its out_proj to the fused kernel by keyword; with the piece on, the kernel gets none, and
    helpers.model's kernel status still sees the kernel behind the wrapper."""
    from transformers.models.nemotron_h import modeling_nemotron_h

    calls = []

    def stub(*args, outproj_weight=None, **kwargs):  # returns None like transformers' stub: the torch path runs
        calls.append(outproj_weight)
    monkeypatch.setattr(modeling_nemotron_h, "mamba2_split_conv1d_scan_combined", stub)
    llm = tiny_model(tiny_dir, "M")
    for p in llm.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, llm.config.vocab_size, (1, 12))
    llm.train()
    before = llm(input_ids=ids, use_cache=False).logits
    assert calls and calls[-1] is llm.model.layers[0].mixer.out_proj.weight
    status = hmodel.fast_kernels_status()["implementations"]
    with fastpath.model_pieces(llm, fastpath.Settings("frozen_out_proj"), quiet=True) as report:
        assert report == {"frozen_out_proj": 1} and modeling_nemotron_h.mamba2_split_conv1d_scan_combined is not stub
        assert hmodel.fast_kernels_status()["implementations"] == status
        after = llm(input_ids=ids, use_cache=False).logits
    assert calls[-1] is None and torch.equal(before, after)
    assert modeling_nemotron_h.mamba2_split_conv1d_scan_combined is stub
