"""The sampling wing: drawing samples with Algorithm 2 on Ray (draw), the network description
tasks get (job), per-image noise, sample shards and their memory-mapped reading, sample figures.
Imports model, data, cluster, report (tracking) and the base modules."""
