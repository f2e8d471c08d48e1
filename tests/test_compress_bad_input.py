"""`slimcnn compress` on input no method can use: one clear line on stderr, exit 2, nothing written."""
import pytest

from slimcnn.cli import main
from conftest import CIFAR, RESNET20, one_line_compress_error

COMMON = ["--model", "cifar_resnet20", "--weights", str(RESNET20), "--data", str(CIFAR), "--train-limit", "64",
          "--test-limit", "50", "--latency-batch", "1"]


@pytest.mark.parametrize("method", ["l1", "tp", "dagger", "csgd", "trp"])
def test_unreachable_target(method, capsys, tmp_path):
    out = tmp_path / "out"
    err = one_line_compress_error(capsys, ["compress", "--method", method, *COMMON, "--target-macs", "0.001",
                                   "--epochs", "1", "--out", str(out)])
    assert "MACs" in err
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--scheme", "tucker"), ("--scorer", "l7"), ("--method", "nope")])
def test_unknown_names(flag, value, capsys, tmp_path):
    argv = ["compress", "--method", "l1", *COMMON, "--out", str(tmp_path / "o"), flag, value]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
