"""Score one checkpoint under several settings (mitigation strengths, augmentation levels) in one process.

  python sweep.py --config configs/paper_gni_figure.py --workdir workdirs/paper_text
  python sweep.py --config configs/tiny.py --workdir /tmp/tiny --config.sweep.name=gni \
      --config.sweep.values="(0.0, 0.5)"
  python sweep.py --config configs/paper_centre.py --workdir workdirs/paper_centre \
      --compare_with workdirs/paper_border   # the same members, compared per image against chance

Trains first when the workdir has no checkpoint at train.num_steps. Writes one report per setting
under DIR/sweeps/settings/<setting>/ and the sweep's table (and plot) under DIR/sweeps/<name>/
(default name: the config file's name), then prints the table. Re-running after an interruption
skips finished settings and the images already scored.
"""

import json
import os

from absl import app, flags

from solidmark_jax import cli

flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest; no training then).")
flags.DEFINE_string("name", None, "The sweep's name, its folder under DIR/sweeps/ (default: the config's file name).")
flags.DEFINE_string("compare_with", None, "Another workdir whose sweep scored the same members (e.g. the border "
                    "model for the centre one): its baseline setting is compared per image with this one's.")


def main(argv):
  del argv
  cli.setup()
  from solidmark_jax.evaluation.sweeps import run_sweep
  config_path = flags.FLAGS["config"].config_filename
  name = cli.FLAGS.name or os.path.splitext(os.path.basename(config_path))[0]
  with cli.exit_status():
    out = run_sweep(cli.FLAGS.config, cli.FLAGS.workdir, name=name, step=cli.FLAGS.step)
  if out is None:
    return
  print(open(os.path.join(out, "table.md")).read())
  if cli.FLAGS.compare_with:
    from solidmark_jax.evaluation.sweeps import compare_runs
    from solidmark_jax.workdir import Workdir
    with open(os.path.join(out, "sweep.json"), encoding="utf-8") as f:
      setting = json.load(f)["baseline"]
    this, other = Workdir(cli.FLAGS.workdir), Workdir(cli.FLAGS.compare_with)
    labels = (os.path.basename(other.root), os.path.basename(this.root))
    compare_runs(other.setting(setting), this.setting(setting), os.path.join(out, f"against_{labels[0]}"),
                 labels=labels)
    print(open(os.path.join(out, f"against_{labels[0]}", "comparison.md")).read())


if __name__ == "__main__":
  app.run(main)
