"""Evaluation: the paper's Table 2 metrics and the lip-sync field's, per item and aggregated.

`metrics` holds the measures that need no learned network (PD, CSLD, PCLD, CSIM from given
embeddings, aggregation) and the published figures they are compared with; `networks` the
learned-feature metrics (FID, LPIPS, FVD) and `syncnet` LSE-C / LSE-D, each reading its weights
from MODELS/evaluation; `report` the HTML page and its figures.
"""
