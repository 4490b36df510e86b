"""The Alembic migrations build exactly the tables the code declares, on SQLite and PostgreSQL,
and each one can be undone and applied again without losing the rows before it."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from app.core.db import alembic_config, upgrade
from app.tables import Base


def test_the_migrations_build_the_declared_tables(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], diff


def test_each_migration_undoes_and_redoes_keeping_earlier_rows(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO runs (run_dir, created_at, registered_at, data_fingerprint, "
                    "verdict, model_versions, report) VALUES ('r', CURRENT_TIMESTAMP, "
                    "CURRENT_TIMESTAMP, 'f', 'v', '{}', '{}')"
                )
            )
        cfg = alembic_config(db_url)
        command.downgrade(cfg, "0006")  # champion and challenger gone
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM runs")).scalar_one() == 1
            names = set(conn.dialect.get_table_names(conn))
            assert "shadow_predictions" not in names and "run_events" not in names
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT challenger_since FROM runs")).scalar_one() is None
            assert conn.execute(text("SELECT count(*) FROM run_events")).scalar_one() == 0
    finally:
        engine.dispose()
