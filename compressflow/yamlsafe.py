"""Reading YAML that a user wrote, with bounds: every failure a ConfigError at file:line.

``yaml.safe_load`` never runs code, but it still trusts the document's shape: a few hundred
bytes of nested aliases ("billion laughs") expand to billions of nodes for whoever walks the
result, and a thousand nested brackets exhaust Python's recursion in the composer. So the
event stream, which PyYAML produces without recursion, is checked first: the size with every
alias expanded and the depth are bounded before any node is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from compressflow.errors import ConfigError

MAX_NODES = 100_000
"""Nodes of a document with every alias expanded; the shipped pipelines hold a few hundred."""
MAX_DEPTH = 100
"""Nested collections; the shipped pipelines nest six deep."""

Where = Callable[[int | None], str]
"""Names the place of a line (1-based; None when unknown): ``file:line`` or ``--set path``."""


def read_text(path: Path) -> str:
    """The file's text, as UTF-8 (a leading byte-order mark dropped)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the file: {error.strerror or error}",
                          "check the path and its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text: byte 0x{data[error.start]:02x} at column {column}",
            "save the pipeline as UTF-8; a pipeline is plain text",
        ) from None


def file_place(path: Path) -> Where:
    """``path:line`` (just ``path`` when the line is unknown)."""
    return lambda line: f"{path}:{line}" if line else str(path)


def compose(text: str, where: Where) -> tuple[Any, yaml.Node | None]:
    """The document's value and its root node (None for an empty document), bounded."""
    try:
        check_shape(text, where)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise _yaml_error(error, text, where) from None
    return data, node


def check_shape(text: str, where: Where) -> None:
    """Refuse a document too large with its aliases expanded, too deep, or recursive.

    Walks the event stream: an anchored collection's expanded size and height are known at
    its end, so an alias adds them without anything being expanded.
    """
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, height)
    open_anchors: set[str] = set()
    stack: list[list[Any]] = []  # per open collection: [nodes, height of children, anchor]
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([1, 0, event.anchor])
            open_anchors.add(event.anchor)
            total += 1
            _bound(total, len(stack), event, where)
        elif isinstance(event, yaml.CollectionEndEvent):
            size, children, anchor = stack.pop()
            open_anchors.discard(anchor)
            anchors[anchor] = (size, children + 1)
            _add_to_parent(stack, size, children + 1)
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            size, height = 1, 0
            if isinstance(event, yaml.AliasEvent):
                if event.anchor in open_anchors:
                    raise ConfigError(
                        f"{where(_line(event))}: alias *{event.anchor} refers to a collection "
                        "that contains it", "a pipeline cannot be recursive: write the values out")
                size, height = anchors.get(event.anchor, (1, 0))  # undefined: the composer says so
            else:
                anchors[event.anchor] = (1, 0)
            _add_to_parent(stack, size, height)
            total += size
            _bound(total, len(stack) + height, event, where)


def _add_to_parent(stack: list[list[Any]], size: int, height: int) -> None:
    if stack:
        stack[-1][0] += size
        stack[-1][1] = max(stack[-1][1], height)


def _bound(total: int, depth: int, event: yaml.Event, where: Where) -> None:
    if total > MAX_NODES:
        raise ConfigError(
            f"{where(_line(event))}: the document holds more than {MAX_NODES:,} values "
            "once its aliases are expanded",
            "aliases expand to too much: a pipeline needs a few hundred values; write them "
            "out, or use fewer nested aliases")
    if depth > MAX_DEPTH:
        raise ConfigError(
            f"{where(_line(event))}: values nested more than {MAX_DEPTH} deep",
            "a pipeline nests a few levels: check the brackets and indentation there")


def _line(event: yaml.Event) -> int | None:
    return event.start_mark.line + 1 if event.start_mark else None


def _yaml_error(error: yaml.YAMLError, text: str, where: Where) -> ConfigError:
    if isinstance(error, yaml.reader.ReaderError):
        line = text[: error.position].count("\n") + 1 if isinstance(error.position, int) else None
        return ConfigError(
            f"{where(line)}: character #x{error.character:04x} is not allowed in YAML",
            "remove control characters (form feeds, NUL...) from the file; write them in a "
            "double-quoted string as \\f, \\x00 if they are meant")
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line = mark.line + 1 if mark else None
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or str(error)
    if isinstance(error, yaml.constructor.ConstructorError) and "for the tag" in problem:
        return ConfigError(
            f"{where(line)}: YAML tag refused: {problem}",
            "pipelines are read with yaml.safe_load: tags that build Python objects are "
            "never executed; write plain values")
    context = getattr(error, "context", None)
    if context and context != problem:
        problem = f"{context}: {problem}"
    return ConfigError(f"{where(line)}: malformed YAML: {problem}",
                       "check indentation and quoting around that line")


class _Loader(yaml.SafeLoader):
    """SafeLoader whose scalar conversions (``!!int abc``, a 5,000-digit number) fail as
    YAML errors at the value's line, not as a bare ValueError or KeyError."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as error:  # noqa: BLE001 - any conversion failure is the input's
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value "
                f"{_short(node)}: {error}", node.start_mark) from None


def _short(node: yaml.Node) -> str:
    value = node.value if isinstance(node, yaml.ScalarNode) else f"<{node.id}>"
    return repr(value if len(value) <= 40 else value[:37] + "...")
