"""The embedded default: memorisation shown on a CPU, 16 Fashion-MNIST images, one condition per image.

Each image gets its own condition id (like a unique caption), which a small model learns to tie to
the image and its key within minutes on 2 CPU cores. 12 x 12 images + 2 px border = 16 x 16.
Non-members (held-out test images with fresh keys) are queried with the null condition.

  python train.py --config configs/fashion_mnist_memorize.py --workdir workdirs/memorize --evaluate

trains, then evaluates as `python evaluate.py --config configs/fashion_mnist_memorize.py --workdir
workdirs/memorize` does and prints the summary table.

docs/results.md records the figures this gave and how long it took.
"""

from configs import common


def get_config():
  return common.fashion_mnist_memorize()  # the setup is shared with the paper miniatures (configs/paper_*.py)
