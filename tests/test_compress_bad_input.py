"""`slimcnn compress` on input no method can use: one clear line on stderr, exit 2, nothing written."""
import pytest

from slimcnn.cli import main
from conftest import CIFAR, RESNET20

COMMON = ["--model", "cifar_resnet20", "--weights", str(RESNET20), "--data", str(CIFAR), "--train-limit", "64",
          "--test-limit", "50", "--latency-batch", "1"]


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln]  # the rest are progress bars
    assert code == 2 and len(errors) == 1 and lines[-1].startswith("slimcnn compress: error:"), lines
    return lines[-1]


@pytest.mark.parametrize("method", ["l1", "tp", "dagger", "csgd", "trp"])
def test_unreachable_target(method, capsys, tmp_path):
    out = tmp_path / "out"
    err = _one_line_error(capsys, ["compress", "--method", method, *COMMON, "--target-macs", "0.001",
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
