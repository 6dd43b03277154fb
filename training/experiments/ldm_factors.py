"""LDM-{1,2,4,8,16}: the perceptual-compression trade-off of the LDM paper (section 4.1) at small scale.

For each downsampling factor ``f`` this trains, on the synthetic emoji / clip-art scenes
(:class:`~ldm_sdk.training.data.scenes.SceneDataset`):

1. a first stage: ``f >= 2`` a KL autoencoder of factor ``f`` trained from scratch with
   :mod:`ldm_sdk.training.train_autoencoder`; ``f = 1`` is pixel space: no autoencoder at all. The data set
   hands the image itself to :mod:`ldm_sdk.training.train_ldm` as the item's ``latent`` (the trainer's
   precomputed-latents path), so the same trainer runs the same UNet in pixel space; the first stage that
   the trainer's config needs is a tiny placeholder that no step ever runs (the scale factor stays 1 and
   samples are not decoded);
2. a class-conditional LDM (the ``cin256`` recipe: a trained ``ClassEmbedder`` token through
   cross-attention, eps-prediction, the LDM zoo's linear schedule 0.0015..0.0195, EMA) whose UNet has the
   same parameter count for every factor within ``param_tolerance`` (:func:`design_unet`), trained for the
   same number of steps at the same batch size, with ``train_ldm.main`` called once per evaluation segment
   (``--resume auto`` continues it exactly);
3. measures: training throughput (optimizer steps per second and samples per second, timed between batch
   fetches inside the real trainer: data, first-stage encoding, UNet forward/backward, AdamW and EMA), the
   wall clock, and FID of DDIM samples (with the EMA weights) against held-out scenes every
   ``eval_every`` steps. FID uses torch-fidelity's ``inception-v3-compat`` feature extractor with the weights
   file ``--fid-weights``; without one, a random stand-in
   (:func:`~ldm_sdk.evaluation.generative.write_standin_inception_weights`) whose values are **not
   comparable with published FIDs**: the results say which was used.

Everything goes to ``--out-dir``: ``results.json`` (after every unit of work), ``results.md``, the figures,
sample grids, checkpoints. A second ``run`` with the same out dir skips what is done and continues the rest
(``--time-budget`` stops starting new work in time for a command limit). ``--results-from`` seeds a fresh
out dir (a new machine) with an earlier ``results.json``: finished factors are kept, unfinished ones
start over (their checkpoints were not carried). Subcommands::

    python training/experiments/ldm_factors.py run --preset smoke --out-dir out/ldm_factors_smoke
    python training/experiments/ldm_factors.py run --preset h100 --out-dir out/ldm_factors --time-budget 480
    python training/experiments/ldm_factors.py params --preset h100
    python training/experiments/ldm_factors.py pack-assets --out out/ldm_factors_assets
    python training/experiments/ldm_factors.py report --results out/ldm_factors/results.json \\
        --docs docs/experiments.md --figures docs/figures

docs/experiments.md describes the method and the commands of the GPU run. The code lives in the package
``ldm_factors_lib`` next to this script (presets, architectures, data, fid, train, results, report, run,
cli); this script puts it on ``sys.path`` and re-exports its names.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the package next to this script, also in spawned worker processes
    sys.path.insert(0, str(_HERE))

from ldm_factors_lib import *  # noqa: E402, F403
from ldm_factors_lib import __all__, main  # noqa: E402, F401

if __name__ == "__main__":
    main()
