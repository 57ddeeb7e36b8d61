"""Compatibility shim, to be deleted: the run store moved to `pipeline.io.store`, the final
ranking files to `pipeline.io.exports` (`write_ranking_outputs(store, tag, labelled, cancel)`).

Monkeypatching `QUERIES_PER_BUCKET` here has no effect: patch `pipeline.io.exports` instead.
"""

from pipeline.io.exports import QUERIES_PER_BUCKET, format_label, format_score, write_ranking_outputs
from pipeline.io.store import FILES, MANIFEST, PARTIAL, REJECT_COLUMNS, ResumeError, RunStore, clean

PART_COLUMNS = ["row", "file", "line", "qid", "doc_id", "label", "score"]

__all__ = ["FILES", "MANIFEST", "PART_COLUMNS", "PARTIAL", "QUERIES_PER_BUCKET", "REJECT_COLUMNS", "ResumeError",
           "RunStore", "clean", "format_label", "format_score", "write_ranking_outputs"]
