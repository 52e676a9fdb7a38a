"""Cross-modal retrieval after multimodal pre-training: far above chance on unseen subjects.

In its own file so the parallel test runner can run it beside the other multimodal tests.
"""
import json

import helpers
from test_multimodal_training import SPEC


# A CPU-sized run that learns cross-modal structure: more subjects than the tiny preset (so
# the towers generalise rather than memorise), wider towers, larger contrastive batches.
RETRIEVAL_RUN = dict(data__multimodal__synthetic_subjects=1000, model__embed_dim=64, data__batch_size=64,
                     train__learning_rate=5e-3, train__num_steps=300, train__eval_every=300, train__log_every=50,
                     checkpoint__every_steps=300,
                     data__ehr__max_len=64, data__omics__max_len=64, data__imaging__mask_ratio=0.5)


def test_cross_modal_retrieval_is_far_above_chance_on_unseen_subjects(tmp_path):
  """From a tuning-split subject's EHR embedding, find the same subject's image, expression
  profile and feature row (and image -> features) among all tuning subjects with both."""
  overrides = {k.replace("__", "."): v for k, v in RETRIEVAL_RUN.items()}
  # Fully optimised code (helpers.OPTIMISED_ENV) on one CPU device: this run compares with nothing.
  process = helpers.start_pretrain(SPEC, tmp_path / "run", overrides, tmp_path / "log.txt", env=helpers.OPTIMISED_ENV)
  assert process.wait(timeout=600) == 0, (tmp_path / "log.txt").read_text()[-3000:]
  summary = {k: v for row in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) for k, v in row.items()}
  assert "cross-modal retrieval ehr->imaging: recall@10" in (tmp_path / "log.txt").read_text()
  # Seen on this CPU (300 steps): ehr->imaging 3.1x chance, ehr->omics 3.6x, ehr->tabular 4.6x,
  # imaging->tabular 2.6x (image features of the latent are the hardest to learn from MAE views).
  for pair, factor in (("ehr->imaging", 2.5), ("ehr->omics", 2.5), ("ehr->tabular", 2.5), ("imaging->tabular", 1.5)):
    recall, chance = summary[f"retrieval/{pair}/recall@10"], summary[f"retrieval/{pair}/chance@10"]
    print(f"{pair}: recall@10 {recall:.3f}, chance {chance:.3f} ({recall / chance:.1f}x)")
    assert recall > factor * chance, pair
