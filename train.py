"""Train a SolidMark diffusion model.

  python train.py --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist
  python train.py --config configs/tiny.py --workdir /tmp/tiny --config.train.num_steps=10
  python train.py --config configs/fashion_mnist_memorize.py --workdir workdirs/memorize --evaluate

Re-running on the same workdir resumes from its latest checkpoint. With --evaluate, the trained model
is then evaluated as evaluate.py does (report in DIR/eval/) and the summary table printed.
"""

import os

from absl import app, flags

from solidmark_jax import cli

flags.DEFINE_bool("evaluate", False, "After training, evaluate the final checkpoint as evaluate.py does "
                  "and print the summary table.")


def main(argv):
  del argv
  cli.setup()
  from solidmark_jax.training.loop import train
  with cli.exit_status():
    train(cli.FLAGS.config, cli.FLAGS.workdir)
    if cli.FLAGS.evaluate:
      from solidmark_jax.evaluation import evaluate
      report_dir = evaluate(cli.FLAGS.config, cli.FLAGS.workdir)
      if report_dir is not None:
        print(open(os.path.join(report_dir, "summary.md")).read())


if __name__ == "__main__":
  app.run(main)
