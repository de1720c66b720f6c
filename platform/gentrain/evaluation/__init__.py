"""Evaluation of trained runs: `gentrain eval`, distributed sampling/extraction, periodic metrics in training.

    gentrain eval runs/vae-debug --metrics fid,kid,is,pr,nll --extractor classifier:runs/classifier-debug
    gentrain eval runs/gan-debug --metrics fid,kid --n 50000 --workers 8

- extractors.py: `inception` / `classifier:REF` by name (spec eval.extractor, --extractor)
- work.py: units of work (sample chunks, data shards) with global row indices
- distributed.py: units in this process or over Ray tasks, merged FeatureSummaries
- run.py: `gentrain eval` (reference statistics through the cache, MLflow logging)
- periodic.py: eval.metrics during training, gathered with the strategy's all_reduce
"""
