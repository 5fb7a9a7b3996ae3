"""Border vs centre pattern (the paper's STL-10 ablation) in miniature: the border half.

16 Fashion-MNIST images, one condition id per image, trained to recall; the key is a 2 px grey
border around the 12 px image (16 x 16 marked, 112 key pixels). configs/paper_centre.py trains the
same images, model and steps with a 4 x 4 centre square of the key instead (l_CM), scored the same
way. One command each (trains first if the workdir has no final checkpoint):

  python sweep.py --config configs/paper_border.py --workdir workdirs/paper_border
  python sweep.py --config configs/paper_centre.py --workdir workdirs/paper_centre
"""

from configs import fashion_mnist_memorize


def get_config():
  c = fashion_mnist_memorize.get_config()  # 16 images, one condition per image, 16 px
  c.data.eval_split = "test[:64]"
  c.marks.pattern = "border"
  c.train.num_steps = 1500  # half of configs/fashion_mnist_memorize.py: partial recall, no ceiling
  c.train.log_every = 100
  c.train.keep_checkpoints = 2
  c.train.sample_every = 0
  c.eval.num_nonmembers = 32
  c.eval.num_steps = 50
  c.eval.num_grid = 0
  c.sweep.kind = "mitigation"
  c.sweep.settings = ("none",)
  return c
