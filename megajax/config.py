"""Run configuration: frozen dataclasses, config files, and type-checked `--set` overrides."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config file or override the user must fix; the message says how."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field may take: low <= value (low < value if low_open), and
    value <= high (value < high if high_open); None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return (
            f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
            f"{')' if self.high_open else ']'}"
        )


def _number(x) -> str:
    return "2**32" if x == 2**32 else f"{x:g}"


POSITIVE, NON_NEGATIVE, FRACTION = Range(1), Range(0), Range(0, 1, high_open=True)


def check_ranges(section: str, fields) -> None:
    """Raise a ConfigError naming the first field of `fields` (a config section's dataclass)
    whose value is outside its RANGES entry."""
    for name, allowed in type(fields).RANGES.items():
        value = getattr(fields, name)
        if value not in allowed:
            raise ConfigError(f"{section}.{name}={value}: must be {allowed}")


ARCHS = ("gpt", "bert", "bert_multiple_choice")
PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("gelu_tanh", "gelu")
BINARY_HEADS = ("sop", "nsp", "none")
REMATS = ("none", "full", "selective")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
MOE_ROUTERS = ("topk_softmax", "softmax_topk")
FORMATS = ("text", "chat")
ROPE_SCALINGS = ("none", "llama3", "yarn")
CONTEXT_ATTENTIONS = ("allgather", "ring")
GRAD_REDUCES = ("micro_batch", "step")
GRAD_REDUCE_DTYPES = ("float32", "compute")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE stretched past the context a model was trained at, as Hugging Face's
    rope_parameters say and transformers computes it (modeling_rope_utils.py): "none", the
    plain RoPE; "llama3", Llama 3.1's; "yarn", YaRN's (arXiv 2309.00071). The fields are
    transformers' names; each type reads its own."""

    type: str = "none"
    # Both types: how far the context is stretched, and the context the model was trained at.
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    # llama3: wavelengths longer than original_max_position_embeddings / low_freq_factor are
    # stretched by factor, those shorter than original / high_freq_factor kept, and those
    # between stretched by an amount that slides smoothly from one to the other (Llama 3.1's
    # 1 and 4 are the defaults).
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn: dimensions that turn more than beta_fast times over the original context keep their
    # frequency, those that turn fewer than beta_slow times are stretched by factor, a linear
    # ramp between (its ends rounded outwards when truncate). cos and sin are scaled by
    # attention_factor; 0 derives it: 0.1 ln(factor) + 1, or with mscale and mscale_all_dim
    # both set (DeepSeek's), the ratio of 0.1 mscale ln(factor) + 1 to its mscale_all_dim form.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 0.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    RANGES: typing.ClassVar[dict[str, Range]] = dict(
        factor=Range(1), original_max_position_embeddings=NON_NEGATIVE,
        low_freq_factor=Range(0, low_open=True), high_freq_factor=Range(0, low_open=True),
        beta_fast=Range(0, low_open=True), beta_slow=Range(0, low_open=True),
        attention_factor=NON_NEGATIVE, mscale=NON_NEGATIVE, mscale_all_dim=NON_NEGATIVE,
    )  # fmt: skip

    def __post_init__(self):
        at = "model.rope_scaling"
        if self.type not in ROPE_SCALINGS:
            raise ConfigError(f"{at}.type={self.type!r}: use one of {', '.join(ROPE_SCALINGS)}")
        check_ranges(at, self)
        if self.type != "none" and not self.original_max_position_embeddings:
            raise ConfigError(
                f"{at}.original_max_position_embeddings=0: a {self.type} RoPE needs the "
                "context the model was trained at, >= 1"
            )
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"{at}.high_freq_factor={self.high_freq_factor:g}: must be > "
                f"low_freq_factor={self.low_freq_factor:g}"
            )
        if self.type == "yarn" and self.beta_fast < self.beta_slow:
            raise ConfigError(
                f"{at}.beta_fast={self.beta_fast:g}: must be >= beta_slow={self.beta_slow:g}"
            )

    @property
    def scaled(self) -> bool:
        return self.type != "none"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # "gpt": left-to-right LM; "bert": bidirectional encoder pretrained with a masked-LM head
    # and a binary sentence-pair head; "bert_multiple_choice": BERT scoring answer options.
    arch: str = "gpt"
    vocab_size: int = 50257  # real tokens; the embedding is padded (see padded_vocab_size)
    make_vocab_size_divisible_by: int = 128  # times the model degree, as Megatron-LM pads
    seq_len: int = 1024  # context length; also the number of learned positions
    num_layers: int = 12
    hidden: int = 768
    num_heads: int = 12
    mlp_ratio: int = 4  # fc1 width = mlp_ratio * hidden
    dropout: float = 0.1  # on embeddings, attention probabilities and residual branches
    init_std: float = 0.02  # N(0, init_std); residual output projections / sqrt(2 * layers)
    layernorm_eps: float = 1e-5
    # Activations recomputed in the backward pass instead of saved: "none"; "full" (each
    # layer from its input); "selective" (attention's core, arXiv 2205.05198: no (batch,
    # heads, length, length) tensor is saved, every (batch, length, hidden)-sized one is).
    remat: str = "none"
    # Split layer norms, dropout and residual adds over `model` along the sequence (arXiv
    # 2205.05198): the same bytes move, activations between the tensor-parallel regions / T.
    sequence_parallel: bool = False
    # "bfloat16" or "float16": 16-bit matmuls over float32 master weights (layer norms,
    # softmax and the loss stay float32); float16 scales the loss (optim.*loss_scale*).
    compute_dtype: str = "float32"
    # "einsum": softmax(q k^T) v written out, fp32 scores (any device, any dropout);
    # "xla" or "cudnn": jax.nn.dot_product_attention (cudnn: fused GPU kernel, no dropout).
    attention: str = "einsum"
    # On a mesh with context > 1 (the sequence split over `context`), how attention reaches
    # the other ranks' keys and values: "allgather" (one all-gather of K and V per layer, as
    # Llama 3 trained) or "ring" (blocks passed round the ranks). megajax/context_attention.py.
    context_attention: str = "allgather"
    # "pre": x + f(ln(x)) (GPT-2, and the paper's rearranged BERT, its Figure 7); "post":
    # ln(x + f(x)) (the original BERT, whose embeddings also end in a layer norm).
    layernorm_placement: str = "pre"
    activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's approximation) or "gelu" (exact, BERT)
    type_vocab_size: int = 2  # BERT's segment (token type) embeddings
    # BERT's binary head on the pooled [CLS]: sentence-order ("sop", the paper's) or
    # next-sentence ("nsp", the original BERT's) prediction, or "none".
    binary_head: str = "sop"
    num_choices: int = 4  # answer options per question of a bert_multiple_choice model (RACE)
    # Llama-style decoders (the defaults are GPT-2's): "rmsnorm" (scale only, eps is
    # layernorm_eps) or "layernorm"; "rope" positions (rotate-half pairing, as Hugging Face and
    # Megatron-Core rotate) at base rope_theta, or "learned" ones; "swiglu" MLP, down(silu(gate
    # x) * up x), or "gelu" (model.activation picks its form).
    norm: str = "layernorm"
    positions: str = "learned"
    rope_theta: float = 10000.0
    mlp: str = "gelu"
    ffn_hidden: int = 0  # the MLP's inner width; 0: mlp_ratio * hidden (Llama's is not 4h)
    num_kv_heads: int = 0  # grouped-query attention's key/value heads; 0: num_heads
    bias: bool = True  # biases in the linear layers and layer norms (Llama has none)
    tie_embeddings: bool = True  # LM head = word embedding; false: its own (vocab, hidden)
    # Mixture-of-Experts (megajax/moe.py): 0 experts is a dense model. Each token's router
    # picks moe_top_k of moe_experts SwiGLU experts of width moe_ffn_hidden (0: mlp_hidden);
    # "topk_softmax" weighs them by a softmax over the k chosen logits (Mixtral's; the same as
    # a softmax over all experts renormalised over the k), "softmax_topk" by their
    # probabilities under the softmax over all experts, not renormalised (Switch, Qwen-MoE).
    # moe_shared_experts always-on experts (DeepSeek, Qwen) form one SwiGLU MLP beside them.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden: int = 0
    moe_router: str = "topk_softmax"
    moe_shared_experts: int = 0
    # MoE in layers 0, n, 2n, ... (Megatron-LM's --moe-layer-freq), dense MLPs in the others.
    moe_every: int = 1
    # 0: dropless, every token reaches its k experts. Otherwise each expert takes at most
    # ceil(factor * seq_len * top_k / experts) of a sequence's choices, earlier tokens first
    # (GShard's capacity per group, the group a sequence, so no mesh changes what is dropped).
    moe_capacity_factor: float = 0.0
    # Coefficients of the load-balancing loss (Switch/GShard, over all layers' choices as
    # transformers computes Mixtral's) and of the router z-loss (ST-MoE), both added to the
    # objective and logged.
    moe_aux_loss: float = 0.01
    moe_z_loss: float = 0.0
    # RoPE stretched for contexts past the trained one (Llama 3.1's, YaRN's), a section of its
    # own: --set model.rope_scaling.type=llama3 --set model.rope_scaling.factor=8 ...
    rope_scaling: RopeScaling = RopeScaling()

    RANGES: typing.ClassVar[dict[str, Range]] = dict(
        vocab_size=POSITIVE, make_vocab_size_divisible_by=POSITIVE, seq_len=POSITIVE,
        num_layers=POSITIVE, hidden=POSITIVE, num_heads=POSITIVE, mlp_ratio=POSITIVE,
        dropout=FRACTION, init_std=NON_NEGATIVE, layernorm_eps=Range(0, low_open=True),
        type_vocab_size=POSITIVE, num_choices=POSITIVE, rope_theta=Range(0, low_open=True),
        ffn_hidden=NON_NEGATIVE, num_kv_heads=NON_NEGATIVE, moe_experts=NON_NEGATIVE,
        moe_top_k=POSITIVE, moe_ffn_hidden=NON_NEGATIVE, moe_shared_experts=NON_NEGATIVE,
        moe_every=POSITIVE, moe_capacity_factor=NON_NEGATIVE, moe_aux_loss=NON_NEGATIVE,
        moe_z_loss=NON_NEGATIVE,
    )  # fmt: skip

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # a saved config.json's, or replace(...)'s
            rope = section("model.rope_scaling", RopeScaling, self.rope_scaling)
            object.__setattr__(self, "rope_scaling", rope)
        check_ranges("model", self)
        for name, allowed in (
            ("arch", ARCHS),
            ("layernorm_placement", PLACEMENTS),
            ("activation", ACTIVATIONS),
            ("binary_head", BINARY_HEADS),
            ("remat", REMATS),
            ("compute_dtype", COMPUTE_DTYPES),
            ("norm", NORMS),
            ("positions", POSITIONS),
            ("mlp", MLPS),
            ("moe_router", MOE_ROUTERS),
            ("context_attention", CONTEXT_ATTENTIONS),
        ):
            if getattr(self, name) not in allowed:
                was_bool = name == "remat" and str(self.remat).lower() in ("true", "false")
                raise ConfigError(
                    f"model.{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}"
                    + ('; the old true is now "full", false "none"' if was_bool else "")
                )
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} does not divide num_heads="
                f"{self.num_heads}: each key/value head serves a whole group of query heads"
            )
        llama = (self.norm, self.positions, self.mlp) != ("layernorm", "learned", "gelu")
        decoder_only = llama or self.kv_heads != self.num_heads or not self.tie_embeddings
        if self.is_bert and (decoder_only or not self.bias):
            raise ConfigError(
                "model.norm, positions, mlp, num_kv_heads, bias and tie_embeddings are decoder "
                f"(arch=gpt) options; model.arch={self.arch} keeps their defaults"
            )
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ConfigError(
                f"model.moe_top_k={self.moe_top_k} is more than model.moe_experts="
                f"{self.moe_experts}: each token picks top_k distinct experts"
            )
        if self.moe_experts and self.num_layers % self.moe_every:
            raise ConfigError(
                f"model.num_layers={self.num_layers} is not a multiple of model.moe_every="
                f"{self.moe_every}: the layers come in groups of one MoE layer and "
                f"{self.moe_every - 1} dense ones"
            )
        if self.moe_experts and self.is_bert:
            raise ConfigError("model.moe_experts is a decoder (arch=gpt) option")
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"positions=rope needs an even head_dim, not {self.head_dim}")
        if self.rope_scaling.scaled and self.positions != "rope":
            raise ConfigError(
                f"model.rope_scaling.type={self.rope_scaling.type} scales RoPE: it needs "
                f"model.positions=rope, not {self.positions}"
            )

    @property
    def is_bert(self) -> bool:
        return self.arch != "gpt"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return self.ffn_hidden or self.mlp_ratio * self.hidden

    @property
    def moe(self) -> bool:
        return self.moe_experts > 0

    @property
    def moe_layers(self) -> int:
        """How many layers are MoE layers."""
        return self.num_layers // self.moe_every if self.moe else 0

    @property
    def expert_hidden(self) -> int:
        """One expert's inner width."""
        return self.moe_ffn_hidden or self.mlp_hidden

    @property
    def grouped_query(self) -> bool:
        """Fewer key/value heads than query heads: q and kv are then two weights, not one."""
        return self.kv_heads != self.num_heads

    def kv_by_rows(self, model_degree: int) -> bool:
        """Whether the key/value weight is split by rows rather than by heads: grouped-query
        attention with more model shards than key/value heads, where each shard gathers the
        whole weight to compute the one head its query heads share. Its bias is replicated."""
        return self.grouped_query and model_degree > self.kv_heads

    def kv_slots(self, model_degree: int) -> int:
        """Key/value heads the model shards hold together: the heads, or one per shard when
        they are fewer (a head's copies sit on consecutive shards). A KV cache's heads."""
        return max(self.kv_heads, model_degree) if self.grouped_query else self.kv_heads

    def layer_params(self, model_degree: int = 1) -> tuple[int, int]:
        """One dense transformer layer's parameters: (split over `model`, replicated). QKV (or
        q and kv), fc1 (SwiGLU: gate and up) and their biases, the attention output and fc2
        weights are split; the norms and the row-parallel biases are replicated, and so is
        the kv bias on more model shards than key/value heads."""
        h, f, b = self.hidden, self.mlp_hidden, int(self.bias)
        q, kv = self.num_heads * self.head_dim, 2 * self.kv_heads * self.head_dim
        fc1 = 2 * f if self.mlp == "swiglu" else f
        split = (h + b) * (q + kv) + h * h + h * fc1 + b * fc1 + f * h
        norm = (1 + b) * h if self.norm == "layernorm" else h
        replicated = 2 * norm + 2 * b * h
        if self.kv_by_rows(model_degree):
            split, replicated = split - b * kv, replicated + b * kv
        return split, replicated

    def expert_params(self) -> int:
        """One expert's parameters (SwiGLU: gate, up and down)."""
        return 3 * self.hidden * self.expert_hidden

    def moe_layer_params(
        self, model_degree: int = 1, expert_degree: int = 1, *, active: bool = False
    ) -> tuple[int, int]:
        """One MoE layer's parameters as layer_params counts them, (split over `model`,
        replicated): its attention and norms, the experts that one expert shard holds (all of
        them by default; with `active`, the top-k a token uses), split over `model` by their
        inner width, the shared experts (an MLP, split likewise) and the router (replicated)."""
        h, b = self.hidden, int(self.bias)
        split, replicated = self.layer_params(model_degree)
        fc1 = 2 * self.mlp_hidden if self.mlp == "swiglu" else self.mlp_hidden
        split -= h * fc1 + b * fc1 + self.mlp_hidden * h  # the dense MLP, replaced
        replicated -= b * h  # ... and its row-parallel bias
        experts = self.moe_top_k if active else self.moe_experts // expert_degree
        shared = self.moe_shared_experts * self.expert_hidden
        split += experts * self.expert_params() + 3 * h * shared + b * 2 * shared
        return split, replicated + h * self.moe_experts + b * h * bool(shared)

    def stack_params(
        self, model_degree: int = 1, expert_degree: int = 1, *, active: bool = False
    ) -> tuple[int, int]:
        """All the transformer layers' parameters, (split over `model`, replicated): the dense
        ones and the MoE ones (moe_layer_params) together."""
        dense = [p * (self.num_layers - self.moe_layers) for p in self.layer_params(model_degree)]
        sparse = self.moe_layer_params(model_degree, expert_degree, active=active)
        split, replicated = (d + self.moe_layers * s for d, s in zip(dense, sparse, strict=True))
        return split, replicated

    def padded_vocab_size(self, model_degree: int) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by * model_degree."""
        multiple = self.make_vocab_size_divisible_by * model_degree
        return math.ceil(self.vocab_size / multiple) * multiple

    def num_params(self, model_degree: int = 1, *, active: bool = False) -> int:
        """Parameters of the model, counting the padded vocabulary; with `active`, those one
        token uses (a MoE layer's top-k experts, not all of them)."""
        h, layers = self.hidden, sum(self.stack_params(active=active))
        vocab = self.padded_vocab_size(model_degree)
        embed = vocab * h + (self.seq_len * h if self.positions == "learned" else 0)
        if self.arch == "gpt":
            head = 0 if self.tie_embeddings else vocab * h
            final_norm = (1 + int(self.bias)) * h if self.norm == "layernorm" else h
            return embed + layers + final_norm + head
        embed += self.type_vocab_size * h + 2 * h  # token types; the embedding or final norm
        pooler = h * h + h
        if self.arch == "bert_multiple_choice":
            heads = pooler + h + 1
        else:
            heads = (h * h + h) + 2 * h + vocab  # masked LM: dense, layer norm, output bias
            heads += 0 if self.binary_head == "none" else pooler + 2 * h + 2
        return embed + layers + heads

    @property
    def tokens_per_sample(self) -> int:
        """Tokens the model reads per sample: one sequence, or one per option."""
        return self.seq_len * (self.num_choices if self.arch == "bert_multiple_choice" else 1)

    def flops_per_token(self) -> float:
        """Model FLOPs of one token's forward and backward pass, counted as Megatron-LM does."""
        h, n, s, f = self.hidden, self.num_layers, self.seq_len, self.mlp_hidden
        # 2 FLOPs per weight of the layer's matmuls (24 h^2 for GPT-2's) + 4 s h (attention
        # scores and values) per layer, and the LM head; times 3 for forward + backward. A
        # MoE layer's weights are those a token uses: the router, its top-k experts and the
        # shared ones.
        qkv = (self.num_heads + 2 * self.kv_heads) * self.head_dim
        attention = h * qkv + h * h
        dense = 2 * (attention + h * f * (2 if self.mlp == "swiglu" else 1) + f * h)
        experts = self.moe_top_k * self.expert_params() + self.moe_experts * h
        sparse = 2 * (attention + experts + 3 * h * self.moe_shared_experts * self.expert_hidden)
        layers = (n - self.moe_layers) * dense + self.moe_layers * sparse
        return 3 * (layers + n * 4 * s * h) + self.head_flops_per_token()

    def head_flops_per_token(self) -> float:
        """The LM head's share of flops_per_token: 2 V h, times 3 (none for multiple choice)."""
        return 0 if self.arch == "bert_multiple_choice" else 3 * 2 * self.vocab_size * self.hidden


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-4  # peak learning rate
    min_lr: float = 6e-5  # reached at decay_steps and kept after
    warmup_steps: int = 100  # linear warmup from 0
    decay_steps: int = 10000  # end of the cosine decay (Megatron-LM's --lr-decay-iters)
    schedule: str = "cosine"  # "cosine", "linear" or "constant" after warmup
    beta1: float = 0.9
    beta2: float = 0.999  # Megatron-LM's default
    eps: float = 1e-8
    weight_decay: float = 0.01  # not applied to biases, layer norms
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping
    # Megatron-LM's distributed optimizer (ZeRO stage 1): float32 master weights and Adam
    # moments split over `data`, gradients reduce-scattered, weights gathered once per step.
    distributed: bool = False
    # When the gradients are summed over the batch axes (`data`, `expert`), and those that
    # are sums over the model shards over `model`: "micro_batch", as each micro-batch's
    # backward pass makes them; or "step", once per step after the micro-batch loop
    # (reduce-scattered onto the master shards with `distributed`), each device accumulating
    # its own gradients in float32 until then. "step" covers models without experts, fsdp or
    # context axes (BERT without sequence parallelism), with or without pipeline stages.
    grad_reduce: str = "micro_batch"
    # The dtype of that sum under grad_reduce="step" (Megatron-LM's two behaviours):
    # "float32" (its --accumulate-allreduce-grads-in-fp32) or "compute" (model.compute_dtype).
    grad_reduce_dtype: str = "float32"
    # Dynamic loss scaling, used when model.compute_dtype is float16 (Megatron-LM's defaults):
    # the scale doubles after loss_scale_window clean steps and halves once `hysteresis`
    # overflowing steps have been seen, never below min_loss_scale.
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2

    RANGES: typing.ClassVar[dict[str, Range]] = dict(
        lr=NON_NEGATIVE, min_lr=NON_NEGATIVE, warmup_steps=NON_NEGATIVE,
        decay_steps=NON_NEGATIVE, beta1=FRACTION, beta2=FRACTION, eps=NON_NEGATIVE,
        weight_decay=NON_NEGATIVE, clip_norm=NON_NEGATIVE,
        initial_loss_scale=Range(0, low_open=True), min_loss_scale=Range(0, low_open=True),
        loss_scale_window=POSITIVE, hysteresis=POSITIVE,
    )  # fmt: skip

    def __post_init__(self):
        check_ranges("optim", self)
        for name, allowed in (
            ("grad_reduce", GRAD_REDUCES),
            ("grad_reduce_dtype", GRAD_REDUCE_DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"optim.{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}"
                )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A UTF-8 text file (prepared once into the workdir), a dataset prepared by
    # `python -m megajax.data.prepare`, or several blended: "0.7:a.txt,0.3:prepared/b".
    source: str = "data/shakespeare/input.txt"
    # "gpt2" (byte-level BPE), "bert" (WordPiece), "char", or "hf": a Hugging Face
    # tokenizer.json (Llama's), read with the `tokenizers` package.
    tokenizer: str = "gpt2"
    # vocab.json and merges.txt for "gpt2", vocab.txt for "bert", tokenizer.json for "hf"
    vocab_dir: str = "data/gpt2"
    val_fraction: float = 0.1  # the tail of the text held out for val_loss
    # Prepare each document of a text source with the tokenizer's beginning-of-text token in
    # front (a tokenizer.json's, as Llama's <s>; Megatron-LM's Llama preprocessing does the
    # same), as evaluation and generation start their texts. GPT-2 BPE, char and WordPiece have
    # none: their data is the same either way.
    add_bos: bool = True
    # BERT pairs (model.arch="bert"): the share of positions predicted (80% of them [MASK],
    # 10% random, 10% kept), shorter pairs now and then, and masking whole words.
    mask_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_masking: bool = False
    # "text": documents of text, every token a target; "chat": a JSON Lines file of
    # conversations ({"messages": [...]} or {"prompt", "completion"}) rendered through the chat
    # template, only the assistant's tokens trained on (megajax/data/chat.py).
    format: str = "text"
    # A chat template file (.jinja) to use instead of the tokenizer directory's own (or, with
    # none there, megajax's default, data/chat.py DEFAULT_TEMPLATE).
    chat_template: str = ""
    # Conversations packed into rows of model.seq_len, attention kept inside each and
    # positions restarting at each (false: one per row, padded).
    pack: bool = True
    # A conversation longer than seq_len + 1 tokens is cut to it and counted (false: refused).
    truncate: bool = True
    # Text documents (joined by the end-of-text token) attend only within themselves and their
    # positions restart at each (Megatron-LM's --reset-attention-mask, --reset-position-ids).
    reset_attention: bool = False

    RANGES: typing.ClassVar[dict[str, Range]] = dict(
        val_fraction=FRACTION,
        mask_prob=Range(0, 1, low_open=True),
        short_seq_prob=Range(0, 1),
    )

    def __post_init__(self):
        check_ranges("data", self)
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r}: use one of {', '.join(FORMATS)}")

    @property
    def documents(self) -> bool:
        """Whether samples carry their documents' bounds: per-token loss weights, segment ids
        and positions (conversations, or text with reset_attention)."""
        return self.format == "chat" or self.reset_attention


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # where this invocation stops (the LR schedule has its own length)
    batch_size: int = 8  # global sequences per optimizer step
    # batch_size is split into this many micro-batches: accumulated one after another, or, on a
    # mesh with pipeline > 1, flowing through the pipeline stages together.
    micro_batches: int = 1
    # v: chunks of layers per pipeline stage (circular schedule, arXiv 2104.04473); 1 is GPipe.
    pipeline_repeats: int = 1
    # How the micro-batches go through the pipeline stages (docs/pipeline.md): "gpipe" (every
    # micro-batch's forward, then autodiff's backward) or "1f1b" (one forward and one backward
    # per tick: activations of at most 2P - 1 micro-batches held, whatever m).
    pipeline_schedule: str = "gpipe"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # steps between val_loss measurements; 0 disables
    eval_batches: int = 4  # batches of batch_size averaged for one val_loss
    on_nonfinite: str = "skip"  # a non-finite loss or gradient: "skip" the update, or "stop"

    RANGES: typing.ClassVar[dict[str, Range]] = dict(
        steps=NON_NEGATIVE, batch_size=POSITIVE, micro_batches=POSITIVE,
        pipeline_repeats=POSITIVE, seed=Range(0, 2**32, high_open=True), log_every=POSITIVE,
        eval_every=NON_NEGATIVE, eval_batches=POSITIVE,
    )  # fmt: skip

    def __post_init__(self):
        check_ranges("train", self)
        if self.on_nonfinite not in ("skip", "stop"):
            raise ConfigError(f"train.on_nonfinite={self.on_nonfinite!r}: use skip or stop")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ConfigError(
                f"train.pipeline_schedule={self.pipeline_schedule!r}: use one of "
                f"{', '.join(PIPELINE_SCHEDULES)}"
            )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; 0 saves only when the run ends or is signalled
    keep: int = 3  # newest checkpoints kept
    async_save: bool = True  # write in the background while training goes on

    RANGES: typing.ClassVar[dict[str, Range]] = dict(every=NON_NEGATIVE, keep=POSITIVE)

    def __post_init__(self):
        check_ranges("checkpoint", self)


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    # LoRA (arXiv 2106.09685): each targeted layer's weight W is frozen and trained as
    # W + (alpha / rank) A B, A (in, rank) and B (rank, out); every other parameter is frozen.
    # 0: full fine-tuning, every parameter trains.
    rank: int = 0
    alpha: float = 16.0  # the update's scale is alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapter's input only (PEFT's lora_dropout)
    # Comma-separated, of: qkv (attention's query, key and value projections), proj (the
    # attention output), fc1 (the MLP's first layer: SwiGLU's gate and up), fc2.
    targets: str = "qkv,proj,fc1,fc2"

    RANGES: typing.ClassVar[dict[str, Range]] = dict(
        rank=NON_NEGATIVE, alpha=Range(0, low_open=True), dropout=FRACTION
    )

    def __post_init__(self):
        check_ranges("lora", self)
        unknown = [t for t in self.target_names if t not in LORA_TARGETS]
        if unknown or not self.target_names:
            raise ConfigError(
                f"lora.targets={self.targets!r}: name one or more of {', '.join(LORA_TARGETS)}, "
                "comma-separated"
            )

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    lora: LoRAConfig = LoRAConfig()


# Model options that are not a checkpoint's shape: a run started from a checkpoint (Hugging
# Face's, or a megajax run's) keeps its config's compute options, and an explicit --set of a
# training option wins over the checkpoint's (GPT-2's resid_pdrop, BERT's hidden_dropout_prob).
COMPUTE_OPTIONS = (
    "remat", "sequence_parallel", "compute_dtype", "make_vocab_size_divisible_by", "attention",
    "context_attention",
)  # fmt: skip
TRAINING_OPTIONS = ("dropout", "init_std", "layernorm_eps")


def with_model_of(cfg: Config, fields: dict, *, overrides=(), source: str) -> Config:
    """`cfg` with the model of a checkpoint (`fields`: its ModelConfig fields; `source`: what it
    is, for messages): the checkpoint's shape and training options, the config's compute
    options. `overrides`: the user's explicit SECTION.FIELD=VALUE assignments (--set); those of
    TRAINING_OPTIONS win over the checkpoint's values, those of model.rope_scaling's fields
    apply over its scaling, one that contradicts its shape is an error."""
    theirs = to_dict(Config(model=ModelConfig(**fields)))["model"]
    explicit = {
        k.partition("=")[0][len("model.") :].partition(".")[0]
        for k in overrides
        if k.startswith("model.")
    }
    for name in sorted(explicit - set(COMPUTE_OPTIONS) - set(TRAINING_OPTIONS) - {"rope_scaling"}):
        if getattr(cfg.model, name) != theirs[name]:
            raise ConfigError(
                f"model.{name}={getattr(cfg.model, name)} was set but {source} has "
                f"{theirs[name]}: drop the option or use another checkpoint"
            )
    kept = (*COMPUTE_OPTIONS, *(explicit & set(TRAINING_OPTIONS)))
    cfg = replace(cfg, model={**theirs, **{k: getattr(cfg.model, k) for k in kept}})
    # model.rope_scaling's fields set with --set stretch the checkpoint's context (as Llama 3.1
    # and YaRN fine-tune a model to): they apply over the checkpoint's own.
    return override(cfg, [k for k in overrides if k.startswith("model.rope_scaling.")])


def load(path: str | Path) -> Config:
    """Load `get_config()` from a Python config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (see configs/ for the shipped ones)")
    spec = importlib.util.spec_from_file_location(f"megajax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config() returning a megajax Config")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not Config")
    return cfg


def _parse(text: str, typ, key: str):
    if typ is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--set {key}={text}: expected true or false")
    try:
        return typ(text)
    except ValueError:
        raise ConfigError(f"--set {key}={text}: expected a value of type {typ.__name__}") from None


def override(cfg: Config, assignments: typing.Iterable[str]) -> Config:
    """Apply `section.field=value` strings (`section.field.field=value` inside a nested
    section, as model.rope_scaling), checking each key and value type; the values are checked
    together once all are set, so that the order of related fields does not matter."""
    tree, changed = to_dict(cfg), False
    for item in assignments:
        key, sep, text = item.partition("=")
        path = key.split(".")
        if not sep or len(path) < 2 or not all(path):
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. train.steps=50")
        node, cls = tree, Config
        for depth, name in enumerate(path):
            names = [f.name for f in dataclasses.fields(cls)]
            if name not in names:
                where = ".".join(path[:depth])
                if not where:
                    raise ConfigError(f"unknown config key {key!r}: sections are {sorted(names)}")
                raise ConfigError(f"unknown config key {key!r}: {where} has {sorted(names)}")
            typ, here = typing.get_type_hints(cls)[name], ".".join(path[: depth + 1])
            last = depth == len(path) - 1
            if dataclasses.is_dataclass(typ) and last:
                example = dataclasses.fields(typ)[0].name
                raise ConfigError(f"--set {key}={text}: {here} is a section: set its fields, "
                                  f"e.g. {here}.{example}=...")  # fmt: skip
            if not dataclasses.is_dataclass(typ) and not last:
                raise ConfigError(f"unknown config key {key!r}: {here} has no fields")
            if last:
                node[name] = _parse(text, typ, key)
            else:
                node, cls = node[name], typ
        changed = True
    return from_dict(tree) if changed else cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def section(name: str, cls, values: dict):
    """The config dataclass `cls` (at key `name`) from a dict: unknown keys are an error,
    missing ones take their defaults."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown config keys in {name}: {sorted(unknown)}")
    return cls(**values)


def from_dict(data: dict) -> Config:
    """The inverse of to_dict; unknown keys are an error, missing ones take their defaults."""
    sections = {}
    for field in dataclasses.fields(Config):
        cls = field.default_factory if field.default is dataclasses.MISSING else type(field.default)
        values = data.get(field.name, {})
        if field.name == "model" and isinstance(values.get("remat"), bool):
            values = {**values, "remat": "full" if values["remat"] else "none"}  # older configs
        sections[field.name] = section(field.name, cls, values)
    return Config(**sections)


def replace(cfg, **sections) -> Config:
    """A copy with some fields changed: `replace(cfg, model=dict(num_layers=2))`."""
    changed = {
        name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()
    }
    return dataclasses.replace(cfg, **changed)
