"""Hugging Face safetensors models in and out, through a conversion function.

In: a model directory (``model.safetensors``, or shards and their index) is read lazily
(``safetensors_files.read_safetensors``) into a flat dict of Hugging Face name -> weight (an
``OutLeaf``: made when written, or when numpy asks), which the conversion function turns into
the state's tree (MaxText's contract: stacking across layers and transposes happen there; with
``convert.ops`` nothing is computed until it is written). Weights the function never looked
at are an error listing them, as is a weight it wanted and the directory lacks.
Out: a conversion function turns the parameters' tree into {name: weight}, written sharded
with its index (``write_safetensors``).

A conversion function is named by a dotted path, ``module:function`` (the flag
``checkpoint_conversion_fn``); ``stepsafe.convert.hf_demo`` has the demo model's pair.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.params_loading import place_tree
from stepsafe.convert.safetensors_files import HF_SHARD_BYTES, read_safetensors, write_safetensors
from stepsafe.convert.source import open_source, source_tree
from stepsafe.convert.write_tree import write_tree
from stepsafe.errors import ConfigError, StepsafeError
from stepsafe.storage import storage_for

log = logging.getLogger("stepsafe")


def conversion_function(spec: str) -> Callable[[Any], Any]:
    """The function ``spec`` names: ``package.module:function`` (or ``package.module.function``).

    Raises:
        ConfigError: it cannot be imported, or is not callable.
    """
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"conversion function {spec!r} cannot be imported ({e}): give it as "
            "module:function, e.g. stepsafe.convert.hf_demo:from_hf"
        ) from e
    if not callable(fn):
        raise ConfigError(f"conversion function {spec!r} is not callable")
    return fn


class _Seen(dict):
    """A dict that remembers which names were asked for."""

    def __init__(self, items: list[tuple[str, OutLeaf]]) -> None:
        super().__init__(items)
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        try:
            return super().__getitem__(key)
        except KeyError:
            raise ConfigError(
                f"the conversion function wants weight {key!r}, which the model directory "
                "does not hold: is it this architecture's conversion function?"
            ) from None

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def pop(self, key: str, *default: Any) -> Any:
        self.asked.add(key)
        return super().pop(key, *default)

    def items(self) -> Any:  # every weight handed out counts as used
        self.asked.update(dict.keys(self))
        return super().items()

    def values(self) -> Any:
        self.asked.update(dict.keys(self))
        return super().values()


def _name(fn: Callable[[Any], Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"


def _call(fn: Callable[[Any], Any], arg: Any) -> Any:
    """``fn(arg)``, its failure said as the conversion function's (named)."""
    try:
        return fn(arg)
    except StepsafeError as e:
        raise type(e)(f"in the conversion function {_name(fn)}: {e}") from e
    except Exception as e:
        kind = type(e).__name__
        raise ConfigError(f"the conversion function {_name(fn)} failed: {kind}: {e}") from e


def from_safetensors(directory: str, fn: Callable[[Any], Any]) -> Any:
    """The tree ``fn`` makes of the model in ``directory`` (lazy: nothing read yet).

    Raises:
        ConfigError: ``fn`` wanted a weight the directory lacks, or left some unmapped.
        CheckpointNotFoundError, CorruptCheckpointError: as reading the directory raises them.
    """
    flat = _Seen(read_safetensors(directory))
    tree = _call(fn, flat)
    unmapped = [n for n in dict.keys(flat) if n not in flat.asked]
    if unmapped:
        few = ", ".join(repr(n) for n in unmapped[:5])
        more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        raise ConfigError(
            f"{len(unmapped)} weight(s) of {directory} are not mapped by the conversion "
            f"function: {few}{more}; map them, or use the function of this architecture"
        )
    return tree


def import_safetensors(
    directory: str, dst: str, fn: Callable[[Any], Any], *, params_key: str = "params"
) -> int:
    """Write the model in ``directory`` as a param-only stepsafe checkpoint at ``dst`` (step 0,
    ``{params_key: fn(weights)}``); the array bytes written.

    Raises:
        ConfigError: as ``from_safetensors``.
        CheckpointExistsError: ``dst`` holds a committed checkpoint already.
    """
    tree = {params_key: from_safetensors(directory, fn)}
    storage, path = storage_for(str(dst))
    return write_tree(storage, path, tree, step=0)


def export_safetensors(
    src: str,
    directory: str,
    fn: Callable[[Any], Any],
    *,
    params_key: str = "params",
    max_shard_bytes: int = HF_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> list[str]:
    """Write the parameters of checkpoint ``src`` as a Hugging Face model directory, named by
    ``fn`` (params tree -> {name: weight}); the files written.

    Raises:
        ConfigError: no ``params_key`` in ``src`` and it is not a param tree either; a name
            twice; a dtype safetensors cannot hold.
        CheckpointExistsError: ``directory`` exists.
    """
    tree = source_tree(open_source(src))
    params = tree[params_key] if isinstance(tree, dict) and params_key in tree else tree
    named = _call(fn, params)
    if not isinstance(named, Mapping):
        raise ConfigError(
            f"the conversion function {_name(fn)} returned a {type(named).__name__}, not a "
            "mapping of Hugging Face name -> weight"
        )
    items = []
    for name, x in named.items():
        if not isinstance(x, OutLeaf):
            from stepsafe.convert.ops import as_leaf

            x = as_leaf(x)
        items.append((str(name), x))
    return write_safetensors(directory, items, max_shard_bytes=max_shard_bytes, on_bytes=on_bytes)


def load_safetensors_parameters(directory: str, target: Any, fn: Callable[[Any], Any]) -> Any:
    """The model in ``directory``, through ``fn``, onto ``target`` (the parameters as the model
    wants them): what ``source_checkpoint_layout=safetensors`` loads.

    Raises:
        ConfigError: as ``from_safetensors``.
        TargetMismatchError: ``fn``'s tree does not fit ``target`` (keys, shapes, dtypes).
    """
    tree = from_safetensors(directory, fn)
    log.info("Loading the parameters of Hugging Face model %s", directory)
    return place_tree(tree, target)
