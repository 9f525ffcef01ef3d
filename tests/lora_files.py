"""A random LoRA file for the tests that need one on a tiny model (test_fast, test_cuda_graphs)."""

import torch
from safetensors.torch import save_file

from sd15 import lora


def random_attention_lora(m, path, seed: int = 3):
    """A random rank-4 LoRA on every attention projection of the UNet (q, k, v, out) and the text encoder,
    in kohya's names, written to `path`."""
    g, tensors = torch.Generator().manual_seed(seed), {}
    for name, (_, _, module) in lora.lora_targets(m.unet, m.text_encoder).items():
        if isinstance(module, torch.nn.Linear) and ("attn" in name or "self_attn" in name):
            out_f, in_f = module.weight.shape
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) / in_f**0.5
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
    save_file(tensors, str(path))
    return path
