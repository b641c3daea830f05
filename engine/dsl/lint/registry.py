"""The lint rules `fusion validate` runs, in the order docs/lint.md lists them."""

from __future__ import annotations

from engine.dsl.lint.base import Rule
from engine.dsl.lint.for_each_not_list import ForEachNotList
from engine.dsl.lint.repeat_without_until import RepeatWithoutUntil
from engine.dsl.lint.skipped_read import SkippedRead
from engine.dsl.lint.undeclared_input import UndeclaredInput
from engine.dsl.lint.unused_config import UnusedConfig
from engine.dsl.lint.unused_step import UnusedStep
from engine.dsl.lint.when_constant import WhenConstant

RULES: tuple[Rule, ...] = (
    UndeclaredInput(),
    WhenConstant(),
    SkippedRead(),
    RepeatWithoutUntil(),
    ForEachNotList(),
    UnusedStep(),
    UnusedConfig(),
)
