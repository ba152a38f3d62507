"""A pure-PyTorch Megalodon (the official `Mega` model) with the official module names and state-dict keys.

No CUDA extension, apex or fairscale, and no jax: `import megalodon_jax.pytorch` needs only torch (safetensors
for .safetensors checkpoints). Runs on CPU and CUDA, in float32 or bfloat16 (`model.to(torch.bfloat16)`; CEMA,
norm statistics, RoPE and softmax stay float32).

    from megalodon_jax import pytorch as mp
    model = mp.load("ckpt_dir", device="cuda", dtype=torch.bfloat16)   # params.json + weights
    logits, _ = model(tokens)                                           # (B, L, V) float32
    out = mp.generate(model, tokens, max_new_tokens=32)                 # greedy, cached decoding
"""

from megalodon_jax.errors import CheckpointError, ConfigError, MegalodonError
from megalodon_jax.pytorch.config import ModelConf
from megalodon_jax.pytorch.generate import generate, sample_next
from megalodon_jax.pytorch.io import check_state_dict, from_state_dict, load, read_weights, save
from megalodon_jax.pytorch.model import Mega

__all__ = ["MegalodonError", "ConfigError", "CheckpointError", "ModelConf", "Mega", "check_state_dict",
           "from_state_dict", "load", "read_weights", "save", "generate", "sample_next"]
