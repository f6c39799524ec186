"""`applied(trainer, settings)`: every fast piece on for the length of a `with` block, and nothing after it.

    with fastpath.applied(trainer, settings) as report:   # report: {piece: modules (or bindings) changed}
        trainer.train()

On any exit (the end of the block, an exception, Ctrl-C) every change is undone (`undo.Patches`): module
attributes, the Mamba kernel binding, transformers' registry entries and implementation names, checkpointing
flags, the Trainer callbacks added here, and the garbage collector's freeze. `model_pieces(model, settings)`
does the same for the model-level pieces alone, without a Trainer (the benchmarks call the model directly).
"""

from __future__ import annotations

import contextlib
import gc

from .blocks import blocks
from .experts import FUSED_STEPS, frozen_experts, routed_experts, use_experts
from .layers import (attention_layers, frozen_projection_mixers, fused_norms_problem, lora_layers, relu2_mlps,
                     rms_norms, use_bf16_relu2, use_frozen_out_proj, use_fused_norms, use_lora_addmm,
                     use_lora_bf16, use_varlen_attention)
from .memory import CheckpointPolicy, FrozenGC, policy_wants
from .packing import PackedCollator, forget_row_bounds
from .settings import FEATURES, FEATURES_FLAG, POLICY_FLAG, ROUND_TO, Refused, Settings
from .undo import Patches

MODEL_PIECES = ("lean_experts", "compact_experts", "fused_expert_act", "fused_slot_sum", "bf16_relu2", "fused_norms",
                "varlen_attention", "lora_bf16", "lora_addmm", "frozen_out_proj")
UNITS = {  # what a piece's count in the report counts
    "packing": "collator", "round_lengths": "collator", "lean_experts": "routed-expert modules",
    "compact_experts": "frozen routed-expert modules", "fused_expert_act": "frozen routed-expert modules",
    "fused_slot_sum": "frozen routed-expert modules", "bf16_relu2": "ReLU² MLPs", "fused_norms": "RMSNorms",
    "varlen_attention": "attention layers", "lora_bf16": "LoRA layers", "lora_addmm": "LoRA Linear layers",
    "frozen_out_proj": "kernel binding (modeling_nemotron_h's fused Mamba kernel)",
    "gc_freeze": "garbage collector (frozen when training starts)",
    "checkpointing": "blocks that keep their activations instead of recomputing them",
}


def why_not(piece: str, model) -> str | None:
    """Why `piece` would change nothing in `model` (or cannot run on it), or None when it applies."""
    if piece in ("lean_experts", "compact_experts", "fused_expert_act", "fused_slot_sum") and not routed_experts(model):
        return "the model has no routed experts"
    if piece in ("compact_experts", *FUSED_STEPS) and not frozen_experts(model):
        return "every routed expert trains (LoRA on the routed experts), and compact_experts runs frozen ones only"
    if piece == "bf16_relu2" and not relu2_mlps(model):
        return "the model has no ReLU² MLP (shared experts)"
    if piece == "fused_norms":
        return "the model has no RMSNorm" if not rms_norms(model) else fused_norms_problem(model)
    if piece == "varlen_attention" and not attention_layers(model):
        return "the model has no attention layer"
    if piece == "lora_bf16" and not any(hasattr(m, "lora_A") for m in model.modules()):
        return "the model has no LoRA layer"
    if piece == "lora_addmm" and not lora_layers(model):
        return "the model has no LoRA layer on a Linear"
    if piece == "frozen_out_proj" and not frozen_projection_mixers(model):
        return "the model has no Mamba layer with a frozen output projection"
    if piece == "gc_freeze":
        if not gc.isenabled():
            return "Python's garbage collector is off"
        if gc.get_freeze_count():
            return "Python's garbage collector is already frozen (gc.freeze() ran before)"
    return None


def _fitting(pieces, model, settings: Settings, notes: dict) -> list[str]:
    """The pieces that apply to `model`, in FEATURES' order. One that does not: Refused if the user named it,
    else left out with its reason in `notes`."""
    kept = []
    for piece in [f for f in FEATURES if f in pieces]:
        reason = why_not(piece, model)
        if reason is None:
            kept.append(piece)
        elif settings.explicit:
            raise Refused(f"{piece} changes nothing here: {reason}. Leave it out of {FEATURES_FLAG}.")
        else:
            notes[piece] = reason
    return kept


def _use_model_pieces(model, pieces: list[str], patches: Patches) -> dict[str, int]:
    """Apply the model-level pieces (all known to fit); returns {piece: modules changed}."""
    report = {}
    if "lean_experts" in pieces:  # compact_experts refines lean_experts for the frozen experts
        compact = "compact_experts" in pieces
        fused = frozenset(step for piece, step in FUSED_STEPS.items() if piece in pieces)
        report["lean_experts"] = use_experts(model, "compact_grouped_mm" if compact else "lean_grouped_mm",
                                             patches, fused)
        for piece in ("compact_experts", *FUSED_STEPS):
            if piece in pieces:
                report[piece] = len(frozen_experts(model))
    uses = {"bf16_relu2": use_bf16_relu2, "fused_norms": use_fused_norms, "varlen_attention": use_varlen_attention,
            "lora_bf16": use_lora_bf16, "lora_addmm": use_lora_addmm, "frozen_out_proj": use_frozen_out_proj}
    for piece, use in uses.items():
        if piece in pieces:
            report[piece] = use(model, patches)
    for piece, count in report.items():
        if not count:  # why_not said it applies: the library no longer looks the way the piece expects
            raise Refused(f"{piece} changed no module, although the model seems to have what it changes: the "
                          "installed libraries differ from the verified ones (fastpath.check_versions).")
    return report


def print_report(report: dict, notes: dict, settings: Settings) -> None:
    """One line per applied piece (and per default piece left out)."""
    print(f"Fast path: {len(report)} pieces applied ({settings!r})")
    for piece, count in report.items():
        policy = f" (policy {settings.checkpointing})" if piece == "checkpointing" else ""
        print(f"  {piece}: {count} {UNITS[piece]}{policy}")
    for piece, reason in notes.items():
        print(f"  {piece}: left out ({reason})")


@contextlib.contextmanager
def _undo_log():
    """A fresh undo log for the block; on any exit, normal or not, every change in it is undone (and the packed
    batch's row bounds forgotten)."""
    patches = Patches()
    try:
        yield patches
    finally:
        try:
            patches.undo()
        finally:
            forget_row_bounds()


@contextlib.contextmanager
def model_pieces(model, settings: Settings, quiet: bool = False):
    """The model-level pieces of `settings` (experts, norms, ReLU², attention, LoRA, the Mamba kernel binding) on
    `model` inside the block, undone on any exit; yields {piece: modules changed}. No Trainer needed: packing,
    round_lengths, gc_freeze and the checkpointing policy are left to `collator` and `applied`."""
    notes = {}
    with _undo_log() as patches:
        report = _use_model_pieces(model, _fitting(set(settings.pieces) & set(MODEL_PIECES), model, settings, notes),
                                   patches)
        if not quiet:
            print_report(report, notes, settings)
        yield report


def _collator_pieces(trainer, settings: Settings) -> dict[str, int]:
    """packing and round_lengths live in the trainer's data collator: check it is the one `settings` asks for."""
    packs = isinstance(trainer.data_collator, PackedCollator)
    if "packing" not in settings.pieces:
        if packs:
            raise Refused("The trainer packs its batches (fastpath.collator), but packing is not in "
                          f"{FEATURES_FLAG}: build the trainer with the collator of the same settings.")
        return {}
    if not packs:
        raise Refused("packing is on, but the trainer pads its batches: build it with "
                      "data_collator=fastpath.collator(model, tokenizer, settings).")
    rounds = trainer.data_collator.pad_to_multiple_of == ROUND_TO
    if rounds != ("round_lengths" in settings.pieces):
        raise Refused("The trainer's collator and the settings disagree on round_lengths: build the trainer with "
                      "data_collator=fastpath.collator(model, tokenizer, settings).")
    return {"packing": 1, **({"round_lengths": 1} if rounds else {})}


def _checkpointing_piece(trainer, model, settings: Settings, patches: Patches) -> dict[str, int]:
    """The checkpointing policy, applied by a callback once the Trainer has turned checkpointing on."""
    if settings.checkpointing == "all":
        return {}  # the Trainer's own behaviour: nothing to change
    on = trainer.args.gradient_checkpointing or any(
        b.gradient_checkpointing and hasattr(b, "_gradient_checkpointing_func") for b in blocks(model))
    if not on:
        raise Refused(f"{POLICY_FLAG} {settings.checkpointing} chooses which blocks recompute, but gradient "
                      f"checkpointing is off: turn it on (gradient_checkpointing=true), or leave out {POLICY_FLAG}.")
    kept = sum(not wanted for wanted in policy_wants(model, settings.checkpointing))
    if not kept:
        raise Refused(f"{POLICY_FLAG} {settings.checkpointing} recomputes every block of this model, as the "
                      f"default 'all' does: leave out {POLICY_FLAG}, or name fewer blocks (e.g. moe:2).")
    patches.add_callback(trainer, CheckpointPolicy(model, settings.checkpointing, patches))
    return {"checkpointing": kept}


@contextlib.contextmanager
def applied(trainer, settings: Settings, quiet: bool = False):
    """Every fast piece of `settings` on `trainer` and its model inside the block; yields {piece: count}.

    The report lists the pieces really applied (packing and round_lengths: the trainer's collator, checked here;
    the model-level pieces: modules changed; frozen_out_proj: the binding changed; gc_freeze and the
    checkpointing policy: callbacks that act when training starts). A piece named in `settings` that would
    change nothing is refused; from the default set it is left out, and the printed report says why.
    On any exit, normal or not, everything is undone (see the module docstring).
    """
    model, notes = trainer.model, {}
    with _undo_log() as patches:
        report = _collator_pieces(trainer, settings)
        fitting = _fitting(settings.pieces - {"packing", "round_lengths"}, model, settings, notes)
        report |= _use_model_pieces(model, [p for p in fitting if p in MODEL_PIECES], patches)
        if "gc_freeze" in fitting:
            patches.on_undo(gc.unfreeze)
            patches.add_callback(trainer, FrozenGC())
            report["gc_freeze"] = 1
        report |= _checkpointing_piece(trainer, model, settings, patches)
        report = {piece: report[piece] for piece in [*FEATURES, "checkpointing"] if piece in report}
        if not quiet:
            print_report(report, notes, settings)
        yield report
