"""A new repair step in one file: ``shrink[:f=X]`` scales every kept weight by X (default 0.99); masks stay."""

from dataclasses import dataclass

import torch
from torch import nn

from rr_alloc.errors import UserError
from rr_alloc.repair.steps import StepContext, StepKind, register


@dataclass(frozen=True)
class Shrink:
    factor: float = 0.99

    def __str__(self) -> str:
        return f"shrink:f={self.factor:g}"


@register
class ShrinkKind(StepKind):
    methods = ("shrink",)
    usage = "shrink[:f=X]"
    usage_rank = 99
    grammar = "shrink[:f=X]   scale every kept weight by X (default 0.99)"

    def owns(self, step) -> bool:
        return isinstance(step, Shrink)

    def parse(self, part: str, text: str) -> Shrink | None:
        head, *opts = part.split(":")
        if head != "shrink":
            return None
        if not opts:
            return Shrink()
        key, _, value = opts[0].partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if key != "f" or len(opts) > 1 or not 0 < factor <= 1:
            raise UserError(f"repair step {part!r}: use shrink or shrink:f=X with X in (0, 1]")
        return Shrink(factor)

    def apply(self, step: Shrink, pruned: nn.Module, ctx: StepContext) -> None:
        with torch.no_grad():
            for m in pruned.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.mul_(step.factor)
