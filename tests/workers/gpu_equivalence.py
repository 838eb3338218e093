"""Worker for tests/test_gpu.py (one GPU): loss and gradients of FlexAttention (compiled, training), flash-attn
(when installed; bf16, as flash-attn has no fp32 kernels) and the chunked LM loss against the dense-mask SDPA
reference with the model's own loss, on a packed batch of the given model. Prints one JSON line: per check, the
largest loss and gradient differences (and the reference's scale), or why it was skipped."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from colossal_shear.train import attention
from colossal_shear.train.losses import install_chunked_loss


def packed_batch(vocab, device, batch=2, length=256):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    cuts = [[0, 100, 230, length], [0, 7, length]]
    docs = torch.zeros(batch, length, dtype=torch.long)
    pos = torch.zeros(batch, length, dtype=torch.long)
    for b, row in enumerate(cuts):
        for d, (s, e) in enumerate(zip(row, row[1:])):
            docs[b, s:e], pos[b, s:e] = d, torch.arange(e - s)
    labels = ids.clone()
    labels[pos == 0] = -100
    return {
        k: v.to(device)
        for k, v in {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": docs}.items()
    }


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to try this script where no GPU is


def run(path, implementation, dtype, chunked=False):
    model = AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=dtype, attn_implementation=attention.HF_NAMES[implementation]
    ).to(DEVICE)
    attention.install(model, implementation)
    if chunked:
        install_chunked_loss(model)
    model.train()
    loss = model(**packed_batch(model.config.vocab_size, DEVICE)).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def compare(ref, got):
    (ref_loss, ref_grads), (loss, grads) = ref, got
    return {
        "loss_diff": float((loss - ref_loss).abs()),
        "loss": float(ref_loss),
        "grad_diff": max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()),
        "grad_scale": max(float(g.abs().max()) for g in ref_grads.values()),
        "same_params": sorted(grads) == sorted(ref_grads),
    }


def main():
    path = sys.argv[1]
    result = {}
    ref32 = run(path, "sdpa", torch.float32)
    result["chunked_fp32"] = compare(ref32, run(path, "sdpa", torch.float32, chunked=True))
    if DEVICE == "cuda":
        result["flex_fp32"] = compare(ref32, run(path, "flex", torch.float32))
        result["chunked_flex_fp32"] = compare(ref32, run(path, "flex", torch.float32, chunked=True))
    if attention.flash_attn_available() and DEVICE == "cuda":
        result["flash_bf16"] = compare(run(path, "sdpa", torch.bfloat16), run(path, "flash", torch.bfloat16))
    else:
        result["flash_bf16"] = {"skipped": "flash-attn is not installed"}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
