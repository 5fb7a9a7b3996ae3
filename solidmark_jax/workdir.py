"""Where a run's files live: the layout of a workdir, in one place.

    DIR/
      keymap.json        the per-instance keys the model is trained with (`marks.Keymap`)
      checkpoints/       Orbax train states (`training.checkpoint`)
      tensorboard/       training scalars
      samples/           sample grids during training
      vae/, vae_checkpoints/   latent models: the stage-1 VAE (diffusers layout) and its checkpoints
      text/              text models: the text encoder and tokenizer trained with (diffusers layout)
      eval/              the memorisation report (`evaluate.py`)
      generations/       plain generations and their scores (`evaluate.py --generations`)
      sweeps/settings/<setting>/, sweeps/<name>/   one store per sweep setting; each sweep's table
"""

from __future__ import annotations

import dataclasses
import os

KEYMAP_FILE = "keymap.json"
VAE_FOLDER = "vae"
TEXT_FOLDER = "text"
SETTINGS_DIR = "settings"


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The paths of one workdir (made absolute); nothing is created."""

  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", os.path.abspath(os.path.expanduser(self.root)))

  def _path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def keymap(self) -> str:
    return self._path(KEYMAP_FILE)

  @property
  def checkpoints(self) -> str:
    return self._path("checkpoints")

  @property
  def tensorboard(self) -> str:
    return self._path("tensorboard")

  @property
  def samples(self) -> str:
    return self._path("samples")

  @property
  def vae(self) -> str:
    return self._path(VAE_FOLDER)

  @property
  def vae_checkpoints(self) -> str:
    return self._path("vae_checkpoints")

  @property
  def text(self) -> str:
    return self._path(TEXT_FOLDER)

  @property
  def eval(self) -> str:
    return self._path("eval")

  @property
  def generations(self) -> str:
    return self._path("generations")

  @property
  def sweeps(self) -> str:
    return self._path("sweeps")

  def sweep(self, name: str) -> str:
    """DIR/sweeps/<name>/: one sweep's table and plot."""
    return self._path("sweeps", name)

  def setting(self, name: str) -> str:
    """DIR/sweeps/settings/<name>/: one setting's result store and report, shared by sweeps."""
    return self._path("sweeps", SETTINGS_DIR, name)
