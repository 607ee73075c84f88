"""Schema migrations, run by ``celeriac migrate`` (and by ``celeriac serve`` on the
embedded SQLite default). Test databases are built only through here."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

from alembic import command


def _project_root() -> Path:
    """Where alembic.ini lives: the source checkout the package was imported from (an
    editable install), else the working directory (the image runs from /app)."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "alembic.ini").exists() and (root / "alembic" / "env.py").exists():
            return root
    raise FileNotFoundError(
        "alembic.ini and alembic/ not found in the working directory or the source "
        "checkout: run 'celeriac migrate' from the project (or image) directory"
    )


def alembic_config(database_url: str) -> Config:
    root = _project_root()
    ini = root / "alembic.ini"
    config = Config(str(ini))
    config.set_main_option("script_location", str(root / "alembic"))
    # ConfigParser interpolation would eat a '%' in a password.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
