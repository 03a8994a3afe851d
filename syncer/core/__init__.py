"""The pure core: trait keys, diff semantics, payloads, signing and retry rules.

Nothing in this package performs I/O or imports SQLAlchemy or an HTTP client (a test reads
its imports to hold it to that), so all of it is tested
with plain tables of inputs and outputs.
"""
