"""The forwarder: drains the collector's queue to the upstream events API (issue 3)."""
