"""Time-to-event pre-training (MOTOR style): the likelihood, the host targets, packing, the
causal head, and a run that learns and fine-tunes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.tree_util as tree
import ml_collections
import numpy as np
import optax
import pytest

import helpers
from biofm_jax.config import load_config
from biofm_jax.data import batch as B
from biofm_jax.data import packing
from biofm_jax.eval.finetuned import score_finetuned
from biofm_jax.modalities.ehr import data as ehr
from biofm_jax.modalities.ehr import tte_targets as tte
from biofm_jax.modalities.ehr.encoder import EHREncoder
from biofm_jax.modalities.ehr.model import EHRTimeToEventModality, TimeToEventSpec
from biofm_jax.modalities.ehr.vocab import EHRVocab
from biofm_jax.models.layers import TransformerConfig
from biofm_jax.models.model import SingleModalityModel
from biofm_jax.objectives.motor import (TimeToEventModelling, check_bin_starts, dense_targets,
                                                piecewise_exponential_nll, prediction_positions)
from biofm_jax.train.finetune import (build_finetune_training, finetune, finetune_config, load_pretrained,
                                      open_labeled_data)
from biofm_jax.train.loop import train_and_evaluate
from biofm_jax.train.runs import open_run

STARTS = (0.0, 7.0, 30.0, 365.0)


# ---------------------------------------------------------------- the likelihood
def reference_nll(log_hazard, days, event, starts):
  """Closed form per (point, task): exposure-weighted hazards minus the event bin's log-hazard."""
  edges = list(starts) + [np.inf]
  out = np.zeros(days.shape)
  for idx in np.ndindex(days.shape):
    t, total = days[idx], 0.0
    for j in range(len(starts)):
      rate = np.exp(log_hazard[idx[:-1] + (j, idx[-1])])
      total += rate * min(max(t - edges[j], 0.0), edges[j + 1] - edges[j])
      if event[idx] and edges[j] <= t < edges[j + 1]:
        total -= np.log(rate)
    out[idx] = total
  return out


def test_piecewise_exponential_likelihood_matches_the_closed_form_and_is_exact_for_constant_hazards():
  rng = np.random.default_rng(0)
  log_hazard = rng.normal(-4, 1, (3, 2, len(STARTS), 5)).astype(np.float32)
  days = rng.choice([0.5, 6.9, 7.0, 29.0, 100.0, 365.0, 2000.0], (3, 2, 5)).astype(np.float32)
  event = rng.random((3, 2, 5)) < 0.5
  got = np.asarray(piecewise_exponential_nll(jnp.asarray(log_hazard), jnp.asarray(days), jnp.asarray(event), STARTS))
  np.testing.assert_allclose(got, reference_nll(log_hazard, days, event, STARTS), rtol=1e-5)
  # One constant hazard is an exponential: -log f(t) = lambda t - log lambda, -log S(t) = lambda t.
  lam = 0.01
  flat = np.full((1, len(STARTS), 2), np.log(lam), np.float32)
  nll = piecewise_exponential_nll(jnp.asarray(flat), jnp.asarray([[50.0, 50.0]]), jnp.asarray([[True, False]]), STARTS)
  np.testing.assert_allclose(np.asarray(nll)[0], [lam * 50 - np.log(lam), lam * 50], rtol=1e-5)
  with pytest.raises(ValueError, match="0 first and strictly increasing"):
    check_bin_starts([1.0, 7.0])
  with pytest.raises(ValueError, match="strictly increasing"):
    check_bin_starts([0.0, 7.0, 7.0])


# ---------------------------------------------------------------- the host targets
def _day(d):
  return np.datetime64("2020-01-01", "us") + np.timedelta64(int(d * 86400), "s")


def _vocab():
  # Counts order the codes: A most frequent, then B, C, D.
  return EHRVocab.from_counts({"A": 9, "B": 8, "C": 7, "D": 6}, {}, min_count=1, num_value_bins=2)


def _record(codes, days, future=((), ())):
  return {"subject_id": 1, "codes": np.asarray(codes, dtype=object),
          "times": np.asarray([np.datetime64("NaT", "us") if d is None else _day(d) for d in days]),
          "numeric_values": np.full(len(codes), np.nan, np.float32),
          "future_codes": np.asarray(future[0], dtype=object),
          "future_times": np.asarray([_day(d) for d in future[1]], "datetime64[us]")}


def _targets(max_len=8, points=8, events=64, tasks=3):
  vocab = _vocab()
  return tte.TimeToEventTargets.for_vocab(ehr.TokenizeEHR(vocab, max_len), vocab, tte.task_codes(vocab, tasks),
                                          points=points, events=events)


def _points(out):
  """{token position: (follow-up days, {task: days})}."""
  found = {}
  for p in np.flatnonzero(out[B.TTE_PREDICT]):
    entries = out[B.TTE_EVENT_MASK] & (out[B.TTE_EVENT_POS] == p)
    found[int(p)] = (float(out[B.TTE_FOLLOWUP_DAYS][p]),
                     dict(zip(out[B.TTE_EVENT_TASK][entries].tolist(), out[B.TTE_EVENT_DAYS][entries].tolist())))
  return found


def test_targets_are_each_tasks_first_occurrence_after_the_point_with_censoring_at_the_records_end():
  assert tte.task_codes(_vocab(), 3) == ["A", "B", "C"]
  # Static row, then events at days 0, 0, 10, 40; and after the window, 100 (B) and 400 (A, D).
  record = _record(["STATIC", "A", "D", "B", "A"], [None, 0, 0, 10, 40], future=(["B", "A", "D"], [100, 400, 400]))
  out = _targets().map(record)
  # Points end a timestamp: token 3 (the second day-0 event, D), 4 (day 10), 5 (day 40).
  # Token 2 (day 0, A) shares its time with token 3, so it is not one.
  points = _points(out)
  assert sorted(points) == [3, 4, 5]
  assert points[3] == (400.0, {1: 10.0, 0: 40.0})  # B at 10, A at 40; C never: censored at 400
  assert points[4] == (390.0, {0: 30.0, 1: 90.0})  # the point's own B does not count; the next B does
  assert points[5] == (360.0, {1: 60.0, 0: 360.0})  # A's first occurrence after day 40 is day 400
  # The tokens the model reads are the tokeniser's, untouched.
  plain = ehr.TokenizeEHR(_vocab(), 8).map(record)
  for name in plain:
    np.testing.assert_array_equal(out[name], plain[name])


def test_a_point_with_more_tasks_ahead_than_room_is_censored_where_room_runs_out():
  record = _record(["A", "B", "C", "A"], [0, 5, 9, 20])
  # Room for 1 entry in an example of 5 tokens (events * tokens // max_len = 3 * 5 // 8), one point.
  out = _targets(points=1, events=3).map(record)
  (p, (follow, events)), = _points(out).items()
  # One point, evenly chosen among tokens 1..3 (the last event has no future): the first.
  assert p == 1 and follow == 9.0 and events == {1: 5.0}
  # A with room: every task.
  out = _targets(points=1, events=64).map(record)
  assert _points(out)[1] == (20.0, {1: 5.0, 2: 9.0, 0: 20.0})


def test_records_without_a_future_give_no_points_and_bad_settings_are_refused():
  out = _targets().map(_record(["A", "B"], [3, 3]))
  assert not out[B.TTE_PREDICT].any() and not out[B.TTE_EVENT_MASK].any()
  with pytest.raises(ValueError, match="tte_points=0"):
    _targets(points=0)
  with pytest.raises(ValueError, match="tte_tasks=0"):
    tte.task_codes(_vocab(), 0)


def test_dense_targets_censor_every_task_but_the_observed_ones():
  record = _record(["STATIC", "A", "D", "B", "A"], [None, 0, 0, 10, 40], future=(["B", "A", "D"], [100, 400, 400]))
  out = _targets().map(record)
  seq = {k: jnp.asarray(v[None]) for k, v in out.items()}
  days, event, valid = (np.asarray(x)[0] for x in dense_targets(seq, points=4, num_tasks=3))
  assert valid.tolist() == [True, True, True, False]
  np.testing.assert_allclose(days[:3], [[40, 10, 400], [30, 90, 390], [360, 60, 360]])
  assert event[:3].tolist() == [[True, True, False], [True, True, False], [True, True, False]]
  # Only two points fit: the third point's entries are dropped with it.
  days, event, valid = (np.asarray(x)[0] for x in dense_targets(seq, points=2, num_tasks=3))
  assert valid.tolist() == [True, True] and event.sum() == 4


# ---------------------------------------------------------------- packing and the causal head
LEN, VOCAB_SIZE = 16, 12


def _model(points=6):
  cfg = TransformerConfig(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_len=LEN, causal=True)
  spec = TimeToEventSpec(tasks=5, bins=len(STARTS), rank=4, points=points)
  return helpers.Jitted(SingleModalityModel(cfg, EHRTimeToEventModality("ehr", VOCAB_SIZE, 2, LEN, encoder=EHREncoder,
                                                                        time_to_event=spec)))


def _examples(rng, n, events=16):
  vocab = EHRVocab.from_counts({c: 20 - i for i, c in enumerate("ABCDEFGH")}, {}, min_count=1, num_value_bins=2)
  make = tte.TimeToEventTargets.for_vocab(ehr.TokenizeEHR(vocab, LEN), vocab, list("ABCDE"), points=6, events=events)
  out = []
  for _ in range(n):
    k = int(rng.integers(3, LEN))
    days = np.sort(rng.choice(np.arange(200), k, replace=False)).tolist()
    future_days = (days[-1] + np.arange(1, 4) * 30).tolist()
    out.append(make.map(_record(rng.choice(list("ABCDEFGH"), k).tolist(), days,
                                future=(rng.choice(list("ABCDEFGH"), 3).tolist(), future_days))))
  return out


def _losses(model, params, examples, points):
  batch = {"ehr": {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}}
  objective = TimeToEventModelling(num_tasks=5, points=points, bin_starts=STARTS)
  outputs = model.apply({"params": params}, batch)
  return objective.sums(outputs, batch)["tte_loss"], objective.counts(batch)["tte_loss"]


def test_a_packed_row_gives_each_example_its_own_time_to_event_loss():
  rng = np.random.default_rng(3)
  examples = _examples(rng, 8)
  lengths = [int(e[B.EHR_MASK].sum()) for e in examples]
  items, starts = packing.plan_rows(np.array(lengths), LEN)
  rows = [packing.pack_examples([examples[i] for i in items[a:b]], LEN) for a, b in zip(starts[:-1], starts[1:])]
  assert len(rows) < len(examples)
  assert sum(int(r[B.TTE_EVENT_MASK].sum()) for r in rows) == sum(int(e[B.TTE_EVENT_MASK].sum()) for e in examples)
  alone = [packing.OneSegment().map(e) for e in examples]
  model = _model()
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v[None]) for k, v in alone[0].items()}})["params"]
  loss_alone, count_alone = _losses(model, params, alone, points=6)
  loss_packed, count_packed = _losses(model, params, rows, points=6)
  assert float(count_alone) == float(count_packed) > 0
  np.testing.assert_allclose(float(loss_packed), float(loss_alone), rtol=1e-5)


def test_a_prediction_point_never_sees_the_events_after_it():
  rng = np.random.default_rng(4)
  example = _examples(rng, 1)[0]
  model = _model()
  batch = {"ehr": {k: jnp.asarray(v[None]) for k, v in example.items()}}
  params = model.init(jax.random.key(1), batch)["params"]
  first = int(np.flatnonzero(example[B.TTE_PREDICT])[0])
  changed = dict(example)
  changed[B.EHR_CODES] = example[B.EHR_CODES].copy()
  changed[B.EHR_CODES][first + 1:] = np.where(example[B.EHR_MASK][first + 1:], 4, 0)
  hazards = [np.asarray(model.apply({"params": params}, {"ehr": {k: jnp.asarray(v[None]) for k, v in e.items()}})
                        ["ehr"]["tte_log_hazard"])[0, 0] for e in (example, changed)]
  np.testing.assert_allclose(hazards[0], hazards[1], rtol=1e-6)
  assert "code_logits" not in model.apply({"params": params}, batch)["ehr"]


def test_the_model_learns_a_hazard_that_the_history_plants():
  """Subjects whose history starts with code H get task A 3 days after each of their
  visits, the others never: the model must tell them apart from the history alone."""
  rng = np.random.default_rng(5)
  vocab = EHRVocab.from_counts({c: 20 - i for i, c in enumerate("ABCDEFGH")}, {}, min_count=1, num_value_bins=2)
  make = tte.TimeToEventTargets.for_vocab(ehr.TokenizeEHR(vocab, LEN), vocab, list("ABCDE"), points=6, events=16)
  examples, planted = [], []
  for i in range(64):
    k = int(rng.integers(4, LEN))
    days = (np.arange(k) * 20).tolist()
    codes = rng.choice(list("DEFG"), k).tolist()
    if i % 2:
      codes[0] = "H"
    future = (["A" if i % 2 else "B"] * 1, [days[-1] + 3])
    record = _record(codes, days, future)
    if i % 2:
      record = _record(sum(([c, "A"] for c in codes), []), sum(([d, d + 3] for d in days), []), future)
    examples.append(make.map(record))
    planted.append(bool(i % 2))
  batch = {"ehr": {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}}
  model = _model()
  objective = TimeToEventModelling(num_tasks=5, points=6, bin_starts=STARTS)
  params = model.init(jax.random.key(0), batch)["params"]
  optimizer = optax.adam(3e-3)

  def loss_fn(p):
    return objective.sums(model.apply({"params": p}, batch), batch)["tte_loss"] / objective.counts(batch)["tte_loss"]

  @jax.jit
  def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(p, updates), state, loss

  state, losses = optimizer.init(params), []
  for _ in range(300):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]
  hazards = np.exp(np.asarray(model.apply({"params": params}, batch)["ehr"]["tte_log_hazard"]))  # [B, P, J, K]
  _, valid = prediction_positions(batch["ehr"][B.TTE_PREDICT], 6)
  # Task A's cumulative hazard over the 30 days after each point (bins [0, 7) and [7, 30)):
  # planted subjects have A within 30 days of every point, the others never.
  within_30 = np.log(7 * hazards[..., 0, 0] + 23 * hazards[..., 1, 0])
  planted = np.broadcast_to(np.array(planted)[:, None], within_30.shape)
  valid = np.asarray(valid)
  assert within_30[planted & valid].min() > within_30[~planted & valid].max() + 2.0


# ---------------------------------------------------------------- the data module
def test_ehr_data_trains_time_to_event_over_packed_windows_and_keeps_its_tasks(tmp_path):
  from biofm_jax.data import pipeline
  cfg = ml_collections.ConfigDict(dict(
      path="", synthetic_subjects=80, synthetic_seed=0, max_len=32, window="recent", train_windows="cover",
      window_overlap=0.25, min_code_count=2, num_value_bins=4, mask_rate=0.15, pack=True,
      tte_tasks=20, tte_points=4, tte_events=64))
  data = ehr.EHRData.from_config(cfg, targets="time_to_event", artifacts_dir=tmp_path)
  assert data.model_info()["ehr"]["tte_tasks"] == 20
  spec = data.example_spec()["ehr"]
  assert spec[B.TTE_EVENT_POS] == ((64,), np.int32) and spec[B.TTE_PREDICT] == ((32,), np.bool_)
  row = next(pipeline.make_iterator(data.make_train_dataset(global_batch_size=4, seed=0)))["ehr"]
  B.check_example({k: v[0] for k, v in row.items()}, spec, "packed row")
  assert row[B.TTE_PREDICT].sum() > 0 and row[B.TTE_EVENT_MASK].sum() > 0
  # Every event entry belongs to a prediction point of its row, and happens after it.
  for r in range(4):
    positions = row[B.TTE_EVENT_POS][r][row[B.TTE_EVENT_MASK][r]]
    assert row[B.TTE_PREDICT][r][positions].all()
    assert (row[B.TTE_EVENT_DAYS][r][row[B.TTE_EVENT_MASK][r]] > 0).all()
  assert (tmp_path / tte.TASKS_FILENAME).exists()
  cfg.tte_tasks = 10
  with pytest.raises(ValueError, match="time-to-event tasks .* differ"):
    ehr.EHRData.from_config(cfg, targets="time_to_event", artifacts_dir=tmp_path)


# ---------------------------------------------------------------- pre-train, then fine-tune
def test_a_survival_task_fine_tunes_from_a_time_to_event_checkpoint(tmp_path):
  config = helpers.config_for("configs/ehr_motor.py:tiny", train__num_steps=300, train__eval_every=300,
                              train__log_every=100, data__ehr__synthetic_subjects=600, checkpoint__every_steps=300)
  train_and_evaluate(config, tmp_path / "motor")
  flat = {**helpers.QUIET, "finetune.mode": "full"}
  task = finetune_config(load_config(f"{helpers.REPO}/configs/finetune.py:survival,tiny", flat), tmp_path / "motor")
  # The backbone is the checkpoint's (the hazard head stays behind: tasks read the hidden states).
  _, _, _, pretrained_params, _ = open_run(tmp_path / "motor")
  data = open_labeled_data(task, tmp_path / "ft_artifacts")
  setup = build_finetune_training(task, data)
  backbone = load_pretrained(setup.init_state(0), setup, tmp_path / "motor").params["backbone"]
  assert "tte_head" in pretrained_params and "tte_head" not in backbone
  for path, value in tree.tree_leaves_with_path(backbone):
    np.testing.assert_array_equal(np.asarray(value), np.asarray(_at(pretrained_params, path)))
  finetune(task, tmp_path / "survival")
  scores = score_finetuned(tmp_path / "survival", task)
  # 60 held-out subjects: 0.59 here; the C-index comparison at 16, 128 and all labels is
  # benchmarks/motor_cindex.py's (RESULTS.md).
  assert scores["held_out"]["c_index"] > 0.55, scores


def _at(tree_, path):
  """The leaf of `tree_` at a key path of another tree with the same keys."""
  for key in path:
    tree_ = tree_[key.key]
  return tree_


# ---------------------------------------------------------------- points of packed rows
def _short_windows(n, events=4, start_day=0):
  """n windows of `events` timed events (5 tokens with CLS), each with a future after it."""
  return [_record(["A", "B", "C", "D"][:events], [start_day + 10 * w + d for d in range(events)],
                  future=(["A"], [start_day + 10 * w + 100])) for w in range(n)]


def test_share_points_never_exceeds_the_rows_points_and_gives_each_window_its_share():
  tokens = np.array([5] * 6)  # six 5-token windows in a 32-token row with 2 points: 0.3125 each
  totals, per_window = [], np.zeros(6)
  for offset in range(32):  # every offset once: the exact expectation over a uniform offset
    got = tte.share_points(tokens, 2, 32, offset)
    totals.append(int(got.sum()))
    per_window += got
  assert max(totals) == 2 and min(totals) == 1
  np.testing.assert_allclose(per_window / 32, 6 * [5 * 2 / 32])  # every window, not the first ones
  np.testing.assert_array_equal(tte.share_points(np.array([32]), 16, 32, 7), [16])
  np.testing.assert_array_equal(tte.share_points(np.array([20, 12]), 4, 32, 0), [2, 2])  # 2.5 + 1.5
  np.testing.assert_array_equal(tte.share_points(np.array([10, 6]), 4, 32, 0), [1, 1])  # 1.25 + 0.75
  with pytest.raises(ValueError, match="do not fit a row of 32"):
    tte.share_points(np.array([30, 5]), 2, 32, 0)


def test_a_packed_row_of_short_windows_keeps_every_prediction_point_it_flags():
  targets = _targets(max_len=32, points=2, events=64)
  pack = tte.PackTimeToEvent(targets)
  row = {packing.SEGMENTS: _short_windows(6)}
  flagged, by_segment = [], np.zeros(6)
  for seed in range(64):
    out = pack.random_map(row, np.random.default_rng(seed))
    flags = out[B.TTE_PREDICT]
    flagged.append(int(flags.sum()))
    by_segment += np.bincount(out[B.SEGMENT_IDS][flags], minlength=7)[1:]
    # dense_targets reads the first `points` flags: every flag of the row is read.
    seq = {k: jnp.asarray(v[None]) for k, v in out.items()}
    _, event, valid = dense_targets(seq, points=2, num_tasks=3)
    assert int(np.asarray(valid).sum()) == int(flags.sum())
    assert int(np.asarray(event).sum()) == int(out[B.TTE_EVENT_MASK].sum())
  assert max(flagged) <= 2 and min(flagged) >= 1
  assert (by_segment > 0).all()  # the last (and shortest-placed) windows get points too
  # Each window alone in its row still gets a point.
  assert targets.map(_short_windows(1)[0])[B.TTE_PREDICT].sum() == 1


def test_the_packed_time_to_event_stream_never_overfills_a_row(tmp_path):
  from biofm_jax.data import pipeline
  cfg = ml_collections.ConfigDict(dict(
      path="", synthetic_subjects=60, synthetic_seed=0, max_len=128, window="recent", train_windows="cover",
      window_overlap=0.25, min_code_count=2, num_value_bins=4, mask_rate=0.15, pack=True,
      tte_tasks=10, tte_points=2, tte_events=64))
  data = ehr.EHRData.from_config(cfg, targets="time_to_event", artifacts_dir=tmp_path)
  rows = len(data.packed_training_source())  # 50 rows, 13 of them of 2 to 4 windows under 64 tokens
  batch = next(pipeline.make_iterator(data.make_train_dataset(global_batch_size=rows, seed=0)))["ehr"]
  assert batch[B.SEGMENT_IDS].max(axis=1).max() >= 3  # rows of several short windows: those that overflowed
  flags = batch[B.TTE_PREDICT].sum(axis=1)
  assert flags.max() <= 2 and flags.sum() > rows
