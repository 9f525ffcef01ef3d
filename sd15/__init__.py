"""sd15: Stable Diffusion v1.5 written from scratch in PyTorch.

    import sd15
    m = sd15.load("weights/v1-5-pruned-emaonly.safetensors")
"""

from .checkpoint import CheckpointError
from .control_preprocess import canny, inpaint_condition
from .controlnet import load_controlnet
from .hooks import trace
from .model import StableDiffusion, load

__all__ = ["CheckpointError", "StableDiffusion", "canny", "inpaint_condition", "load", "load_controlnet", "trace"]
__version__ = "0.1.0"
