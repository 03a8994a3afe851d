"""The pure core: trait keys, diff semantics, payloads, signing and retry rules.

Nothing in this package performs I/O or imports SQLAlchemy or httpx, so all of it is tested
with plain tables of inputs and outputs.
"""
