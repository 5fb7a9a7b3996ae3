"""The paper's Table 4 in miniature: query augmentations of the known centre (crop and blur levels 1-4).

The model, data and workdir of configs/paper_table3_mitigations.py (the checkpoint is shared). Each
member's centre is cropped to 0.8 / 0.6 / 0.4 / 0.2 of its side and resized back (crop 1-4), or
blurred with a Gaussian kernel of 5 / 9 / 13 / 17 px (blur 1-4), before the border is outpainted
(outpaint/augment.py). Blur kernels wider than the 12 px centre act as strong blurs here. One command
(trains first if the workdir has no final checkpoint):

  python sweep.py --config configs/paper_table4_augment.py --workdir workdirs/paper_text
"""

from configs import paper_table3_mitigations


def get_config():
  c = paper_table3_mitigations.get_config()
  c.sweep.kind = "augment"
  c.sweep.name = ""
  c.sweep.values = ()
  c.sweep.settings = ("none", "crop:1", "crop:2", "crop:3", "crop:4", "blur:1", "blur:2", "blur:3", "blur:4")
  return c
