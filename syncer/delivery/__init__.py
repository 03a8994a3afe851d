"""Getting bytes to workflow URLs: transport, retries, and sending what is claimed.

This layer knows nothing of audiences: it sends bodies to URLs and reports what became of them.
"""
