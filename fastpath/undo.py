"""`Patches`: every change the fast path makes, written down so that it can be undone exactly.

Each piece changes the process through one `Patches` object: an attribute of a model's module, a binding
in a library module, an entry in one of transformers' registries, a Trainer callback, or anything else with
its own undo step. `Patches.undo()` puts everything back, newest first, and is what `fastpath.applied` runs
on every exit: a normal one, an exception, or Ctrl-C.

Library-wide changes are limited to the closed lists below (LIBRARY_TARGETS, REGISTRIES): a piece that tries
to change anything else fails at once, and the tests snapshot exactly these lists (plus every module of the
model) before and after training, so a change that is not undone cannot go unnoticed.
"""

from __future__ import annotations

import importlib

import torch

# (module, attribute) bindings the fast path may replace for the whole process while it is applied
LIBRARY_TARGETS = (
    # frozen_out_proj: modeling_nemotron_h looks its fused Mamba kernel up as a module global on every call
    ("transformers.models.nemotron_h.modeling_nemotron_h", "mamba2_split_conv1d_scan_combined"),
)
# transformers' registries of implementations (class, whose `_global_mapping` `register` updates)
REGISTRIES = (
    ("transformers.integrations.moe", "ExpertsInterface"),           # lean_experts, compact_experts
    ("transformers.modeling_utils", "AttentionInterface"),           # varlen_attention
    ("transformers.masking_utils", "AttentionMaskInterface"),        # varlen_attention
)


def resolve(module_name: str, attribute: str):
    """`module_name.attribute`, imported."""
    return getattr(importlib.import_module(module_name), attribute)


def registries() -> list:
    """The registry classes of REGISTRIES (imports transformers)."""
    return [resolve(module, name) for module, name in REGISTRIES]


def _has_own(obj, name: str) -> bool:
    """True when `name` is set on `obj` itself (not only on its class); for a torch module, a submodule,
    parameter or buffer of that name counts too. A property counts: it is put back through its setter."""
    if isinstance(obj, torch.nn.Module) and any(name in vars(obj).get(kind, {})
                                                for kind in ("_modules", "_parameters", "_buffers")):
        return True
    return name in vars(obj) or isinstance(getattr(type(obj), name, None), property)


class Patches:
    """An undo log. Each method makes one change and remembers how to reverse it; `undo()` reverses them all."""

    def __init__(self):
        self._undo: list = []

    def set(self, obj, name: str, value) -> None:
        """`setattr(obj, name, value)`; undone by putting the old value back, or by deleting the attribute where
        it was only the class's (a module's `forward`), so that the class's shows through again."""
        own = _has_own(obj, name)
        old = getattr(obj, name) if own else None
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if own else delattr(obj, name))

    def set_global(self, module_name: str, name: str, value) -> None:
        """Rebind `module_name.name` for the whole process (only the bindings listed in LIBRARY_TARGETS)."""
        if (module_name, name) not in LIBRARY_TARGETS:
            raise ValueError(f"{module_name}.{name} is not in fastpath.undo.LIBRARY_TARGETS: list it there, so "
                             "that the tests check it is put back.")
        self.set(importlib.import_module(module_name), name, value)

    def register(self, interface, key: str, function) -> None:
        """`interface.register(key, function)` in one of transformers' REGISTRIES; undone by restoring the entry
        that was there, or removing the key."""
        if (interface.__module__, interface.__name__) not in REGISTRIES:
            raise ValueError(f"{interface.__module__}.{interface.__name__} is not in fastpath.undo.REGISTRIES.")
        mapping = interface._global_mapping
        had, old = key in mapping, mapping.get(key)
        interface.register(key, function)
        self._undo.append(lambda: mapping.__setitem__(key, old) if had else mapping.pop(key, None))

    def add_callback(self, trainer, callback) -> None:
        """`trainer.add_callback(callback)`; undone by removing that callback."""
        trainer.add_callback(callback)
        self._undo.append(lambda: trainer.remove_callback(callback))

    def on_undo(self, step) -> None:
        """Run `step()` when undoing (for changes with their own way back, e.g. `gc.unfreeze`)."""
        self._undo.append(step)

    def undo(self) -> None:
        """Reverse every change, newest first. Every step runs even if one fails; then the first failure is raised."""
        errors = []
        while self._undo:
            step = self._undo.pop()
            try:
                step()
            except Exception as error:  # keep undoing the rest
                errors.append(error)
        if errors:
            raise errors[0]
