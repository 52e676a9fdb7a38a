"""Prepares a modality's data once, as a TFDS dataset in ArrayRecord format, for training
where parsing raw files on every host would be the bottleneck.

  python experiments/prepare.py --config=configs/ehr_bert.py:base --out=/data/prepared/ehr \
      --config.data.ehr.path=/data/meds
  python experiments/pretrain.py --config=configs/ehr_bert.py:base --workdir=runs/ehr \
      --config.data.ehr.path=/data/meds --config.data.prepared=/data/prepared/ehr

Opens the configured data module (MEDS, AnnData, images or tables; a generated cohort when
the path is empty), builds its vocabulary or statistics into `--out/artifacts`, applies its
deterministic transforms (tokenisation, binning, resampling, standardisation) to every
record of every split and writes them with `biofm_jax/data/prepared.py`. Training with
`config.data.prepared` set reads them through `tfds.data_source` and yields the same
batches as training on the raw source; the rest of the config's data section must stay
as it was prepared.
"""
from __future__ import annotations

import json
import pathlib
import time

from absl import flags

from biofm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file and preset, e.g. configs/ehr_bert.py:tiny.")
flags.DEFINE_string("out", None, "Directory to write the prepared dataset into (must not hold one).")
flags.mark_flags_as_required(["config", "out"])


def main(argv, overrides):
  del argv
  from biofm_jax.data import prepared
  from biofm_jax.modalities import registry
  config = cli.load_config_or_exit(FLAGS.config, overrides)
  modalities = registry.configured(config.data)
  if "multimodal" in config.data or len(modalities) != 1:
    cli.fail(f"prepare takes a config with one modality (one of {sorted(registry.MODALITIES)}); "
             f"found {modalities or list(config.data.keys())}")
  modality, out = modalities[0], pathlib.Path(FLAGS.out)
  start = time.perf_counter()
  try:
    module = registry.open_data_module(modality, config.data[modality], objective=config.objective.name,
                                             artifacts_dir=out / prepared.ARTIFACTS_DIR)
    manifest = prepared.prepare(module, out, data_config=config.data[modality].to_dict(),
                                objective=config.objective.name)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  print(f"=== prepared {modality} data in {time.perf_counter() - start:.1f} s: {out} ===")
  print(f"  records         {json.dumps(manifest['records'])}")
  print(f"  applied once    {', '.join(manifest['applied_transforms']) or 'nothing (every transform is random)'}")
  print(f"  fields          {', '.join(manifest['fields'])}")
  print(f"  train with      --config.data.prepared={out}")


if __name__ == "__main__":
  cli.run(main)
