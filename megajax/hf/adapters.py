"""LoRA adapters as PEFT adapter directories (adapter_config.json, adapter_model.safetensors)
that `peft.PeftModel.from_pretrained` loads onto the Hugging Face base model.

PEFT names an adapter's tensors base_model.model.<module>.lora_A.weight (rank, in) and
lora_B.weight (out, rank) and computes y = base(x) + (lora_alpha / r) lora_B(lora_A(dropout(x))),
megajax's formula. The tables are the families' own (megajax/hf/families.py): B is laid out as a
kernel with `rank` rows, so the kernel's rule turns its columns into the Hugging Face modules'
rows. Where megajax fuses several Hugging Face modules into one kernel (Llama's q, k and v, or
k and v under grouped-query attention, and gate and up; GPT-2 keeps its c_attn whole), the
fused adapter becomes one adapter per module: B split by the fused layout's columns, A the
same for each, since x A B restricted to some columns is x A times those columns of B.
"""

from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils

from megajax import lora
from megajax.config import ConfigError
from megajax.hf.families import FAMILIES, Layout, model_type_of

# model_type -> PEFT's task type and whether the base modules' weights are [in, out]
# (GPT-2's Conv1D: PEFT's fan_in_fan_out).
PEFT_FAMILIES = {"gpt2": ("CAUSAL_LM", True), "llama": ("CAUSAL_LM", False)}
PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _adapted_modules(sharded):
    """(megajax path of each adapted Dense inside the blocks, its kernel's Rule)."""
    family = FAMILIES[model_type_of(sharded.cfg.model)]
    # The attention projects by one fused qkv, or by q and kv under grouped-query attention.
    absent = (
        {("attn", "qkv")} if sharded.cfg.model.grouped_query else {("attn", "q"), ("attn", "kv")}
    )
    paths = [
        p
        for p in lora.targets(sharded.cfg.lora)
        if ("h", *p, "kernel") in family.table and p not in absent
    ]
    return [(p, family.table[("h", *p, "kernel")]) for p in paths]


def peft_tensors(sharded, params) -> list[tuple[str, tuple, callable]]:
    """(name, shape, producer) of every PEFT adapter tensor of `params` (every process must call
    this: the adapters are gathered whole, once)."""
    cfg = sharded.cfg
    model_type = model_type_of(cfg.model)
    if model_type not in PEFT_FAMILIES:
        raise ConfigError(f"PEFT adapters are written for {', '.join(PEFT_FAMILIES)} models, "
                          f"not {model_type}: export the merged model instead")  # fmt: skip
    fan_in_fan_out = PEFT_FAMILIES[model_type][1]
    layout = Layout(cfg.model, sharded.padded_vocab)
    out = []
    for path, rule in _adapted_modules(sharded):
        node = params["h"]
        for k in path:
            node = node[k]
        # (layers, in, rank) and (layers, rank, out), whole on every process
        a, b = (np.asarray(multihost_utils.process_allgather(node[lora.ADAPTER][n], tiled=True))
                for n in ("a", "b"))  # fmt: skip
        for i in range(cfg.model.num_layers):
            parts = rule.to_hf(b[i], layout)  # B as a kernel of `rank` rows, per module
            for name, part in zip(rule.names, parts, strict=True):
                lora_b = part.T if fan_in_fan_out else part  # (out, rank)
                module = PREFIX + name.format(i=i).removesuffix(".weight")
                for which, x in (("lora_A", a[i].T), ("lora_B", lora_b)):
                    x = np.ascontiguousarray(x)
                    out.append((f"{module}.{which}.weight", x.shape, lambda x=x: x))
    return out


def peft_config(sharded) -> dict:
    """adapter_config.json: the adapters' rank, alpha, dropout and target modules."""
    cfg = sharded.cfg
    task_type, fan_in_fan_out = PEFT_FAMILIES[model_type_of(cfg.model)]
    # A module's name inside its layer: "self_attn.q_proj", "attn.c_attn", ... (PEFT matches
    # target_modules against the ends of module names).
    modules = [
        name.split("{i}.")[1].removesuffix(".weight")
        for _, rule in _adapted_modules(sharded)
        for name in rule.names
    ]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None,
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": modules,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
