"""The paper's Table 3 in miniature: inference-time mitigations (GNI, RT, CWR, RNA) on a text model.

16 captioned Fashion-MNIST images (12 px + 2 px border = 16 px), each with its own caption (an
offline set whose captions differ per image, like LAION's; data/captioned.py), a fresh small text
encoder (frozen, as SD's is) and a 1.0M-parameter UNet that cross-attends to the caption. Trained to
recall its 16 images, then queried with each member's caption, clean and mitigated: the sweep
prints a row per mitigation with the eidetic counts and the reduction against the clean row, as the
paper's Table 3 reports it. Caption mitigations need text, hence the text model.

One command trains (if the workdir has no final checkpoint) and runs the sweep:

  python sweep.py --config configs/paper_table3_mitigations.py --workdir workdirs/paper_text

configs/paper_gni_figure.py and configs/paper_table4_augment.py use the same model and workdir
(same data, model and seed: the checkpoint is shared, only the sweep differs). docs/experiments.md
records what this measured.
"""

from configs import paper_border


def get_config():
  c = paper_border.get_config()  # 16 images at 12 px + 2 px border, the same UNet and training
  c.data.name = "captioned_fashion_mnist"
  c.data.train_split = "train[:16]"
  c.data.eval_split = "test[:64]"
  c.model.condition = "text"
  c.text.hidden_size = 64  # == model.cross_attention_dim
  c.text.max_length = 32  # the captions are 10-20 tokens; longer ones would be counted as truncated
  c.train.num_steps = 3000
  c.eval.num_nonmembers = 16  # per setting, queried with their own (mitigated) captions
  # "name:strength": GNI sigma on the caption embeddings; RT / CWR / RNA iterations.
  c.sweep.settings = ("none", "gni:0.1", "rt:2", "cwr:2", "rna:2", "gni:0.5", "rt:8", "cwr:8", "rna:8")
  return c
