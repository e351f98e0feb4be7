"""Names: PyTorch state-dict keys <-> Flax parameter paths.

diffusers and transformers write list entries as `.N` (`down_blocks.1.attentions.0`, `encoder.layers.3`);
Flax module names cannot hold dots, so we write them `_N` (`down_blocks_1/attentions_0`). Only a model's
ModuleList names take an index, which keeps names such as `linear_1` (a field, not a list entry)
unambiguous in both directions. A `Naming` says which names those are for one model family, and which
modules are embedding tables (Flax `embedding`, stored untransposed) rather than Linear layers.
"""

from __future__ import annotations

import dataclasses
import re

# The ModuleLists of diffusers' U-Net and VAE.
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


@dataclasses.dataclass(frozen=True)
class Naming:
    """How one model family's PyTorch keys read as Flax paths.

    list_names: the ModuleList attributes (their entries take an index); embeddings: the nn.Embedding
    modules, whose `.weight` is a Flax `embedding` table of the same layout.
    """

    list_names: frozenset[str] = LIST_NAMES
    embeddings: frozenset[str] = frozenset()


DIFFUSERS = Naming()  # The U-Net and the VAE.


def flax_path_to_torch_module(path: tuple[str, ...], naming: Naming = DIFFUSERS) -> str:
    """('down_blocks_1', 'attentions_0', 'proj_in') -> 'down_blocks.1.attentions.0.proj_in'."""
    parts = []
    for name in path:
        m = _INDEXED.match(name)
        parts.append(f"{m['name']}.{m['index']}" if m and m["name"] in naming.list_names else name)
    return ".".join(parts)


def torch_module_to_flax_path(module: str, naming: Naming = DIFFUSERS) -> tuple[str, ...]:
    """'down_blocks.1.attentions.0.proj_in' -> ('down_blocks_1', 'attentions_0', 'proj_in')."""
    path: list[str] = []
    for part in module.split("."):
        if part.isdigit():
            if not path or path[-1] not in naming.list_names:
                raise KeyError(
                    f"index {part!r} in {module!r} does not follow a list name ({sorted(naming.list_names)})"
                )
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)
