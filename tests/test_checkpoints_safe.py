"""Safe checkpoints: training states and router checkpoints are size-checked, never unpickled, and any
bad file is refused in one line; routers are safetensors (the shipped ones too: no .pt ships), and a .pt
router loads only from a path a user names (``moqae:ckpt=PATH.pt``, an older run's router.pt), with a note."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import moqae.method as mm
from harness.files import load_safetensors_safe, load_torch_safe, save_safetensors_atomic
from harness.integration import AttachedMethod, forward
from harness.interface import MethodSpecError, ModelInfo, PrepareContext, build_method
from harness.models import tiny_random_model
from moqae.router import RouterBank

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(mm.CHECKPOINT_DIR.glob("*.safetensors"))
SMOLLM2 = ModelInfo("llama", 30, 9, 3, 64, 576, torch.float32, torch.device("cpu"))  # the shipped routers' model


class Payload:
    """Unpickling it creates ``marker`` (``open(marker, "w")``): proof that the file was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant(kind: str, path: Path, marker: Path) -> None:
    """Write a bad file of one ``kind`` at ``path``."""
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"routers": Payload(marker)}))
    elif kind == "torch-pickle":  # a torch.save zip whose data.pkl carries the payload
        torch.save({"routers": {"x": torch.zeros(1)}, "evil": Payload(marker)}, path)
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "wrong-keys":
        torch.save({"weights": {"a": torch.zeros(2)}, "step": 1}, path)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(64 << 20)  # sparse: larger than any bound here
    else:
        raise AssertionError(kind)


BAD = ["pickle", "torch-pickle", "random", "empty", "directory", "wrong-keys", "huge"]


def _one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


@pytest.fixture(scope="module")
def model():
    return tiny_random_model("llama", num_hidden_layers=4)


def test_the_payload_is_live(tmp_path):
    """The planted files would run code if unpickled (so the refusals below are not vacuous)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ---- router checkpoints ------------------------------------------------------------------------


def _method_with_bank(spec: str, n_layers: int = 30, hidden: int = 576):
    method = build_method(spec)
    method.bank = RouterBank(n_layers, hidden, len(method.expert_bits), None, method.config.share)
    return method


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bad_router_checkpoint_is_refused_in_one_line(tmp_path, kind, suffix):
    path, marker = tmp_path / f"router{suffix}", tmp_path / "ran"
    _plant(kind, path, marker)
    method = _method_with_bank(f"moqae:ckpt={path}")
    with pytest.raises(MethodSpecError) as e:
        method.load_checkpoint(path)
    assert not marker.exists()
    assert _one_line(str(e.value)) and str(path) in str(e.value), str(e.value)


def test_router_pickle_payload_through_the_method_spec(tmp_path, model):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    _plant("torch-pickle", path, marker)
    with pytest.raises(MethodSpecError, match="evil.pt") as e:
        AttachedMethod(model, build_method(f"moqae:ckpt={path}"))
    assert not marker.exists() and _one_line(str(e.value))


def test_router_with_wrong_tensors_is_refused(tmp_path):
    method = _method_with_bank("moqae")
    good = method.bank.state_dict()
    cases = {
        "missing": {k: v for k, v in list(good.items())[1:]},
        "shape": {k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(good.items())},
        "ints": {k: v.long() for k, v in good.items()},
    }
    for name, routers in cases.items():
        path = tmp_path / f"{name}.safetensors"
        mm.save_router_checkpoint(path, routers, {"config": {"experts": "16/4/2"}})
        with pytest.raises(MethodSpecError) as e:
            method.load_checkpoint(path)
        assert _one_line(str(e.value)) and path.name in str(e.value), (name, str(e.value))
    save_safetensors_atomic(tmp_path / "nometa.safetensors", good, {})
    with pytest.raises(MethodSpecError, match="metadata"):
        method.load_checkpoint(tmp_path / "nometa.safetensors")


def test_safetensors_round_trip_and_use(tmp_path, model):
    method = build_method("moqae:ckpt=random,seed=7,chunk=8")
    with AttachedMethod(model, method) as am:
        info = am.info
    routers = {k: v.clone() for k, v in method.bank.state_dict().items()}
    config = {"experts": "16/4/2", "share": 3, "router_width": 0, "chunk": 8}
    config.update(hidden_size=info.hidden_size, n_layers=info.n_layers)
    meta = {"config": config, "lambda": 0.5, "signature": mm.model_signature(info), "steps": 2}
    path = tmp_path / "router.safetensors"
    mm.save_router_checkpoint(path, routers, meta)
    state = mm.read_router_checkpoint(path, mm.router_checkpoint_bound(method.bank))
    assert state.pop("format") == mm.ROUTER_FORMAT
    assert {k: v for k, v in state.items() if k != "routers"} == meta
    assert state["routers"].keys() == routers.keys()
    assert all(torch.equal(state["routers"][k], v) for k, v in routers.items())
    # the file loads as a method and routes with exactly these weights
    loaded = build_method(f"moqae:ckpt={path},chunk=8")
    with AttachedMethod(model, loaded) as am:
        assert all(torch.equal(loaded.bank.state_dict()[k], v) for k, v in routers.items())
        with torch.no_grad():
            forward(model, torch.arange(20).view(1, -1), am.new_cache())
    # a model of another width is refused by the saved dims, in one line
    other = _method_with_bank(f"moqae:ckpt={path}", n_layers=info.n_layers, hidden=info.hidden_size)
    geometry = ModelInfo("llama", info.n_layers, 1, 1, 8, info.hidden_size * 2, torch.float32, torch.device("cpu"))
    with pytest.raises(MethodSpecError, match="hidden_size"):
        other.load_checkpoint(path, geometry)


def test_only_safetensors_routers_ship():
    names = sorted(p.name for p in mm.CHECKPOINT_DIR.iterdir())
    assert [p.name for p in SHIPPED] == names  # no .pt (nor anything else) ships
    stems = [f"lambda{lam}" for lam in ("0.1", "0.3", "0.5", "0.7", "0.9")] + ["lambda0.5-share1"]
    assert names == sorted(f"llama-L30-D576-{stem}.safetensors" for stem in stems)
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moqae"]
    assert "checkpoints/*.safetensors" in data and not [d for d in data if d.endswith(".pt")]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_routers_are_safetensors_and_load(path, caplog, monkeypatch):
    monkeypatch.setattr(mm, "_legacy_noted", False)
    share = 1 if "-share1" in path.name else 3
    lam = path.name.split("-lambda")[1].split("-")[0].removesuffix(".safetensors")
    assert mm.default_checkpoint(SMOLLM2, float(lam), share) == path  # the shipped defaults resolve to them
    state = mm.read_router_checkpoint(path, 1 << 22)  # the format training writes: weights + config
    assert state["format"] == mm.ROUTER_FORMAT and state["signature"] == "llama-L30-D576"
    assert state["lambda"] == float(lam) and state["config"]["share"] == share
    assert {"experts", "chunk", "router_width", "hidden_size", "n_layers"} <= state["config"].keys()
    method = build_method(f"moqae:lam={lam},share={share}")
    method.bank = method.new_bank(SMOLLM2)
    assert method.checkpoint_path(SMOLLM2) == path
    with caplog.at_level(logging.WARNING, logger="moqae"):
        method.load_checkpoint(path, SMOLLM2)
    assert not caplog.records  # no deprecation note for the shipped routers
    reference = RouterBank(30, 576, 3, None, share)
    reference.load_state_dict(load_safetensors_safe(path, 1 << 22)[0])
    mine, ref = method.bank.state_dict(), reference.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)


def test_shipped_lookup_reads_no_pt(tmp_path, monkeypatch):
    """A .pt beside the shipped routers is never picked up as one: the lookup names .safetensors only."""
    monkeypatch.setattr(mm, "CHECKPOINT_DIR", tmp_path)
    bank = RouterBank(30, 576, 3, None, 3)
    torch.save({"routers": bank.state_dict(), "config": {"share": 3}}, tmp_path / "llama-L30-D576-lambda0.5.pt")
    expected = tmp_path / "llama-L30-D576-lambda0.5.safetensors"
    assert mm.default_checkpoint(SMOLLM2, 0.5) == expected and not expected.exists()
    with pytest.raises(MethodSpecError, match=r"no router checkpoint llama-L30-D576-lambda0\.5\.safetensors"):
        build_method("moqae:lam=0.5").check_model(SMOLLM2)


def _user_pt(model, path: Path) -> dict[str, torch.Tensor]:
    """A router for ``model`` saved the old way (``torch.save``) at ``path``; its weights."""
    source = build_method("moqae:ckpt=random,seed=5")
    with AttachedMethod(model, source):
        routers = {k: v.clone() for k, v in source.bank.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"routers": routers, "config": {"experts": "16/4/2", "share": 3, "router_width": 0}}, path)
    return routers


def test_user_pt_router_gets_one_deprecation_note(tmp_path, caplog, monkeypatch, model):
    monkeypatch.setattr(mm, "_legacy_noted", False)
    method = _method_with_bank("moqae", n_layers=6, hidden=16)
    path = tmp_path / "router.pt"
    torch.save({"routers": method.bank.state_dict(), "config": {"experts": "16/4/2", "share": 3}}, path)
    with caplog.at_level(logging.WARNING, logger="moqae"):
        method.load_checkpoint(path)
        method.load_checkpoint(path)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and ".safetensors" in notes[0] and _one_line(notes[0])
    # the explicit moqae:ckpt=PATH.pt of a user loads through the method spec, with its note
    monkeypatch.setattr(mm, "_legacy_noted", False)
    caplog.clear()
    routers = _user_pt(model, tmp_path / "mine" / "old.pt")
    loaded = build_method(f"moqae:ckpt={tmp_path / 'mine' / 'old.pt'}")
    with caplog.at_level(logging.WARNING, logger="moqae"), AttachedMethod(model, loaded):
        assert all(torch.equal(loaded.bank.state_dict()[k], v) for k, v in routers.items())
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "old.pt" in notes[0] and "old .pt router checkpoint" in notes[0]


def test_prepare_reuses_an_older_runs_router_pt(tmp_path, model, caplog, monkeypatch):
    """An older run's OUT/routers/.../router.pt is an explicit artefact: prepare reuses it, it loads."""
    monkeypatch.setattr(mm, "_legacy_noted", False)
    out = tmp_path / "results"
    old = out / "routers" / "tiny-llama" / "moqae-lambda0.5" / "router.pt"
    routers = _user_pt(model, old)
    ctx = PrepareContext("tiny-llama", out, None, {}, load=lambda: (model, None), progress=False)
    prepared = build_method("moqae:lam=0.5").prepare("moqae:lam=0.5", ctx)
    assert prepared.reused and prepared.path == old and prepared.spec == f"moqae:lam=0.5,ckpt={old}"
    loaded = build_method(prepared.spec)
    with caplog.at_level(logging.WARNING, logger="moqae"), AttachedMethod(model, loaded):
        assert all(torch.equal(loaded.bank.state_dict()[k], v) for k, v in routers.items())
    assert [r for r in caplog.records if "router.pt" in r.getMessage()]


def test_safe_loaders_bound_the_size(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"a": torch.zeros(1000)}, path)
    assert torch.equal(load_torch_safe(path, 10_000)["a"], torch.zeros(1000))
    with pytest.raises(ValueError, match="more than the 100 expected"):
        load_torch_safe(path, 100)
    st = tmp_path / "t.safetensors"
    save_safetensors_atomic(st, {"a": torch.ones(3)}, {"k": "v"})
    tensors, meta = load_safetensors_safe(st, 10_000)
    assert torch.equal(tensors["a"], torch.ones(3)) and meta == {"k": "v"}
    with pytest.raises(ValueError, match="expected at most"):
        load_safetensors_safe(st, 10)


# ---- training states ---------------------------------------------------------------------------


def _windows(tokenizer, data_dir, seqlen, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]


def _trainer(model, out, steps=2):
    from moqae.train import RouterTrainer, TrainConfig

    cfg = TrainConfig(steps=steps, seqlen=32, windows=2, save_every=1, method="moqae:chunk=8,share=2")
    return RouterTrainer(model, None, cfg, out=out)


@pytest.mark.parametrize("kind", BAD)
def test_bad_train_state_is_refused_in_one_line(tmp_path, model, kind):
    out, marker = tmp_path / "out", tmp_path / "ran"
    out.mkdir()
    _plant(kind, out / "train_state.pt", marker)
    with pytest.raises(ValueError) as e:
        _trainer(model, out)
    msg = str(e.value)
    assert not marker.exists()
    assert _one_line(msg) and "train_state.pt" in msg and "delete it or use another --out" in msg, msg
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # detached again


def test_train_state_round_trip_resumes_and_writes_safetensors(tmp_path, model, monkeypatch):
    import moqae.train as mt

    monkeypatch.setattr(mt, "calibration_windows", _windows)
    a = _trainer(model, tmp_path / "a")
    path_a = a.train(progress=False)
    b = _trainer(model, tmp_path / "b")
    b.train_step()
    b._save_state()
    b.attached.detach()
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)  # plain data only
    assert state["format"] == mt.STATE_FORMAT and state["generator"].dtype == torch.uint8
    resumed = _trainer(model, tmp_path / "b")
    assert resumed.step == 1 and torch.equal(resumed.gen.get_state(), b.gen.get_state())
    path_b = resumed.train(progress=False)
    assert path_a.name == path_b.name == "router.safetensors"
    ra, _ = load_safetensors_safe(path_a, 1 << 24)
    rb, _ = load_safetensors_safe(path_b, 1 << 24)
    assert all(torch.allclose(ra[k], rb[k]) for k in ra)
    # a state that does not fit these routers (another share) is refused in one line
    (tmp_path / "c").mkdir()
    bad = dict(state, routers={"routers.0.w1.weight": torch.zeros(1)})
    torch.save(bad, tmp_path / "c" / "train_state.pt")
    with pytest.raises(ValueError, match="does not fit these routers") as e:
        _trainer(model, tmp_path / "c")
    assert _one_line(str(e.value))


# ---- the command line --------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moqae", "train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args", [["--steps", "0"], ["--steps", "-1"], ["--seqlen", "0"], ["--windows", "0"], ["--out-file"]]
)
def test_train_argument_errors_exit_2_in_one_line(tmp_path, capsys, args):
    from moqae.__main__ import main

    out = tmp_path / "out"
    if args == ["--out-file"]:
        out.write_text("not a folder")
        args = []
    assert main(["train", "--model", "tiny-llama", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and err.startswith("error: "), err
    assert not out.is_dir()  # nothing written


def test_cli_steps_0_exits_2_without_writing(tmp_path):
    r = _cli("--model", "tiny-llama", "--steps", "0", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and _one_line(r.stderr) and "steps=0" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_planted_train_state(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "ran"
    out.mkdir()
    _plant("torch-pickle", out / "train_state.pt", marker)
    r = _cli("--model", "tiny-llama", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert _one_line(r.stderr) and "train_state.pt" in r.stderr and "delete it" in r.stderr, r.stderr
    assert not marker.exists() and not (out / "router.safetensors").exists()
