"""What the tests share besides fixtures (those live in tests/conftest.py): the factions they play,
waits, the userscript, `relay serve` and the operator's commands as processes, clients for SSE and
for hostile traffic, and where the programs beyond Python are."""
