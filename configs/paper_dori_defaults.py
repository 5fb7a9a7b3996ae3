"""DoRI's search at the paper's own settings, on the text miniature: do pruned keys come back?

The model of configs/paper_pruning.py (16 captioned Fashion-MNIST images, a small text encoder, a 1.0M-parameter
UNet), in its own workdir: its "+dori" rows run the search as the DoRI paper does (50 Adam steps at learning
rate 0.1, a batch of 8 fresh (t, eps) draws per step, no norm bound; the config default), where the other
text miniatures keep the setting their tables were measured with (learning rate 0.01, one draw per step), and
one workdir holds one result per setting name. Rows: none / Wanda s = 0.2 / NeMo z = 2, each under the plain
caption, DoRI's search and the same search blind to the key (non-members at chance by construction);
docs/dori.md, docs/experiments.md.

  python sweep.py --config configs/paper_dori_defaults.py --workdir workdirs/paper_text_dori
"""

from configs import common


def get_config():
  c = common.paper_text_miniature()
  c.sweep.kind = "pruning"
  c.sweep.settings = tuple(m + q for m in ("none", "wanda:0.2", "nemo:2") for q in ("", "+dori", "+dori:blind"))
  c.eval.dori.learning_rate = 0.1  # the paper's search, as the config default has it
  c.eval.dori.draws = 8
  return c
