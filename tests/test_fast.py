"""Stage 5: the fast path trains the same thing as the standard path, and refuses where it could not.

Packing is exact only where every layer sees row boundaries. On CPU the Mamba layers run the PyTorch
reference, which ignores `seq_idx`, so the equality checks use a tiny model of attention + MoE blocks
only; the real architecture (with the fused Mamba kernels) is checked on a GPU by
benchmarks/check_fast.py, whose functions these tests call.
"""

import sys

import pytest
import torch

from helpers import data, fast, model, training

sys.path.insert(0, str(data.REPO_ROOT / "benchmarks"))
import check_fast  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return model.build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-nemotron")


def tiny_model(tiny_dir, pattern: str, seed: int = 0):
    """The tiny model's config with another block pattern (e.g. '*E*E': attention + MoE, no Mamba)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    values = model.load_model(tiny_dir)[0].config.to_dict()
    values.pop("layers_block_type", None)
    values["hybrid_override_pattern"] = pattern
    torch.manual_seed(seed)
    return NemotronHForCausalLM(NemotronHConfig(**values))


@pytest.fixture(scope="module")
def sample(tiny_dir, tmp_path_factory):
    tok = model.load_tokenizer(tiny_dir)
    out = tmp_path_factory.mktemp("fmt") / "sample"
    dataset, _ = data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=out, tokenizer=tok, max_length=512)
    return tok, training.training_split(dataset)


def cfg_for(tmp_path, **kw):
    base = dict(run_name="f", output_root=str(tmp_path), max_length=512, per_device_train_batch_size=6,
                gradient_accumulation_steps=1, learning_rate=2e-3, warmup_ratio=0.0, logging_steps=1,
                save_steps=1000, seed=0)
    return training.TrainConfig(**{**base, **kw})


def test_seq_idx_numbers_the_rows_of_a_packed_batch():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    assert fast.seq_idx_from_position_ids(position_ids).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert fast.seq_idx_from_position_ids(position_ids).dtype == torch.int32


def test_packed_collator_concatenates_rows_without_padding():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = fast.PackedCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]
    assert "attention_mask" not in batch  # a mask of ones would hide the row boundaries from attention
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3  # read on the CPU


def test_packed_and_padded_batches_give_the_same_loss_rows_and_lora_gradients(tiny_dir, sample, tmp_path):
    tok, train = sample
    llm = tiny_model(tiny_dir, "*E*E")
    peft_model, _ = model.add_lora(llm, model.lora_config())
    record = check_fast.check(peft_model, tok, train, cfg_for(tmp_path), rows=6, steps=4,
                              compare_features=["packing,lean_experts"], float32=True)
    assert record["loss"]["abs_diff"] < 1e-5
    assert record["per_row"]["max_abs_diff_packed"] < 1e-5
    assert record["grads"]["without_grad"] == [] and record["grads"]["tensors"] > 0
    assert record["grads"]["max_rel_error"] < 1e-4
    assert record["grads_noise_floor"]["max_rel_error"] < 1e-4  # row by row: the same gradient in float32
    # the same rows, in the same order, through trainer.train(): the loss curves coincide
    assert len(record["training"]["fast"]) == len(record["training"]["standard"]) >= 4
    assert record["training"]["max_rel_diff"] < 1e-4
    # the piece-by-piece comparison and the float32 yardstick (the model is float32 on a CPU: all agree)
    assert [r["features"] for r in record["by_features"]] == ["packing,lean_experts"]
    assert record["by_features"][0]["grads"]["max_rel_error"] < 1e-4
    assert record["float32_reference"]["fast_bf16"]["max_rel_error"] < 1e-4
    assert record["float32_reference"]["standard_bf16"]["max_rel_error"] < 1e-4


def test_in_bf16_the_fast_path_is_as_close_to_float32_as_the_standard_path(tiny_dir, sample, tmp_path):
    """Under bf16 autocast both paths round, in different places. Against the float32 gradient the fast path may
    be no more than a quarter farther off than the standard path, and the two may differ by at most half of the
    standard path's own bf16 error: a precision bug in a fast piece (say, routing weights rounded too coarsely)
    breaks the second. On this model the fast-vs-standard gap is bf16 noise, not an error."""
    tok, train = sample
    peft_model, _ = model.add_lora(tiny_model(tiny_dir, "*EEE"), model.lora_config())
    trainer = training.make_trainer(peft_model, tok, train, cfg_for(tmp_path), save_strategy="no", report_to=[])
    examples = check_fast.tokenized_examples(trainer, 8)
    features = fast.parse_features(None)

    def grads(dtype, is_fast: bool):
        peft_model.get_base_model().to(dtype)
        for module in peft_model.modules():
            if hasattr(module, "lora_A"):  # PEFT keeps LoRA in float32 beside a bf16 model
                module.lora_A.float(), module.lora_B.float()
        check_fast.randomize_lora_b(peft_model)
        restore = fast.use_model_features(peft_model, features) if is_fast else None
        batch = fast.PackedCollator(model.pad_id(tok))(examples) if is_fast else trainer.data_collator(examples)
        peft_model.train()
        peft_model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            trainer.compute_loss(peft_model, batch).backward()
        if restore:
            restore()
        return {n: p.grad.float().clone() for n, p in check_fast.lora_parameters(peft_model).items()}

    exact = grads(torch.float32, False)
    standard, fast_path = grads(torch.bfloat16, False), grads(torch.bfloat16, True)
    standard_error = check_fast.compare_grads(standard, exact)["median_rel_error"]
    fast_error = check_fast.compare_grads(fast_path, exact)["median_rel_error"]
    between = check_fast.compare_grads(fast_path, standard)["median_rel_error"]
    assert 0 < standard_error < 0.2 and fast_error < 1.25 * standard_error, (standard_error, fast_error)
    # the two paths' roundings are mostly the same: they differ by far less than bf16 costs either of them
    # (fp8 routing weights in CompactExperts, for one, take this from ~0.26 to ~0.72)
    assert between < 0.5 * standard_error, (between, standard_error)


def test_fast_path_refuses_mamba_layers_without_the_fused_kernels(tiny_dir, sample, tmp_path):
    tok, train = sample
    llm, _ = model.load_model(tiny_dir)  # has Mamba blocks; CPU -> reference path
    peft_model, _ = model.add_lora(llm, model.lora_config())
    with pytest.raises(fast.PackingUnsupported, match="fused mamba_ssm kernels"):
        training.make_trainer(peft_model, tok, train, cfg_for(tmp_path, fast=True))


@pytest.mark.parametrize("policy,expected", [("all", {"attention": 2, "moe": 2}), ("none", {"attention": 0, "moe": 0}),
                                             ("moe", {"attention": 0, "moe": 2}),
                                             ("moe:1", {"attention": 0, "moe": 1})])
def test_checkpointing_policy_is_applied_when_training_starts(tiny_dir, sample, tmp_path, policy, expected):
    tok, train = sample
    peft_model, _ = model.add_lora(tiny_model(tiny_dir, "*E*E"), model.lora_config())
    cfg = cfg_for(tmp_path, fast=True, checkpointing=policy, max_steps=1)
    trainer = training.make_trainer(peft_model, tok, train, cfg, save_strategy="no", report_to=[])
    trainer.train()
    applied = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "policy")).applied
    assert applied == expected
    layers = peft_model.get_base_model().model.layers
    on = [fast._block_kind(layer.block_type) for layer in layers if layer.gradient_checkpointing]
    assert {kind: on.count(kind) for kind in ("attention", "moe")} == expected


def test_gc_freeze_hides_the_objects_of_before_training_from_the_collector_while_it_trains(tiny_dir, sample,
                                                                                              tmp_path):
    import gc

    from transformers import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(gc.get_freeze_count())

    tok, train = sample
    peft_model, _ = model.add_lora(tiny_model(tiny_dir, "*E*E"), model.lora_config())
    frozen = training.make_trainer(peft_model, tok, train, cfg_for(tmp_path / "a", fast=True, max_steps=1),
                                   callbacks=[Spy()], save_strategy="no", report_to=[])
    frozen.train()
    assert seen and seen[0] > 10_000  # the model, its modules and everything imported were frozen
    assert gc.get_freeze_count() == 0  # and handed back afterwards
    plain = training.make_trainer(peft_model, tok, train, cfg_for(tmp_path / "b", fast=True, max_steps=1,
                                                                  fast_features="packing"),
                                  save_strategy="no", report_to=[])
    assert not any(type(cb).__name__ == "_FrozenGC" for cb in plain.callback_handler.callbacks)


@pytest.mark.parametrize("policy", ["mamba,experts", "moe:x"])
def test_bad_checkpointing_policy_names_the_choices(policy):
    with pytest.raises(ValueError, match="'all', 'none' or a comma list"):
        fast.parse_policy(policy)


def test_checkpointing_policy_counts_blocks():
    assert fast.parse_policy("mamba, moe:8") == {"mamba": None, "moe": 8}
    assert fast.parse_policy("all") == {"mamba": None, "moe": None, "attention": None}
    assert fast.parse_policy("none") == {}


def test_expandable_segments_are_asked_for_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert fast.prefer_expandable_segments() is (not torch.cuda.is_initialized())
    import os
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert fast.prefer_expandable_segments() is False
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"  # the user's choice stays


def test_fold_accumulation_keeps_the_effective_batch():
    cfg = training.TrainConfig(per_device_train_batch_size=8, gradient_accumulation_steps=4)
    folded = fast.fold_accumulation(cfg)
    assert (folded.per_device_train_batch_size, folded.gradient_accumulation_steps) == (32, 1)


def test_lean_experts_match_transformers_experts_with_routed_expert_lora(tiny_dir):
    """Same outputs and the same LoRA gradients (routed experts included) as transformers' own implementation."""
    llm = tiny_model(tiny_dir, "E")
    peft_model, _ = model.add_lora(llm, model.lora_config(routed_experts=True))
    check_fast.randomize_lora_b(peft_model)
    x = torch.randn(37, llm.config.hidden_size)
    reference, _, ref_grads = _moe_run(peft_model, x)
    previous = fast.use_experts(peft_model)
    assert previous != "lean_grouped_mm"
    lean, _, lean_grads = _moe_run(peft_model, x)
    assert torch.allclose(lean, reference, atol=1e-5, rtol=1e-4)
    assert ref_grads.keys() == lean_grads.keys() and any(".experts." in n for n in ref_grads)
    for name in ref_grads:
        assert torch.allclose(lean_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4), name


def _moe_run(peft_model, x):
    """Output of the first MoE block for `x`, and every gradient (x's and the LoRA parameters')."""
    peft_model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    moe = peft_model.get_base_model().model.layers[0].mixer
    out = moe(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("routed_experts", [False, True])
def test_compact_experts_match_lean_experts_and_fall_back_for_routed_lora(tiny_dir, routed_experts, monkeypatch):
    """The written-out backward gives the same output and gradients as autograd through the lean experts: the
    input's gradient (through the experts and through the routing weights) and every LoRA gradient. With LoRA
    on the routed experts (weights that train) the lean experts run instead."""
    llm = tiny_model(tiny_dir, "E")
    peft_model, _ = model.add_lora(llm, model.lora_config(routed_experts=routed_experts))
    check_fast.randomize_lora_b(peft_model)
    x = torch.randn(37, llm.config.hidden_size)
    fast.use_experts(peft_model)
    lean, lean_x_grad, lean_grads = _moe_run(peft_model, x)
    calls = []
    original = fast.CompactExperts.apply
    monkeypatch.setattr(fast.CompactExperts, "apply", lambda *a: calls.append(1) or original(*a))
    assert fast.use_experts(peft_model, "compact_grouped_mm") == "lean_grouped_mm"
    compact, compact_x_grad, compact_grads = _moe_run(peft_model, x)
    assert bool(calls) is not routed_experts
    assert torch.allclose(compact, lean, atol=1e-5, rtol=1e-4)
    assert torch.allclose(compact_x_grad, lean_x_grad, atol=1e-5, rtol=1e-4)
    assert lean_grads.keys() == compact_grads.keys() and lean_grads
    assert any(".experts." in n for n in lean_grads) is routed_experts
    for name in lean_grads:
        assert torch.allclose(compact_grads[name], lean_grads[name], atol=1e-5, rtol=1e-4), name


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
    assert torch.autograd.gradcheck(lambda a, b: fast.CompactExperts.apply(a, b, index, up, down, False),
                                    (x, weights), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_fused_expert_steps_compile_the_same_maths():
    """fused_expert_act + fused_slot_sum: the torch.compile'd steps give CompactExperts' eager results
    (here on a CPU, where inductor writes C++; on a GPU it writes one Triton kernel each)."""
    torch.manual_seed(0)
    tokens, experts, k, hidden, inner = 9, 4, 2, 8, 16
    index = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    up, down = torch.randn(experts, inner, hidden), torch.randn(experts, hidden, inner)
    x, weights, grad = torch.randn(tokens, hidden), torch.rand(tokens, k), torch.randn(tokens, hidden)
    results = []
    for fused in (frozenset(), frozenset({"act", "sum"})):
        xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = fast.CompactExperts.apply(xi, wi, index, up, down, False, fused)
        out.backward(grad)
        results.append((out.detach(), xi.grad, wi.grad))
    for eager, fused in zip(*results):
        assert torch.allclose(fused, eager, atol=1e-5, rtol=1e-5)
    assert {fast._relu2_weighted, fast._relu2_weighted_backward, fast._add_up_slots} <= set(fast._COMPILED)
    for name in ("fused_expert_act", "fused_slot_sum"):
        with pytest.raises(ValueError, match="add 'compact_experts'"):
            fast.parse_features(f"packing,{name}")


def test_model_features_mark_the_compiled_expert_steps_and_take_them_back(tiny_dir):
    llm = tiny_model(tiny_dir, "E")
    experts = llm.model.layers[0].mixer.experts
    restore = fast.use_model_features(llm, {"compact_experts", "fused_slot_sum"})
    assert experts._fast_fused == frozenset({"sum"}) and llm.config._experts_implementation == "compact_grouped_mm"
    restore()
    assert not hasattr(experts, "_fast_fused") and llm.config._experts_implementation != "compact_grouped_mm"


def test_bf16_relu2_gives_the_float32_squares_bits_without_float32_tensors():
    """ReLUSquared in bf16 == the float32 square rounded to bf16 (what autocast feeds the next matmul), forward
    and backward, and use_model_features swaps it into the shared experts and back."""
    x = torch.randn(4096, dtype=torch.bfloat16).requires_grad_(True)
    grad = torch.randn(4096, dtype=torch.bfloat16)
    out = fast.ReLUSquared()(x)
    out.backward(grad)
    reference_x = x.detach().float().requires_grad_(True)
    reference = torch.square(torch.relu(reference_x))
    reference.backward(grad.float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.to(torch.bfloat16))
    assert torch.equal(x.grad, reference_x.grad.to(torch.bfloat16))


def test_bf16_relu2_is_switched_into_the_shared_experts_and_back(tiny_dir):
    llm = tiny_model(tiny_dir, "*E")
    shared = llm.model.layers[1].mixer.shared_experts
    stock = shared.act_fn
    restore = fast.use_model_features(llm, {"bf16_relu2"})
    assert isinstance(shared.act_fn, fast.ReLUSquared)
    restore()
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
    llm = tiny_model(tiny_dir, "*E")
    peft_model, _ = model.add_lora(llm, model.lora_config())
    check_fast.randomize_lora_b(peft_model)
    ids = torch.randint(3, 200, (2, 13))
    reference, ref_grads = _logits_and_lora_grads(peft_model, ids)
    ref_bf16, _ = _logits_and_lora_grads(peft_model, ids, autocast=True)
    restore = fast.use_model_features(peft_model, {"lora_addmm"})
    peft_calls = []  # PEFT's own forward calls lora_B as a module; the addmm path only reads its weight
    hook = peft_model.get_base_model().model.layers[0].mixer.q_proj.lora_B["default"].register_forward_hook(
        lambda *a: peft_calls.append(1))
    fused, grads = _logits_and_lora_grads(peft_model, ids)
    fused_bf16, _ = _logits_and_lora_grads(peft_model, ids, autocast=True)
    assert not peft_calls and torch.allclose(fused, reference, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4), name
    assert (fused_bf16.float() - ref_bf16.float()).abs().max() < 0.05 * ref_bf16.float().abs().max()
    peft_model.get_base_model().to(torch.bfloat16)  # bf16 layers, float32 LoRA, no autocast: PEFT's float32 sum
    for module in peft_model.modules():
        if hasattr(module, "lora_A"):
            module.lora_A.float(), module.lora_B.float()
    with torch.no_grad():
        assert peft_model(input_ids=ids).logits.dtype == torch.float32 and peft_calls
    restore()
    hook.remove()
    assert all("forward" not in vars(m) for m in peft_model.modules())

    with_dropout, _ = model.add_lora(tiny_model(tiny_dir, "*E"), model.lora_config(dropout=0.5))
    fast.use_lora_addmm(with_dropout)
    with_dropout.eval()  # dropout off in eval, but the layer has a Dropout: PEFT's forward must run
    layer = with_dropout.get_base_model().model.layers[0].mixer.q_proj
    seen = []
    layer.lora_B["default"].register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        with_dropout(input_ids=ids)
    assert seen


def test_varlen_attention_needs_packing():
    with pytest.raises(ValueError, match="add 'packing'"):
        fast.parse_features("lean_experts,varlen_attention")


def test_row_bounds_are_flash_attentions_row_offsets():
    cu_seqlens, longest = fast.row_bounds(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]]))
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 10] and cu_seqlens.dtype == torch.int32 and longest == 4


def test_varlen_attention_keeps_packed_rows_apart_and_leaves_padded_batches_to_sdpa(tiny_dir, monkeypatch):
    """Packed rows attend only to themselves (same logits as each row alone); a padded batch with a mask,
    e.g. in evaluation, gets exactly the SDPA result."""
    llm = tiny_model(tiny_dir, "*E*E").eval()
    rows = [torch.randint(3, 200, (n,)) for n in (5, 9, 3)]
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
    mask = (torch.arange(padded.shape[1]) < torch.tensor([[5], [9], [3]])).long()
    with torch.no_grad():
        alone = [llm(input_ids=r[None]).logits[0] for r in rows]
        sdpa_padded = llm(input_ids=padded, attention_mask=mask).logits
        assert fast.use_varlen_attention(llm) == "sdpa"
        calls, original = [], fast._attend_row_by_row

        def spy(q, k, v, cu_seqlens, scale):
            calls.append(cu_seqlens.tolist())
            return original(q, k, v, cu_seqlens, scale)
        monkeypatch.setattr(fast, "_attend_row_by_row", spy)
        packed_ids = torch.cat(rows)[None]
        position_ids = torch.cat([torch.arange(len(r)) for r in rows])[None]
        packed = llm(input_ids=packed_ids, position_ids=position_ids).logits[0]
        varlen_padded = llm(input_ids=padded, attention_mask=mask).logits
        # PackedCollator's batch carries the bounds, read on the CPU: no row_bounds (and no GPU wait) at all
        batch = fast.PackedCollator(0)([{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows])
        monkeypatch.setattr(fast, "row_bounds", lambda position_ids: pytest.fail("bounds found again"))
        from_collator = llm(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    assert calls and calls[0] == [0, 5, 14, 17]  # the row path ran, with the rows' bounds
    assert calls[-1] == [0, 5, 14, 17] and torch.equal(from_collator, packed)
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)
    assert torch.equal(varlen_padded, sdpa_padded)


def test_lora_bf16_skips_only_the_float32_round_trip_under_autocast(tiny_dir):
    """Under bf16 autocast the LoRA layers see bf16 inputs and give bit-identical outputs; outside it PEFT's cast
    still runs, and restoring the model undoes the switch."""
    llm = tiny_model(tiny_dir, "*E").to(torch.bfloat16)
    peft_model, _ = model.add_lora(llm, model.lora_config())
    check_fast.randomize_lora_b(peft_model)
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
    restore = fast.use_model_features(peft_model, {"lora_bf16"})
    assert torch.equal(logits(True), reference) and set(seen) == {torch.bfloat16}
    logits(False)
    assert set(seen) == {torch.float32}  # no autocast: PEFT's cast as before, so bf16 x float32 cannot clash
    restore()
    logits(True)
    assert set(seen) == {torch.float32}
    for hook in hooks:
        hook.remove()


@pytest.mark.skipif(fast.kernels_problem() is None, reason="this machine has the fused Mamba kernels")
def test_train_py_fast_stops_before_loading_anything_without_the_kernels(tmp_path):
    import train

    with pytest.raises(SystemExit, match="fused mamba_ssm kernels"):
        train.main(["--preset", "smoke", "--fast", "--set", f"output_root={tmp_path}", f"data_dir={tmp_path / 'd'}"])
    assert not (tmp_path / "d").exists()  # no data prepared, no model loaded


def test_fast_flag_packs_the_same_effective_batch():
    import train

    cfg = train.config_from_args(train.parse_args(["--fast"]))
    plain = train.config_from_args(train.parse_args([]))
    assert cfg.fast and cfg.gradient_accumulation_steps == 1
    assert cfg.per_device_train_batch_size == plain.per_device_train_batch_size * plain.gradient_accumulation_steps


def test_fast_like_reruns_an_earlier_run_with_its_config(tmp_path):
    """`train.py --fast --like RUN`: notebook 03's config and data, named RUN-fast, same rows per step."""
    import dataclasses
    import json

    import train

    earlier = training.TrainConfig(run_name="nb03", per_device_train_batch_size=8, gradient_accumulation_steps=4,
                                   learning_rate=1e-4, max_steps=25, routed_experts=True, data_dir=str(tmp_path / "d"))
    (tmp_path / "nb03").mkdir()
    config = dataclasses.asdict(earlier) | {"a_field_from_another_version": 1}
    (tmp_path / "nb03" / "metrics.json").write_text(json.dumps({"config": config}))
    cfg = train.config_from_args(train.parse_args(["--fast", "--like", str(tmp_path / "nb03")]))
    assert cfg.run_name == "nb03-fast" and cfg.fast
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (32, 1)
    assert (cfg.learning_rate, cfg.max_steps, cfg.routed_experts, cfg.data_dir) == (1e-4, 25, True, str(tmp_path / "d"))


def test_trace_ops_charges_each_copy_to_its_line_and_sees_lora_bf16_remove_one(tmp_path):
    """benchmarks/trace_ops.py --ops copies: PEFT's float32 copy of every LoRA input shows up, with its line, on
    the standard path, and is gone with lora_bf16; backward copies are charged to the forward line that made them."""
    import json

    import trace_ops

    common = ["--arch", "tiny", "--tokens", "512", "--top", "500", "--ops", "copies"]
    standard = trace_ops.main(common + ["--variant", "standard", "--out", str(tmp_path / "standard.json")])
    assert json.loads((tmp_path / "standard.json").read_text())["calls"] == standard["calls"] > 0
    assert {r["op"] for r in standard["top"]} <= trace_ops.COPY_OPS
    peft_casts = [r for r in standard["top"] if "peft/tuners/tuners_utils.py" in r["where"]]
    assert peft_casts and {r["dtypes"] for r in peft_casts} >= {"bf16->f32"}
    assert any(r["phase"] == "backward" and "modeling_nemotron_h.py" in r["where"] for r in standard["top"])
    lean = trace_ops.main(common + ["--variant", "fast", "--fast-features", "packing,lean_experts,lora_bf16"])
    assert not any("peft/tuners/tuners_utils.py" in r["where"] for r in lean["top"])


def test_trace_ops_all_ops_ranks_lines_and_sums_them_by_file():
    """Every op mode: matmuls are there (forward and backward), ranked by bytes on a CPU, and the per-file
    totals add up to the whole step."""
    import trace_ops

    out = trace_ops.main(["--arch", "tiny", "--tokens", "256", "--variant", "standard", "--top", "100000"])
    ops = {(r["op"], r["phase"]) for r in out["top"]}
    assert {("aten.mm", "forward"), ("aten.mm", "backward")} <= ops
    sizes = [r["gib"] for r in out["top"]]
    assert sizes == sorted(sizes, reverse=True) and out["unit"] == "GiB"
    assert abs(sum(out["by_file"].values()) - out["total"]) < 1e-2
    assert any(f.endswith("modeling_nemotron_h.py") for f in out["by_file"])


def _fake_fused_kernel(calls):
    """Stands in for mamba_ssm's fused Mamba kernel: a pre-projection step, then the projection if given."""
    def kernel(zxbcdt, outproj_weight=None, outproj_bias=None, return_final_states=False):
        calls.append(outproj_weight)
        out = zxbcdt * 3.0  # saves nothing for backward, so any saved activation below is the projection's
        return out if outproj_weight is None else torch.nn.functional.linear(out, outproj_weight, outproj_bias)
    return kernel


def test_frozen_out_proj_projects_after_the_kernel_with_the_same_result_and_no_saved_activation():
    calls = []
    kernel = _fake_fused_kernel(calls)
    z = torch.randn(16, 8, requires_grad=True)
    weight, bias = torch.randn(5, 8), torch.randn(5)
    expected = kernel(z, outproj_weight=weight, outproj_bias=bias)
    expected_grad, = torch.autograd.grad(expected.square().sum(), z)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = fast.project_after_kernel(kernel, z, outproj_weight=weight, outproj_bias=bias)
    grad, = torch.autograd.grad(out.square().sum(), z)
    assert calls[-1] is None  # the kernel ran without the projection
    assert torch.equal(out, expected) and torch.equal(grad, expected_grad)
    assert z.shape not in saved  # a frozen weight: F.linear keeps no copy of its input

    trainable = weight.clone().requires_grad_(True)
    fast.project_after_kernel(kernel, z, outproj_weight=trainable, outproj_bias=bias)
    assert calls[-1] is trainable  # a projection that trains stays inside the kernel
    fast.project_after_kernel(kernel, z, outproj_weight=weight, return_final_states=True)
    assert calls[-1] is weight
    assert fast.project_after_kernel(lambda *a, **k: None, z, outproj_weight=weight) is None  # transformers' stub


def test_frozen_out_proj_reaches_nemotron_h_mamba_layers_and_is_put_back(tiny_dir, monkeypatch):
    """The mixer hands its out_proj to the fused kernel by keyword; with the piece on, the kernel gets none."""
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
    restore = fast.use_model_features(llm, {"frozen_out_proj"})
    after = llm(input_ids=ids, use_cache=False).logits
    assert calls[-1] is None and torch.equal(before, after)
    restore()
    assert modeling_nemotron_h.mamba2_split_conv1d_scan_combined is stub


def test_kernel_status_reads_through_the_frozen_out_proj_wrapper():
    from transformers.models.nemotron_h import modeling_nemotron_h

    before = model.fast_kernels_status()["implementations"]
    kernel = fast.use_frozen_out_proj()
    try:
        assert modeling_nemotron_h.mamba2_split_conv1d_scan_combined is not kernel
        assert model.fast_kernels_status()["implementations"] == before
    finally:
        modeling_nemotron_h.mamba2_split_conv1d_scan_combined = kernel
