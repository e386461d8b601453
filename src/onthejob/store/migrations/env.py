"""Alembic environment: runs on the connection the store hands over (see db.upgrade), or on
`sqlalchemy.url` from alembic.ini when run from the command line."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from onthejob.store.schema import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from onthejob.store.db import make_engine

    url = config.get_main_option("sqlalchemy.url")
    engine = make_engine(url) if url else engine_from_config(
        config.get_section(config.config_ini_section, {}), poolclass=pool.NullPool)
    with engine.begin() as conn:
        _run(conn)
