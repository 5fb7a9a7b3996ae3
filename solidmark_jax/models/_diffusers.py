"""The one place that imports diffusers' Flax classes (diffusers < 0.40 still has them).

diffusers 0.39 logs a deprecation message on every Flax module call; it is filtered here once: a
filter on diffusers' log handler drops that message whatever level the "diffusers" logger is set
to later (cli.setup sets it to WARNING), so other diffusers warnings still reach the terminal.
"""

import logging
import os
import warnings

# transformers (imported by diffusers) would otherwise import TensorFlow for its image processors:
# ~9 s per process start. TFDS still imports TensorFlow itself where it needs it.
os.environ.setdefault("USE_TF", "0")

try:
  import diffusers
  from diffusers.utils import logging as _dlogging
except ImportError as e:  # pragma: no cover - exercised only on a broken install
  raise ImportError("solidmark_jax needs diffusers>=0.30,<0.40 (the last releases with Flax models)") from e

FLAX_DEPRECATION = "Flax classes are deprecated"


class _DropFlaxDeprecation(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return FLAX_DEPRECATION not in str(record.msg)


_dlogging.set_verbosity_error()
_diffusers_logger = logging.getLogger("diffusers")
_diffusers_logger.setLevel(logging.ERROR)
for _handler in _diffusers_logger.handlers:  # diffusers' own handler; its child loggers log through it
  _handler.addFilter(_DropFlaxDeprecation())
_diffusers_logger.addFilter(_DropFlaxDeprecation())
warnings.filterwarnings("ignore", message=f".*{FLAX_DEPRECATION}.*")

try:
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
  from diffusers.models.attention_flax import FlaxAttention
  from diffusers.models.unets.unet_2d_blocks_flax import (FlaxCrossAttnDownBlock2D, FlaxCrossAttnUpBlock2D,
                                                          FlaxDownBlock2D, FlaxUpBlock2D)
except ImportError as e:  # pragma: no cover
  raise ImportError(
      f"diffusers {diffusers.__version__} has no FlaxUNet2DConditionModel/FlaxAutoencoderKL; "
      "install diffusers<0.40") from e

# The UNet's down and up blocks: the units `train.remat` recomputes (models/fast_layers.py).
REMAT_BLOCKS = (FlaxDownBlock2D, FlaxCrossAttnDownBlock2D, FlaxUpBlock2D, FlaxCrossAttnUpBlock2D)

__all__ = ["FlaxAttention", "FlaxAutoencoderKL", "FlaxUNet2DConditionModel", "REMAT_BLOCKS"]
