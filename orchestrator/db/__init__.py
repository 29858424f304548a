"""The results database: ORM models (models.py), the Store (store.py), alembic migrations."""
from orchestrator.db.store import SchemaError, Store

__all__ = ["Store", "SchemaError"]
