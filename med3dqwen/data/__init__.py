"""Data: the synthetic chest-CT phantom, question rewriting and RadLex normalisation, JSONL records."""
