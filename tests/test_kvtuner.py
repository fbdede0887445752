"""KVTuner (baselines/kvtuner.py): per-layer pairs, the official grid, pruning, clustering, the search and
the shipped-configuration lookup, on hand-made tables, fixed tensors and a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import append_kv

from baselines.kvtuner import (
    CANDIDATES,
    CONFIG_FORMAT,
    KIVIPairStore,
    KVTuner,
    KVTunerConfig,
    cluster_layers,
    main,
    mean_bits,
    pair_name,
    parse_pairs,
    prune_pairs,
    quantize_integer_zero,
    search,
    uniform_choices,
)
from harness.integration import AttachedMethod, forward
from harness.interface import MethodSpecError, ModelInfo, build_method, method_names
from harness.models import tiny_random_model
from harness.quant import quantize
from harness.storage import SeqPairStore

INFO = ModelInfo("llama", 3, 4, 2, 64, 256, torch.float32, torch.device("cpu"))  # 3 layers, H_kv 2, D 64


def _method(spec: str, info: ModelInfo = INFO) -> KVTuner:
    m = build_method(spec)
    m.check_model(info)
    return m


def test_registered_names_and_options():
    assert {"kvtuner", "kvtuner-4", "kvtuner-3"} <= set(method_names())
    assert build_method("kvtuner-3").config.budget == 3.0 and build_method("kvtuner").config.budget == 4.0
    assert build_method("kvtuner:pairs=K8V4,K4V2,KV2").config.pairs == "K8V4,K4V2,KV2"  # bare items
    assert parse_pairs("K8V4,KV4,k2v8") == [(8, 4), (4, 4), (2, 8)]
    assert [pair_name(p) for p in [(8, 8), (4, 2)]] == ["KV8", "K4V2"]
    assert mean_bits([(8, 4), (4, 2), (2, 2)]) == 22 / 6
    bad_specs = (
        ("kvtuner:pairs=K3V4", "2, 4 or 8"),
        ("kvtuner:pairs=K8", "not a pair"),
        ("kvtuner:budget=9", "budget"),
        ("kvtuner:scheme=kivi,residual=48", "multiple of group"),
    )
    for bad, msg in bad_specs:
        with pytest.raises(MethodSpecError, match=msg):
            build_method(bad)
    with pytest.raises(MethodSpecError, match="give 1 .all layers. or 3"):
        _method("kvtuner:pairs=K8V4,K4V2")


def test_pairs_give_each_layer_its_own_widths_bytes_by_hand():
    """pertoken: T = 10 tokens, H_kv = 2, D = 64, one fp16 scale + zero per token per head for K and V.
    Layer 0 K8V4: codes 2·10·64·(8 + 4)/8 = 1920 bytes; layer 1 K4V2: 960; layer 2 KV2: 640;
    scales 2·10·2·2 bytes for K and the same for V = 160 in every layer."""
    m = _method("kvtuner:pairs=K8V4,K4V2,KV2")
    assert m.layer_pairs == [(8, 4), (4, 2), (2, 2)]
    k, v = torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    for layer, (codes, kb, vb) in enumerate([(1920, 8, 4), (960, 4, 2), (640, 2, 2)]):
        store = m.new_layer_store(layer, INFO)
        assert isinstance(store, SeqPairStore) and (store.k.bits, store.v.bits) == (kb, vb)
        append_kv(store, k, v)
        r = store.memory()
        assert r.bytes["codes"] == codes and r.bytes["scales"] == 160 and r.total_bytes == codes + 160
        assert r.nominal_bits == (kb + vb) / 2
    one = _method("kvtuner:pairs=K4V2")  # one pair for every layer
    assert one.layer_pairs == [(4, 2)] * 3


def test_kivi_scheme_bytes_by_hand():
    """kivi: group 32, residual 32, T = 64 prefill: all 64 keys quantized per channel (2 groups of 32 tokens),
    the first 32 values quantized per token (2 groups of 32 channels), the last 32 values fp16.
    K8V2 layer: key codes 2·64·64 = 8192, key scale+zero 2·2·64·2·2 = 1024; value codes 2·32·64·2/8 = 1024,
    value scale+zero 2·32·2·2·2 = 512; fp16 values 2·32·64·2 = 8192."""
    m = _method("kvtuner:scheme=kivi,pairs=K8V2")
    store = m.new_layer_store(1, INFO)
    assert isinstance(store, KIVIPairStore) and (store.k_q.bits, store.v_q.bits) == (8, 2)
    append_kv(store, torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64))
    assert store.key_counts == (64, 0) and store.value_counts == (32, 32)
    r = store.memory()
    assert r.bytes["codes"] == 8192 + 1024 and r.bytes["scales"] == 1024 + 512 and r.bytes["fp_tokens"] == 8192


def test_integer_zero_grid_by_hand():
    """x = [-0.9, 0.1, 0.2, 2.1], 2 bits: s = 3/3 = 1, z = s·round(-0.9) = -1, q = clamp(round(x + 1), 0, 3) =
    [0, 1, 1, 3] -> x̂ = [-1, 0, 0, 2] (0 is a level); the float grid (z = min) gives [-0.9, 0.1, 0.1, 2.1]."""
    x = torch.tensor([[[[-0.9, 0.1, 0.2, 2.1]]]])
    q = quantize_integer_zero(x, 2, 4, -1)
    assert q.scale.item() == 1.0 and q.zero.item() == -1.0
    assert q.dequantize().flatten().tolist() == [-1.0, 0.0, 0.0, 2.0]
    flt = quantize(x, 2, 4, -1).dequantize().flatten()
    assert torch.allclose(flt, torch.tensor([-0.9, 0.1, 0.1, 2.1]), atol=1e-3)


def _official(x: torch.Tensor, nbits: int, group: int, axis: int) -> torch.Tensor:
    """Independent transcription of KVTuner's ``VanillaQuantizer.quantize`` + ``dequantize`` (asym), fp32:
    axis 1 = per channel (transpose, groups of ``group`` tokens), group -1 = the whole last dim."""
    t = x.transpose(-2, -1) if axis == 1 else x
    rs = t.reshape(-1, t.shape[-1] if group == -1 else group)
    q_max, q_min = 2 ** (nbits - 1) - 1, -(2 ** (nbits - 1))
    mx, mn = rs.max(dim=1).values, rs.min(dim=1).values
    scale = (mx - mn).clamp(min=1e-5).div(q_max - q_min)
    zeros = (mn / scale).round() - q_min
    q = torch.round(rs / scale.unsqueeze(1) - zeros.unsqueeze(1)).clip(q_min, q_max)
    d = ((q + zeros.unsqueeze(1)) * scale.unsqueeze(1)).view(t.shape)
    return d.transpose(-2, -1) if axis == 1 else d


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_grid_matches_the_official_quantizer(bits):
    """[1, 3, 256, 64], channels 3, 17, 40 scaled ×20. Measured (MSE ours / official's): per token over the
    head 0.99997 / 1.00001 / 1.0006 at 2 / 4 / 8 bits; KIVI keys per channel (32 tokens) 1.00001 / 0.99991 /
    0.9967; values per 32 channels 0.99995 / 0.99997 / 1.0014. Elements differing by more than 1e-3·max|x|
    (at most 1.7 %, 8-bit per token) sit on a rounding boundary moved by the fp16 scale / zero: one step
    apart (max diff 4.4 at 4 bits, where a step is ~ 80 / 15); the others differ by the fp16 rounding of z.
    The harness's float grid (x̂ = q·s + min) is 8.2× / 1.22× the official MSE per token at 2 / 4 bits on
    these tensors: zero as a level matters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 256, 64, generator=g)
    x[..., [3, 17, 40]] *= 20
    for official, ours, maxfrac in (
        (_official(x, bits, -1, 0), quantize_integer_zero(x, bits, 64, -1), 0.02),
        (_official(x, bits, 32, 1), quantize_integer_zero(x, bits, 32, -2), 0.002),
        (_official(x, bits, 32, 0), quantize_integer_zero(x, bits, 32, -1), 0.02),
    ):
        mine = ours.dequantize(torch.float32)
        ratio = ((mine - x) ** 2).mean() / ((official - x) ** 2).mean()
        assert abs(ratio.item() - 1) < 0.01
        step = ours.scale.float().max().item()
        assert (mine - official).abs().max().item() <= step * 1.01
        assert ((mine - official).abs() > 1e-3 * x.abs().max()).float().mean().item() < maxfrac
    if bits == 2:
        flt = quantize(x, 2, 64, -1).dequantize(torch.float32)
        assert ((flt - x) ** 2).mean() > 4 * ((_official(x, 2, -1, 0) - x) ** 2).mean()


def _table(rows: dict[int, dict[str, float]]) -> torch.Tensor:
    names = [pair_name(p) for p in CANDIDATES]
    return torch.tensor([[rows[i][n] for n in names] for i in sorted(rows)])


#: a hand-made sensitivity table (error per pair): layer 0 "key-sensitive", layer 1 value-sensitive
HAND = {
    0: dict(KV8=0.01, K8V4=0.02, K4V8=0.30, K8V2=0.05, K2V8=0.90, KV4=0.10, K4V2=0.12, K2V4=0.95, KV2=1.0),
    1: dict(KV8=0.01, K8V4=0.20, K4V8=0.03, K8V2=0.60, K2V8=0.08, KV4=0.25, K4V2=0.70, K2V4=0.30, KV2=0.80),
}


def test_intra_layer_pruning_on_a_hand_table():
    """Layer 0: K4V8 (6 bits, 0.30) is dominated by K8V4 (6 bits, 0.02); K2V8 (5, 0.90) by K8V2 (5, 0.05);
    KV4 (4, 0.10) and K8V2 (5, 0.05) stay; K2V4 (3, 0.95) by K4V2 (3, 0.12); KV2 stays (fewest bits).
    Layer 1: K8V4 by K4V8; K8V2 by K2V8; KV4 (4, 0.25) stays; K4V2 (3, 0.70) by K2V4 (3, 0.30);
    K2V8 (5, 0.08) stays; KV2 (2, 0.80) stays."""
    kept = prune_pairs(_table(HAND))
    names = [[pair_name(CANDIDATES[p]) for p in k] for k in kept]
    assert names[0] == ["KV8", "K8V4", "K8V2", "KV4", "K4V2", "KV2"]
    assert names[1] == ["KV8", "K4V8", "K2V8", "KV4", "K2V4", "KV2"]
    # a pair with more bits and more error than another is dropped even at different bits
    worse = {0: {**HAND[0], "KV8": 0.5}}
    assert pair_name(CANDIDATES[prune_pairs(_table(worse))[0][0]]) == "K8V4"


def test_inter_layer_clustering_on_a_hand_table():
    """Six layers: 0, 2, 4 key-sensitive like HAND[0] (errors ×1, ×1.1, ×8), 1, 3 value-sensitive like HAND[1]
    (×1, ×1.05), 5 like HAND[0] ×1.2. Candidate lists split {0, 2, 4, 5} from {1, 3}: never merged. With 3
    groups the two lists' layers group apart, and 4 (8× the errors) stays alone; with 1 group asked,
    the two lists still give 2 groups."""
    scaled = lambda row, f: {k: v * f for k, v in row.items()}  # noqa: E731
    rows = {0: HAND[0], 1: HAND[1], 2: scaled(HAND[0], 1.1), 3: scaled(HAND[1], 1.05), 4: scaled(HAND[0], 8)}
    rows[5] = scaled(HAND[0], 1.2)
    errors = _table(rows)
    kept = prune_pairs(errors)
    assert kept[0] == kept[2] == kept[4] == kept[5] and kept[1] == kept[3] and kept[0] != kept[1]
    assert cluster_layers(errors, kept, 3) == [[0, 2, 5], [1, 3], [4]]
    assert cluster_layers(errors, kept, 1) == [[0, 2, 4, 5], [1, 3]]
    assert cluster_layers(errors, kept, 6) == [[i] for i in range(6)]


def test_uniform_choices_take_each_level_every_group_holds():
    """Group 0 holds 8, 6, 4, 3, 2 bits; group 1 holds 8, 5, 4, 2: the shared levels 8, 4, 2, each group at
    its own index of that level."""
    t0 = parse_pairs("KV8,K8V4,KV4,K4V2,KV2")
    t1 = parse_pairs("KV8,K8V2,KV4,KV2")
    assert uniform_choices([t0, t1]) == [[0, 0], [2, 2], [4, 3]]
    assert uniform_choices([t0]) == [[0], [1], [2], [3], [4]]
    assert uniform_choices([parse_pairs("KV8"), parse_pairs("KV4")]) == []


@pytest.fixture(scope="module")
def tiny():
    model = tiny_random_model("llama", head_dim=32, num_hidden_layers=4, initializer_range=0.1)
    g = torch.Generator().manual_seed(1)
    return model, [torch.randint(0, model.config.vocab_size, (1, 64), generator=g) for _ in range(2)]


def test_search_end_to_end_deterministic_within_budget(tiny):
    """The whole search on a 4-layer random model, 2 windows of 64 tokens, 10 NSGA-II trials per budget:
    the same seed gives the same file; every shipped pair list respects its budget and uses only its
    group's candidates; the shipped NLL is the calibration NLL of those pairs."""
    from baselines.kvtuner import calibration_nll

    model, windows = tiny
    a = search(model, windows, [5.0, 3.0], trials=10, groups=2, seed=0)
    b = search(model, windows, [5.0, 3.0], trials=10, groups=2, seed=0)
    assert a == b
    assert len(a["groups"]) <= 2 and sorted(sum(a["groups"], [])) == [0, 1, 2, 3]
    templates = [parse_pairs(",".join(t)) for t in a["templates"]]
    for key, entry in a["budgets"].items():
        pairs = parse_pairs(",".join(entry["pairs"]))
        assert len(pairs) == 4 and mean_bits(pairs) <= float(key) and entry["mean_bits"] == mean_bits(pairs)
        for group, template in zip(a["groups"], a["templates"], strict=True):
            assert len({pairs[i] for i in group}) == 1 and pair_name(pairs[group[0]]) in template
        m = KVTuner(KVTunerConfig(pairs=",".join(entry["pairs"])))
        assert calibration_nll(model, windows, m) == pytest.approx(entry["nll"], rel=1e-6)
        # the uniform-bits configurations within the budget were tried first: the pick is no worse
        uniform = [[t[c] for t, c in zip(templates, choice, strict=True)] for choice in uniform_choices(templates)]
        uniform = [u for u in uniform if sum(k + v for k, v in u) / (2 * len(u)) <= float(key)]
        assert uniform and entry["enqueued"] == [",".join(map(pair_name, dict.fromkeys(u))) for u in uniform]
        for u in uniform:
            layer_pairs = [u[next(g for g, ls in enumerate(a["groups"]) if i in ls)] for i in range(4)]
            m = KVTuner(KVTunerConfig(pairs=",".join(map(pair_name, layer_pairs))))
            assert entry["nll"] <= calibration_nll(model, windows, m) + 1e-9
    plain = search(model, windows, [8.0], trials=2, groups=2, seed=0, enqueue_uniform=False)  # all feasible
    assert plain["budgets"]["8"]["enqueued"] == [] and plain["enqueue_uniform"] is False


def _write_config(path, pairs: list[str], budget: str = "4", scheme: str = "pertoken") -> None:
    data = {"format": CONFIG_FORMAT, "model": "tiny", "schemes": {scheme: {"budgets": {budget: {"pairs": pairs}}}}}
    path.write_text(json.dumps(data))


def test_shipped_configuration_lookup_and_its_one_line_error(tiny, tmp_path, monkeypatch):
    model, windows = tiny
    with pytest.raises(MethodSpecError) as e:  # nothing ships for this model
        AttachedMethod(model, build_method("kvtuner-3"))
    line = str(e.value)
    assert "\n" not in line and "llama-L4-D64" in line and "budget=3" in line
    assert "python -m baselines.kvtuner search --model" in line and "--budget 3 --scheme pertoken" in line
    path = tmp_path / "conf.json"
    _write_config(path, ["K8V4", "K4V2", "KV2", "K2V4"])
    m = build_method(f"kvtuner:config={path}")
    with AttachedMethod(model, m) as am:
        assert m.layer_pairs == [(8, 4), (4, 2), (2, 2), (2, 4)]
        cache = am.new_cache()
        forward(model, windows[0], cache)
        assert [(s.k.bits, s.v.bits) for s in cache.stores] == m.layer_pairs
    with pytest.raises(MethodSpecError, match="budget=3, scheme=pertoken"):  # the file lacks that budget
        AttachedMethod(model, build_method(f"kvtuner:config={path},budget=3"))
    with pytest.raises(MethodSpecError, match="scheme=kivi"):
        AttachedMethod(model, build_method(f"kvtuner:config={path},scheme=kivi"))
    _write_config(path, ["K8V4", "K4V2"])
    with pytest.raises(MethodSpecError, match="holds 2 layers' pairs; this model has 4"):
        AttachedMethod(model, build_method(f"kvtuner:config={path}"))
    path.write_text("not json")
    with pytest.raises(MethodSpecError, match="is not JSON"):
        AttachedMethod(model, build_method(f"kvtuner:config={path}"))
    # the shipped folder is where the method looks without config=
    import baselines.kvtuner as kt

    monkeypatch.setattr(kt, "CONFIG_DIR", tmp_path)
    _write_config(tmp_path / "llama-L4-D64.json", ["KV4"] * 4, budget="3")
    m = build_method("kvtuner-3")
    with AttachedMethod(model, m):
        assert m.layer_pairs == [(4, 4)] * 4


def test_record_key_follows_the_searched_pairs(tmp_path, monkeypatch):
    """kvtuner-4's key holds a digest of the pairs it reads: a new search (other pairs at that budget and
    scheme) gives a new record file; another budget's or scheme's entry and given pairs do not."""
    import baselines.kvtuner as kt
    from harness.evaluation import build_task
    from harness.runner import record_key, record_path

    monkeypatch.setattr(kt, "CONFIG_DIR", tmp_path)
    task = build_task("wikitext2")

    def key_of(spec: str) -> tuple[dict, str]:
        key = record_key("m", "float32", "cpu", build_method(spec), task)
        return key["method_config"], record_path(tmp_path, key, spec).name

    _write_config(tmp_path / "llama-L4-D64.json", ["KV4"] * 4)
    first, first_file = key_of("kvtuner-4")
    assert len(first["searched"]) == 10 and key_of("kvtuner-4") == (first, first_file)
    _write_config(tmp_path / "llama-L4-D64.json", ["KV4"] * 4, budget="3")  # budget 4's entry gone
    assert key_of("kvtuner-4")[1] != first_file
    _write_config(tmp_path / "llama-L4-D64.json", ["K8V4", "K4V2", "KV4", "KV4"])
    second, second_file = key_of("kvtuner-4")
    assert second["searched"] != first["searched"] and second_file != first_file
    assert key_of("kvtuner-4")[0] == key_of("kvtuner:budget=4")[0]  # the variant is the spec
    data = json.loads((tmp_path / "llama-L4-D64.json").read_text())
    data["schemes"]["kivi"] = {"budgets": {"4": {"pairs": ["KV2"] * 4}}}
    (tmp_path / "llama-L4-D64.json").write_text(json.dumps(data))
    assert key_of("kvtuner-4") == (second, second_file)  # another scheme's entry: the same key
    given = key_of("kvtuner:pairs=KV4")[0]
    assert "searched" not in given and set(given) == set(second) - {"searched"}  # the key it always had
    assert key_of("kvtuner-4:searched=abc")[0] == second  # always computed, never taken from the spec


def test_shipped_smollm2_configuration_is_the_documented_search():
    """Each scheme's entry: 30 valid pairs per budget within it, the pick on its study's front, and the
    search command the module docstring names."""
    import baselines.kvtuner as kt

    data = kt.read_config_file(kt.CONFIG_DIR / "llama-L30-D576.json")
    doc = " ".join(kt.__doc__.replace("\\\n", " ").split())
    assert "pertoken" in data["schemes"]
    for scheme, entry in data["schemes"].items():
        assert entry["command"] in doc and f"--scheme {scheme}" in entry["command"] and entry["enqueue_uniform"]
        for budget, e in entry["budgets"].items():
            pairs = parse_pairs(",".join(e["pairs"]))
            assert len(pairs) == 30 and e["mean_bits"] == mean_bits(pairs) <= float(budget)
            assert [round(e["mean_bits"], 4), round(e["nll"], 6)] in e["pareto_front"]


def test_search_command_writes_the_file_the_method_reads(stories_dir, data_dir, tmp_path):
    """``python -m baselines.kvtuner search`` on stories260K (5 layers) and the calibration split, 6 trials."""
    out = tmp_path / "kvtuner.json"
    argv = ["search", "--model", str(stories_dir), "--budget", "5", "--trials", "6", "--groups", "2",
            "--windows", "2", "--seqlen", "64", "--data-dir", str(data_dir), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    entry = data["schemes"]["pertoken"]
    assert entry["command"].startswith("python -m baselines.kvtuner search --model")
    assert len(entry["budgets"]["5"]["pairs"]) == 5 and entry["budgets"]["5"]["mean_bits"] <= 5
    m = build_method(f"kvtuner:budget=5,config={out}")
    m.check_model(ModelInfo("llama", 5, 8, 4, 8, 64, torch.float32, torch.device("cpu")))
    assert [pair_name(p) for p in m.layer_pairs] == entry["budgets"]["5"]["pairs"]
    assert main(["search", "--model", str(stories_dir), "--budget", "9", "--out", str(out)]) == 2
