"""``python -m moqae train --model smollm2-135m --lambda 0.5 --out DIR``: router-only training."""

from __future__ import annotations

import argparse
import sys

from harness.data import MissingDataError
from harness.interface import MethodSpecError
from harness.models import (
    ModelLoadError,
    check_fits_context,
    config_context_length,
    context_length,
    load_model,
)
from moqae.train import RouterTrainer, TrainConfig, check_train_args, summarize


def build_parser() -> argparse.ArgumentParser:
    """``python -m moqae``'s arguments: ``train``, ``oracle-check``, ``oracle-crossfit``."""
    p = argparse.ArgumentParser(prog="python -m moqae", description="MoQAE router training (LLM frozen)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the routers on the calibration split; resumable")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--lambda", dest="lam", type=float, default=0.5, help="weight of the model loss (0..1)")
    t.add_argument("--out", required=True, help="folder for train_state.pt (resume) and router.safetensors")
    t.add_argument("--data-dir", default=None, help="local data mirror (else $MOQAE_DATA_DIR, else the hub)")
    t.add_argument("--method", default="moqae", help="base spec, e.g. moqae:chunk=64,share=1")
    for field, typ in (("steps", int), ("seqlen", int), ("windows", int), ("lr", float), ("seed", int)):
        t.add_argument(f"--{field}", type=typ, default=getattr(TrainConfig, field))
    t.add_argument("--estimator", choices=("gumbel", "reinforce", "paper"), default=TrainConfig.estimator)
    t.add_argument(
        "--nll-scale", choices=("chunk", "token"), default=TrainConfig.nll_scale,
        help="model term per routing decision (chunk: N x mean NLL, default) or the mean token NLL",
    )  # fmt: skip
    t.add_argument("--no-progress", action="store_true")
    o = sub.add_parser("oracle-check", help="moqae-oracle's first-order ΔNLL estimate against measured moves")
    o.add_argument("--model", default="smollm2-135m")
    o.add_argument("--method", default="moqae-oracle", help="oracle spec (experts, chunk, share, base)")
    o.add_argument("--data-dir", default=None, help="local data mirror (else $MOQAE_DATA_DIR, else the hub)")
    o.add_argument("--seqlen", type=int, default=2048, help="WikiText-2 test window length")
    o.add_argument("--window", type=int, default=0, help="which window of the test split")
    o.add_argument("--slots", type=int, default=40, help="random (slot, expert) moves to measure")
    o.add_argument("--out", default=None, help="JSON file for the rows")
    x = sub.add_parser("oracle-crossfit", help="the verified oracle searched on half a window's tokens, "
                       "scored on the other half (is its gain a fit to the window?)")  # fmt: skip
    x.add_argument("--model", default="smollm2-135m")
    x.add_argument("--method", default="moqae-oracle:budget=5.5,estimate=measured",
                   help="oracle spec (experts, chunk, share, base, budget, estimate)")  # fmt: skip
    x.add_argument("--data-dir", default=None, help="local data mirror (else $MOQAE_DATA_DIR, else the hub)")
    x.add_argument("--seqlen", type=int, default=256, help="WikiText-2 test window length")
    x.add_argument("--windows", type=int, default=4, help="the first N windows of the test split")
    x.add_argument("--verify", type=int, default=60, help="checked single-slot moves per search")
    x.add_argument("--split", choices=("parity", "halves"), default="parity", help="how the tokens are halved")
    x.add_argument("--shuffles", type=int, default=4, help="shuffled allocations per fold (the control)")
    x.add_argument("--out", default=None, help="JSON file for the windows and the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "oracle-check":
        return _oracle_check(args, sys.argv[1:] if argv is None else argv)
    if args.command == "oracle-crossfit":
        return _oracle_crossfit(args, sys.argv[1:] if argv is None else argv)
    cfg = TrainConfig(
        lam=args.lam, steps=args.steps, seqlen=args.seqlen, windows=args.windows, lr=args.lr,
        estimator=args.estimator, seed=args.seed, method=args.method, nll_scale=args.nll_scale,
    )  # fmt: skip
    try:
        check_train_args(cfg, args.out)  # before the model loads: bad arguments fail at once
        # a --seqlen longer than the model's context, as run refuses it: from the config (no weights) ...
        check_fits_context("moqae train", cfg.seqlen, config_context_length(args.model), args.model, "use --seqlen")
        model, tok = load_model(args.model, device="cpu", dtype="fp32")
        # ... or, where only the loaded model tells (a hub id), before any training step
        check_fits_context("moqae train", cfg.seqlen, context_length(model), args.model, "use --seqlen")
        trainer = RouterTrainer(model, tok, cfg, data_dir=args.data_dir, out=args.out)
        path = trainer.train(progress=not args.no_progress)
    except (MethodSpecError, MissingDataError, ModelLoadError, ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last saved step", file=sys.stderr)
        return 130
    print(f"router checkpoint: {path}  (last steps: {summarize(trainer.history)})")
    return 0


def _oracle_check(args: argparse.Namespace, argv: list[str]) -> int:
    import json
    import shlex
    from pathlib import Path

    from harness.data import token_windows, wikitext2_test_text
    from harness.integration import AttachedMethod
    from harness.interface import build_method
    from moqae.oracle_checks import check_estimate

    if args.slots < 1 or args.seqlen < 2 or args.window < 0:
        print("error: --slots and --seqlen must be >= 1 and 2, --window >= 0", file=sys.stderr)
        return 2
    try:
        method = build_method(args.method)
        model, tok = load_model(args.model, device="cpu", dtype="fp32")
        windows = token_windows(tok(wikitext2_test_text(args.data_dir), return_tensors="pt").input_ids[0],
                                args.seqlen, args.window + 1)  # fmt: skip
        with AttachedMethod(model, method) as am:
            result = check_estimate(am, windows[args.window].view(1, -1), args.slots)
    except (MethodSpecError, MissingDataError, ModelLoadError, ValueError, IndexError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    result["command"] = "python -m moqae " + shlex.join(argv)
    print(f"window {args.window}: NLL {result['window_nll']:.2f} (summed); {len(result['rows'])} moves measured")
    print(f"sign agreement (first-order vs measured): {result['sign_agreement']:.2f}")
    for bits, rho in result["spearman_by_target_bits"].items():
        print(f"rank correlation, moves to {bits} bits: {rho:+.2f}")
    if args.out:
        from harness.files import write_json_atomic

        write_json_atomic(Path(args.out), result)
    print(json.dumps({"mean_measured": sum(r["measured"] for r in result["rows"]) / len(result["rows"])}))
    return 0


def _oracle_crossfit(args: argparse.Namespace, argv: list[str]) -> int:
    import shlex
    from pathlib import Path

    from tqdm.auto import tqdm

    from harness.data import token_windows, wikitext2_test_text
    from harness.files import write_json_atomic, write_text_atomic
    from harness.integration import AttachedMethod
    from harness.interface import build_method
    from moqae.oracle import MoQAEOracle
    from moqae.oracle_checks import CROSSFIT_ROWS, cross_fit, crossfit_markdown, summarize

    if args.windows < 1 or args.seqlen < 4 or args.verify < 0 or args.shuffles < 1:
        print("error: --windows and --shuffles must be >= 1, --seqlen >= 4, --verify >= 0", file=sys.stderr)
        return 2
    try:
        method = build_method(args.method)
        if not isinstance(method, MoQAEOracle):
            raise MethodSpecError(f"--method {args.method!r} is not a moqae-oracle spec")
        model, tok = load_model(args.model, device="cpu", dtype="fp32")
        ids = tok(wikitext2_test_text(args.data_dir), return_tensors="pt").input_ids[0]
        windows = token_windows(ids, args.seqlen, args.windows)
        if len(windows) < args.windows:
            raise ValueError(f"the test split has {len(windows)} windows of {args.seqlen} tokens, not {args.windows}")
        setting = {"model": args.model, "method": args.method, "seqlen": args.seqlen, "split": args.split,
                   "verify": args.verify, "shuffles": args.shuffles}  # fmt: skip
        rows = _finished_windows(Path(args.out), setting)[: len(windows)] if args.out else []  # resume
        result = {"command": "python -m moqae " + shlex.join(argv), **setting, "windows": rows}
        with AttachedMethod(model, method) as am:
            for w in tqdm(windows[len(rows) :], desc="oracle-crossfit", unit="window", initial=len(rows),
                          total=len(windows)):  # fmt: skip
                rows.append(cross_fit(am, w.view(1, -1), args.verify, args.split, args.shuffles))
                if args.out:  # each window as it is done: an interrupted run resumes from here
                    write_json_atomic(Path(args.out), result)
    except (MethodSpecError, MissingDataError, ModelLoadError, ValueError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last finished window", file=sys.stderr)
        return 130
    summary = result["summary"] = summarize(rows)
    for name, label in CROSSFIT_ROWS:
        print(f"{label}: PPL {summary[name]['ppl']:.4f} at {summary[name]['bits']:.3f} bits")
    print(f"(the cross-fit's searched folds: PPL {summary['cross_fit']['selection_ppl']:.4f})")
    if args.out:
        write_json_atomic(Path(args.out), result)
        write_text_atomic(Path(args.out).with_suffix(".md"), crossfit_markdown(result))
    return 0


def _finished_windows(path, setting: dict) -> list[dict]:
    """The windows an earlier run of the same setting wrote to ``path`` (JSON; none if it differs)."""
    import json

    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    same = isinstance(done, dict) and all(done.get(k) == v for k, v in setting.items())
    return list(done.get("windows", [])) if same else []


if __name__ == "__main__":
    sys.exit(main())
