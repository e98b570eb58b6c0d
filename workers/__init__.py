"""Drop-in workers: every module here that defines a `contracts.Worker` subclass is found at start-up.

A worker imports only `contracts` (never `supervisor` or paho). See the README, "Adding a worker".
"""
