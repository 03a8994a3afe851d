from syncer.cli import run

run()
