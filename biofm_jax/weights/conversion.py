"""A public model's tensors into our parameter tree: a name map and value hooks.

A format lists one `Rule` per parameter of ours: the public tensor it comes from (a name
with `{layer}` for per-layer tensors), the public shape that tensor must have, and a hook
turning the public value into ours (a transpose, a reshape of heads, a reordering of
vocabulary rows). Per-layer tensors are read one layer at a time and written into one
array stacked on a leading layers axis, the scan axis of our stack (MaxText's
`utils/ckpt_conversion` and Levanter's `hf_checkpoints.py` do the same), so converting
holds the converted model plus one public tensor.

Every tensor of the folder must be used by a rule or named as ignorable by the format (a
contact-prediction head, rotary frequency buffers); a missing tensor, one of the wrong
shape, or one no rule knows is an error naming the file and the tensor.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Sequence

import numpy as np

from biofm_jax.weights.tensors import TensorFolder

ParamPath = tuple[str, ...]
# The published decoder bias of a public token our vocabulary has no row for (ESM's <eos>,
# Geneformer's <eos>): its logit is never the largest, so it is never predicted.
UNSEEN_LOGIT = -1e4


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our parameter `path` from the public tensor `source` (`{layer}` in per-layer names)."""
  path: ParamPath
  source: str
  public_shape: tuple[int, ...]
  hook: Callable[[np.ndarray], np.ndarray] = lambda x: x
  # When the folder lacks `source`, the tensor it stands for under tied weights (a tied
  # decoder is stored once, as the embedding).
  tied_to: str = ""
  # Ours back to the public value (publishing): the inverse of `hook`.
  inverse: Callable[[np.ndarray], np.ndarray] = lambda x: x

  @property
  def per_layer(self) -> bool:
    return "{layer}" in self.source


def transpose(x: np.ndarray) -> np.ndarray:
  """torch's Linear weight [out, in] -> flax's Dense kernel [in, out] (and back)."""
  return np.ascontiguousarray(x.T)


# Our names in a transformer layer, in the order `layer_rules` takes the public ones.
LAYER_PARTS = ("query", "key", "value", "out", "attention_norm", "wi", "wo", "mlp_norm")


def layer_rules(public: dict[str, str], d: int, f: int, h: int,
                stack: ParamPath = ("transformer", "layers")) -> list[Rule]:
  """The rules of one BERT-family layer (biased attention projections and MLP, two
  LayerNorms), stacked on the scan axis: `public` names each of `LAYER_PARTS`' torch module
  with `{layer}` in it (`"esm.encoder.layer.{layer}.attention.self.query"`)."""
  k = d // h

  def heads_back(x):  # either attention kernel -> torch's [D_out, D_in]
    return np.ascontiguousarray(x.reshape(d, d).T)

  out = []
  for name in ("query", "key", "value"):
    out += [Rule(stack + ("attention", name, "kernel"), public[name] + ".weight", (d, d),
                 lambda x: np.ascontiguousarray(x.T.reshape(d, h, k)), inverse=heads_back),
            Rule(stack + ("attention", name, "bias"), public[name] + ".bias", (d,), lambda x: x.reshape(h, k),
                 inverse=lambda x: x.reshape(d))]
  out += [Rule(stack + ("attention", "out", "kernel"), public["out"] + ".weight", (d, d),
               lambda x: np.ascontiguousarray(x.T.reshape(h, k, d)), inverse=heads_back),
          Rule(stack + ("attention", "out", "bias"), public["out"] + ".bias", (d,)),
          linear(stack + ("mlp", "wi", "kernel"), public["wi"] + ".weight", (f, d)),
          Rule(stack + ("mlp", "wi", "bias"), public["wi"] + ".bias", (f,)),
          linear(stack + ("mlp", "wo", "kernel"), public["wo"] + ".weight", (d, f)),
          Rule(stack + ("mlp", "wo", "bias"), public["wo"] + ".bias", (d,))]
  for norm in ("attention_norm", "mlp_norm"):
    out += layer_norm(stack + (norm,), public[norm], d)
  return out


def layer_norm(path: ParamPath, source: str, d: int) -> list[Rule]:
  """A LayerNorm's scale and bias (torch's weight and bias)."""
  return [Rule(path + ("scale",), source + ".weight", (d,)), Rule(path + ("bias",), source + ".bias", (d,))]


def take_rows(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Vocabulary rows in our ids' order: row i is public row ids[i], zeros where ids[i] < 0
  (a token of ours the public model has no row for)."""
  out = x[np.maximum(ids, 0)]
  out[ids < 0] = 0
  return np.ascontiguousarray(out)


def put_rows(x: np.ndarray, ids: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
  """The inverse of `take_rows`: our rows at their public ids among `size`, `fill` elsewhere."""
  out = np.full((size,) + x.shape[1:], fill, x.dtype)
  out[ids[ids >= 0]] = x[ids >= 0]
  return out


def linear(path: ParamPath, source: str, shape: tuple[int, int]) -> Rule:
  """A torch Linear's weight [out, in] as a flax Dense kernel [in, out]."""
  return Rule(path, source, shape, transpose, inverse=transpose)


def convert(tensors: TensorFolder, rules: Sequence[Rule], num_layers: int,
            ignored: Iterable[str] = (), dtype=np.float32) -> dict[ParamPath, np.ndarray]:
  """{our parameter path: float32 array}, per-layer ones stacked [num_layers, ...]."""
  ignored_patterns = [re.compile(p) for p in ignored]
  used = set()
  out: dict[ParamPath, np.ndarray] = {}
  for rule in rules:
    names = [rule.source.format(layer=i) for i in range(num_layers)] if rule.per_layer else [rule.source]
    stacked = None
    for i, name in enumerate(names):
      value = _read(tensors, rule, name, used).astype(dtype, copy=False)
      value = rule.hook(value)
      if not rule.per_layer:
        out[rule.path] = np.asarray(value, dtype)
        break
      if stacked is None:
        stacked = np.empty((num_layers,) + value.shape, dtype)
      stacked[i] = value
    if stacked is not None:
      out[rule.path] = stacked
  extra = [n for n in tensors.names if n not in used and not any(p.fullmatch(n) for p in ignored_patterns)]
  if extra:
    raise ValueError(f"{tensors.where(extra[0])}: tensor {extra[0]!r} is not part of this format's "
                     f"architecture ({len(extra)} such tensors; the config may name another architecture)")
  return out


def legacy_name(name: str) -> str:
  """A LayerNorm's tensor under its TensorFlow-era name (`gamma`, `beta`), which checkpoints
  saved by older tools, and `save_pretrained` of some transformers 5 models, still use."""
  if "LayerNorm." in name:
    return re.sub(r"\.weight$", ".gamma", re.sub(r"\.bias$", ".beta", name))
  return name


def _read(tensors: TensorFolder, rule: Rule, name: str, used: set) -> np.ndarray:
  source = name
  if name not in tensors:
    if legacy_name(name) in tensors:
      source = legacy_name(name)
    elif rule.tied_to and rule.tied_to in tensors:
      source = rule.tied_to
    else:
      raise ValueError(f"{tensors.folder}: tensor {name!r} is missing")
  shape = tensors.shape(source)
  if shape != tuple(rule.public_shape):
    raise ValueError(f"{tensors.where(source)}: tensor {source!r} has shape {list(shape)}, "
                     f"expected {list(rule.public_shape)} from the config")
  used.add(source)
  return tensors.get(source)


def publish(params: dict[ParamPath, np.ndarray], rules: Sequence[Rule], num_layers: int,
            dtype=np.float32) -> dict[str, np.ndarray]:
  """The public tensors {name: array} of our parameters: each rule's `inverse`, per layer
  for the stacked ones (the other direction of `convert`)."""
  out: dict[str, np.ndarray] = {}
  for rule in rules:
    value = np.asarray(params[rule.path], dtype)
    if rule.per_layer:
      for i in range(num_layers):
        out[rule.source.format(layer=i)] = np.ascontiguousarray(rule.inverse(value[i]), dtype)
    else:
      out[rule.source] = np.ascontiguousarray(rule.inverse(value), dtype)
    if tuple(out[rule.source.format(layer=0)].shape) != tuple(rule.public_shape):
      raise ValueError(f"{'/'.join(rule.path)}: published as {list(out[rule.source.format(layer=0)].shape)}, "
                       f"the public model holds {list(rule.public_shape)}")
  return out
