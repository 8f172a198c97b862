"""The PersonaPlex / Moshi language model in MLX (MODEL.md §3-§6, §9, §11).

* `LMModel` (model.py): temporal transformer, text head, depformer; loading with validation,
  quantization and a converted-weights cache.
* `LMGen` (lmgen.py): the streaming step with PersonaPlex's token bookkeeping, voice replay and the
  batched prefill.
* `SamplingParams` (sampling.py): temperature / top-k sampling on the device.
* `random_weights.py`: controlled random weights in the real checkpoint naming.
"""

from .lmgen import LMGen
from .model import LMModel
from .sampling import SamplingParams

__all__ = ["LMGen", "LMModel", "SamplingParams"]
