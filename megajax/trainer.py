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

from megajax import loss_scale, models, optim, parallel, pipeline_arithmetic
from megajax.config import Config
from megajax.mesh import check_batch, check_model


class Trainer:
    """Builds a model's sharded state on `mesh` and compiles its train and eval steps.

    The state is a pytree {"params", "opt_state", "step", "skipped"} (and "scaler" with
    float16): params are a plain nested dict of float32 arrays, each sharded as
    parallel.rules() says (and, with optim.distributed, further split over `data`); optimizer
    moments share their parameter's sharding. Dropout keys derive from (train.seed, step), so a
    step is reproducible alone.
    """

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh = cfg, mesh
        check_model(cfg.model, mesh.shape[parallel.MODEL])
        check_batch(cfg.train.batch_size, cfg.train.micro_batches, mesh.shape[parallel.DATA])
        stages = mesh.shape[parallel.PIPELINE]
        self.schedule = None  # the micro-batches are accumulated one after another
        if stages > 1:  # they flow through the pipeline stages together
            pipeline_arithmetic.check(
                num_layers=cfg.model.num_layers,
                stages=stages,
                repeats=cfg.train.pipeline_repeats,
                micro_batches=cfg.train.micro_batches,
            )
            self.schedule = pipeline_arithmetic.Schedule(stages, cfg.train.pipeline_repeats)
        self.padded_vocab = cfg.model.padded_vocab_size(mesh.shape[parallel.MODEL])
        self.tx = optim.make(cfg.optim)
        self.lr = optim.schedule(cfg.optim)
        with self.context():
            abstract = nnx.eval_shape(lambda: self._new_model(0))
            self.graphdef, abstract_state = nnx.split(abstract)
            param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
            abstract_params = nnx.to_pure_dict(abstract_state)
            # The forward pass's layout. With the distributed optimizer the float32 master
            # weights (and so their moments) are further split over `data`.
            self.compute_sharding = jax.tree.map(self._named, param_specs, is_leaf=_is_spec)
            self.replicated_over_data = []
            if cfg.optim.distributed:
                logical = nnx.to_pure_dict(
                    jax.tree.map(
                        lambda v: v.get_metadata().get("out_sharding"),
                        abstract_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable),
                    )
                )
                param_specs, self.replicated_over_data = optim.shard_over_data(
                    abstract_params, param_specs, logical, mesh.shape[parallel.DATA]
                )
            # Moments take their parameter's spec explicitly: optax creates them with
            # zeros_like, which would otherwise inherit whatever layout the parameters have.
            opt_specs = optax.tree_map_params(
                self.tx,
                lambda _, s: s,
                jax.eval_shape(self.tx.init, abstract_params),
                param_specs,
                transform_non_params=lambda _: P(),
                is_leaf=_is_spec,
            )
        specs = {"params": param_specs, "opt_state": opt_specs, "step": P(), "skipped": P()}
        self.loss_scaled = cfg.model.compute_dtype == "float16"
        if self.loss_scaled:
            specs["scaler"] = jax.tree.map(lambda _: P(), loss_scale.init(cfg.optim))
        self.state_sharding = jax.tree.map(self._named, specs, is_leaf=_is_spec)
        micro = (cfg.train.micro_batches, cfg.train.batch_size // cfg.train.micro_batches)
        self.micro_shape = micro
        self.fields = models.batch_fields(cfg.model)
        self.objective = models.objective(cfg.model)
        # Samples are split over `data` by rows; train batches lead with the micro-batch axis.
        self.batch_sharding = {
            k: self._named(P(None, parallel.DATA, *[None] * len(s))) for k, s in self.fields.items()
        }
        self.eval_sharding = {
            k: self._named(P(parallel.DATA, *[None] * len(s))) for k, s in self.fields.items()
        }
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
        m, model_degree = self.cfg.model, self.mesh.shape[parallel.MODEL]
        table = parallel.rules(
            sequence_parallel=m.sequence_parallel, kv_by_rows=m.kv_by_rows(model_degree)
        )
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(table):
            yield

    def _new_model(self, seed):
        return models.build(self.cfg.model, padded_vocab=self.padded_vocab, rngs=nnx.Rngs(seed))

    def _init(self):
        return self._state_at_step_0(
            nnx.to_pure_dict(nnx.split(self._new_model(self.cfg.train.seed))[1])
        )

    def _state_at_step_0(self, params):
        state = {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.int32(0),
            "skipped": jnp.int32(0),  # updates skipped for a non-finite loss or gradient
        }
        if self.loss_scaled:
            state["scaler"] = loss_scale.init(self.cfg.optim)
        return state

    def state_from_params(self, params):
        """A state at step 0 around given (sharded) parameters, e.g. imported weights."""
        with self.context():
            return jax.jit(self._state_at_step_0, out_shardings=self.state_sharding)(params)

    def init_state(self):
        """A fresh state, created shard by shard on the devices that own it."""
        with self.context():
            return jax.jit(self._init, out_shardings=self.state_sharding)()

    def fresh_params(self, keys):
        """The freshly initialised parameters under the top-level `keys` only (as init_state
        makes them), created shard by shard; XLA drops the other parameters' initializers."""

        def init():
            params = nnx.to_pure_dict(nnx.split(self._new_model(self.cfg.train.seed))[1])
            return {k: params[k] for k in keys}

        shardings = {k: self.state_sharding["params"][k] for k in keys}
        with self.context():
            return jax.jit(init, out_shardings=shardings)()

    def abstract_state(self):
        """The state's shapes, dtypes and shardings, with nothing allocated."""
        with self.context():
            shapes = jax.eval_shape(self._init)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_sharding,
        )

    def optional_state(self) -> dict:
        """State entries that a checkpoint may lack (a float16 run resumed from a float32
        checkpoint has no loss scaler), with the values to start from then."""
        scaler = None
        if self.loss_scaled:
            scaler = jax.device_put(loss_scale.init(self.cfg.optim), self.state_sharding["scaler"])
        return {"scaler": scaler}

    def model(self, params):
        """The model (models.build's class) holding `params`."""
        return nnx.merge(self.graphdef, params)

    def token_losses(self, params, inputs, targets, key=None):
        """A GPT's next-token cross-entropy per position, (batch, length); `key=None` disables
        dropout."""
        return self.model(params).token_losses(inputs, targets, key=key)

    def loss(self, params, batch: dict, key):
        """(objective, metrics) of a batch of samples (a dict of models.batch_fields arrays)."""
        return self.objective(self.model(params), batch, key)

    def compute_params(self, params):
        """The parameters as the forward pass reads them. With the distributed optimizer: the
        float32 master shards cast to model.compute_dtype and gathered over `data`."""
        if not self.cfg.optim.distributed:
            return params
        dtype = jnp.dtype(self.cfg.model.compute_dtype)

        def gather(p, master, compute):
            # Cast on the shard, then gather: the all-gather moves compute_dtype bytes.
            cast = jax.lax.with_sharding_constraint(p.astype(dtype), master)
            return jax.lax.with_sharding_constraint(cast, compute)

        return jax.tree.map(gather, params, self.state_sharding["params"], self.compute_sharding)

    def gradients(self, state, batch):
        """(means of loss and metrics, gradients) over the micro-batches of `batch`.

        With the distributed optimizer the weights are gathered once, before the micro-batch
        loop, and each micro-batch's gradients are reduce-scattered onto the master shards and
        accumulated there in float32. With float16 the gradients are of the scaled loss,
        divided by the scale here. The step skips its update when they are not finite; a
        subclass may override this method to inject such a fault at a chosen step.
        """
        params = self.compute_params(state["params"])
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), state["step"])
        scale = state["scaler"]["scale"] if self.loss_scaled else None
        distributed = self.cfg.optim.distributed

        def objective(params, batch, key):
            value, metrics = self.loss(params, batch, key)
            return value if scale is None else value * scale, {"loss": value, **metrics}

        def grads_of(micro_batch, i):
            (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                params, micro_batch, jax.random.fold_in(key, i)
            )
            if distributed:
                grads = jax.tree.map(self._to_master, grads, self.state_sharding["params"])
            return metrics, grads

        def accumulate(carry, xs):
            sums, grad_sum = carry
            i, micro_batch = xs
            metrics, grads = grads_of(micro_batch, i)
            sums = jax.tree.map(jnp.add, sums, metrics)
            return (sums, jax.tree.map(jnp.add, grad_sum, grads)), None

        micro = self.micro_shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        if self.schedule is not None:
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(micro))
            (_, sums), grad_sum = jax.value_and_grad(self._pipelined, has_aux=True)(
                params, batch, keys, objective
            )
            if distributed:
                grad_sum = jax.tree.map(self._to_master, grad_sum, self.state_sharding["params"])
        elif micro == 1:  # no accumulation loop: no zeroed gradient buffers, no adds into them
            sums, grad_sum = grads_of(first, 0)
        else:
            value_shape, metric_shapes = jax.eval_shape(self.loss, params, first, None)
            zero_metrics = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), {"loss": value_shape, **metric_shapes}
            )
            zeros = jax.tree.map(jnp.zeros_like, params)
            if distributed:  # float32 accumulators on the master shards
                zeros = jax.tree.map(self._to_master, zeros, self.state_sharding["params"])
            (sums, grad_sum), _ = jax.lax.scan(
                accumulate, (zero_metrics, zeros), (jnp.arange(micro), batch)
            )
        grads = jax.tree.map(lambda g: g / micro, grad_sum)
        if scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        return jax.tree.map(lambda v: v / micro, sums), grads

    def _pipelined(self, params, batch, keys, objective):
        """The sums over the micro-batches of `objective` (value, metrics), all micro-batches
        going through the pipeline schedule together: the embedding and the heads run on each
        micro-batch (vmapped, replicated over `pipeline`), the stacked layers as the schedule's
        stages (models/pipeline_schedule.py)."""
        key_axis = None if keys is None else 0  # None: no dropout
        per_micro = jax.vmap(
            objective, in_axes=(None, 0, key_axis), axis_name=pipeline_arithmetic.MICRO
        )
        with pipeline_arithmetic.scheduled(self.schedule):
            values, metrics = per_micro(params, batch, keys)
        return values.sum(), jax.tree.map(jnp.sum, metrics)

    @staticmethod
    def _to_master(x, sharding):
        return jax.lax.with_sharding_constraint(x.astype(jnp.float32), sharding)

    def _train_step(self, state, batch):
        """One optimizer step over micro-batches: each field (micro, batch / micro, ...)."""
        means, grads = self.gradients(state, batch)
        loss, grad_norm = means["loss"], optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite loss or gradient leaves parameters and moments as they were. A cond
        # (not a select) keeps the update in place: no second copy of the state.
        params, opt_state = jax.lax.cond(
            finite, update, lambda p, o: (p, o), state["params"], state["opt_state"]
        )
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {
            **means,
            "grad_norm": grad_norm,
            # optax's schedule counts applied updates: skipped steps do not advance it.
            "learning_rate": self.lr(state["step"] - state["skipped"]),
            "finite": finite,
            "fault": ~finite,  # a skipped update that train.on_nonfinite acts on
        }
        if self.loss_scaled:
            scale = state["scaler"]["scale"]
            new_state["scaler"] = loss_scale.update(state["scaler"], finite, self.cfg.optim)
            metrics["loss_scale"] = scale
            # An overflowing backward pass is the scaler's to handle (it skips the update and
            # backs off): a fault only when the loss itself is not finite, or when the scale
            # has no lower value left to try.
            handled = jnp.isfinite(loss) & (scale > self.cfg.optim.min_loss_scale)
            metrics["fault"] = ~finite & ~handled
        return new_state, metrics

    def abstract_batch(self, *, micro: bool) -> dict:
        """Shapes and shardings of a train batch (micro=True) or of an eval batch."""
        lead = self.micro_shape if micro else (self.cfg.train.batch_size,)
        shardings = self.batch_sharding if micro else self.eval_sharding
        return {
            k: jax.ShapeDtypeStruct((*lead, *s), jnp.int32, sharding=shardings[k])
            for k, s in self.fields.items()
        }

    def compile_train_step(self):
        """The train step compiled ahead of time for this mesh: (compiled, seconds to compile).
        It maps (state, batch) to (state, metrics): loss, the objective's own metrics,
        grad_norm, learning_rate, finite (the update was applied) and fault (a skipped update
        that is not float16's loss scaling at work)."""
        start = time.perf_counter()
        state = self.abstract_state()
        with self.context():
            jitted = jax.jit(
                self._train_step, out_shardings=(self.state_sharding, None), donate_argnums=0
            )
            compiled = jitted.lower(state, self.abstract_batch(micro=True)).compile()
        return compiled, time.perf_counter() - start

    def compile_eval_step(self):
        """(params, batch) -> {"loss", metrics...} without dropout, for (batch, ...) batches."""

        def evaluate(params, batch):
            params = self.compute_params(params)
            if self.schedule is None:
                value, metrics = self.loss(params, batch, None)
                return {"loss": value, **metrics}
            # Through the pipeline, in the train step's micro-batches: the mean of their means.
            micro = self.micro_shape[0]
            split = jax.tree.map(lambda x: x.reshape(micro, -1, *x.shape[1:]), batch)

            def objective(params, batch, key):
                value, metrics = self.loss(params, batch, key)
                return value, {"loss": value, **metrics}

            _, sums = self._pipelined(params, split, None, objective)
            return jax.tree.map(lambda v: v / micro, sums)

        with self.context():
            jitted = jax.jit(evaluate)
            params = self.abstract_state()["params"]
            return jitted.lower(params, self.abstract_batch(micro=False)).compile()

    def put_batch(self, batch: dict) -> dict:
        """This process's rows (train_rows) of a global batch ({field: (rows, ...)}) -> global
        device arrays of shape (micro, batch / micro, ...)."""
        out = {}
        for k, s in self.fields.items():
            local = np.asarray(batch[k]).reshape(self.micro_shape[0], -1, *s)
            shape = (*self.micro_shape, *s)
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding[k], local, shape)
        return out

    def put_eval_batch(self, batch: dict) -> dict:
        """This process's rows (eval_rows) of a (batch, ...) batch -> global device arrays."""
        return {
            k: jax.make_array_from_process_local_data(
                self.eval_sharding[k], np.asarray(batch[k]), (self.cfg.train.batch_size, *s)
            )
            for k, s in self.fields.items()
        }


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _process_rows(mesh, batch: int) -> np.ndarray:
    """Indices of the rows of a (batch, ...) array split over `data` that live on this
    process's devices: a contiguous range, as make_array_from_process_local_data needs."""
    per_shard = batch // mesh.shape[parallel.DATA]
    me = jax.process_index()
    by_data = np.moveaxis(mesh.devices, mesh.axis_names.index(parallel.DATA), 0)
    shards = [i for i, grp in enumerate(by_data) if any(d.process_index == me for d in grp.flat)]
    rows = np.concatenate([np.arange(i * per_shard, (i + 1) * per_shard) for i in shards])
    if np.any(np.diff(rows) != 1):
        raise ValueError(f"process {me} holds non-adjacent data shards {shards} of the mesh")
    return rows
