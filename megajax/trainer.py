"""Sharded train state and the jitted train step for a (pipeline, data, fsdp, expert, model)
mesh, on top of the model's graph and layout (sharded_model.py)."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from megajax import lora, loss_scale, optim, parallel
from megajax.config import Config, ConfigError
from megajax.sharded_model import ShardedModel, process_rows

_SHARDS = "batch_shard"  # the vmap axis over the batch shards (optim.grad_reduce="step")


class Trainer(ShardedModel):
    """Builds a model's sharded train state on `mesh` and compiles its train and eval steps.

    The state is a pytree {"params", "opt_state", "step", "skipped"} (and "scaler" with
    float16): params are a plain nested dict of float32 arrays, each sharded as
    parallel.rules() says, split over `fsdp` as parallel.at_rest says (and, with
    optim.distributed, further split over `data`); optimizer moments share their parameter's
    sharding. Dropout keys derive from (train.seed, step), so a
    step is reproducible alone.

    Only the trainable parameters (lora.trainable: all of them, or with lora.rank > 0 the LoRA
    adapters alone) are differentiated, have optimizer moments and are split over `data` by
    the distributed optimizer; the frozen ones pass through the step unchanged.
    """

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        super().__init__(cfg, mesh)
        if cfg.optim.grad_reduce == "step":
            _check_reduce_once(cfg, self.schedule, mesh)
        self.tx = optim.make(cfg.optim)
        self.lr = optim.schedule(cfg.optim)
        train_specs, frozen_specs = self.split(self.rest_specs)
        train_shapes = self.split(self._abstract_params)[0]
        self.replicated_over_data = []
        with self.context():
            if cfg.optim.distributed:
                # The float32 master weights (and so their moments) are further split over
                # `data`.
                train_specs, self.replicated_over_data = optim.shard_over_data(
                    train_shapes,
                    train_specs,
                    self.split(self.logical_axes)[0],
                    mesh.shape[parallel.DATA],
                    mesh.shape[parallel.EXPERT],
                )
            # Moments take their parameter's spec explicitly: optax creates them with
            # zeros_like, which would otherwise inherit whatever layout the parameters have.
            opt_specs = optax.tree_map_params(
                self.tx,
                lambda _, s: s,
                jax.eval_shape(self.tx.init, train_shapes),
                train_specs,
                transform_non_params=lambda _: P(),
                is_leaf=_is_spec,
            )
        param_specs = lora.join(train_specs, frozen_specs)
        specs = {"params": param_specs, "opt_state": opt_specs, "step": P(), "skipped": P()}
        self.loss_scaled = cfg.model.compute_dtype == "float16"
        if self.loss_scaled:
            specs["scaler"] = jax.tree.map(lambda _: P(), loss_scale.init(cfg.optim))
        self.state_sharding = jax.tree.map(self._named, specs, is_leaf=_is_spec)
        self.param_sharding = self.state_sharding["params"]
        self.train_sharding = self.split(self.param_sharding)[0]
        # Train batches lead with the micro-batch axis, split over `data` and `expert` by rows.
        self.batch_sharding = {
            k: self._named(P(None, parallel.BATCH, *[None] * len(s)))
            for k, s in self.fields.items()
        }
        # Rows of the global (batch, length) batch that this process feeds to its devices; the
        # global row of micro-batch m, row j is m * micro_size + j.
        micro = self.micro_shape
        local = process_rows(mesh, micro[1])
        self.train_rows = (np.arange(micro[0])[:, None] * micro[1] + local).ravel()

    def _init(self):
        return self._state_at_step_0(self._initial_params())

    def _state_at_step_0(self, params):
        state = {
            "params": params,
            "opt_state": self.tx.init(self.split(params)[0]),
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

    def split(self, tree):
        """(trainable, frozen) parts of a tree shaped like the parameters (lora.split)."""
        return lora.split(tree, self.cfg.lora)

    def compute_params(self, params):
        """The parameters as the forward pass reads them. With the distributed optimizer: the
        trainable float32 master shards cast to model.compute_dtype and gathered over `data`
        (frozen parameters are held as the forward pass reads them). Split over `fsdp`, they
        stay so (the forward pass gathers them where it reads them), cast to
        model.compute_dtype on their shards, so that the gathers move compute_dtype bytes;
        their gradients then reach the fsdp shards in compute_dtype too."""
        if not self.cfg.optim.distributed and self.mesh.shape[parallel.FSDP] == 1:
            return params
        dtype = jnp.dtype(self.cfg.model.compute_dtype)

        def gather(p, master, compute):
            # Cast on the shard, then gather (over `data`; with fsdp alone the shard is already
            # laid out as the forward pass reads it): the all-gather moves compute_dtype bytes.
            cast = jax.lax.with_sharding_constraint(p.astype(dtype), master)
            return jax.lax.with_sharding_constraint(cast, compute)

        train, frozen = self.split(params)
        compute = self.split(self.rest_sharding)[0]
        return lora.join(jax.tree.map(gather, train, self.train_sharding, compute), frozen)

    def gradients(self, state, batch):
        """(means of loss and metrics, gradients of the trainable parameters) over the
        micro-batches of `batch`.

        With the distributed optimizer the weights are gathered once, before the micro-batch
        loop, and each micro-batch's gradients are reduce-scattered onto the master shards and
        accumulated there in float32; split over `fsdp`, the weights are gathered layer by
        layer inside each micro-batch's pass and their gradients accumulated on the fsdp
        shards. With optim.grad_reduce="step" each device accumulates its own rows' gradients
        and they are summed once, after the loop (_reduced_once). With float16 the gradients
        are of the scaled loss, divided by the scale here. The step skips its update when they
        are not finite; a subclass may override this method to inject such a fault at a
        chosen step.
        """
        params, frozen = self.split(self.compute_params(state["params"]))
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), state["step"])
        scale = state["scaler"]["scale"] if self.loss_scaled else None
        # Gradients go onto the float32 master shards: the distributed optimizer's, or fsdp's.
        distributed = self.cfg.optim.distributed or self.mesh.shape[parallel.FSDP] > 1
        micro = self.micro_shape[0]
        # A token-weighted objective (samples with "weights": conversations, packed documents)
        # gives each micro-batch's mean its share of the step's scored tokens, so that the
        # step's loss and gradients are the mean over all of them; otherwise each share is 1.
        shares = jnp.ones((micro,), jnp.float32)
        if "weights" in batch:
            counts = batch["weights"].reshape(micro, -1).sum(-1).astype(jnp.float32)
            shares = counts * micro / jnp.maximum(counts.sum(), 1.0)

        def objective(params, batch, key, share):  # differentiated: the trainable parameters
            value, metrics = self.loss(lora.join(params, frozen), batch, key)
            weighted = value * share
            loss = weighted if scale is None else weighted * scale
            return loss, {"loss": weighted, **metrics}

        def grads_of(micro_batch, i):
            (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                params, micro_batch, jax.random.fold_in(key, i), shares[i]
            )
            if distributed:
                grads = jax.tree.map(self._to_master, grads, self.train_sharding)
            return metrics, grads

        def accumulate(carry, xs):
            sums, grad_sum = carry
            i, micro_batch = xs
            metrics, grads = grads_of(micro_batch, i)
            sums = jax.tree.map(jnp.add, sums, metrics)
            return (sums, jax.tree.map(jnp.add, grad_sum, grads)), None

        first = jax.tree.map(lambda x: x[0], batch)
        once = self.cfg.optim.grad_reduce == "step"
        if once and self.schedule is None:
            sums, grad_sum = self._reduced_once(params, frozen, batch, key, shares, scale)
        elif self.schedule is not None:
            if once:
                sums, grad_sum = self._pipelined_once(
                    params, frozen, batch, key, shares, scale, objective
                )
            elif self.schedule.kind == "1f1b":
                sums, grad_sum = self._one_f_one_b(params, frozen, batch, key, shares, scale)
            else:
                keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(micro))
                (_, sums), grad_sum = jax.value_and_grad(self._pipelined, has_aux=True)(
                    params, batch, keys, objective, shares
                )
            if distributed:
                grad_sum = jax.tree.map(self._to_master, grad_sum, self.train_sharding)
        elif micro == 1:  # no accumulation loop: no zeroed gradient buffers, no adds into them
            sums, grad_sum = grads_of(first, 0)
        else:
            value_shape, metric_shapes = jax.eval_shape(
                self.loss, lora.join(params, frozen), first, None
            )
            zero_metrics = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), {"loss": value_shape, **metric_shapes}
            )
            zeros = jax.tree.map(jnp.zeros_like, params)
            if distributed:  # float32 accumulators on the master shards
                zeros = jax.tree.map(self._to_master, zeros, self.train_sharding)
            (sums, grad_sum), _ = jax.lax.scan(
                accumulate, (zero_metrics, zeros), (jnp.arange(micro), batch)
            )
        grads = jax.tree.map(lambda g: g / micro, grad_sum)
        if scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        means = jax.tree.map(lambda v: v / micro, sums)
        if "weights" in batch:
            means["scored_tokens"] = counts.sum()
        return means, grads

    def _reduced_once(self, params, frozen, batch, key, shares, scale):
        """(sums of the metrics, sums of the gradients) over the micro-batches, the gradients
        summed over the batch axes once, after the loop (optim.grad_reduce="step").

        Each parameter is broadcast to a leading axis of one copy per batch shard, laid out
        over the batch axes (parallel.batch_axes()): each device holds the copy of its own
        shard, as it held the parameter, with no communication. The loss is a jax.vmap over
        the shards (spmd_axis_name: the batch axes) of one shard's loss on its rows
        (parallel.per_batch_shard), averaged; so the gradient of each copy is its shard's
        share of the step's gradient, left on its devices: autodiff has nothing to sum over
        the batch axes. The shares are accumulated in float32 over the micro-batches, then
        summed once per parameter in optim.grad_reduce_dtype: one all-reduce, or with
        optim.distributed one reduce-scatter onto the master shards (psum_scatter in a
        shard_map, a true reduce-scatter). Dropout draws each row the bits the automatic path
        draws (dropout.kept). A parameter whose gradient is a sum over the `model` shards
        (parallel.model_copy_axis: norms, row-parallel biases and the position table under
        sequence parallelism, the key/value weight split by rows, LoRA factors whole over
        `model`) further takes one copy per model shard, which the layers apply to that
        shard's part alone; its copies are summed over `model` in the same collective, after
        the loop."""
        axes = parallel.batch_axes()
        shards = math.prod(self.mesh.shape[a] for a in axes)
        micro = self.micro_shape[0]
        reduce_dtype = self._reduce_dtype
        params, copy_at = self._with_model_copies(params)
        compute = jax.tree.map(
            lambda c, at: _copied(c.spec, at), self.split(self.compute_sharding)[0], copy_at
        )
        masters = jax.tree.map(lambda s: s.spec, self.train_sharding)

        def per_shard(spec):  # a (shards, ...) array, its copies on their batch shards
            return lambda x: jax.lax.with_sharding_constraint(x, P(axes, *spec))

        def to_shards(x, spec):
            return per_shard(spec)(jnp.broadcast_to(x, (shards, *x.shape)))

        copies = jax.tree.map(to_shards, params, compute, is_leaf=_is_spec)
        # (micro, batch, ...) -> (micro, shards, batch / shards, ...): row blocks as laid out.
        rows = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x.reshape(micro, shards, -1, *x.shape[2:]), P(None, axes)
            ),
            batch,
        )

        def shard_loss(p, micro_batch, k):  # frozen parameters: the same on every shard
            with parallel.per_batch_shard(_SHARDS):
                return self.loss(lora.join(p, frozen), micro_batch, k)

        def objective(copies, micro_batch, k, share):
            values, metrics = jax.vmap(
                shard_loss, in_axes=(0, 0, None), axis_name=_SHARDS, spmd_axis_name=axes
            )(copies, micro_batch, k)
            # The batch's mean is the mean of the shards' values (equal shards of rows; a mean
            # over scored positions is loss.weighted_mean's shard share). The metrics stay per
            # shard until after the loop, so that no micro-batch sums them over the batch axes
            # (the loss's own value is not used: XLA drops its sum).
            weighted = values * share
            loss = weighted.mean() if scale is None else weighted.mean() * scale
            return loss, {"loss": weighted, **metrics}

        def step(carry, xs):
            sums, grad_sum = carry
            i, micro_batch = xs
            (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                copies, micro_batch, jax.random.fold_in(key, i), shares[i]
            )
            sums = jax.tree.map(jnp.add, sums, metrics)
            grad_sum = jax.tree.map(
                lambda a, g, spec: per_shard(spec)(a + g.astype(jnp.float32)),
                grad_sum,
                grads,
                compute,
                is_leaf=_is_spec,
            )
            return (sums, grad_sum), None

        first = jax.tree.map(lambda x: x[0], rows)
        _, shapes = jax.eval_shape(objective, copies, first, key, shares[0])
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zeros = jax.tree.map(
            lambda c, spec: per_shard(spec)(jnp.zeros(c.shape, jnp.float32)),
            copies,
            compute,
            is_leaf=_is_spec,
        )
        (sums, grad_sum), _ = jax.lax.scan(step, (zero_sums, zeros), (jnp.arange(micro), rows))
        sums = jax.tree.map(lambda v: v.mean(0), sums)

        def reduce(g, master, at):
            # g: this device's (1, ...) share of its gradient block (and its model shard's
            # copy at `at`). Each dimension that the master shard splits over some of the
            # summed axes takes a reduce-scatter over those, the axes left a sum; a
            # parameter the master leaves whole over them, an all-reduce.
            g = g[0].astype(reduce_dtype)
            summed = axes
            if at is not None:
                g, summed = g.squeeze(at), (*axes, parallel.MODEL)
            rest = summed
            for i, entry in enumerate(tuple(master)):
                over = tuple(a for a in parallel.entry_axes(entry) if a in summed)
                if over:
                    g = jax.lax.psum_scatter(g, over, scatter_dimension=i, tiled=True)
                    rest = tuple(a for a in rest if a not in over)
            if rest:
                g = jax.lax.psum(g, rest)
            return g.astype(jnp.float32)

        # Manual over every axis (the blocks as laid out, nothing moves but the sums): a
        # shard_map manual over the batch axes alone would also do, but XLA:CPU (jax 0.10)
        # aborts compiling its 16-bit sums.
        grads = jax.shard_map(
            lambda grads: jax.tree.map(reduce, grads, masters, copy_at, is_leaf=_is_spec),
            in_specs=(jax.tree.map(lambda spec: P(axes, *spec), compute, is_leaf=_is_spec),),
            out_specs=masters,
        )(grad_sum)
        return sums, grads

    def _pipelined_once(self, params, frozen, batch, key, shares, scale, objective):
        """A pipeline schedule with its gradients summed over the batch axes once, after the
        schedule (optim.grad_reduce="step"): run manual over the batch axes, each device on
        its own rows (parallel.per_batch_shard) keeping its gradients until one mean over the
        shards at the end (1F1B: inside its schedule, models/pipeline_1f1b.py; GPipe: around
        its forward and backward passes). The parameters whose gradients are sums over the
        `model` shards (parallel.model_copy_axis) go in as one copy per model shard, each
        differentiated on its own shard; their copies' sum, after the schedule, is their one
        sum over `model`."""
        copied, copy_at = self._with_model_copies(params)
        if self.schedule.kind == "1f1b":
            sums, grads = self._one_f_one_b(
                copied, frozen, batch, key, shares, scale, self._reduce_dtype
            )
        else:
            sums, grads = self._gpipe_once(copied, batch, key, shares, objective)
        return sums, jax.tree.map(lambda g, at: g if at is None else g.sum(at), grads, copy_at)

    def _gpipe_once(self, params, batch, key, shares, objective):
        """GPipe's forward and backward passes on each device's own rows, in a shard_map
        manual over the batch axes, then the mean over the batch shards of the metrics and
        the float32 gradients: one sum each, in optim.grad_reduce_dtype."""
        axes = parallel.batch_axes()
        micro = self.micro_shape[0]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(micro))
        dtype = self._reduce_dtype

        def body(params, batch):
            def run():
                (_, sums), grads = jax.value_and_grad(self._pipelined, has_aux=True)(
                    params, batch, keys, objective, shares
                )
                return sums, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

            return parallel.mean_over_batch_shards(run, axes, dtype)

        rows = jax.tree.map(lambda _: P(None, axes), batch)
        run = jax.shard_map(
            body, in_specs=(P(), rows), out_specs=(P(), P()), axis_names=set(axes),
            check_vma=False,
        )  # fmt: skip
        return run(params, batch)

    @property
    def _reduce_dtype(self):
        """The dtype of the gradients' one sum under optim.grad_reduce="step"."""
        if self.cfg.optim.grad_reduce_dtype == "float32":
            return jnp.float32
        return jnp.dtype(self.cfg.model.compute_dtype)

    def _with_model_copies(self, params):
        """(the trainable parameters, each that model_copy_axes names as one copy per `model`
        shard laid out over `model`, each copy whole; those axes)."""
        copy_at = self.model_copy_axes()
        model = self.mesh.shape[parallel.MODEL]

        def copies(x, sharding, at):
            if at is None:
                return x
            x = jnp.broadcast_to(jnp.expand_dims(x, at), (*x.shape[:at], model, *x.shape[at:]))
            return jax.lax.with_sharding_constraint(x, _copied(sharding.spec, at))

        compute = self.split(self.compute_sharding)[0]
        return jax.tree.map(copies, params, compute, copy_at), copy_at

    def model_copy_axes(self):
        """For each trainable parameter, where optim.grad_reduce="step" gives it one copy per
        `model` shard (parallel.model_copy_axis), or None. Call under self.context()."""
        return jax.tree_util.tree_map_with_path(
            lambda path, spec, names: parallel.model_copy_axis(
                spec, names, adapter=lora.ADAPTER in [getattr(k, "key", None) for k in path]
            ),
            self.split(self.compute_specs)[0],
            self.split(self.logical_axes)[0],
            is_leaf=_is_spec,
        )

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
        # (not a select) keeps the update in place: no second copy of the state. Frozen
        # parameters pass through untouched.
        trained, frozen = self.split(state["params"])
        trained, opt_state = jax.lax.cond(
            finite, update, lambda p, o: (p, o), trained, state["opt_state"]
        )
        new_state = {
            "params": lora.join(trained, frozen),
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
        if not micro:
            return self.abstract_eval_batch()
        return {
            k: jax.ShapeDtypeStruct(
                (*self.micro_shape, *s), jnp.int32, sharding=self.batch_sharding[k]
            )
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

    def put_batch(self, batch: dict) -> dict:
        """This process's rows (train_rows) of a global batch ({field: (rows, ...)}) -> global
        device arrays of shape (micro, batch / micro, ...)."""
        out = {}
        for k, s in self.fields.items():
            local = np.asarray(batch[k]).reshape(self.micro_shape[0], -1, *s)
            shape = (*self.micro_shape, *s)
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding[k], local, shape)
        return out


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _copied(spec: P, at: int | None) -> P:
    """A parameter's compute spec, or with one copy per `model` shard at dimension `at`
    (parallel.model_copy_axis) the spec of those copies: the copies over `model`, each whole."""
    if at is None:
        return spec
    dims = [None if parallel.MODEL in parallel.entry_axes(e) else e for e in spec]
    dims += [None] * (at - len(dims))
    return P(*dims[:at], parallel.MODEL, *dims[at:])


def _check_reduce_once(cfg: Config, schedule, mesh) -> None:
    """Refuse what optim.grad_reduce="step" does not cover yet, saying what to change."""
    m = cfg.model
    refused = [
        (
            mesh.shape[parallel.FSDP] > 1,
            "an fsdp axis (its gradients are reduce-scattered per layer)",
        ),
        (mesh.shape[parallel.CONTEXT] > 1, "a context axis"),
        (
            m.arch != "gpt" and m.sequence_parallel,
            f"model.arch={m.arch} with sequence parallelism (its embeddings and heads read "
            "parameters whole over `model`)",
        ),
        (m.moe, "Mixture-of-Experts layers (model.moe_experts)"),
    ]
    for hit, what in refused:
        if hit:
            raise ConfigError(
                f'optim.grad_reduce="step" does not cover {what} yet: use '
                'optim.grad_reduce="micro_batch"'
            )
