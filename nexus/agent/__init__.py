"""The node agent: hardware detection, tiers, registration, heartbeats, supervision; and the master's node registry."""
