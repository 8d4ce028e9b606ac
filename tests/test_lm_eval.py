"""lm-evaluation-harness three ways on one small GPT-2, offline (data/lm_eval's tasks over the
shipped LAMBADA sample): megajax's model in this process, lm-eval's `local-completions` client
against megajax's server, and lm-eval's own `hf` model on the checkpoint give the same
per-sample log-likelihoods (1e-4; a whole passage's to float32's last bit), greedy flags,
generations and metrics."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSON; nothing online
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import load_generator, make_hf_gpt2, start_server  # noqa: E402

from megajax import lm_eval as megajax_lm_eval  # noqa: E402

pytestmark = pytest.mark.slow  # three harness runs and a server

TASKS = ["lambada_local", "lambada_local_until", "lambada_local_rolling"]
RUN = dict(
    limit=6,
    bootstrap_iters=0,
    random_seed=1234,
    numpy_random_seed=1234,
    torch_random_seed=1234,
    fewshot_random_seed=1234,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def in_process(hf_dir):
    """megajax's model in this process, on 1 x 2 (the server runs on 2 x 2)."""
    generator, tokenizer = load_generator(hf_dir, mesh=(1, 2))
    lm = megajax_lm_eval.MegajaxLM(generator, tokenizer, batch_size=4, max_rows=4)
    return megajax_lm_eval.evaluate(lm, TASKS, include_path="data/lm_eval", **RUN)


@pytest.fixture(scope="module")
def over_http(hf_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    url, server = start_server(hf_dir, max_rows=4)
    model_args = dict(
        model="tiny-gpt2",
        base_url=f"{url}/v1/completions",
        tokenizer_backend="huggingface",
        tokenizer=str(hf_dir),
        max_length=129,
        batch_size=4,
        max_retries=1,
    )
    try:
        return simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=TASKS,
            task_manager=TaskManager(include_path="data/lm_eval"),
            **RUN,
        )
    finally:
        server.engine.stop()


@pytest.fixture(scope="module")
def with_transformers(hf_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = dict(pretrained=str(hf_dir), dtype="float32", device="cpu")
    return simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=TASKS,
        batch_size=4,
        task_manager=TaskManager(include_path="data/lm_eval"),
        **RUN,
    )


def _per_sample(results, task):
    return [
        s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])
    ]


def _assert_same(ours, theirs):
    for task in TASKS:
        a, b = _per_sample(ours, task), _per_sample(theirs, task)
        assert len(a) == len(b) == RUN["limit"]
        for x, y in zip(a, b, strict=True):
            if task == "lambada_local":  # (log-likelihood, greedy) per request
                (ll_x, greedy_x), (ll_y, greedy_y) = x[0], y[0]
                np.testing.assert_allclose(ll_x, ll_y, rtol=0, atol=1e-4)
                assert bool(greedy_x) == bool(greedy_y)
            elif task == "lambada_local_rolling":
                # a sum of ~100 float32 terms near -1,300: its last bit is 1.2e-4
                np.testing.assert_allclose(float(x[0]), float(y[0]), rtol=1e-6, atol=1e-4)
            else:
                assert x == y  # the generated text
        for metric, value in ours["results"][task].items():
            if isinstance(value, float):
                np.testing.assert_allclose(value, theirs["results"][task][metric], rtol=1e-5)


def test_in_process_equals_transformers_per_sample(in_process, with_transformers):
    _assert_same(in_process, with_transformers)
    generated = _per_sample(in_process, "lambada_local_until")
    assert any(g[0].strip() for g in generated)  # something was generated to compare


def test_local_completions_against_the_server_equals_in_process(over_http, in_process):
    _assert_same(over_http, in_process)


def test_command_prints_the_table_then_one_json_line(hf_dir, in_process, capsys):
    flags = "--tasks lambada_local --include_path data/lm_eval --limit 6 --batch_size 4"
    mesh = "--mesh data=2,model=4 --step_timeout 0"  # all 8 devices, rows split 2 ways
    argv = ["--hf_checkpoint", str(hf_dir), *flags.split(), *mesh.split()]
    assert megajax_lm_eval.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("|lambada_local") for line in out)
    printed = json.loads(out[-1])["results"]["lambada_local"]
    assert printed["acc,none"] == in_process["results"]["lambada_local"]["acc,none"]
    np.testing.assert_allclose(
        printed["perplexity,none"],
        in_process["results"]["lambada_local"]["perplexity,none"],
        rtol=1e-6,
    )
