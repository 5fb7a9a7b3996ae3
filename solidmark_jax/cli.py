"""Flags and process set-up shared by train.py, evaluate.py, sweep.py and the export.

The terminal shows progress bars, warnings and errors of this project and the final report. Start-up
messages of the libraries underneath (TensorFlow's C++ logs) and their warnings (absl's, TFDS's; JAX and
Orbax keep theirs) stay out unless absl's `--verbosity` (`-v`) is given: then every logger follows it
(`-v 0`: info) and TensorFlow's C++ logs are left at their default.
"""

import contextlib
import logging
import os
import sys
from typing import Iterator

from absl import flags
from ml_collections import config_flags

from solidmark_jax import dirlock, parallel
from solidmark_jax.training import preemption

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, keymap, logs and reports.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-host runs ('auto' on TPU pods and clusters).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])

FLAGS = flags.FLAGS


# Loggers of the libraries underneath and the least level each shows unless --verbosity is given. JAX's
# warnings stay (e.g. a GPU found without a CUDA jaxlib); absl carries TFDS's (e.g. "OpenCV is not installed").
LIBRARY_LOGGERS = {"absl": logging.ERROR, "tensorflow": logging.ERROR, "tensorflow_datasets": logging.ERROR,
                   "diffusers": logging.ERROR, "transformers": logging.ERROR, "orbax": logging.WARNING,
                   "jax": logging.WARNING}


def setup() -> None:
  """Logging (quiet libraries unless --verbosity), TensorFlow kept off accelerators, jax.distributed if asked for."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  # TensorFlow only prepares and reads data here (integer image ops), where its oneDNN float kernels
  # play no part; left on, it announces them on every start whatever TF_CPP_MIN_LOG_LEVEL says.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if not FLAGS["verbosity"].present:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # read when TensorFlow is imported, just below
    for name, level in LIBRARY_LOGGERS.items():
      logging.getLogger(name).setLevel(level)
  try:  # TFDS prepares and reads data through TensorFlow: it must not claim the GPUs JAX uses
    import tensorflow as tf  # lazy: TensorFlow is heavy, and only TFDS needs it
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # pragma: no cover - TensorFlow missing or already initialised
    pass
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


@contextlib.contextmanager
def exit_status() -> Iterator[None]:
  """Maps a preempted stage to its exit status and a directory in use to a one-line error (no traceback).

  Preempted (SIGTERM / SIGINT, checkpoint written): exit `preemption.PREEMPTED_EXIT_CODE` (75).
  Directory in use by another process (`dirlock.DirectoryInUse`): exit 1 with the message.
  """
  try:
    yield
  except preemption.Preempted:
    sys.exit(preemption.PREEMPTED_EXIT_CODE)  # the stage logged what it wrote
  except dirlock.DirectoryInUse as e:
    sys.exit(f"error: {e}")
