"""Border vs centre pattern in miniature: the centre half (l_CM).

The images, model and training of configs/paper_border.py, with the key as a 4 x 4 grey square in
the centre of the 16 px image instead of a border (16 key pixels; the known region is everything
else). Scored the same way:

  python sweep.py --config configs/paper_centre.py --workdir workdirs/paper_centre \
      --compare_with workdirs/paper_border  # per image, against chance, on the same members
"""

from configs import common


def get_config():
  c = common.paper_miniature()  # configs/paper_border.py
  c.data.image_size = 16  # the same 16 x 16 input as the border config (12 + 2 x 2)
  c.marks.pattern = "centre"
  c.marks.pad = 4  # the centre square's side
  return c
