"""Parts of ``scripts/bench_pipeline.py``: corpus, running stack, sections, ingest, table."""
