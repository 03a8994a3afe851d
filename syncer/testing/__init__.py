"""Local stand-ins for the outside world, for the quick start and the tests."""
