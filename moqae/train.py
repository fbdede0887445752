"""Router-only training of MoQAE (the LLM stays frozen): L = λ·L_model + (1−λ)·L_mem.

Each step runs the frozen model on a calibration window through a MoQAE cache whose leader-layer
routers run with gradients; the chosen experts are discrete, so the language-model loss reaches the
routers only through the probability each token gave to its chunk's chosen expert, p_sel.

Estimators (option ``estimator``):

* ``gumbel`` (default) — a differentiable relaxation: during training each chunk's K/V are
  Σ_e w_e·Q_e(x) over the experts' reconstructions, with straight-through Gumbel-softmax weights
  (the forward value is the chosen expert's reconstruction, exactly the inference cache; the
  gradient flows through the soft weights, the mean over the chunk's tokens of their perturbed
  router distributions). L = λ·N·NLL + (1−λ)·mean_chunks Σ_e w_e·B_e/16 (see ``nll_scale``), so the LM loss reaches each
  chunk's decision through attention, with no credit-assignment guesswork.

* ``paper`` — the published loss as written in secondary sources, with the memory term made to
  penalise high-bit experts as the paper's prose says:
      L_model = mean_t p_sel(t)·NLL(t)/B_sel(t),     L_mem = mean_t p_sel(t)·B_sel(t)/16
  NLL(t) is the token's own next-token NLL under the quantized cache; experts are the argmax votes.
  ∇(p·cost) = p·cost·∇log p: a REINFORCE-style estimator without baseline or exploration.
* ``reinforce`` — REINFORCE with exploration and a baseline: token votes are sampled from
  the router's distribution, each chunk's model cost is its attributed NLL increase over the FP16
  cache (the mean ΔNLL of the tokens in the next ``horizon`` chunks, which read this chunk), and
      loss = mean_t log p_sel(t) · (λ·w·ΔNLL_chunk + (1−λ)·B_sel/16 − baseline)
  with a running-mean baseline and ΔNLL in nats (``nll_weight`` w = 1): absolute, so that the
  trade-off against memory does not depend on how much the window degrades overall. Measured on
  smollm2-135m at λ = 0.5 it collapses to INT2: a window's NLL increase is shared by all its chunks,
  so only the memory term separates the experts (the credit-assignment problem the gumbel
  estimator removes). Kept for comparison.

Scale of the model term (option ``nll_scale``). λ trades nats of LM loss against a fraction of the
FP16 cache, so its meaning depends on the unit of the model term:

* ``chunk`` (default) — both terms per routing decision: the model term is the NLL summed over the
  N tokens of a chunk (N × the mean token NLL; ``paper``/``reinforce`` multiply their per-token cost
  by N the same way), the memory term the chunk's bits / 16. Then λ = 0.5 weighs one chunk's loss
  against one chunk's memory. Measured on smollm2-135m (gumbel, 100 steps × 512 tokens): with
  ``token`` and λ = 0.5, 31 % of chunks went to INT2 (3.48 bits, PPL +13 %), because the mean-token
  NLL of the whole window barely moves when one chunk drops from INT4 to INT2, while its memory
  term moves by 2/16 at full weight; λ ≈ 0.95 was needed for a near-FP16 router.
* ``token`` — the mean token NLL, as the loss is written in the secondary sources.

Training reads the calibration split only (the mirror's wikitext-2/valid.txt or the hub's train
split), uses a fixed seed, writes a resumable training state every ``save_every`` steps and a final
router checkpoint ``router.safetensors`` (weights + config, ``moqae.method.save_router_checkpoint``)
that ``moqae:ckpt=PATH`` loads.

The training state ``train_state.pt`` holds only what ``torch.load(weights_only=True)`` rebuilds:
``format``, ``routers`` (state dict), ``optimizer`` (Adam's state dict), ``step``, ``history`` (list of
dicts of numbers), ``baseline``, ``generator`` (the RNG state as a uint8 tensor) and ``train_config``.
It is read through ``harness.files.load_torch_safe`` with the bound ``train_state_bound``
(4 x the routers' fp32 parameter bytes, for weights and Adam's two moments, + 1 MiB + 1 KiB per
training step for the history); a larger, corrupt or foreign file is refused in one line
(delete it or use another ``--out``), and nothing in it is executed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from harness.data import calibration_windows
from harness.files import check_writable_dir
from harness.integration import AttachedMethod, forward
from harness.interface import build_method
from harness.options import (
    Fraction,
    FreeText,
    NonNegativeFloat,
    NonNegativeInt,
    OneOf,
    PositiveFloat,
    PositiveInt,
    check_config,
)
from moqae.method import MoQAE, model_signature, save_router_checkpoint


@dataclass
class TrainConfig:
    lam: Fraction = 0.5
    steps: PositiveInt = 200
    seqlen: Annotated[int, Field(ge=2)] = 512
    windows: PositiveInt = 64  # distinct calibration windows, cycled
    lr: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1e-2
    estimator: OneOf("gumbel", "reinforce", "paper") = "gumbel"
    tau: PositiveFloat = 1.0  # Gumbel-softmax temperature
    horizon: PositiveInt = 4  # chunks after a chunk whose ΔNLL is attributed to it (reinforce)
    nll_weight: NonNegativeFloat = 1.0  # nats of ΔNLL per unit of the memory term's scale (reinforce)
    # chunk: model term per routing decision (N x mean NLL); token: mean NLL
    nll_scale: OneOf("chunk", "token") = "chunk"
    seed: NonNegativeInt = 0
    save_every: PositiveInt = 10
    method: Annotated[str, FreeText("a moqae spec (moqae:chunk=64,share=1)")] = "moqae"  # experts, chunk, share ...

    #: the names ``python -m moqae train`` gives the options (its error lines use them)
    flags: ClassVar[dict[str, str]] = {"lam": "--lambda", "nll_scale": "--nll-scale"}


#: the options ``python -m moqae train`` takes as flags (the others are names in its error lines as they are)
TRAIN_FLAGS = ("lam", "steps", "seqlen", "windows", "lr", "estimator", "seed", "method", "nll_scale")

STATE_FORMAT = "moqae-train-state/2"
STATE_KEYS = ("routers", "optimizer", "step", "history", "baseline", "generator", "train_config")


def check_train_args(cfg: TrainConfig, out: str | Path | None = None) -> None:
    """ValueError (one line) for a configuration that cannot train, or an ``out`` that is not a folder
    where files can be written (a file, a read-only mount: ``harness.files.check_writable_dir``)."""
    check_config(cfg, "moqae train", {k: TrainConfig.flags.get(k, "--" + k.replace("_", "-")) for k in TRAIN_FLAGS})
    if out is not None:
        check_writable_dir(out, f"--out {out}", "name a writable folder")


def train_state_bound(param_bytes: int, steps: int) -> int:
    """Largest ``train_state.pt`` read: 4 x the routers' fp32 parameter bytes (weights, Adam's two
    moments, slack) + 1 MiB (RNG state, config, zip headers) + 1 KiB per step (history)."""
    return 4 * param_bytes + (1 << 20) + 1024 * steps


def _save_atomic(obj: dict, path: Path) -> None:
    from harness.files import torch_save_atomic

    torch_save_atomic(path, obj)


def token_nll(model: torch.nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    """Per-position next-token NLL [T-1]. The LM's parameters are frozen, so no graph is built
    through it; only router probabilities computed inside the cache carry gradients."""
    logits = forward(model, ids, cache).logits
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none").detach()


class RouterTrainer:
    """Trains the routers of a MoQAE method attached to a frozen model."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, data_dir=None, out: str | Path = "router-out"):
        check_train_args(cfg, out)
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        spec = cfg.method + ("," if ":" in cfg.method else ":") + f"ckpt=random,seed={cfg.seed},lam={cfg.lam}"
        self.method: MoQAE = build_method(spec)
        self.attached = AttachedMethod(model, self.method)
        self.info = self.attached.info
        self.bank = self.method.bank
        self.bank.train().requires_grad_(True)
        self.bits = torch.tensor(self.method.expert_bits, dtype=torch.float32)
        # nats of LM loss per routing decision: a chunk's N tokens, or the mean token
        self.nll_factor = float(self.method.config.chunk) if cfg.nll_scale == "chunk" else 1.0
        self.opt = torch.optim.Adam(self.bank.parameters(), lr=cfg.lr)
        self.fp16 = build_method("fp16")
        self._fp16_nll: dict[int, torch.Tensor] = {}
        self.step, self.history = 0, []
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.baseline = 0.0
        self.state_path = self.out / "train_state.pt"
        try:
            if self.state_path.exists() or self.state_path.is_symlink():
                self._resume()  # before the data: a state that cannot be resumed fails fast
            self.windows = calibration_windows(tokenizer, data_dir, cfg.seqlen, cfg.windows, seed=cfg.seed)
        except BaseException:
            self.attached.detach()  # leave the model as it was
            raise

    # ---- state -------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Continue from ``train_state.pt`` (size-checked ``torch.load(weights_only=True)``); a file that
        cannot be resumed is one ValueError line naming it and what to do."""
        from harness.files import load_torch_safe

        path, todo = self.state_path, "delete it or use another --out"
        bound = train_state_bound(sum(p.numel() * 4 for p in self.bank.parameters()), self.cfg.steps)
        try:
            state = load_torch_safe(path, bound)
        except ValueError as e:
            raise ValueError(f"cannot resume training: {e}; {todo}") from None
        if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS):
            raise ValueError(f"cannot resume training: {path} is not a MoQAE training state (keys); {todo}")
        if state["train_config"] != dataclasses.asdict(self.cfg):
            raise ValueError(f"{path} was written with another configuration; use another --out")
        step, history, baseline, gen = state["step"], state["history"], state["baseline"], state["generator"]
        ok = (
            isinstance(step, int) and 0 <= step <= self.cfg.steps
            and isinstance(history, list) and all(isinstance(r, dict) for r in history)
            and isinstance(baseline, int | float)
            and isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8
            and isinstance(state["routers"], dict) and isinstance(state["optimizer"], dict)
        )  # fmt: skip
        try:
            if not ok:
                raise ValueError("fields of the wrong type")
            self.bank.load_state_dict(state["routers"])
            self.opt.load_state_dict(state["optimizer"])
            self.gen.set_state(gen)
        except Exception as e:  # a foreign state dict: refuse it in one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"cannot resume training: {path} does not fit these routers ({reason}); {todo}") from None
        self.step, self.history, self.baseline = step, history, float(baseline)

    def _save_state(self) -> None:
        _save_atomic(
            {
                "format": STATE_FORMAT,
                "routers": self.bank.state_dict(),
                "optimizer": self.opt.state_dict(),
                "step": self.step,
                "history": self.history,
                "baseline": self.baseline,
                "generator": self.gen.get_state(),
                "train_config": dataclasses.asdict(self.cfg),
            },
            self.state_path,
        )

    def checkpoint(self) -> dict:
        c, info = self.method.config, self.info
        config = {"experts": c.experts, "share": c.share, "router_width": c.router_width, "chunk": c.chunk}
        return {
            "routers": {k: v.detach().clone() for k, v in self.bank.state_dict().items()},
            "config": {**config, "hidden_size": info.hidden_size, "n_layers": info.n_layers},
            "lambda": self.cfg.lam,
            "signature": model_signature(self.info),
            "train_config": dataclasses.asdict(self.cfg),
            "steps": self.step,
        }

    # ---- one step ----------------------------------------------------------------------------
    def fp16_nll(self, i: int) -> torch.Tensor:
        if i not in self._fp16_nll:
            with AttachedMethod(self.model, self.fp16) as am, torch.no_grad():
                self._fp16_nll[i] = token_nll(self.model, self.windows[i], am.new_cache())
        return self._fp16_nll[i]

    def train_step(self) -> dict:
        cfg, n = self.cfg, self.method.config.chunk
        i = self.step % len(self.windows)
        ids = self.windows[i]
        ref = self.fp16_nll(i) if cfg.estimator == "reinforce" else None
        cache = self.attached.new_cache()
        cache.state["train"] = {
            "probs": {},
            "sample": cfg.estimator == "reinforce",
            "generator": self.gen,
            "relaxed": cfg.estimator == "gumbel",
            "tau": cfg.tau,
            "weights": [],
        }
        if cfg.estimator == "gumbel":
            return self._gumbel_step(ids, cache)
        with torch.enable_grad():
            nll = token_nll(self.model, ids, cache)
            losses, total_bits, total_tokens = [], 0.0, 0
            for leader, parts in cache.state["train"]["probs"].items():
                probs = torch.cat(parts, dim=1)[0]  # [T, E] with grad
                n_chunks = probs.shape[0] // n
                decided = torch.stack([cache.state[("decision", leader, c)][0] for c in range(n_chunks)])
                routed = torch.ones(n_chunks, dtype=torch.bool)
                if self.method.config.freeze_first:
                    routed[0] = False
                tok_expert = decided.repeat_interleave(n)  # [n_chunks * N]
                p_sel = probs[: n_chunks * n].gather(1, tok_expert[:, None]).squeeze(1).clamp_min(1e-8)
                b_sel = self.bits[tok_expert]
                mask = routed.repeat_interleave(n)
                if cfg.estimator == "paper":
                    tok_nll = F.pad(nll, (0, 1))[: n_chunks * n]
                    cost = cfg.lam * self.nll_factor * tok_nll / b_sel + (1 - cfg.lam) * b_sel / 16
                    term = p_sel * cost
                else:
                    delta = F.pad(nll - ref, (0, 1))  # [T] ΔNLL per position
                    per_chunk = delta[: n_chunks * n].view(n_chunks, n).mean(1)
                    attributed = torch.stack(
                        [per_chunk[c : c + cfg.horizon].mean() for c in range(n_chunks)]
                    ).repeat_interleave(n)
                    model_cost = self.nll_factor * cfg.nll_weight * attributed
                    cost = cfg.lam * model_cost + (1 - cfg.lam) * b_sel / 16
                    term = torch.log(p_sel) * (cost - self.baseline)
                    self.baseline = 0.9 * self.baseline + 0.1 * cost[mask].mean().item()
                losses.append(term[mask].mean())
                total_bits += float((b_sel * mask).sum())
                total_tokens += int(mask.sum())
            loss = torch.stack(losses).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.step += 1
        rec = {
            "step": self.step,
            "loss": loss.item(),
            "nll": nll.mean().item(),
            "routed_bits": total_bits / max(total_tokens, 1),
            "kv_nominal_bits": cache.memory().nominal_bits,
        }
        self.history.append(rec)
        return rec

    def _gumbel_step(self, ids: torch.Tensor, cache) -> dict:
        """Differentiable relaxation: the LM loss flows through the mixed K/V into the chunk weights."""
        cfg = self.cfg
        with torch.enable_grad():
            logits = forward(self.model, ids, cache).logits
            nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            w = torch.cat(cache.state["train"]["weights"], dim=0)  # [routed chunks x leaders, E]
            mem = (w * self.bits).sum(-1).mean() / 16
            loss = cfg.lam * self.nll_factor * nll + (1 - cfg.lam) * mem
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.step += 1
        routed_bits = (w.detach() * self.bits).sum(-1).mean().item()
        rec = {"step": self.step, "loss": loss.item(), "nll": nll.item(), "routed_bits": routed_bits,
               "kv_nominal_bits": routed_bits}  # fmt: skip
        self.history.append(rec)
        return rec

    def train(self, progress: bool = True) -> Path:
        t0 = time.perf_counter()
        bar = tqdm(
            total=self.cfg.steps, initial=self.step, desc=f"moqae router λ={self.cfg.lam:g}", disable=not progress
        )
        while self.step < self.cfg.steps:
            rec = self.train_step()
            bar.update(1)
            bar.set_postfix(nll=f"{rec['nll']:.3f}", bits=f"{rec['kv_nominal_bits']:.2f}")
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                self._save_state()
        bar.close()
        path = self.out / "router.safetensors"
        ckpt = self.checkpoint()
        ckpt["train_seconds_this_run"] = time.perf_counter() - t0
        save_router_checkpoint(path, ckpt.pop("routers"), ckpt)
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
        self.attached.detach()
        return path


def summarize(history: list[dict], last: int = 20) -> dict:
    tail = history[-last:]
    return {k: sum(r[k] for r in tail) / len(tail) for k in ("loss", "nll", "kv_nominal_bits")} if tail else {}


def perplexity_of(history: list[dict]) -> float:
    return math.exp(summarize(history)["nll"])
