"""Faster, numerically equal stand-ins for two diffusers Flax layers, and per-block remat, swapped in
at trace time.

`fast_layers()` is a flax method interceptor: inside it, every `nn.GroupNorm` and diffusers
`FlaxAttention` call runs the functions below on the module's own parameters (same names, shapes and
initialisers), so checkpoints, `init` and parameter trees are unchanged. Why they are faster (see
docs/performance.md for the measurements):

- GroupNorm: flax reduces over a [B, H, W, G, C/G] view and repeats the statistics back to C;
  here the statistics come from per-channel sums over H and W ([B, C], one pass over x), are summed
  within each group on the tiny [B, G, C/G] array, and the normalisation folds into one per-channel
  multiply-add `x * a + b` that XLA fuses with the SiLU that follows.
- Attention: diffusers scales the [B * heads, N, N] scores by a broadcast constant, which XLA:CPU
  materialises as an N x N array per head and which splits the softmax into several memory-bound
  passes. Here the query is scaled before the product, heads stay a separate axis, and the softmax
  is normalised after multiplying by V ([B, heads, N, d] instead of [B, heads, N, N]); XLA:CPU then
  compiles the whole attention into one fused kernel (`attention="cpu"`).
- Attention on accelerators (`attention="dot_product"`): `jax.nn.dot_product_attention`, which is
  cuDNN's fused (flash) attention on a GPU for bf16/fp16 inputs with head dims it supports, and
  XLA's attention everywhere else. `"auto"` takes "cpu" on the CPU backend and "dot_product" on any
  other; `"diffusers"` leaves diffusers' own attention in place.

`remat` (a `jax.checkpoint_policies` name, or "none") wraps each of the UNet's down and up blocks
(`FlaxDownBlock2D`, `FlaxCrossAttnDownBlock2D`, `FlaxUpBlock2D`, `FlaxCrossAttnUpBlock2D`) in flax's
lifted `nn.checkpoint` with that policy: in the backward pass a block's activations are recomputed
from its inputs instead of kept from the forward pass. Parameters and results are unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solidmark_jax.models._diffusers import FlaxAttention, REMAT_BLOCKS

ATTENTION = ("auto", "diffusers", "cpu", "dot_product")
REMAT = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's fused attention takes half-precision inputs only


def resolve_attention(name: str, backend: str | None = None) -> str:
  """"auto" -> "cpu" on the CPU backend, "dot_product" on any other; other names are checked and kept.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in ATTENTION:
    raise ValueError(f"model.attention must be one of {ATTENTION}, got {name!r}")
  if name != "auto":
    return name
  return "cpu" if (backend or jax.default_backend()) == "cpu" else "dot_product"


def remat_policy(name: str) -> Any:
  """The `jax.checkpoint_policies` entry named `name`; None for "none".

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in REMAT:
    raise ValueError(f"train.remat must be one of {REMAT}, got {name!r}")
  return None if name == "none" else getattr(jax.checkpoint_policies, name)


def group_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, num_groups: int,
               epsilon: float) -> jax.Array:
  """GroupNorm over channels-last x [B, ..., C] from per-channel sums; same result as flax's.

  Args:
    x: [B, ..., C] activations; statistics are taken over all axes but the first, per group.
    scale: [C] or None.
    bias: [C] or None.
    num_groups: G, dividing C.
    epsilon: added to the variance.

  Returns:
    [B, ..., C], dtype of x.
  """
  b, c = x.shape[0], x.shape[-1]
  axes = tuple(range(1, x.ndim - 1))
  xf = x.astype(jnp.float32)
  count = float(x.size // (b * c) * (c // num_groups))
  s1 = jnp.sum(xf, axis=axes).reshape(b, num_groups, -1).sum(-1)  # [B, G]
  s2 = jnp.sum(jnp.square(xf), axis=axes).reshape(b, num_groups, -1).sum(-1)  # [B, G]
  mean = s1 / count
  var = jnp.maximum(s2 / count - jnp.square(mean), 0.0)  # E[x^2] - E[x]^2, as flax's fast variance
  inv = jax.lax.rsqrt(var + epsilon)  # [B, G]
  inv = jnp.repeat(inv, c // num_groups, axis=-1)  # [B, C]
  mean = jnp.repeat(mean, c // num_groups, axis=-1)  # [B, C]
  a = inv if scale is None else inv * scale.astype(jnp.float32)
  shift = -mean * a if bias is None else bias.astype(jnp.float32) - mean * a
  bshape = (b,) + (1,) * len(axes) + (c,)
  return (xf * a.reshape(bshape) + shift.reshape(bshape)).astype(x.dtype)


@jax.custom_vjp
def _softmax_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array) -> jax.Array:
  """softmax(qh kh^T) vh for qh [B, h, N, d] (already scaled), kh and vh [B, h, M, d] -> [B, h, N, d]."""
  s = jnp.einsum("bhnd,bhmd->bhnm", qh, kh)  # [B, h, N, M]
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  # Normalised after the product with V: XLA:CPU fuses dot -> softmax -> dot into one kernel.
  return jnp.einsum("bhnm,bhmd->bhnd", p, vh) / jnp.sum(p, axis=-1, keepdims=True)


def _softmax_attention_fwd(qh, kh, vh):
  s = jnp.einsum("bhnd,bhmd->bhnm", qh, kh)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  p = p / jnp.sum(p, axis=-1, keepdims=True)  # [B, h, N, M], kept for the backward pass
  o = jnp.einsum("bhnm,bhmd->bhnd", p, vh)
  return o, (qh, kh, vh, o, p)


def _softmax_attention_bwd(res, do):
  qh, kh, vh, o, p = res
  ds = p * (jnp.einsum("bhnd,bhmd->bhnm", do, vh) - jnp.sum(do * o, axis=-1, keepdims=True))  # [B, h, N, M]
  dq = jnp.einsum("bhnm,bhmd->bhnd", ds, kh)
  # dk = ds^T q and dv = p^T do, written as (q^T ds)^T and (do^T p)^T: XLA:CPU's fused dot kernels
  # take the [N, M] operand untransposed, where autodiff's form fell back to a slower plain dot.
  dk = jnp.einsum("bhdn,bhnm->bhdm", qh.swapaxes(-1, -2), ds).swapaxes(-1, -2)
  dv = jnp.einsum("bhdn,bhnm->bhdm", do.swapaxes(-1, -2), p).swapaxes(-1, -2)
  return dq, dk, dv


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head, for q [B, N, heads * d], k and v [B, M, heads * d].

  Returns:
    [B, N, heads * d].
  """
  b, n, inner = q.shape
  d = inner // heads
  split = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(0, 2, 1, 3)  # [B, h, N, d]
  o = _softmax_attention(split(q * jnp.asarray(d**-0.5, q.dtype)), split(k), split(v))  # [B, h, N, d]
  return o.transpose(0, 2, 1, 3).reshape(b, n, inner)


def dot_product_implementation(dtype: Any, head_dim: int, backend: str | None = None) -> str:
  """"cudnn" where cuDNN's fused attention applies (GPU, bf16/fp16, head dim a multiple of 8 up to
  128), else "xla"."""
  backend = backend or jax.default_backend()
  ok = backend == "gpu" and any(jnp.dtype(dtype) == jnp.dtype(d) for d in CUDNN_DTYPES)
  return "cudnn" if ok and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
  """`attention` through `jax.nn.dot_product_attention`: q [B, N, heads * d], k and v [B, M, heads * d].

  Returns:
    [B, N, heads * d].
  """
  b, n, inner = q.shape
  d = inner // heads
  split = lambda t: t.reshape(b, t.shape[1], heads, d)  # [B, N, h, d], the layout it takes
  impl = dot_product_implementation(q.dtype, d)
  o = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation=impl)  # [B, N, h, d]
  return o.reshape(b, n, inner)


def _group_norm_call(module: nn.GroupNorm, x, mask=None):
  channels = x.shape[-1]
  num_groups = module.num_groups if module.group_size is None else channels // module.group_size
  scale = module.param("scale", module.scale_init, (channels,), module.param_dtype) if module.use_scale else None
  bias = module.param("bias", module.bias_init, (channels,), module.param_dtype) if module.use_bias else None
  y = group_norm(x, scale, bias, num_groups, module.epsilon)
  dtype = module.dtype or jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
  return y.astype(dtype)


def _attention_call(module, impl, hidden_states, context=None, deterministic=True):
  context = hidden_states if context is None else context
  out = impl(module.query(hidden_states), module.key(context), module.value(context), module.heads)
  out = module.proj_attn(out)
  return module.dropout_layer(out, deterministic=deterministic)


def _plain_group_norm(module: nn.GroupNorm, kwargs) -> bool:
  return (module.reduction_axes is None and module.axis_name is None and kwargs.get("mask") is None
          and module.use_fast_variance)


_remat_state = threading.local()  # set while a block runs inside its own checkpoint


def _remat_call(module, policy, args, kwargs):
  """module(*args, **kwargs) under flax's lifted `nn.checkpoint`; bools and None stay static."""
  static = {k: v for k, v in kwargs.items() if v is None or isinstance(v, (bool, int, float, str))}
  arrays = {k: v for k, v in kwargs.items() if k not in static}

  def run(mdl, args, arrays):
    _remat_state.active = True
    try:
      return mdl(*args, **arrays, **static)
    finally:
      _remat_state.active = False

  return nn.checkpoint(run, policy=policy, prevent_cse=True)(module, args, arrays)


def _make_interceptor(group_norm: bool, attention_name: str, policy):
  impl = {"cpu": attention, "dot_product": dot_product}.get(attention_name)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__":
      if policy is not None and isinstance(module, REMAT_BLOCKS) and not getattr(_remat_state, "active", False):
        return _remat_call(module, policy, args, kwargs)
      if group_norm and isinstance(module, nn.GroupNorm) and _plain_group_norm(module, kwargs):
        return _group_norm_call(module, *args, **kwargs)
      if (impl is not None and isinstance(module, FlaxAttention) and not module.use_memory_efficient_attention
          and not module.split_head_dim):
        return _attention_call(module, impl, *args, **kwargs)
    return next_fun(*args, **kwargs)

  return interceptor


@contextlib.contextmanager
def fast_layers(attention: str = "auto", group_norm: bool = True, remat: str = "none") -> Any:
  """Within this context, flax GroupNorm and diffusers FlaxAttention calls take the fast paths.

  Args:
    attention: "auto", "cpu" (the fused rewrite above), "dot_product" (`jax.nn.dot_product_attention`)
      or "diffusers" (diffusers' own); "auto" is chosen by the default backend (`resolve_attention`).
    group_norm: compute GroupNorm from per-channel sums (else flax's own).
    remat: "none" or a `jax.checkpoint_policies` name applied to each UNet down / up block.
  """
  interceptor = _make_interceptor(group_norm, resolve_attention(attention), remat_policy(remat))
  with nn.intercept_methods(interceptor):
    yield
