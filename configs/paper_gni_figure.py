"""The paper's GNI figure in miniature: eidetic rate against the Gaussian-noise sigma on the caption embeddings.

The model, data and workdir of configs/paper_table3_mitigations.py (the checkpoint is shared); the
sweep adds N(0, sigma^2) noise to every caption embedding before outpainting, for each sigma, and
writes the table and a plot of the rate against sigma (sweep.png). One command (trains first if the
workdir has no final checkpoint):

  python sweep.py --config configs/paper_gni_figure.py --workdir workdirs/paper_text
"""

from configs import common


def get_config():
  c = common.paper_text_miniature()  # configs/paper_table3_mitigations.py's model and data
  c.sweep.kind = "mitigation"
  c.sweep.name = "gni"
  c.sweep.values = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0)
  c.sweep.settings = ()
  return c
