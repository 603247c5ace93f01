"""``--set PATH=VALUE`` (and a sweep's ``(path, value)``) applied to a pipeline's raw YAML
mapping before it is validated: typed by YAML, placed by a dotted path whose digits index
lists, every wrong path a ConfigError that lists what is there."""

from __future__ import annotations

from typing import Any

from compressflow.errors import ConfigError
from compressflow.yamlsafe import compose


def split_path(dotted: str) -> list[Any]:
    """``"stages.2.prune"`` -> ``["stages", 2, "prune"]``: digits index lists."""
    return [int(part) if part.isdigit() else part for part in dotted.split(".")]


Override = str | tuple[str, Any]
"""``"path=yaml-text"`` from the command line, or ``(path, value)`` from a sweep."""


def apply_override(raw: dict[str, Any], override: Override, sections: tuple[str, ...] = ()) -> str:
    """Set one value of the raw pipeline mapping in place; returns the dotted path set.

    ``sections`` are top-level keys that may be absent (left to their defaults): setting a
    value inside one creates it. A path that does not exist, or a value that is not YAML, is a
    ConfigError naming the ``--set`` and what is there instead.
    """
    if isinstance(override, tuple):
        dotted, sep, text = override[0], "=", None
    else:
        dotted, sep, text = override.partition("=")
    if not sep or not dotted:
        raise ConfigError(f"--set {override}: expected PATH=VALUE", "e.g. --set stages.2.prune.sparsity=0.9")
    parts = split_path(dotted)
    node: Any = raw
    if len(parts) > 1 and parts[0] in sections:
        raw.setdefault(parts[0], {})  # a section left to its defaults can still be set
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, parts[: depth + 1], dotted)
    last = parts[-1]
    if isinstance(node, list):
        _child(node, last, parts, dotted)
    elif not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: '{'.'.join(map(str, parts[:-1]))}' holds a value, not a mapping")
    current = node[last] if isinstance(node, dict) and last in node else (
        node[last] if isinstance(node, list) else None)
    if isinstance(override, tuple):
        value = override[1]
    else:
        # a string stays a string ("001" is a name, not a number); anything else is read as YAML
        value = text if isinstance(current, str) else _override_value(dotted, text)
    node[last] = value
    return dotted


def _override_value(dotted: str, text: str) -> Any:
    try:
        return compose(text, lambda _line: f"--set {dotted}: value {text!r}")[0]
    except ConfigError as error:
        if "malformed YAML" in error.message:
            error.hint = ("the value after '=' is read as YAML: quote a string that starts "
                          "with [, {, *, &, ! or @ or holds a tab: --set 'description=\"@home\"'")
        raise


def _child(node: Any, part: Any, walked: list[Any], dotted: str) -> Any:
    here = ".".join(map(str, walked))
    if isinstance(node, list):
        if not isinstance(part, int) or not 0 <= part < len(node):
            raise ConfigError(
                f"--set {dotted}: path does not exist: '{here}' (a list of {len(node)})",
                f"list items are numbered from 0 to {len(node) - 1}",
            )
        return node[part]
    if isinstance(node, dict):
        if part not in node:
            known = ", ".join(map(str, node)) or "none"
            raise ConfigError(f"--set {dotted}: path does not exist: '{here}'", f"keys there: {known}")
        return node[part]
    raise ConfigError(f"--set {dotted}: path does not exist: '{here}' is inside a plain value")
