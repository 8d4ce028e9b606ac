"""Sharded train state and the jitted train and eval steps for a (data, model) mesh."""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import loss, optim, parallel
from megajax.config import Config
from megajax.mesh import check_batch, check_model
from megajax.models.gpt import GPT


class Trainer:
    """Builds a model's sharded state on `mesh` and compiles its train and eval steps.

    The state is a pytree {"params", "opt_state", "step"}: params are a plain nested dict of
    arrays, each sharded as parallel.RULES says; optimizer moments share their parameter's
    sharding. Dropout keys derive from (train.seed, step), so a step is reproducible alone.
    """

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh = cfg, mesh
        check_model(cfg.model, mesh.shape[parallel.MODEL])
        check_batch(cfg.train.batch_size, cfg.train.micro_batches, mesh.shape[parallel.DATA])
        self.padded_vocab = cfg.model.padded_vocab_size(mesh.shape[parallel.MODEL])
        self.tx = optim.make(cfg.optim)
        self.lr = optim.schedule(cfg.optim)
        with self.context():
            abstract = nnx.eval_shape(lambda: self._new_model(0))
            self.graphdef, abstract_state = nnx.split(abstract)
            param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
            abstract_params = nnx.to_pure_dict(abstract_state)
            opt_specs = optax.tree_map_params(
                self.tx,
                lambda _, s: s,
                jax.eval_shape(self.tx.init, abstract_params),
                param_specs,
                transform_non_params=lambda _: P(),
                is_leaf=_is_spec,
            )
        specs = {"params": param_specs, "opt_state": opt_specs, "step": P(), "skipped": P()}
        self.state_sharding = jax.tree.map(self._named, specs, is_leaf=_is_spec)
        micro = (cfg.train.micro_batches, cfg.train.batch_size // cfg.train.micro_batches)
        self.micro_shape = micro
        self.batch_sharding = self._named(P(None, parallel.DATA, None))
        self.eval_sharding = self._named(P(parallel.DATA, None))
        # Rows of the global (batch, length) batch that this process feeds to its devices; the
        # global row of micro-batch m, row j is m * micro_size + j.
        local = _process_rows(mesh, micro[1])
        self.train_rows = (np.arange(micro[0])[:, None] * micro[1] + local).ravel()
        self.eval_rows = _process_rows(mesh, cfg.train.batch_size)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))

    def _named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @contextlib.contextmanager
    def context(self):
        """The mesh and the logical-axis table, active while tracing model code."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(parallel.RULES):
            yield

    def _new_model(self, seed) -> GPT:
        return GPT(self.cfg.model, padded_vocab=self.padded_vocab, rngs=nnx.Rngs(seed))

    def _init(self):
        return self._state_at_step_0(
            nnx.to_pure_dict(nnx.split(self._new_model(self.cfg.train.seed))[1])
        )

    def _state_at_step_0(self, params):
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.int32(0),
            "skipped": jnp.int32(0),  # updates skipped for a non-finite loss or gradient
        }

    def state_from_params(self, params):
        """A state at step 0 around given (sharded) parameters, e.g. imported weights."""
        with self.context():
            return jax.jit(self._state_at_step_0, out_shardings=self.state_sharding)(params)

    def init_state(self):
        """A fresh state, created shard by shard on the devices that own it."""
        with self.context():
            return jax.jit(self._init, out_shardings=self.state_sharding)()

    def abstract_state(self):
        """The state's shapes, dtypes and shardings, with nothing allocated."""
        with self.context():
            shapes = jax.eval_shape(self._init)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_sharding,
        )

    def model(self, params) -> GPT:
        return nnx.merge(self.graphdef, params)

    def token_losses(self, params, inputs, targets, key=None):
        """Next-token cross-entropy per position, (batch, length); `key=None` disables dropout."""
        model = self.model(params)
        hidden = model(inputs, key=key)
        return loss.cross_entropy(
            hidden, model.lm_head, targets, vocab_size=self.cfg.model.vocab_size
        )

    def loss(self, params, inputs, targets, key):
        """Mean next-token cross-entropy of (batch, length) inputs."""
        return self.token_losses(params, inputs, targets, key).mean()

    def _train_step(self, state, inputs, targets):
        """One optimizer step over micro-batches (micro, batch / micro, length)."""
        params = state["params"]
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), state["step"])
        grad_fn = jax.value_and_grad(self.loss)

        def accumulate(carry, xs):
            loss_sum, grad_sum = carry
            i, x, y = xs
            value, grads = grad_fn(params, x, y, jax.random.fold_in(key, i))
            return (loss_sum + value, jax.tree.map(jnp.add, grad_sum, grads)), None

        micro = inputs.shape[0]
        if micro == 1:  # no accumulation loop: no zeroed gradient buffers, no adds into them
            loss_sum, grad_sum = grad_fn(params, inputs[0], targets[0], jax.random.fold_in(key, 0))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss_sum, grad_sum), _ = jax.lax.scan(
                accumulate, (jnp.float32(0), zeros), (jnp.arange(micro), inputs, targets)
            )
        grads = jax.tree.map(lambda g: g / micro, grad_sum)
        loss, grad_norm = loss_sum / micro, optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite loss or gradient leaves parameters and moments as they were. A cond
        # (not a select) keeps the update in place: no second copy of the state.
        params, opt_state = jax.lax.cond(
            finite, update, lambda p, o: (p, o), params, state["opt_state"]
        )
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": self.lr(state["step"]),
            "finite": finite,
        }
        return new_state, metrics

    def compile_train_step(self):
        """The train step compiled ahead of time for this mesh: (compiled, seconds to compile)."""
        start = time.perf_counter()
        tokens = jax.ShapeDtypeStruct(
            (*self.micro_shape, self.cfg.model.seq_len), jnp.int32, sharding=self.batch_sharding
        )
        state = self.abstract_state()
        with self.context():
            jitted = jax.jit(
                self._train_step, out_shardings=(self.state_sharding, None), donate_argnums=0
            )
            compiled = jitted.lower(state, tokens, tokens).compile()
        return compiled, time.perf_counter() - start

    def compile_eval_step(self):
        """Mean loss without dropout, compiled for (batch, length) batches."""
        tokens = jax.ShapeDtypeStruct(
            (self.cfg.train.batch_size, self.cfg.model.seq_len),
            jnp.int32,
            sharding=self.eval_sharding,
        )
        with self.context():
            jitted = jax.jit(lambda params, x, y: self.loss(params, x, y, None))
            return jitted.lower(self.abstract_state()["params"], tokens, tokens).compile()

    def put_batch(self, inputs: np.ndarray, targets: np.ndarray):
        """This process's rows (train_rows) of the global batch -> global device arrays of
        shape (micro, batch / micro, length)."""
        local = (self.micro_shape[0], -1, inputs.shape[-1])
        shape = (*self.micro_shape, inputs.shape[-1])
        return tuple(
            jax.make_array_from_process_local_data(self.batch_sharding, a.reshape(local), shape)
            for a in (inputs, targets)
        )

    def put_eval_batch(self, inputs: np.ndarray, targets: np.ndarray):
        """This process's rows (eval_rows) of a (batch, length) batch -> global device arrays."""
        shape = (self.cfg.train.batch_size, inputs.shape[-1])
        return tuple(
            jax.make_array_from_process_local_data(self.eval_sharding, a, shape)
            for a in (inputs, targets)
        )


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _process_rows(mesh, batch: int) -> np.ndarray:
    """Indices of the rows of a (batch, ...) array split over `data` that live on this
    process's devices: a contiguous range, as make_array_from_process_local_data needs."""
    per_shard = batch // mesh.shape[parallel.DATA]
    me = jax.process_index()
    shards = [i for i, row in enumerate(mesh.devices) if any(d.process_index == me for d in row)]
    rows = np.concatenate([np.arange(i * per_shard, (i + 1) * per_shard) for i in shards])
    if np.any(np.diff(rows) != 1):
        raise ValueError(f"process {me} holds non-adjacent data shards {shards} of the mesh")
    return rows
