"""Class-conditional SolidMark DDPM on all of Fashion-MNIST, runs on a laptop CPU.

28 x 28 images + a 2 px border of a random grey key = 32 x 32, 60,000 training images, 10 classes.
Fashion-MNIST is prepared offline from Debian's `dataset-fashion-mnist` files through TFDS.

  python train.py --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist
  python evaluate.py --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist

The default 500 steps of 32 images are a short, real run on a laptop CPU (docs/results.md gives the
time measured); a class-conditional model needs far more (the paper trains its DDPMs for 500 epochs)
before it memorises keys: raise --config.train.num_steps on a GPU/TPU. An interrupted run resumes
from its last checkpoint.
"""

from solidmark_jax.config import default_config


def get_config():
  c = default_config()
  c.data.name = "fashion_mnist"
  c.data.channels = 1
  c.marks.pad = 2
  c.model.condition = "class"
  c.model.block_out_channels = (32, 64, 64)
  c.model.cross_attention_dim = 64
  c.train.batch_size = 32
  c.train.num_steps = 500
  c.train.learning_rate = 2e-4
  c.train.ema_decay = 0.999
  c.train.checkpoint_every = 100
  c.train.sample_every = 250
  c.eval.num_members = 256  # CPU-sized; the paper evaluates n = 5,000 or 10,000 with 250 steps
  c.eval.num_nonmembers = 256
  c.eval.num_steps = 50
  return c
