"""Flags and process set-up shared by train.py and evaluate.py."""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, keymap, logs and reports.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-host runs ('auto' on TPU pods and clusters).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])

FLAGS = flags.FLAGS


def setup() -> None:
  """Logging, TensorFlow kept off accelerators, jax.distributed if asked for."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow", "diffusers"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:  # TFDS prepares and reads data through TensorFlow: it must not claim the GPUs JAX uses
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # pragma: no cover - TensorFlow missing or already initialised
    pass
  from solidmark_jax import parallel
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
