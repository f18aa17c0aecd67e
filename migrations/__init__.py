"""The Alembic migrations, installed as the package ``supervisor.migrations``."""
