"""Statements a restricted role runs as `SECURITY DEFINER` functions (docs/ARCHITECTURE.md, "Roles hold only
what they need").

A worker's database role owns nothing and may touch no table: it may only call
the functions the master installs, each one whole guarded statement (the
transition, its fence and its event row), run with the owner's rights. The
statement is written once, as ordinary SQL with `:name` parameters, next to the
code that uses it; `DefinerFunction` turns it into the function the master
installs (`create_sql`) and into the prepared call a worker sends (`execute`).

Why functions rather than column grants and row-level security: a policy sees
only the new row, so it cannot say "queued may become running only with the
next attempt" or "a result is written only under the attempt's lease", and a
worker with UPDATE on `state` could finish any job it can see. A function is
the transition itself, and nothing else is reachable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, RowMapping

from nexus.db.prepared import Prepared

# Written where the statement lets a session other than the worker role skip a lease check
# (the master's own tools and tests); replaced by the worker role's name when installed.
WORKER_ROLE_MARK = "__nexus_worker_role__"
# Written where a statement enforces the master's NEXUS_MAX_CHILDREN_PER_JOB; replaced by the number when
# installed, so a worker cannot name a limit of its own.
MAX_CHILDREN_MARK = "__nexus_max_children__"


@dataclass(frozen=True)
class DefinerFunction:
    """One statement as a SECURITY DEFINER function of the database owner.

    `params`: name → SQL type, in call order. `returns`: output column → SQL type
    (`jobs.state%TYPE` follows the table), or None for a function that returns nothing.
    `prefix` runs before the call in the same implicit transaction (e.g. SET LOCAL). `first`: a
    plpgsql statement run inside the function before the body (e.g. PERFORM an advisory lock); the
    body then takes its snapshot after it, so it sees what the lock's previous holder committed.
    """

    name: str
    params: dict[str, str]
    returns: dict[str, str] | None
    body: str
    prefix: str = ""
    first: str = ""
    _call: Prepared = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        arguments = ", ".join(f":{p}" for p in self.params)
        select = f"SELECT * FROM {self.name}({arguments})" if self.returns else f"SELECT {self.name}({arguments})"
        object.__setattr__(self, "_call", Prepared(f"{self.name}_call", select, self.params, prefix=self.prefix))

    def create_sql(self, worker_role: str, marks: dict[str, str] | None = None) -> str:
        """CREATE OR REPLACE the function; callable by its owner and `worker_role` only. `marks`: constants
        of the master's written into the statement (MAX_CHILDREN_MARK)."""
        first, body = (self._plpgsql(text, worker_role) for text in (self.first, self.body))
        for mark, value in (marks or {}).items():
            first, body = first.replace(mark, value), body.replace(mark, value)
        signature = ", ".join(f"_{p} {kind}" for p, kind in self.params.items())
        arg_types = ", ".join(self.params.values())
        if self.returns:
            columns = ", ".join(f"{name} {kind}" for name, kind in self.returns.items())
            returns, run = f"TABLE ({columns})", f"RETURN QUERY {body};"
        else:
            returns, run = "void", f"{body};"
        if first:
            run = f"{first};\n{run}"
        return f"""
CREATE OR REPLACE FUNCTION {self.name}({signature}) RETURNS {returns}
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $fn$
#variable_conflict use_column
BEGIN
{run}
END $fn$;
REVOKE ALL ON FUNCTION {self.name}({arg_types}) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {self.name}({arg_types}) TO "{worker_role}";
"""

    def _plpgsql(self, statement: str, worker_role: str) -> str:
        """`:name` parameters as the function's `_name` arguments, the role mark as the role."""
        for param in self.params:
            statement = re.sub(rf"(?<![:\w]):{param}\b", f"_{param}", statement)
        if leftover := re.findall(r"(?<![:\w]):([a-z_]+)\b", statement):
            raise ValueError(f"{self.name}: parameters not declared: {sorted(set(leftover))}")
        return statement.replace(WORKER_ROLE_MARK, worker_role.replace("'", "''"))

    def execute(self, conn: Connection, values: dict[str, Any]) -> list[RowMapping]:
        return self._call.execute(conn, values)
