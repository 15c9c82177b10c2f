"""The GPU suite's code paths, run on the CPU with a very small model (its figures are for a GPU)."""

import dataclasses
from importlib.util import find_spec

import pytest
import torch
from safetensors import safe_open

from fedlora.bench import gpu
from fedlora.bench.suite import BenchContext

SMALL = dataclasses.replace(gpu.QUICK, hidden=32, heads=2, kv_heads=1, intermediate=64, layers=1, batch=2,
                            length=16, steps=1, device="cpu")


def test_every_variant_trains_the_saved_random_model_as_a_site_would(tmp_path):
    folder = gpu.build_model_folder(SMALL, tmp_path / "model")
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}
    variants = [v for v in gpu.VARIANTS if find_spec("bitsandbytes") or "4-bit" not in v.name]  # the gpu extra
    rows = [gpu.measure(SMALL, folder, variant) for variant in variants]
    assert [r["variant"] for r in rows] == [v.name for v in variants]
    for row in rows:
        assert row["tokens_per_second"] > 0 and row["tokens"] > 0 or row["variant"] == "DP-SGD, bf16"
        assert row["device"] == "cpu" and row["peak_memory_bytes"] is None  # a CPU has no allocator peak
        assert row["trainable_parameters"] == rows[0]["trainable_parameters"]
    plain = [r for r in rows if r["variant"] != "DP-SGD, bf16"]
    assert all(r["tokens"] == SMALL.steps * SMALL.batch * SMALL.length for r in plain)
    table = gpu.markdown({"plan": SMALL.__dict__, "gpu": None, "rows": rows})
    assert all(f"| {v.name} |" in table for v in variants)


def test_without_cuda_the_full_suite_says_it_did_not_run(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = gpu.run(BenchContext(quick=False, workdir=tmp_path))
    assert result.figures == {"ran": False, "reason": "no CUDA GPU on this machine"}
    assert result.markdown.startswith("Not run") and not (tmp_path / "gpu").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or find_spec("bitsandbytes") is None,
                    reason="needs a CUDA GPU and bitsandbytes")
def test_on_a_gpu_the_4bit_base_takes_less_memory_than_bf16(tmp_path):
    plan = dataclasses.replace(gpu.QUICK, hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1024, device="cuda")
    folder = gpu.build_model_folder(plan, tmp_path / "model")
    by_name = {v.name: v for v in gpu.VARIANTS}
    bf16 = gpu.measure(plan, folder, by_name["bf16"])
    four_bit = gpu.measure(plan, folder, by_name["4-bit base, bf16"])
    assert four_bit["peak_memory_bytes"] < bf16["peak_memory_bytes"]
