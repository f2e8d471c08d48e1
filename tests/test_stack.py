"""Stacked compression (slimcnn/methods/stack.py): a channel method then TRP, one MACs target, one epoch budget.

Real data and the public trained ResNet-20; tiny subsets and 1-2 short epochs, so only correctness is checked:
the final MACs land within 1% of the target, the report has one entry per stage, the saved model loads back to
the same outputs, and bad input is one clear line with exit 2 and nothing written.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import slimcnn
from slimcnn import methods
from slimcnn.cli import main
from slimcnn.compress import CompressConfig, compress, split_budget
from slimcnn.methods.stack import Stack, stack_class
from conftest import CIFAR, RESNET20, shuffled_loader, one_line_compress_error

COMMON = ["--model", "cifar_resnet20", "--weights", str(RESNET20), "--data", str(CIFAR), "--train-limit", "64",
          "--test-limit", "64", "--latency-batch", "1", "--no-latency", "--bn-recalib", "2",
          "--no-latency-plan"]  # the stack's split search and stages on MACs: no layer timing (tests/test_trp_latency.py)


def _trained_resnet20() -> torch.nn.Module:
    from slimcnn.models import create, load_checkpoint

    return load_checkpoint(create("cifar_resnet20"), RESNET20)


def test_registry_and_budget():
    m = methods.create("dagger+trp", target_macs=0.5, scheme="spatial", round_to=None)
    assert isinstance(m, Stack) and m.name == "dagger+trp" and m.stages == ("dagger", "trp")
    assert m.stage_options[1] == {"scheme": "spatial"}
    # a stack's l1 stage ranks channels globally unless told otherwise
    assert methods.create("l1+trp").stage_options[0] == {"mode": "global"}
    assert methods.create("l1+trp", mode="uniform").stage_options[0] == {"mode": "uniform"}
    assert methods.method_class("l1+trp") is stack_class("l1+trp")
    assert set(methods.list_stacks()) == {"l1+trp", "dagger+trp", "csgd+trp", "tp+trp"}
    # the channel stage: its recipe's share of half the epochs before TRP's finalize; TRP trains the rest
    assert stack_class("dagger+trp").stage_epochs(4) == (1, 3)
    # C-SGD trains in the same steps as TRP: both get every epoch
    assert stack_class("csgd+trp").stage_epochs(4) == (4, 4) and stack_class("csgd+trp").concurrent()
    assert stack_class("l1+trp").stage_epochs(3) == (0, 3)
    assert split_budget(stack_class("dagger+trp"), 5) == (5, 0)  # TRP's recipe: no fine-tune after it
    with pytest.raises(ValueError, match="dagger\\+trp needs at least 2 epoch"):
        split_budget(stack_class("dagger+trp"), 1)
    with pytest.raises(TypeError, match="no stage"):
        methods.create("l1+trp", target_macs=0.5, lambda_flops=1.0)  # a Dagger option, not l1's or trp's
    with pytest.raises(ValueError, match="split must be in"):
        methods.create("l1+trp", split=1.0)


@pytest.mark.parametrize("name", ["dagger+trp", "csgd+trp"])
def test_trained_stage_lands_on_target_with_trained_weights(name, tiny, tmp_path):
    """Stage 1 trains (Dagger's gate search inside prepare, C-SGD beside TRP in the pipeline); MACs within 1% of the
    one target; the stacked model saves and loads back to the same outputs."""
    model = _trained_resnet20()
    train = shuffled_loader(tiny)
    test = shuffled_loader(tiny.subset(torch.arange(32)))
    m = methods.create(name, target_macs=0.4, split=0.5, scheme="spatial")
    me, ft = split_budget(m, 2)
    cfg = CompressConfig(target_macs=0.4, method_epochs=me, epochs=ft, latency=False, bn_recalib=2)
    compact, rep = compress(model, m, train, test, (3, 32, 32), cfg, "cifar_resnet20")
    assert rep["within_tol"] is True and abs(rep["macs_ratio"] - 0.4) <= 0.004
    assert slimcnn.profile(compact, (3, 32, 32)).macs == rep["compressed"]["macs"]
    s1, s2 = rep["stages"]
    assert (s1["method"], s2["method"]) == tuple(name.split("+"))
    assert (s1["epochs"], s2["epochs"]) == ((2, 2) if name == "csgd+trp" else (1, 1))
    assert abs(s1["macs_ratio"] - 0.4 ** 0.5) <= 0.01 * 0.4 ** 0.5  # the channel stage at target**split
    assert s2["macs"] == rep["compressed"]["macs"] and s1["macs"] > s2["macs"]
    # each stage's top-1 is on the 32 test images: a whole number of them right (a 0..100 range check cannot fail)
    for s in (s1, s2):
        right = s["top1"] * 32 / 100
        assert abs(right - round(right)) < 0.01 and s["time_s"] >= 0, s
    assert rep["stack"]["split"] == 0.5 and rep["stack"]["split_source"] == "given"
    assert rep["epoch_budget"]["total_epochs"] == 2
    assert any(isinstance(mod, torch.nn.Sequential) for mod in compact.modules())  # TRP factorised convs
    slimcnn.save(compact, tmp_path / "m")
    loaded = slimcnn.load(tmp_path / "m").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), compact.eval()(x), rtol=0, atol=1e-6)


def test_concurrent_csgd_finalize_is_exact_once_clusters_meet(tiny):
    """csgd+trp trains C-SGD and TRP in the same steps: prepare changes no structure and plans TRP's ranks on the
    net the merge will produce. Once the clusters have met (made equal here, as training makes them), TRP's
    truncation (in float64 in a stack) keeps them equal to C-SGD's bar, so the merge is reported lossless, and the
    merge plus the factorisation change no output (to float32 rounding)."""
    from slimcnn.methods.csgd import cluster_lists

    model = _trained_resnet20().eval()
    x = torch.randn(4, 3, 32, 32)
    m = methods.create("csgd+trp", target_macs=0.4, split=0.5, scheme="spatial")
    cfg = CompressConfig(target_macs=0.4, method_epochs=1, epochs=0, latency=False)
    work = m.prepare(copy.deepcopy(model), x, train_loader=shuffled_loader(tiny), cfg=cfg)
    base_macs = slimcnn.profile(model, (3, 32, 32)).macs
    assert m.epochs_in_prepare == 0 and slimcnn.profile(work, (3, 32, 32)).macs == base_macs  # no surgery yet
    assert m.first.ids and m.last._fixed  # clusters to meet, ranks to keep
    assert m.last.svd_dtype == torch.float64
    clusters = {key: cluster_lists(ids) for key, ids in m.first.ids.items()}
    m.first.graph.equalize(clusters, model=work)
    m.before_forward(work, 0)  # TRP's truncation to its planned ranks, on the unmerged convs
    # equal rows stay equal (the projection acts on each filter alone) to within C-SGD's bar for a lossless merge;
    # TRP's float32 SVD left them up to 7e-5 apart here
    assert max(m.first.cluster_distances(work).values()) <= m.first.converged_distance
    with torch.no_grad():
        before = work.eval()(x)
        thin = m.finalize(work).eval()
        after = thin(x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    s1, s2 = m.report()["stages"]
    assert s1["details"]["merge"]["lossless"] is True and "warning" not in s1["details"]["merge"]
    assert s1["macs"] > s2["macs"] and s1["top1"] is None  # no test loader given
    assert abs(slimcnn.profile(thin, (3, 32, 32)).macs / base_macs - 0.4) <= 0.004


def test_cli_searched_split_report_and_roundtrip(tmp_path):
    """`slimcnn compress --method l1+trp` with the split searched: report per stage, every split tried, MACs within
    1%, and the saved model loads back to the same outputs."""
    out = tmp_path / "out"
    assert main(["compress", "--method", "l1+trp", *COMMON, "--target-macs", "0.5", "--epochs", "1",
                 "--scheme", "spatial", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "l1+trp" and rep["within_tol"] is True
    assert [s["method"] for s in rep["stages"]] == ["l1", "trp"]
    search = rep["stack"]["search"]
    assert rep["stack"]["split_source"] == "searched" and rep["stack"]["split"] == search["chosen"]
    assert [t["split"] for t in search["tried"]] == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert search["proxy"].startswith("l1 (global, no training)")  # the stack's l1 stage ranks globally
    for t in search["tried"]:  # every split tried lands on the target too (TRP plans at the overall target)
        assert "error" in t or abs(t["macs_ratio"] - 0.5) <= 0.005
    best = max((t for t in search["tried"] if "top1" in t), key=lambda t: t["top1"])
    assert best["split"] == search["chosen"]
    alone = search["alone"]  # the no-stack reference, and the warning exactly when it wins
    assert alone["method"] == "trp" and 0 <= alone["top1"] <= 100
    assert ("warning" in search) == (alone["top1"] > best["top1"])
    md = (out / "report.md").read_text()
    assert "| 1 | l1 |" in md and "| 2 | trp |" in md and "split 0.5" in md and "trp alone" in md
    model = slimcnn.load(out).eval()
    assert slimcnn.profile(model, (3, 32, 32)).macs == rep["compressed"]["macs"]
    x = torch.randn(4, 3, 32, 32)
    slimcnn.save(model, tmp_path / "copy")
    with torch.no_grad():
        assert torch.allclose(slimcnn.load(tmp_path / "copy").eval()(x), model(x), rtol=0, atol=1e-6)


def test_min_keep_floors_the_channel_stage(tmp_path):
    """--min-keep reaches a stack's channel stage: with the residual streams floored at 1.0 (the stem and every
    block's conv2), l1 thins only the blocks' inner channels; TRP then factorises every conv and keeps its width."""
    out = tmp_path / "out"
    assert main(["compress", "--method", "l1+trp", *COMMON, "--target-macs", "0.5", "--epochs", "1",
                 "--scheme", "spatial", "--split", "0.5", "--min-keep", "conv1=1.0", "--min-keep", "*.conv2=1.0",
                 "--out", str(out)]) == 0  # on MACs alone (COMMON) TRP factorises every conv
    rep = json.loads((out / "report.json").read_text())
    assert rep["within_tol"] is True and rep["layer_control"]["floors"]["conv1"] == 16
    model = slimcnn.load(out)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    stream = {"layer1": 16, "layer2": 32, "layer3": 64}
    ends = [n for n in convs if n.endswith(".conv2.1")]  # each block's conv2, factorised: its second factor
    assert len(ends) == 9 and all(convs[n].out_channels == stream[n.split(".")[0]] for n in ends)
    inner = [convs[n].out_channels / stream[n.split(".")[0]] for n in convs if n.endswith(".conv1.1")]
    assert len(inner) == 9 and max(inner) < 1  # the MACs came off the inner channels


@pytest.mark.parametrize("argv,says", [
    (["--method", "trp+trp"], "first stage must be a channel method"),
    (["--method", "foo+trp"], "unknown stage 'foo'"),
    (["--method", "l1+trp", "--split", "0"], "split must be in (0, 1)"),
    (["--method", "l1+trp", "--split", "1.5"], "split must be in (0, 1)"),
    (["--method", "dagger", "--split", "0.5"], "--split applies only to a stack"),
    (["--method", "tp+trp", "--min-keep", "conv1=1.0"], "tp+trp does not support --min-keep"),
])
def test_bad_input(argv, says, capsys, tmp_path):
    out = tmp_path / "out"
    err = one_line_compress_error(capsys, ["compress", *argv, *COMMON, "--epochs", "2", "--out", str(out)])
    assert says in err
    assert not out.exists()
