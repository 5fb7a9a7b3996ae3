"""Evaluation: members and non-members outpainted, scored and reported.

- `evaluator`: the groups, the checkpoint and the outpainter of one evaluation; `evaluate(config, workdir)`.
- `conditioning`: conditions -> the denoiser's input, with an inference-time mitigation.
- `mitigations`: inference-time mitigations (GNI, RT, CWR, RNA, random words), pure and seeded.
- `augment`: query augmentations of the known region (crops, blurs, rotations).
- `sweeps`: several settings of one checkpoint in one process, and their table.
- `generations`: plain generations scored against the training set.
- `regions`: region masks and region queries (FB-Mem's view, docs/regions.md).
- `pruning`: pruning mitigations of the cross-attention keys and values (Wanda, NeMo; docs/pruning.md).
- `dori`: DoRI's search for a condition perturbation that brings a hidden image back, and a key-targeted
  search (docs/dori.md).
- `adversarial`: adversarial fine-tuning of the UNet against DoRI's triggers for a targeted set, with a
  retain set, resumable from Orbax checkpoints (docs/dori.md).
"""

from solidmark_jax.evaluation.evaluator import evaluate
