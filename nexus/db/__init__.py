"""PostgreSQL: engine, models and the migrations that ship with the package."""
