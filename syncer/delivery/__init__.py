"""Getting bytes to workflow URLs: transport, retries and a bounded concurrent pump.

This layer knows nothing of audiences: it sends bodies to URLs and reports what became of them.
"""
