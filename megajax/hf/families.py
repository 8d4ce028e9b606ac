"""The Hugging Face model families megajax converts: for each model_type, a table from megajax
parameters to Hugging Face tensor names with the layout transforms both ways, and the mapping
between its config.json and megajax's ModelConfig. megajax.hf.weights streams tensors through them.

GPT-2's Conv1D weights are already [in, out] like megajax's kernels but its c_attn columns are
q | k | v, where megajax interleaves them by head; BERT's and Llama's Linear weights are
[out, in] with separate query, key and value; Llama's gate and up projections fuse into fc1,
unit by unit; vocabularies are unpadded. Llama's rotary convention (rotate-half pairing) is
megajax's own, so its q and k need no permutation. Mixtral is a Llama whose MLPs are sparse
blocks: its router `gate` [experts, in] and each expert's w1 (gate), w3 (up) and w2 (down),
one tensor per expert ({e} in a name), stack into megajax's (experts, ...) weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from megajax.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the transforms need to know: the model, and its vocabulary padded for the mesh."""

    model: ModelConfig
    padded_vocab: int


def _same(x, layout):
    return x


def _transpose(x, layout):  # torch Linear [out, in] <-> megajax kernel [in, out]
    return x.T


def _swap_groups(x, outer: int, inner: int):
    """Last axis (outer, inner, rest) -> (inner, outer, rest)."""
    shape = x.shape[:-1]
    x = x.reshape(*shape, outer, inner, -1)
    return np.swapaxes(x, -3, -2).reshape(*shape, -1)


def _qkv_from_hf(x, layout):
    """Columns (q|k|v, head, head_dim) -> (head, q|k|v, head_dim)."""
    return _swap_groups(x, 3, layout.model.num_heads)


def _qkv_to_hf(x, layout):
    return _swap_groups(x, layout.model.num_heads, 3)


def _vocab_from_hf(x, layout):
    return np.pad(x, [(0, layout.padded_vocab - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _vocab_to_hf(x, layout):
    return x[: layout.model.vocab_size]  # the padding rows are megajax's own


def _positions_from_hf(x, layout):
    """The first seq_len learned positions: a model may train on shorter sequences."""
    return x[: layout.model.seq_len]


SAME, LINEAR = (_same, _same), (_transpose, _transpose)
POSITIONS = (_positions_from_hf, _same)
QKV, VOCAB = (_qkv_from_hf, _qkv_to_hf), (_vocab_from_hf, _vocab_to_hf)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One megajax parameter (one layer's, for the stacked `h`) as Hugging Face tensors: their
    names ({i} = layer; {e} = expert, the names repeated for each) and the transforms both
    ways, given the Layout."""

    names: tuple[str, ...]
    to_megajax: Callable  # (list of HF arrays, Layout) -> one megajax array
    to_hf: Callable  # (megajax array, Layout) -> list of HF arrays, as tensor_names gives them

    def tensor_names(self, model: ModelConfig) -> tuple[str, ...]:
        """The names, those with {e} once per expert (expert by expert); {i} left to fill."""
        if not any("{e}" in n for n in self.names):
            return self.names
        return tuple(n.format(i="{i}", e=e) for e in range(model.moe_experts) for n in self.names)


def _one(name: str, transforms=SAME) -> Rule:
    to_megajax, to_hf = transforms
    return Rule((name,), lambda xs, layout: to_megajax(xs[0], layout),
                lambda x, layout: [to_hf(x, layout)])  # fmt: skip


def _by_head(pattern: str, parts: tuple[str, ...], heads: Callable[[ModelConfig], int]) -> Rule:
    """torch Linear weights [heads * d, in] (or biases) of `parts` (query, key, value...) ->
    one kernel [in, heads * len(parts) * d] or bias interleaved by head, (head, part,
    head_dim), and back (.T leaves a bias as it is)."""
    n = len(parts)

    def to_megajax(xs, layout):
        return _swap_groups(np.concatenate([x.T for x in xs], axis=-1), n, heads(layout.model))

    def to_hf(x, layout):
        parts = np.split(_swap_groups(x, heads(layout.model), n), n, axis=-1)
        return [part.T for part in parts]

    return Rule(tuple(pattern.format(part, i="{i}") for part in parts), to_megajax, to_hf)


def _fused_qkv(pattern: str, parts=("query", "key", "value")) -> Rule:
    """Query, key and value -> one head-interleaved qkv kernel or bias (attention.Attention)."""
    return _by_head(pattern, parts, lambda m: m.num_heads)


def _norm(path: tuple, name: str) -> dict:
    return {path + ("scale",): _one(f"{name}.weight"), path + ("bias",): _one(f"{name}.bias")}


def _dense(path: tuple, name: str, kernel=SAME) -> dict:
    return {
        path + ("kernel",): _one(f"{name}.weight", kernel),
        path + ("bias",): _one(f"{name}.bias"),
    }


# megajax parameter path -> Rule. Names are those of the head models GPT2LMHeadModel and
# BertFor*; a bare GPT2Model or BertModel checkpoint lacks the base prefix (HFWeights strips it).
GPT2_TABLE = {
    ("wte", "embedding"): _one("transformer.wte.weight", VOCAB),
    ("wpe",): _one("transformer.wpe.weight", POSITIONS),
    **_norm(("ln_f",), "transformer.ln_f"),
    **_norm(("h", "ln_1"), "transformer.h.{i}.ln_1"),
    ("h", "attn", "qkv", "kernel"): _one("transformer.h.{i}.attn.c_attn.weight", QKV),
    ("h", "attn", "qkv", "bias"): _one("transformer.h.{i}.attn.c_attn.bias", QKV),
    **_dense(("h", "attn", "proj"), "transformer.h.{i}.attn.c_proj"),
    **_norm(("h", "ln_2"), "transformer.h.{i}.ln_2"),
    **_dense(("h", "mlp", "fc1"), "transformer.h.{i}.mlp.c_fc"),
    **_dense(("h", "mlp", "fc2"), "transformer.h.{i}.mlp.c_proj"),
}  # lm_head is tied to wte


def _bert_table(placement: str) -> dict:
    """BERT's table, layer norms "post" (transformers' Bert*) or "pre" (MegatronBert*)."""
    post, layer = placement == "post", "bert.encoder.layer.{i}."
    return {
        ("wte", "embedding"): _one("bert.embeddings.word_embeddings.weight", VOCAB),
        ("wpe",): _one("bert.embeddings.position_embeddings.weight", POSITIONS),
        ("wtt",): _one("bert.embeddings.token_type_embeddings.weight"),
        **(_norm(("ln_embed",), "bert.embeddings.LayerNorm") if post else {}),
        ("h", "attn", "qkv", "kernel"): _fused_qkv(layer + "attention.self.{}.weight"),
        ("h", "attn", "qkv", "bias"): _fused_qkv(layer + "attention.self.{}.bias"),
        **_dense(("h", "attn", "proj"), layer + "attention.output.dense", LINEAR),
        # post: ln_1(x + attn(x)), ln_2(y + mlp(y)); pre: x + attn(ln_1(x)), y + mlp(ln_2(y))
        **_norm(("h", "ln_1"), layer + ("attention.output.LayerNorm" if post else "attention.ln")),
        **_dense(("h", "mlp", "fc1"), layer + "intermediate.dense", LINEAR),
        **_dense(("h", "mlp", "fc2"), layer + "output.dense", LINEAR),
        **_norm(("h", "ln_2"), layer + ("output.LayerNorm" if post else "ln")),
        **({} if post else _norm(("ln_f",), "bert.encoder.ln")),
        **_dense(("pooler",), "bert.pooler.dense", LINEAR),
        **_dense(("mlm", "dense"), "cls.predictions.transform.dense", LINEAR),
        **_norm(("mlm", "ln"), "cls.predictions.transform.LayerNorm"),
        ("mlm", "bias"): _one("cls.predictions.bias", VOCAB),  # the tied decoder's bias too
        **_dense(("binary",), "cls.seq_relationship", LINEAR),
        **_dense(("choice",), "classifier", LINEAR),
    }


def _gpt2_fields(hf: dict) -> dict:
    if hf.get("activation_function", "gelu_new") != "gelu_new":
        raise ConfigError(f"activation {hf['activation_function']!r}: megajax GPT-2 uses gelu_new")
    inner = hf.get("n_inner") or 4 * hf["n_embd"]
    if inner % hf["n_embd"]:
        raise ConfigError(f"n_inner={inner} is not a multiple of n_embd={hf['n_embd']}")
    return dict(
        arch="gpt",
        vocab_size=hf["vocab_size"],
        seq_len=hf["n_positions"],
        num_layers=hf["n_layer"],
        hidden=hf["n_embd"],
        num_heads=hf["n_head"],
        mlp_ratio=inner // hf["n_embd"],
        dropout=hf.get("resid_pdrop", 0.1),
        init_std=hf.get("initializer_range", 0.02),
        layernorm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _gpt2_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_layer": cfg.num_layers,
        "n_embd": cfg.hidden,
        "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_hidden,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": cfg.init_std,
        "layer_norm_epsilon": cfg.layernorm_eps,
        "tie_word_embeddings": True,
        "bos_token_id": min(50256, cfg.vocab_size - 1),
        "eos_token_id": min(50256, cfg.vocab_size - 1),
    }


BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def binary_head_of(hf: dict) -> str | None:
    """What a BERT checkpoint's cls.seq_relationship predicts: "nsp" (transformers' meaning,
    label 1 = random B, as megajax's), "sop" when megajax wrote it, None when it has none."""
    if "megajax_binary_head" in hf:
        return hf["megajax_binary_head"]
    archs = hf.get("architectures") or []
    pair = any(a.endswith(("ForPreTraining", "ForNextSentencePrediction")) for a in archs)
    return "nsp" if pair else None


def _bert_fields(hf: dict) -> dict:
    act = hf.get("hidden_act", "gelu")
    if act not in BERT_ACTIVATIONS:
        raise ConfigError(f"hidden_act {act!r}: megajax BERT has {', '.join(BERT_ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"position_embedding_type {hf['position_embedding_type']!r}: megajax "
                          "BERT learns absolute positions")  # fmt: skip
    hidden, inner = hf["hidden_size"], hf["intermediate_size"]
    if inner % hidden:
        raise ConfigError(f"intermediate_size={inner} is not a multiple of hidden_size={hidden}")
    # The architecture decides the heads, unless the user's config chose them (with_hf_model).
    choice = any(a.endswith("ForMultipleChoice") for a in hf.get("architectures") or [])
    return dict(
        arch="bert_multiple_choice" if choice else "bert",
        binary_head=("none" if choice else binary_head_of(hf)) or "none",
        vocab_size=hf["vocab_size"],
        seq_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        hidden=hidden,
        num_heads=hf["num_attention_heads"],
        mlp_ratio=inner // hidden,
        dropout=hf.get("hidden_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02),
        layernorm_eps=hf.get("layer_norm_eps", 1e-12),
        layernorm_placement="post" if hf["model_type"] == "bert" else "pre",
        activation=BERT_ACTIVATIONS[act],
        type_vocab_size=hf.get("type_vocab_size", 2),
    )


def _bert_config(cfg: ModelConfig) -> dict:
    base = "Bert" if cfg.layernorm_placement == "post" else "MegatronBert"
    if cfg.arch == "bert_multiple_choice":
        head = "ForMultipleChoice"
    else:  # a sentence-order head is written as seq_relationship too, marked as such
        head = "ForMaskedLM" if cfg.binary_head == "none" else "ForPreTraining"
    hf = {
        "architectures": [base + head],
        "model_type": "bert" if base == "Bert" else "megatron-bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_hidden,
        "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layernorm_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }
    if head == "ForPreTraining" and cfg.binary_head == "sop":
        hf["megajax_binary_head"] = "sop"
    return hf


def _gate_up(pattern: str) -> Rule:
    """torch Linear gate_proj and up_proj [mlp, in] (or biases) -> fc1 [in, 2 * mlp], gate and
    up interleaved unit by unit (layers.swiglu), and back."""

    def to_megajax(xs, layout):
        gate, up = (x.T for x in xs)
        return np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)

    def to_hf(x, layout):
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        return [pairs[..., 0].T, pairs[..., 1].T]

    return Rule(tuple(pattern.format(part, i="{i}") for part in ("gate", "up")),
                to_megajax, to_hf)  # fmt: skip


def _bias(path: tuple, name: str) -> dict:
    return {path + ("bias",): _one(f"{name}.bias")}


LLAMA_LAYER = "model.layers.{i}."
LLAMA_TABLE = {
    ("wte", "embedding"): _one("model.embed_tokens.weight", VOCAB),
    ("head",): _one("lm_head.weight", VOCAB),  # an untied head only
    ("ln_f", "scale"): _one("model.norm.weight"),
    ("h", "ln_1", "scale"): _one(LLAMA_LAYER + "input_layernorm.weight"),
    **{
        ("h", "attn", "qkv", kind): _fused_qkv(
            LLAMA_LAYER + f"self_attn.{{}}_proj.{name}", ("q", "k", "v")
        )
        for kind, name in (("kernel", "weight"), ("bias", "bias"))
    },
    # Grouped-query attention: q, and k and v interleaved by key/value head.
    **_dense(("h", "attn", "q"), LLAMA_LAYER + "self_attn.q_proj", LINEAR),
    **{
        ("h", "attn", "kv", kind): _by_head(
            LLAMA_LAYER + f"self_attn.{{}}_proj.{name}", ("k", "v"), lambda m: m.kv_heads
        )
        for kind, name in (("kernel", "weight"), ("bias", "bias"))
    },
    **_dense(("h", "attn", "proj"), LLAMA_LAYER + "self_attn.o_proj", LINEAR),
    ("h", "ln_2", "scale"): _one(LLAMA_LAYER + "post_attention_layernorm.weight"),
    ("h", "mlp", "fc1", "kernel"): _gate_up(LLAMA_LAYER + "mlp.{}_proj.weight"),
    ("h", "mlp", "fc1", "bias"): _gate_up(LLAMA_LAYER + "mlp.{}_proj.bias"),
    **_dense(("h", "mlp", "fc2"), LLAMA_LAYER + "mlp.down_proj", LINEAR),
}  # biases only with attention_bias and mlp_bias


def _experts(pattern: str, parts: tuple[str, ...], kernel: Callable) -> Rule:
    """One torch Linear weight per expert and part ({e}: the expert, {} the part) -> a stacked
    (experts, in, out) weight whose expert slice is kernel's to_megajax of its parts."""
    to_megajax, to_hf = kernel
    n = len(parts)

    def stack(xs, layout):
        return np.stack([to_megajax(xs[i : i + n], layout) for i in range(0, len(xs), n)])

    def unstack(x, layout):
        return [part for expert in x for part in to_hf(expert, layout)]

    names = tuple(pattern.format(part, i="{i}", e="{e}") for part in parts)
    return Rule(names, stack, unstack)


_GATE_UP = _gate_up("{}")
GATE_UP = (_GATE_UP.to_megajax, _GATE_UP.to_hf)
MIXTRAL_MOE = LLAMA_LAYER + "block_sparse_moe."
MIXTRAL_TABLE = {
    **{k: rule for k, rule in LLAMA_TABLE.items() if k[:2] != ("h", "mlp")},
    ("h", "mlp", "router"): _one(MIXTRAL_MOE + "gate.weight", LINEAR),
    ("h", "mlp", "w1"): _experts(MIXTRAL_MOE + "experts.{e}.{}.weight", ("w1", "w3"), GATE_UP),
    ("h", "mlp", "w2"): _experts(
        MIXTRAL_MOE + "experts.{e}.{}.weight",
        ("w2",),
        (lambda xs, layout: xs[0].T, lambda x, layout: [x.T]),
    ),
}


# The rope_parameters each scaled RoPE reads, as transformers names them (and RopeScaling).
ROPE_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
             "attention_factor", "mscale", "mscale_all_dim"),
}  # fmt: skip


def _rope(hf: dict) -> dict:
    """Llama's rope_theta and rope_scaling fields, read as transformers reads them: an older
    config's rope_scaling (rope_type, or type before it) wins over transformers 5's
    rope_parameters; rope_theta is theirs or the config's."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={rope['partial_rotary_factor']}: megajax's "
                          "RoPE turns the whole head")  # fmt: skip
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind not in ROPE_KEYS:
        raise ConfigError(f"rope_type {kind!r}: megajax's RoPE is the default one, or scaled "
                          f"as {' or '.join(ROPE_KEYS)}")  # fmt: skip
    # transformers' defaults: the trained context is max_position_embeddings, and so is YaRN's
    # stretched one; YaRN's betas are 32 and 1, its attention factor derived (0 here).
    given = {k: rope[k] for k in ROPE_KEYS[kind] if rope.get(k) is not None}
    original = given.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    if kind == "yarn":
        given.setdefault("factor", hf["max_position_embeddings"] / original)
        given = {k: v for k, v in given.items() if v or k not in ("beta_fast", "beta_slow")}
    elif missing := {"factor", "low_freq_factor", "high_freq_factor"} - set(given):
        raise ConfigError(f"rope_type 'llama3' without {', '.join(sorted(missing))}")
    return dict(rope_theta=theta, rope_scaling=dict(type=kind, **given))


def _rope_fields(cfg: ModelConfig) -> dict:
    """A Llama's RoPE in config.json: rope_theta and transformers 5's rope_parameters, and for
    a scaled RoPE the same as rope_scaling, which older transformers read."""
    scaling = cfg.rope_scaling
    kind = scaling.type if scaling.scaled else "default"
    scaled = {
        key: getattr(scaling, key)
        for key in ROPE_KEYS.get(kind, ())
        # YaRN's attention factor left out where megajax derives it, as transformers would
        if getattr(scaling, key) or key not in ("attention_factor", "mscale", "mscale_all_dim")
    }
    params = {"rope_type": kind, "rope_theta": cfg.rope_theta, **scaled}
    fields = {"rope_theta": cfg.rope_theta, "rope_parameters": params}
    return fields | ({"rope_scaling": {"rope_type": kind, **scaled}} if scaled else {})


def _llama_fields(hf: dict) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r}: megajax's SwiGLU gates with silu")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise ConfigError(f"head_dim={hf.get('head_dim')}: megajax's heads are hidden_size / "
                          f"num_attention_heads = {hidden / heads:g} wide")  # fmt: skip
    bias = bool(hf.get("attention_bias", False))
    if bias != bool(hf.get("mlp_bias", False)):
        raise ConfigError("attention_bias != mlp_bias: megajax's model.bias is one switch")
    return dict(
        arch="gpt",
        vocab_size=hf["vocab_size"],
        seq_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        hidden=hidden,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden=hf["intermediate_size"],
        dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02),
        layernorm_eps=hf.get("rms_norm_eps", 1e-6),
        norm="rmsnorm",
        positions="rope",
        **_rope(hf),
        mlp="swiglu",
        bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _mixtral_fields(hf: dict) -> dict:
    if hf.get("router_jitter_noise", 0.0):
        raise ConfigError("router_jitter_noise: megajax's router adds no noise")
    if hf.get("sliding_window"):
        raise ConfigError(f"sliding_window={hf['sliding_window']}: megajax attends every "
                          "earlier position")  # fmt: skip
    return dict(
        _llama_fields(hf),
        moe_experts=hf["num_local_experts"],
        moe_top_k=hf["num_experts_per_tok"],
        moe_ffn_hidden=hf["intermediate_size"],
        moe_router="topk_softmax",
        moe_aux_loss=hf.get("router_aux_loss_coef", 0.001),
    )


def _mixtral_config(cfg: ModelConfig) -> dict:
    hf = _llama_config(cfg)
    del hf["mlp_bias"]
    return {
        **hf,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": cfg.expert_hidden,
        "num_local_experts": cfg.moe_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "router_aux_loss_coef": cfg.moe_aux_loss,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


def _llama_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.layernorm_eps,
        **_rope_fields(cfg),
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


@dataclasses.dataclass(frozen=True)
class Family:
    """A Hugging Face model_type: its table, and its config.json <-> megajax's ModelConfig."""

    base: str  # the base model's name prefix in its head models
    table: dict
    heads: tuple[str, ...]  # top-level parameters a checkpoint may lack: freshly initialised
    model_fields: Callable[[dict], dict]  # config.json -> ModelConfig fields
    hf_config: Callable[[ModelConfig], dict]


BERT_HEADS = ("pooler", "mlm", "binary", "choice")
FAMILIES = {
    "gpt2": Family("transformer.", GPT2_TABLE, (), _gpt2_fields, _gpt2_config),
    "bert": Family("bert.", _bert_table("post"), BERT_HEADS, _bert_fields, _bert_config),
    "megatron-bert": Family("bert.", _bert_table("pre"), BERT_HEADS, _bert_fields, _bert_config),
    "llama": Family("model.", LLAMA_TABLE, (), _llama_fields, _llama_config),
    "mixtral": Family("model.", MIXTRAL_TABLE, (), _mixtral_fields, _mixtral_config),
}


def family_of(hf: dict) -> Family:
    if hf.get("model_type") not in FAMILIES:
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not supported: expected one "
                          f"of {', '.join(FAMILIES)}")  # fmt: skip
    return FAMILIES[hf["model_type"]]


def model_type_of(cfg: ModelConfig) -> str:
    """The Hugging Face model_type a megajax model exports to."""
    if cfg.is_bert:
        return "bert" if cfg.layernorm_placement == "post" else "megatron-bert"
    if (cfg.norm, cfg.positions, cfg.mlp) == ("rmsnorm", "rope", "swiglu"):
        if not cfg.moe:
            return "llama"
        mixtral = (cfg.moe_shared_experts, cfg.moe_router, cfg.bias, cfg.moe_every)
        if mixtral != (0, "topk_softmax", False, 1):
            raise ConfigError(
                "a Mixtral has experts in every layer, no shared experts, no biases and "
                "topk_softmax routing: "
                "no Hugging Face model_type holds this Mixture-of-Experts model"
            )
        return "mixtral"
    gpt2 = cfg.norm == "layernorm" and cfg.positions == "learned" and cfg.mlp == "gelu"
    if gpt2 and cfg.bias and cfg.tie_embeddings and cfg.kv_heads == cfg.num_heads:
        return "gpt2"
    raise ConfigError(
        "this decoder mixes GPT-2 and Llama options (norm, positions, mlp, bias, "
        "tie_embeddings, num_kv_heads): no Hugging Face model_type holds it"
    )


def model_config(hf: dict) -> ModelConfig:
    """megajax's ModelConfig for a Hugging Face config.json (the heads its architecture has)."""
    return ModelConfig(**family_of(hf).model_fields(hf))


def hf_config(cfg: ModelConfig) -> dict:
    return FAMILIES[model_type_of(cfg)].hf_config(cfg)
