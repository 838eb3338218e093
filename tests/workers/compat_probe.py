"""Tries, in one CPU process of a gloo world of one, each operation colossal_shear.compat repairs, and prints a JSON
map {patch name: "ok" | "<error>"}. Run with --with-compat to install the patches first."""

import json
import os
import pickle
import sys
import traceback

import torch


def probe_hccl_probe():
    from colossalai.pipeline.p2p import _check_for_nccl_hccl_backend

    _check_for_nccl_hccl_backend(None)


def probe_cpu_rng():
    from colossalai.accelerator import get_accelerator

    acc = get_accelerator()
    state = acc.get_rng_state("cpu")
    acc.manual_seed(3)
    a = torch.rand(2)
    acc.set_rng_state(state, "cpu")
    acc.manual_seed(3)
    assert torch.equal(a, torch.rand(2))


def probe_cpu_streams():
    from colossalai.zero.low_level.bookkeeping.bucket_store import BucketStore

    BucketStore(torch.distributed.group.WORLD, reduce_bucket_size=1024)


def probe_cpu_memory_stats():
    from colossalai.accelerator import get_accelerator

    get_accelerator().max_memory_allocated()
    get_accelerator().empty_cache()


def probe_zero_on_cpu():
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    model = torch.nn.Linear(4, 4)
    opt = LowLevelZeroOptimizer(torch.optim.AdamW(model.parameters()), overlap_communication=False, partition_grad=True)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()


class Payload:
    """A pickled object that is not a tensor: what weights_only loading must refuse."""


def probe_checkpoint_file_io():
    import tempfile
    from pathlib import Path

    from colossalai.checkpoint_io.utils import load_shard_state_dict, save_state_dict

    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # torch's default flipped back to full unpickling
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "pytorch_optim-00001.bin"
        torch.save({"state": Payload()}, shard)
        try:
            load_shard_state_dict(shard)
        except pickle.UnpicklingError:
            pass
        else:
            raise AssertionError("an optimizer shard holding a pickled object was loaded")
    try:
        save_state_dict({"w": torch.zeros(1 << 16)}, "/dev/full", use_safetensors=False)
    except Exception as e:  # the OSError may be the error itself or its context
        assert isinstance(e, OSError) or isinstance(e.__context__, OSError), f"no OS reason in: {e!r}"


def probe_padded_vocab_checkpoint():
    from colossalai.checkpoint_io.utils import search_tp_partition_dim
    from colossalai.tensor.padded_tensor import to_padded_tensor, to_unpadded_tensor

    weight = to_padded_tensor(torch.nn.Parameter(torch.ones(3000, 4)), 3008, 0)
    assert to_unpadded_tensor(weight.detach()).shape == (3000, 4)
    assert search_tp_partition_dim(torch.Size([1536, 4]), torch.Size([3000, 4]), 2) == 0


def probe_strict_shapes():
    from colossalai.checkpoint_io.utils import load_state_dict_into_model

    model = torch.nn.Linear(4, 4)
    try:  # a checkpoint of another shape (intermediate_size 8 against 4)
        load_state_dict_into_model(model, {"weight": torch.ones(8, 4), "bias": torch.ones(8)}, [], strict=True)
    except RuntimeError as e:
        assert "size mismatch" in str(e), str(e)
        return
    raise AssertionError("a state dict of another shape loaded with strict=True without an error")


def probe_qwen2_padded_head():
    """A tied Qwen2 whose vocabulary (1000) shardformer pads (to 1024), sharded for tensor parallelism: its loss must
    be the model's own."""
    from colossalai.shardformer import ShardConfig, ShardFormer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from colossal_shear.core import compat

    compat.cpu_rng()  # tensor-parallel layers seed through the accelerator: that failure is cpu_rng's, not this one's

    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        true_loss = model(input_ids=ids, labels=ids).loss.item()
    shard = ShardConfig(
        tensor_parallel_process_group=torch.distributed.group.WORLD,
        enable_tensor_parallelism=True,
        enable_fused_normalization=False,
    )
    sharded, _ = ShardFormer(shard).optimize(model)
    with torch.no_grad():
        loss = sharded(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - true_loss) < 1e-5, f"sharded loss {loss:.5f} != the model's {true_loss:.5f}"


def main():
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
    )
    import colossalai

    if "--with-compat" in sys.argv:
        from colossal_shear.core import compat

        compat.install()
    colossalai.launch_from_torch(
        backend="gloo", seed=1, verbose=False
    ) if "--with-compat" in sys.argv else torch.distributed.init_process_group("gloo")
    results = {}
    for name, fn in list(globals().items()):
        if name.startswith("probe_"):
            try:
                fn()
                results[name[len("probe_") :]] = "ok"
            except Exception as e:  # the failure is the datum
                results[name[len("probe_") :]] = (
                    f"{type(e).__name__}: {e}".splitlines()[0][:300] or traceback.format_exc().splitlines()[-1]
                )
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
