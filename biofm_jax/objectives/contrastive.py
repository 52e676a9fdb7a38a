"""Cross-modal contrastive alignment (CLIP / InfoNCE and SigLIP) between pairs of modalities.

For each configured pair (a, b) the model projects both modalities of every subject to a
shared space; this objective normalises the projections and pulls a subject's two views
together while pushing apart views of different subjects in the batch:

- "clip": symmetric softmax cross-entropy over the similarity matrix (Radford et al.
  2021): logits = exp(logit_scale) * a_n @ b_n.T; each subject's loss is the mean of its
  row CE and its column CE, both with the subject itself as the target.
- "siglip": pairwise sigmoid (Zhai et al. 2023): logits = exp(logit_scale) * a_n @ b_n.T
  + logit_bias; every (i, j) is a binary problem with label +1 on the diagonal and -1
  elsewhere; the loss is the sum over all pairs divided by the number of subjects n.

Contract with the model: `outputs["contrastive"][modality]` is the float [B, P]
projection, not yet normalised; `outputs["contrastive"]["logit_scale"]` and
`["logit_bias"]` are scalar parameters. A subject enters pair (a, b) only when
`batch[a][PRESENT]` and `batch[b][PRESENT]` both hold; otherwise it is no row, no column
(no one's negative) and no count, and its embeddings get exactly zero gradient. A batch
that leaves a or b out altogether (batching by availability pattern) has no terms for
the pair.

Terms: f"{a}_{b}_contrastive" (sum of per-subject losses, count n; weighted `weight`
each, so every pair is a loss of its own, like separate objectives, and adding a pair
does not dilute the others) and f"{a}_{b}_top1" (a -> b retrieval accuracy among the
pair's valid candidates; a metric, not in `loss_weights`).

Global-batch negatives: `sums` is a plain `a @ b.T` over the global [B, P] arrays. Under
`jax.jit` with the batch sharded over the mesh's batch axes, GSPMD gathers what it needs,
so every subject has all the other valid subjects of the global batch as negatives and
the loss does not depend on the mesh.

Gradient accumulation: `train_step` calls `sums` once per strided micro-batch, so with
`train.grad_accum_steps` > 1 a subject's negatives are those of its micro-batch only,
while the count stays the whole batch's (base.py). That is the mean of a loss with fewer
negatives: a different, easier objective (lower values, weaker negatives), not the
full-batch update that every other objective here gets from accumulation. The exact rule
is gradient caching (GradCache, Gao et al. 2021): embed all micro-batches without keeping
activations, compute this loss and its gradient w.r.t. the [B, P] embeddings (and the
scale and bias) on the whole batch, then re-run each micro-batch's forward and
back-propagate its slice of those cotangents with `jax.vjp`: one extra forward pass, and
the update equals the full-batch one. It needs the train step to split the model at the
projections; until then, grow contrastive batches with devices, not accumulation.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.objectives.base import Evaluation, ObjectiveDefaults
from biofm_jax.objectives.retrieval import CrossModalRetrieval

LOSSES = ("clip", "siglip")
FIELD = "objective.contrastive"
# Masked logits get a finite fill (not -inf) so that an excluded subject's row and column
# losses come out as 0 rather than inf or NaN (-inf - -inf); they are then discarded with
# `jnp.where`, never by `* 0`, so nothing from them reaches a gradient.
MASKED_LOGIT = float(jnp.finfo(jnp.float32).min)


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
  """"ehr-imaging,ehr-omics" -> (("ehr", "imaging"), ("ehr", "omics"))."""
  pairs = []
  for item in str(text).split(","):
    parts = tuple(part.strip() for part in item.split("-"))
    if len(parts) != 2 or not all(parts):
      raise ValueError(f"{FIELD}.pairs={text!r}: {item.strip()!r} is not a pair; expected comma-separated "
                       f"'modality-modality' pairs such as 'ehr-imaging,ehr-omics'")
    pairs.append(parts)
  return tuple(pairs)


def pairs_of_configured_modalities(text: str, modalities) -> tuple[tuple[str, str], ...]:
  """`parse_pairs(text)`, refusing a pair that names a modality not among `modalities`."""
  pairs = parse_pairs(text)
  unknown = sorted({m for pair in pairs for m in pair} - set(modalities))
  if unknown:
    raise ValueError(f"{FIELD}.pairs names {unknown}, which are not among the configured modalities "
                     f"{sorted(modalities)}; list pairs of configured modalities only")
  return pairs


def _validated_pair(pair) -> tuple[str, str]:
  if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(m, str) and m for m in pair):
    raise ValueError(f"{FIELD}.pairs: {pair!r} is not a pair of two modality names")
  if pair[0] == pair[1]:
    raise ValueError(f"{FIELD}.pairs: {pair!r} pairs modality {pair[0]!r} with itself")
  return tuple(pair)


def _validated_pairs(pairs) -> tuple[tuple[str, str], ...]:
  pairs = tuple(_validated_pair(pair) for pair in (parse_pairs(pairs) if isinstance(pairs, str) else pairs))
  if not pairs:
    raise ValueError(f"{FIELD}.pairs is empty; name at least one pair such as 'ehr-imaging'")
  if len(set(pairs)) != len(pairs):
    raise ValueError(f"{FIELD}.pairs={pairs!r} names a pair twice")
  return pairs


def _is_finite_non_negative(value) -> bool:
  try:
    return 0.0 <= float(value) < float("inf")
  except (TypeError, ValueError):
    return False


def term_prefix(pair: tuple[str, str]) -> str:
  return f"{pair[0]}_{pair[1]}"


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / max(|x|, eps) per row: a zero row stays zero (no NaN, finite gradient)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def similarity(a: jax.Array, b: jax.Array, valid: jax.Array) -> jax.Array:
  """Cosine similarities [B, B] of valid rows; an excluded subject's row and column are 0.

  Excluded embeddings are replaced before any arithmetic, so whatever they hold (inf,
  NaN, huge) reaches neither the loss nor, through `where`'s zero cotangent, a gradient.
  """
  a = l2_normalize(jnp.where(valid[:, None], a.astype(jnp.float32), 0.0))
  b = l2_normalize(jnp.where(valid[:, None], b.astype(jnp.float32), 0.0))
  # Full float32 precision: the scale (up to ~100) amplifies matmul rounding (TF32 on
  # GPUs by default), and a B x B x P product is cheap next to the encoders.
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def clip_row_losses(logits: jax.Array, pair_mask: jax.Array) -> jax.Array:
  """Per subject: (CE of row i + CE of column i) / 2, target i, over valid candidates."""
  masked = jnp.where(pair_mask, logits, MASKED_LOGIT)
  target = jnp.diagonal(masked)  # = the logit for valid subjects; the fill for excluded ones
  row = jax.nn.logsumexp(masked, axis=1) - target
  column = jax.nn.logsumexp(masked, axis=0) - target
  return 0.5 * (row + column)


def siglip_row_losses(logits: jax.Array, pair_mask: jax.Array) -> jax.Array:
  """Per subject i: sum over valid j of -log sigmoid(z_ij * logits_ij), z = +1 iff i == j."""
  labels = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
  pair_losses = -jax.nn.log_sigmoid(labels * logits)
  return jnp.sum(jnp.where(pair_mask, pair_losses, 0.0), axis=1)


def top1_hits(logits: jax.Array, pair_mask: jax.Array) -> jax.Array:
  """Per subject: 1 where its a-view retrieves its own b-view among valid candidates."""
  masked = jnp.where(pair_mask, logits, MASKED_LOGIT)
  return (jnp.argmax(masked, axis=1) == jnp.arange(logits.shape[0])).astype(jnp.float32)


def pair_sums(loss: str, a: jax.Array, b: jax.Array, valid: jax.Array, logit_scale: jax.Array,
              logit_bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of per-subject losses, sum of top-1 hits) over the valid subjects of one pair."""
  pair_mask = valid[:, None] & valid[None, :]
  logits = jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * similarity(a, b, valid)
  if loss == "clip":
    per_row = clip_row_losses(logits, pair_mask)
  else:
    logits = logits + jnp.asarray(logit_bias, jnp.float32)
    per_row = siglip_row_losses(logits, pair_mask)
  loss_sum = jnp.sum(jnp.where(valid, per_row, 0.0))
  hits = jnp.sum(jnp.where(valid, top1_hits(logits, pair_mask), 0.0))
  return loss_sum, hits


@dataclasses.dataclass(frozen=True)
class ContrastiveAlignment(ObjectiveDefaults):
  """Contrastive alignment of each pair in `pairs` (order kept), with loss "clip" or "siglip".

  `pairs` may also be given as a string "a-b,c-d" (see `parse_pairs`).
  """
  pairs: tuple[tuple[str, str], ...]
  loss: str = "clip"
  weight: float = 1.0
  name: str = "contrastive"

  def __post_init__(self):
    object.__setattr__(self, "pairs", _validated_pairs(self.pairs))
    if self.loss not in LOSSES:
      raise ValueError(f"{FIELD}.loss={self.loss!r} is not one of {LOSSES}")
    if not _is_finite_non_negative(self.weight):
      raise ValueError(f"{FIELD}.weight={self.weight!r} must be a finite number >= 0")

  @property
  def loss_weights(self):
    return {f"{term_prefix(pair)}_contrastive": float(self.weight) for pair in self.pairs}

  def final_evaluations(self) -> tuple[Evaluation, ...]:
    """Aligned towers find a subject's other modalities: recall@k on held-out subjects."""
    return (CrossModalRetrieval(self.pairs),)

  def _valid(self, batch, pair) -> jax.Array:
    return jnp.asarray(batch[pair[0]][B.PRESENT], bool) & jnp.asarray(batch[pair[1]][B.PRESENT], bool)

  def counts(self, batch):
    counts = {}
    for pair in self.pairs:
      if _holds(batch, pair):
        n = self._valid(batch, pair).astype(jnp.float32).sum()
        counts.update({f"{term_prefix(pair)}_contrastive": n, f"{term_prefix(pair)}_top1": n})
    return counts

  def sums(self, outputs, batch):
    out = outputs.get("contrastive", {})
    sums = {}
    for pair in self.pairs:
      if _holds(batch, pair):
        loss_sum, hits = pair_sums(self.loss, out[pair[0]], out[pair[1]], self._valid(batch, pair),
                                   out["logit_scale"], out.get("logit_bias", 0.0))
        sums.update({f"{term_prefix(pair)}_contrastive": loss_sum, f"{term_prefix(pair)}_top1": hits})
    return sums


def _holds(batch, pair) -> bool:
  """Whether the batch has both modalities of `pair` (a batch by pattern may leave one out)."""
  return pair[0] in batch and pair[1] in batch
