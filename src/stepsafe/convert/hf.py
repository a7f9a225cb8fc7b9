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
``checkpoint_conversion_fn``); ``stepsafe.convert.hf_demo`` has the demo model's pair,
``stepsafe.convert.hf_llama`` Llama's (and Mistral's) with MaxText's tree.

What the weights do not say (head counts, for one) is in the model's ``config.json``. A
conversion function that declares a parameter named ``config`` gets it: on import the
directory's ``config.json`` parsed (None when the directory has none); on export a dict, the
config given to ``export_safetensors`` (a copy) or an empty one, which the function may check
against the weights and complete; when it is not empty it is written beside the weights as
``config.json``, so that ``transformers`` can load the directory. Functions of one parameter
(the weights) work as before.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.params_loading import place_tree
from stepsafe.convert.safetensors_files import (
    HF_SHARD_BYTES,
    read_input_file,
    read_safetensors,
    write_safetensors,
)
from stepsafe.convert.source import open_source, source_tree
from stepsafe.convert.write_tree import write_tree
from stepsafe.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    StepsafeError,
)
from stepsafe.storage import is_bucket, storage_for

log = logging.getLogger("stepsafe")

CONFIG = "config.json"  # a Hugging Face model's configuration, beside its weights


def conversion_function(spec: str) -> Callable[..., Any]:
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

    def __iter__(self) -> Any:
        # Defined here so that dict(flat), {**flat} and d.update(flat) go through keys() and
        # __getitem__ (CPython copies a dict subclass directly only when it keeps dict's
        # __iter__): the weights they hand out count as used; iterating names alone does not.
        return super().__iter__()

    def copy(self) -> dict[str, Any]:
        self.asked.update(dict.keys(self))
        return dict(dict.items(self))

    def items(self) -> Any:  # every weight handed out counts as used
        self.asked.update(dict.keys(self))
        return super().items()

    def values(self) -> Any:
        self.asked.update(dict.keys(self))
        return super().values()


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"


def takes_config(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` declares a parameter named ``config`` (then it is given the model's
    ``config.json``)."""
    try:
        param = inspect.signature(fn).parameters.get("config")
    except (TypeError, ValueError):  # a callable without a signature: one argument
        return False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if isinstance(fn, functools.partial) and "config" in fn.keywords:
        return False  # its caller bound one: keep it
    return param is not None and (param.kind in kinds or _config_second(fn))


def _config_second(fn: Callable[..., Any]) -> bool:
    """Whether ``config`` is ``fn``'s second parameter and positional-only (``def f(flat,
    config, /)``): given by position then, as a keyword would fail."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return (
        len(params) > 1
        and params[1].name == "config"
        and params[1].kind == inspect.Parameter.POSITIONAL_ONLY
    )


def read_config(path: str, *, required: bool = False) -> dict[str, Any] | None:
    """The parsed ``config.json`` at ``path`` (the file, or a model directory holding it);
    None when a directory has none and it is not ``required``.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist, or it is ``required`` and missing.
        CorruptCheckpointError: it is not a JSON object.
    """
    url = str(path)
    storage, where = storage_for(url if "://" in url else os.path.abspath(url))
    is_dir = storage.is_dir(where)
    file = storage.join(where, CONFIG) if is_dir else where
    if not storage.exists(file) or storage.is_dir(file):
        if not required and is_dir:
            return None
        raise CheckpointNotFoundError(
            f"no Hugging Face config at {path}: give a config.json or a model directory with one"
        )
    try:
        config = json.loads(read_input_file(storage, file, 1 << 24, local=not is_bucket(url)))
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{file} is not readable JSON: {e}") from e
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{file} holds a {type(config).__name__}, not a JSON object")
    return config


def _call(fn: Callable[..., Any], arg: Any, **kwargs: Any) -> Any:
    """``fn(arg, **kwargs)``, its failure said as the conversion function's (named)."""
    try:
        if "config" in kwargs and _config_second(fn):
            return fn(arg, kwargs.pop("config"), **kwargs)
        return fn(arg, **kwargs)
    except StepsafeError as e:
        raise type(e)(f"in the conversion function {_name(fn)}: {e}") from e
    except Exception as e:
        kind = type(e).__name__
        raise ConfigError(f"the conversion function {_name(fn)} failed: {kind}: {e}") from e


def from_safetensors(directory: str, fn: Callable[..., Any]) -> Any:
    """The tree ``fn`` makes of the model in ``directory`` (lazy: nothing read yet); ``fn``
    is given the directory's ``config.json`` too when it takes a ``config``.

    Raises:
        ConfigError: ``fn`` wanted a weight the directory lacks, or left some unmapped.
        CheckpointNotFoundError, CorruptCheckpointError: as reading the directory (or its
            ``config.json``) raises them.
    """
    extra = {"config": read_config(directory)} if takes_config(fn) else {}
    return map_weights(read_safetensors(directory), fn, directory, **extra)


def map_weights(
    weights: list[tuple[str, OutLeaf]], fn: Callable[..., Any], where: str, **kwargs: Any
) -> Any:
    """``fn({name: weight}, **kwargs)``, checked: every weight must be used (looked up, or
    handed out by ``items``/``values``), and none wanted that ``where`` lacks.

    Raises:
        ConfigError: ``fn`` failed (named), wanted a weight ``where`` lacks, or left some
            unmapped (listed).
    """
    flat = _Seen(weights)
    tree = _call(fn, flat, **kwargs)
    unmapped = [n for n in dict.keys(flat) if n not in flat.asked]
    if unmapped:
        few = ", ".join(repr(n) for n in unmapped[:5])
        more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        raise ConfigError(
            f"{len(unmapped)} weight(s) of {where} are not mapped by the conversion "
            f"function: {few}{more}; map them, or use the function of this architecture"
        )
    return tree


def import_safetensors(
    directory: str, dst: str, fn: Callable[..., Any], *, params_key: str = "params"
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
    fn: Callable[..., Any],
    *,
    config: Mapping[str, Any] | None = None,
    params_key: str = "params",
    max_shard_bytes: int = HF_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> list[str]:
    """Write the parameters of checkpoint ``src`` as a Hugging Face model directory, named by
    ``fn`` (params tree -> {name: weight}); the files written.

    Args:
        config: the model's Hugging Face config (``read_config``), written as ``config.json``;
            a ``fn`` that takes a ``config`` is given a copy (an empty dict without one) to
            check against the weights and complete, e.g. with the head counts.

    Raises:
        ConfigError: no ``params_key`` in ``src`` and it is not a param tree either; a name
            twice; a dtype safetensors cannot hold; ``fn`` found ``config`` disagreeing.
        CheckpointExistsError: ``directory`` exists.
    """
    tree = source_tree(open_source(src))
    params = tree[params_key] if isinstance(tree, dict) and params_key in tree else tree
    # a deep copy: a function completing a nested entry (rope_scaling) must not change the caller's
    hf_config = copy.deepcopy(dict(config)) if config is not None else {}
    extra = {"config": hf_config} if takes_config(fn) else {}
    named = _call(fn, params, **extra)
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
    extra = {CONFIG: _config_json(hf_config, fn)} if hf_config else None
    return write_safetensors(
        directory, items, max_shard_bytes=max_shard_bytes, on_bytes=on_bytes, extra_files=extra
    )


def _config_json(config: dict[str, Any], fn: Callable[..., Any]) -> bytes:
    try:
        # allow_nan=False: NaN and Infinity are no JSON; strict readers refuse the file
        return (json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"the Hugging Face config (after {_name(fn)}) cannot be written as JSON: {e}"
        ) from e


def load_safetensors_parameters(directory: str, target: Any, fn: Callable[..., Any]) -> Any:
    """The model in ``directory``, through ``fn``, onto ``target`` (the parameters as the model
    wants them): what ``source_checkpoint_layout=safetensors`` loads.

    Raises:
        ConfigError: as ``from_safetensors``.
        TargetMismatchError: ``fn``'s tree does not fit ``target`` (keys, shapes, dtypes).
    """
    tree = from_safetensors(directory, fn)
    log.info("Loading the parameters of Hugging Face model %s", directory)
    return place_tree(tree, target)
