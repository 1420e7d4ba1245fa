"""``mris synthesize-batch``: every knee of many radiographs through the serving ``Pipeline``,
into Parquet rows and map shards, resumable (``docs/SCALE.md``).

- ``plan``: the inputs (a manifest's radiographs or a folder's files), their shards and the
  job's identity (``job.json``), what is already complete.
- ``shard``: one shard through the pipeline (decode in the decode sandbox, localiser, encoders,
  FAISS, eq. 4), its rows, failures and maps written atomically.
- ``engines``: the local engine (one process) and the Ray engine (Ray Data, one pipeline per
  actor), both running ``shard.run_shard``.
"""
