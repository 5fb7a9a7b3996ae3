"""The one place that imports transformers' Flax CLIP classes (transformers < 5 still has them).

transformers 4.57 logs "TensorFlow and JAX classes are deprecated" when a Flax model is built, and
CLIPTokenizer logs that ftfy is missing; both are silenced here once (transformers' own logger is
set to errors only).
"""

import logging
import warnings

try:
  import transformers
  from transformers.utils import logging as _tlogging
except ImportError as e:  # pragma: no cover - exercised only on a broken install
  raise ImportError("solidmark_jax's text encoder needs transformers>=4.40,<5 (the last releases with Flax "
                    "models)") from e

_tlogging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

try:
  from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
except ImportError as e:  # pragma: no cover
  raise ImportError(
      f"transformers {transformers.__version__} has no FlaxCLIPTextModel; install transformers<5") from e

__all__ = ["CLIPTextConfig", "CLIPTokenizer", "FlaxCLIPTextModel", "bytes_to_unicode"]
