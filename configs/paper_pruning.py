"""Pruning mitigations in miniature (the DoRI paper's setting): Wanda and NeMo on the text model of Table 3.

The model and workdir of configs/paper_table3_mitigations.py (16 captioned Fashion-MNIST images, a fresh
small text encoder, a 1.0M-parameter UNet; one checkpoint for the text miniatures). Each setting prunes
the UNet's cross-attention keys / values for the members' own captions (docs/pruning.md): Wanda zeroes
the fraction s of each output unit's weights with the highest |W| x ||X||, NeMo deactivates the value
neurons whose activation on a member's caption lies z standard deviations above the held-out captions'.
Each row: the members' hits beside exact chance, the paired reduction of the excess against the unpruned
model, and the denoising loss of members and non-members (how much ordinary denoising moved).

  python sweep.py --config configs/paper_pruning.py --workdir workdirs/paper_text
"""

from configs import common


def get_config():
  c = common.paper_text_miniature()  # 16 captioned images at 12 px + 2 px border, a small text encoder
  c.sweep.kind = "pruning"
  c.sweep.settings = ("none", "wanda:0.01", "wanda:0.05", "wanda:0.2", "wanda:0.5", "nemo:5", "nemo:3", "nemo:2")
  return c
