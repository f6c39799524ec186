"""The fast path: the same rows, the same LoRA and the same loss as the standard path, with less wasted work.

Opt-in (`train.py --fast`); notebooks 01-03 never import it. fastpath/README.md lists every piece, what it
replaces and how exact it is. train.py uses it like this:

    settings = fastpath.Settings(features, checkpointing)     # --fast-features, --checkpointing; checked at once
    fastpath.check_versions(allow_other_versions)             # --any-version
    fastpath.prepare_process(settings)                        # before any model loads
    cfg = fastpath.fold_accumulation(cfg)                     # the same rows per step in one packed micro-batch
    trainer = SFTTrainer(..., data_collator=fastpath.collator(model, tokenizer, settings))
    with fastpath.applied(trainer, settings) as report:       # {piece: modules changed}; all undone on exit
        trainer.train()

Modules, by job: settings (names, Settings, Refused), versions (the verified versions), packing (collator),
experts and layers (the pieces that change the model), memory (checkpointing policy, allocator, gc_freeze),
undo (the undo log), scope (`applied`, `model_pieces`), blocks (finding blocks in a Nemotron-H model).
"""

import sys
from pathlib import Path

_NOTEBOOKS = str(Path(__file__).resolve().parents[1] / "notebooks")  # `helpers` (the tutorial's helpers) lives there
if _NOTEBOOKS not in sys.path:
    sys.path.insert(0, _NOTEBOOKS)

from .blocks import base_of, block_kind, has_mamba_layers  # noqa: E402
from .memory import prefer_expandable_segments, prepare_process, set_checkpointing  # noqa: E402
from .packing import (PackedCollator, PackingUnsupported, batch_to, collator, fold_accumulation,  # noqa: E402
                      kernels_problem, require_packing_support, row_bounds, seq_idx_from_position_ids)
from .scope import applied, model_pieces  # noqa: E402
from .settings import (FEATURES, GPU_ONLY, POLICY_BLOCKS, REQUIRES, ROUND_TO, Refused, Settings,  # noqa: E402
                       parse_features, parse_policy)
from .versions import VERIFIED, check_versions  # noqa: E402

__all__ = [
    "FEATURES", "GPU_ONLY", "POLICY_BLOCKS", "REQUIRES", "ROUND_TO", "VERIFIED", "PackedCollator",
    "PackingUnsupported", "Refused", "Settings", "applied", "base_of", "batch_to", "block_kind", "check_versions",
    "collator", "fold_accumulation", "has_mamba_layers", "kernels_problem", "model_pieces", "parse_features",
    "parse_policy", "prefer_expandable_segments", "prepare_process", "require_packing_support", "row_bounds",
    "seq_idx_from_position_ids", "set_checkpointing",
]
