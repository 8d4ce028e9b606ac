"""Conversations for fine-tuning: rendered as transformers renders them (ids and assistant masks
equal to apply_chat_template's), prepared once into records that read back, refused in one line
when bad, packed into rows where every trained target appears once; text windows with their
documents' bounds as Megatron-LM resets them; all through the deterministic, resumable loader."""

import importlib.util
import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from megajax import config, models
from megajax.config import ConfigError
from megajax.data import chat, corpora, prepare, shards
from megajax.data.loader import loaders
from megajax.data.samples import ChatRows, Dataset, GPTWindows
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


def test_replies_stop_at_the_token_that_closes_an_assistant_turn(tokenizer_json, tmp_path):
    """Llama 3's <|eot_id|>, ChatML's <|im_end|>, Llama 2's </s> (its end-of-sequence token),
    and GPT-2's end of text under megajax's default template."""
    from megajax.data.tokenizer import GPT2Tokenizer, HFTokenizer

    tok = HFTokenizer(tokenizer_json)
    cases = [(LLAMA3, LLAMA3_TOKENS, ["<|eot_id|>"]), (CHATML, {}, ["<|im_end|>"]),
             (LLAMA2, LLAMA2_TOKENS, ["</s>"])]  # fmt: skip
    for i, (template, tokens, stops) in enumerate(cases):
        directory = _checkpoint(tmp_path / str(i), tokenizer_json, template, **tokens)
        ours = chat.template_for(tok, directory)
        want = {tok._tok.token_to_id(s) for s in stops}
        if "eos_token" not in tokens:
            want.add(tok.eot_id)  # the tokenizer's own end of text
        assert set(ours.stop_ids()) == want, template
    gpt2 = GPT2Tokenizer(ROOT / "data/gpt2")
    assert chat.template_for(gpt2).stop_ids() == [gpt2.eot_id]


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


GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
CONTENT_ONLY = (  # a template whose generation blocks hold the reply alone
    "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}"
    "{% endif %}{{ '\n' }}{% endfor %}"
)
BAD = {
    "not JSON": ("{'messages': []}", None, "not JSON (Expecting property name"),
    "not an object": ('["user", "hi"]', None, "must be a JSON object with 'messages'"),
    "neither form": ('{"text": "hi"}', None, "needs 'messages' or 'prompt' and 'completion'"),
    "unknown role": (
        '{"messages": [{"role": "tool", "content": "x"}]}',
        None,
        "message 1: unknown role 'tool': use one of system, user, assistant",
    ),
    "empty conversation": ('{"messages": []}', None, "'messages' must be a non-empty list"),
    "no assistant message": (
        '{"messages": [{"role": "user", "content": "hi"}]}',
        None,
        "a conversation with no assistant message has nothing to train on",
    ),
    "content not a string": (
        '{"messages": [{"role": "assistant", "content": [{"type": "text"}]}]}',
        None,
        "message 1 (assistant): the content must be a string, not list",
    ),
    "no assistant token": (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
        CONTENT_ONLY,
        "no token of the assistant's messages to train on",
    ),
    "template raises": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
        '{"role": "assistant", "content": "c"}]}',
        LLAMA2,
        "the chat template raised: Conversation roles must alternate user/assistant",
    ),
    "template fails in Python": (
        '{"messages": [{"role": "user", "content": "boom"}, '
        '{"role": "assistant", "content": "!"}]}',
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ m['content'] + 1 }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}",
        "the chat template raised TypeError: can only concatenate str",
    ),
    "empty completion": ('{"prompt": "p", "completion": ""}', None, "the completion non-empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_in_one_line_naming_file_and_line_and_leaves_nothing(case, tmp_path):
    line, template, message = BAD[case]
    source = tmp_path / "in" / "chats.jsonl"
    source.parent.mkdir()
    source.write_text(f"{GOOD}\n\n{GOOD}\n{line}\n{GOOD}\n", encoding="utf-8")
    override = ""
    if template is not None:
        override = tmp_path / "in" / "template.jinja"
        override.write_text(template, encoding="utf-8")
    out = tmp_path / "out" / "chats"
    with pytest.raises(ConfigError) as e:
        prepare.prepare([source], out=out, fmt="chat", chat_template=str(override), log=quiet)
    assert str(e.value).startswith(f"{source} line 4: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []  # no dataset, no partial one


def test_the_command_line_prepares_conversations_and_refuses_bad_ones_in_one_line(tmp_path, capsys):
    source = tmp_path / "chats.jsonl"
    source.write_text(f"{GOOD}\n" * 9 + '{"messages": []}\n', encoding="utf-8")
    args = ["--format", "chat", "--out", str(tmp_path / "bad"), str(source)]
    assert prepare.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {source} line 10: 'messages' must be a non-empty list"
    assert not (tmp_path / "bad").exists()
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}", encoding="utf-8")
    assert prepare.main([*args, "--chat_template", str(template)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(rf"error: {template}: the chat template does not parse: .*", err[-1])
    source.write_text(f"{GOOD}\n" * 10, encoding="utf-8")
    assert prepare.main(args) == 0
    assert Dataset(tmp_path / "bad").manifest["splits"]["validation"]["rows"] == 1


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shipped demo conversations prepared with the GPT-2 BPE and the default template."""
    out = tmp_path_factory.mktemp("chat") / "demo"
    return Dataset(prepare.prepare([DEMO], out=out, fmt="chat", log=quiet))


def _stored(dataset: Dataset, split: str) -> list[dict]:
    source = dataset.source(split)
    return [source[i] for i in range(len(source))]


def test_a_prepared_dataset_reads_back_each_conversation_encoded(demo):
    """Each line's record holds its ids and loss mask, in order; the tail tenth of the
    conversations is the validation split; the manifest says how records are laid out and
    which template made them, and that template is read back from the dataset."""
    template = chat.template_for(GPT2Tokenizer(ROOT / "data/gpt2"))
    records = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines()]
    stored = _stored(demo, "train") + _stored(demo, "validation")
    assert len(stored) == len(records) and len(_stored(demo, "validation")) == round(
        0.1 * len(records)
    )
    for record, row in zip(records, stored, strict=True):
        ids, mask = template.encode(record)
        np.testing.assert_array_equal(row["tokens"], ids)
        np.testing.assert_array_equal(row["mask"], mask)
    m = demo.manifest
    assert m["format"] == "chat" and m["dtype"] == "uint16" and m["record"] == prepare.CHAT_RECORD
    assert m["chat"] == {
        "template": "tokenizer/chat_template.jinja",
        "origin": "default",
        "specials": {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")},
        "mask": "generation blocks",
    }
    index = demo.index("train")
    n = len(index["row_tokens"])
    assert index["line"].tolist() == list(range(1, n + 1)) and set(index["file"]) == {0}
    firsts = [int(np.flatnonzero(r["mask"][1:])[0]) + 1 for r in stored[:n]]
    assert index["first"].tolist() == firsts
    for split in ("train", "validation"):
        rows = _stored(demo, split)
        assert m["splits"][split]["tokens"] == sum(len(r["tokens"]) for r in rows)
        assert m["splits"][split]["scored"] == sum(int(r["mask"][1:].sum()) for r in rows)
    again = prepare.load_chat_template(demo.path)
    assert again.source == chat.DEFAULT_TEMPLATE
    assert again.encode(records[0])[0].tolist() == stored[0]["tokens"].tolist()


def test_a_conversation_source_is_prepared_once_named_by_its_template_and_tokenizer(
    tokenizer_json, tmp_path
):
    """data.source=FILE.jsonl with data.format=chat is prepared once into the work directory
    with the checkpoint's tokenizer and template (as transformers encodes it), and prepared
    anew when the file, the template or the tokenizer's special tokens change."""
    directory = _checkpoint(tmp_path / "ckpt", tokenizer_json, LLAMA3, **LLAMA3_TOKENS)
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(line + "\n" for line in DEMO.read_text().splitlines()[:20]))
    lines = []
    kw = dict(tokenizer="hf", vocab_dir=str(directory), val_fraction=0.1, fmt="chat")
    kw |= dict(cache_dir=tmp_path / "work", log=lines.append)
    first = prepare.cached(str(source), **kw)
    assert prepare.cached(str(source), **kw) == first
    assert sum(line.startswith("prepared") for line in lines) == 1
    assert first.name.startswith("chats-hf-chat-")
    ds = Dataset(first)
    assert ds.manifest["chat"]["origin"] == str(directory)
    hf = _auto(directory)
    row = ds.source("train")[0]
    expected = _prefix_mask(hf, json.loads(source.read_text().splitlines()[0])["messages"], LLAMA3)
    assert row["tokens"].tolist() == expected[0] and row["mask"].tolist() == expected[1]
    assert ds.manifest["dtype"] == "uint16"  # 50,266 tokens fit
    override = tmp_path / "chatml.jinja"
    override.write_text(CHATML, encoding="utf-8")
    others = {prepare.cached(str(source), **{**kw, "chat_template": str(override)})}
    _checkpoint(directory, tokenizer_json, LLAMA3, **{**LLAMA3_TOKENS, "eos_token": "</s>"})
    others.add(prepare.cached(str(source), **kw))
    source.write_text(source.read_text() + GOOD + "\n")
    others.add(prepare.cached(str(source), **kw))
    assert len(others | {first}) == 4
    text = prepare.cached(str(source), **{**kw, "fmt": "text"})  # the same file as text
    assert text not in others | {first} and not Dataset(text).is_chat


def test_preparation_streams_conversations_in_bounded_memory(tmp_path, monkeypatch):
    """Five times the conversations raise the peak of Python's allocations (traced after the
    first conversation, once the tokenizer is loaded and the template compiled) by the index
    alone, 32 bytes a conversation, not by the text (a quarter of the added text at most;
    holding it would add all of it): the file is read a block at a time."""
    monkeypatch.setattr(corpora, "BLOCK_BYTES", 1 << 14)
    lines = DEMO.read_text(encoding="utf-8").splitlines(keepends=True)[:100]
    streamed = prepare.conversation_lines

    def tracing(inputs):
        for k, item in enumerate(streamed(inputs)):
            if k == 1:  # the first conversation is encoded and written
                tracemalloc.reset_peak()
            yield item

    monkeypatch.setattr(prepare, "conversation_lines", tracing)
    peaks, sizes = [], []
    for copies in (1, 5):
        source = tmp_path / f"x{copies}.jsonl"
        source.write_text("".join(lines) * copies, encoding="utf-8")
        tracemalloc.start()
        try:
            prepare.prepare([source], out=tmp_path / f"o{copies}", fmt="chat", log=quiet)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        sizes.append(source.stat().st_size)
    # 34 to 64 bytes a conversation measured: the index's arrays, each copied as it grows
    growth, added = peaks[1] - peaks[0], 4 * len(lines)
    assert growth < 96 * added and growth < (sizes[1] - sizes[0]) / 4, (peaks, sizes)


def _segments(sample: dict) -> list[slice]:
    """The positions of each segment of a row, in order."""
    seg = sample["segments"]
    return [slice(int(np.argmax(seg == s)), int(len(seg) - np.argmax(seg[::-1] == s)))
            for s in range(1, int(seg.max()) + 1)]  # fmt: skip


@pytest.mark.parametrize("seq_len", [64, 256])
def test_packed_rows_hold_every_scored_target_once_in_order(demo, seq_len):
    """Rows hold the conversations in order, greedily, each whole (or cut to seq_len + 1
    tokens, counted in one line), as a segment numbered from 1 with positions from 0 and its
    loss mask as the targets' weights; the rest is padding, all zero."""
    lines = []
    rows = ChatRows(demo, "train", seq_len=seq_len, log=lines.append)
    stored = _stored(demo, "train")
    lengths = np.array([len(r["tokens"]) for r in stored])
    long = int((lengths > seq_len + 1).sum())
    kept = [
        r for r in stored if np.flatnonzero(r["mask"][1 : seq_len + 1]).size
    ]  # a target left after the cut
    assert long and (len(kept) < len(stored)) == (seq_len == 64)  # both cases happen
    if long:
        assert len(lines) == 1 and f"{long:,} of {len(stored):,} conversations" in lines[0]
        assert f"longer than model.seq_len + 1 = {seq_len + 1}" in lines[0]
        left_out = f"{len(stored) - len(kept):,} of them keep no assistant token"
        assert (left_out in lines[0]) == (len(kept) < len(stored))
    else:
        assert lines == []
    found, used = [], []
    for i in range(len(rows)):
        sample = rows[i]
        assert {k: (v.shape, v.dtype) for k, v in sample.items()} == {
            k: ((seq_len,), np.int32)
            for k in ("inputs", "targets", "weights", "segments", "positions")
        }
        spans = _segments(sample)
        end = spans[-1].stop
        for s, span in enumerate(spans):
            assert (sample["segments"][span] == s + 1).all()
            np.testing.assert_array_equal(
                sample["positions"][span], np.arange(span.stop - span.start)
            )
            tokens = np.r_[sample["inputs"][span], sample["targets"][span][-1:]]
            np.testing.assert_array_equal(sample["targets"][span][:-1], sample["inputs"][span][1:])
            found.append((tokens, sample["weights"][span]))
        assert spans[0].start == 0
        assert all(a.stop == b.start for a, b in zip(spans, spans[1:], strict=False))
        assert all((v[end:] == 0).all() for v in sample.values())
        used.append(end)
    assert len(found) == len(kept)
    for (tokens, weights), row in zip(found, kept, strict=True):
        n = min(len(row["tokens"]), seq_len + 1)
        np.testing.assert_array_equal(tokens, row["tokens"][:n])
        np.testing.assert_array_equal(weights, row["mask"][1:n])
    scored = sum(int(r["mask"][1 : seq_len + 1].sum()) for r in kept)
    assert sum(int(rows[i]["weights"].sum()) for i in range(len(rows))) == scored
    firsts = np.cumsum([0] + [int(rows[i]["segments"].max()) for i in range(len(rows))])
    pairs = [min(len(r["tokens"]), seq_len + 1) - 1 for r in kept]
    for i in range(len(rows) - 1):  # greedy: the next row's first would not have fitted
        assert used[i] + pairs[firsts[i + 1]] > seq_len
    assert rows.num_tokens == sum(p + 1 for p in pairs)


def test_unpacked_rows_hold_one_conversation_each_and_long_ones_can_be_refused(demo):
    rows = ChatRows(demo, "validation", seq_len=512, pack=False, log=quiet)
    stored = _stored(demo, "validation")
    assert len(rows) == len(stored)
    for i, row in enumerate(stored):
        sample, n = rows[i], len(row["tokens"])
        assert sample["segments"].tolist() == [1] * (n - 1) + [0] * (513 - n)
        np.testing.assert_array_equal(sample["inputs"][: n - 1], row["tokens"][:-1])
        np.testing.assert_array_equal(sample["weights"][: n - 1], row["mask"][1:])
    index = demo.index("train")
    c = int(np.argmax(index["row_tokens"] > 129))
    with pytest.raises(ConfigError) as e:
        ChatRows(demo, "train", seq_len=128, truncate=False, log=quiet)
    message = str(e.value)
    assert f"the first (line {index['line'][c]} of {DEMO}) with {index['row_tokens'][c]}" in message
    assert (
        "longer than model.seq_len + 1 = 129 tokens" in message and "data.truncate=true" in message
    )


def test_the_packing_plan_reads_no_token_and_samples_are_pure_functions_of_their_index(
    demo, monkeypatch
):
    def no_reads(self, i):
        raise AssertionError("a token was read to plan the rows")

    with monkeypatch.context() as m:
        m.setattr(shards.Rows, "__getitem__", no_reads)
        rows = ChatRows(demo, "train", seq_len=128, log=quiet)
    again = ChatRows(Dataset(demo.path), "train", seq_len=128, log=quiet)
    for i in (len(rows) - 1, 0, 7, 0):
        a, b = rows[i], again[i]
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(IndexError):
        rows[len(rows)]


def _megatron_masks(tokens: np.ndarray, eod: int):
    """Megatron-LM's _get_ltor_masks_and_position_ids with reset_position_ids,
    reset_attention_mask and no eod_mask_loss, in numpy: (attention allowed (s, s), loss mask,
    position ids)."""
    s = len(tokens)
    allowed = np.tril(np.ones((s, s), bool))
    position_ids = np.arange(s)
    prev = 0
    for i in np.flatnonzero(tokens == eod):
        allowed[i + 1 :, : i + 1] = False
        position_ids[i + 1 :] -= i + 1 - prev
        prev = i + 1
    return allowed, np.ones(s), position_ids


def test_text_windows_with_reset_attention_restart_segments_after_each_end_of_text(tmp_path):
    """data.reset_attention: the windows are the same, every target is trained on, and
    segments and positions give exactly Megatron-LM's reset attention mask and position ids."""
    source = tmp_path / "docs.jsonl"
    lambada = (ROOT / "data/lambada/lambada_sample.jsonl").read_text().splitlines()[:60]
    source.write_text("\n".join(lambada) + "\n", encoding="utf-8")
    out = prepare.prepare([source], out=tmp_path / "ds", fmt="lambada", log=quiet)
    plain = GPTWindows(Dataset(out), "train", seq_len=128)
    windows = GPTWindows(Dataset(out), "train", seq_len=128, documents=True)
    assert len(windows) == len(plain) > 10
    eot = 50256
    restarts = 0
    for i in range(len(windows)):
        w, p = windows[i], plain[i]
        assert all(np.array_equal(w[k], p[k]) for k in p)
        allowed, loss, positions = _megatron_masks(w["inputs"], eot)
        same = w["segments"][:, None] == w["segments"][None, :]
        np.testing.assert_array_equal(same & np.tril(np.ones((128, 128), bool)), allowed)
        np.testing.assert_array_equal(w["positions"], positions)
        np.testing.assert_array_equal(w["weights"], loss)
        assert w["segments"][0] == 1 and set(np.diff(w["segments"])) <= {0, 1}
        assert all(v.dtype == np.int32 for v in w.values())
        restarts += int((w["inputs"] == eot).sum())
    assert restarts > 20
    char = prepare.prepare([source], out=tmp_path / "c", tokenizer="char", log=quiet)
    with pytest.raises(ConfigError, match="no end-of-text token"):
        GPTWindows(Dataset(char), "train", seq_len=16, documents=True)


def _chat_config(source: str, **data):
    return config.replace(tiny_config(seq_len=128), data=dict(source=source, format="chat", **data))


def test_the_loader_gives_the_models_fields_and_resumes_exactly(tmp_path):
    """Through loaders(): batches of conversations carry the fields models.batch_fields names,
    are the same for the same seed and step, resume from the saved state, split over processes
    by rows, and blend two sources by weight."""
    cfg = _chat_config(str(DEMO))
    lines = []
    _, train, val = loaders(cfg, workdir=tmp_path, log=lines.append)
    assert sum("prepared" in line for line in lines) == 1
    assert sum("are cut to it" in line for line in lines) == 2  # train and validation
    fields = models.batch_fields(cfg.model, documents=cfg.data.documents)
    batch = next(train)
    assert {k: v.shape[1:] for k, v in batch.items()} == fields
    assert all(v.dtype == np.int32 and len(v) == 8 for v in batch.values())
    assert next(val)["weights"].sum() > 0
    for _ in range(3):
        next(train)
    saved = json.loads(json.dumps(train.state()))
    expected = [next(train) for _ in range(2)]
    _, resumed, _ = loaders(cfg, workdir=tmp_path, log=lines.append)  # prepared: reused
    resumed.restore(saved)
    assert sum("prepared" in line for line in lines) == 1
    for e in expected:
        got = next(resumed)
        assert all(np.array_equal(e[k], got[k]) for k in e)
    halves = [
        loaders(cfg, workdir=tmp_path, log=quiet, train_rows=r)[1]
        for r in ([0, 1, 2, 3], [4, 5, 6, 7])
    ]
    whole = train.batch(9)
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([h.batch(9)[k] for h in halves]), whole[k])
    other = tmp_path / "pairs.jsonl"
    counts = [{"prompt": f"Count to {i}:", "completion": f" {list(range(i))}"} for i in range(40)]
    other.write_text("".join(json.dumps(c) + "\n" for c in counts))
    _, blended, _ = loaders(_chat_config(f"0.25:{DEMO},0.75:{other}"), workdir=tmp_path, log=quiet)
    assert [len(d) for d in blended.datasets][0] == len(train.datasets[0])
    assert [blended.locate(j)[0] for j in range(8)].count(1) == 6


def test_the_loader_refuses_a_dataset_of_the_other_format_and_packs_text_with_reset_attention(
    demo, tmp_path
):
    with pytest.raises(ConfigError, match="holds conversations but data.format is 'text'"):
        loaders(config.replace(_chat_config(str(demo.path)), data=dict(format="text")),
                workdir=tmp_path, log=quiet)  # fmt: skip
    text = tmp_path / "plays.txt"
    text.write_text((ROOT / "data/shakespeare/input.txt").read_text()[:20000] + "\n")
    with pytest.raises(ConfigError, match="plays.txt line 1: not JSON"):
        loaders(_chat_config(str(text)), workdir=tmp_path, log=quiet)
    cfg = config.replace(tiny_config(seq_len=64), data=dict(source=str(text), reset_attention=True))
    _, train, _ = loaders(cfg, workdir=tmp_path, log=quiet)
    batch = next(train)
    assert {k: v.shape[1:] for k, v in batch.items()} == models.batch_fields(
        cfg.model, documents=True
    )
    assert (batch["weights"] == 1).all() and (batch["segments"] >= 1).all()


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
