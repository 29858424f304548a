"""Hostile-input checks of a sweep file, run by ``orchestrator.sweep.load_sweep`` before any
expansion: bounded YAML, no control characters, a grid-size cap, stage inputs declared.

* :func:`load_yaml_bounded` — YAML whose aliases would expand past ``MAX_NODES`` nodes (a
  "billion laughs" bomb: 500 bytes that expand to 10⁹ nodes once anything walks the tree)
  or that refer to themselves are refused after composing the node graph, which stays as
  small as the text; nothing is constructed before that.
* :func:`control_char_errors` — no control character (newline, NUL, ...) in any key or string
  of the file: strings reach sbatch scripts (partition, account, extra options, paths), where a
  newline injects a line and silently drops later options.
* :func:`grid_size` — the number of grid points by arithmetic (a 10³⁰-point grid is refused
  without being built).
* :func:`stage_input_errors` — a stage that reads another stage's outputs must need it
  (directly or through another need); see ``orchestrator.stages`` (``stage_dir``,
  ``_tokenizer_dir``).
"""
from __future__ import annotations

import math
import re
from typing import Any

import yaml

MAX_BYTES = 4 * 2**20  # a sweep file is a few kB
MAX_NODES = 200_000  # YAML nodes after alias expansion (the paper grids have < 1,000)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")



def stage_source(stage: str, stages: set[str]) -> str | None:
    """The stage whose outputs ``stage`` reads (None: none): evaluate/generator read the
    fine-tuned tokenizer when the sweep has a finetune stage (``orchestrator.stages._tokenizer_dir``),
    else the tokenizer; finetune starts from the tokenizer."""
    if stage == "finetune":
        return "tokenizer"
    if stage in ("evaluate", "generator"):
        return "finetune" if "finetune" in stages else "tokenizer"
    return None


class YAMLBombError(ValueError):
    """The YAML would expand past the node budget or refers to itself."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes of the tree that ``root`` stands for once every alias is expanded.

    Memoised per node object (an alias is the same node object as its anchor), iterative
    (no recursion limit), so the cost is linear in the composed graph, not in the expansion."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            if isinstance(node, yaml.MappingNode):
                kids = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                kids = node.value
            else:
                kids = []
            size[key] = 1 + sum(size[id(k)] for k in kids)
            if size[key] > limit:
                raise YAMLBombError(f"expands to more than {limit:,} nodes (alias bomb?)")
            continue
        if key in size:
            continue
        if key in on_path:
            raise YAMLBombError("an alias refers to a node that contains it (recursive YAML)")
        on_path.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            stack.extend((n, False) for pair in node.value for n in pair if id(n) not in size)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((n, False) for n in node.value if id(n) not in size)
    return size[id(root)]


def load_yaml_bounded(text: str, max_nodes: int = MAX_NODES) -> Any:
    """``yaml.safe_load(text)`` that refuses alias bombs and recursive aliases in bounded time
    and memory (raises :class:`YAMLBombError`, or ``yaml.YAMLError`` for invalid YAML)."""
    if len(text) > MAX_BYTES:
        raise YAMLBombError(f"larger than {MAX_BYTES >> 20} MiB; not a sweep file")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max_nodes)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def has_control_char(text: str) -> bool:
    return _CONTROL.search(text) is not None


def control_char_errors(raw: Any, origin: str) -> list[str]:
    """One error per key or string value of the parsed file holding a control character."""
    errors: list[str] = []
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                ks = str(k)
                if _CONTROL.search(ks):
                    errors.append(f"{origin}: key '{path}': key {ks!r} holds a control character; not allowed")
                stack.append((f"{path}.{ks}" if path else ks, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, str) and (m := _CONTROL.search(v)):
            errors.append(f"{origin}: key '{path}': control character {m.group()!r} (U+{ord(m.group()):04X}) "
                          f"in {v[:60]!r}; sweep strings reach sbatch scripts and paths, where it is not allowed")
    return sorted(errors)


def grid_size(axes: dict[str, list], zips: list[dict[str, list]], seeds: list | None) -> int:
    """Grid points before deduplication: product of axis lengths x zipped group lengths x seeds."""
    dims = [len(v) for v in axes.values()]
    dims += [min((len(v) for v in g.values()), default=0) for g in zips]
    if seeds is not None:
        dims.append(len(seeds))
    return math.prod(dims)


def stage_input_errors(needs: dict[str, list[str]], origin: str) -> list[str]:
    """Stages whose input stage is absent from the sweep or not among their (transitive) needs."""
    errors: list[str] = []
    names = set(needs)

    def closure(stage: str) -> set[str]:
        seen: set[str] = set()
        todo = list(needs.get(stage, []))
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(needs.get(s, []))
        return seen

    for stage in needs:
        src = stage_source(stage, names)
        if src is None:
            continue
        if src not in names:
            errors.append(f"{origin}: key 'stages.{stage}': stage '{stage}' reads the outputs of stage '{src}', "
                          f"which this sweep does not have; add a '{src}' stage")
        elif src not in closure(stage):
            errors.append(f"{origin}: key 'stages.{stage}.needs': stage '{stage}' reads the outputs of '{src}': "
                          f"add '{src}' to its needs (else it races its parent)")
    return errors
