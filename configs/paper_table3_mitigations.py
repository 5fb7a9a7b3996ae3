"""The paper's Table 3 in miniature: inference-time mitigations (GNI, RT, CWR, RNA) on a text model.

16 captioned Fashion-MNIST images (12 px + 2 px border = 16 px), each with its own caption (an
offline set whose captions differ per image, like LAION's; data/captioned.py), a fresh small text
encoder (frozen, as SD's is) and a 1.0M-parameter UNet that cross-attends to the caption. Trained to
recall its 16 images, then queried with each member's caption, clean and mitigated: the sweep
prints a row per mitigation with the eidetic counts and the reduction against the clean row, as the
paper's Table 3 reports it. Caption mitigations need text, hence the text model.

One command trains (if the workdir has no final checkpoint) and runs the sweep:

  python sweep.py --config configs/paper_table3_mitigations.py --workdir workdirs/paper_text

configs/paper_gni_figure.py and configs/paper_table4_augment.py use the same model and workdir
(same data, model and seed: the checkpoint is shared, only the sweep differs). docs/experiments.md
records what this measured.
"""

from configs import common


def get_config():
  c = common.paper_text_miniature()  # 16 captioned images at 12 px + 2 px border, a small text encoder
  # "name:strength": GNI sigma on the caption embeddings; RT / CWR / RNA iterations.
  c.sweep.settings = ("none", "gni:0.1", "rt:2", "cwr:2", "rna:2", "gni:0.5", "rt:8", "cwr:8", "rna:8")
  return c
