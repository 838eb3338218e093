"""Real ColossalAI Booster training on 2 CPU processes over gloo, for every plugin that can run on the CPU.

Each run trains the tiny Llama for 4 steps on a repeated batch (a different batch per data-parallel rank). The
properties: the loss falls; the mean loss over data-parallel ranks follows, step for step, a plain single-process
PyTorch run on the union of the ranks' batches (same AdamW, same clipping) in fp32; parameters are identical on every
data-parallel rank; and the sharded checkpoint the Booster saves loads with plain `from_pretrained` and holds the
same weights as the plain run.
"""

import json
import sys

import pytest
import torch
from conftest import ROOT, run_distributed
from transformers import LlamaForCausalLM

sys.path.insert(0, str(ROOT / "tests" / "workers"))
from booster_steps import batch_for  # noqa: E402

WORKER = ROOT / "tests" / "workers" / "booster_steps.py"
STEPS, LR = 4, 3e-3

CASES = {
    "ddp": ["--plugin", "ddp"],
    "zero2": ["--plugin", "zero2"],
    "zero2_cpu": ["--plugin", "zero2_cpu"],
    "3d_tp2": ["--plugin", "3d", "--tp", "2"],
    "3d_pp2": ["--plugin", "3d", "--pp", "2"],
}
DATA_PARALLEL = {"ddp", "zero2", "zero2_cpu"}


def plain_reference(model_dir, dp_ranks):
    """Single process, no ColossalAI: what every plugin must reproduce."""
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    batches = [batch_for(r, model.config.vocab_size) for r in dp_ranks]
    data = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.fixture(scope="module")
def references(model_dir):
    return {"dp2": plain_reference(model_dir, [0, 1]), "dp1": plain_reference(model_dir, [0])}


@pytest.mark.parametrize("case", list(CASES))
def test_plugin_trains_like_plain_pytorch(case, model_dir, references, tmp_path):
    launcher = "colossalai" if case == "ddp" else "torchrun"  # users launch both ways
    save = tmp_path / "saved"
    run_distributed(
        WORKER,
        "--model",
        model_dir,
        "--out",
        tmp_path,
        "--steps",
        STEPS,
        "--lr",
        LR,
        "--save_dir",
        save,
        *CASES[case],
        launcher=launcher,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    ref_losses, ref_state = references["dp2" if case in DATA_PARALLEL else "dp1"]
    per_rank = [r["losses"] for r in ranks if r["losses"][0] is not None]  # pipeline: loss on the last stage only
    dp_ranks = {r["dp_rank"] for r in ranks}
    mean = [sum(rank_losses[s] for rank_losses in per_rank) / len(per_rank) for s in range(STEPS)]
    assert mean[-1] < mean[0] - 0.3, f"loss did not fall: {mean}"
    assert mean == pytest.approx(ref_losses, abs=2e-4), f"{case} diverges from plain PyTorch: {mean} vs {ref_losses}"

    if case in DATA_PARALLEL:
        assert dp_ranks == {0, 1}
        assert ranks[0]["digest"] == ranks[1]["digest"], "parameters differ across data-parallel ranks"
        for r in ranks:  # each rank's first loss is a plain forward on its own batch
            assert r["losses"][0] == pytest.approx(r["reference_loss"], abs=1e-5)

    loaded = LlamaForCausalLM.from_pretrained(save, torch_dtype=torch.float32).state_dict()
    assert loaded.keys() == ref_state.keys()
    worst = max((loaded[k] - ref_state[k]).abs().max().item() for k in ref_state)
    assert worst < 1e-4, f"saved weights differ from the plain run by {worst}"


@pytest.mark.parametrize("plugin", ["gemini", "gemini_auto"])
def test_gemini_refused_on_cpu_before_any_work(plugin, model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gemini runs")
    with pytest.raises(AssertionError) as err:
        run_distributed(WORKER, "--model", model_dir, "--out", tmp_path, "--plugin", plugin, "--precision", "bf16")
    message = str(err.value)
    assert f"--plugin {plugin} cannot run on this CPU-only machine" in message
    assert "CUDA" in message
    assert not list(tmp_path.iterdir()), "work was done before the refusal"
