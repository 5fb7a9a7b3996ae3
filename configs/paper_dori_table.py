"""Does a mitigation remove memorisation or hide it? The DoRI paper's table in miniature, read with keys.

The text model of configs/paper_pruning.py (16 captioned Fashion-MNIST images, one checkpoint for the
text miniatures). Rows: the model's mitigation, none / Wanda (s = 0.2) / NeMo (z = 2) / adversarial
fine-tuning against DoRI's triggers for the first 8 members (eval.adversarial; the other 8 are its
retain set), each queried five ways: the plain caption, GNI on the caption embedding (a random
perturbation of about DoRI's size), DoRI's denoising-loss search (eval.dori), the same search blind to
the key (a random grey in the key region, left out of the loss: non-members at chance by construction)
and the key-targeted search (eval.key_search, differentiated through a short DDIM outpainting). table.md shows the model x query
matrix of members' hits beside exact chance, the non-members' hits (the control), and the targeted
members apart from the rest (docs/dori.md, docs/experiments.md).

  python sweep.py --config configs/paper_dori_table.py --workdir workdirs/paper_text
"""

from configs import common


def get_config():
  c = common.paper_text_miniature()
  c.sweep.kind = "pruning"
  c.sweep.name = ""
  models = ("none", "wanda:0.2", "nemo:2", "adversarial:40")
  queries = ("", "+gni:0.5", "+dori", "+dori:blind", "+keysearch")
  c.sweep.settings = tuple(m + q for m in models for q in queries)
  c.eval.adversarial.targets = 8
  c.eval.adversarial.trigger_steps = 10
  c.eval.adversarial.learning_rate = 2e-4
  c.eval.adversarial.checkpoint_every = 10
  c.eval.key_search.steps = 20
  c.eval.key_search.inner_steps = 5
  return c
