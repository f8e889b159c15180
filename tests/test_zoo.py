"""The zoo of pyro_kfacvi.experiments.zoo with the library's defaults only (``KroneckerNormal(model)``,
``KFACVI(model, guide)``): each problem trains without divergence and meets its criterion, for
several seeds; and the quick preset trains on 2,000 CIFAR-10 images."""
import pytest

from pyro_kfacvi.experiments import cli
from pyro_kfacvi.experiments.zoo import PROBLEMS


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["gap", "tabular", "spiral", "batchnorm-cnn"])
def test_small_problems_train_with_the_defaults(one_thread, name, seed):
    result = PROBLEMS[name].run(seed)
    assert "diverged" not in result, result
    assert result["passed"], result


def test_torchvision_resnet18_steps_at_32x32_with_the_defaults(one_thread):
    result = PROBLEMS["resnet18"].run(0)
    assert "diverged" not in result and result["final_loss"] < float("inf"), result


@pytest.mark.parametrize("seed", [0, 1])
def test_the_quick_preset_trains_on_2000_images(tmp_path, capsys, cifar10_root, seed):
    """It diverged at iterations 16-20 for every seed before the trust region (docs/robustness.md)."""
    code = cli.main(["train", "--preset", "quick", "--train-subset", "2000", "--epochs", "1", "--seed", str(seed),
                     "--threads", "1", "--no-progress", "--data-dir", str(cifar10_root), "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0, out
    accuracy = float(out.split("final (S=10): test_acc ")[1].split()[0])
    assert accuracy > 0.15
