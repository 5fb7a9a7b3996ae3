"""The paper's Table 2 in miniature: memorisation rises with duplication.

24 Fashion-MNIST images (12 px + 2 px border = 16 px): 6 seen once, 6 duplicated 2 times, 6 three
times, 6 four times (60 training instances), each copy with its own key; copies share the image and
its condition (one id per distinct image, like a caption). As in the paper, every distinct image is
evaluated 10 times whatever its copies (eval.repeats), and counts as memorised when any evaluation
lies within delta of any of its c keys; its exact chance given its predictions (which rises with c)
stands beside each count, with a test of the trend of the excess over chance across levels
(metrics/duplication.py). One command (trains first if the workdir has no final checkpoint):

  python sweep.py --config configs/paper_table2_duplication.py --workdir workdirs/paper_duplication

Writes DIR/sweeps/settings/none/duplication.{md,json} and prints the table.
"""

from configs import common


def get_config():
  c = common.paper_miniature()  # 12 px + 2 px border, one condition per distinct image, the same UNet
  c.data.subset_size = 24
  c.data.duplicates = {2: 6, 3: 6, 4: 6}
  c.train.batch_size = 20
  c.train.num_steps = 4000  # 1333 passes over the 60 instances: a 4x image is seen about 5330 times, a 1x image 1333
  c.eval.num_members = 24  # every distinct image, queried through its first copy
  c.eval.num_nonmembers = 16
  c.eval.repeats = 10  # the paper's 10 evaluations per image
  c.eval.batch_size = 20
  return c
