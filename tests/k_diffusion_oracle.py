"""k-diffusion's samplers as a second oracle, for the samplers diffusers has no scheduler for (DPM++ 2S a,
DPM++ 3M SDE) and as an independent check of the rest of the k-diffusion family.

k-diffusion 0.1.1.post1 is installed without its dependencies (`pip install --no-deps k-diffusion==0.1.1.post1`,
as the README's test command does): its package `__init__` imports training code that needs wandb, torchvision,
kornia, CLIP and more. The two modules used here, `k_diffusion/sampling.py` and `k_diffusion/external.py`, need
only torch, scipy, torchsde and tqdm, plus `utils.append_dims` and (for a likelihood function not used here)
torchdiffeq. So they are imported from the installed package's folder without running its `__init__`, with
`k_diffusion.utils` standing in for the real one (which needs torchvision) by its one function these modules call.
"""

import importlib
import importlib.metadata
import importlib.util
import sys
import types

import torch

INSTALL = "pip install --no-deps k-diffusion==0.1.1.post1 (the README's test command does)"


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """k_diffusion.utils.append_dims: trailing singleton dimensions up to `target_dims`."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external), imported as the module docstring says."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
    spec = importlib.util.find_spec("k_diffusion")  # finds the folder; does not run __init__
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"the k-diffusion oracle is not installed: {INSTALL}")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    package.utils = utils
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = package, utils
    if importlib.util.find_spec("torchdiffeq") is None:  # only sampling.log_likelihood uses it
        sys.modules["torchdiffeq"] = types.ModuleType("torchdiffeq")
        sys.modules["torchdiffeq"].odeint = None
    if importlib.metadata.version("k-diffusion") != "0.1.1.post1":
        raise ImportError(f"the k-diffusion oracle must be version 0.1.1.post1: {INSTALL}")
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")


def denoiser(eps_model):
    """k-diffusion's wrapper of an eps-predicting SD model over SD's training schedule (`DiscreteEpsDDPMDenoiser`, as
    its `CompVisDenoiser`): the model is told `sigma_to_t(sigma)`, the log-sigma interpolation of the table."""
    from sd15 import schedule

    _, external = load()
    return external.DiscreteEpsDDPMDenoiser(eps_model, schedule.alphas_cumprod().float(), quantize=False)


def sigma_to_t(sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's timestep for each noise level (0 for sigma = 0, where no model is called)."""
    positive = sigmas > 0
    t = torch.zeros_like(sigmas)
    t[positive] = denoiser(None).sigma_to_t(sigmas[positive]).float()
    return t


def gaussian_noise(generator: torch.Generator, shape):
    """A k-diffusion `noise_sampler` that draws a standard normal tensor from `generator`, as sd15's samplers do."""
    return lambda sigma, sigma_next: torch.randn(shape, generator=generator)


def brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, seed: int):
    """k-diffusion's own `BrownianTreeNoiseSampler` over the whole schedule `sigmas`, with the tree seed sd15 draws
    from a generator seeded with `seed` (`samplers.BrownianNoise`)."""
    sampling, _ = load()
    tree_seed = int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(seed)))
    return sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=tree_seed)
