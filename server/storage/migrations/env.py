"""Alembic environment: runs migrations on the connection SqlStore hands over."""

from alembic import context

from dynamiccl.server.storage.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
