"""Training a DDPM with Ray Train: the paper's recipe, data-parallel, fault tolerant, resumable.

Imports evaluation (scoring checkpoints), sampling, cluster, report, model, data and the base
modules; nothing imports training but the stages. No module is imported here: importing
``pipeline.training.published`` must not start torch and Ray.

- :mod:`~pipeline.training.trainer`: the driver, :func:`train_variant` (TorchTrainer, run
  identity and resume, MLflow run, progress, final export).
- :mod:`~pipeline.training.loop`: the per-worker loop and one :func:`train_step`.
- :mod:`~pipeline.training.randomness`: a step's t, noise and dropout seeds from (seed, step).
- :mod:`~pipeline.training.optim`: Adam, linear warmup, gradient clipping.
- :mod:`~pipeline.training.ema`: the EMA of the weights.
- :mod:`~pipeline.training.checkpoint`: a training state <-> a checkpoint folder.
- :mod:`~pipeline.training.divergence`: interval statistics and the NaN/inf stop.
- :mod:`~pipeline.training.identity`: run names, storage, the MLflow run record.
- :mod:`~pipeline.training.export`: models/<variant>/ (ema.pt, model.pt, model.json).
- :mod:`~pipeline.training.monitor` (rank 0's interval metrics) ->
  :mod:`~pipeline.cluster.progress` (driver: display) and :mod:`~pipeline.training.curves`
  (driver: MLflow).
- :mod:`~pipeline.training.published`: published weights in place of training
  (``model.source: checkpoint``).
- :mod:`~pipeline.training.session` (Ray Train worker or this process),
  :mod:`~pipeline.training.faults` (test-only hook).
"""
