"""Replica-aware reads on a worker node (docs/ARCHITECTURE.md, "Replicas for lag-tolerant reads").

Reads that tolerate lag go to the node's local copies when those are provably
fresh enough; every write, claim, lease and completion goes to the master.

    reads = make_node_reads(settings, master_engine, master_redis, master_store)
    rows = reads.rows("SELECT ... FROM jobs WHERE id = :id", {"id": job_id}, after_lsn=lsn)
    data = reads.store.get_bytes(bucket, key)          # local S3 when the ETag matches
    drained = reads.flag("nexus:node:drain")           # local Redis replica while its link is up

A node without replicas (empty `NEXUS_REPLICA_*` settings) gets the same object
reading from the master only.
"""

from nexus.replicas.flags import FlagReads
from nexus.replicas.lsn import format_lsn, master_commit_lsn, parse_lsn
from nexus.replicas.node import NodeReads, ReadStats, make_node_reads, make_read_store
from nexus.replicas.objects import ReplicatedObjectStore
from nexus.replicas.standby import StandbyReads

__all__ = ["FlagReads", "NodeReads", "ReadStats", "ReplicatedObjectStore", "StandbyReads", "format_lsn",
           "make_node_reads", "make_read_store", "master_commit_lsn", "parse_lsn"]
