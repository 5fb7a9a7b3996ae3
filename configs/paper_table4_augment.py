"""The paper's Table 4 in miniature: query augmentations of the known centre (crop and blur levels 1-4).

The model, data and workdir of configs/paper_table3_mitigations.py (the checkpoint is shared). As in
the public SolidMark code, each member's centre is cropped by a random resized crop of area 0.8 / 0.6 /
0.4 / 0.2 of the centre (aspect ratio in [3/4, 4/3]) and resized back (crop 1-4), or blurred with a
Gaussian kernel of 5 / 9 / 13 / 17 px and sigma ~ U(0.1, 2.0) per query (blur 1-4), before the border
is outpainted (evaluation/augment.py). Blur kernels wider than the 12 px centre act as strong blurs
here. The earlier side-scaled crops and fixed sigmas are the settings "crop_side:N" / "blur_fixed:N".
One command (trains first if the workdir has no final checkpoint):

  python sweep.py --config configs/paper_table4_augment.py --workdir workdirs/paper_text
"""

from configs import common


def get_config():
  c = common.paper_text_miniature()  # configs/paper_table3_mitigations.py's model and data
  c.sweep.kind = "augment"
  c.sweep.name = ""
  c.sweep.values = ()
  c.sweep.settings = ("none", "crop:1", "crop:2", "crop:3", "crop:4", "blur:1", "blur:2", "blur:3", "blur:4")
  return c
