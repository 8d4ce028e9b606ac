"""Orbax sharded checkpoints that resume exactly and restore onto any mesh.

Each device writes only its own shards. A checkpoint holds the train state (parameters, Adam
moments, step, counters) and a small JSON record (data position, model shape, the saving mesh).
Orbax writes a checkpoint into a temporary directory and renames it when complete, so a crash
at any moment leaves the newest *complete* checkpoint to resume from.

Evaluation, generation, serving and export read the parameters alone (restore_params): Orbax's
partial restore through the PyTree handler, which reads the same on-disk format and leaves the
Adam moments (two thirds of the state's bytes) unread.

On restore the target layout is the current mesh's. The vocabulary padding depends on the model
degree (128 x T), so padded leaves are read at their saved size and re-padded: their padding rows
are zero in parameters and moments alike, which makes the re-padding exact.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import parallel
from megajax.config import ConfigError

STATE, META = "state", "meta"
PARAMS = "params"  # the train state's entry that restore_params reads


class Checkpointer:
    """Saves every `every` steps (asynchronously by default), keeps the newest `keep`."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Start writing `state` at `step` if due (or forced); returns whether it saves."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, target, *, optional: dict | None = None):
        """(state laid out as `target`, meta) from the checkpoint at `step`.

        `target` is a pytree of jax.ShapeDtypeStruct with the current mesh's shardings.
        `optional` maps top-level state entries that a checkpoint may lack (e.g. the loss
        scaler, absent from float32 and bfloat16 runs) to the values to use then; such an entry
        saved but not in `target` is read and dropped.
        """
        self._check_step(step)
        saved = self._saved_shapes(step)
        optional = optional or {}
        missing = [k for k in optional if k in target and not _holds(saved, k)]
        target = {k: v for k, v in target.items() if k not in missing}
        extra = {
            path: jax.ShapeDtypeStruct(shape, dtype, sharding=_replicated(target))
            for path, (shape, dtype) in self._saved_dtypes(step).items()
            if path[0] in optional and path[0] not in target
        }
        _check_shapes(saved, target, step, ignore={p[0] for p in extra})
        read_as = jax.tree_util.tree_map_with_path(
            lambda path, want: _read_layout(saved[_names(path)], want), target
        )
        for path, leaf in extra.items():
            node = read_as
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = leaf
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{STATE: ocp.args.StandardRestore(read_as), META: ocp.args.JsonRestore()}
                ),
            )
        except Exception as e:  # Orbax and TensorStore raise many kinds for damaged files
            raise self._damaged(step, e) from None
        state = {k: v for k, v in restored[STATE].items() if k in target}
        state = _repad(state, target)
        return {**state, **{k: optional[k] for k in missing}}, restored[META]

    def restore_params(self, step: int, target):
        """The parameters alone of the checkpoint at `step`, laid out as `target` (the
        parameters' pytree of jax.ShapeDtypeStruct with the current mesh's shardings): the
        optimizer moments and counters are neither read nor allocated."""
        self._check_step(step)
        saved = {p[1:]: s for p, s in self._saved_shapes(step).items() if p[0] == PARAMS}
        _check_shapes(saved, target, step)
        read_as = jax.tree_util.tree_map_with_path(
            lambda path, want: _read_layout(saved[_names(path)], want), target
        )
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape),
            read_as,
        )
        # StandardRestore has no partial option; the PyTree handler reads what StandardSave
        # wrote, and with partial_restore only the leaves `item` names.
        reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            restored = reader.restore(
                self.directory / str(step) / STATE,
                args=ocp.args.PyTreeRestore(
                    item={PARAMS: read_as},
                    restore_args={PARAMS: restore_args},
                    partial_restore=True,
                ),
            )
        except Exception as e:  # Orbax and TensorStore raise many kinds for damaged files
            raise self._damaged(step, e) from None
        finally:
            reader.close()
        return _repad(restored[PARAMS], target)

    def _check_step(self, step: int) -> None:
        steps = sorted(self._manager.all_steps())
        if step not in steps:
            raise ConfigError(
                f"no checkpoint at step {step} in {self.directory}; steps saved: "
                f"{', '.join(map(str, steps)) or 'none'}"
            )

    def _saved_shapes(self, step: int):
        try:
            metadata = self._manager.item_metadata(step)[STATE]
        except Exception as e:  # Orbax and TensorStore raise many kinds for damaged files
            raise self._damaged(step, e) from None
        if metadata is None:
            raise ConfigError(f"checkpoint {self.directory / str(step)} has no train state")
        leaves = jax.tree_util.tree_leaves_with_path(metadata, is_leaf=_is_array_metadata)
        return {_names(path): tuple(m.shape) for path, m in leaves}

    def _saved_dtypes(self, step: int) -> dict:
        metadata = self._manager.item_metadata(step)[STATE]
        leaves = jax.tree_util.tree_leaves_with_path(metadata, is_leaf=_is_array_metadata)
        return {_names(path): (tuple(m.shape), m.dtype) for path, m in leaves}

    def _damaged(self, step: int, error: Exception) -> ConfigError:
        detail = str(error).splitlines()[0][:160] if str(error) else ""
        return ConfigError(
            f"checkpoint {self.directory / str(step)} is corrupt ({type(error).__name__}: "
            f"{detail}); remove that directory to resume from an earlier checkpoint"
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _is_array_metadata(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_padded_leaf(saved: tuple, target) -> bool:
    """A vocabulary-padded leaf: only its leading (vocabulary) dimension differs."""
    return (
        len(saved) == len(target.shape)
        and saved[1:] == tuple(target.shape[1:])
        and target.sharding.spec[:1] == (parallel.MODEL,)
    )


def _names(path) -> tuple[str, ...]:
    """A key path as plain names: the saved metadata stores named tuples as dicts."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _holds(saved: dict, key: str) -> bool:
    return any(path[0] == key for path in saved)


def _replicated(target) -> NamedSharding:
    return NamedSharding(jax.tree.leaves(target)[0].sharding.mesh, P())


def _check_shapes(saved: dict, target, step: int, ignore=frozenset()) -> None:
    flat_target = {_names(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
    saved = {path: shape for path, shape in saved.items() if path[0] not in ignore}
    if set(saved) != set(flat_target):
        missing = sorted("/".join(p) for p in set(flat_target) - set(saved))[:3]
        extra = sorted("/".join(p) for p in set(saved) - set(flat_target))[:3]
        raise ConfigError(
            f"checkpoint step {step} holds a different model: missing {missing}, "
            f"unexpected {extra}; use the config it was trained with or another --workdir"
        )
    for path, shape in saved.items():
        want = flat_target[path]
        if shape != tuple(want.shape) and not _is_padded_leaf(shape, want):
            raise ConfigError(
                f"checkpoint step {step} was saved for another model shape: "
                f"{'/'.join(path)} is {shape}, this config needs {tuple(want.shape)}; "
                f"use the config it was trained with or another --workdir"
            )


def _read_layout(saved: tuple, target):
    """How to read one leaf: the target itself, or a padded leaf at its saved size, split over
    `model` by its second dimension (which every model degree divides); a padded vector (BERT's
    masked-LM bias) is read whole."""
    if saved == tuple(target.shape):
        return target
    mesh = target.sharding.mesh
    spec = P(None, parallel.MODEL, *([None] * (len(saved) - 2))) if len(saved) > 1 else P()
    return jax.ShapeDtypeStruct(saved, target.dtype, sharding=NamedSharding(mesh, spec))


def _repad(state, target):
    """Cut or extend the zero padding rows of padded leaves to the target's size and layout."""

    def fit(x, want):
        if x.shape == want.shape:
            return x
        rows = want.shape[0]

        def cut_or_pad(x):
            if x.shape[0] >= rows:
                return x[:rows]
            return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

        return jax.jit(cut_or_pad, out_shardings=want.sharding)(x)

    return jax.tree.map(fit, state, target)
