"""The paper's class-conditional DDPM setup on CIFAR-10, border 16.

32 x 32 images + 2 x 16 border = 64 x 64. Needs CIFAR-10 prepared in a TFDS data dir
(`tfds build cifar10 --data_dir DIR` on a machine with network, copied here).

  python train.py --config configs/cifar10.py --workdir workdirs/cifar10 --config.data.data_dir=DIR
  python evaluate.py --config configs/cifar10.py --workdir workdirs/cifar10 --config.data.data_dir=DIR

Paper setup: 1000 diffusion steps, cosine schedule, AdamW 1e-4, batch 64, EMA 0.9995, 500 epochs,
250 sampling steps.
"""

from configs import common


def get_config():
  c = common.paper_ddpm("cifar10", condition="class", num_records=50_000, epochs=500)
  c.eval.num_members = 5000
  c.eval.num_nonmembers = 5000
  c.eval.batch_size = 256
  return c
