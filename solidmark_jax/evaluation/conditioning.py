"""What the denoiser is conditioned on at evaluation, with an inference-time mitigation.

`Conditioner(exp, frozen, mitigation, unet_params)(conditions, ids, captions)` turns per-instance
conditions (ids [n] or caption token ids [n, L]) into the denoiser's input, applying the mitigation
(`evaluation.mitigations`) at its stage, seeded by instance id. Without a mitigation it is
`experiment.encode_conditions`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from solidmark_jax.evaluation import mitigations
from solidmark_jax.experiment import Experiment, encode_conditions, null_condition


class Conditioner:
  """Per-instance conditions -> what the denoiser takes, with an inference-time mitigation.

  Without a mitigation ids pass through; caption token ids [n, L] become text embeddings [n, L, D]
  (jitted, frozen encoder). A mitigation acts at its stage: caption strings before tokenisation
  (CWR, RNA, random words), token ids (RT), or embeddings (GNI; class / image models then pass
  their noised condition-table rows [n, D] instead of ids). Seeded by instance id.

  Attributes:
    spec: the mitigation.
    null: the unconditional input for classifier-free guidance, never perturbed: the null id, the
      clean null row of the condition table (GNI on a class / image model), or the empty caption's
      embedding [L, D].
  """

  def __init__(self, exp: Experiment, frozen: dict, mitigation: mitigations.Mitigation | None = None,
               unet_params: Any = None):
    self.exp = exp
    self.frozen = frozen
    self.spec = mitigation or mitigations.Mitigation()
    mitigations.check_condition(self.spec, exp.config.model.condition)
    self.null = null_condition(exp, frozen)
    self._table = None  # [K + 1, D] condition-table rows (GNI on a class / image model)
    self._tokens = None
    self._vocabulary = None
    if exp.is_text:
      if self.spec.stage == "tokens":
        self._tokens = mitigations.TokenSpec.from_tokenizer(exp.text.tokenizer)
      if self.spec.name == "random_words":  # random words of the training captions
        self._vocabulary = sorted({w for c in exp.captions for w in c.split()})
    elif self.spec.stage == "embedding" and not self.spec.is_identity:
      self._table = np.asarray(mitigations.condition_table(unet_params))
      self.null = self._table[exp.null_id]  # [D]

  def __call__(self, conditions: np.ndarray, ids: np.ndarray, captions: Sequence[str] | None = None) -> np.ndarray:
    """conditions [n] ids or [n, L] token ids, ids [n] instance ids, captions (text, caption stage)."""
    spec = self.spec
    ids = np.asarray(ids, np.int64)
    if not self.exp.is_text:
      if self._table is None:
        return encode_conditions(self.exp, self.frozen, conditions)
      rows = mitigations.condition_embeddings(self._table, np.asarray(conditions, np.int32))
      return np.asarray(mitigations.mitigate_embeddings(spec, rows, ids))
    tokens = np.asarray(conditions, np.int32)
    if spec.stage == "caption" and not spec.is_identity:
      if captions is None:
        raise ValueError(f"eval.mitigation {spec.name!r} needs the captions of the batch")
      mitigated = mitigations.mitigate_captions(spec, captions, ids, self._vocabulary)
      tokens = np.asarray(self.exp.text.tokenize(mitigated).ids, np.int32)
    elif spec.stage == "tokens" and not spec.is_identity:
      tokens = mitigations.mitigate_tokens(spec, tokens, ids, self._tokens)
    emb = encode_conditions(self.exp, self.frozen, tokens)
    return np.asarray(mitigations.mitigate_embeddings(spec, emb, ids))
