"""Small helpers for rules/verify.smk and rules/report.smk (input functions and parameters that the
Snakefiles would otherwise define next to their rules)."""
from __future__ import annotations

from typing import Callable, Sequence


def constant(value: str) -> Callable:
    """A params function returning ``value`` (a folder that is not a prefix of the rule's files)."""
    def param(wildcards):
        return value
    return param


def targets_except(targets: list, excluded: list) -> Callable:
    """Input function: the entries of ``targets`` not in ``excluded``, read when the DAG is built
    (after every rules file has added its targets)."""
    def inputs(wildcards):
        return [t for t in targets if t not in excluded]
    return inputs


def stage_markers(stages: list, unit_done: Callable[[str], Sequence[str]]) -> Callable:
    """Input function: every unit's done marker of every registered stage."""
    def inputs(wildcards):
        return [m for stage in stages for m in unit_done(stage)]
    return inputs
