"""Statements PostgreSQL parses and plans once per connection, then runs by name.

The dispatch path sends the same few statements for every job (insert, claim,
complete). Sent as text, each costs PostgreSQL a parse and a plan, about half
of its server time for these CTEs, and SQLAlchemy a compile; prepared once per
connection and run with `EXECUTE`, they cost neither (claim + complete went
from ~3.1 to ~1.5 ms here; bench/dispatch.py). They run through
`exec_driver_sql`, so errors are still SQLAlchemy's and a dead connection is
still invalidated.

Named prepared statements live in the server session: they need a direct
connection to PostgreSQL, not a transaction-pooling proxy such as PgBouncer
in transaction mode.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, RowMapping

_PREPARED_KEY = "nexus_prepared"  # in the pooled connection's info: the names prepared on it


class Prepared:
    """`sql` with `:name` parameters, each given its PostgreSQL type in `params` (in any order)."""

    def __init__(self, name: str, sql: str, params: dict[str, str], prefix: str = ""):
        self.name = name
        positional = sql
        for index, param in enumerate(params, start=1):
            positional = re.sub(rf"(?<![:\w]):{param}\b", f"${index}", positional)
        if leftover := re.findall(r"(?<![:\w]):([a-z_]+)\b", positional):
            raise ValueError(f"{name}: parameters without a type: {sorted(set(leftover))}")
        # psycopg2 formats every statement SQLAlchemy sends (even without parameters): a literal % doubles.
        self._prepare = f"PREPARE {name} ({', '.join(params.values())}) AS {positional}".replace("%", "%%")
        # `prefix` runs in the same implicit transaction (e.g. SET LOCAL for this statement alone).
        arguments = ", ".join(f"%({param})s::{kind}" for param, kind in params.items())
        self._execute = f"{prefix}EXECUTE {name} ({arguments})"

    def execute(self, conn: Connection, values: dict[str, Any]) -> list[RowMapping]:
        prepared = conn.connection.info.setdefault(_PREPARED_KEY, set())
        if self.name not in prepared:
            # The info dict lives as long as the DBAPI connection: a reconnect prepares again.
            conn.exec_driver_sql(self._prepare)
            prepared.add(self.name)
        return list(conn.exec_driver_sql(self._execute, values).mappings())
