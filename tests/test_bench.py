"""The benchmark's arithmetic and its GPU settings, without timing anything."""

import pytest

from megajax import bench, config


def test_summary_uses_the_median_step():
    r = bench.summarize([2.0, 1.0, 4.0], tokens=100, flops_per_token=10.0, peak=1000.0)
    assert r["step_time_s"] == 2.0 and r["tokens_per_sec"] == 50.0
    assert r["mfu"] == pytest.approx(100 * 10.0 / 2.0 / 1000.0)
    assert r["step_time_min_s"] == 1.0


def test_gpu_runs_bf16_with_fused_attention_only_without_dropout():
    cfg = config.load("configs/bench_gpt_cpu.py")
    assert bench.for_platform(cfg, "cpu") == cfg
    gpu = bench.for_platform(cfg, "gpu").model
    assert (gpu.compute_dtype, gpu.attention) == ("bfloat16", "cudnn")
    dropout = config.replace(cfg, model=dict(dropout=0.1))
    assert bench.for_platform(dropout, "gpu").model.attention == "einsum"
