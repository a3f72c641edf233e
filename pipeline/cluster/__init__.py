"""The cluster wing: the Ray connection and private head, cluster storage and its filesystem
layer, durable runs, resumable blocks, one task per GPU, the progress board and task progress,
the watchdog. Imports report (tracking URI) and the base modules; no model, data or stage code."""
