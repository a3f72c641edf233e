"""Training a DDPM with Ray Train: the paper's recipe, data-parallel, fault tolerant, resumable.

Imports evaluation (scoring checkpoints), sampling, cluster, report, model, data and the base
modules; nothing imports training but the stages. No module is imported here: importing
``pipeline.training.published`` must not start torch and Ray.

Start with :mod:`~pipeline.training.loop`: the per-worker loop and one training step, top to
bottom (batch, forward and backward, clipping, the reduction over the ranks, Adam with warmup,
EMA, the divergence stop, checkpoints). What it calls, each with its own idea:

- :mod:`~pipeline.training.randomness`: a step's t, noise and dropout seeds from (seed, step).
- :mod:`~pipeline.training.replicas`: gradient clipping per virtual replica (the TPU run's).
- :mod:`~pipeline.training.ema`: the EMA of the weights.
- :mod:`~pipeline.training.checkpoint`: a training state <-> a checkpoint folder.
- :mod:`~pipeline.training.session`: where the loop runs (a Ray Train worker or this process).
- :mod:`~pipeline.training.monitor` (rank 0's interval metrics) ->
  :mod:`~pipeline.cluster.progress` (driver: display) and :mod:`~pipeline.training.curves`
  (driver: MLflow).
- :mod:`~pipeline.training.faults`: the test-only fault injection.

The driver and what it needs:

- :mod:`~pipeline.training.trainer`: :func:`train_variant` (TorchTrainer, run identity and
  resume, MLflow run, progress, final export); :mod:`~pipeline.training.inprocess`: the same
  loop in the stage's own process (``train.backend: process``).
- :mod:`~pipeline.training.identity`: run names, storage, the MLflow run record.
- :mod:`~pipeline.training.export`: models/<variant>/ (ema.pt, model.pt, model.json).
- :mod:`~pipeline.training.eval_during`, :mod:`~pipeline.training.selection`: FID during
  training and the checkpoint it selects.
- :mod:`~pipeline.training.published`: published weights in place of training
  (``model.source: checkpoint``).
- :mod:`~pipeline.training.signals` (Ray Train's SIGINT handler removed after fit),
  :mod:`~pipeline.training.reference_gate` (the reference file the train stage depends on).
"""
