"""FP8 linear layers: the quantizer, the scaled matmul and its logged fallback, and whole models
under CP and TP x CP (dense and MoE) against the fp32 path, within stated bounds."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from cp_infer.cli import main
from cp_infer.quant import Fp8Linear, quantize_rows


def test_row_quantization_keeps_every_row_within_its_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of all sizes
    x[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: near the row's largest magnitude (scaled to 448 = 1.75 * 2^8)
    # the step is 2^5, 1/14 of it; no value is off by more than half that step
    step = x.abs().amax(dim=1, keepdim=True) / 14
    assert torch.all((back - x).abs() <= step / 2 + 1e-30)
    assert torch.equal(back[5], torch.zeros(300))


def test_fp8_linear_is_the_scaled_matmul_of_its_quantized_operands():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 130, generator=g), torch.randn(3, 7, 130, generator=g)
    layer = Fp8Linear(w)
    y = layer(x)
    xq, sx = quantize_rows(x.reshape(-1, 130))
    ref = (xq.float() * sx) @ (layer.weight.float() * layer.weight_scale).t()
    torch.testing.assert_close(y.reshape(-1, 96), ref, atol=1e-4, rtol=1e-5)
    # and it is close to the unquantized product
    assert (y - x @ w.t()).abs().max() < 0.1 * (x @ w.t()).abs().max()


def test_a_refused_shape_falls_back_with_a_warning(monkeypatch, caplog):
    w, x = torch.randn(8, 16), torch.randn(2, 16)
    layer = Fp8Linear(w)
    want = layer(x)

    def refuse(*args, **kwargs):
        raise RuntimeError("shape not supported here")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with caplog.at_level(logging.WARNING):
        got, again = layer(x), layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "(2, 16, 8)" in warnings[0].getMessage()  # once per shape


# (preset, layout, world, FP8 layer groups, bound on max|logit error| / max|logit|); the
# measured errors are in docs/performance.md
CASES = [
    ("tiny-llama", ["--cp", "2"], 2, ["ffn"], 0.15),
    ("tiny-llama", ["--tp", "2", "--cp", "2"], 4, ["ffn"], 0.15),
    ("tiny-llama", ["--cp", "2"], 2, ["ffn", "attention"], 0.25),
    ("tiny-moe", ["--cp", "2", "--ep", "2"], 2, ["ffn"], 0.5),
    ("tiny-moe", ["--tp", "2", "--cp", "2"], 4, ["ffn"], 0.5),
]


def _run(dist_pool, tmp, preset, layout, world, extra, name):
    src = tmp / "p.jsonl"
    src.write_text("".join(json.dumps({"id": i, "token_ids": [(13 * i + 7 * j) % 500 + 1
                    for j in range(40 + 17 * i)]}) + "\n" for i in range(3)))  # fmt: skip
    out, logits = tmp / f"{name}.jsonl", tmp / f"{name}.safetensors"
    argv = ["generate", "--preset", preset, *layout, "--input", str(src), "--output", str(out),
            "--save-logits", str(logits), "--max-new-tokens", "8", *extra]  # fmt: skip
    assert dist_pool(world).run(main, argv, timeout_s=180) == [0] * world
    return load_file(logits), [json.loads(x)["token_ids"] for x in out.read_text().splitlines()]


@pytest.mark.parametrize(("preset", "layout", "world", "groups", "bound"), CASES,
                         ids=[f"{c[0]}-{''.join(c[1])}-{'+'.join(c[3])}" for c in CASES])  # fmt: skip
def test_fp8_models_stay_within_their_bound_of_fp32(
    dist_pool, tmp_path, preset, layout, world, groups, bound
):
    ref, _ = _run(dist_pool, tmp_path, preset, layout, world, [], "fp32")
    got, _ = _run(dist_pool, tmp_path, preset, layout, world,
                  ["--quant", "fp8", "--fp8-layers", *groups], "fp8")  # fmt: skip
    for key in ref:
        err = (got[key] - ref[key]).abs().max() / ref[key].abs().max()
        assert 0 < err < bound, (key, err.item())


def _chat_run(dist_pool, tmp, preset, layout, world, extra, name):
    src = tmp / "chat.jsonl"
    src.write_text("".join(json.dumps({"id": i, "turns": [
        [(11 * i + 3 * j) % 500 + 1 for j in range(60 + 23 * i)], [7, 8, 9, 10 + i]]}) + "\n"
        for i in range(2)))  # fmt: skip
    out, logits = tmp / f"{name}.jsonl", tmp / f"{name}.safetensors"
    argv = ["generate", "--preset", preset, *layout, "--input", str(src), "--output", str(out),
            "--save-logits", str(logits), "--max-new-tokens", "6", *extra]  # fmt: skip
    assert dist_pool(world).run(main, argv, timeout_s=180) == [0] * world
    return load_file(logits)


# (preset, layout, world, bound on the logit error against fp32 relative to the largest logit;
# a random MoE is touchier: bf16 alone moves tiny-moe's logits by 0.20, docs/performance.md)
KV_LAYOUTS = [
    ("tiny-llama", ["--cp", "2"], 2, 0.1),
    ("tiny-llama", ["--tp", "2", "--cp", "2"], 4, 0.1),
    ("tiny-moe", ["--cp", "2", "--ep", "2"], 2, 0.3),
]


@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
@pytest.mark.parametrize(
    ("preset", "layout", "world", "bound"),
    KV_LAYOUTS,
    ids=["llama-cp2", "llama-tp2xcp2", "moe-cp2xep2"],
)
def test_fp8_kv_cache_is_the_same_on_every_layout_and_close_to_fp32(
    dist_pool, tmp_path, preset, layout, world, bound, variant
):
    """Scales are per (head, token), so quantization does not depend on the layout: an FP8 cache
    gives the same logits at CP=1 and sharded (a chat: its second turn reads the FP8 prefix,
    which pass-KV sends as FP8 bytes and scales)."""
    fp8 = ["--kv-dtype", "fp8_e4m3", "--variant", variant]
    alone = _chat_run(dist_pool, tmp_path, preset, [], 1, fp8, "alone")
    sharded = _chat_run(dist_pool, tmp_path, preset, layout, world, fp8, "sharded")
    full = _chat_run(dist_pool, tmp_path, preset, layout, world, ["--variant", variant], "fp32")
    for key in alone:
        torch.testing.assert_close(sharded[key], alone[key], atol=1e-4, rtol=0)
        err = (sharded[key] - full[key]).abs().max() / full[key].abs().max()
        assert 0 < err < bound, (key, err.item())


def _ring_bytes(kv_dtype: str) -> int:
    import torch.distributed as dist

    from cp_infer.attention import RingComm, ring_attention
    from cp_infer.sharding import ShardLayout, shard

    layout = ShardLayout([512], dist.get_world_size())
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        shard(torch.randn(h, 512, 128, generator=g), layout, dist.get_rank(), dim=1)
        .to(torch.bfloat16).contiguous()
        for h in (8, 2, 2)
    )  # fmt: skip
    comm = RingComm()
    ring_attention(q, k, v, layout, variant="pass-kv", comm=comm, kv_dtype=kv_dtype)
    return comm.stats.sendrecv_bytes


def test_fp8_ring_and_cache_bytes_are_at_most_055_of_bf16(dist_pool):
    from cp_infer.engine import KVCache, StorePlan

    bf16, fp8 = (dist_pool(2).run(_ring_bytes, d, timeout_s=60)[0] for d in ("auto", "fp8_e4m3"))
    assert fp8 <= 0.55 * bf16, (fp8, bf16)  # FP8 K/V plus a float32 scale per (head, token)
    sizes = []
    for kv_dtype in ("auto", "fp8_e4m3"):
        cache = KVCache([0, 1], 8, 128, torch.bfloat16, kv_dtype=kv_dtype)
        cache.plan([[StorePlan(0, 0, tuple(range(100)))]])
        cache.commit()
        sizes.append(cache.nbytes())
    assert sizes[1] <= 0.55 * sizes[0], sizes


def _fp8_checkpoint(src, dst):
    """``src`` with its MLP weights stored as Meta's FP8 Llama is: float8 e4m3 and a float32
    scale per output row (``fbgemm_fp8``), attention left in full precision."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if ".mlp." in n]:
        q, scale = quantize_rows(tensors[name])
        tensors[name], tensors[name.removesuffix(".weight") + ".weight_scale"] = q, scale
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": [f"model.layers.{i}.self_attn" for i in range(2)] + ["lm_head"],
    }
    (dst / "config.json").write_text(json.dumps(cfg))


def test_an_fp8_checkpoint_loads_as_it_is(dist_pool, tmp_path):
    import subprocess
    import sys

    src = tmp_path / "bf16"
    subprocess.run([sys.executable, "examples/make_tiny_checkpoint.py", "--preset", "tiny-llama",
                    "--output", str(src), "--no-tokenizer"], check=True, capture_output=True)  # fmt: skip
    _fp8_checkpoint(src, tmp_path / "fp8")

    def run(ckpt, layout, world, extra, name):
        out, logits = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.safetensors"
        argv = ["generate", "--checkpoint", str(ckpt), *layout, "--input",
                "examples/prompts.jsonl", "--output", str(out), "--save-logits", str(logits),
                "--max-new-tokens", "4", *extra]  # fmt: skip
        assert dist_pool(world).run(main, argv, timeout_s=180) == [0] * world
        return load_file(logits)

    # quantizing at load time and reading the FP8 checkpoint give the same weights, bit for bit
    want = run(src, ["--cp", "2"], 2, ["--quant", "fp8", "--fp8-layers", "ffn"], "quantized")
    got = run(tmp_path / "fp8", ["--cp", "2"], 2, [], "stored")
    tp = run(tmp_path / "fp8", ["--tp", "2", "--cp", "2"], 4, [], "stored-tp")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(tp[key], want[key], atol=0.05 * want[key].abs().max().item(),
                                   rtol=0)  # TP re-scales row-parallel shards  # fmt: skip


def test_the_te_backend_refuses_cpu_tensors_by_name():
    layer = Fp8Linear(torch.randn(8, 16), backend="transformer_engine")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match="unknown FP8 backend"):
        Fp8Linear(torch.randn(8, 16), backend="cutlass")


def _has_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "transformer_engine"])
def test_fp8_linear_on_cuda_matches_the_cpu_path(backend):
    if backend == "transformer_engine" and not _has_te():
        pytest.skip("needs Transformer Engine (the gpu extra)")
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(256, 512, generator=g), torch.randn(32, 512, generator=g)
    cpu = Fp8Linear(w, backend="torch")(x)
    layer = Fp8Linear(w, backend=backend).cuda()
    got = layer(x.cuda().to(torch.bfloat16)).float().cpu()
    # TE scales per tensor where the CPU path scales per row: a looser, stated bound
    assert (got - cpu).abs().max() < 0.05 * cpu.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", [1, 2])
def test_fp8_generate_on_cuda_is_close_to_cpu(tmp_path, world):
    from tests.cli_runner import torchrun

    out = {}
    for device in ("cpu", "cuda"):
        logits = tmp_path / f"{device}.safetensors"
        proc = torchrun(world, ["generate", "--preset", "tiny-llama", "--cp", str(world),
                                "--device", device, "--quant", "fp8", "--kv-dtype", "fp8_e4m3",
                                "--input", "examples/prompts.jsonl",
                                "--output", str(tmp_path / f"{device}.jsonl"),
                                "--save-logits", str(logits)])  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[device] = load_file(logits)
    for key, ref in out["cpu"].items():
        assert (out["cuda"][key] - ref).abs().max() < 0.05 * ref.abs().max()
