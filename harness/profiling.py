"""Latency and memory profiling of KV-cache methods: prefill time, time per decode step, bytes held.

One call per method on the same model and the same random prompt (speed does not depend on the
token values): a warm-up prefill, then ``repeats`` × (prefill of ``prompt_len`` tokens through a
fresh cache + ``decode_steps`` greedy decode steps). Times are medians, with CUDA synchronised around
every timed region. Methods that time their own parts (MoQAE's routers: ``route_seconds``) report
them too, so their overhead is a measured share, not an estimate.

``python -m harness profile --methods fp16,moqae --model smollm2-135m --prompt 2048 --decode 32``
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from harness.integration import AttachedMethod, forward
from harness.interface import KVCacheMethod


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _enable_own_timing(method: KVCacheMethod) -> None:
    """Methods that can time their own parts (MoQAE's ``time_routes``) only do so while profiled,
    so that the synchronisation it needs on GPU never slows a normal run."""
    if hasattr(method, "time_routes"):
        method.time_routes = True


def _own_seconds(method: KVCacheMethod) -> float | None:
    value = getattr(method, "route_seconds", None)
    return float(value) if value is not None else None


def method_parameters(method: KVCacheMethod) -> int:
    """Parameters a method adds to the model (MoQAE's routers), 0 for the others."""
    bank = getattr(method, "bank", None)
    return sum(p.numel() for p in bank.parameters()) if bank is not None else 0


@torch.no_grad()
def profile_method(
    model: torch.nn.Module,
    method: KVCacheMethod,
    prompt_len: int = 2048,
    decode_steps: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Median prefill and per-decode-step wall time of ``method`` on ``model`` (batch 1)."""
    if prompt_len < 1 or decode_steps < 0 or repeats < 1:
        raise ValueError(f"profile: prompt_len={prompt_len}, decode_steps={decode_steps}, repeats={repeats}")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    prefill, steps, own_prefill, own_steps = [], [], [], []
    _enable_own_timing(method)
    with AttachedMethod(model, method) as am:
        if method.needs_calibration:  # speed does not depend on the calibration's values
            g = torch.Generator().manual_seed(seed + 1)
            am.calibrate([torch.randint(0, vocab, (1, min(prompt_len, 512)), generator=g).to(device)])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for rep in range(repeats + 1):  # the first round warms up and is not timed
            cache = am.new_cache()
            own0 = _own_seconds(method)
            _sync(device)
            t0 = time.perf_counter()
            logits = forward(model, ids, cache).logits
            _sync(device)
            t_prefill = time.perf_counter() - t0
            own1 = _own_seconds(method)
            step_times = []
            token = logits[:, -1:].argmax(-1)
            for _ in range(decode_steps):
                _sync(device)
                t0 = time.perf_counter()
                logits = forward(model, token, cache).logits
                _sync(device)
                step_times.append(time.perf_counter() - t0)
                token = logits[:, -1:].argmax(-1)
            own2 = _own_seconds(method)
            if rep == 0:
                continue
            prefill.append(t_prefill)
            steps += step_times
            if own0 is not None:
                own_prefill.append(own1 - own0)
                own_steps.append((own2 - own1) / max(decode_steps, 1))
        memory = cache.memory()
    out: dict[str, Any] = {
        "method": method.label,
        "prompt_len": prompt_len,
        "decode_steps": decode_steps,
        "repeats": repeats,
        "device": str(device),
        "prefill_s": statistics.median(prefill),
        "decode_step_s": statistics.median(steps) if steps else None,
        "kv_bytes": memory.total_bytes,
        "nominal_bits": memory.nominal_bits,
        "method_parameters": method_parameters(method),
        "model_parameters": sum(p.numel() for p in model.parameters()),
    }
    if own_prefill:
        out["own_prefill_s"] = statistics.median(own_prefill)
        out["own_decode_step_s"] = statistics.median(own_steps)
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def overhead_table(rows: list[dict[str, Any]], reference: str = "fp16") -> str:
    """Markdown table of profile rows, times also as ratios to the ``reference`` method's row."""
    ref = next((r for r in rows if r["method"] == reference), None)
    lines = [
        "| method | prefill ms | × ref | decode ms/step | × ref | own prefill ms | own decode ms/step "
        "| added params | KV bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(x: float | None) -> str:
        return "—" if x is None else f"{1000 * x:.2f}"

    def ratio(x: float | None, key: str) -> str:
        return "—" if x is None or ref is None or not ref.get(key) else f"{x / ref[key]:.3f}"

    for r in rows:
        own_p, own_d = r.get("own_prefill_s"), r.get("own_decode_step_s")
        params = r["method_parameters"]
        share = f" ({100 * params / r['model_parameters']:.3f} %)" if params else ""
        lines.append(
            f"| {r['method']} | {ms(r['prefill_s'])} | {ratio(r['prefill_s'], 'prefill_s')} "
            f"| {ms(r['decode_step_s'])} | {ratio(r['decode_step_s'], 'decode_step_s')} "
            f"| {ms(own_p)} | {ms(own_d)} | {params:,}{share} | {r['kv_bytes']:,} |"
        )
    return "\n".join(lines)


def profile(
    methods: list[str],
    model: str,
    prompt_len: int = 2048,
    decode_steps: int = 32,
    repeats: int = 3,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Profile each method spec on one loaded model (alias, folder, hub id or a random ``*-shape``)."""
    from tqdm.auto import tqdm

    from harness.integration import model_info
    from harness.interface import build_method
    from harness.models import load_model, model_id

    if prompt_len < 1 or decode_steps < 0 or repeats < 1:
        got = f"{prompt_len}, {decode_steps}, {repeats}"
        raise ValueError(f"profile: need prompt >= 1, decode >= 0, repeats >= 1 (got {got})")
    objs = [build_method(m) for m in methods]
    lm, _ = load_model(model, device=device, dtype=dtype)
    info = model_info(lm)
    for m in objs:
        m.check_model(info)
    rows = []
    for m in tqdm(objs, desc="profile", disable=not progress):
        row = profile_method(lm, m, prompt_len, decode_steps, repeats)
        row.update(model=model_id(model), dtype=str(info.dtype).removeprefix("torch."))
        rows.append(row)
    return rows
