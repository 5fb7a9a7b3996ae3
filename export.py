"""Export a trained SolidMark model in diffusers format (docs/export.md).

  python export.py --config configs/tiny.py --workdir /tmp/sm_tiny [--out DIR] [--step N]
"""

from absl import app, flags

from solidmark_jax import cli

flags.DEFINE_string("out", None, "Export directory (default: <workdir>/export).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  del argv
  cli.setup()
  from solidmark_jax.export import export_diffusers
  with cli.exit_status():
    export_diffusers(cli.FLAGS.config, cli.FLAGS.workdir, cli.FLAGS.out, cli.FLAGS.step)


if __name__ == "__main__":
  app.run(main)
