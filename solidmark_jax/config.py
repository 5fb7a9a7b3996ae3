"""The default config every experiment in configs/ starts from; field meanings documented here."""

from typing import Any, Sequence

import ml_collections


def section_items(section: Any, field: str, known: Sequence[str]) -> dict[str, Any]:
  """A config section (ConfigDict, dict or None) as a plain dict; unknown keys are an error naming `field`."""
  if section is None:
    return {}
  try:
    items = dict(section.items())
  except AttributeError:
    raise ValueError(f"{field} must be a config section with fields {tuple(known)}, got {section!r}") from None
  unknown = sorted(set(items) - set(known))
  if unknown:
    raise ValueError(f"{field}: unknown fields {unknown}; the fields are {tuple(known)}")
  return items


# eval.generations: baseline metrics from plain generations (evaluation/generations.py; `evaluate.py
# --generations`). (field, default, type) in the order scores.json lists the settings; a None default
# takes the eval section's value.
GENERATIONS_FIELDS = (
    ("num_samples", 256, int),  # N generations
    ("seed", 0, int),  # prompts and noise
    ("batch_size", None, int),  # generations per sampler call (eval.batch_size)
    ("num_steps", None, int),  # sampling steps (eval.num_steps)
    ("sampler", None, str),  # "ddim" / "ddpm" (eval.sampler)
    ("eta", None, float),  # (eval.eta)
    ("guidance_scale", None, float),  # (eval.guidance_scale)
    ("num_neighbors", 50, int),  # Carlini et al.'s modified l2: n ...
    ("alpha", 0.5, float),  # ... and alpha
    ("patch_grid", (4, 4), tuple),  # patched variant: patches per side (the paper) ...
    ("patch_size", None, int),  # ... or patch side in px (the public code: 8); set patch_grid None then
    ("nn_batch_size", 1024, int),  # training images per distance chunk
    ("backend", "jax", str),  # nearest-neighbour kernel: "jax" or "numpy"
    ("l2_thresholds", (0.1, 0.05, 0.02), tuple),  # normalised l2 on [0, 1] pixels: memorised when <=
    ("carlini_thresholds", (0.5, 0.3, 0.1), tuple),  # modified l2: memorised when <=
    ("similarity_thresholds", (0.5, 0.75, 0.95), tuple),  # embedding cosine: memorised when >=
    ("encoder", None, str),  # a name in evaluation.generations.ENCODERS, or pass encoder= to score_generations
    ("num_grid", 8, int),  # closest pairs drawn in nearest.png (0: none)
    ("cache_train_mb", 1024, int),  # training images held in memory up to this size, else re-read per pass
    # FB-Mem's view (docs/regions.md): nearest training image per region, foreground / background / both
    # / neither; masks: plain backgrounds for generations, eval.regions' source for training images
    ("regions", True, bool),
    ("region_thresholds", (0.1, 0.1), tuple),  # foreground, background: memorised when l2 <= (on [0, 1] pixels)
)


def generations_section() -> ml_collections.ConfigDict:
  """The default `eval.generations` section (None defaults as typed placeholders, settable from flags)."""
  return ml_collections.ConfigDict({
      name: ml_collections.config_dict.placeholder(kind) if default is None else default
      for name, default, kind in GENERATIONS_FIELDS})


def generations_defaults() -> dict[str, Any]:
  """`eval.generations`' fields and their defaults (None: the eval section's value), in `GENERATIONS_FIELDS` order."""
  return {name: default for name, default, _ in GENERATIONS_FIELDS}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # data order, subset choice, model init

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"  # "fashion_mnist", any prepared TFDS name, or "folder"
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir (default ~/tensorflow_datasets)
  c.data.manual_dir = ml_collections.config_dict.placeholder(str)  # Fashion-MNIST .gz files (default: Debian's)
  c.data.folder = ml_collections.config_dict.placeholder(str)  # name == "folder": the image folder
  c.data.eval_folder = ml_collections.config_dict.placeholder(str)  # folder source: held-out images
  c.data.train_split = "train"
  c.data.eval_split = "test"  # non-members for the empirical null
  c.data.image_size = ml_collections.config_dict.placeholder(int)  # resize to this square side (None: native)
  c.data.channels = 1
  c.data.subset_size = ml_collections.config_dict.placeholder(int)  # train on n images (None: all)
  c.data.subset_mode = "first"  # "first" n or "random" n (by seed)
  c.data.duplicates = {}  # {copies: number of images}, e.g. {2: 50, 3: 50, 4: 50}
  c.data.on_bad_image = "error"  # or "skip" (skipped files are counted and logged)
  # name == "shards" (data/shards.py): webdataset tars / parquet files with captions
  c.data.shards = ml_collections.config_dict.placeholder(str)  # glob, folder or list: the training split
  c.data.eval_shards = ml_collections.config_dict.placeholder(str)  # held-out shards (non-members)
  c.data.image_column = ml_collections.config_dict.placeholder(str)  # parquet columns (None: auto)
  c.data.caption_column = ml_collections.config_dict.placeholder(str)
  c.data.label_column = ml_collections.config_dict.placeholder(str)
  c.data.num_classes = ml_collections.config_dict.placeholder(int)  # labelled shards: class count
  # shards and folders, at open time: "header" checks each image's header, "full" decodes every image, "none"
  c.data.verify_images = "header"
  c.data.captioned_format = "tar"  # name == "captioned_fashion_mnist": "tar", "parquet" or "folder"

  c.marks = ml_collections.ConfigDict()
  c.marks.pattern = "border"  # "border" (l_SM) or "centre" (l_CM)
  c.marks.pad = 2  # border thickness (or centre square side) p in pixels
  c.marks.key_seed = 0  # keys are reproducible from (key_seed, instance id)
  # m independent keys per image (beyond the paper; a chance hit needs all m: about (2 delta)^m).
  # key_layout "sides": border sides top, right, bottom, left (m in 1, 2, 4; m = 2: top+bottom, right+left);
  # "channels": channel c carries key c mod m (1 <= m <= data.channels). See marks.py.
  c.marks.num_keys = 1
  c.marks.key_layout = "sides"

  c.model = ml_collections.ConfigDict()
  c.model.space = "pixel"  # "pixel", or "latent": the UNet works on the VAE's latents (section `vae`)
  # "class", "image" (one id per distinct image, like a unique caption), "text" (captions through the
  # frozen text encoder of section `text`), "none"
  c.model.condition = "class"
  c.model.pretrained = ml_collections.config_dict.placeholder(str)  # diffusers dir (SD root or unet/): fine-tune
  c.model.block_out_channels = (32, 64, 64)
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  c.model.layers_per_block = 1
  c.model.attention_head_dim = 8
  c.model.cross_attention_dim = 64
  c.model.use_linear_projection = False  # True for Stable Diffusion 2.x's transformer blocks
  # Compute settings (not part of a checkpoint's identity: an fp32-trained model evaluates in bf16):
  # compute dtype of the UNet, VAE and text encoder, "float32" or "bfloat16"; parameters, optimizer
  # state, EMA, the loss and the samplers stay float32.
  c.model.dtype = "float32"
  # attention: "auto" (the CPU rewrite on CPU, jax.nn.dot_product_attention elsewhere: cuDNN flash
  # attention on GPUs for bf16), "cpu", "dot_product" or "diffusers" (diffusers' own)
  c.model.attention = "auto"

  c.text = ml_collections.ConfigDict()  # model.condition == "text"
  c.text.pretrained = ml_collections.config_dict.placeholder(str)  # SD root (text_encoder/, tokenizer/) or None
  c.text.max_length = 77  # tokens, start and end included
  c.text.on_too_long = "truncate"  # or "error"; truncated captions are counted in the report
  c.text.hidden_size = 64  # fresh text model (no `pretrained`): must equal model.cross_attention_dim
  c.text.num_layers = 2
  c.text.num_heads = 4
  c.text.intermediate_size = 128
  c.text.num_merges = 2000  # fresh tokenizer: BPE merges learned from the training captions

  c.vae = ml_collections.ConfigDict()  # model.space == "latent"
  c.vae.pretrained = ml_collections.config_dict.placeholder(str)  # SD root (vae/) or a vae folder; None: stage 1
  c.vae.block_out_channels = (32, 64)  # fresh VAE: 2^(len - 1) down-sampling
  c.vae.layers_per_block = 1
  c.vae.norm_num_groups = 32  # GroupNorm groups: every width must be a multiple
  c.vae.latent_channels = 4
  c.vae.scaling_factor = ml_collections.config_dict.placeholder(float)  # None: 1 / std of the latents
  c.vae.cache_latents = False  # encode the training set once (posterior means) instead of every step
  c.vae.train_steps = 1000  # stage 1 (fresh VAE only)
  c.vae.batch_size = 32
  c.vae.learning_rate = 1e-3
  c.vae.kl_weight = 1e-6
  c.vae.reconstruction = "l1"  # stage-1 reconstruction loss: "l1" or "l2"

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"
  c.diffusion.num_steps = 1000
  # What the UNet predicts: "epsilon" or "v_prediction" (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0).
  # None: the pretrained pipeline's scheduler_config.json says (model.pretrained), else "epsilon".
  c.diffusion.prediction_type = ml_collections.config_dict.placeholder(str)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64  # global batch
  c.train.num_steps = 2000
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.9995
  c.train.cond_dropout = 0.1  # null condition rate, for classifier-free guidance
  # Rematerialisation of the UNet's down / up blocks in the backward pass: "none" or a
  # jax.checkpoint_policies name ("nothing_saveable", "dots_saveable", ...; models/fast_layers.REMAT). Meant for GPU
  # and TPU: XLA:CPU schedules the recomputation in the forward pass, so on a CPU it saves no memory (docs/performance.md)
  c.train.remat = "none"
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.sample_every = 1000  # 0: never
  c.train.num_samples = 16
  c.train.sample_steps = 50

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis (-1: all devices the fsdp axis leaves)
  c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis
  # Multi-slice TPU: slices the data axis spans over the data-centre network (DCN); within a slice
  # the mesh follows the chips' physical layout (mesh_utils.create_hybrid_device_mesh). 1: one slice.
  c.mesh.dcn_data = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.num_members = 256  # n member images (chosen by eval.seed)
  c.eval.num_nonmembers = 256  # n held-out images, bordered with fresh keys
  c.eval.seed = 0
  c.eval.repeats = 1  # r evaluations per image
  c.eval.score = "best"  # "best" (min over r) or "mean" l_SM is scored
  c.eval.batch_size = 64
  c.eval.num_steps = 100  # sampling steps
  c.eval.sampler = "ddim"  # "ddim" or "ddpm"
  c.eval.eta = 0.0
  c.eval.jump_length = 10  # RePaint j (pixel and latent models)
  c.eval.resamples = 1  # RePaint u (1: no resampling, the public SolidMark code)
  c.eval.guidance_scale = 1.0
  # with guidance: Wen et al.'s noise magnitude ||eps(x_t, c) - eps(x_t, null)|| over the first k steps
  c.eval.magnitude_steps = 1
  c.eval.thresholds = (0.1, 0.05, 0.01, 0.005)
  c.eval.random_init_baseline = False
  # Inference-time mitigation (evaluation/mitigations.py): "none", "gni" (strength = sigma), "rt", "cwr", "rna",
  # "random_words" (strength = iterations); caption ones need model.condition == "text". probability:
  # RT's per-token replacement probability per iteration (only RT uses it).
  c.eval.mitigation = ml_collections.ConfigDict({"name": "none", "strength": 0.0, "seed": 0, "probability": 0.1})
  # Query augmentation of the known centre (evaluation/augment.py): "none", "crop" / "blur" (level 1-4, the
  # public SolidMark code's: random resized crop of area 0.8-0.2, Gaussian kernel 5-17 with sigma ~ U(0.1, 2)),
  # "crop_side" / "blur_fixed" (side 0.8-0.2, fixed sigma per kernel), "rotate" (angle in degrees).
  c.eval.augment = ml_collections.ConfigDict({"name": "none", "level": 0, "angle": 0.0, "seed": 0})
  c.eval.remask_every = 10  # latent models: decode, re-mask in pixels and re-encode every s steps
  c.eval.remask_from = "x0"  # latent re-mask decodes the predicted clean latent ("x0") or z_t ("noisy")
  c.eval.num_grid = 16  # images in the PNG grid
  # region queries (FB-Mem's view, docs/regions.md): hide the key and a region, outpaint both, score both;
  # names: () or some of ("foreground", "background"); masks: "plain" (no weights) or "folder" (by id)
  c.eval.regions = ml_collections.ConfigDict({"names": (), "masks": "plain", "folder": "", "tolerance": 0.1})
  # DoRI's search (docs/dori.md), for sweep settings marked "+dori" (e.g. "wanda:0.1+dori"): per image, Adam
  # on a perturbation of its condition embedding against the bordered image's denoising loss, then the
  # query with the perturbed condition; max_norm None = unbounded. Only the settings that use it record it.
  # key_blind: the search sees a random grey where the key is and leaves it out of the loss (settings
  # marked "+dori:blind" set it), so non-members stay at exact chance by construction.
  # The defaults are the paper's: 50 steps at learning rate 0.1, 8 fresh (t, eps) draws per step, unbounded.
  c.eval.dori = ml_collections.ConfigDict({"steps": 50, "learning_rate": 0.1,
                                           "max_norm": ml_collections.config_dict.placeholder(float),
                                           "seed": 0, "draws": 8, "eval_draws": 8, "key_blind": False})
  # The key-targeted search, for settings marked "+keysearch": Adam on the same perturbation against the
  # squared error of the key read off a short DDIM outpainting (inner_steps steps, differentiated through;
  # draws: outpaintings averaged per Adam step). No paper has it: the defaults are this project's.
  c.eval.key_search = ml_collections.ConfigDict({"steps": 20, "learning_rate": 0.01,
                                                 "max_norm": ml_collections.config_dict.placeholder(float),
                                                 "seed": 0, "draws": 1, "inner_steps": 5})
  # Adversarial fine-tuning (evaluation/adversarial.py), for pruning-sweep settings "adversarial:<steps>":
  # the first `targets` members are fine-tuned away against DoRI's triggers (trigger_* : the inner search),
  # the other members are the retain set; cap None = the held-out images' loss. Checkpointed (Orbax).
  c.eval.adversarial = ml_collections.ConfigDict({
      "learning_rate": 1e-4, "trigger_steps": 10, "trigger_learning_rate": 0.01,
      "trigger_max_norm": ml_collections.config_dict.placeholder(float), "weight": 1.0,
      "cap": ml_collections.config_dict.placeholder(float), "draws": 4, "targets": 8, "checkpoint_every": 25,
      "seed": 0})
  c.eval.generations = generations_section()

  # Sweeps (sweep.py, solidmark_jax/evaluation/sweeps.py): several evaluation settings of one checkpoint in one
  # process. kind: "mitigation" (eval.mitigation), "augment" (eval.augment) or "pruning" (a pruned UNet
  # per setting, "wanda:<sparsity>" / "nemo:<z threshold>", docs/pruning.md, or a fine-tuned one,
  # "adversarial:<steps>"; any setting may end in "+dori", "+dori:blind", "+keysearch" or "+gni:<sigma>");
  # either `name` with `values` (strengths, levels or angles) or `settings` as "name:value" strings (e.g.
  # "gni:0.1", "crop:2", "none"). The identity setting ("none") is the baseline row; it is added if missing.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.kind = "mitigation"
  c.sweep.name = ""
  c.sweep.values = ()
  c.sweep.settings = ()
  return c
