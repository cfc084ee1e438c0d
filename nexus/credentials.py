"""The cluster's credentials: which exist, who may hold them, and what makes one too weak for production.

Settings (nexus/config.py) holds their values and derives each role's URLs from them; this module is the
catalogue both it and the tools that write deployments (`nexus config`, `nexus dev`) read: the Redis ACL
users and their rules, the worker's PostgreSQL role name, the secrets only the master holds and the
well-known defaults production refuses (DEPLOYMENT.md, "Credentials").
"""

from __future__ import annotations

# Secrets that must never reach production: the well-known defaults of the
# services we bundle and the placeholders our example env files ship with.
KNOWN_DEFAULT_SECRETS = frozenset(
    {"", "minioadmin", "postgres", "password", "changeme", "change-me", "admin", "secret",
     "nexus", "nexus-dev-admin-token", "nexus-dev-join-token", "example", "redis"}
)


# Settings only the master holds: a worker's configuration must leave them out (production refuses it).
MASTER_ONLY_SECRETS = ("admin_token", "flower_password", "worker_database_password", "worker_redis_password",
                       "worker_s3_secret_key", "api_redis_password", "reconciler_redis_password")

# The workers' Redis ACL user: every key and channel (Celery's queues, results and bindings, the job
# notices, the token streams, the activity and probe keys), no administrative or dangerous command
# (CONFIG, ACL, FLUSHALL, FLUSHDB, KEYS, DEBUG, SHUTDOWN, MONITOR, REPLICAOF, ...).
WORKER_REDIS_USER = "nexus-worker"
WORKER_REDIS_RULES = "~* &* +@all -@admin -@dangerous"


# The API's and the reconciler's own users (their processes hold no other Redis password): every key and
# channel too, since both publish to every queue and the API reads every stream and notice, and no
# administrative or dangerous command either. Separate users, so that each password is held by one
# kind of process only, rotated or revoked on its own, and a leaked one says which.
API_REDIS_USER = "nexus-api"
RECONCILER_REDIS_USER = "nexus-reconciler"
SERVICE_REDIS_RULES = WORKER_REDIS_RULES


def worker_redis_acl(password: str) -> str:
    """The ACL rules of the workers' user, as a Redis `user` directive's arguments."""
    return f"on >{password} {WORKER_REDIS_RULES}"


def service_redis_acl(password: str) -> str:
    """The ACL rules of the API's or the reconciler's user, as a Redis `user` directive's arguments."""
    return f"on >{password} {SERVICE_REDIS_RULES}"


def worker_role_name(database: str) -> str:
    """The worker's PostgreSQL role of this database. Roles are cluster-wide, so the database's name is in
    it: two clusters (or test sessions) on one server never share one."""
    safe = "".join(c if c.isalnum() or c == "_" else "_" for c in database.lower())
    return f"nexus_worker_{safe}"[:63]


def is_weak(value: str) -> bool:
    """A default, example or placeholder value, or one shorter than 12 characters."""
    lowered = value.strip().lower()
    return lowered in KNOWN_DEFAULT_SECRETS or lowered.startswith(("nexus-dev-", "example", "change")) or len(value) < 12
