"""The teacher π_φ: the same network as the student, with teacher weights swapped in.

The student and the teacher share one model in memory. The teacher keeps its own copy
of exactly the parameters the student trains — the LoRA adapter under LoRA, all weights
under full fine-tuning — and `active()` swaps that copy in for a teacher pass.

* frozen: the copy is the initial weights (under LoRA, B=0: the base model).
* ema: every N optimizer steps φ ← β φ + (1−β) θ over those parameters (docs/method.md §2.2).

This fixes the public reference's defect: it averaged the frozen base weights, which
are identical in student and teacher, and skipped the LoRA weights, so its teacher
never moved. Averaging what the student actually learns makes the teacher follow it.

While the teacher's LoRA B matrices are all zero (a frozen teacher, or an EMA teacher
before its first update) its adapter adds exactly zero, so a teacher pass runs with
the adapter switched off instead: the same numbers, without the adapter's matmuls.

Under sharded training (`unisd.sharding`) the tracked parameters and the teacher's copy
are both shards with the same layout, so the swap and the EMA update are each process's
piece of the whole one; `state_dict` gathers whole tensors (every process must call it)
and `load_state_dict` takes whole tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch

from unisd.sharding import any_nonzero, copy_full_, full_state, reshard


class Teacher:
    def __init__(self, model: torch.nn.Module, kind: str = "frozen", every: int = 10, beta: float = 0.9) -> None:
        self.kind, self.every, self.beta = kind, every, beta
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters for a teacher to track")
        self.weights = {n: p.detach().clone() for n, p in self.params.items()}
        self._check_base()

    def _check_base(self) -> None:
        """Whether the teacher is the base model: a LoRA adapter whose B matrices are zero."""
        lora_b = [w for n, w in self.weights.items() if "lora_B" in n]
        self.is_base = (
            hasattr(self.model, "disable_adapter")
            and len(lora_b) > 0
            and not any_nonzero(lora_b)
            and all("lora_" in n for n in self.weights)
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Teacher weights in, eval mode (no dropout), no grad; student weights back after."""
        was_training = self.model.training
        self.model.eval()
        if self.is_base:
            try:
                with torch.no_grad(), cast(Any, self.model).disable_adapter():  # a peft model
                    yield
            finally:
                self.model.train(was_training)
            return
        reshard(self.model)  # the swap writes the pieces the next forward gathers
        student = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.weights[n])
        try:
            with torch.no_grad():
                yield
        finally:
            reshard(self.model)
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(student[n])
            self.model.train(was_training)

    def weight(self, name: str, current: torch.Tensor) -> torch.Tensor:
        """The teacher's value of a parameter (the student's own if the teacher does not track it)."""
        return self.weights.get(name, current.detach())

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """Apply the EMA update after optimizer step `step` (1-based); True if it moved."""
        if self.kind != "ema" or step % self.every:
            return False
        for n, p in self.params.items():
            self.weights[n].lerp_(p.detach(), 1.0 - self.beta)
        self._check_base()
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole CPU tensors (gathered from shards)."""
        return full_state(self.weights)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.weights) - set(state)
        if missing:
            raise ValueError(f"teacher state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]!r}")
        for n in self.weights:
            copy_full_(self.weights[n], state[n])
        self._check_base()
