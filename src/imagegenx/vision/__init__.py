"""vision room: faces, identity embeddings, QC metrics and safety checks with real helper models."""
