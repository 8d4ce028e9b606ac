"""A model's graph and its parameters' layout on a mesh: what training, evaluation, generation
and conversion share. Trainer (trainer.py) adds the optimizer, the train state and the train
step; evaluation, generation, the server and conversion need nothing more than this."""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megajax import context_attention, layers, lora, models, moe, parallel, pipeline_arithmetic
from megajax.config import Config, ConfigError
from megajax.mesh import check_batch, check_model
from megajax.models import pipeline_1f1b
from megajax.models.pipeline_schedule import scan_layers


class ShardedModel:
    """A model (models.build's class) on `mesh`: its graph, its parameters' shardings
    (parallel.rules()), and its compiled eval step over (batch, ...) batches split over `data`.

    Parameters are a plain nested dict of float32 arrays. Eval batches hold train.batch_size
    samples, so that a run evaluates in the batches it trains in; with a pipeline axis they go
    through the schedule in the train step's micro-batches.
    """

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.context_degree = mesh.shape[parallel.CONTEXT]
        check_model(
            cfg.model, mesh.shape[parallel.MODEL], mesh.shape[parallel.EXPERT], self.context_degree
        )
        if self.context_degree > 1:
            context_attention.check(cfg.model)
            if cfg.lora.rank:
                raise ConfigError(
                    f"lora.rank={cfg.lora.rank} on --mesh context={self.context_degree}: LoRA "
                    "adapters on a context-split sequence are not proven yet: use context=1"
                )
        check_batch(cfg.train.batch_size, cfg.train.micro_batches, batch_degree(mesh))
        stages = mesh.shape[parallel.PIPELINE]
        self.schedule = None  # the micro-batches are accumulated one after another
        dense_targets = {"fc1", "fc2"} & set(cfg.lora.target_names)
        if cfg.model.moe and cfg.lora.rank and (dense_targets or cfg.model.moe_every > 1):
            raise ConfigError(
                "lora.targets: a MoE model's adapters attach to its attention alone (qkv, "
                "proj; not its experts, nor with model.moe_every > 1 yet): use "
                "--set lora.targets=qkv,proj"
            )
        if stages > 1 and cfg.model.moe and cfg.model.moe_every > 1:
            raise ConfigError(
                "model.moe_every > 1: MoE layers between dense ones do not run in pipeline "
                "stages yet: use pipeline=1, or model.moe_every=1"
            )
        if mesh.shape[parallel.FSDP] > 1 and cfg.model.remat == "selective":
            # The layer's remat policy that drops the gathered weights (scan_layers) would
            # override the nested checkpoints that selective recomputation is made of, and
            # keep the attention scores they drop.
            raise ConfigError(
                "model.remat=selective does not combine with an fsdp axis yet: use "
                "--set model.remat=full (fsdp's gathers then repeat with the recomputed "
                "forward) or model.remat=none"
            )
        if stages > 1:  # they flow through the pipeline stages together
            pipeline_arithmetic.check(
                num_layers=cfg.model.num_layers,
                stages=stages,
                repeats=cfg.train.pipeline_repeats,
                micro_batches=cfg.train.micro_batches,
            )
            kind = cfg.train.pipeline_schedule
            if kind == "1f1b":
                pipeline_arithmetic.check_1f1b(
                    stages=stages,
                    repeats=cfg.train.pipeline_repeats,
                    micro_batches=cfg.train.micro_batches,
                )
                models.pieces(cfg.model)  # a ConfigError for a model it cannot cut
                if mesh.shape[parallel.CONTEXT] > 1 and cfg.model.context_attention == "ring":
                    raise ConfigError(
                        "train.pipeline_schedule=1f1b runs the allgather context core only (the "
                        "ring's permutes inside a stage's conditional tick abort on XLA:CPU): set "
                        "model.context_attention=allgather, or train.pipeline_schedule=gpipe"
                    )
            self.schedule = pipeline_arithmetic.Schedule(stages, cfg.train.pipeline_repeats, kind)
        self.padded_vocab = cfg.model.padded_vocab_size(mesh.shape[parallel.MODEL])
        with self.context():
            abstract = nnx.eval_shape(lambda: self._new_model(0))
            self.graphdef, self._abstract_variables = nnx.split(abstract)
            self.compute_specs = nnx.to_pure_dict(nnx.get_partition_spec(self._abstract_variables))
            self._abstract_params = nnx.to_pure_dict(self._abstract_variables)
            # Each parameter's logical axis names, as its Variable's metadata holds them.
            self.logical_axes = nnx.to_pure_dict(
                jax.tree.map(
                    lambda v: v.get_metadata().get("out_sharding"),
                    self._abstract_variables,
                    is_leaf=lambda x: isinstance(x, nnx.Variable),
                )
            )
        # The forward pass's layout (each weight whole over `fsdp` where it is read), and
        # where the parameters are held: split over `fsdp` (parallel.at_rest; the same layout
        # without that axis), and by a Trainer with the distributed optimizer further over
        # `data`.
        self.rest_specs = jax.tree.map(
            lambda a, spec, names: parallel.at_rest(a.shape, spec, names, dict(mesh.shape)),
            self._abstract_params,
            self.compute_specs,
            self.logical_axes,
        )
        self.compute_sharding = jax.tree.map(self._named, self.compute_specs, is_leaf=_is_spec)
        self.rest_sharding = jax.tree.map(self._named, self.rest_specs, is_leaf=_is_spec)
        self.param_sharding = self.rest_sharding
        micro = (cfg.train.micro_batches, cfg.train.batch_size // cfg.train.micro_batches)
        self.micro_shape = micro
        self.fields = models.batch_fields(cfg.model, documents=cfg.data.documents)
        self.objective = models.objective(cfg.model)
        # Samples are split over `data`, `fsdp` and `expert` by rows.
        self.eval_sharding = {
            k: self._named(P(parallel.BATCH, *[None] * len(s))) for k, s in self.fields.items()
        }
        # Rows of a global (batch, ...) eval batch that this process feeds to its devices.
        self.eval_rows = process_rows(mesh, cfg.train.batch_size)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self._abstract_params))

    def _named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @contextlib.contextmanager
    def context(self):
        """The mesh and the logical-axis table, active while tracing model code."""
        m, model_degree = self.cfg.model, self.mesh.shape[parallel.MODEL]
        table = parallel.rules(
            sequence_parallel=m.sequence_parallel,
            kv_by_rows=m.kv_by_rows(model_degree),
            context=self.context_degree > 1,
        )
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(table):
            yield

    def _new_model(self, seed):
        model = models.build(self.cfg.model, padded_vocab=self.padded_vocab, rngs=nnx.Rngs(seed))
        if self.mesh.shape[parallel.PIPELINE] > 1:
            moe.for_stages(model)
        return lora.attach(model, self.cfg.lora, seed=seed)

    def _initial_params(self):
        """The parameters as train.seed initialises them (trace under context()). Split over
        `fsdp`, they take their layout from the caller's out_shardings alone: the table's
        layout, which Flax would otherwise pin each one to as it creates it, is whole over
        `fsdp`, and each device would draw the whole weight before keeping its slice."""
        eager = self.mesh.shape[parallel.FSDP] == 1
        with nnx.use_eager_sharding(eager):
            return nnx.to_pure_dict(nnx.split(self._new_model(self.cfg.train.seed))[1])

    def fresh_params(self, keys=None):
        """Freshly initialised parameters (train.seed), created shard by shard; with `keys`,
        only those under these top-level keys (XLA drops the others' initializers)."""
        keys = list(self.param_sharding) if keys is None else list(keys)

        def init():
            params = self._initial_params()
            return {k: params[k] for k in keys}

        shardings = {k: self.param_sharding[k] for k in keys}
        with self.context():
            return jax.jit(init, out_shardings=shardings)()

    def fresh_adapters(self):
        """Freshly initialised LoRA adapters (train.seed: A random, B zero), created shard by
        shard, as the trainable part of the parameters (lora.split); {} without LoRA."""
        if self.cfg.lora.rank == 0:
            return {}
        shardings = lora.split(self.param_sharding, self.cfg.lora)[0]
        with self.context():
            return jax.jit(
                lambda: lora.split(self._initial_params(), self.cfg.lora)[0],
                out_shardings=shardings,
            )()

    def merged_params(self, params):
        """The parameters of the plain model with each LoRA adapter folded into its kernel
        (lora.merge), laid out as the plain model's; the parameters themselves without LoRA."""
        if self.cfg.lora.rank == 0:
            return params
        base = lora.split(self.param_sharding, self.cfg.lora)[1]
        with self.context():
            return jax.jit(lambda p: lora.merge(p, self.cfg.lora), out_shardings=base)(params)

    def abstract_params(self):
        """The parameters' shapes, dtypes and shardings, with nothing allocated: the target a
        checkpoint's parameters restore onto."""
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            self._abstract_params,
            self.param_sharding,
        )

    def model(self, params):
        """The model (models.build's class) holding `params`."""
        return nnx.merge(self.graphdef, params)

    def token_losses(self, params, inputs, targets, key=None, segments=None, positions=None):
        """A GPT's next-token cross-entropy per position, (batch, length); `key=None` disables
        dropout; packed documents: `segments` and `positions` (models.gpt.GPT)."""
        return self.model(params).token_losses(
            inputs, targets, key=key, segments=segments, positions=positions
        )

    def loss(self, params, batch: dict, key):
        """(objective, metrics) of a batch of samples (a dict of models.batch_fields arrays).
        On a context-split mesh a decoder's batch is first put in the causal load balance's
        order (context_attention.balance). Parameters held split over `fsdp` outside the
        stacked layers (embeddings, head, final norm) are gathered here, for the whole forward
        and backward pass; the layers' are gathered one layer at a time inside the layer
        scan."""
        m = self.cfg.model
        if self.context_degree > 1 and m.arch == "gpt":
            batch = context_attention.balance(batch, seq_len=m.seq_len, context=self.context_degree)
        graphdef, state = nnx.split(self.model(params))
        model = nnx.merge(graphdef, parallel.gathered_variables(state, stacked=False))
        return self.objective(model, batch, key)

    def compute_params(self, params):
        """The parameters as the forward pass reads them: here, as they are held."""
        return params

    def _pipelined(self, params, batch, keys, objective, shares):
        """The sums over the micro-batches of `objective` (value, metrics), all micro-batches
        going through the pipeline schedule together: the embedding and the heads run on each
        micro-batch (vmapped, replicated over `pipeline`), the stacked layers as the schedule's
        stages (models/pipeline_schedule.py). `shares` (micro,) weigh the micro-batches."""
        key_axis = None if keys is None else 0  # None: no dropout
        per_micro = jax.vmap(
            objective, in_axes=(None, 0, key_axis, 0), axis_name=pipeline_arithmetic.MICRO
        )
        with pipeline_arithmetic.scheduled(self.schedule):
            values, metrics = per_micro(params, batch, keys, shares)
        return values.sum(), jax.tree.map(jnp.sum, metrics)

    def _one_f_one_b(self, trainable, frozen, batch, key, shares, scale, reduce_once=None):
        """(sums over the micro-batches of the objective's metrics, float32 sums of the
        trainable parameters' gradients) by the 1F1B schedule (models/pipeline_1f1b.py): the
        model cut into embedding, stacked layers and head (models.pieces). `shares` (micro,)
        weigh the micro-batches; `scale` multiplies the differentiated loss (or None);
        `reduce_once`: the dtype of the gradients' one sum over the batch axes after the loop
        (optim.grad_reduce="step"), or None (each tick's, as the partitioner places them)."""
        cfg = self.cfg.model
        pieces = models.pieces(cfg)
        if self.context_degree > 1 and cfg.arch == "gpt":  # each micro-batch as loss() has it
            balance = functools.partial(
                context_attention.balance, seq_len=cfg.seq_len, context=self.context_degree
            )
            batch = jax.vmap(balance)(batch)
        whole = self.model(lora.join(trainable, frozen))
        blocks = nnx.split(getattr(whole, pieces.stack))[0]

        def embed(params, batch, key):
            return pieces.embed(self.model(params), batch, key)

        def stage(chunk, x, batch, key, first_layer):
            keys = None
            if key is not None:  # the plain scan's per-layer keys, this chunk's slice of them
                keys = jax.random.split(layers.split_key(key)[1], cfg.num_layers)
                depth = jax.tree.leaves(chunk)[0].shape[0]
                keys = jax.lax.dynamic_slice_in_dim(keys, first_layer, depth)
            attend = pieces.attend(batch)
            # As Variables (their logical names: fsdp gathers each layer's by them).
            chunk = nnx.split(nnx.merge(blocks, chunk))[1]
            return scan_layers(blocks, chunk, x, attend=attend, keys=keys, remat=cfg.remat)[0]

        def head(params, x, batch, share):
            value, metrics = pieces.head(self.model(params), x, batch)
            return value * share, {"loss": value * share, **metrics}

        fns = pipeline_1f1b.StepFns(embed, stage, head)
        scale = jnp.float32(1.0) if scale is None else scale
        return pipeline_1f1b.run(
            fns, trainable, frozen, batch, key, shares, scale, stages=self.schedule.stages,
            repeats=self.schedule.repeats, stack=pieces.stack, reduce_once=reduce_once,
        )  # fmt: skip

    def abstract_eval_batch(self) -> dict:
        """Shapes and shardings of an eval batch, (train.batch_size, ...) per field."""
        return {
            k: jax.ShapeDtypeStruct(
                (self.cfg.train.batch_size, *s), jnp.int32, sharding=self.eval_sharding[k]
            )
            for k, s in self.fields.items()
        }

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

            def objective(params, batch, key, share):
                value, metrics = self.loss(params, batch, key)
                return value * share, {"loss": value * share, **metrics}

            _, sums = self._pipelined(params, split, None, objective, jnp.ones((micro,)))
            return jax.tree.map(lambda v: v / micro, sums)

        with self.context():
            jitted = jax.jit(evaluate)
            return jitted.lower(self.abstract_params(), self.abstract_eval_batch()).compile()

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


def batch_degree(mesh) -> int:
    """How many shards the batch is split into: the data, fsdp and expert degrees' product."""
    return math.prod(mesh.shape[a] for a in parallel.BATCH)


def process_rows(mesh, batch: int) -> np.ndarray:
    """Indices of the rows of a (batch, ...) array split over the batch axes (parallel.BATCH)
    that live on this process's devices: a contiguous range, as
    make_array_from_process_local_data needs."""
    per_shard = batch // batch_degree(mesh)
    me = jax.process_index()
    axes = [mesh.axis_names.index(a) for a in parallel.BATCH]
    by_data = np.moveaxis(mesh.devices, axes, range(len(axes))).reshape(batch_degree(mesh), -1)
    shards = [i for i, grp in enumerate(by_data) if any(d.process_index == me for d in grp.flat)]
    rows = np.concatenate([np.arange(i * per_shard, (i + 1) * per_shard) for i in shards])
    if np.any(np.diff(rows) != 1):
        raise ValueError(f"process {me} holds non-adjacent data shards {shards} of the mesh")
    return rows
