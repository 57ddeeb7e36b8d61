"""Per-query ranking and ranking metrics (MRR@k, NDCG@k, recall@k, PNR) in plain, vectorised numpy.

Batch inference produces millions of (qid, doc_id, score) rows, and a single query may have
100,000 candidates, so nothing here loops over rows or compares all pairs of a query:

* `order`: the per-query order (qids grouped by hashing, one int64 sort of (query, score),
  doc_id tie-break only on tied rows);
* `metrics`: MRR@k, NDCG@k (exponential and linear gain), recall@k and PNR computed from that
  same order with trec_eval's semantics, against the rows' labels or against qrels, and their
  combination over disjoint sets of queries;
* `judgements`: qrels (`Judgements`) in numpy arrays, looked up by hashed (qid, doc_id) keys;
* `pairs`: the PNR pair counts, without listing pairs.
"""

from pipeline.ranking.judgements import DuplicateJudgement, Judgements
from pipeline.ranking.metrics import RankingMetrics, combine_metrics, ranking_metrics
from pipeline.ranking.order import rank_per_query

__all__ = ["DuplicateJudgement", "Judgements", "RankingMetrics", "combine_metrics", "rank_per_query",
           "ranking_metrics"]
