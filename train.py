"""Train a SolidMark diffusion model.

  python train.py --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist
  python train.py --config configs/tiny.py --workdir /tmp/tiny --config.train.num_steps=10

Re-running on the same workdir resumes from its latest checkpoint.
"""

from absl import app

from solidmark_jax import cli


def main(argv):
  del argv
  cli.setup()
  from solidmark_jax.training.loop import train
  with cli.exit_status():
    train(cli.FLAGS.config, cli.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
