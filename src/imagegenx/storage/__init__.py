"""storage room: TaskStore (SQLAlchemy 2 + Alembic) and BlobStore (obstore)."""
