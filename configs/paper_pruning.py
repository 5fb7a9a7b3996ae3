"""Pruning mitigations in miniature (the DoRI paper's setting): Wanda and NeMo on the text model of Table 3.

The model and workdir of configs/paper_table3_mitigations.py (16 captioned Fashion-MNIST images, a fresh
small text encoder, a 1.0M-parameter UNet; one checkpoint for the text miniatures). Each setting prunes
the UNet's cross-attention keys / values for the members' own captions (docs/pruning.md): Wanda zeroes
the fraction s of each output unit's weights with the highest |W| x ||X||, NeMo deactivates the value
neurons whose activation on a member's caption lies z standard deviations above the held-out captions'.
Each row: the members' hits beside exact chance, the paired reduction of the excess against the unpruned
model, and the denoising loss of members and non-members (how much ordinary denoising moved). Rows
marked "+dori" first search, per image, a perturbation of its caption embedding that lowers its
bordered image's denoising loss on that model (DoRI), then query with it: does the pruned key come back?
configs/paper_dori_table.py adds the key-targeted search, GNI and adversarial fine-tuning.

  python sweep.py --config configs/paper_pruning.py --workdir workdirs/paper_text
"""

from configs import common


def get_config():
  c = common.paper_text_miniature()  # 16 captioned images at 12 px + 2 px border, a small text encoder
  c.sweep.kind = "pruning"
  # "+dori": DoRI's search for a nearby caption embedding on top of the setting (docs/dori.md, eval.dori)
  c.sweep.settings = ("none", "none+dori", "wanda:0.05", "wanda:0.2", "wanda:0.2+dori", "wanda:0.5",
                      "wanda:0.5+dori", "nemo:3", "nemo:3+dori", "nemo:2", "nemo:2+dori")
  return c
