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

from solidmark_jax.config import default_config


def get_config():
  c = default_config()
  c.data.name = "captioned_fashion_mnist"
  c.data.train_split = "train[:16]"
  c.data.eval_split = "test[:64]"
  c.data.image_size = 12
  c.data.channels = 1
  c.data.subset_size = 16
  c.marks.pad = 2  # 12 + 2 * 2 = 16 px
  c.model.condition = "text"
  c.model.block_out_channels = (32, 64)
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  c.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  c.model.cross_attention_dim = 64
  c.text.hidden_size = 64  # == model.cross_attention_dim
  c.text.max_length = 32  # the captions are 10-20 tokens; longer ones would be counted as truncated
  c.train.batch_size = 16
  c.train.num_steps = 3000
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.ema_decay = 0.995
  c.train.cond_dropout = 0.1
  c.train.log_every = 100
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  c.train.sample_every = 0
  c.eval.num_members = 16
  c.eval.num_nonmembers = 16  # per setting, queried with their own (mitigated) captions
  c.eval.repeats = 4
  c.eval.batch_size = 16
  c.eval.num_steps = 50
  c.eval.num_grid = 0
  c.sweep.kind = "mitigation"
  # "name:strength": GNI sigma on the caption embeddings; RT / CWR / RNA iterations.
  c.sweep.settings = ("none", "gni:0.1", "rt:2", "cwr:2", "rna:2", "gni:0.5", "rt:8", "cwr:8", "rna:8")
  return c
