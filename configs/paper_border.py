"""Border vs centre pattern (the paper's STL-10 ablation) in miniature: the border half.

16 Fashion-MNIST images, one condition id per image, trained to recall; the key is a 2 px grey
border around the 12 px image (16 x 16 marked, 112 key pixels). configs/paper_centre.py trains the
same images, model and steps with a 4 x 4 centre square of the key instead (l_CM), scored the same
way. One command each (trains first if the workdir has no final checkpoint):

  python sweep.py --config configs/paper_border.py --workdir workdirs/paper_border
  python sweep.py --config configs/paper_centre.py --workdir workdirs/paper_centre
"""

from configs import common


def get_config():
  return common.paper_miniature()  # the border is the miniatures' pattern; paper_centre.py changes it
