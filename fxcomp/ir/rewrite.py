"""Rewrite rules as data: a pattern anchored at one node, a check, a rewrite.

A ``Rule`` says which nodes may anchor its pattern (``anchors``), then ``match`` either
returns the matched nodes or a ``NoMatch`` with the reason, and ``rewrite`` changes the
graph. ``apply_rules`` walks the graph once in order; the reasons it meets go to
``explain`` (a pass gives its context's, so ``fxcomp dump --explain`` can show why a rule did
not apply).

Example::

    count = apply_rules(gm, rules, explain=ctx.explain, pass_name=ctx.state.current_pass)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule, Node

from fxcomp.ir.meta import MADE_BY

__all__ = ["NoMatch", "Rule", "apply_rules", "pending_rewrites"]


@dataclass(frozen=True)
class NoMatch:
    """A rule's pattern starts at this node but the rule does not apply, and why."""

    reason: str


@dataclass(frozen=True)
class Rule:
    """One rewrite: ``anchors(gm, node)`` is cheap; ``match`` returns a match or ``NoMatch``.

    ``rewrite(gm, match)`` returns the nodes it created, which are stamped with the pass name.
    """

    name: str
    anchors: Callable[[GraphModule, Node], bool]
    match: Callable[[GraphModule, Node], Any]
    rewrite: Callable[[GraphModule, Any], Sequence[Node]]


def apply_rules(
    gm: GraphModule,
    rules: Sequence[Rule],
    *,
    explain: Callable[[Node, str, str], None],
    pass_name: str,
) -> int:
    """Apply ``rules`` once over the graph in node order; return how many rewrites were made.
    ``explain(node, rule, reason)`` hears why a rule did not apply; the nodes a rewrite
    creates are stamped with ``pass_name``."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or getattr(node, "_erased", False):
            continue
        for rule in rules:
            if not rule.anchors(gm, node):
                continue
            found = rule.match(gm, node)
            if isinstance(found, NoMatch):
                explain(node, rule.name, found.reason)
                continue
            for created in rule.rewrite(gm, found):
                created.meta[MADE_BY] = pass_name
            count += 1
            break
    return count


def pending_rewrites(gm: GraphModule, rules: Sequence[Rule]) -> list[tuple[str, str]]:
    """(rule, node) pairs where a rule would still apply; empty once a pass has converged."""
    return [
        (rule.name, node.name)
        for node in gm.graph.nodes
        for rule in rules
        if rule.anchors(gm, node) and not isinstance(rule.match(gm, node), NoMatch)
    ]
