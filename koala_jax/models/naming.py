"""Names: diffusers state-dict keys <-> Flax parameter paths.

diffusers writes list entries as `.N` (`down_blocks.1.attentions.0`); Flax module names cannot hold
dots, so we write them `_N` (`down_blocks_1/attentions_0`). Only the ModuleList names below take an
index, which keeps names such as `linear_1` (a field, not a list entry) unambiguous in both directions.
"""

from __future__ import annotations

import re

LIST_NAMES = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "transformer_blocks",
        "downsamplers",
        "upsamplers",
        "to_out",
        "net",
    }
)
_INDEXED = re.compile(r"^(?P<name>[a-z_0-9]+?)_(?P<index>\d+)$")


def flax_path_to_torch_module(path: tuple[str, ...]) -> str:
    """('down_blocks_1', 'attentions_0', 'proj_in') -> 'down_blocks.1.attentions.0.proj_in'."""
    parts = []
    for name in path:
        m = _INDEXED.match(name)
        parts.append(f"{m['name']}.{m['index']}" if m and m["name"] in LIST_NAMES else name)
    return ".".join(parts)


def torch_module_to_flax_path(module: str) -> tuple[str, ...]:
    """'down_blocks.1.attentions.0.proj_in' -> ('down_blocks_1', 'attentions_0', 'proj_in')."""
    path: list[str] = []
    for part in module.split("."):
        if part.isdigit():
            if not path or path[-1] not in LIST_NAMES:
                raise KeyError(f"index {part!r} in {module!r} does not follow a list name ({sorted(LIST_NAMES)})")
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)
