"""Measure memorisation of a trained SolidMark model: outpaint borders, score l_SM, write a report.

  python evaluate.py --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist
  python evaluate.py --config configs/tiny.py --workdir /tmp/tiny --step 2 --config.eval.repeats=4

Writes DIR/eval/: summary.json, summary.md, per_image.csv, plots and an image grid. Re-running
after an interruption skips the images already scored.

  python evaluate.py --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist --generations

instead scores plain generations with the paper's baseline metrics (normalised l2, Carlini et al.'s
modified l2 and its patched variant, settings in eval.generations) into DIR/generations/.
"""

from absl import app, flags

from solidmark_jax import cli

flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_bool("generations", False, "Score plain generations with the baseline metrics instead.")


def main(argv):
  del argv
  cli.setup()
  import os
  if cli.FLAGS.generations:
    from solidmark_jax.evaluation.generations import score_generations
    with cli.exit_status():
      summary = score_generations(cli.FLAGS.config, cli.FLAGS.workdir, step=cli.FLAGS.step)
    if summary is not None:
      print(open(os.path.join(os.path.abspath(cli.FLAGS.workdir), "generations", "summary.md")).read())
    return
  from solidmark_jax.evaluation import evaluate
  with cli.exit_status():
    report_dir = evaluate(cli.FLAGS.config, cli.FLAGS.workdir, step=cli.FLAGS.step)
  if report_dir is not None:
    print(open(os.path.join(report_dir, "summary.md")).read())


if __name__ == "__main__":
  app.run(main)
