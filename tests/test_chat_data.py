"""Conversations for fine-tuning: rendered as transformers renders them (ids and assistant masks
equal to apply_chat_template's), from the template where transformers finds it."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megajax.config import ConfigError
from megajax.data import chat
from megajax.data.tokenizer import GPT2Tokenizer, HFTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/chat/shakespeare_chat.jsonl"


def quiet(_):
    pass


# Meta-Llama-3-8B-Instruct's and Llama-2-7b-chat-hf's templates as published (no generation
# blocks), ChatML as Qwen and many others write it, and variants with {% generation %} blocks.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>",
]  # fmt: skip


# Turns that stress the mask: a reply that begins with a space and ends in `.<` (GPT-2 merges
# it with the next `<`), characters whose bytes GPT-2 splits over tokens, a special token's
# text inside a message, an empty turn, trailing newlines.
TRICKY = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": " Hello, friend.<"},
        {"role": "user", "content": "ünïcode — ok? 🙂"},
        {"role": "assistant", "content": "日本語  yes\n\n"},
    ],
    [
        {"role": "user", "content": "Say <|endoftext|> and <|eot_id|>, please."},
        {"role": "assistant", "content": "<|endoftext|> <|eot_id|> <|im_end|>"},
    ],
    [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "An answer to nothing."},
        {"role": "user", "content": "  spaced  "},
        {"role": "assistant", "content": "\ttabbed\n"},
    ],
]


def _demo_conversations(n=None) -> list[list[dict]]:
    lines = DEMO.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines[:n]]


@pytest.fixture(scope="module")
def conversations():
    return TRICKY + _demo_conversations(30)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A tokenizer.json as Llama 3's is made: GPT-2's byte-level BPE with special tokens added
    and a post-processor that puts <|begin_of_text|> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE.from_file(str(ROOT / "data/gpt2/vocab.json"),
                                         str(ROOT / "data/gpt2/merges.txt")))  # fmt: skip
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def _checkpoint(root: Path, tokenizer_json: Path, template: str, *, jinja_file=False, **tokens):
    """A Hugging Face tokenizer directory: tokenizer.json, tokenizer_config.json naming the
    special tokens, and the template inside it or (transformers 5) in chat_template.jinja."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    if jinja_file:
        (root / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        cfg["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return root


LLAMA3_TOKENS = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
LLAMA2_TOKENS = dict(bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def hf_gpt2():
    from transformers import GPT2Tokenizer as TransformersGPT2

    return TransformersGPT2.from_pretrained(str(ROOT / "data/gpt2"))


def _auto(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _transformers_mask(hf, messages, template=None):
    out = hf.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return out["input_ids"], out["assistant_masks"]


def _assert_encodes_as(ours: chat.ChatTemplate, expected, messages):
    ids, mask = ours.encode({"messages": messages})
    want_ids, want_mask = expected
    assert ids.tolist() == list(want_ids), messages
    assert mask.tolist() == list(want_mask), messages
    assert ids.dtype == np.int32 and mask.dtype == np.uint8


@pytest.mark.parametrize("template", [chat.DEFAULT_TEMPLATE, CHATML_GENERATION])
def test_generation_masks_equal_transformers_with_the_gpt2_bpe(template, hf_gpt2, conversations):
    ours = chat.ChatTemplate(template, GPT2Tokenizer(ROOT / "data/gpt2"))
    assert ours.has_generation
    for messages in conversations:
        _assert_encodes_as(ours, _transformers_mask(hf_gpt2, messages, template), messages)


@pytest.mark.parametrize("jinja_file", [False, True], ids=["tokenizer_config", "jinja_file"])
@pytest.mark.parametrize("template", [LLAMA3_GENERATION, CHATML_GENERATION])
def test_generation_masks_equal_transformers_with_a_tokenizer_json(
    template, jinja_file, tokenizer_json, conversations, tmp_path
):
    """The checkpoint's own template, found where transformers finds it (chat_template in
    tokenizer_config.json, or chat_template.jinja), with its special tokens by name."""
    directory = _checkpoint(
        tmp_path / "ckpt", tokenizer_json, template, jinja_file=jinja_file, **LLAMA3_TOKENS
    )
    hf = _auto(directory)
    ours = chat.template_for(HFTokenizer(directory), directory)
    assert ours.source == template and ours.specials["bos_token"] == "<|begin_of_text|>"
    for messages in conversations:
        _assert_encodes_as(ours, _transformers_mask(hf, messages), messages)
    if template == LLAMA3_GENERATION:  # special tokens are single ids, the BOS first
        ids, _ = ours.encode({"messages": conversations[0]})
        assert ids[0] == hf.convert_tokens_to_ids("<|begin_of_text|>")


def _prefix_mask(hf, messages, template):
    """The assistant mask by rendering prefixes, computed from transformers' rendering
    (tokenize=False) and its tokenizer's offsets: each assistant message's span is what it adds
    to the rendering of the messages before it with the generation prompt."""
    render = lambda m, prompt=False: hf.apply_chat_template(  # noqa: E731
        m, chat_template=template, tokenize=False, add_generation_prompt=prompt
    )
    text, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before, upto = render(messages[:i], True), render(messages[: i + 1])
            assert upto.startswith(before) and text.startswith(upto)
            spans.append((len(before), len(upto)))
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(start < b and end > a for a, b in spans))
        for start, end in encoded["offset_mapping"]
    ]
    return encoded["input_ids"], mask


@pytest.mark.parametrize(
    ("template", "tokens"),
    [(LLAMA3, LLAMA3_TOKENS), (LLAMA2, LLAMA2_TOKENS), (CHATML, LLAMA3_TOKENS)],
    ids=["llama3", "llama2", "chatml"],
)
def test_prefix_masks_equal_an_independent_prefix_computation(
    template, tokens, tokenizer_json, conversations, hf_gpt2, tmp_path
):
    """Templates without {% generation %} blocks (Llama 3's and Llama 2's as published,
    ChatML), over the tokenizer.json and over the GPT-2 BPE."""
    directory = _checkpoint(tmp_path / "ckpt", tokenizer_json, template, **tokens)
    hf = _auto(directory)
    ours = chat.template_for(HFTokenizer(directory), directory)
    gpt2 = chat.ChatTemplate(template, GPT2Tokenizer(ROOT / "data/gpt2"))
    assert not ours.has_generation
    for messages in conversations:
        _assert_encodes_as(ours, _prefix_mask(hf, messages, template), messages)
        _assert_encodes_as(gpt2, _prefix_mask(hf_gpt2, messages, template), messages)
    # Each assistant message is trained on with what closes its turn, and nothing else.
    ids, mask = ours.encode({"messages": TRICKY[0]})
    trained = hf.decode(ids[mask == 1])
    close = {LLAMA3: "<|eot_id|>", LLAMA2: " </s>", CHATML: "<|im_end|>\n"}[template]
    replies = [m["content"] for m in TRICKY[0] if m["role"] == "assistant"]
    if template != CHATML:
        replies = [r.strip() for r in replies]
    assert trained.replace(" ", "") == "".join(r + close for r in replies).replace(" ", "")


def test_prompt_completion_pairs_train_on_the_completion_and_its_end(tokenizer_json, tmp_path):
    """A pair is BOS (where the tokenizer adds one) + the prompt's ids + the completion's ids +
    the end-of-sequence token, as transformers' tokenizer gives each part; the prompt is not
    trained on."""
    directory = _checkpoint(tmp_path / "ckpt", tokenizer_json, LLAMA3, **LLAMA3_TOKENS)
    pairs = [("Question: what is 2 + 2?\nAnswer:", " 4"), ("", "Once upon a time"), ("日本", "語")]
    from transformers import GPT2Tokenizer as TransformersGPT2

    for hf, ours in (
        (_auto(directory), chat.template_for(HFTokenizer(directory), directory)),
        (
            TransformersGPT2.from_pretrained(str(ROOT / "data/gpt2")),
            chat.template_for(GPT2Tokenizer(ROOT / "data/gpt2")),
        ),
    ):
        for prompt, completion in pairs:
            head = hf(prompt)["input_ids"]  # with the BOS the tokenizer adds, if any
            tail = hf(completion, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
            ids, mask = ours.encode({"prompt": prompt, "completion": completion})
            assert ids.tolist() == head + tail
            assert mask.tolist() == [0] * len(head) + [1] * len(tail)
    assert hf.eos_token_id == 50256  # GPT-2's <|endoftext|>; the Llama one's <|eot_id|> above


def test_template_source_prefers_the_override_then_the_checkpoints_then_the_default(
    tokenizer_json, tmp_path
):
    directory = _checkpoint(tmp_path / "a", tokenizer_json, LLAMA3, **LLAMA3_TOKENS)
    assert chat.template_source(directory)[0] == LLAMA3
    assert chat.template_source(directory / "tokenizer.json")[0] == LLAMA3  # its folder's
    (directory / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    assert chat.template_source(directory)[0] == CHATML  # transformers 5's file first
    override = tmp_path / "mine.jinja"
    override.write_text(LLAMA2, encoding="utf-8")
    assert chat.template_source(directory, str(override))[:3:2] == (LLAMA2, str(override))
    templates = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA2}]
    named = {"chat_template": templates, "eos_token": "</s>"}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(named))
    assert chat.template_source(tmp_path / "b")[:2] == (LLAMA2, {"eos_token": "</s>"})
    assert chat.template_source(ROOT / "data/gpt2") == (chat.DEFAULT_TEMPLATE, {}, "default")
    with pytest.raises(ConfigError, match="data.chat_template: .*nope.jinja not found"):
        chat.template_source(None, str(tmp_path / "nope.jinja"))


def test_the_mask_marks_the_tokens_transformers_sweep_marks():
    """The vectorized overlap equals transformers' sweep (tokenization_utils_base, assistant
    masks) on random token offsets and in-order spans, empty and straddled ones included."""

    def sweep(offsets, spans):  # transformers' loop, as written there
        mask, span_idx = [0] * len(offsets), 0
        for token_id, (token_start, token_end) in enumerate(offsets):
            while span_idx < len(spans) and token_start >= spans[span_idx][1]:
                span_idx += 1
            if span_idx == len(spans):
                break
            if token_end > spans[span_idx][0]:
                mask[token_id] = 1
        return mask

    rng = np.random.default_rng(0)
    for _ in range(300):
        cuts = np.sort(rng.choice(np.arange(1, 60), rng.integers(1, 20), replace=False))
        offsets = list(zip(np.r_[0, cuts[:-1]].tolist(), cuts.tolist(), strict=True))
        points = np.sort(rng.integers(0, 62, 2 * rng.integers(0, 5))).tolist()
        spans = list(zip(points[::2], points[1::2], strict=True))
        assert chat._overlapping(offsets, spans).tolist() == sweep(offsets, spans)


def test_the_demo_conversations_are_made_from_the_shipped_plays():
    """data/chat/shakespeare_chat.jsonl is what its script makes of tiny Shakespeare, a few
    hundred conversations well under 1 MB, each alternating user and assistant after a system
    line, every turn a speech of the play."""
    spec = importlib.util.spec_from_file_location(
        "make_shakespeare_chat", ROOT / "data/chat/make_shakespeare_chat.py"
    )
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    plays = (ROOT / "data/shakespeare/input.txt").read_text(encoding="utf-8")
    made = make.conversations(plays)[:: make.STRIDE]
    shipped = DEMO.read_text(encoding="utf-8")
    assert shipped == "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in made)
    assert 300 <= len(made) <= 600 and DEMO.stat().st_size < 1 << 19
    speeches = {s for _, s in make.speeches(plays)}
    for c in made:
        roles = [m["role"] for m in c["messages"]]
        assert roles == ["system"] + ["user", "assistant"] * ((len(roles) - 1) // 2)
        assert all(m["content"] in speeches for m in c["messages"][1:])
