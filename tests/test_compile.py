"""--compile: torch.compile of the model under the Booster trains the same as eager; refused under Gemini."""

import shutil

import pytest
from conftest import run_distributed
from test_train import TRAIN, _args, tb_scalars

from colossal_shear.core.config import parse
from colossal_shear.train.config import TrainConfig


@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile's inductor needs a C compiler (gcc) on CPU",
)
@pytest.mark.parametrize("plugin", ["zero2"])
def test_compiled_losses_match_eager(plugin, model_dir, dataset, tmp_path):  # noqa: F811
    losses, kernels = {}, {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        cache = tmp_path / name / "inductor"  # inductor writes its generated kernels here: proof it compiled
        run_distributed(
            TRAIN,
            *_args(model_dir, dataset, tmp_path / name, "--plugin", plugin, *extra, steps=3),
            timeout=900,
            env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
        )
        losses[name] = tb_scalars(tmp_path / name / "tb")
        kernels[name] = list(cache.rglob("*.py")) if cache.exists() else []
    assert kernels["compiled"] and not kernels["eager"]
    assert sorted(losses["compiled"]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses["compiled"][step] == pytest.approx(losses["eager"][step], abs=1e-4, rel=1e-5), losses


@pytest.mark.parametrize("plugin", ["gemini", "gemini_auto"])
def test_compile_refused_under_gemini(plugin):
    with pytest.raises(Exception, match="--compile cannot be used with --plugin gemini"):
        parse(TrainConfig, ["--compile", "--plugin", plugin])
